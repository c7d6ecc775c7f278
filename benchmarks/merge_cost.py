"""Cost of merging 8 AdaLoRA adapters of SmolLM2-135M: our `svd` path vs the dense route, and --into-base.

Adapters are generated (per-layer ranks random in 0..init_r=12 on all 7 llama projections, random
factors) from the prepared base's config. Both routes produce an output of the same size (the budget:
one input's parameter count): ours by the global singular-value selection, the dense route PEFT's way
(add_weighted_adapter with svd: per layer form every delta, sum, full torch.linalg.svd, keep one fixed
rank everywhere, the rank that fits the budget).

Routes: `svd` (merge_adapters: the result in memory), `svd-streamed` (what `adalora merge` runs: each merged
layer written to the output file as it is computed, so the result is never held), `dense`, `into-base`.
Each route runs in a fresh subprocess; peak memory = the peak RSS (VmHWM) during the route minus the RSS
before it, measured after loading the inputs and a warm-up of every route on the inputs' widest layer (so
one-time library loading and workspaces are charged to no route), the peak mark reset in between
(clear_refs). The subprocesses run with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns every freed
large block at once: without it the dense route's peak swung between 88 and 495 MB from run to run (heap
fragmentation, not live tensors). --into-base peak RSS is compared with the model's size.

The model-level ratio depends on the layer size (ours works in row blocks of the stacked (out + in) x rank
factors, the dense route in out x in), so the same two routes also run on one layer of a larger shape
(--layer-shape, default TinyLlama-1.1B's MLP, 5632 x 2048) with the same 8 inputs. --quick uses a tiny
random llama (seconds).

    python benchmarks/merge_cost.py [--quick]   # markdown table; JSON in benchmarks/results/
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adalora.adapter import Adapter, AdapterLayer, base_identity  # noqa: E402
from adalora.adapter_file import load_adapter, read_manifest, save_adapter, save_adapter_streamed  # noqa: E402
from adalora.inject import resolve_targets  # noqa: E402
from adalora.layers import linear_dims  # noqa: E402

N_ADAPTERS, INIT_R = 8, 12
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_config(quick: bool):
    if quick:
        return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    from adalora.assets import model_path
    return AutoConfig.from_pretrained(model_path("smollm2-135m"))


def model_shapes(config) -> tuple[dict[str, tuple[int, int]], dict]:
    """The 7 llama projections of every block (in, out) and the base identity."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    paths = resolve_targets(model, TARGETS)
    return {p: linear_dims(model.get_submodule(p)) for p in paths}, base_identity(model)


def layer_shapes(spec: str) -> tuple[dict[str, tuple[int, int]], dict]:
    """One (in, out) layer from 'OUTxIN', under a made-up base identity."""
    out_f, in_f = (int(v) for v in spec.lower().split("x"))
    return {"layer": (in_f, out_f)}, {"name": f"layer-{spec}", "model_type": "none", "config_sha256": "0" * 64}


def make_adapters(shapes: dict[str, tuple[int, int]], base: dict, folder: Path, min_rank: int) -> None:
    """N_ADAPTERS adapters, each layer at a rank drawn in min_rank..INIT_R, random factors, seeded."""
    gen = torch.Generator().manual_seed(0)
    for i in range(N_ADAPTERS):
        layers = {}
        for p, (in_f, out_f) in shapes.items():
            r = int(torch.randint(min_rank, INIT_R + 1, (1,), generator=gen))
            if r:
                layers[p] = AdapterLayer(torch.randn(out_f, r, generator=gen) * 0.02, torch.randn(r, generator=gen),
                                         torch.randn(r, in_f, generator=gen) * 0.02)
        adapter = Adapter(base=base, shapes=shapes, layers=layers, init_r=INIT_R, lora_alpha=16.0)
        save_adapter(adapter, folder / f"a{i}")


def one_layer(adapters: list[Adapter]) -> list[Adapter]:
    """The inputs cut down to their widest layer (the same shape, ranks and factors)."""
    path, shape = max(adapters[0].shapes.items(), key=lambda item: sum(item[1]))
    return [Adapter(base=a.base, shapes={path: shape}, init_r=a.init_r, lora_alpha=a.lora_alpha,
                    layers={path: a.layers[path]} if path in a.layers else {}) for a in adapters]


def warm_up(adapters: list[Adapter]) -> None:
    """Run every route once on the inputs' widest layer, so that one-time costs (lazy imports; the BLAS and
    LAPACK workspaces that the first large call of each kind touches, about 3 MB) land before the baseline and
    are charged to none of the routes."""
    from adalora.tools.merge import MergeParams, merge_adapters
    from adalora.tools.merge.pipeline import merge_stream
    layer = one_layer(adapters)
    params = MergeParams(weights=(1.0 / len(layer),) * len(layer), budget=max(a.num_params() for a in layer))
    merge_adapters(layer, "svd", params)
    with tempfile.TemporaryDirectory() as out:
        save_adapter_streamed(*merge_stream(layer, "svd", params), out)
    dense_route(layer, list(params.weights), params.budget)


