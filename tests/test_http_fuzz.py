"""The OpenAI-compatible HTTP API fuzzed from its own /openapi.json (schemathesis), against a real running server: a
tiny causal Llama with a chat template and 2 adapters, and a tiny BERT with a seq-cls and a feature adapter. No answer
may be a server error (>= 500), and every error answer is OpenAI's JSON {"error": {"message": str, "type": str, ...}}.

Two readings of the schema:
  raw      the schema as served, every operation, with cases that fit it (positive) and cases that break it
           (negative). Its bodies almost never name a served model and carry random unknown keys, so they test the
           refusals;
  steered  the same schema with "model" (and lora_name, the adapters of a mix, the /v1/models/{id} segment) drawn
           from the served names and no unknown keys, so that its positive cases reach the engine (sampling
           parameters, stops, mixes, streams, token-id prompts, encoder inputs): the generation routes on the Llama,
           the encoder routes on the BERT.
Then a table of edge bodies schemathesis rarely draws (lone surrogates, NUL bytes, ids past int64, seeds past
uint64), each with the status it must get (the first fuzz runs found a 500 or a hang for each of: encoder token ids
outside the vocabulary, a lone surrogate in a text, a NUL or surrogate in lora_path, a seed past 2**64 - 1).

The schema declares no response models (and says 422 where the server answers 400), so schemathesis's conformance
checks have nothing to hold answers to: only its "not a server error" check and this file's error-shape check run.

The cases are drawn with `APIOperation.as_strategy` under a plain hypothesis `@given`, one test per (operation, mode):
schemathesis's lazy pytest loader (`schemathesis.pytest.from_fixture`, needed for a schema served by a fixture)
sets `request.node._nodeid`, which pytest 9.2 nodes no longer have."""

from __future__ import annotations

import copy
import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from adalora.server.config import ServerConfig
from tests.conftest import tiny_bert
from tests.factories import random_adapter, varied_llama
from tests.server_setup import ServerThread, word_tokenizer, write_base, write_store
from tests.test_engine_model import BERT_ALL

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")
LIMITS = dict(max_new_tokens=8, default_max_new_tokens=8, max_prompt_tokens=32, max_batch_size=4, max_inputs=8,
              http_timeout_s=10.0, grace_s=0.5)
VOCAB = 64
"""The tiny models' vocabulary."""
EXAMPLES = 20
"""Cases per (operation, mode)."""
COMPLETIONS, CHAT, EMBEDDINGS, CLASSIFY = ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), \
    ("POST", "/v1/embeddings"), ("POST", "/classify")
MODEL, LOAD, UNLOAD = ("GET", "/v1/models/{model_id}"), ("POST", "/v1/load_lora_adapter"), \
    ("POST", "/v1/unload_lora_adapter")
OPERATIONS = [COMPLETIONS, CHAT, EMBEDDINGS, CLASSIFY, ("POST", "/v1/classify"), ("GET", "/v1/models"), MODEL, LOAD,
              UNLOAD, ("GET", "/health"), ("GET", "/metrics")]
"""Every operation /openapi.json lists (test_the_table_is_every_operation holds this to the schema)."""
NO_NEGATIVE = {("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"), MODEL}
"""Operations with nothing a request can break (no parameters and no body, or one path segment any non-empty
string fits): schemathesis can draw no negative case for them."""
READINGS = {("llama", "raw"): OPERATIONS,
            ("llama", "steered"): [COMPLETIONS, CHAT, MODEL, LOAD, UNLOAD],
            ("bert", "steered"): [EMBEDDINGS, CLASSIFY, LOAD, UNLOAD]}
"""(server, reading) -> the operations fuzzed. The raw schema is the same app on either base and its cases stop at
the refusals, so it is fuzzed once; steered, each base gets the routes it serves (/v1/classify is /classify)."""
CASES = [(api, method, path, mode) for api, operations in READINGS.items() for method, path in operations
         for mode in GenerationMode
         if not (mode.is_negative and ((method, path) in NO_NEGATIVE or api[1] == "steered"))]
