"""The lean decode path (engine.lean, engine.row_cache) against naive references: every logit of a prefill and of
each decode step equals the transformers forward of that row's whole sequence run alone, without a cache, with its
own adapter selection; rows that leave (keep) and rows that join (prefill while others run) change nothing for the
others; the Generator gives the same tokens over 'lean' as over 'hf'; RowCache's bookkeeping equals what a naive
copy of the tensors expects; the models the lean path refuses are refused with a reason."""

import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from adalora.config import ConfigError
from adalora.engine import AdapterEngine, EngineConfig
from adalora.engine import native
from adalora.engine.apply import PLANS
from adalora.engine.errors import BatchError, EngineError, RequestCancelled
from adalora.engine.kv import HfDecoder
from adalora.engine.lean import WIDEN_ROWS, Dense, LeanLlama, unsupported
from adalora.engine.multi_linear import ContextHolder
from adalora.engine.row_cache import RowCache
from adalora.engine.sampling import SamplingParams
from adalora.engine.scheduler import GenerationRequest, Generator, GeneratorConfig
from tests.factories import LLAMA_ALL, random_adapter, varied_llama

# ---- models ----------------------------------------------------------------------------------------------------

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)


def build(config_cls, model_cls, **fields):
    """A tiny seeded model whose biases and norm weights are random too (the default init makes biases 0 and
    norms 1, so a path that dropped a bias or swapped two norms would still pass)."""
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**SIZES, **fields})).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "norm" in name:
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.2)
    return model


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
PARTIAL = ("q_proj", "v_proj", "up_proj", "down_proj")
"""Served modules of the partial-target engine: v is the last slice of the fused qkv, k between them is not served,
up the second slice of gate/up."""


@dataclass(frozen=True)
class Case:
    name: str
    build: object
    served: tuple[str, ...] = ()
    """EngineConfig.target_modules (() = the architecture's default: every q/k/v/o/gate/up/down)."""
    targets: tuple[tuple[str, ...], tuple[str, ...]] = (LLAMA_ALL, ("q_proj", "v_proj", "down_proj"))
    """What adapters 'a' and 'b' adapt."""


CASES = [
    Case("varied-llama", varied_llama),
    Case("llama-bias", lambda: build(LlamaConfig, LlamaForCausalLM, attention_bias=True, mlp_bias=True)),
    Case("qwen2", lambda: build(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=False)),
    Case("mistral", lambda: build(MistralConfig, MistralForCausalLM, sliding_window=None)),
    Case("llama-no-gqa", lambda: build(LlamaConfig, LlamaForCausalLM, num_key_value_heads=4)),
    Case("llama3-rope", lambda: build(LlamaConfig, LlamaForCausalLM, rope_scaling=dict(LLAMA3_ROPE))),
    Case("llama-tied", lambda: build(LlamaConfig, LlamaForCausalLM, tie_word_embeddings=True)),
    Case("llama-head-dim-16", lambda: build(LlamaConfig, LlamaForCausalLM, head_dim=16)),
    Case("llama-partial-targets", varied_llama, served=PARTIAL,
         targets=(("q_proj", "v_proj", "up_proj"), ("v_proj", "down_proj"))),
]
BY_NAME = {case.name: case for case in CASES}
MIX = {"a": 0.6, "b": 0.8}


def test_the_model_table_builds_what_it_names():
    """Each row is the variant it claims (so the table cannot silently test one model nine times)."""
    models = {case.name: case.build() for case in CASES}
    assert models["llama-bias"].model.layers[0].self_attn.q_proj.bias is not None
    assert models["llama-bias"].model.layers[0].mlp.down_proj.bias is not None
    assert models["qwen2"].model.layers[0].self_attn.k_proj.bias is not None
    assert models["qwen2"].model.layers[0].self_attn.o_proj.bias is None
    assert models["qwen2"].config.model_type == "qwen2" and models["mistral"].config.model_type == "mistral"
    assert models["llama-no-gqa"].config.num_key_value_heads == models["llama-no-gqa"].config.num_attention_heads
    assert models["llama3-rope"].model.rotary_emb.rope_type == "llama3"
    inv_freq = {name: models[name].model.rotary_emb.inv_freq for name in ("llama3-rope", "varied-llama")}
    assert not torch.equal(inv_freq["llama3-rope"], inv_freq["varied-llama"])
    assert models["llama-tied"].lm_head.weight is models["llama-tied"].model.embed_tokens.weight
    assert models["llama-head-dim-16"].model.layers[0].self_attn.q_proj.out_features == 64
    assert all(unsupported(model) is None for model in models.values())


