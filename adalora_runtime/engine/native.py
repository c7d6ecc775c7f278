"""The lean path's CPU kernels (native.cpp), built once per machine and loaded as a Python module.

`torch.utils.cpp_extension` compiles native.cpp with the machine's C++ compiler and ninja on first use (about 15 s;
cached under $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, and rebuilt when the source changes).
Where they cannot run (no x86 AVX2, no compiler, a failed build, or ADALORA_NATIVE=0) `unavailable()` says why and
the callers keep their PyTorch paths, which compute the same thing.

- `skinny_linear(x, w, bias, lora)`: x @ w.T + bias for float32 CPU tensors, fastest at `SKINNY_ROWS` rows or fewer.
- `bf16_linear(x, w, bias, lora)`: x @ w.float().T + bias over bfloat16 weights; activations stay float32.
- `segments(groups, parts)`: one batch's adapters of one input, checked once: for each part (A (R, in), BT (R, out),
  offsets (G + 1,), first column c of y), token i of group g = groups[i] adds (x[i] @ A[r0:r1].T) @ BT[r0:r1] to
  y[i, c:c + out], r0, r1 = offsets[g], offsets[g + 1] (nothing where g < 0): several parts (the lean path's fused
  q/k/v, gate/up) in one pass. `segment_lora_add_(y, x, segments)` adds them in place; the two linear kernels
  add them to their output when given as `lora`, in the same call (a decode step's projection: one call).
- `rms_norm(x, w, eps)`, `rope_(qk, cos, sin, head_dim)`: a Llama-family layer's RMSNorm and rotary embedding.
- `silu_mul(x, intermediate)`: a Llama MLP's silu(gate) * up from its fused gate/up output.
- `decode_attention(q, keys, values, lengths, scale, new_keys, new_values)`: one query token per row over its first
  lengths[b] cached keys and values, grouped-query heads, after writing the step's new ones where given.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("native.cpp")
ENV = "ADALORA_NATIVE"
"""Set to 0 to keep every caller on its PyTorch path."""
SKINNY_ROWS = 16
"""The most rows skinny_linear is faster at than oneDNN's and MKL's matmuls (at 16 it ties oneDNN; docs/BENCHMARKS.md,
"Native CPU kernels")."""
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
"""-fopenmp: at::parallel_for runs on torch's own OpenMP threads (the same libgomp, loaded by torch first)."""

log = logging.getLogger(__name__)


class _Unbuilt:
    """Stands for the module until `unavailable()` has built and loaded it: the first kernel called loads it, or
    says why it cannot run (the engine checks `applies` first); once loaded, a call costs nothing extra."""

    def __getattr__(self, name: str):
        reason = unavailable()  # builds and loads the module where it can
        if reason is not None or isinstance(_kernels, _Unbuilt):
            raise RuntimeError(f"the native CPU kernels do not run here: {reason or 'their module is not loaded'}")
        return getattr(_kernels, name)


_kernels = _Unbuilt()
"""The built module (native.cpp's pybind11 bindings), once `unavailable()` has loaded it."""
Segments = Any
"""One batch's adapters of one input, checked once (`segments`): a native.cpp Segments object of the built module."""


def _ninja_on_path() -> bool:
    if shutil.which("ninja"):
        return True
    try:  # the ninja wheel (a dependency) installs it beside the interpreter, which may not be on PATH
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


@functools.cache
def unavailable() -> str | None:
    """Why the kernels cannot run here, or None once they are built and loaded (the first call builds them)."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they are written for x86-64 with AVX2, this is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 + FMA (torch reports {capability})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    if not _ninja_on_path():
        return "ninja is not installed (pip install ninja)"
    from torch.utils import cpp_extension

    global _kernels
    log.info("loading the CPU kernels (%s; the first use on a machine builds them, about 30 s)", SOURCE.name)
    try:
        _kernels = cpp_extension.load(name="adalora_native", sources=[str(SOURCE)], extra_cflags=FLAGS,
                                      extra_ldflags=["-fopenmp"], is_python_module=True, verbose=False)
    except Exception as e:  # a compiler error or a missing header: the PyTorch paths stay
        detail = str(e).strip().splitlines()
        return f"building {SOURCE.name} failed: {detail[-1] if detail else type(e).__name__}"
    return None


def available() -> bool:
    """Whether the kernels run here (building them on the first call)."""
    return unavailable() is None


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels run here on these tensors: every one on the CPU, the floating ones in float32."""
    return all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point())
               for t in tensors) and available()


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                  lora: Segments | None = None) -> torch.Tensor:
    """x (M, K) @ w (N, K).T + bias (N,) (+ lora's deltas, `segments`) -> (M, N); w contiguous."""
    return _kernels.skinny_linear(x, w, bias, lora)


def bf16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                lora: Segments | None = None) -> torch.Tensor:
    """x (M, K) float32 @ w (N, K) bfloat16 (contiguous), widened exactly, .T + bias (N,) (+ lora's deltas) -> (M, N)
    float32."""
    return _kernels.bf16_linear(x, w, bias, lora)


Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]
"""One adapted layer of an input: (A (R, in), BT (R, out), offsets (G + 1,) long, first column of y)."""


def segments(groups: torch.Tensor, parts: list[Part]) -> Segments:
    """The adapters of one input for tokens of `groups` (N,) long (module docstring), checked once (every part's
    factors float32 or bfloat16, contiguous, one `in`; offsets rising within [0, R]; every group < G): pass it to
    segment_lora_add_ or a linear kernel's `lora` for each call of the batch."""
    A, BT, offsets, columns = zip(*parts) if parts else ((), (), (), ())
    return _kernels.Segments(groups, list(A), list(BT), list(offsets), list(columns))


def segment_lora_add_(y: torch.Tensor, x: torch.Tensor, lora: Segments) -> None:
    """y (N, >= the parts' last column) += each token's own group's delta of x (N, in), in place; x contiguous,
    y with unit column stride (any row stride: a column slice of a wider output)."""
    _kernels.segment_lora_add_(y, x, lora)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x (M, H) (unit column stride) -> x * rsqrt(mean(x ** 2, -1) + eps) * w, (M, H) contiguous: transformers'
    LlamaRMSNorm in float32."""
    return _kernels.rms_norm(x, w, eps)


def rope_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
    """In place: each head_dim-wide head of each row t of qk (T, heads * head_dim) (unit column stride) becomes
    x * cos[t] + rotate_half(x) * sin[t]; cos, sin (T, head_dim) contiguous."""
    _kernels.rope_(qk, cos, sin, head_dim)


def silu_mul(x: torch.Tensor, intermediate: int) -> torch.Tensor:
    """x (M, 2 * intermediate) (unit column stride: [gate | up]) -> silu(gate) * up, (M, intermediate) contiguous,
    silu(g) = g / (1 + exp(-g)) with exp within ~2 ulp (transformers' SiLU computes the same formula)."""
    return _kernels.silu_mul(x, intermediate)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     scale: float, new_keys: torch.Tensor | None = None,
                     new_values: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, D), keys and values (>= B, Hkv, W, D) (unit stride on D; H a multiple of Hkv), lengths (B,) long in
    [1, W] -> (B, H, D): softmax(q . keys[b, h // (H / Hkv), :lengths[b]] * scale) @ the same rows of values. Given
    new_keys and new_values (B, Hkv, D) (unit stride on D), each row's are first written to column lengths[b] - 1 of
    keys and values (a decode step's cache write)."""
    return _kernels.decode_attention(q, keys, values, lengths, scale, new_keys, new_values)
