"""Model dtypes by the name a config or a flag gives them (training's --dtype, the server's --dtype), and 'auto':
bfloat16 where the hardware computes it natively, float32 elsewhere."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = (*DTYPES, "auto")
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""/proc/cpuinfo flags of native bfloat16 arithmetic: x86 AVX512-BF16 and AMX-BF16 ('flags'), Arm BF16 ('Features')."""


def cpu_computes_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bfloat16 instructions, read from /proc/cpuinfo (or the text given); False where it cannot
    be read (not Linux): then bfloat16 would be emulated, slower than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and CPU_BF16_FLAGS & set(value.split()):
            return True
    return False


def resolve(name: str, device: str | torch.device) -> str:
    """The dtype name to load a model in on `device`: `name` itself, or for 'auto' bfloat16 on a CUDA device that
    supports it and on a CPU that computes it natively (cpu_computes_bf16), float32 otherwise."""
    if name != "auto":
        return name
    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if kind == "cpu" and cpu_computes_bf16() else "float32"