# ---- the lean path beside the naive reference -------------------------------------------------------------------

def check_close(got, want, what, tol=1e-4):
    err = (got.float() - want.float()).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} (logits up to {scale:.3g})"


@dataclass
class Harness:
    """A LeanLlama over an engine with adapters 'a' and 'b', and for each running row its whole sequence (prompt +
    tokens fed so far), its selection and its next (greedy) token; every output is checked against `reference`."""

    engine: AdapterEngine
    lean: LeanLlama
    seqs: list = field(default_factory=list)
    sels: list = field(default_factory=list)
    next: list = field(default_factory=list)
    prompt_lengths: list = field(default_factory=list)
    strategy: str = "auto"
    tol: float = 1e-4
    """check_close's relative tolerance of every logit against the reference (on the same device, in the same
    dtype)."""

    @classmethod
    def make(cls, case: Case, max_rows=4, capacity=None, strategy="auto", weights="float", device="cpu",
             dtype=torch.float32, tol=1e-4):
        base = case.build()
        engine = AdapterEngine(copy.deepcopy(base).to(device=device, dtype=dtype),
                               EngineConfig(max_slots=4, target_modules=case.served))
        engine.load("a", random_adapter(base, 1, init_r=4, lora_alpha=8.0, targets=case.targets[0]))
        engine.load("b", random_adapter(base, 2, init_r=6, lora_alpha=3.0, targets=case.targets[1]))
        lean = LeanLlama(engine.model, engine.holder, max_rows, weights)
        if capacity is not None:  # a small first capacity, so joins and decode steps grow it
            old = lean.cache
            lean.cache = RowCache(old.shape[0], max_rows, old.shape[2], old.shape[3], old.dtype, old.device,
                                  capacity=capacity, limit=old.limit)
        return cls(engine, lean, strategy=strategy, tol=tol)

    @property
    def device(self):
        return self.engine.device

    @torch.no_grad()
    def reference(self, seq, selection):
        """Logits of the last token of `seq` from the transformers forward of it alone, no cache, no padding."""
        with self.engine.batch(self.engine.context([selection], len(seq))):
            return self.engine.model(input_ids=torch.tensor([seq], device=self.device)).logits[0, -1]

    def check_rows(self, logits, rows, what):
        assert logits.shape == (len(rows), SIZES["vocab_size"])
        for i, row in enumerate(rows):
            check_close(logits[i], self.reference(self.seqs[row], self.sels[row]),
                        f"{what}, row {row} ({self.sels[row]!r}, {len(self.seqs[row])} tokens)", self.tol)
        assert self.lean.cache.lengths == [len(s) for s in self.seqs]
        assert self.lean.rows == len(self.seqs)

    @torch.no_grad()
    def prefill(self, prompts, sels):
        with self.engine.batch(self.engine.context(sels, LeanLlama.prefill_tokens([len(p) for p in prompts]),
                                                   self.strategy)):
            logits = self.lean.prefill([list(p) for p in prompts])
        first = len(self.seqs)
        self.seqs += [list(p) for p in prompts]
        self.sels += list(sels)
        self.prompt_lengths += [len(p) for p in prompts]
        self.next += logits.argmax(-1).tolist()
        self.check_rows(logits, range(first, len(self.seqs)), f"prefill of {len(prompts)}")
        return logits

    @torch.no_grad()
    def decode(self, what="decode"):
        with self.engine.batch(self.engine.context(self.sels, 1, self.strategy)):
            logits = self.lean.decode(torch.tensor(self.next, device=self.device))
        for seq, token in zip(self.seqs, self.next):
            seq.append(token)
        self.next = logits.argmax(-1).tolist()
        self.check_rows(logits, range(len(self.seqs)), what)
        return logits

    def keep(self, rows):
        self.lean.keep(rows)
        self.seqs = [self.seqs[r] for r in rows]
        self.sels = [self.sels[r] for r in rows]
        self.next = [self.next[r] for r in rows]
        self.prompt_lengths = [self.prompt_lengths[r] for r in rows]

    def generated(self):
        return [seq[n:] for seq, n in zip(self.seqs, self.prompt_lengths)]

    def snapshot(self):
        """Keys and values of each running row, columns [0, its length)."""
        cache = self.lean.cache
        return [(cache.keys[:, b, :, :n].clone(), cache.values[:, b, :, :n].clone())
                for b, n in enumerate(cache.lengths)]


PROMPTS = [[3, 17, 9, 40, 22, 5, 11], [5], [8, 1, 30, 30]]
SELECTIONS = ["a", None, MIX]