def _status_mb(field: str) -> float:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def reset_peak() -> float:
    """Sets the kernel's peak-RSS mark (VmHWM) back to the current RSS (Linux: clear_refs 5) and returns it in MB,
    so that a later peak_mb() minus it is what was allocated after this point, not the warm-up's peak."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


def fixed_rank(shapes: dict[str, tuple[int, int]], budget: int) -> int:
    """The one rank for every layer whose triplets (in + out + 1 params each) fit `budget` (PEFT's svd_rank)."""
    return max(1, budget // sum(in_f + out_f + 1 for in_f, out_f in shapes.values()))


def dense_route(adapters: list[Adapter], weights: list[float], budget: int) -> int:
    """PEFT's way, one layer at a time: every dense delta, their sum, a full SVD, the top fixed_rank triplets."""
    rank = fixed_rank(adapters[0].shapes, budget)
    kept = {}
    for path in adapters[0].shapes:
        delta = sum(w * a.delta(path) for a, w in zip(adapters, weights))  # (out, in)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        kept[path] = (U[:, :rank].clone(), S[:rank].clone(), Vh[:rank].clone())
    return sum(u.numel() + s.numel() + v.numel() for u, s, v in kept.values())


def route(name: str, folder: Path, base_model: str | None) -> dict:
    """Runs inside a fresh subprocess: one route, its time and peak RSS above the loaded inputs."""
    torch.set_num_threads(1)
    from adalora.tools.merge import MergeParams, merge_adapters, merge_into_base
    from adalora.tools.merge.pipeline import merge_stream
    adapters = [load_adapter(p) for p in sorted(folder.glob("a*"))]
    weights = [1.0 / len(adapters)] * len(adapters)
    budget = sum(a.num_params() for a in adapters) // len(adapters)  # one input's size
    warm_up(adapters)
    baseline = reset_peak()
    t0 = time.perf_counter()
    if name == "svd":
        merged = merge_adapters(adapters, "svd", MergeParams(weights=tuple(weights), budget=budget))
        result = {"params": merged.num_params()}
    elif name == "svd-streamed":  # what `adalora merge` runs once its inputs are loaded
        shell, ranks, layers = merge_stream(adapters, "svd", MergeParams(weights=tuple(weights), budget=budget))
        written = save_adapter_streamed(shell, ranks, layers, folder / "streamed")
        result = {"params": read_manifest(written)["num_params"]}
    elif name == "dense":
        result = {"params": dense_route(adapters, weights, budget)}
    else:
        merged = merge_adapters(adapters, "svd", MergeParams(weights=tuple(weights), budget=budget))
        merge_into_base(merged, Path(base_model), folder / "full")
        size = sum(f.stat().st_size for f in Path(base_model).glob("*.safetensors"))
        largest = max(f.stat().st_size for f in Path(base_model).glob("*.safetensors"))
        result = {"model_mb": size / 2**20, "largest_shard_mb": largest / 2**20}
    return {"route": name, "seconds": time.perf_counter() - t0, "peak_mb": peak_mb() - baseline, **result}


def run_route(name: str, folder: Path, base_model: str | None) -> dict:
    cmd = [sys.executable, __file__, "--route", name, "--dir", str(folder)] + (["--base-model", base_model] if base_model else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random llama, seconds")
    ap.add_argument("--route", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--base-model", help=argparse.SUPPRESS)
    ap.add_argument("--layer-shape", default="5632x2048", help="OUTxIN of the one-layer comparison")
    args = ap.parse_args()
    if args.route:
        print(json.dumps(route(args.route, Path(args.dir), args.base_model)))
        return
    results = {"quick": args.quick, "adapters": N_ADAPTERS, "init_r": INIT_R}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        config = base_config(args.quick)
        make_adapters(*model_shapes(config), folder, min_rank=0)
        if args.quick:
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(folder / "base", max_shard_size="200KB")
            base_model = str(folder / "base")
        else:
            from adalora.assets import model_path
            base_model = str(model_path("smollm2-135m"))
        svd, streamed, dense, into = (run_route(n, folder, base_model)
                                      for n in ("svd", "svd-streamed", "dense", "into-base"))
        results.update(svd=svd, svd_streamed=streamed, dense=dense, into_base=into,
                       speedup=dense["seconds"] / svd["seconds"],
                       memory_ratio=max(dense["peak_mb"], 1e-3) / max(svd["peak_mb"], 1e-3),
                       streamed_speedup=dense["seconds"] / streamed["seconds"],
                       streamed_memory_ratio=max(dense["peak_mb"], 1e-3) / max(streamed["peak_mb"], 1e-3))
        rows += [("model", svd), ("model", streamed), ("model", dense), ("model", into)]
        layer = Path(tmp) / "layer"
        layer.mkdir()
        spec = "96x64" if args.quick else args.layer_shape
        make_adapters(*layer_shapes(spec), layer, min_rank=INIT_R)
        lsvd, ldense = (run_route(n, layer, None) for n in ("svd", "dense"))
        results.update(layer_shape=spec, layer_svd=lsvd, layer_dense=ldense,
                       layer_speedup=ldense["seconds"] / lsvd["seconds"],
                       layer_memory_ratio=max(ldense["peak_mb"], 1e-3) / max(lsvd["peak_mb"], 1e-3))
        rows += [(f"one {spec} layer", lsvd), (f"one {spec} layer", ldense)]
    print("| inputs | route | seconds | peak RSS above inputs (MB) | output params |\n|---|---|---|---|---|")
    for where, r in rows:
        print(f"| {where} | {r['route']} | {r['seconds']:.2f} | {r['peak_mb']:.1f} | {r.get('params', '')} |")
    print(f"\nmodel: svd streamed to its file (`adalora merge`) vs dense {results['streamed_speedup']:.1f}x faster, "
          f"{results['streamed_memory_ratio']:.1f}x less peak memory")
    print(f"model: svd vs dense {results['speedup']:.1f}x faster, {results['memory_ratio']:.1f}x less peak memory; "
          f"into-base peak {into['peak_mb']:.0f} MB for a {into['model_mb']:.0f} MB model "
          f"(largest shard {into['largest_shard_mb']:.0f} MB)")
    print(f"one {spec} layer: svd vs dense {results['layer_speedup']:.1f}x faster, "
          f"{results['layer_memory_ratio']:.1f}x less peak memory")
    out = ROOT / "benchmarks" / "results" / f"merge_cost{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
