"""Does an idle server gather a burst into one prefill (`adalora serve --gather-ms`)? Two servers side by side
(SmolLM2-135M, bf16 weights, 8 adapters), one gathering (4 ms) and one not (0), each sent the same bursts of 8
concurrent /v1/completions (8 distinct adapters, 32 tokens each, rounds alternating). Reported per server: decode
steps of a single row (the first request of a burst prefilled alone, read from /metrics' adalora_batch_size), all
decode steps, and the median time of a burst as the client sees it.

    OMP_NUM_THREADS=2 python benchmarks/gather_burst.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx2 as httpx  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from _common import markdown_table, write_json  # noqa: E402
from adalora.adapter_file import save_adapter  # noqa: E402
from adalora.assets import model_path  # noqa: E402
from adalora.inject import resolve_targets  # noqa: E402
from adalora.layers import linear_dims  # noqa: E402
from engine_throughput import TARGETS, make_adapter  # noqa: E402

ROWS, TOKENS = 8, 32
PROMPT = "well, we can take my truck then."


def start(base: Path, store: Path, gather_ms: str, work: Path) -> tuple[subprocess.Popen, dict]:
    ready = work / f"gather-{gather_ms}.ready.json"
    cmd = [sys.executable, "-m", "adalora.cli", "serve", "--base-model", str(base), "--adapter-dir", str(store),
           "--port", "0", "--http-port", "0", "--metrics-port", "0", "--ready-file", str(ready), "--weights", "bf16",
           "--max-batch-size", str(ROWS), "--max-slots", str(ROWS), "--gather-ms", gather_ms,
           "--preload", *[f"a{i}" for i in range(ROWS)]]
    proc = subprocess.Popen(cmd, stdout=(work / f"gather-{gather_ms}.log").open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit(f"the server with --gather-ms {gather_ms} did not start; see {work}")
        time.sleep(0.2)
    return proc, json.loads(ready.read_text())


async def burst(url: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        start_time = time.perf_counter()
        await asyncio.gather(*(client.post("/v1/completions", json={
            "model": f"a{i}", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True})
            for i in range(ROWS)))
        return time.perf_counter() - start_time


def steps(metrics_port: int) -> tuple[float, float]:
    """(decode steps of one row, all decode steps) so far, from the server's adalora_batch_size histogram."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    buckets = {m[1]: float(m[2]) for m in re.finditer(r'adalora_batch_size_bucket\{le="([^"]+)"\} (\S+)', text)}
    return buckets.get("1.0", 0.0), buckets.get("+Inf", 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    base = model_path("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        shapes = {p: linear_dims(model.get_submodule(p)) for p in resolve_targets(model, TARGETS)}
        for i in range(ROWS):
            save_adapter(make_adapter(model, shapes, i, 0.3, 0.1), work / "store" / f"a{i}")
        servers = {}
        try:
            for gather_ms in ("4", "0"):
                servers[gather_ms] = start(base, work / "store", gather_ms, work)
            times = {g: [] for g in servers}
            for round_ in range(args.rounds + 1):  # the first is a warm-up
                for gather_ms, (_, ready) in servers.items():
                    seconds = asyncio.run(burst(f"http://127.0.0.1:{ready['http_port']}"))
                    if round_:
                        times[gather_ms].append(seconds)
            rows, results = [], {}
            for gather_ms, (_, ready) in servers.items():
                one, total = steps(ready["metrics_port"])
                results[gather_ms] = {"one_row_steps": one, "steps": total, "burst_s": statistics.median(times[gather_ms])}
                rows.append([gather_ms, f"{one:.0f}", f"{total:.0f}", f"{statistics.median(times[gather_ms]):.2f}"])
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    print(f"{args.rounds + 1} bursts of {ROWS} requests x {TOKENS} tokens (8 distinct adapters), the first a warm-up")
    print(markdown_table(["--gather-ms", "one-row decode steps", "decode steps", "burst s (median)"], rows))
    write_json("gather_burst", {"rounds": args.rounds, "rows": ROWS, "tokens": TOKENS, "results": results})


if __name__ == "__main__":
    main()