@pytest.mark.parametrize("name,capacity", [(case.name, None) for case in CASES] + [("varied-llama", 2)],
                         ids=[case.name for case in CASES] + ["varied-llama-capacity-2"])
def test_lean_prefill_decode_keep_join_equal_each_row_alone(name, capacity):
    h = Harness.make(BY_NAME[name], capacity=capacity)
    prefill_decode_keep_join(h)
    if capacity is not None:
        assert h.lean.cache.capacity > capacity


def prefill_decode_keep_join(h: Harness) -> None:
    """Three rows (adapter, base, mix) prefill and decode; rows leave and one joins; every logit is checked."""
    logits = h.prefill(PROMPTS, SELECTIONS)
    # the check can fail: the adapters and the mix change this model's logits
    base = [h.reference(p, None) for p in PROMPTS]
    assert (logits[0] - base[0]).abs().max() > 1e-2 and (logits[2] - base[2]).abs().max() > 1e-2
    for step in range(4):
        h.decode(f"decode step {step}")
    h.keep([0, 2])  # the middle row leaves: row 2 moves down to row 1
    h.decode("decode after keep([0, 2])")
    h.prefill([[12, 13, 50, 2, 9, 33, 60, 1, 4]], ["b"])  # joins while two run, longer than either's prompt
    for step in range(2):
        h.decode(f"decode step {step} after the join")
    h.keep([1, 2])  # the first row leaves: both others move down
    h.decode("decode after keep([1, 2])")
    generated = h.generated()  # the greedy tokens vary, so a cache that lost or mixed up tokens changes them
    assert [len(g) for g in generated] == [8, 3] and len({t for g in generated for t in g}) >= 3, generated


@pytest.mark.parametrize("strategy", sorted(PLANS))
def test_lean_path_under_every_apply_strategy(strategy):
    """Every plan adds into a column slice of the fused qkv / gate-up output in place (add_delta)."""
    h = Harness.make(BY_NAME["llama-partial-targets"], strategy=strategy)
    h.prefill(PROMPTS, SELECTIONS)
    h.decode()
    h.keep([1, 2])
    h.prefill([[4, 4, 4]], [{"b": -0.5, "a": 1.5}])
    h.decode()


def test_all_base_batch_routes_nothing():
    h = Harness.make(BY_NAME["llama-bias"])
    h.prefill([[1, 2, 3], [4]], [None, None])
    h.decode()
    h.decode()


@pytest.mark.parametrize("capacity", [None, 2])
def test_an_admission_writes_only_its_own_rows(capacity):
    h = Harness.make(BY_NAME["varied-llama"], max_rows=4, capacity=capacity)
    h.prefill([[3, 17, 9], [8, 1]], ["a", MIX])
    h.decode()
    h.decode()
    before = h.snapshot()
    h.prefill([[5, 6, 7, 8, 9, 10, 11, 12], [40]], [None, "b"])  # wider than the running rows; row capacity grows
    after = h.snapshot()
    for b, ((k0, v0), (k1, v1)) in enumerate(zip(before, after)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1), f"running row {b} changed by the admission"
    h.decode()


class _Raising:
    """Stands in for layer 1's MLP on the lean path (after its attention wrote the layer's keys); `remove` puts it
    back."""

    def __init__(self, layer) -> None:
        self.layer = layer
        layer.mlp = self

    def __call__(self, h):
        raise RuntimeError("layer 1 failed")

    def remove(self) -> None:
        del self.layer.mlp  # the class's method again


def _raise_in_layer_1(h):
    return _Raising(h.lean.layers[1])


# (what fails, how the prefill is made to fail, the error it raises)
FAILING_PREFILLS = [
    ("context for the wrong number of tokens", "wide", BatchError, "the batch context routes"),
    ("raises in layer 1, after layer 0 wrote its keys", "hook", RuntimeError, "layer 1 failed"),
    ("more rows than the cache holds", "rows", ValueError, "the cache holds 3"),
]


