"""Property-based fuzzing (hypothesis) of every door an adapter or a request comes in by: a clear error or a correct
answer, never INTERNAL, never a crash, and the store unchanged.

  native files   a valid adapter.safetensors with its bytes flipped / cut / extended, its "adalora" manifest JSON
                 edited (fields deleted, wrong types, huge / negative / non-finite numbers, deep nesting, not JSON)
                 and its tensors renamed / dropped / reshaped / retyped (with the manifest's tensor sha256 made to
                 match, or not): load_adapter and load_any return a sound Adapter or raise AdapterFormatError;
                 `adalora inspect` exits 0 or 2
  PEFT folders   adapter_config.json replaced ([1, 2], deep nesting, non-UTF-8, ...) or its fields given wrong
                 types / non-finite or huge numbers, adapter_model.safetensors keys / shapes / dtypes / embedded native
                 metadata edited: load_peft (with the base folder) returns a sound Adapter or raises InteropError;
                 `adalora convert --to native` exits 0 (and its output loads) or 2 (and leaves no output)
  the server     one in-process server for the module: random GenerateRequests (prompts, sampling values, adapter
                 ids and mixes with extreme weights) succeed with a well-formed answer or fail with a client status;
                 uploads of mutated folders succeed or are refused with a client status and leave every other store
                 folder byte-identical; a mutated folder placed in the store is FAILED_PRECONDITION (or served),
                 never INTERNAL; and after every example a plain greedy request gives the tokens it gave before.

derandomize=True and no example database: every run tries the same examples.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import struct
import tempfile
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from adalora import cli, peft_interop
from adalora.adapter import TASK_TYPES, Adapter
from adalora.adapter_file import (
    FILE_NAME, METADATA_KEY, AdapterFormatError, load_adapter, save_adapter, tensors_sha256, to_tensors, validate,
)
from adalora.config import MODES
from adalora.peft_interop import CONFIG_NAME, NATIVE_META_KEY, WEIGHTS_NAME, InteropError
from adalora.server.adapter_checks import AdapterLimits
from adalora.server.client import generate_request
from adalora.server.config import ServerConfig
from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from tests.server_setup import ServerThread, word_tokenizer, write_base, write_store
from tests.factories import varied_llama
from tests.factories import random_adapter


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate, Phase.shrink),  # no explain phase: minutes on a failure
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


Code = grpc.StatusCode
VOCAB = 64
PROMPT = [5, 6, 7, 8]
"""The plain greedy request checked after every server example."""
CLIENT_CODES = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED,
                Code.OUT_OF_RANGE, Code.DEADLINE_EXCEEDED}
"""What a bad request may be answered with (never INTERNAL or UNKNOWN)."""
UPLOAD_CODES = {Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED}
STORE_READ_CODES = {Code.FAILED_PRECONDITION, Code.NOT_FOUND}
_ids = itertools.count()


class Fixture(SimpleNamespace):
    """A module fixture's namespace, short in hypothesis' reports of a failing example."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


