"""One torchrun rank of tests/test_ddp.py: run_train under DDP, then dump this rank's masks and adapter tensors.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py BASE DATA OUT DUMP_DIR
"""

import sys
from pathlib import Path

import torch

from adalora.config import AdapterShape
from adalora.recipe import TrainSpec, run_train
from adalora.training import env_world


def main(base: str, data: str, out: str, dump_dir: str) -> None:
    torch.set_num_threads(1)
    rank, world = env_world()

    def dump(prep, result) -> None:
        state = {
            "world_size": world,
            "is_distributed": torch.distributed.is_initialized(),
            "masks": {p: m.cpu() for p, m in result.allocator.masks.items()},
            "params": [p.detach().cpu() for p in prep.adapters.trainable_parameters()],
            "first_batch": prep.batches(0)["input_ids"],
        }
        torch.save(state, Path(dump_dir) / f"rank{rank}.pt")

    spec = TrainSpec(base_model=base, task="seq-cls", data=data, out=out, adapter=AdapterShape(init_r=4, target_r=2), total_steps=10,
                     tinit=2, tfinal=3, deltaT=2, batch_size=4, lr=1e-2, device="cpu", progress=False)
    run_train(spec, on_trained=dump)


if __name__ == "__main__":
    main(*sys.argv[1:5])