@pytest.mark.parametrize("how,error,message", [f[1:] for f in FAILING_PREFILLS], ids=[f[0] for f in FAILING_PREFILLS])
def test_a_failing_prefill_leaves_the_running_rows_as_they_were(how, error, message):
    h = Harness.make(BY_NAME["varied-llama"], max_rows=3, capacity=4)
    h.prefill([[3, 17, 9], [8, 1]], ["a", MIX])
    h.decode()
    before, lengths, capacity = h.snapshot(), list(h.lean.cache.lengths), h.lean.cache.capacity
    prompts, sels, width = [[5, 6, 7, 8, 9, 10]], ["b"], 6
    handle = None
    if how == "wide":
        width = 7
    elif how == "hook":
        handle = _raise_in_layer_1(h)
    else:
        prompts, sels = [[5, 6], [7]], ["b", None]
    try:
        with pytest.raises(error, match=message), torch.no_grad():
            with h.engine.batch(h.engine.context(sels, width)):
                h.lean.prefill(prompts)
    finally:
        if handle is not None:
            handle.remove()
    assert h.lean.cache.lengths == lengths and h.lean.rows == 2
    after = h.snapshot()
    for (k0, v0), (k1, v1) in zip(before, after):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    if how != "rows":
        assert h.lean.cache.capacity >= capacity
    # the cache goes on: decode the running rows, then the same admission done right, then all together
    h.decode("decode after the failed prefill")
    h.prefill([[5, 6, 7, 8, 9, 10]], ["b"])
    h.decode("decode of all rows after the retried admission")


# ---- the Generator over 'lean' and 'hf' ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen_setup():
    base = varied_llama()
    return base, {"a": random_adapter(base, 1, init_r=4, lora_alpha=8.0),
                  "b": random_adapter(base, 2, init_r=6, lora_alpha=3.0, targets=("q_proj", "v_proj", "down_proj"))}


def generator(setup, decoder, max_batch_size=3):
    base, adapters = setup
    engine = AdapterEngine(copy.deepcopy(base), EngineConfig(max_slots=4))
    for name, adapter in adapters.items():
        engine.load(name, adapter)
    gen = Generator(engine, GeneratorConfig(max_batch_size=max_batch_size, eos_token_ids=(), decoder=decoder))
    assert gen.decoder.name == decoder
    return gen


def greedy(prompt, adapter, n):
    return GenerationRequest(prompt, adapter, SamplingParams(max_new_tokens=n, temperature=0))


def sampled(prompt, adapter, n, seed):
    return GenerationRequest(prompt, adapter, SamplingParams(max_new_tokens=n, temperature=1.3, top_k=30, top_p=0.95,
                                                             repetition_penalty=1.2, seed=seed))


def run(gen, schedule, cancels=()):
    """schedule: (step to submit at, request); cancels: (step, index into schedule) cancelled just before that
    step. Returns the handles, and (running, waiting) seen after each step."""
    handles, seen, step = [None] * len(schedule), [], 0
    while step == 0 or gen.has_work() or any(h is None for h in handles):
        for i, (at, request) in enumerate(schedule):
            if at == step:
                handles[i] = gen.submit(request)
        for at, i in cancels:
            if at == step:
                gen.cancel(handles[i])
        gen.step()
        seen.append((gen.running, gen.waiting))
        if isinstance(gen.decoder, LeanLlama):  # each running row caches its prompt and all tokens but the pending one
            assert gen.decoder.cache.lengths == [len(r.handle.request.prompt) + len(r.handle.tokens) - 1
                                                 for r in gen._rows]
        step += 1
        assert step < 200
    return handles, seen


# (submit at step, prompt, selection, max_new_tokens) with max_batch_size 3: rows retire at different steps, requests
# wait and join while others decode; a base row and a mix.
SCHEDULE = [
    (0, [3, 17, 9, 40, 22], "a", 12),
    (0, [5], None, 3),
    (0, [8, 1, 30, 30, 2, 61, 7, 19, 44], MIX, 9),
    (0, [12, 13], "b", 14),
    (0, [50, 4, 4], "a", 5),
    (2, [33, 21, 9], None, 8),
    (3, [7, 7, 1, 60], "b", 1),
    (5, [2, 9, 27, 5, 11, 3], MIX, 10),
]


def outcome(handle):
    return (list(handle.tokens), type(handle.error).__name__ if handle.error else handle.result.finish_reason)


def test_generator_greedy_tokens_are_the_same_over_lean_and_hf(gen_setup):
    results = {}
    for decoder in ("lean", "hf"):
        handles, seen = run(generator(gen_setup, decoder), [(at, greedy(p, s, n)) for at, p, s, n in SCHEDULE])
        results[decoder] = [outcome(h) for h in handles]
        assert any(running == 3 and waiting > 0 for running, waiting in seen)  # admissions wait for free rows
    assert results["lean"] == results["hf"]
    assert [len(t) for t, _ in results["lean"]] == [n for *_, n in SCHEDULE]
    assert sum(len(set(t)) >= 3 for t, _ in results["lean"]) >= 4  # not degenerate


