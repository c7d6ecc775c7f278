"""Offline merging of AdaLoRA / LoRA adapters: exact task arithmetic, SVD re-compression to a global
budget, TIES / DARE / magnitude pruning, and merging into a base model folder shard by shard."""

from adalora.tools.merge.into_base import merge_into_base
from adalora.tools.merge.pipeline import check_inputs, load_inputs, merge_adapters, merge_files
from adalora.tools.merge.strategies import METHODS, MergeError, MergeParams, get_strategy

__all__ = ["METHODS", "MergeError", "MergeParams", "check_inputs", "get_strategy", "load_inputs", "merge_adapters",
           "merge_files", "merge_into_base"]