# ---------------------------------------------------------------- the adapters everything starts from


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama base folder (word tokenizer) and one adapter of it in every format: native, PEFT AdaLoRA with
    and without save_peft's embedded native metadata, and plain PEFT LoRA; each file's parsed contents kept."""
    root = tmp_path_factory.mktemp("fuzz")
    base = varied_llama()
    base_dir = write_base(base, root / "base", word_tokenizer())
    adapter = random_adapter(base, 1, init_r=3)
    sources = root / "sources"
    save_adapter(adapter, sources / "native")
    peft_interop.save_peft(adapter, sources / "adalora+native")
    peft_interop.save_peft(adapter, sources / "adalora")
    state, _ = read_safetensors(sources / "adalora" / WEIGHTS_NAME)
    save_file(state, str(sources / "adalora" / WEIGHTS_NAME), metadata={"format": "pt"})  # no native metadata
    peft_interop.save_peft_lora(adapter, sources / "lora")
    native_tensors, native_meta = read_safetensors(sources / "native" / FILE_NAME)
    pefts = {}
    for kind in ("adalora+native", "adalora", "lora"):
        state, meta = read_safetensors(sources / kind / WEIGHTS_NAME)
        pefts[kind] = (json.loads((sources / kind / CONFIG_NAME).read_text()), state, meta)
    return Fixture(root=root, base=base, base_dir=base_dir, adapter=adapter, sources=sources,
                   native=(json.loads(native_meta[METADATA_KEY]), native_tensors), pefts=pefts,
                   scratch=Path(tempfile.mkdtemp(dir=root)))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def scratch_dir(world) -> Path:
    return Path(tempfile.mkdtemp(dir=world.scratch))


# ---------------------------------------------------------------- strategies: values and edits

HUGE = [1e300, -1e300, float("inf"), float("-inf"), float("nan"), 5e-324, -0.0, 2**63, -(2**63), 10**30, 2**64 + 1]
weird = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 8), st.integers(-(2**70), 2**70), st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["x", "", "7", "nan", "inf", "1e300", "causal-lm", "seq-cls", "lora", "adalora"]),
    st.lists(st.one_of(st.integers(-2, 3), st.booleans(), st.text(max_size=2)), max_size=4),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(-2, 3), st.text(max_size=2)), max_size=3),
)
"""A JSON value of any type, biased towards the numbers and strings that break parsers."""
DELETE = "<delete>"
deep = st.sampled_from([5, 1000, 100_000])
"""Nesting depths of a JSON array written into a document ('[' * n + ']' * n)."""
index = st.integers(0, 10_000)
"""Picks an element of a (sorted) list by index modulo its length."""
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool]
RESHAPES = ["transpose", "unsqueeze", "flatten", "drop_row", "add_row", "empty", "scalar", "drop_col"]
VALUE_EDITS = ["nan", "inf", "huge", "zero"]


def pick(items, i):
    items = sorted(items) if not isinstance(items, list) else items
    return items[i % len(items)] if items else None


def reshape(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "scalar":
        return t.reshape(-1)[0] if t.numel() else torch.tensor(0.0)
    t = t.reshape(1) if t.dim() == 0 else t
    if how == "transpose":
        return t.t().contiguous() if t.dim() == 2 else t.reshape(1, -1)
    if how == "unsqueeze":
        return t.unsqueeze(0)
    if how == "flatten":
        return t.reshape(-1)
    if how == "drop_row":
        return t[1:]
    if how == "add_row":
        return torch.cat([t, t[:1]])
    if how == "empty":
        return t[:0]
    return t[..., 1:]  # drop_col


def set_values(t: torch.Tensor, how: str) -> torch.Tensor:
    t = t.clone()
    if t.numel() and t.is_floating_point():
        t.reshape(-1)[0] = {"nan": float("nan"), "inf": float("inf"), "huge": 3e38, "zero": 0.0}[how]
    return t


tensor_edit = st.one_of(
    st.tuples(st.just("drop"), index),
    st.tuples(st.just("rename"), index, st.one_of(
        st.sampled_from(["strip_prefix", "other_module", "head", "swap_part", "lora_magnitude_vector", "bias",
                         "lora_embedding_A", "no_part", "duplicate_path"]),
        st.text(max_size=12))),
    st.tuples(st.just("dtype"), index, st.sampled_from(DTYPES)),
    st.tuples(st.just("reshape"), index, st.sampled_from(RESHAPES)),
    st.tuples(st.just("values"), index, st.sampled_from(VALUE_EDITS)),
    st.tuples(st.just("extra"), st.one_of(st.sampled_from(["head.score.weight", "layers.model.layers.0.self_attn."
                                                          "q_proj.P", "base_model.model.score.weight",
                                                          "base_model.model.model.layers.9.self_attn.q_proj.lora_A"]),
                                          st.text(min_size=1, max_size=12)),
              st.lists(st.integers(0, 5), max_size=3)),
)
"""An edit of a state dict: tensors dropped, renamed, retyped, reshaped, given non-finite values, or added."""


def rename(key: str, how: str, keys: list[str]) -> str:
    prefix = "base_model.model." if key.startswith("base_model.model.") else "layers." if key.startswith("layers.") \
        else ""
    rest = key[len(prefix):]
    stem, _, last = rest.rpartition(".")
    if how == "strip_prefix":
        return rest
    if how == "other_module":
        return prefix + rest.replace("layers.0.", "layers.7.").replace("q_proj", "k_proj").replace("mlp.", "mlpx.")
    if how == "head":
        return prefix + "score." + last
    if how == "swap_part":
        swaps = {"P": "Q", "Q": "P", "lam": "P", "lora_A": "lora_B", "lora_B": "lora_A", "lora_E": "lora_A",
                 "weight": "bias"}
        return f"{prefix}{stem}.{swaps.get(last, last)}"
    if how in ("lora_magnitude_vector", "bias", "lora_embedding_A"):
        return f"{prefix}{stem}.{how}"
    if how == "no_part":
        return prefix + stem
    if how == "duplicate_path":
        other = pick(keys, len(keys) // 2)
        return other
    return prefix + how  # arbitrary text after the prefix


def edit_tensors(tensors: dict[str, torch.Tensor], edits) -> dict[str, torch.Tensor]:
    tensors = dict(tensors)
    for edit in edits:
        keys = sorted(tensors)
        if edit[0] == "extra":
            _, name, shape = edit
            tensors[name] = torch.full(shape, 0.5)
            continue
        if not keys:
            continue
        key = pick(keys, edit[1])
        if edit[0] == "drop":
            del tensors[key]
        elif edit[0] == "rename":
            tensors[rename(key, edit[2], keys)] = tensors.pop(key)
        elif edit[0] == "dtype":
            tensors[key] = tensors[key].to(edit[2])
        elif edit[0] == "reshape":
            tensors[key] = reshape(tensors[key], edit[2]).contiguous()
        elif edit[0] == "values":
            tensors[key] = set_values(tensors[key], edit[2])
    return {k: v.contiguous() for k, v in tensors.items()}


def edit_json(doc, edits, fields: list[str]):
    """Apply field edits to a JSON object: ("del", field) / ("set", field, value) / ("deep", field, depth) (a nested
    array) / ("nested", field, index, key, value) (in the index-th entry of an object field: its `key` set to value
    or deleted, or the entry itself replaced when it is no object) / ("rename_entry", field, index, new name).
    Returns the document and {placeholder: raw JSON} to splice in when it is written (dump_json)."""
    doc = json.loads(json.dumps(doc))
    raw = {}
    for edit in edits:
        kind, field = edit[0], edit[1]
        if not isinstance(doc, dict):
            break
        if kind == "del":
            doc.pop(field, None)
        elif kind == "set":
            doc[field] = edit[2]
        elif kind == "deep":
            placeholder = f"__deep_{len(raw)}__"
            raw[f'"{placeholder}"'] = "[" * edit[2] + "]" * edit[2]
            doc[field] = placeholder
        elif kind == "nested":
            inner = doc.get(field)
            if not isinstance(inner, dict):
                inner = doc[field] = {}
            key = pick(sorted(inner), edit[2]) if inner else "x"
            target, sub_key, value = inner.get(key), edit[3], edit[4]
            if isinstance(target, dict):
                if value == DELETE:
                    target.pop(sub_key, None)
                else:
                    target[sub_key] = value
            elif value == DELETE:
                inner.pop(key, None)
            else:
                inner[key] = value
        elif kind == "rename_entry":
            inner = doc.get(field)
            if isinstance(inner, dict) and inner:
                inner[edit[3]] = inner.pop(pick(sorted(inner), edit[2]))
    return doc, raw


def literal(text):
    """A document's text as given, or ("deep", n): an array nested n deep (kept short in hypothesis' reports)."""
    return "[" * text[1] + "]" * text[1] if isinstance(text, tuple) else text


def dump_json(doc, raw: dict[str, str]) -> str:
    text = json.dumps(doc, sort_keys=True)
    for placeholder, value in raw.items():
        text = text.replace(placeholder, value)
    return text


def json_edits(field_names: list[str], sub_keys: list[str]):
    field = st.sampled_from([*field_names, "", "unknown"])
    return st.lists(st.one_of(
        st.tuples(st.just("del"), field),
        st.tuples(st.just("set"), field, weird),
        st.tuples(st.just("deep"), field, deep),
        st.tuples(st.just("nested"), field, index, st.one_of(st.sampled_from(sub_keys), st.text(max_size=3)),
                  st.one_of(weird, st.just(DELETE))),
        st.tuples(st.just("rename_entry"), field, index, st.one_of(st.text(max_size=10),
                                                                   st.sampled_from(["x.lora_E", "", "model"]))),
    ), min_size=1, max_size=4)


byte_ops = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.one_of(st.integers(0, 4000), st.integers(0, 100_000)), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.one_of(st.integers(0, 64), st.integers(0, 100_000))),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("header_length"), st.one_of(st.integers(0, 4096), st.sampled_from([2**63, 2**64 - 1,
                                                                                          100 * 2**20]))),
), min_size=1, max_size=3)
"""Byte-level damage: flipped bits (mostly in the header), a cut, trailing bytes, a new 8-byte header length."""


def damage(data: bytes, ops) -> bytes:
    data = bytearray(data)
    for op in ops:
        if op[0] == "flip" and data:
            data[op[1] % len(data)] ^= op[2]
        elif op[0] == "truncate":
            del data[op[1] % (len(data) + 1):]
        elif op[0] == "append":
            data += op[1]
        elif op[0] == "header_length":
            data[:8] = struct.pack("<Q", op[1])
    return bytes(data)


# ---------------------------------------------------------------- native mutations

MANIFEST_FIELDS = ["base", "format", "format_version", "info", "init_r", "labels", "lora_alpha", "mode", "modules",
                   "num_params", "task_type", "tensors_sha256"]
manifest_mutations = st.one_of(
    st.fixed_dictionaries({"manifest": json_edits(MANIFEST_FIELDS, ["in", "out", "rank"])}),
    st.fixed_dictionaries({"manifest_text": st.one_of(
        st.sampled_from(["[1,2]", "null", "1", '"x"', "{", "", "{}", "NaN", '{"format": "adalora-native"}',
                         '{"format": "adalora-native", "format_version": 1}']),
        st.tuples(st.just("deep"), deep), st.text(max_size=20))}),
)
"""Edits of the "adalora" manifest JSON in the header (the tensors, and so their sha256, unchanged)."""
file_mutations = st.one_of(
    st.fixed_dictionaries({"bytes": byte_ops}),
    st.fixed_dictionaries({"tensors": st.lists(tensor_edit, min_size=1, max_size=3), "fix_sha": st.booleans()}),
    st.fixed_dictionaries({"tensors": st.lists(tensor_edit, max_size=2), "fix_sha": st.just(True),
                           "manifest": json_edits(MANIFEST_FIELDS, ["in", "out", "rank"]),
                           "bytes": st.one_of(st.just([]), byte_ops)}),
)
"""Damage to the file's bytes, or to its tensors (with the manifest's sha256 made to match them, or not)."""
native_mutations = st.one_of(manifest_mutations, file_mutations)


def write_native(world, plan: dict, folder: Path) -> Path:
    meta, tensors = world.native
    tensors = edit_tensors(tensors, plan.get("tensors", ()))
    meta = dict(meta)
    if plan.get("fix_sha"):
        meta["tensors_sha256"] = tensors_sha256(tensors)
    meta, raw = edit_json(meta, plan.get("manifest", ()), MANIFEST_FIELDS)
    text = literal(plan["manifest_text"]) if "manifest_text" in plan else dump_json(meta, raw)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / FILE_NAME
    save_file(tensors, str(file), metadata={METADATA_KEY: text})
    if plan.get("bytes"):
        file.write_bytes(damage(file.read_bytes(), plan["bytes"]))
    return folder


def assert_sound(adapter: object, source: str) -> None:
    """A correct answer: an Adapter that passes validate and whose fields have the types and ranges the rest of the
    code relies on (finite positive scale, (in, out) pairs of positive ints, ...)."""
    assert isinstance(adapter, Adapter)
    validate(adapter, source=source)
    assert isinstance(adapter.base, dict), adapter.base
    assert isinstance(adapter.info, dict), adapter.info
    assert adapter.mode in MODES, adapter.mode
    assert adapter.task_type in TASK_TYPES
    assert isinstance(adapter.init_r, int) and not isinstance(adapter.init_r, bool) and adapter.init_r >= 1
    assert isinstance(adapter.lora_alpha, float) and math.isfinite(adapter.lora_alpha) and adapter.lora_alpha > 0, \
        adapter.lora_alpha
    assert math.isfinite(adapter.scale) and all(math.isfinite(s) for s in adapter.module_scales().values())
    assert adapter.labels is None or (isinstance(adapter.labels, list)
                                      and all(isinstance(x, str) for x in adapter.labels)), adapter.labels
    for path, shape in adapter.shapes.items():
        assert isinstance(path, str) and len(shape) == 2, (path, shape)
        assert all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape), (path, shape)
    assert set(adapter.layers) <= set(adapter.shapes)


def check_native(world, plan: dict, as_json: bool) -> None:
    """load_adapter and load_any agree: a sound Adapter or AdapterFormatError; `adalora inspect` exits 0 or 2 with
    them."""
    folder = write_native(world, plan, scratch_dir(world) / "adapter")
    try:
        outcomes = []
        for load in (load_adapter, peft_interop.load_any):
            try:
                adapter = load(folder)
            except AdapterFormatError:
                outcomes.append(False)
            else:
                assert_sound(adapter, str(folder))
                outcomes.append(True)
        assert outcomes[0] == outcomes[1]
        code = cli.main(["inspect", str(folder), *(["--json"] if as_json else [])])
        assert code == (0 if outcomes[0] else 2)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


@fuzz_settings(60)
@given(plan=manifest_mutations, as_json=st.booleans())
@example(plan={"manifest": [("set", "modules", [1, 2])]}, as_json=False)
@example(plan={"manifest": [("set", "init_r", "x")]}, as_json=False)
@example(plan={"manifest": [("set", "lora_alpha", 1e300)]}, as_json=False)
@example(plan={"manifest": [("set", "lora_alpha", float("nan"))]}, as_json=False)
@example(plan={"manifest": [("set", "info", [1])]}, as_json=False)
@example(plan={"manifest": [("deep", "info", 100_000)]}, as_json=False)
@example(plan={"manifest_text": "[1,2]"}, as_json=False)
@example(plan={"manifest": [("nested", "base", 0, "", 1.5)]}, as_json=False)  # base.config_sha256 = 1.5
def test_native_manifest_mutations_load_or_raise_adapter_format_error(world, plan, as_json):
    check_native(world, plan, as_json)


@fuzz_settings(50)
@given(plan=file_mutations, as_json=st.booleans())
def test_native_byte_and_tensor_mutations_load_or_raise_adapter_format_error(world, plan, as_json):
    check_native(world, plan, as_json)


# ---------------------------------------------------------------- PEFT mutations

PEFT_FIELDS = ["r", "lora_alpha", "init_r", "target_r", "rank_pattern", "alpha_pattern", "target_modules",
               "modules_to_save", "task_type", "peft_type", "use_rslora", "use_dora", "bias", "lora_bias",
               "base_model_name_or_path", "layer_replication", "trainable_token_indices", "target_parameters",
               "use_qalora", "inference_mode", "fan_in_fan_out"]
peft_values = st.one_of(
    weird,
    st.sampled_from(["ADALORA", "LORA", "IA3", "CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION", "TOKEN_CLS", "all",
                     "lora_only", ["q_proj"], ["score"], [1, 2], {"q_proj": 2}, {"q_proj.lora_E": [True]}]),
)
NATIVE_FIELDS = ["base", "mode", "task_type", "labels", "init_r", "lora_alpha", "info", "tensors_sha256"]
SOURCES = st.sampled_from(["adalora", "adalora+native", "lora"])
"""Which PEFT folder a plan starts from: AdaLoRA (plain, or with save_peft's native metadata) or a LoRA."""
config_texts = st.one_of(
    st.sampled_from([b"[1,2]", b"null", b"1", b'"x"', b"{", b"", b"\xff\xfe{}", b'{"peft_type": "\xc3"}', b"NaN",
                     b'{"peft_type": "LORA"}', b'{"peft_type": "ADALORA"}', b'{"peft_type": "LORA", "r": 4}']),
    st.tuples(st.just("deep"), deep), st.binary(max_size=16))
config_edits = st.lists(st.one_of(
    st.tuples(st.just("del"), st.sampled_from(PEFT_FIELDS)),
    st.tuples(st.just("set"), st.sampled_from(PEFT_FIELDS), peft_values),
    st.tuples(st.just("deep"), st.sampled_from(PEFT_FIELDS), deep),
    st.tuples(st.just("nested"), st.sampled_from(["rank_pattern", "alpha_pattern"]), index,
              st.text(max_size=3), st.one_of(weird, st.just(DELETE), st.lists(st.booleans(), max_size=5))),
    st.tuples(st.just("rename_entry"), st.sampled_from(["rank_pattern", "alpha_pattern"]), index,
              st.one_of(st.text(max_size=8), st.sampled_from(["(", "*", ".*", "q_proj", "[a-"]))),
), min_size=1, max_size=4)
native_edits = st.one_of(json_edits(NATIVE_FIELDS, ["name", "config_sha256"]),
                         st.sampled_from(["[1,2]", "null", "{", '"x"', "{}"]).map(lambda t: [("text", t)]))
peft_config_mutations = st.one_of(st.fixed_dictionaries({"source": SOURCES, "config_text": config_texts}),
                                  st.fixed_dictionaries({"source": SOURCES, "config": config_edits}))
"""adapter_config.json replaced by another text, or its fields deleted / given other values."""
tensor_edits = st.lists(tensor_edit, min_size=1, max_size=3)
peft_file_mutations = st.one_of(
    st.fixed_dictionaries({"source": SOURCES, "tensors": tensor_edits}, optional={"config": config_edits}),
    st.fixed_dictionaries({"source": SOURCES, "native": native_edits}, optional={"tensors": tensor_edits}),
)
"""adapter_model.safetensors' tensors renamed / dropped / reshaped / retyped, or its embedded native metadata (added
if the folder had none) edited; sometimes the config too."""
peft_mutations = st.one_of(peft_config_mutations, peft_file_mutations)


def write_peft(world, plan: dict, folder: Path) -> Path:
    config, state, meta = world.pefts[plan["source"]]
    state = edit_tensors(state, plan.get("tensors", ()))
    meta = dict(meta)
    native_edits = plan.get("native", ())
    if native_edits and native_edits[0][0] == "text":
        meta[NATIVE_META_KEY] = native_edits[0][1]
    elif native_edits:
        native = json.loads(meta.get(NATIVE_META_KEY) or world.pefts["adalora+native"][2][NATIVE_META_KEY])
        native, raw = edit_json(native, native_edits, NATIVE_FIELDS)
        meta[NATIVE_META_KEY] = dump_json(native, raw)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS_NAME), metadata=meta)
    if "config_text" in plan:
        text = literal(plan["config_text"])
        (folder / CONFIG_NAME).write_bytes(text if isinstance(text, bytes) else text.encode())
    else:
        config, raw = edit_json(config, plan.get("config", ()), PEFT_FIELDS)
        (folder / CONFIG_NAME).write_text(dump_json(config, raw))
    return folder


