"""Encoder serving: a mixed batch of seq-cls adapters with different label sets equals each row alone on a
fresh *ForSequenceClassification (built with that adapter's num_labels) with the adapter attached; embeddings
equal a naive per-row mean; padding changes no row; heads per slot; edge mode swaps heads bit for bit."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import BertModel, BertTokenizer, LlamaForSequenceClassification

from adalora.engine import (AdapterEngine, AdapterMismatch, AdapterNotFound, BatchError, EdgeMerger,
                                    EncodedBatch, EncoderRunner, EngineConfig, EngineError, InvalidRequest, encode,
                                    from_token_ids)
from adalora.inject import attach_adapter
from tests.conftest import tiny_bert, tiny_bert_config, tiny_llama_config
from tests.test_engine_model import BERT_ALL
from tests.factories import random_adapter
from adalora.tools.merge import MergeParams, merge_adapters

ATOL = 1e-5
NUM_LABELS = {"sent": 2, "topic": 5, "plain": 3, "topic_twin": 5}
MIX = {"topic": 0.6, "topic_twin": 0.4}  # two adapters that share one head


def seq_cls(name, seed, targets=BERT_ALL, labels=None):
    base = tiny_bert(num_labels=NUM_LABELS[name])
    return random_adapter(base, seed, targets=targets, task_type="seq-cls", labels=labels)


@pytest.fixture(scope="module")
def adapters():
    topic = seq_cls("topic", 2, targets=BERT_ALL[::2], labels=["sport", "news", "arts", "tech", "food"])
    twin = dataclasses.replace(seq_cls("topic_twin", 5, targets=BERT_ALL[1:]), head=topic.head, labels=topic.labels)
    return {
        "sent": seq_cls("sent", 1, labels=["neg", "pos"]),
        "topic": topic,
        "plain": seq_cls("plain", 3, targets=("query", "value")),  # no label names: LABEL_0.. as transformers
        "topic_twin": twin,
        "feat": random_adapter(tiny_bert(), 4, targets=BERT_ALL, task_type="feature-extraction"),
    }


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]) + "\n")
    return BertTokenizer(str(vocab))


def runner_over(adapters, tokenizer, base=None, max_slots=8):
    engine = AdapterEngine(copy.deepcopy(base or tiny_bert()), EngineConfig(max_slots=max_slots))
    for name, adapter in adapters.items():
        engine.load(name, adapter)
    return EncoderRunner(engine, tokenizer)


def reference_adapter(adapters, request):
    """The adapter a row runs alone: its own, or the linear merge of a mixture carrying the shared head."""
    if isinstance(request, str):
        return adapters[request], NUM_LABELS.get(request, 3)
    members = [adapters[k] for k in request]
    merged = merge_adapters(members, "linear", MergeParams(weights=tuple(request.values())), head_from=1)
    return merged, NUM_LABELS[next(iter(request))]


def alone_logits(adapters, request, text, tokenizer):
    adapter, num_labels = reference_adapter(adapters, request)
    model = tiny_bert(num_labels=num_labels)
    attach_adapter(model, adapter)
    with torch.no_grad():
        return model(**encode(tokenizer, [text]).model_inputs(torch.device("cpu"))).logits[0]


# (text, request): lengths differ so every short row is padded in the batch
CLASSIFY_ROWS = [
    ("w1 w2 w3 w4 w5 w6 w7", "sent"),
    ("w8", "topic"),
    ("w9 w10 w11", "plain"),
    ("w12 w13", MIX),
    ("w14 w15 w16 w17", "topic_twin"),
    ("w18", "sent"),
]


def test_mixed_batch_equals_each_row_alone_with_its_own_head(adapters, tokenizer):
    runner = runner_over(adapters, tokenizer)
    texts, requests = zip(*CLASSIFY_ROWS)
    results = runner.classify(list(texts), list(requests))
    for (text, request), result in zip(CLASSIFY_ROWS, results):
        expected = alone_logits(adapters, request, text, tokenizer)
        torch.testing.assert_close(result.logits, expected, atol=ATOL, rtol=ATOL, msg=f"{text!r} with {request}")
        adapter, num_labels = reference_adapter(adapters, request)
        labels = adapter.labels or [f"LABEL_{i}" for i in range(num_labels)]
        assert list(result.scores) == labels
        assert result.label == labels[int(expected.argmax())]
        assert abs(sum(result.scores.values()) - 1.0) < 1e-5
        torch.testing.assert_close(torch.tensor(list(result.scores.values())), torch.softmax(expected, -1))


def test_adapter_factors_change_the_logits(adapters, tokenizer):
    """Non-vacuous: the base backbone under the same head gives other logits."""
    runner = runner_over(adapters, tokenizer)
    result = runner.classify(["w1 w2 w3"], ["sent"])[0]
    model = tiny_bert(num_labels=2)
    head_only = dataclasses.replace(adapters["sent"], layers={})
    attach_adapter(model, head_only)
    with torch.no_grad():
        base_logits = model(**encode(tokenizer, ["w1 w2 w3"]).model_inputs(torch.device("cpu"))).logits[0]
    assert (result.logits - base_logits).abs().max() > 1e-3


def naive_embedding(adapters, request, text, tokenizer):
    model = tiny_bert()
    if request is not None:
        adapter, num_labels = reference_adapter(adapters, request)
        model = tiny_bert(num_labels=num_labels)
        attach_adapter(model, adapter)
    with torch.no_grad():
        hidden = model.bert(**encode(tokenizer, [text]).model_inputs(torch.device("cpu"))).last_hidden_state
    return hidden[0].mean(dim=0)  # one row, no padding: every token counts


EMBED_ROWS = [("w1 w2 w3 w4 w5 w6", None), ("w7", "feat"), ("w8 w9", "sent"), ("w10 w11 w12", MIX), ("w13", None)]


@pytest.mark.parametrize("normalize", [False, True])
def test_embeddings_equal_naive_mean_pooling(adapters, tokenizer, normalize):
    runner = runner_over(adapters, tokenizer)
    texts, requests = zip(*EMBED_ROWS)
    embeddings = runner.embed(list(texts), list(requests), normalize=normalize)
    assert embeddings.shape == (len(EMBED_ROWS), 32) and embeddings.dtype == torch.float32
    for row, (text, request) in enumerate(EMBED_ROWS):
        expected = naive_embedding(adapters, request, text, tokenizer)
        expected = F.normalize(expected, dim=-1) if normalize else expected
        torch.testing.assert_close(embeddings[row], expected, atol=ATOL, rtol=ATOL, msg=f"row {row}: {request}")


def test_padding_changes_no_row(adapters, tokenizer):
    runner = runner_over(adapters, tokenizer)
    short, long = "w5 w6", "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"
    for request in ["sent", "topic", MIX]:
        alone = runner.classify([short], [request])[0].logits
        batched = runner.classify([long, short, long], ["plain", request, "topic"])[1].logits
        torch.testing.assert_close(batched, alone, atol=ATOL, rtol=ATOL)
    alone = runner.embed([short], ["feat"])
    batched = runner.embed([long, short], [None, "feat"])[1:]
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=ATOL)


def test_token_id_inputs_equal_text_inputs(adapters, tokenizer):
    runner = runner_over(adapters, tokenizer)
    texts = ["w1 w2 w3", "w4"]
    batch = encode(tokenizer, texts)
    rows = [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask)]
    by_text = runner.classify(texts, ["sent", "topic"])
    by_ids = runner.classify(rows, ["sent", "topic"])
    by_batch = runner.classify(from_token_ids(rows), ["sent", "topic"])
    for a, b, c in zip(by_text, by_ids, by_batch):
        assert torch.equal(a.logits, b.logits) and torch.equal(a.logits, c.logits)


def test_heads_per_slot_bytes_and_unload(adapters, tokenizer):
    runner = runner_over(adapters, tokenizer)
    engine = runner.engine
    head = engine.head("topic")
    assert head.weight.shape == (5, 32) and head.labels == tuple(adapters["topic"].labels)
    assert engine.head("feat") is None
    head_bytes = (5 * 32 + 5) * 4
    assert engine.nbytes("topic") == engine.slots.nbytes("topic") + head_bytes
    assert engine.nbytes("feat") == engine.slots.nbytes("feat")
    slot = engine.slots.slot("topic")
    before = runner.classify(["w1 w2"], ["sent"])[0].logits
    engine.unload("topic")
    assert engine.heads.get(slot) is None
    engine.load("sent2", adapters["sent"])  # reuses the freed slot with another head
    assert engine.head("sent2").weight.shape == (2, 32)
    assert torch.equal(runner.classify(["w1 w2"], ["sent"])[0].logits, before)
    half = AdapterEngine(tiny_bert().to(torch.bfloat16), EngineConfig(max_slots=2))
    half.load("topic", adapters["topic"])
    assert half.head("topic").weight.dtype == torch.bfloat16
    assert half.heads.nbytes(half.slots.slot("topic")) == head_bytes // 2


def tiny_llama_cls(num_labels, seed=0):
    torch.manual_seed(seed)
    config = tiny_llama_config()
    config.num_labels = num_labels
    return LlamaForSequenceClassification(config).eval()


def test_decoder_score_head_reads_the_last_token(tokenizer):
    """A Llama seq-cls base: right-padded rows, each adapter's score head (no bias) on its last token."""
    targets = ("q_proj", "v_proj", "down_proj")
    adapters = {"two": random_adapter(tiny_llama_cls(2), 1, targets=targets, task_type="seq-cls"),
                "four": random_adapter(tiny_llama_cls(4), 2, targets=targets, task_type="seq-cls")}
    runner = runner_over(adapters, None, base=tiny_llama_cls(3))
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    requests = ["two", "four", "two"]
    results = runner.classify(rows, requests)
    for row, request, result in zip(rows, requests, results):
        model = tiny_llama_cls(len(adapters[request].head["score.weight"]))
        attach_adapter(model, adapters[request])
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([row])).logits[0]
        torch.testing.assert_close(result.logits, expected, atol=ATOL, rtol=ATOL)