"""(server and reading, operation, mode): a steered schema's negative cases would be the raw one's."""
ENCODER_ROUTES = {"/v1/embeddings", "/classify", "/v1/classify"}


def serve(root, base, tokenizer, adapters: dict) -> ServerThread:
    config = ServerConfig(base_model=str(write_base(base, root / "base", tokenizer)),
                          adapter_dir=str(write_store(root / "adapters", adapters)), preload=tuple(adapters), port=0,
                          http_port=0, **LIMITS)
    return ServerThread(config)


def url(server: ServerThread) -> str:
    return f"http://127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    base = varied_llama()
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    server = serve(tmp_path_factory.mktemp("llama"), base, tokenizer,
                   {"a": random_adapter(base, 1), "b": random_adapter(base, 2, init_r=2)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bert_server(tmp_path_factory):
    adapters = {"sent": random_adapter(tiny_bert(num_labels=2), 1, targets=BERT_ALL, task_type="seq-cls",
                                       labels=["neg", "pos"]),
                "feat": random_adapter(tiny_bert(), 3, targets=BERT_ALL, task_type="feature-extraction")}
    server = serve(tmp_path_factory.mktemp("bert"), tiny_bert(), word_tokenizer(), adapters)
    yield server
    server.stop()


def steer(raw: dict, base: str, adapters: list[str]) -> dict:
    """`raw` with the served names in every name field and no unknown keys; token ids inside the vocabulary or any
    integer at all."""
    schema = copy.deepcopy(raw)
    names = {"enum": [base, *adapters]}
    token_ids = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": VOCAB - 1}, {"type": "integer"}]}
    for body in schema["components"]["schemas"].values():
        if body.get("additionalProperties") is True:
            body["additionalProperties"] = False
        fields = body.get("properties", {})
        if "model" in fields:
            fields["model"] = {"type": "string", **names}
        if "lora_name" in fields:
            fields["lora_name"] = {"type": "string", "enum": [*adapters, "nope"]}
        if "adapters" in fields:
            fields["adapters"] = {"anyOf": [{"type": "object", "propertyNames": {"enum": adapters},
                                             "additionalProperties": {"type": "number"}}, {"type": "null"}]}
        for name in ("prompt", "input"):
            for shape in fields.get(name, {}).get("anyOf", []):
                items = shape.get("items", {})
                if items.get("type") == "integer":
                    shape["items"] = token_ids
                elif items.get("type") == "array":
                    items["items"] = token_ids
    for parameter in schema["paths"]["/v1/models/{model_id}"]["get"]["parameters"]:
        parameter["schema"] = {"type": "string", **names}
    return schema


@pytest.fixture(scope="module")
def api(request):
    """(schema, base url, session) of one running server (request.param: (server, reading)), the schema read from
    its /openapi.json."""
    base, reading = request.param
    server = request.getfixturevalue(f"{base}_server")
    with requests.Session() as session:
        raw = session.get(f"{url(server)}/openapi.json", timeout=30).json()
        if reading == "steered":
            adapters = sorted(v.id for v in server.backend.list_adapters(True))
            raw = steer(raw, server.config.model_name, adapters)
        yield schemathesis.openapi.from_dict(raw), url(server), session


# ---- checks -------------------------------------------------------------------------------------------------------

def assert_error_shape(status: int, content: bytes, where) -> None:
    if status >= 400:
        body = json.loads(content)
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict), where
        assert isinstance(error.get("message"), str) and error["message"], where
        assert isinstance(error.get("type"), str) and error["type"], where


def check_answer(case, response) -> None:
    """No 5xx (schemathesis's own check, so its report names the case), and an error answer in OpenAI's shape."""
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert_error_shape(response.status_code, response.content,
                           (case.as_curl_command(), response.status_code, response.text[:500]))


# ---- tests --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("api", list(READINGS), ids=["-".join(a) for a in READINGS], indirect=True)
def test_the_table_is_every_operation(api):
    schema, _, _ = api
    listed = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize("api,method,path,mode", CASES, indirect=["api"],
                         ids=[f"{'-'.join(a)} {m} {p} {g.value}" for a, m, p, g in CASES])
def test_no_case_gets_a_server_error(api, method, path, mode):
    schema, base_url, session = api

    @given(case=schema[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        check_answer(case, case.call(base_url=base_url, session=session, timeout=60))

    fuzz()


SURROGATE = "\\ud800"
"""A lone UTF-16 surrogate as JSON writes it: valid JSON, but no UTF-8 text (schemathesis never draws one)."""
EDGES = [
    # (server, path, body as JSON text, status it must get)
    ("llama", "/v1/completions", '{"model": "a", "prompt": "w5", "seed": 18446744073709551615}', 200),
    ("llama", "/v1/completions", '{"model": "a", "prompt": "w5", "seed": 18446744073709551616}', 400),
    ("llama", "/v1/completions", '{"model": "a", "prompt": "w5", "n": 100000000000000000000000}', 400),
    ("llama", "/v1/completions", '{"model": "a", "prompt": "w5", "max_tokens": 1e400}', 400),
    ("llama", "/v1/completions", '{"model": "a", "prompt": "w5", "temperature": NaN}', 400),
    ("llama", "/v1/completions", '{"model": "a", "prompt": "w5", "temperature": Infinity}', 400),
    ("llama", "/v1/completions", '{"model": "a", "prompt": "w5", "top_k": 100000000000000000000000}', 200),
    ("llama", "/v1/completions", '{"model": "base", "prompt": "w5", "adapters": {"a": NaN}}', 400),
    ("llama", "/v1/completions", '{"model": "base", "prompt": "w5", "adapters": {"a": 1e308, "b": -1e308}}', 400),
    ("llama", "/v1/completions", '{"model": "a", "prompt": "w5", "stop": [""]}', 400),
    ("llama", "/v1/completions", '{"model": "a", "prompt": [-1, 100000000000000000000000]}', 400),
    ("llama", "/v1/completions", '{"model": "a", "prompt": [[]]}', 400),
    ("llama", "/v1/completions", '[1, 2]', 400),
    ("llama", "/v1/completions", f'{{"model": "{SURROGATE}", "prompt": "w5"}}', 404),
    ("llama", "/v1/completions", f'{{"model": "a", "prompt": "w5", "stop": "{SURROGATE}"}}', 200),
    ("llama", "/v1/completions", f'{{"model": "a", "prompt": "w5 {SURROGATE}"}}', 400),
    ("llama", "/v1/chat/completions", f'{{"model": "a", "messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}',
     400),
    ("llama", "/v1/load_lora_adapter", f'{{"lora_name": "{SURROGATE}"}}', 400),
    ("llama", "/v1/load_lora_adapter", '{"lora_name": "a", "lora_path": "../../etc"}', 400),
    ("llama", "/v1/load_lora_adapter", '{"lora_name": "a", "lora_path": "a\\u0000b"}', 400),
    ("llama", "/v1/load_lora_adapter", f'{{"lora_name": "a", "lora_path": "{SURROGATE}"}}', 400),
    ("bert", "/v1/embeddings", '{"model": "base", "input": [[]]}', 400),
    ("bert", "/v1/embeddings", '{"model": "base", "input": [0, 63]}', 200),
    *[("bert", route, f'{{"model": "sent", "input": {ids}}}', 400)
      for route in ("/v1/embeddings", "/classify") for ids in ("[64]", "[[5, 6], [-1]]", "[100000000000000000000000]")],
    ("bert", "/v1/embeddings", f'{{"model": "base", "input": "{SURROGATE}"}}', 400),
    ("bert", "/classify", f'{{"model": "sent", "input": ["w5", "{SURROGATE}"]}}', 400),
]


@pytest.mark.parametrize("base,path,body,status", EDGES)
def test_edge_bodies_get_their_status(request, base, path, body, status):
    server = request.getfixturevalue(f"{base}_server")
    reply = requests.post(f"{url(server)}{path}", data=body.encode(), timeout=3,
                          headers={"Content-Type": "application/json"})
    assert_error_shape(reply.status_code, reply.content, reply.text[:500])
    assert reply.status_code == status, reply.text[:500]