def test_generator_with_cancels_is_the_same_over_lean_and_hf(gen_setup):
    schedule = [(at, greedy(p, s, n)) for at, p, s, n in SCHEDULE]
    # before step 4 rows [0, 2, 3] run: the middle one leaves; before step 5 request 6 waits; before step 9 rows
    # [0, 3, 4] run: the first one leaves (both others move down)
    cancels = [(4, 2), (5, 6), (9, 0)]
    full, _ = run(generator(gen_setup, "lean"), schedule)
    results = {}
    for decoder in ("lean", "hf"):
        handles, _ = run(generator(gen_setup, decoder), schedule, cancels)
        results[decoder] = [outcome(h) for h in handles]
    assert results["lean"] == results["hf"]
    cancelled = {i for _, i in cancels}
    for i, ((tokens, reason), whole) in enumerate(zip(results["lean"], full)):
        if i in cancelled:
            assert reason == RequestCancelled.__name__
            assert tokens == whole.tokens[:len(tokens)]
        else:
            assert (tokens, reason) == outcome(whole), f"request {i} changed by the cancels"
    assert 0 < len(results["lean"][2][0]) < SCHEDULE[2][3] and 0 < len(results["lean"][0][0]) < SCHEDULE[0][3]
    assert results["lean"][6][0] == []  # cancelled while it waited: never ran


def test_generator_seeded_sampling_is_the_same_over_lean_and_hf(gen_setup):
    schedule = [(0, sampled([3, 17, 9], "a", 10, seed=1)), (0, sampled([5], None, 4, seed=2)),
                (0, sampled([8, 1, 30], MIX, 12, seed=3)), (1, sampled([12, 13, 14, 15], "b", 7, seed=4)),
                (2, greedy([40, 41], "a", 6))]
    results = {decoder: [outcome(h) for h in run(generator(gen_setup, decoder), schedule)[0]]
               for decoder in ("lean", "hf")}
    assert results["lean"] == results["hf"]
    assert len(set(results["lean"][2][0])) >= 3


def test_generator_up_to_the_last_position_is_the_same_over_lean_and_hf(gen_setup):
    """prompt + max_new_tokens = the model's 64 positions (the most the Generator admits): the cache fills to the
    model's last positions, which rotary tables and the cache's limit must both cover."""
    schedule = [(0, greedy(list(range(1, 57)), "a", 8)), (0, greedy([9, 8, 7], MIX, 12)),
                (1, greedy(list(range(3, 63)), None, 4))]
    results = {decoder: [outcome(h) for h in run(generator(gen_setup, decoder), schedule)[0]]
               for decoder in ("lean", "hf")}
    assert results["lean"] == results["hf"]
    assert [len(t) for t, _ in results["lean"]] == [8, 12, 4]


# ---- which models run lean ---------------------------------------------------------------------------------------

def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


# (model, fragment of the reason, or None where the lean path runs it)
SUPPORT = [
    *[(case.name, case.build, None) for case in CASES],
    ("gpt2", tiny_gpt2, "model_type 'gpt2' is not one of the Llama-family layouts"),
    ("mistral-sliding-window", lambda: build(MistralConfig, MistralForCausalLM, sliding_window=8), "sliding-window"),
    ("qwen2-sliding-window", lambda: build(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=8,
                                           max_window_layers=1), "sliding-window"),
    ("llama-gelu", lambda: build(LlamaConfig, LlamaForCausalLM, hidden_act="gelu"), "hidden_act 'gelu'"),
]


@pytest.mark.parametrize("make,reason", [s[1:] for s in SUPPORT], ids=[s[0] for s in SUPPORT])
def test_unsupported_names_the_reason(make, reason):
    model = make()
    got = unsupported(model)
    if reason is None:
        assert got is None
    else:
        assert reason in got
        with pytest.raises(EngineError) as info:
            LeanLlama(model, None, 2)
        assert reason in str(info.value) and "'hf'" in str(info.value)


def test_decoder_lean_on_gpt2_is_an_engine_error_that_suggests_hf():
    engine = AdapterEngine(tiny_gpt2())
    with pytest.raises(EngineError) as info:
        Generator(engine, GeneratorConfig(decoder="lean"))
    assert "model_type 'gpt2'" in str(info.value) and "use decoder 'hf'" in str(info.value)


def test_unknown_decoder_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown decoder 'nope'"):
        GeneratorConfig(decoder="nope")


@pytest.mark.parametrize("make,decoder,expected", [
    (varied_llama, "auto", "lean"),
    (BY_NAME["qwen2"].build, "auto", "lean"),
    (BY_NAME["mistral"].build, "auto", "lean"),
    (tiny_gpt2, "auto", "hf"),
    (varied_llama, "hf", "hf"),
    (varied_llama, "lean", "lean"),
], ids=["llama-auto", "qwen2-auto", "mistral-auto", "gpt2-auto", "llama-hf", "llama-lean"])
def test_decoder_choice(make, decoder, expected):
    gen = Generator(AdapterEngine(make()), GeneratorConfig(decoder=decoder, max_batch_size=5))
    assert gen.decoder.name == expected
    assert isinstance(gen.decoder, LeanLlama if expected == "lean" else HfDecoder)
    if expected == "lean":
        assert gen.decoder.cache.shape[1] == 5  # rows for the whole batch