EDGE_SEQUENCES = [("sent",), ("feat", "sent"), ("sent", "feat"), ("sent", "sent")]


@pytest.mark.parametrize("sequence", EDGE_SEQUENCES, ids="-".join)
def test_edge_mode_swaps_heads_and_restores_bits(adapters, tokenizer, sequence):
    base = tiny_bert(num_labels=2)
    model = copy.deepcopy(base)
    edge = EdgeMerger(model)
    for name in sequence:
        edge.activate(adapters[name])
    active = adapters[sequence[-1]]
    reference = copy.deepcopy(base)
    attach_adapter(reference, active)
    inputs = encode(tokenizer, ["w1 w2 w3", "w4"]).model_inputs(torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=ATOL, rtol=ATOL)
    own_head = torch.equal(model.classifier.weight, base.classifier.weight)
    assert own_head == (not active.head)
    assert edge.labels == active.labels
    edge.deactivate()
    ref = base.state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in model.state_dict().items())
    assert not edge.head_originals and edge.labels is None


# ---- errors: (name, call(runner), exception, message part); none may run the backbone
def _left_padded():
    return EncodedBatch(torch.tensor([[0, 2, 5]]), torch.tensor([[0, 1, 1]]))


ERROR_CASES = [
    ("base_row", lambda r: r.classify(["w1", "w2"], ["sent", None]), InvalidRequest,
     "row 1: classification needs an adapter with a head"),
    ("headless_adapter", lambda r: r.classify(["w1"], ["feat"]), InvalidRequest,
     "adapter 'feat' (task 'feature-extraction') carries no classification head"),
    ("mix_of_heads", lambda r: r.classify(["w1"], [{"sent": 0.5, "topic": 0.5}]), AdapterMismatch,
     "a mixture must share one head, but ['topic'] differ from 'sent'"),
    ("mix_with_headless", lambda r: r.classify(["w1"], [{"topic": 0.5, "feat": 0.5}]), InvalidRequest,
     "adapter 'feat'"),
    ("unknown_adapter", lambda r: r.classify(["w1"], ["nope"]), AdapterNotFound, "adapter 'nope' is not loaded"),
    ("empty_mix", lambda r: r.embed(["w1"], [{}]), BatchError, "row 0: an empty mixture"),
    ("rows_vs_requests", lambda r: r.classify(["w1", "w2", "w3"], ["sent", "sent"]), InvalidRequest,
     "2 adapter requests for 3 input rows"),
    ("single_string", lambda r: r.embed("w1", [None]), InvalidRequest, "non-empty list"),
    ("texts_and_ids", lambda r: r.embed(["w1", [2, 3]], [None, None]), InvalidRequest, "not a mix"),
    ("no_tokenizer", lambda r: EncoderRunner(r.engine).embed(["w1"], [None]), InvalidRequest,
     "texts need a tokenizer"),
    ("empty_id_row", lambda r: r.embed([[2, 3], []], [None, None]), InvalidRequest, "non-empty lists"),
    ("left_padded", lambda r: r.embed(_left_padded(), [None]), InvalidRequest, "rows [0] are empty or not right-padded"),
    ("mask_shape", lambda r: r.embed(EncodedBatch(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 2)), [None]),
     InvalidRequest, "attention_mask has shape (1, 2), input_ids (1, 3)"),
    ("mask_values", lambda r: r.embed(EncodedBatch(torch.ones(1, 2, dtype=torch.long), torch.tensor([[1, 2]])),
                                      [None]), InvalidRequest, "only 0 and 1"),
]


