"""The lean decode path of Llama-family causal LMs (Llama, Mistral, Qwen2 layouts), beside the Hugging Face forward.

Built once over a model the AdapterEngine serves; the transformers model stays the loader and the reference
(tests compare logits and greedy tokens with it). What it does differently:

- the q/k/v projections run as one matmul, gate/up as one (weights concatenated once, at build); each adapter
  still applies to its own slice at its own per-layer rank, through the same per-layer plans
  (`multi_linear.add_delta`) as the wrapped modules;
- on a CPU in float32, a decode step's matmuls run the native kernel (`engine.native`, `Dense`), which streams
  each weight from its own layout faster than oneDNN's and MKL's small-batch matmuls (docs/BENCHMARKS.md); where
  it cannot run, every dense weight is reordered once for oneDNN instead;
- the KV cache is preallocated with per-row lengths (`engine.row_cache.RowCache`): a prefill writes its own rows,
  a decode step one column per row, and no step re-pads or concatenates the cache;
- a prefill packs its prompts one after the other, unpadded, so its matmuls run over the prompts' own tokens;
  each prompt attends causally over its own tokens;
- attention is `scaled_dot_product_attention` over each row's own length (a decode step on a CPU in float32:
  `native.decode_attention`, the same over each row's cached tokens); only each prompt's last position goes
  through the LM head.

The rotary embedding's cos and sin and the activation are the model's own modules, so every rope variant the
model's config sets applies unchanged; norms are too, except on a CPU in float32, where `engine.native`'s RMSNorm
(with the module's weight and eps) and rotation by cos and sin take the place of their 6-9 small ops each. The base
weights are read when the path is built: where they are not reordered, the model's q/k/v and gate/up weights become
views of the fused ones (held once); where they are (CPU, float32 without the native kernel), the reordered copy is
a second copy of the weights, and so is the bfloat16 copy of `weights='bf16'`: a later change to
the model's weights (an edge merge) is not seen by a path built before it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from adalora.engine import native
from adalora.engine.apply import SegmentPlan
from adalora.engine.errors import BatchError, EngineError
from adalora.engine.graphs import DecodeGraphs, SlotRoute
from adalora.engine.multi_linear import BatchContext, ContextHolder, MultiAdapterLinear, add_delta
from adalora.engine.row_cache import RowCache
from adalora.engine.slots import SlotBank

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""One layer's attention of a forward: (layer index, queries (n, heads, T, head_dim), the new tokens' keys and
values (n, kv_heads, T, head_dim)) -> (n, heads, T, head_dim); it stores the keys and values in the cache."""
MODEL_TYPES = ("llama", "mistral", "qwen2")
"""Configs whose decoder layers have the Llama layout: RMSNorm, q/k/v/o attention with rope, a SiLU gate/up MLP."""