# ---- RowCache against naive tensor copies -----------------------------------------------------------------------

def filled_cache(lengths, rows=4, capacity=8, limit=None, seed=0):
    """A RowCache (2 layers, 2 kv heads, head_dim 3) whose rows were joined with `lengths` and whose every column
    holds random numbers (also those past each row's length, so a copy of too many columns shows)."""
    cache = RowCache(2, rows, 2, 3, torch.float32, torch.device("cpu"), capacity=capacity, limit=limit)
    if lengths:
        cache.join(list(lengths))
    gen = torch.Generator().manual_seed(seed)
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=gen))
    cache.values.copy_(torch.randn(cache.values.shape, generator=gen))
    return cache


@pytest.mark.parametrize("lengths,rows", [
    ([3, 5, 2, 4], [1, 3]),
    ([3, 5, 2, 4], [0, 2]),
    ([3, 5, 2, 4], [2]),
    ([3, 5, 2, 4], [0, 1, 2, 3]),
    ([3, 5, 2, 4], []),
    ([1, 8, 2, 7], [1, 2, 3]),
    ([6, 1, 5], [0, 2]),
])
def test_row_cache_keep_moves_only_the_kept_rows_own_tokens_in_order_and_zeroes_what_they_left(lengths, rows):
    cache = filled_cache(lengths)
    keys, values = cache.keys.clone(), cache.values.clone()
    expected_keys, expected_values = keys.clone(), values.clone()
    for new, old in enumerate(rows):  # naive: row `new` gets row `old`'s first lengths[old] columns, nothing else
        n = lengths[old]
        expected_keys[:, new, :, :n] = keys[:, old, :, :n]
        expected_values[:, new, :, :n] = values[:, old, :, :n]
    for row, held in enumerate(lengths):  # then what each row held past what it holds now, one column more, is zero
        now = lengths[rows[row]] if row < len(rows) else 0
        expected_keys[:, row, :, now: held + 1] = 0
        expected_values[:, row, :, now: held + 1] = 0
    cache.keep(rows)
    assert cache.lengths == [lengths[r] for r in rows] and cache.rows == len(rows)
    assert torch.equal(cache.keys, expected_keys) and torch.equal(cache.values, expected_values)


@pytest.mark.parametrize("rows", [[2, 1], [1, 1], [0, 3, 2]])
def test_row_cache_keep_refuses_rows_that_do_not_ascend(rows):
    cache = filled_cache([3, 5, 2, 4])
    keys = cache.keys.clone()
    with pytest.raises(ValueError, match="must ascend"):
        cache.keep(rows)
    assert cache.lengths == [3, 5, 2, 4] and torch.equal(cache.keys, keys)


# (capacity, limit, lengths, reserve to, capacity after)
RESERVES = [
    (4, None, [3, 4], 4, 4),  # fits: nothing moves
    (4, None, [3, 4], 5, 8),  # doubles
    (4, None, [2], 20, 20),  # more than double: what was asked
    (4, 6, [4], 5, 6),  # doubling capped by the limit
    (4, 6, [4, 1], 9, 9),  # asked past the limit: what was asked
    (4, 100, [1, 4, 2], 7, 8),
]


@pytest.mark.parametrize("capacity,limit,lengths,columns,grown", RESERVES)
def test_row_cache_reserve_grows_and_keeps_contents(capacity, limit, lengths, columns, grown):
    cache = filled_cache(lengths, capacity=capacity, limit=limit)
    keys, values = cache.keys.clone(), cache.values.clone()
    old_keys = cache.keys
    cache.reserve(columns)
    assert cache.capacity == grown and cache.lengths == lengths
    if grown == capacity:
        assert cache.keys is old_keys
    assert cache.keys.shape == (2, 4, 2, grown, 3) and cache.values.shape == (2, 4, 2, grown, 3)
    for b, n in enumerate(lengths):
        assert torch.equal(cache.keys[:, b, :, :n], keys[:, b, :, :n])
        assert torch.equal(cache.values[:, b, :, :n], values[:, b, :, :n])


def test_row_cache_ensure_next_grows_a_full_row():
    cache = filled_cache([4, 2], capacity=4)
    cache.ensure_next()
    assert cache.capacity == 8
    cache.ensure_next()
    assert cache.capacity == 8


