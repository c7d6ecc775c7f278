"""Merge methods as small strategy objects in a registry; each validates its parameters before any tensor work.

A strategy maps inputs (adapters, already checked compatible) and MergeParams to merged AdaLoRA-shaped
layers with scale 1: {module path: AdapterLayer}.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch

from adalora.adapter import Adapter, AdapterLayer
from adalora.config import is_int, is_number
from adalora.tools.merge import dense, spectral
from adalora.tools.merge.lowrank import (concat_layer, kept_ranks, layer_parts, select, singular_values_of_factors,
                                         spectrum_of_dense, top_r, top_triplets_of_factors, union_shapes)


LayerItem = tuple[str, AdapterLayer]


class MergeError(ValueError):
    """Inputs or parameters of a merge are invalid; the message names the adapter, module or option to change."""


@dataclass(frozen=True)
class MergeParams:
    """Parameters of one merge. None means "not given" (each method says which ones it uses)."""

    weights: tuple[float, ...]
    """One weight per input, in input order."""
    lambda_: float | None = None
    """Global multiplier of the merged update (task arithmetic's lambda; default 1)."""
    budget: int | None = None
    """Total adapter parameters of the result, r * (in + out + 1) summed over layers; None = exact rank (but see
    DenseStrategy: an adapter file from a dense method defaults to the inputs' summed parameters)."""
    density: float | None = None
    """Fraction of each update's entries kept, in (0, 1] (TIES / DARE / magnitude pruning)."""
    majority: str | None = None
    """Sign election of TIES: 'total' (sign of the sum, default) or 'frequency' (most common sign)."""
    seed: int | None = None
    """Seed of DARE's random drops, or of distill's batches (default 0)."""
    data: tuple[str, ...] | None = None
    """distill: one unlabeled data file per input, in input order (JSONL or CSV rows with "text")."""
    steps: int | None = None
    """distill: optimizer steps of the fit (default 100)."""

    def __post_init__(self) -> None:
        """The values, checked once here; which of them a method takes is Strategy.check's business."""
        if not isinstance(self.weights, tuple) or not all(is_number(w) for w in self.weights):
            raise MergeError(f"--weights {list(self.weights)} must all be finite numbers")
        if self.lambda_ is not None and not is_number(self.lambda_):
            raise MergeError(f"--lambda {self.lambda_} must be a finite number")
        if self.budget is not None and not is_int(self.budget, 1):
            raise MergeError(f"--budget {self.budget} must be a positive number of parameters")
        if self.density is not None and not (is_number(self.density) and 0.0 < self.density <= 1.0):
            raise MergeError(f"--density {self.density} must be in (0, 1] (the fraction of entries kept)")
        if self.majority is not None and self.majority not in dense.MAJORITY:
            raise MergeError(f"--majority {self.majority!r} must be one of {dense.MAJORITY}")
        if self.seed is not None and not is_int(self.seed, 0):
            raise MergeError(f"--seed {self.seed} must be a non-negative integer")
        if self.data is not None and not (isinstance(self.data, tuple) and all(isinstance(d, str) for d in self.data)):
            raise MergeError(f"--data {self.data!r} must be data file paths")
        if self.steps is not None and not is_int(self.steps, 1):
            raise MergeError(f"--steps {self.steps} must be a positive integer")

    @property
    def scale(self) -> float:
        return 1.0 if self.lambda_ is None else self.lambda_

    def given(self) -> set[str]:
        return {f.name for f in fields(self) if f.name != "weights" and getattr(self, f.name) is not None}

    def to_dict(self) -> dict:
        return {"weights": list(self.weights), **{name: getattr(self, name) for name in sorted(self.given())}}


OPTION = {"lambda_": "--lambda", "budget": "--budget", "density": "--density", "majority": "--majority",
          "seed": "--seed", "data": "--data", "steps": "--steps"}


class Strategy:
    """Base: common checks; subclasses set `name`, `accepts`, `requires` and implement `layers`."""

    name = ""
    accepts: frozenset[str] = frozenset()
    requires: frozenset[str] = frozenset()

    def check(self, params: MergeParams, n_inputs: int) -> None:
        """One weight per input, and the parameters this method takes (their values were checked when
        `params` was made)."""
        if len(params.weights) != n_inputs:
            raise MergeError(f"--weights has {len(params.weights)} value(s) for {n_inputs} adapter(s): give one per adapter")
        unused = sorted(OPTION[n] for n in params.given() - self.accepts)
        if unused:
            raise MergeError(f"method {self.name!r} does not use {', '.join(unused)}; "
                             f"it takes: {', '.join(sorted(OPTION[n] for n in self.accepts)) or 'only --weights'}")
        missing = sorted(OPTION[n] for n in self.requires - params.given())
        if missing:
            raise MergeError(f"method {self.name!r} needs {', '.join(missing)}")

    def prepare(self, adapters: list[Adapter], params: MergeParams,
                base_model_dir: str | None) -> tuple[list[Adapter], dict]:
        """The inputs as this method merges them, and what to record in the result's provenance; a method that
        learns from data (distill) runs here, after every check and before any layer is produced."""
        return adapters, {}

    def file_params(self, params: MergeParams, adapters: list[Adapter]) -> MergeParams:
        """The parameters an adapter file is merged with (`merge_files`); --into-base keeps `params` as given."""
        return params

    def layers(self, adapters: list[Adapter], params: MergeParams) -> dict[str, AdapterLayer]:
        raise NotImplementedError

    def stream(self, adapters: list[Adapter], params: MergeParams) -> tuple[dict[str, int], Iterator[LayerItem]]:
        """Each merged module's rank (known before any layer is produced) and the merged layers one at a time,
        in that dict's order: what save_adapter_streamed writes without holding the result. This default
        computes every layer first; the low-rank methods override it to produce each layer on demand."""
        merged = self.layers(adapters, params)
        return {path: layer.rank for path, layer in merged.items()}, iter(merged.items())


def _scaled_weights(params: MergeParams) -> list[float]:
    return [w * params.scale for w in params.weights]


class Linear(Strategy):
    """Exact weighted sum as concatenated factors (rank = sum of ranks); no dense delta."""

    name = "linear"

    def layers(self, adapters, params):
        return dict(self.stream(adapters, params)[1])

    def stream(self, adapters, params):
        weights = _scaled_weights(params)
        ranks = {p: r for p in union_shapes(adapters)
                 if (r := sum(a.layers[p].rank for a in adapters if p in a.layers))}
        return ranks, ((p, concat_layer(adapters, weights, p)) for p in ranks)


class TaskArithmetic(Linear):
    """lambda * sum_i w_i delta_i, exact, as concatenated factors."""

    name = "task_arithmetic"
    accepts = frozenset({"lambda_"})


class SVD(Strategy):
    """The exact weighted sum re-compressed to a global parameter budget by singular value (QR + small SVD)."""

    name = "svd"
    accepts = frozenset({"lambda_", "budget"})

    def layers(self, adapters, params):
        return dict(self.stream(adapters, params)[1])

    def stream(self, adapters, params):
        """Two passes so that only one layer's spectrum is alive at a time: singular values of every layer,
        the global selection, then (lazily) each layer's top triplets from the same inputs."""
        weights = _scaled_weights(params)
        singular = {}
        for path, (in_f, out_f) in union_shapes(adapters).items():
            if parts := self.parts(adapters, weights, path):
                singular[path] = (singular_values_of_factors(parts), out_f, in_f)
        kept = {path: r for path, r in kept_ranks(singular, params.budget).items() if r}
        return kept, ((path, self.finish(top_triplets_of_factors(self.parts(adapters, weights, path), r)))
                      for path, r in kept.items())

    def parts(self, adapters: list[Adapter], weights: list[float], path: str) -> list[AdapterLayer]:
        """Stacked-factor parts whose summed update is this method's merged update of one module."""
        return layer_parts(adapters, weights, path)

    def finish(self, layer: AdapterLayer) -> AdapterLayer:
        """A kept layer in SVD form (lam its singular values, descending) as written."""
        return layer


class Decorrelate(SVD):
    """The tasks' singular directions made orthonormal across tasks before summing (spectral.decorrelated): overlap
    between tasks no longer adds up. Exact rank (sum of ranks) or a global --budget, like svd."""

    name = "decorrelate"

    def parts(self, adapters, weights, path):
        return spectral.decorrelated(layer_parts(adapters, weights, path))


class Isotropic(SVD):
    """The exact weighted sum with each layer's kept singular values flattened to their mean (spectral.flattened)."""

    name = "isotropic"

    def finish(self, layer):
        return spectral.flattened(layer)


class Distill(SVD):
    """One weight per (input, module), fit on unlabeled rows so that the merged model matches each input's own
    adapter on that input's data (distill.py); then the reweighted exact sum, or svd's --budget."""

    name = "distill"
    accepts = frozenset({"lambda_", "budget", "data", "steps", "seed"})
    requires = frozenset({"data"})

    def prepare(self, adapters, params, base_model_dir):
        from adalora.tools.merge import distill

        if base_model_dir is None:
            raise MergeError("method 'distill' needs --base-model DIR: its weights are fit by running that model")
        config = distill.FitConfig(steps=params.steps or 100, seed=params.seed or 0)
        texts = distill.read_texts(list(params.data), len(adapters), config.max_rows)
        fitted = distill.fit_module_weights(adapters, list(params.weights), base_model_dir, texts, config)
        return distill.reweighted(adapters, fitted), {"fitted_weights": fitted}

    def stream(self, adapters, params):
        """`adapters` came from prepare, the fitted weights folded in: merged with weight 1 each (and --lambda)."""
        return super().stream(adapters, replace(params, weights=(1.0,) * len(adapters)))


class DenseStrategy(Strategy):
    """A method on each layer's dense updates, one layer at a time, then exact SVD and the global budget.

    Its exact result is full rank, so as factors it would outweigh the dense layers: an adapter file written by
    `merge_files` without a budget gets the inputs' summed parameter count (`file_params`)."""

    accepts = frozenset({"lambda_", "budget", "density"})
    requires = frozenset({"density"})

    def combine(self, stacked: torch.Tensor, params: MergeParams, path: str) -> torch.Tensor:
        raise NotImplementedError

    def file_params(self, params, adapters):
        """Without --budget: the inputs' summed parameter count, the size `linear` would write (the exact result
        of three MiniLM adapters would hold about 15M factor parameters)."""
        if params.budget is None:
            return replace(params, budget=sum(a.num_params() for a in adapters))
        return params

    def layers(self, adapters, params):
        spectra = {}
        for path, (in_f, out_f) in union_shapes(adapters).items():
            stacked = torch.stack([a.delta(path).float() if path in a.shapes else torch.zeros(out_f, in_f)
                                   for a in adapters])  # (n, out, in), input scales applied by Adapter.delta
            spectrum = spectrum_of_dense(self.combine(stacked, params, path) * params.scale)
            if params.budget is not None:  # no layer can keep more triplets than the whole budget pays for
                spectrum = top_r(spectrum, params.budget // (in_f + out_f + 1))
            spectra[path] = spectrum
        return select(spectra, params.budget)


class Ties(DenseStrategy):
    name = "ties"
    accepts = DenseStrategy.accepts | {"majority"}

    def combine(self, stacked, params, path):
        return dense.ties(stacked, list(params.weights), params.density, params.majority or "total")


class DareLinear(DenseStrategy):
    name = "dare_linear"
    accepts = DenseStrategy.accepts | {"seed"}

    def combine(self, stacked, params, path):
        gen = dense.layer_generator(params.seed or 0, path)
        return dense.dare_linear(stacked, list(params.weights), params.density, gen)


class DareTies(DenseStrategy):
    name = "dare_ties"
    accepts = DenseStrategy.accepts | {"seed", "majority"}

    def combine(self, stacked, params, path):
        gen = dense.layer_generator(params.seed or 0, path)
        return dense.dare_ties(stacked, list(params.weights), params.density, params.majority or "total", gen)


class MagnitudePrune(DenseStrategy):
    name = "magnitude_prune"

    def combine(self, stacked, params, path):
        return dense.magnitude_prune(stacked, list(params.weights), params.density)


METHODS: dict[str, Strategy] = {s.name: s for s in (Linear(), TaskArithmetic(), SVD(), Decorrelate(), Isotropic(),
                                                      Distill(), Ties(), DareLinear(), DareTies(), MagnitudePrune())}


def get_strategy(method: str) -> Strategy:
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]
