"""The real-model tier (`make test-slow`): the prepared SmolLM2-135M and MiniLM-L6 (`adalora prepare`), fp32, CPU.

1. SmolLM2 with a PEFT LoRA adapter (made and saved by PEFT itself, task_type unset) served over gRPC: greedy
   completions equal the in-process Generator over an AdapterEngine and PEFT's own greedy `generate`, and differ
   from the base model's.
2. MiniLM classifiers trained briefly on trec6 and sms-spam by the library (`run_train`), served over gRPC:
   Classify equals BertForSequenceClassification with the adapter attached (attach_adapter), atol 1e-4.
3. `adalora merge A B --weights 0.7 0.3` of those two: every module's delta equals 0.7 delta_A + 0.3 delta_B, and
   the merged adapter (attached offline, and served) gives the logits of the base with that dense sum added in.

A missing cache fails (never skips) with the message to run `adalora prepare`.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adalora import assets  # noqa: E402
from adalora.adapter_file import load_adapter  # noqa: E402
from adalora.cli import main  # noqa: E402
from adalora.engine import (AdapterEngine, EngineConfig, GenerationRequest, Generator,  # noqa: E402
                                    GeneratorConfig, SamplingParams)
from adalora.inject import attach_adapter  # noqa: E402
from adalora.peft_interop import load_any  # noqa: E402
from adalora.config import AdapterShape  # noqa: E402
from adalora.recipe import TrainSpec, run_train  # noqa: E402
from adalora.server.config import ServerConfig  # noqa: E402
from tests.server_setup import ServerThread  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, a little", "Water boils at"]
NEW_TOKENS = 10
LORA_B_STD = 0.2
"""Std of PEFT's lora_B: large enough that every greedy continuation leaves the base model's (asserted)."""
TRAIN_STEPS = 24
WEIGHTS = (0.7, 0.3)
RPC_TIMEOUT = 600
"""Seconds per RPC: generous, as a real model on 2 shared CPU cores can be slow (ServerThread's client has 30)."""


# ---- shared fixtures ----------------------------------------------------------------------------------------

THREADS = 1
"""torch threads: CI gives this tier 2 cores, but 2 OpenMP threads slow down several-fold (5 s a training step
instead of 0.6) as soon as anything else runs on those cores; one thread is robust and costs little."""


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def prepared_paths() -> tuple[dict | None, str | None]:
    """(the prepared models' folders and data sets' files, None), or (None, what to run) when the cache lacks them."""
    try:
        return {
            "smollm": assets.model_path("smollm2-135m"),
            "minilm": assets.model_path("minilm-l6"),
            **{f"{name}/{split}": assets.dataset_path(name, split)
               for name in ("trec6", "sms-spam") for split in ("train", "eval")},
        }, None
    except assets.NotPreparedError as e:
        return None, (f"the real-model tier needs the prepared asset cache {assets.cache_dir()}: run "
                      f"`adalora prepare` first ({e})")


def test_the_asset_cache_is_prepared():
    """A missing cache is a failure (this test, and every test below errors at setup), never a skip."""
    paths, problem = prepared_paths()
    assert problem is None, problem
    assert assets.is_prepared()


@pytest.fixture(scope="module")
def prepared():
    paths, problem = prepared_paths()
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    return paths


def eval_texts(path, n: int) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()[:n]]