def test_row_cache_join_beyond_its_rows_raises_and_changes_nothing():
    cache = filled_cache([3, 5, 2], rows=4)
    with pytest.raises(ValueError, match="3 rows run and 2 join, but the cache holds 4"):
        cache.join([1, 1])
    assert cache.lengths == [3, 5, 2]
    assert cache.join([6]) == slice(3, 4) and cache.lengths == [3, 5, 2, 6]
    with pytest.raises(ValueError):
        cache.join([1])


def test_row_cache_join_reserves_the_longest_prompt():
    cache = filled_cache([3], capacity=4)
    assert cache.join([2, 7]) == slice(1, 3)
    assert cache.capacity == 8 and cache.lengths == [3, 2, 7]


@pytest.mark.parametrize("lengths", [[3, 5, 0, 7], [1], [7, 7]])
def test_row_cache_write_step_writes_column_length_of_each_row(lengths):
    cache = filled_cache(lengths)
    keys, values = cache.keys.clone(), cache.values.clone()
    columns = cache.step_positions()
    assert columns.tolist() == lengths
    gen = torch.Generator().manual_seed(5)
    new_keys = torch.randn(len(lengths), 2, 1, 3, generator=gen)
    new_values = torch.randn(len(lengths), 2, 1, 3, generator=gen)
    cache.write_step(1, columns, new_keys, new_values)
    for b, n in enumerate(lengths):
        keys[1, b, :, n] = new_keys[b, :, 0]
        values[1, b, :, n] = new_values[b, :, 0]
    assert torch.equal(cache.keys, keys) and torch.equal(cache.values, values)
    cache.advance()
    assert cache.lengths == [n + 1 for n in lengths]


def test_row_cache_write_row_and_window():
    cache = filled_cache([2, 3])
    keys, values = cache.keys.clone(), cache.values.clone()
    rows = cache.join([4, 1])
    new_keys, new_values = torch.randn(2, 2, 4, 3), torch.randn(2, 2, 4, 3)
    cache.write_row(0, 2, new_keys[0], new_values[0])  # a 4-token prompt
    cache.write_row(0, 3, new_keys[1, :, :1], new_values[1, :, :1])  # a 1-token prompt: its other columns untouched
    keys[0, 2, :, :4], values[0, 2, :, :4] = new_keys[0], new_values[0]
    keys[0, 3, :, :1], values[0, 3, :, :1] = new_keys[1, :, :1], new_values[1, :, :1]
    assert torch.equal(cache.keys, keys) and torch.equal(cache.values, values)
    k, v = cache.window(0, rows, 4)
    assert torch.equal(k, keys[0, 2:4, :, :4]) and torch.equal(v, values[0, 2:4, :, :4])
    cache.clear()
    assert cache.rows == 0 and cache.lengths == []


# ---- bf16 weights ---------------------------------------------------------------------------------------------------


def denses(lean):
    for layer in lean.layers:
        yield from (layer.qkv.dense, layer.o.dense, layer.gate_up.dense, layer.down.dense)
    yield lean.head


