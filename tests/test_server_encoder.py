"""Classify / Embed over gRPC on a tiny random BERT with seq-cls adapters of different label sets: each answer
equals the in-process EncoderRunner; encoder refusals; and the `adalora generate` / `adalora classify` CLIs."""

import grpc
import pytest
import torch

from adalora.cli import main
from adalora.engine import EncoderRunner
from adalora.server.config import ServerConfig
from tests.conftest import tiny_bert
from tests.server_setup import ServerThread, reference_engine, status_of, word_tokenizer, write_base, write_store
from tests.factories import ENCODER_TEXTS, encoder_adapters, varied_llama
from tests.factories import random_adapter

TEXTS = ENCODER_TEXTS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder")
    tokenizer = word_tokenizer()
    adapters = encoder_adapters(("a", "b", "c", "d"))
    config = ServerConfig(base_model=str(write_base(tiny_bert(), root / "base", tokenizer)),
                          adapter_dir=str(write_store(root / "adapters", adapters)), preload=tuple(adapters), port=0,
                          max_inputs=4)
    server = ServerThread(config)
    runner = EncoderRunner(reference_engine(tiny_bert(), adapters), tokenizer, max_length=64)
    yield server, runner
    server.stop()


@pytest.mark.parametrize("adapter", ["sent", "topic"])
def test_classify_equals_the_in_process_runner(setup, adapter):
    server, runner = setup
    reply = server.client.classify(TEXTS, adapter)
    expected = runner.classify(TEXTS, [adapter] * len(TEXTS))
    assert [r.label for r in reply.results] == [e.label for e in expected]
    for got, want in zip(reply.results, expected):
        torch.testing.assert_close(torch.tensor(list(got.logits)), want.logits, rtol=0, atol=1e-6)
        assert [s.label for s in got.scores] == list(want.scores)


@pytest.mark.parametrize("adapter,normalize", [(None, False), ("feat", True), ({"feat": 0.5, "sent": 0.5}, False)])
def test_embed_equals_the_in_process_runner(setup, adapter, normalize):
    server, runner = setup
    ids = [[3, 7, 8, 4], [3, 9, 4]]
    reply = server.client.embed(ids, adapter, normalize=normalize)
    want = runner.embed(ids, [adapter] * len(ids), normalize=normalize)
    got = torch.tensor([list(e.values) for e in reply.embeddings])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_encoder_refusals(setup):
    server, _ = setup
    cases = [(lambda: server.client.classify(TEXTS, None), grpc.StatusCode.INVALID_ARGUMENT, "has no head"),
             (lambda: server.client.classify(TEXTS, "feat"), grpc.StatusCode.INVALID_ARGUMENT, "no classification head"),
             (lambda: server.client.classify(TEXTS * 2, "sent"), grpc.StatusCode.INVALID_ARGUMENT, "limit of 4"),
             (lambda: server.client.classify(["w5", [3, 4]], "sent"), grpc.StatusCode.INVALID_ARGUMENT, "mix texts"),
             (lambda: server.client.classify([list(range(5, 70))], "sent"), grpc.StatusCode.INVALID_ARGUMENT,
              "more than 64"),
             (lambda: server.client.classify(TEXTS, "nope"), grpc.StatusCode.NOT_FOUND, "'nope' is not in the store"),
             (lambda: server.client.generate("w5", "sent"), grpc.StatusCode.FAILED_PRECONDITION, "causal-lm base")]
    for call, code, fragment in cases:
        got, details = status_of(call)
        assert got == code and fragment in details, details


def test_classify_cli_prints_one_label_per_text(setup, capsys):
    server, runner = setup
    assert main(["classify", "--server", server.target, "--adapter", "topic", *TEXTS]) == 0
    assert capsys.readouterr().out.split() == [c.label for c in runner.classify(TEXTS, ["topic"] * 3)]
    assert main(["classify", "--server", server.target, "--adapter", "nope", "w5"]) == 2
    assert "NOT_FOUND: adapter 'nope' is not in the store" in capsys.readouterr().err


def test_generate_cli_prints_only_the_text(tmp_path, capsys):
    base = varied_llama()
    adapters = {"a": random_adapter(base, 1)}
    config = ServerConfig(base_model=str(write_base(base, tmp_path / "base", word_tokenizer())),
                          adapter_dir=str(write_store(tmp_path / "adapters", adapters)), preload=("a",), port=0)
    server = ServerThread(config)
    try:
        want = server.client.generate("w5 w6", "a", max_new_tokens=5, temperature=0)
        assert main(["generate", "--server", server.target, "--adapter", "a", "--max-new-tokens", "5", "w5 w6"]) == 0
        assert capsys.readouterr().out == want.text + "\n"
        assert main(["generate", "--server", server.target, "--adapter", "a", "--max-new-tokens", "5", "--json",
                     "w5 w6"]) == 0
        assert '"finishReason"' in capsys.readouterr().out
        assert main(["generate", "--server", server.target, "--max-new-tokens", "100000", "w5"]) == 2
        assert "INVALID_ARGUMENT: max_new_tokens 100000 is over" in capsys.readouterr().err
    finally:
        server.stop()