def trim_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """What our Generator returns: the completion up to and including the first eos token."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return tokens


# ---- 1. SmolLM2 + PEFT LoRA, served ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(prepared, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepared["smollm"]
    root = tmp_path_factory.mktemp("smollm")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    torch.manual_seed(0)  # lora_A's init
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).eval()
    assert peft_model.peft_config["default"].task_type is None
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        filled = 0
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)
                filled += 1
    assert filled == 2 * model.config.num_hidden_layers
    peft_model.save_pretrained(root / "adapters" / "smol-lora")

    config = ServerConfig(base_model=str(folder), adapter_dir=str(root / "adapters"), preload=("smol-lora",),
                          port=0, max_batch_size=4, max_slots=4, max_new_tokens=64)
    server = ServerThread(config)
    server.client.timeout = RPC_TIMEOUT
    try:
        yield {"folder": folder, "tokenizer": tokenizer, "peft": peft_model, "server": server,
               "store": root / "adapters"}
    finally:
        server.stop()


def peft_greedy(peft_model, prompt_ids: list[int], adapter: bool = True) -> list[int]:
    ids = torch.tensor([prompt_ids])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                  num_beams=1, pad_token_id=peft_model.config.pad_token_id)
    with torch.no_grad():
        if adapter:
            out = peft_model.generate(**kwargs)
        else:
            with peft_model.disable_adapter():
                out = peft_model.generate(**kwargs)
    eos = peft_model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    return trim_at_eos(out[0, len(prompt_ids):].tolist(), eos)


def test_smollm2_peft_adapter_served_greedy_equals_generator_and_peft(smol):
    from transformers import AutoModelForCausalLM

    tokenizer, peft_model, server = smol["tokenizer"], smol["peft"], smol["server"]
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]

    # every prompt at once over gRPC as text (the server batches them), and the first again as token ids
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda p: server.client.generate(p, "smol-lora", max_new_tokens=NEW_TOKENS,
                                                                 temperature=0), PROMPTS))
    by_ids = server.client.generate(prompt_ids[0], "smol-lora", max_new_tokens=NEW_TOKENS, temperature=0)

    # the in-process reference: Generator over an AdapterEngine on a fresh base, the adapter read from the store
    base = AutoModelForCausalLM.from_pretrained(smol["folder"], local_files_only=True, dtype=torch.float32).eval()
    engine = AdapterEngine(base, EngineConfig(max_slots=2))
    adapter = load_any(smol["store"] / "smol-lora", base_model_dir=smol["folder"])
    assert adapter.task_type == "causal-lm" and adapter.mode == "lora"
    assert sorted({p.rsplit(".", 1)[1] for p in adapter.shapes}) == ["q_proj", "v_proj"]
    engine.load("smol-lora", adapter)
    generator = Generator(engine, GeneratorConfig(max_batch_size=1), tokenizer)

    base_tokens = []
    for i, (prompt, ids, reply) in enumerate(zip(PROMPTS, prompt_ids, replies)):
        handle = generator.submit(GenerationRequest(ids, "smol-lora", SamplingParams(NEW_TOKENS, temperature=0)))
        while generator.has_work():
            generator.step()
        reference = handle.result.token_ids
        oracle = peft_greedy(peft_model, ids)
        base_tokens.append(peft_greedy(peft_model, ids, adapter=False))
        assert oracle != base_tokens[i], f"{prompt!r}: the adapter must change the greedy continuation"
        assert reference == oracle, (prompt, reference, oracle)
        for served in (reply, by_ids) if i == 0 else (reply,):
            assert list(served.token_ids) == reference, (prompt, list(served.token_ids), reference)
            assert served.text == tokenizer.decode(reference, skip_special_tokens=True)
            assert (served.usage.prompt_tokens, served.usage.completion_tokens) == (len(ids), len(reference))

    # and the base (no adapter) over the same server is the base model's greedy continuation
    base_reply = server.client.generate(prompt_ids[0], None, max_new_tokens=NEW_TOKENS, temperature=0)
    assert list(base_reply.token_ids) == base_tokens[0]


# ---- 2. MiniLM classifiers, trained briefly, served -----------------------------------------------------------

# adapter id -> (data set, target modules: () = the library's default for bert, every linear map of a block)
CLASSIFIERS = {"trec6": ("trec6", ()), "spam": ("sms-spam", ("query", "value", "intermediate.dense"))}


@pytest.fixture(scope="module")
def minilm(prepared, tmp_path_factory):
    folder = prepared["minilm"]
    root = tmp_path_factory.mktemp("minilm")
    store = root / "adapters"
    store.mkdir()
    for adapter_id, (data, targets) in CLASSIFIERS.items():
        out = root / "runs" / adapter_id
        spec = TrainSpec(base_model=str(folder), task="seq-cls", data=str(prepared[f"{data}/train"]), out=str(out),
                         adapter=AdapterShape(init_r=4, lora_alpha=8.0, target_modules=targets), total_steps=TRAIN_STEPS, lr=5e-3,
                         batch_size=16, max_length=32, seed=0, device="cpu", progress=False)
        report = run_train(spec)
        assert report["steps_run"] == TRAIN_STEPS and report["task"] == "seq-cls"
        (store / adapter_id).mkdir()
        shutil.copy(out / "adapter.safetensors", store / adapter_id / "adapter.safetensors")
    adapters = {adapter_id: load_adapter(store / adapter_id) for adapter_id in CLASSIFIERS}
    texts = {"trec6": eval_texts(prepared["trec6/eval"], 4), "spam": eval_texts(prepared["sms-spam/eval"], 3)}
    config = ServerConfig(base_model=str(folder), adapter_dir=str(store), preload=tuple(CLASSIFIERS), port=0,
                          max_slots=4, max_inputs=8)
    server = ServerThread(config)
    server.client.timeout = RPC_TIMEOUT
    try:
        yield {"folder": folder, "store": store, "adapters": adapters, "texts": texts, "server": server}
    finally:
        server.stop()


def bert_classifier(folder, num_labels: int):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(folder, local_files_only=True, num_labels=num_labels,
                                                         dtype=torch.float32).eval()


def bert_logits(model, folder, texts: list[str]) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float()


def attached_logits(folder, adapter, texts: list[str]) -> torch.Tensor:
    model = bert_classifier(folder, len(adapter.labels))
    attach_adapter(model, adapter)
    return bert_logits(model.eval(), folder, texts)


def served_logits(server, texts: list[str], adapter_id: str, labels: list[str]) -> tuple[torch.Tensor, list[str]]:
    reply = server.client.classify(texts, adapter_id)
    assert len(reply.results) == len(texts)
    for r in reply.results:
        assert [s.label for s in r.scores] == labels
    return torch.tensor([list(r.logits) for r in reply.results]), [r.label for r in reply.results]


def close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-4) -> None:
    """Logits: equal within atol, relative to their scale once it is over 1."""
    torch.testing.assert_close(got, want, rtol=0, atol=atol * max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("adapter_id", sorted(CLASSIFIERS))
def test_minilm_classifier_served_equals_attached_offline(minilm, adapter_id):
    adapter, folder = minilm["adapters"][adapter_id], minilm["folder"]
    texts = minilm["texts"]["trec6"] + minilm["texts"]["spam"]
    assert adapter.task_type == "seq-cls" and adapter.head and len(adapter.labels) == len(set(adapter.labels)) >= 2
    assert adapter.num_params() > 0
    want = attached_logits(folder, adapter, texts)

    # the adapter's layers matter, not only its head: the head alone on the base gives other logits
    head_only = bert_classifier(folder, len(adapter.labels))
    with torch.no_grad():
        head_only.classifier.weight.copy_(adapter.head["classifier.weight"])
        head_only.classifier.bias.copy_(adapter.head["classifier.bias"])
    assert (bert_logits(head_only, folder, texts) - want).abs().max() > 1e-3, "the trained layers changed nothing"

    got, labels = served_logits(minilm["server"], texts, adapter_id, list(adapter.labels))
    close(got, want)
    assert labels == [adapter.labels[i] for i in want.argmax(dim=1).tolist()]


# ---- 3. merge of the two real adapters ------------------------------------------------------------------------

def test_minilm_merge_equals_dense_weighted_sum(minilm, capsys):
    a, b = (minilm["adapters"][k] for k in ("trec6", "spam"))
    folder, store, server = minilm["folder"], minilm["store"], minilm["server"]
    out = store / "merged"  # in the served store: the server loads it on first request
    args = ["merge", str(store / "trec6"), str(store / "spam"), "--weights", *map(str, WEIGHTS), "--out", str(out),
            "--head-from", "1"]
    assert main(args) == 0, capsys.readouterr().err
    merged = load_adapter(out)

    # every module: delta of the result == 0.7 delta_A + 0.3 delta_B (zero where an input does not adapt it)
    assert set(merged.shapes) == set(a.shapes) | set(b.shapes)
    assert set(b.shapes) < set(a.shapes), "the inputs should adapt different module sets"
    dense = {}
    for path in merged.shapes:
        want = sum(w * x.delta(path) for w, x in zip(WEIGHTS, (a, b)) if path in x.shapes)
        dense[path] = want
        torch.testing.assert_close(merged.delta(path), want, rtol=0, atol=1e-5 * float(want.abs().max()) + 1e-12,
                                   msg=lambda m, path=path: f"{path}: {m}")
    assert any(float(d.abs().max()) > 1e-3 for d in dense.values()), "the merged update is all but zero"
    assert merged.head.keys() == a.head.keys() and all(torch.equal(merged.head[k], a.head[k]) for k in a.head)
    assert merged.labels == a.labels

    # logits: the merged adapter attached == the base with the dense weighted sum added to its weights (+ A's head)
    texts = minilm["texts"]["trec6"] + minilm["texts"]["spam"]
    got = attached_logits(folder, merged, texts)
    reference = bert_classifier(folder, len(a.labels))
    with torch.no_grad():
        for path, delta in dense.items():
            reference.get_submodule(path).weight.add_(delta)
        reference.classifier.weight.copy_(a.head["classifier.weight"])
        reference.classifier.bias.copy_(a.head["classifier.bias"])
    want = bert_logits(reference, folder, texts)
    close(got, want)
    assert (want - attached_logits(folder, a, texts)).abs().max() > 1e-3, "the merge should differ from input A"

    # and served over gRPC
    served, _ = served_logits(server, texts, "merged", list(a.labels))
    close(served, want)