@pytest.mark.parametrize("name, call, error, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_name_the_problem_before_any_compute(adapters, tokenizer, name, call, error, message):
    runner = runner_over(adapters, tokenizer)
    forwards = []
    runner.backbone.register_forward_pre_hook(lambda *_: forwards.append(1))
    with pytest.raises(error) as info:
        call(runner)
    assert message in str(info.value)
    assert forwards == []


def test_training_mode_is_refused(adapters, tokenizer):
    runner = runner_over(adapters, tokenizer)
    runner.engine.model.train()
    with pytest.raises(EngineError, match="training mode"):
        runner.classify(["w1"], ["sent"])


def test_served_pooler_is_refused(tokenizer):
    engine = AdapterEngine(tiny_bert(), EngineConfig(target_modules=("dense",)))
    with pytest.raises(EngineError, match=r"pooler layers \['bert.pooler.dense'\] are served"):
        EncoderRunner(engine, tokenizer)


def test_classifier_head_without_pooler_is_refused(adapters, tokenizer):
    torch.manual_seed(0)
    bare = BertModel(tiny_bert_config(), add_pooling_layer=False).eval()
    adapter = random_adapter(bare, 1, targets=("query",), task_type="feature-extraction")
    adapter = dataclasses.replace(adapter, head=adapters["sent"].head, labels=["neg", "pos"])
    runner = runner_over({"sent": adapter}, tokenizer, base=bare)
    with pytest.raises(AdapterMismatch, match="reads the pooler output, but this base has no pooler"):
        runner.classify(["w1"], ["sent"])
    assert runner.embed(["w1"], ["sent"]).shape == (1, 32)  # embeddings need no pooler


def _with_head(adapter, head, labels=None):
    return dataclasses.replace(adapter, head=head, labels=labels)


W = torch.zeros(2, 32)
LOAD_CASES = [
    ("hidden_size", {"classifier.weight": torch.zeros(2, 31)}, None, "takes hidden size 31, this base has 32"),
    ("labels_count", {"classifier.weight": W}, ["a", "b", "c"], "names 3 labels ['a', 'b', 'c'] but its head"),
    ("two_layers", {"classifier.dense.weight": W, "classifier.out_proj.weight": W}, None, "not one linear layer"),
    ("other_name", {"pre_classifier.weight": W}, None, "not one linear layer"),
    ("bias_shape", {"classifier.weight": W, "classifier.bias": torch.zeros(3)}, None, "has shape (3,), expected (2,)"),
    ("weight_dim", {"classifier.weight": torch.zeros(2, 32, 1)}, None, "must hold a 2-D 'classifier.weight'"),
]


@pytest.mark.parametrize("name, head, labels, message", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_a_head_that_cannot_be_served_loads_nothing(adapters, name, head, labels, message):
    engine = AdapterEngine(tiny_bert(), EngineConfig(max_slots=2))
    with pytest.raises(AdapterMismatch) as info:
        engine.load("x", _with_head(adapters["sent"], head, labels))
    assert message in str(info.value)
    assert engine.slots.loaded() == {} and engine.heads.get(0) is None


def test_edge_head_errors_leave_the_model_untouched(adapters):
    base = tiny_bert(num_labels=3)
    model = copy.deepcopy(base)
    edge = EdgeMerger(model)
    with pytest.raises(AdapterMismatch, match=r"is \(2, 32\), the model's is \(3, 32\); build the model with num_labels=2"):
        edge.activate(adapters["sent"])
    with pytest.raises(AdapterMismatch, match="'score.weight' has no parameter in this model"):
        edge.activate(_with_head(adapters["sent"], {"score.weight": W}))
    ref = base.state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in model.state_dict().items())
    assert edge.active is None and not edge.originals and not edge.head_originals
