"""Cost of merging 8 AdaLoRA adapters of SmolLM2-135M: our `svd` path vs the dense route, and --into-base.

Adapters are generated (per-layer ranks random in 0..init_r=12 on all 7 llama projections, random
factors) from the prepared base's config; the dense route forms every delta, sums them and runs a full
torch.linalg.svd per layer (as PEFT's add_weighted_adapter does). Each route runs in a fresh subprocess;
peak memory = ru_maxrss after the route minus ru_maxrss after loading the inputs and a tiny warm-up of
the same library calls (so one-time library loading is charged to neither route). --into-base peak RSS is
compared with the model's size on disk. --quick uses a tiny random llama (seconds).

    python benchmarks/merge_cost.py [--quick]   # markdown table; JSON in benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adalora_runtime.adapter import Adapter, AdapterLayer, base_identity  # noqa: E402
from adalora_runtime.adapter_file import load_adapter, save_adapter  # noqa: E402
from adalora_runtime.inject import resolve_targets  # noqa: E402
from adalora_runtime.layers import linear_dims  # noqa: E402

N_ADAPTERS, INIT_R = 8, 12
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def base_config(quick: bool):
    if quick:
        return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    from adalora_runtime.assets import model_path
    return AutoConfig.from_pretrained(model_path("smollm2-135m"))


def make_adapters(config, folder: Path) -> list[Path]:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    paths = resolve_targets(model, TARGETS)
    shapes = {p: linear_dims(model.get_submodule(p)) for p in paths}
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(N_ADAPTERS):
        layers = {}
        for p, (in_f, out_f) in shapes.items():
            r = int(torch.randint(0, INIT_R + 1, (1,), generator=gen))
            if r:
                layers[p] = AdapterLayer(torch.randn(out_f, r, generator=gen) * 0.02, torch.randn(r, generator=gen),
                                         torch.randn(r, in_f, generator=gen) * 0.02)
        adapter = Adapter(base=base_identity(model), shapes=shapes, layers=layers, init_r=INIT_R, lora_alpha=16.0)
        out.append(save_adapter(adapter, folder / f"a{i}").parent)
    return out


def warm_up() -> None:
    """Touch every library path both routes use (matmul, QR, SVD) on tiny inputs, so that one-time library
    loading and workspace setup land before the baseline and are not charged to either route."""
    a = torch.randn(64, 32)
    torch.linalg.qr(a)
    torch.linalg.svd(a, full_matrices=False)
    (a @ a.T).sum()


def route(name: str, folder: Path, base_model: str | None) -> dict:
    """Runs inside a fresh subprocess: one route, its time and peak RSS above the loaded inputs."""
    torch.set_num_threads(1)
    from tools.merge import MergeParams, merge_adapters, merge_into_base
    adapters = [load_adapter(p) for p in sorted(folder.glob("a*"))]
    weights = [1.0 / len(adapters)] * len(adapters)
    budget = sum(a.num_params() for a in adapters) // len(adapters)  # one input's size
    warm_up()
    baseline = rss_mb()
    t0 = time.perf_counter()
    if name == "svd":
        merged = merge_adapters(adapters, "svd", MergeParams(weights=tuple(weights), budget=budget))
        result = {"params": merged.num_params()}
    elif name == "dense":
        kept = {}
        for path, (in_f, out_f) in adapters[0].shapes.items():
            delta = sum(w * a.delta(path) for a, w in zip(adapters, weights))  # (out, in)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            r = sum(a.ranks()[path] for a in adapters)
            kept[path] = (U[:, :r].clone(), S[:r].clone(), Vh[:r].clone())
        result = {"params": sum(u.numel() + s.numel() + v.numel() for u, s, v in kept.values())}
    else:
        merged = merge_adapters(adapters, "svd", MergeParams(weights=tuple(weights), budget=budget))
        merge_into_base(merged, Path(base_model), folder / "full")
        size = sum(f.stat().st_size for f in Path(base_model).glob("*.safetensors"))
        largest = max(f.stat().st_size for f in Path(base_model).glob("*.safetensors"))
        result = {"model_mb": size / 2**20, "largest_shard_mb": largest / 2**20}
    return {"route": name, "seconds": time.perf_counter() - t0, "peak_mb": rss_mb() - baseline, **result}


def run_route(name: str, folder: Path, base_model: str | None) -> dict:
    cmd = [sys.executable, __file__, "--route", name, "--dir", str(folder)] + (["--base-model", base_model] if base_model else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random llama, seconds")
    ap.add_argument("--route", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--base-model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.route:
        print(json.dumps(route(args.route, Path(args.dir), args.base_model)))
        return
    config = base_config(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_adapters(config, folder)
        if args.quick:
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(folder / "base", max_shard_size="200KB")
            base_model = str(folder / "base")
        else:
            from adalora_runtime.assets import model_path
            base_model = str(model_path("smollm2-135m"))
        svd, dense, into = (run_route(n, folder, base_model) for n in ("svd", "dense", "into-base"))
    results = {"quick": args.quick, "adapters": N_ADAPTERS, "init_r": INIT_R, "svd": svd, "dense": dense,
               "into_base": into, "speedup": dense["seconds"] / svd["seconds"],
               "memory_ratio": max(dense["peak_mb"], 1e-3) / max(svd["peak_mb"], 1e-3)}
    print("| route | seconds | peak RSS above inputs (MB) |\n|---|---|---|")
    for r in (svd, dense, into):
        print(f"| {r['route']} | {r['seconds']:.2f} | {r['peak_mb']:.1f} |")
    print(f"\nsvd vs dense: {results['speedup']:.1f}x faster, {results['memory_ratio']:.1f}x less peak memory; "
          f"into-base peak {into['peak_mb']:.0f} MB for a {into['model_mb']:.0f} MB model "
          f"(largest shard {into['largest_shard_mb']:.0f} MB)")
    out = ROOT / "benchmarks" / "results" / f"merge_cost{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