def check_peft(world, plan: dict) -> None:
    """load_peft (with the base folder) gives a sound Adapter or InteropError; `adalora convert --to native` exits
    0 with an output that loads as the same adapter, or 2 with no output (and no temporary folder) left."""
    work = scratch_dir(world)
    folder = write_peft(world, plan, work / "peft")
    try:
        try:
            adapter = peft_interop.load_peft(folder, base_model_dir=world.base_dir)
        except InteropError:
            loaded = None
        else:
            assert_sound(adapter, str(folder))
            loaded = tensors_sha256(to_tensors(adapter))
        out = work / "out"
        code = cli.main(["convert", str(folder), str(out), "--to", "native", "--base-model", str(world.base_dir)])
        assert code == (2 if loaded is None else 0)
        if code == 2:
            assert not out.exists() and sorted(p.name for p in work.iterdir()) == ["peft"]
        else:
            assert tensors_sha256(to_tensors(load_adapter(out))) == loaded
    finally:
        shutil.rmtree(work, ignore_errors=True)


@fuzz_settings(60)
@given(plan=peft_config_mutations)
@example(plan={"source": "adalora", "config_text": b"[1,2]"})
@example(plan={"source": "adalora", "config_text": ("deep", 100_000)})
@example(plan={"source": "adalora", "config_text": b"\xff\xfe{}"})
@example(plan={"source": "lora", "config": [("set", "r", "x")]})
@example(plan={"source": "lora", "config": [("set", "lora_alpha", 1e300)]})
@example(plan={"source": "adalora", "config": [("set", "init_r", float("nan"))]})
@example(plan={"source": "adalora", "config": [("set", "rank_pattern", [1, 2])]})
@example(plan={"source": "lora", "config": [("set", "alpha_pattern", {"q_proj": "x"})]})
@example(plan={"source": "adalora", "config": [("set", "target_modules", 7)]})
@example(plan={"source": "adalora", "config": [("set", "modules_to_save", "score")]})
@example(plan={"source": "adalora", "config": [("set", "task_type", [1])]})
@example(plan={"source": "adalora", "config": [("set", "peft_type", {"x": 1})]})
@example(plan={"source": "lora", "config": [("rename_entry", "alpha_pattern", 0, "(")]})
@example(plan={"source": "adalora", "config": [("del", "lora_alpha")]})
def test_peft_config_mutations_load_or_raise_interop_error(world, plan):
    check_peft(world, plan)


