"""/v1/embeddings and /classify of the OpenAI-compatible HTTP API on a tiny random BERT with seq-cls adapters of
different label sets and a feature adapter: the real `openai` client's embeddings (its default base64 and float) and
/classify's labels and probabilities equal the in-process EncoderRunner; usage counts the tokens the model reads;
refusals carry their HTTP status and OpenAI's error shape."""

import json
import urllib.error
import urllib.request

import openai
import pytest
import torch

from tests.factories import ENCODER_TEXTS
from tests.server_setup import encoder_server

TEXTS = ENCODER_TEXTS
IDS = [[3, 7, 8, 4], [3, 9, 4], [12]]
BASE = "tiny-bert"
"""The base's served name (--served-model-name)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    server, runner, tokenizer = encoder_server(tmp_path_factory.mktemp("http-encoder"), http_port=0,
                                               served_model_name=BASE)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="unused",
                           max_retries=0, timeout=30)
    yield server, runner, client, tokenizer
    client.close()
    server.stop()


def tokens(tokenizer, inputs) -> int:
    """Tokens the model reads: the word tokenizer adds no special tokens, and token id rows are read as given."""
    rows = [inputs] if isinstance(inputs, str) else inputs
    return sum(len(tokenizer(x)["input_ids"]) if isinstance(x, str) else len(x) for x in rows)


def selection(model: str):
    return None if model == BASE else model


def post(server, path: str, body: dict) -> tuple[int, dict]:
    """(status, JSON answer) of a POST, error statuses included."""
    request = urllib.request.Request(f"http://127.0.0.1:{server.server.http_port}{path}", method="POST",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


EMBED_CASES = [(BASE, TEXTS), ("feat", TEXTS), ("sent", TEXTS[:2]), ("feat", IDS), (BASE, "w5 w9 w9"),
               ("topic", IDS[:1])]
"""(model, input): the base and adapters (a seq-cls adapter embeds too), texts, token id rows, one text."""


@pytest.mark.parametrize("encoding", [None, "float"], ids=["sdk-default-base64", "float"])
@pytest.mark.parametrize("model,inputs", EMBED_CASES)
def test_embeddings_equal_the_in_process_runner(setup, model, inputs, encoding):
    server, runner, client, tokenizer = setup
    extra = {} if encoding is None else {"encoding_format": encoding}
    reply = client.embeddings.create(model=model, input=inputs, **extra)
    rows = [inputs] if isinstance(inputs, str) else inputs
    want = runner.embed(rows, [selection(model)] * len(rows), normalize=True)
    assert reply.model == model and reply.object == "list"
    assert [d.index for d in reply.data] == list(range(len(rows)))
    assert all(d.object == "embedding" for d in reply.data)
    got = torch.tensor([d.embedding for d in reply.data], dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(rows)), rtol=0, atol=1e-5)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens(tokenizer, inputs)


def test_adapters_embed_differently(setup):
    """The comparison above could not tell an adapter from the base if the adapters changed nothing."""
    _, _, client, _ = setup
    vectors = {m: torch.tensor(client.embeddings.create(model=m, input=TEXTS[:1]).data[0].embedding)
               for m in (BASE, "feat", "sent")}
    assert (vectors[BASE] - vectors["feat"]).abs().max() > 1e-3
    assert (vectors[BASE] - vectors["sent"]).abs().max() > 1e-3


@pytest.mark.parametrize("route", ["/classify", "/v1/classify"])
@pytest.mark.parametrize("adapter,inputs", [("sent", TEXTS), ("topic", TEXTS), ("topic", IDS), ("sent", "w5 w6")])
def test_classify_equals_the_in_process_runner(setup, route, adapter, inputs):
    server, runner, _, tokenizer = setup
    status, body = post(server, route, {"model": adapter, "input": inputs})
    assert status == 200, body
    rows = [inputs] if isinstance(inputs, str) else inputs
    want = runner.classify(rows, [adapter] * len(rows))
    assert body["model"] == adapter and body["object"] == "list"
    assert [d["index"] for d in body["data"]] == list(range(len(rows)))
    assert [d["label"] for d in body["data"]] == [w.label for w in want]
    for got, expected in zip(body["data"], want):
        assert got["num_classes"] == len(expected.scores)
        torch.testing.assert_close(torch.tensor(got["probs"]), torch.tensor(list(expected.scores.values())),
                                   rtol=0, atol=1e-6)
    assert body["usage"] == {"prompt_tokens": tokens(tokenizer, inputs), "completion_tokens": 0,
                             "total_tokens": tokens(tokenizer, inputs)}


def test_probs_follow_the_adapters_label_order(setup):
    """"topic"'s labels are not sorted: probs[i] is labels[i]'s probability, so the argmax names the label."""
    server, runner, _, _ = setup
    _, body = post(server, "/classify", {"model": "topic", "input": TEXTS})
    labels = list(runner.classify(TEXTS[:1], ["topic"])[0].scores)
    assert labels == ["d", "a", "c", "b"]
    for row in body["data"]:
        assert row["label"] == labels[max(range(len(labels)), key=row["probs"].__getitem__)]


def sdk_error(call) -> openai.APIStatusError:
    try:
        call()
    except openai.APIStatusError as e:
        return e
    raise AssertionError("the call succeeded, but an error status was expected")


def test_refusals_through_the_openai_client(setup):
    _, _, client, _ = setup
    cases = [  # (call, SDK error class, status, fragment of the message, param)
        (lambda: client.completions.create(model=BASE, prompt="w5", max_tokens=2), openai.BadRequestError, 400,
         "needs a causal-lm base", None),
        (lambda: client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "w5"}]),
         openai.BadRequestError, 400, "has no chat template", None),
        (lambda: client.embeddings.create(model="nope", input=TEXTS), openai.NotFoundError, 404,
         "'nope' is not in the store", None),
        (lambda: client.embeddings.create(model="No Such Model", input=TEXTS), openai.NotFoundError, 404,
         "is not served here", None),
        (lambda: client.embeddings.create(model=BASE, input=[]), openai.BadRequestError, 400, "empty list", None),
        (lambda: client.embeddings.create(model=BASE, input=TEXTS, dimensions=8), openai.BadRequestError, 400,
         "dimensions", None),
        (lambda: client.embeddings.create(model=BASE, input=TEXTS * 2), openai.BadRequestError, 400, "limit of 4",
         None),
        (lambda: client.embeddings.create(model=BASE, input=TEXTS, extra_body={"encoding_format": "hex"}),
         openai.BadRequestError, 400, "encoding_format", "encoding_format"),
    ]
    for call, kind, status, fragment, param in cases:
        error = sdk_error(call)
        assert isinstance(error, kind) and error.status_code == status, (fragment, error)
        assert isinstance(error.body, dict) and fragment in error.body["message"], (fragment, error.body)
        assert error.type == ("invalid_request_error" if status == 400 else "not_found_error")
        assert error.param == param


def test_classify_refusals(setup):
    server, _, _, _ = setup
    cases = [  # (body, status, fragment of the message)
        ({"model": "feat", "input": TEXTS}, 400, "no classification head"),
        ({"model": BASE, "input": TEXTS}, 400, "has no head"),
        ({"model": "sent", "input": []}, 400, "empty list"),
        ({"model": "nope", "input": TEXTS}, 404, "'nope' is not in the store"),
        ({"model": "sent", "input": TEXTS, "top_k": 2}, 400, "unknown parameter(s) top_k"),
        ({"model": "sent"}, 400, "input"),
    ]
    for body, status, fragment in cases:
        got, answer = post(server, "/classify", body)
        assert got == status and fragment in answer["error"]["message"], (body, got, answer)
        assert isinstance(answer["error"]["type"], str)