def unsupported(model: nn.Module) -> str | None:
    """Why the lean path cannot run `model`, or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"model_type {model_type!r} is not one of the Llama-family layouts {MODEL_TYPES}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {config.hidden_act!r} (the lean path implements SiLU gate/up MLPs)"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention (the lean path attends over every cached token)"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "layers other than full attention"
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} has no .model.layers / .lm_head"
    return None


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, MultiAdapterLinear) else module


WEIGHTS = ("float", "bf16")
"""How the lean path holds its dense weights: 'float' (the model's own) or 'bf16' (a bfloat16 copy, widened exactly
in the kernel); with bf16 the activations stay float32 (CPU float32 with the native kernels), and the adapters'
factors are read in bfloat16
where a segment plan runs on a bank's stack (every group one adapter; a mixture's, and the other strategies',
stay float32): widened exactly, float32 arithmetic, half the bytes a step of distinct adapters reads."""


WIDEN_ROWS = 48
"""Past this many rows (a prefill), bf16 weights are widened to float32 for the default matmul: at 64 rows and more
that is 1.3-2.7x faster than their kernel here, which streams each weight row for a few rows of x."""


class Dense:
    """y = x @ W.T + b over a weight prepared once for the device's fastest matmul. On a CPU in float32: the native
    kernel (`engine.native.skinny_linear`) at decode sizes, over the plain weight, and the default matmul for
    longer inputs (a prefill); where the kernel does not run, a copy of W reordered for oneDNN. Elsewhere: the plain
    weight. With `weights='bf16'`: a bfloat16 copy of W (`native.bf16_linear` up to WIDEN_ROWS rows); past that,
    the values it holds widened to float32 for the default matmul, one weight at a time."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weights: str = "float") -> None:
        self.weight, self.bias = weight, bias
        self.native = native.applies(weight) and weight.is_contiguous()
        self.packed = self.w16 = None
        if weights == "bf16":
            if not self.native:
                raise EngineError(f"bf16 weights need the native CPU kernels on float32 weights (got {weight.dtype} "
                                  f"on {weight.device}; kernels: {native.unavailable() or 'available'})")
            self.w16 = weight.to(torch.bfloat16).contiguous()
        elif not self.native and weight.device.type == "cpu" and weight.dtype == torch.float32 \
                and torch.backends.mkldnn.is_available():
            with contextlib.suppress(RuntimeError, AttributeError):  # a build without this op: the plain matmul
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def held(self) -> torch.Tensor:
        """The float32 values the bf16 kernel multiplies by (a new tensor; the model's own weight otherwise)."""
        return self.weight if self.w16 is None else self.w16.float()

    def __call__(self, x: torch.Tensor, lora: native.Segments | None = None) -> torch.Tensor:
        """x (N, in) -> (N, out), contiguous, plus `lora`'s adapters (`native.segments`) where given: in the kernel's
        own call where one runs, else through `native.segment_lora_add_`."""
        if self.w16 is not None and x.shape[0] > WIDEN_ROWS:
            y = F.linear(x, self.held(), self.bias)
        elif self.w16 is not None:
            return native.bf16_linear(x, self.w16, self.bias, lora)
        elif self.native and x.shape[0] <= native.SKINNY_ROWS:
            return native.skinny_linear(x, self.weight, self.bias, lora)
        elif self.packed is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if lora is not None:
            native.segment_lora_add_(y, x.contiguous(), lora)
        return y


def _share(bases: Sequence[nn.Module], fused: torch.Tensor) -> None:
    """Point each module's weight at its rows of the fused weight (contiguous views): the model keeps working as
    the reference, and the weights are held once."""
    start = 0
    for base in bases:
        width = base.weight.shape[0]
        base.weight.data = fused[start: start + width]
        start += width