@fuzz_settings(40)
@given(plan=peft_file_mutations)
@example(plan={"source": "adalora+native", "native": [("del", "base")]})
@example(plan={"source": "adalora+native", "native": [("set", "base", [1])]})
@example(plan={"source": "adalora+native", "native": [("set", "task_type", "x")]})
@example(plan={"source": "adalora+native", "native": [("del", "tensors_sha256")]})
@example(plan={"source": "adalora+native", "native": [("set", "mode", "seq-cls")]})
@example(plan={"source": "lora", "tensors": [("values", 0, "nan")]})
def test_peft_tensor_and_metadata_mutations_load_or_raise_interop_error(world, plan):
    check_peft(world, plan)


# ---------------------------------------------------------------- the server

KNOWN = ("known", "known-peft", "other")


@pytest.fixture(scope="module")
def served(world):
    """One server over the tiny Llama: store holds 'known' (native, preloaded), 'known-peft' (PEFT) and 'other'."""
    root = world.root / "serve"
    store = write_store(root / "adapters", {
        "known": world.adapter, "other": random_adapter(world.base, 2, init_r=2),
        "known-peft": lambda folder: shutil.copytree(world.sources / "adalora", folder)})
    config = ServerConfig(base_model=str(world.base_dir), adapter_dir=str(store), preload=("known",), port=0,
                          max_batch_size=4, max_slots=6, max_prompt_tokens=20, max_new_tokens=24,
                          default_max_new_tokens=6, max_upload_bytes=1024 * 1024,
                          adapter_limits=AdapterLimits(max_header_bytes=256 * 1024, max_tensors=200,
                                                       max_tensor_bytes=2 * 1024 * 1024, max_rank=64))
    server = ServerThread(config)
    client = server.client
    reference = {adapter_id: greedy(client, adapter_id) for adapter_id in (*KNOWN, None)}
    assert len({tuple(t) for t in reference.values()}) > 1  # the check below can tell adapters apart
    yield Fixture(server=server, client=client, store=store, reference=reference)
    server.stop()


