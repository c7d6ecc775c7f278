"""What an adapter load costs a replica, for route_sim.py's defaults: reading one adapter from the store (off the model
lock, on a worker thread) and placing it in a device slot (under the model lock), medians over repeats.

    OMP_NUM_THREADS=2 python benchmarks/adapter_load.py              # SmolLM2-135M, 9.1 MiB AdaLoRA adapters
    OMP_NUM_THREADS=2 python benchmarks/adapter_load.py --quick      # the tiny random llama (seconds)

The store's files were just written, so the read is from the page cache: a cold disk adds its own read time
(9.1 MiB at the disk's bandwidth).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, median  # noqa: E402
from serve_grpc import write_base, write_store  # noqa: E402

from adalora.server.backend import Backend  # noqa: E402
from adalora.server.config import ServerConfig  # noqa: E402


async def measure(backend: Backend, ids: list[str]) -> dict[str, list[float]]:
    """Milliseconds per adapter: the store read, and the slot write from host memory (each adapter read once)."""
    times: dict[str, list[float]] = {"read": [], "place": []}
    for adapter_id in ids:
        start = time.perf_counter()
        stored = await asyncio.to_thread(backend.store.read, adapter_id)
        times["read"].append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        await backend.residency.place(stored)
        times["place"].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny random llama")
    parser.add_argument("--adapters", type=int, default=24, help="adapters read and placed (default 24)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = write_base(args.quick, Path(tmp) / "base")
        write_store(base, Path(tmp) / "store", args.adapters)
        config = ServerConfig(base_model=str(base), adapter_dir=str(Path(tmp) / "store"),
                              max_slots=max(2, args.adapters // 4))
        backend = Backend.open(config)
        try:
            ids = [f"a{i}" for i in range(args.adapters)]
            times = asyncio.run(measure(backend, ids))
            mib = sum(f.stat().st_size for f in (Path(tmp) / "store" / ids[0]).iterdir()) / 2**20
        finally:
            backend.close()
    rows = [[step, f"{median(ms):.2f}", f"{min(ms):.2f}", f"{max(ms):.2f}"] for step, ms in times.items()]
    print(f"{'tiny llama' if args.quick else 'SmolLM2-135M'}, {args.adapters} adapters ({mib:.1f} MiB each), "
          f"{config.max_slots} slots (places past them evict to the host tier)")
    print(markdown_table(["step", "median ms", "min ms", "max ms"], rows))


if __name__ == "__main__":
    main()