class Projection:
    """Several linear maps of one input as one matmul, each adapted layer's adapters added to its column slice."""

    def __init__(self, modules: Sequence[nn.Module], holder: ContextHolder, weights: str = "float") -> None:
        bases = [_base(m) for m in modules]
        weight = torch.cat([b.weight for b in bases]) if len(bases) > 1 else bases[0].weight  # (out, in)
        bias = None
        if any(b.bias is not None for b in bases):
            bias = torch.cat([b.bias if b.bias is not None else b.weight.new_zeros(b.weight.shape[0]) for b in bases])
        self.dense = Dense(weight.detach(), None if bias is None else bias.detach(), weights)
        self.factors = torch.bfloat16 if weights == "bf16" else None
        """The dtype the adapters' factors are read in where a segment plan runs on a bank's stack: with rounded
        weights, bfloat16 (half the bytes of a decode step's adapters; widened exactly in the kernel)."""
        if self.dense.packed is None and len(bases) > 1:
            _share(bases, self.dense.weight)
        self.holder = holder
        self._prepared: tuple | None = None
        """(context, its banks' generations, input dtype, *_prepare's result) of the last call."""
        self.parts: list[tuple[SlotBank, slice]] = []
        """(bank, its columns of the output) of each adapted module."""
        start = 0
        for module, base in zip(modules, bases):
            width = base.weight.shape[0]
            if isinstance(module, MultiAdapterLinear):
                self.parts.append((module.bank, slice(start, start + width)))
            start += width

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> (N, sum of out)."""
        context = self.holder.current
        if isinstance(context, SlotRoute):  # a static-shape step (engine.graphs): each row's slot, padded factors
            if x.shape[0] != context.slots.shape[0]:
                raise BatchError(f"the slot route has {context.slots.shape[0]} rows, the lean forward has "
                                 f"{x.shape[0]}")
            y = self.dense(x)
            factors = context.factors.get(self)
            if factors is not None:
                factors.add_to(y, x, context.slots)
            return y
        if context is None or not context.routes or not self.parts:
            return self.dense(x)
        if x.shape[0] != context.tokens:
            raise BatchError(f"the batch context routes {context.tokens} tokens, the lean forward has {x.shape[0]}; "
                             f"build the context for this batch's shape")
        prepared = self._prepared
        if prepared is None or prepared[0] is not context or prepared[2] != x.dtype \
                or prepared[1] != [bank.generation for bank, _ in self.parts]:
            prepared = self._prepared = (context, [bank.generation for bank, _ in self.parts], x.dtype,
                                         *self._prepare(context, x.dtype))
        y = self.dense(x, prepared[3])
        for plan, bank, columns in prepared[4]:
            add_delta(plan, bank, y[:, columns], x)
        return y

    def _prepare(self, context: BatchContext, dtype: torch.dtype) -> tuple[native.Segments | None, list]:
        """(the segment kernel's form of the parts it runs (`native.segments`, None if none), the other parts'
        (plan, bank, columns)) of this context's plans for inputs of `dtype`: what every call of the context runs
        until a bank is written (its generation)."""
        segments, groups, others = [], None, []
        for bank, columns in self.parts:
            plan = context.plan(bank)
            if plan is None:
                continue
            if isinstance(plan, SegmentPlan) and plan.native and dtype == plan.A.dtype == bank.dtype \
                    and (groups is None or plan.groups is groups):
                part = plan.part(columns.start)
                if self.factors is not None and plan.stacked:
                    A, BT, offsets, _ = bank.stacked(plan.groups, self.factors)
                    part = (A, BT, offsets, columns.start)
                segments.append(part)  # the parts' kernels: one call
                groups = plan.groups
            else:
                others.append((plan, bank, columns))
        return (native.segments(groups, segments) if segments else None), others


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (n, T, heads, D) rotated by position: transformers' apply_rotary_pos_emb (its rotate_half), over the query
    and key heads at once; cos, sin (n, T, D)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return x * cos + rotate_half(x) * sin


class Norm:
    """A layer's RMSNorm: `native.rms_norm` with the module's weight and eps where the kernels run (CPU float32),
    else the model's own module (any other RMSNorm variant too)."""

    def __init__(self, module: nn.Module, fast: bool) -> None:
        self.module = module
        self.eps = getattr(module, "variance_epsilon", None)
        weight = getattr(module, "weight", None)
        self.fast = fast and isinstance(self.eps, float) and isinstance(weight, torch.Tensor) and weight.dim() == 1 \
            and weight.is_contiguous() and native.applies(weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., hidden) -> normed, the same shape."""
        if not self.fast:
            return self.module(x)
        return native.rms_norm(x.reshape(-1, x.shape[-1]), self.module.weight, self.eps).view(x.shape)


@dataclass(frozen=True)
class _Shape:
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float


class LeanLayer:
    """One decoder layer: fused projections, the model's own norms and activation (on the fast path, the native
    RMSNorm and silu(gate) * up in their place)."""

    def __init__(self, layer: nn.Module, holder: ContextHolder, weights: str = "float", fast: bool = False) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = Projection([attn.q_proj, attn.k_proj, attn.v_proj], holder, weights)
        self.o = Projection([attn.o_proj], holder, weights)
        self.gate_up = Projection([mlp.gate_proj, mlp.up_proj], holder, weights)
        self.down = Projection([mlp.down_proj], holder, weights)
        self.act = mlp.act_fn
        self.fast = fast
        self.norm_in, self.norm_post = Norm(layer.input_layernorm, fast), Norm(layer.post_attention_layernorm, fast)
        self.q_width = _base(attn.q_proj).weight.shape[0]
        self.kv_width = _base(attn.k_proj).weight.shape[0]
        self.intermediate = _base(mlp.gate_proj).weight.shape[0]

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        if self.fast:  # SiLU (`unsupported` admits no other activation), in one native call
            return self.down(native.silu_mul(self.gate_up(h), self.intermediate))
        gate, up = self.gate_up(h).split(self.intermediate, dim=-1)  # (N, I) each
        return self.down(self.act(gate) * up)


class LeanLlama:
    """Prefill and decode over a RowCache, with the adapters the engine's context routes (holder.current)."""

    name = "lean"

    def __init__(self, model: nn.Module, holder: ContextHolder, max_rows: int, weights: str = "float",
                 graphs: bool = True) -> None:
        reason = unsupported(model)
        if reason is not None:
            raise EngineError(f"the lean decode path cannot run this model: {reason}; use decoder 'hf'")
        if weights not in WEIGHTS:
            raise EngineError(f"unknown weights {weights!r}; choose one of {WEIGHTS}")
        self.weights = weights
        config = model.config
        body = model.model
        attn = body.layers[0].self_attn
        head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.shape = _Shape(config.num_attention_heads, config.num_key_value_heads, head_dim, attn.scaling)
        head = _base(model.lm_head)  # never adapted (engine targets exclude heads)
        weight = head.weight
        self.fast = native.applies(weight)
        """The native norm, rope and decode-attention kernels run (CPU float32, kernels built); else the model's
        modules and torch."""
        self.embed, self.norm, self.rotary = body.embed_tokens, Norm(body.norm, self.fast), body.rotary_emb
        self.layers = [LeanLayer(layer, holder, weights, self.fast)
                       for layer in body.layers[: config.num_hidden_layers]]
        self.head = Dense(weight.detach(), None if head.bias is None else head.bias.detach(), weights)
        self.cache = RowCache(len(self.layers), max_rows, self.shape.kv_heads, head_dim, weight.dtype, weight.device,
                              limit=getattr(config, "max_position_embeddings", None))
        self.holder = holder
        self.graphs = DecodeGraphs(self) if graphs and weight.device.type == "cuda" else None
        """On CUDA (unless `graphs` is off): decode steps replayed from CUDA graphs (engine.graphs)."""

    # ---- one forward over T new tokens of n rows -------------------------------------------------------------

    def _attend(self, layer: LeanLayer, index: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attend: Attend) -> torch.Tensor:
        """h (n, T, hidden) normed input -> attention output (n, T, hidden)."""
        n, T, _ = h.shape
        s = self.shape
        qkv = layer.qkv(h.reshape(n * T, -1))  # (n T, q + 2 kv)
        qk, v = qkv.split([layer.q_width + layer.kv_width, layer.kv_width], dim=-1)
        if self.fast:  # rope: cos, sin (n T, D), contiguous (_forward)
            native.rope_(qk, *rope, s.head_dim)
            qk = qk.view(n, T, s.heads + s.kv_heads, s.head_dim)
        else:  # rope: cos, sin (n, T, D)
            qk = _rope(qk.reshape(n, T, s.heads + s.kv_heads, s.head_dim), *rope)  # q and k heads in one pass
        q = qk[:, :, : s.heads].transpose(1, 2)  # (n, H, T, D)
        k = qk[:, :, s.heads:].transpose(1, 2)  # (n, Hkv, T, D)
        v = v.view(n, T, s.kv_heads, s.head_dim).transpose(1, 2)
        out = attend(index, q, k, v)  # (n, H, T, D)
        return layer.o(out.transpose(1, 2).reshape(n * T, -1)).view(n, T, -1)

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor, attend: Attend) -> torch.Tensor:
        """ids, position_ids (n, T) -> final hidden states (n, T, hidden)."""
        h = self.embed(ids)  # (n, T, hidden)
        rope = self.rotary(h, position_ids)  # cos, sin (n, T, D)
        n, T, hidden = h.shape
        if self.fast:
            rope = tuple(t.reshape(n * T, -1).contiguous() for t in rope)
        for index, layer in enumerate(self.layers):
            h = h + self._attend(layer, index, layer.norm_in(h), rope, attend)
            h = h + layer.mlp(layer.norm_post(h).reshape(n * T, hidden)).view(n, T, hidden)
        return self.norm(h)

    def _sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
              causal: bool = False) -> torch.Tensor:
        s = self.shape
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=s.scaling,
                                              enable_gqa=s.heads != s.kv_heads)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, hidden) -> (n, vocab)."""
        return self.head(hidden)

    # ---- the Generator's decoder interface -------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return self.cache.rows

    def prefill_hidden(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """New rows for `prompts` (appended after the running rows), their prompts packed one after the other (no
        padding: a prefill costs the prompts' own tokens) -> (final hidden states (total, hidden) of every prompt
        token in that order, the index of each prompt's last token (n,)). The adapter context routes each row's
        own tokens (`prefill_tokens`)."""
        lengths = [len(p) for p in prompts]
        device = self.cache.device
        starts = [0]
        for length in lengths:
            starts.append(starts[-1] + length)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)[None]  # (1, total)
        positions = torch.cat([torch.arange(length, device=device) for length in lengths])[None]  # (1, total)
        rows = self.cache.join(lengths)

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """Each prompt attends causally over its own tokens only; its keys and values go to its cache row."""
            outs = []
            for row, (start, end) in enumerate(zip(starts, starts[1:]), start=rows.start):
                keys, values = k[:, :, start:end], v[:, :, start:end]
                self.cache.write_row(index, row, keys[0], values[0])
                outs.append(self._sdpa(q[:, :, start:end], keys, values, None, causal=True))
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

        saved = self.holder.current
        try:
            route = None if self.graphs is None else self.graphs.route()
            if route is not None:  # on CUDA: the adapters as the decode graphs run them, two batched matmuls each
                self.holder.current = route
            hidden = self._forward(ids, positions, attend)[0]  # (total, hidden)
        except BaseException:
            self.cache.keep(list(range(rows.start)))  # the rows it opened close again
            raise
        finally:
            self.holder.current = saved
        return hidden, torch.tensor(starts[1:], device=device) - 1

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """New rows for `prompts` (prefill_hidden) -> logits (n, vocab) of each prompt's last token."""
        hidden, last = self.prefill_hidden(prompts)
        return self.logits(hidden[last])

    @staticmethod
    def prefill_tokens(lengths: list[int]) -> list[int]:
        """Tokens the adapter context routes for each row of a prefill of prompts of these lengths: their own."""
        return list(lengths)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) long, one per running row -> logits (B, vocab); each row's cache grows by one."""
        if self.graphs is not None:
            logits = self.graphs.decode(tokens)
            if logits is not None:
                return logits
        self.cache.ensure_next()
        columns = self.cache.step_positions()  # (B,) where each new token goes
        if self.fast:
            lengths = columns + 1  # (B,) each row's tokens once this one is written

            def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                # the cache write and the attention in one call, over the layer's cache rows as they are
                return native.decode_attention(q[:, :, 0], self.cache.keys[index], self.cache.values[index], lengths,
                                               self.shape.scaling, k[:, :, 0], v[:, :, 0])[:, :, None]
        else:
            width, rows = max(self.cache.lengths) + 1, slice(0, self.cache.rows)
            mask = (torch.arange(width, device=columns.device)[None, :] <= columns[:, None])[:, None, None]

            def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                self.cache.write_step(index, columns, k, v)
                keys, values = self.cache.window(index, rows, width)  # (B, Hkv, W, D)
                return self._sdpa(q, keys, values, mask)  # mask (B, 1, 1, W): each row's own columns

        hidden = self._forward(tokens[:, None], columns[:, None], attend)
        self.cache.advance()
        return self.logits(hidden[:, 0])

    def keep(self, rows: list[int]) -> None:
        self.cache.keep(rows)

    def clear(self) -> None:
        self.cache.clear()