def greedy(client, adapter_id) -> list[int]:
    return list(client.generate(PROMPT, adapter_id, max_new_tokens=8, temperature=0).token_ids)


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def assert_still_serving(served, adapter_ids=("known",)) -> None:
    """A plain greedy request for each of `adapter_ids` (None: the base) gives the tokens it gave at startup."""
    for adapter_id in adapter_ids:
        assert greedy(served.client, adapter_id) == served.reference[adapter_id], adapter_id


def rpc(call) -> tuple[Code, object]:
    try:
        return Code.OK, call()
    except grpc.RpcError as e:
        return e.code(), e.details()


ADAPTER_IDS = st.one_of(st.sampled_from([*KNOWN, "nope", "unknown-1", "", "../etc", "Known", "a" * 65, "a/b",
                                         "known\x00", ".upload-known", "é"]),
                        st.text(max_size=8))
WEIGHTS = st.one_of(st.sampled_from([1.0, 0.0, -0.0, 1e300, -1e300, float("nan"), float("inf"), float("-inf"), 5e-324,
                                     1e-300, 3e38, -1.0]), st.floats(allow_nan=True, allow_infinity=True))
no_surrogates = st.characters(blacklist_categories=("Cs",))
texts = st.one_of(
    st.text(no_surrogates, max_size=40),
    st.sampled_from(["", " ", "\n\t ", "\x00", "w5", "w5 w9 w13", "[UNK] </s> [PAD]", "w63 w64 w999"]),
    st.tuples(st.sampled_from(["w5 ", "w7 w8 ", " ", "é", "x" * 50 + " "]), st.integers(1, 2000)).map(
        lambda t: t[0] * t[1]),
)
token_ids = st.one_of(st.lists(st.integers(0, VOCAB - 1), max_size=24),
                      st.lists(st.one_of(st.integers(0, VOCAB + 2), st.sampled_from([2**32 - 1, 2**31])), max_size=6))