def held_weights(dense):
    """(the float32 weights a Dense of bf16 weights multiplies by, how far from the model's they may be)."""
    assert dense.w16 is not None and dense.w16.dtype == torch.bfloat16
    return dense.w16.float(), dense.weight.abs().max().item() * 2 ** -8  # bfloat16 keeps 8 significant bits


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable()}")
@pytest.mark.parametrize("rows", [1, 8, WIDEN_ROWS, WIDEN_ROWS + 1, 200])
def test_rounded_dense_equals_f_linear_over_the_weights_it_holds(rows):
    """At every size (the kernels up to WIDEN_ROWS rows, the widened weights past it) the same values multiply."""
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(40, 64, generator=gen), torch.randn(40, generator=gen)
    dense = Dense(weight, bias, "bf16")
    held, _ = held_weights(dense)
    assert torch.equal(dense.held(), held)
    x = torch.randn(rows, 64, generator=gen)
    torch.testing.assert_close(dense(x), F.linear(x, held, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable()}")
@pytest.mark.parametrize("name", ["varied-llama", "qwen2", "llama-tied"])
def test_bf16_weights_equal_the_reference_over_the_weights_they_hold(name, monkeypatch):
    """The lean path over bf16 (widened) weights computes the transformers forward of a model whose weights are
    those values (the reference runs after they are written into the model), adapters and mixes included, through
    joins and leaves; the adapters' factors are bfloat16 values too (the lean path reads a bank's bfloat16 stack
    where every group is one adapter)."""
    h = Harness.make(BY_NAME[name], weights="bf16")
    with torch.no_grad():
        for dense in denses(h.lean):
            held, bound = held_weights(dense)
            moved = (dense.weight - held).abs().max().item()
            assert 0 < moved <= bound  # rounded: close, but not the same weights
            dense.weight.copy_(held)  # the model's weights are these views
        for bank in h.engine.slots.banks.values():  # the factors a bank's bfloat16 stack holds, in the reference too
            for slot in h.engine.slots.loaded().values():
                for t in bank.get(slot):
                    t.copy_(t.bfloat16().float())
    factor_dtypes = []
    segments = native.segments

    def recording(groups, parts):
        factor_dtypes.extend(A.dtype for A, *_ in parts)
        return segments(groups, parts)

    monkeypatch.setattr(native, "segments", recording)
    h.prefill(PROMPTS, SELECTIONS)
    for step in range(3):
        h.decode(f"decode step {step}")
    h.keep([0, 2])
    h.prefill([[12, 13, 50, 2, 9]], ["b"])
    h.decode("decode after a keep and a join")
    h.keep([1])  # one adapter alone: every group one adapter, so segment runs on the banks' bfloat16 stacks
    for step in range(2):
        h.decode(f"decode step {step} of b alone")
    assert torch.bfloat16 in factor_dtypes
    long_prompt = [(7 * i) % 60 + 2 for i in range(WIDEN_ROWS + 5)]  # a prefill past WIDEN_ROWS: widened weights
    h.prefill([long_prompt], ["a"])
    h.decode("decode after a long prefill")


def test_weights_are_refused_where_they_cannot_run(monkeypatch):
    model = build(LlamaConfig, LlamaForCausalLM)
    for unknown in ("int4", "int8"):  # int8 was measured and removed (docs/BENCHMARKS.md): named like any other
        with pytest.raises(EngineError, match=f"unknown weights '{unknown}'; choose one of \\('float', 'bf16'\\)"):
            LeanLlama(model, ContextHolder(), 2, unknown)
    monkeypatch.setattr(native, "applies", lambda *tensors: False)
    with pytest.raises(EngineError, match="bf16 weights need the native CPU kernels"):
        LeanLlama(model, ContextHolder(), 2, "bf16")


@pytest.mark.parametrize("fields,message", [
    (dict(weights="int4"), "unknown weights 'int4'"),
    (dict(weights="int8"), "unknown weights 'int8'"),
    (dict(weights="bf16", decoder="hf"), "weights 'bf16' are the lean decoder's"),
])
def test_generator_config_checks_weights(fields, message):
    with pytest.raises(ConfigError, match=message):
        GeneratorConfig(**fields)


# ---- Dense ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["native", "onednn"])
@pytest.mark.parametrize("batch", [1, 8, native.SKINNY_ROWS, native.SKINNY_ROWS + 1, 37])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_dense_equals_f_linear(batch, bias, kernel, monkeypatch):
    """Both CPU float32 paths: the native kernel (decode sizes; the plain matmul past them) and oneDNN's reordered
    weight (where the kernel does not run)."""
    if kernel == "native" and not native.available():
        pytest.skip(f"native kernels: {native.unavailable()}")
    if kernel == "onednn":
        monkeypatch.setattr(native, "applies", lambda *tensors: False)
    gen = torch.Generator().manual_seed(batch)
    weight = torch.randn(48, 32, generator=gen)
    b = torch.randn(48, generator=gen) if bias else None
    x = torch.randn(batch, 32, generator=gen)
    dense = Dense(weight, b)
    if kernel == "native":
        assert dense.native and dense.packed is None  # no second copy of the weight
    elif torch.backends.mkldnn.is_available():
        assert dense.packed is not None  # the reordered oneDNN weight is what this case checks
    got = dense(x)
    want = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert got.shape == (batch, 48) and got.dtype == torch.float32 and got.is_contiguous()
    assert (got.double() - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("view", ["transposed", "strided"])
def test_dense_takes_non_contiguous_inputs(view):
    gen = torch.Generator().manual_seed(3)
    weight, b = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    x = torch.randn(32, 9, generator=gen).T if view == "transposed" else torch.randn(9, 64, generator=gen)[:, ::2]
    assert not x.is_contiguous()
    want = F.linear(x.double(), weight.double(), b.double())
    assert (Dense(weight, b)(x).double() - want).abs().max().item() <= 1e-4


def test_dense_in_float64_is_plain_f_linear():
    weight, x = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    dense = Dense(weight, None)
    assert dense.packed is None
    assert torch.equal(dense(x), F.linear(x, weight))