maybe_float = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 0.5, -1.0, 1e-300, 5e-324, 1e300, float("nan"),
                                                    float("inf"), -0.0]),
                        st.floats(allow_nan=True, allow_infinity=True))


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    request = pb.GenerateRequest()
    prompt = draw(st.sampled_from(["text", "ids", "none"]))
    if prompt == "text":
        request.text = draw(texts)
    elif prompt == "ids":
        request.token_ids.ids.extend(draw(token_ids))
    selection = draw(st.sampled_from(["none", "id", "mix", "empty-mix"]))
    if selection == "id":
        request.adapter.id = draw(ADAPTER_IDS)
    elif selection == "mix":
        for adapter_id, weight in draw(st.lists(st.tuples(ADAPTER_IDS, WEIGHTS), min_size=1, max_size=4)):
            request.adapter.mix.adapters.add(id=adapter_id, weight=weight)
    elif selection == "empty-mix":
        request.adapter.mix.SetInParent()
    p = request.params
    p.max_new_tokens = draw(st.one_of(st.integers(0, 8), st.sampled_from([24, 25, 2**31, 2**32 - 1])))
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = draw(maybe_float)
        if value is not None:
            setattr(p, name, value)
    p.top_k = draw(st.one_of(st.integers(0, 70), st.sampled_from([2**32 - 1, 2**31])))
    seed = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    if seed is not None:
        p.seed = seed
    for kind, value in draw(st.lists(st.one_of(
            st.tuples(st.just("text"), st.one_of(st.text(no_surrogates, max_size=6), st.just(""), st.just("w5"))),
            st.tuples(st.just("ids"), st.lists(st.integers(0, VOCAB + 2), max_size=3)),
            st.tuples(st.just("neither"), st.none())), max_size=3)) + \
            draw(st.sampled_from([[], [("text", "")] * 40, [("ids", [5])] * 300, [("text", "w9")] * 5000])):
        stop = p.stop.add()
        if kind == "text":
            stop.text = value
        elif kind == "ids":
            stop.token_ids.ids.extend(value)
            stop.token_ids.SetInParent()
    return request


def resolved_max_new(request: pb.GenerateRequest) -> int:
    return request.params.max_new_tokens or 6


@fuzz_settings(60)
@given(request=generate_requests(), stream=st.booleans())
@example(request=generate_request("w5 w9", {"known": 1e300, "other": -1e300}, max_new_tokens=4, temperature=0),
         stream=False)
@example(request=generate_request([5, 6], {"known": float("nan"), "other": 1.0}), stream=False)
@example(request=generate_request(" \n\t ", "known"), stream=True)
@example(request=generate_request([5, VOCAB, 2**32 - 1], "known"), stream=False)
@example(request=generate_request([5, 6], "known", temperature=1e-300, seed=1), stream=False)
@example(request=generate_request([5, 6], "known", temperature=0.5, top_p=5e-324, repetition_penalty=1e300, seed=2),
         stream=True)
@example(request=generate_request([5, 6], "known", temperature=0, stop=[""] * 40), stream=False)
def test_generate_requests_answer_or_refuse_with_a_client_status(served, request, stream):
    before = snapshot(served.store)
    stub = served.client.stub
    if stream:
        code, reply = rpc(lambda: list(stub.GenerateStream(request, timeout=30)))
    else:
        code, reply = rpc(lambda: stub.Generate(request, timeout=30))
    assert code == Code.OK or code in CLIENT_CODES, (code, reply)
    if code == Code.OK:
        if stream:
            assert reply, "a stream that ended OK without a message"
            *tokens, last = reply
            ids = [t for m in tokens for t in m.token_ids]
            finish, usage = last.finish_reason, last.usage
        else:
            ids, finish, usage = list(reply.token_ids), reply.finish_reason, reply.usage
        assert all(0 <= t < VOCAB for t in ids)
        assert 1 <= len(ids) <= resolved_max_new(request) and usage.completion_tokens == len(ids)
        assert usage.prompt_tokens >= 1 and finish in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP,
                                                       pb.FINISH_REASON_EOS)
    assert snapshot(served.store) == before
    assert_still_serving(served)


upload_plans = st.one_of(st.tuples(st.just("native"), native_mutations), st.tuples(st.just("peft"), peft_mutations))


def write_plan(world, plan, folder: Path) -> Path:
    kind, mutation = plan
    return write_native(world, mutation, folder) if kind == "native" else write_peft(world, mutation, folder)


@fuzz_settings(40)
@given(plan=upload_plans, target=st.sampled_from(["fresh", "fresh-overwrite", "existing"]))
@example(plan=("native", {"manifest": [("deep", "info", 100_000)]}), target="fresh")
@example(plan=("native", {"manifest": [("set", "lora_alpha", 1e300)]}), target="fresh")
@example(plan=("peft", {"source": "adalora+native", "native": [("del", "base")]}), target="fresh")
@example(plan=("native", {"bytes": [("flip", 0, 1)]}), target="existing")
def test_uploads_of_mutated_folders_store_whole_or_change_nothing(world, served, plan, target):
    folder = write_plan(world, plan, scratch_dir(world) / "upload")
    try:
        adapter_id = "known" if target == "existing" else f"fuzz-up-{next(_ids)}"
        before = snapshot(served.store)
        code, reply = rpc(lambda: served.client.upload(adapter_id, folder, overwrite=target == "fresh-overwrite"))
        assert code == Code.OK or code in UPLOAD_CODES, (code, reply)
        after = snapshot(served.store)
        if code == Code.OK:
            assert target != "existing"
            new = {k: v for k, v in after.items() if k == adapter_id or k.startswith(adapter_id + "/")}
            assert {k: v for k, v in after.items() if k not in new} == before
            for f in folder.iterdir():
                assert new[f"{adapter_id}/{f.name}"] == f.read_bytes()
            code, info = rpc(lambda: served.client.get_adapter(adapter_id))
            assert code == Code.OK and info.sha256 == reply.adapter.sha256, (code, info)
        else:
            assert after == before
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    assert_still_serving(served)


@fuzz_settings(40)
@given(plan=upload_plans)
@example(plan=("native", {"manifest": [("set", "lora_alpha", 1e300)]}))
@example(plan=("native", {"tensors": [("values", 5, "huge")], "fix_sha": True}))
@example(plan=("peft", {"source": "adalora+native", "native": [("del", "base")]}))
@example(plan=("peft", {"source": "adalora+native", "native": [("del", "tensors_sha256")]}))
@example(plan=("peft", {"source": "lora", "config": [("rename_entry", "alpha_pattern", 0, "(")]}))
def test_mutated_store_folder_requested_by_id_is_failed_precondition_never_internal(world, served, plan):
    adapter_id = f"fuzz-disk-{next(_ids)}"
    write_plan(world, plan, served.store / adapter_id)
    before = snapshot(served.store)
    client = served.client
    calls = {
        "GetAdapter": lambda: client.get_adapter(adapter_id),
        "Generate": lambda: client.generate(PROMPT, adapter_id, max_new_tokens=4, temperature=0),
        "Generate mix": lambda: client.generate(PROMPT, {adapter_id: 0.5, "known": 1.0}, max_new_tokens=4,
                                                temperature=0),
        "LoadAdapter": lambda: client.load_adapter(adapter_id),
        "ListAdapters": lambda: client.list_adapters(include_store=True),
    }
    for name, call in calls.items():
        code, reply = rpc(call)
        assert code == Code.OK or code in STORE_READ_CODES, (name, code, reply)
        if name.startswith("Generate") and code == Code.OK:
            assert all(0 <= t < VOCAB for t in reply.token_ids) and 1 <= len(reply.token_ids) <= 4
    assert snapshot(served.store) == before
    assert_still_serving(served)


def test_after_the_fuzzing_every_adapter_and_the_base_serve_as_at_startup(served):
    assert_still_serving(served, served.reference)
    assert sorted(p.name for p in served.store.iterdir() if p.name.startswith(".")) == []  # no upload left behind
