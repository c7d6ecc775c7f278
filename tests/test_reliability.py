"""Issue 15's defects, each provoked the way it was found (over the real server, a server subprocess where the defect
killed the process, or the real CLI), each failing on the code before its fix:

  1  one request's extreme sampling value or overflowing adapter failed its whole batch with INTERNAL
  2  a loaded adapter stayed memory-mapped: truncating its file killed the server (SIGBUS), overwriting it changed
     what was served
  3  lora_alpha 1e300 / Infinity loaded, then served NaN
  4  merge --out D, D holding the inputs and the base, deleted all of them
  5  a failed merge left an empty OUT; a killed one left temp files
  6  a dense merge allocated out x in from shapes an 8 KB input merely declared
  7  stop sequences were unbounded
  8  a megabyte text prompt was tokenized on the event loop before any limit
  9  malformed JSON gave INTERNAL over gRPC and a traceback from the CLI
  10 the store followed symbolic links
  11 an answer over the message limit was counted OK; a whitespace prompt was told to "tokenize text first"; error
     messages held the server's paths; NOT_FOUND listed every stored id
and two of docs/RELIABILITY.md's checks that had no test: health under load, and no leaks.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from adalora.adapter_file import FILE_NAME, METADATA_KEY, save_adapter, tensors_sha256
from adalora.cli import main as cli
from adalora.engine import (
    AdapterEngine, EngineConfig, GenerationRequest, Generator, GeneratorConfig, SamplingParams,
)
from adalora.engine.errors import NonFiniteOutput
from adalora.peft_interop import save_peft
from adalora.server.client import AdaLoraClient, generate_request
from adalora.server.config import ServerConfig
from tests.server_setup import (ServerThread, reference_engine, status_of, until, word_tokenizer, write_base,
                                write_store)
from tests.factories import varied_llama
from tests.factories import random_adapter
from tests.test_server_e2e import Served

INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
PROMPT = [5, 9, 13, 7]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    base = varied_llama()
    adapters = {"a": random_adapter(base, 1), "b": random_adapter(base, 2)}
    base_dir = write_base(base, root / "base", word_tokenizer())
    store = write_store(root / "store", adapters)
    server = ServerThread(ServerConfig(base_model=str(base_dir), adapter_dir=str(store), preload=("a", "b"), port=0,
                                       max_batch_size=4, max_slots=8, max_prompt_tokens=32, max_new_tokens=24,
                                       default_max_new_tokens=8, max_message_bytes=64 * 1024, metrics_port=0))
    yield {"root": root, "base": base, "base_dir": base_dir, "store": store, "adapters": adapters, "server": server}
    server.stop()


def greedy_reference(world, adapter, n: int = 12) -> list[int]:
    generator = Generator(reference_engine(world["base"], world["adapters"]), GeneratorConfig(max_batch_size=1))
    handle = generator.submit(GenerationRequest(PROMPT, adapter, SamplingParams(n, temperature=0)))
    while generator.has_work():
        generator.step()
    return handle.result.token_ids


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def rewrite_manifest(file: Path, change) -> None:
    """Edit the native manifest in place, tensors and their sha256 kept valid."""
    tensors = load_file(str(file))
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(json.loads(f.read(length))["__metadata__"][METADATA_KEY])
    change(meta)
    meta["tensors_sha256"] = tensors_sha256(tensors)
    save_file(tensors, str(file), metadata={METADATA_KEY: json.dumps(meta)})


# ---- 1: one request never fails its batch ------------------------------------------------------------------------

BAD_SAMPLING = [
    ("temperature 1e-300", {"temperature": 1e-300}, "a"),
    ("repetition_penalty 1e-300", {"temperature": 1.0, "repetition_penalty": 1e-300}, "a"),
    ("mix weight 1e300", {"temperature": 0}, {"a": 1e300, "b": 0.5}),
]


@pytest.mark.parametrize("name,params,adapter", BAD_SAMPLING, ids=[c[0] for c in BAD_SAMPLING])
def test_extreme_sampling_value_is_refused_and_the_batch_goes_on(world, name, params, adapter):
    server = world["server"]
    stream = server.client.stub.GenerateStream(generate_request(PROMPT, "b", max_new_tokens=12, temperature=0),
                                               timeout=60)
    first = next(stream)  # the greedy request is running when the bad one arrives
    code, message = status_of(lambda: server.client.generate(PROMPT, adapter, max_new_tokens=6, **params))
    assert code == INVALID, message
    tokens = list(first.token_ids) + [t for reply in stream for t in reply.token_ids]
    assert tokens == greedy_reference(world, "b")


def test_a_row_whose_logits_overflow_fails_alone():
    """float16, an adapter whose delta overflows: its rows fail with NonFiniteOutput, the others in the same batch
    give what they give alone."""
    base = varied_llama()
    good, hot = random_adapter(base, 1), random_adapter(base, 2)
    for layer in hot.layers.values():
        layer.P.fill_(300.0)
        layer.Q.fill_(300.0)

    def run(requests):
        engine = AdapterEngine(copy.deepcopy(base).half(), EngineConfig(max_slots=4))
        engine.load("good", good)
        engine.load("hot", hot)
        generator = Generator(engine, GeneratorConfig(max_batch_size=4))
        handles = [generator.submit(GenerationRequest(PROMPT, a, SamplingParams(8, temperature=t, seed=3)))
                   for a, t in requests]
        while generator.has_work():
            generator.step()
        return handles

    together = run([(None, 0), ("hot", 0), ("good", 0), ("hot", 1.0), ("good", 0.7)])
    assert [type(h.error) for h in together] == [type(None), NonFiniteOutput, type(None), NonFiniteOutput,
                                                 type(None)]
    for handle, alone in zip([together[0], together[2], together[4]],
                             [run([(None, 0)]), run([("good", 0)]), run([("good", 0.7)])]):
        assert handle.result.token_ids == alone[0].result.token_ids


# ---- 2: a loaded adapter owns its bytes --------------------------------------------------------------------------

def test_loaded_adapter_survives_its_file_truncated_or_overwritten(tmp_path):
    base = varied_llama()
    adapters = {"a": random_adapter(base, 1), "b": random_adapter(base, 2)}
    base_dir = write_base(base, tmp_path / "base", word_tokenizer())
    store = write_store(tmp_path / "store", adapters)
    served = Served.start("mmap", tmp_path, base_dir, store, ("a",), ["--max-new-tokens", "16"])
    try:
        served.wait_ready()
        with AdaLoraClient(served.target, timeout=30) as client:
            before = list(client.generate(PROMPT, "a", max_new_tokens=8, temperature=0).token_ids)
            sha = client.get_adapter("a").sha256
            file = store / "a" / FILE_NAME
            other = (store / "b" / FILE_NAME).read_bytes()
            os.truncate(file, 0)
            assert list(client.generate(PROMPT, "a", max_new_tokens=8, temperature=0).token_ids) == before
            file.write_bytes(other)  # another adapter's file, no reload
            assert list(client.generate(PROMPT, "a", max_new_tokens=8, temperature=0).token_ids) == before
            assert client.get_adapter("a").sha256 == sha
        assert served.proc.poll() is None, served.tail()
    finally:
        served.stop()


# ---- 3: derived values finite and bounded ------------------------------------------------------------------------

def absurd_native(folder: Path, alpha: float, adapter) -> Path:
    save_adapter(adapter, folder)
    rewrite_manifest(folder / FILE_NAME, lambda m: m.update(lora_alpha=alpha))
    return folder


def absurd_peft(folder: Path, alpha, adapter) -> Path:
    save_peft(adapter, folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})  # PEFT's own form
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
    return folder


ABSURD = [("native-1e300", absurd_native, 1e300), ("peft-infinity", absurd_peft, float("inf")),
          ("peft-1e300", absurd_peft, 1e300)]


@pytest.mark.parametrize("name,make,alpha", ABSURD, ids=[c[0] for c in ABSURD])
def test_absurd_lora_alpha_is_refused_everywhere(world, tmp_path, capsys, name, make, alpha):
    server, store = world["server"], world["store"]
    folder = make(store / f"absurd-{name}", alpha, world["adapters"]["a"])
    code, message = status_of(lambda: server.client.load_adapter(f"absurd-{name}"))
    assert code == PRECONDITION and "lora_alpha" in message, message
    code, message = status_of(lambda: server.client.upload(f"up-absurd-{name}", folder))
    assert code == INVALID and "lora_alpha" in message, message
    assert not (store / f"up-absurd-{name}").exists()
    base = ["--base-model", str(world["base_dir"])]
    to = "native" if name.startswith("peft") else "peft"
    for argv in (["inspect", str(folder)], ["convert", str(folder), str(tmp_path / "c"), "--to", to, *base],
                 ["merge", str(folder), str(store / "a"), "--weights", "1", "1", "--out", str(tmp_path / "m"), *base]):
        capsys.readouterr()
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert str(folder) in err and "lora_alpha" in err and str(tmp_path / "m") not in err, err


# ---- 4, 5, 6: merge never destroys input, leaves nothing half-written, checks shapes before allocating --------

@pytest.fixture
def merge_dir(world, tmp_path):
    d = tmp_path / "D"
    for name in ("a", "b"):
        save_adapter(world["adapters"][name], d / name)
    write_base(world["base"], d / "base", word_tokenizer())
    return d


OUTS = {  # name -> (OUT relative to D (None = D itself), whether --into-base)
    "out-is-the-parent-of-everything": (None, True),
    "out-is-an-input": ("a", False),
    "out-inside-an-input": ("a/sub", False),
    "out-is-the-base": ("base", True),
    "out-inside-the-base": ("base/merged", True),
    "out-is-a-foreign-folder": ("foreign", False),
}


@pytest.mark.parametrize("case", sorted(OUTS))
def test_merge_refuses_an_out_that_would_touch_inputs(merge_dir, case, capsys):
    out, into_base = OUTS[case]
    if case == "out-is-a-foreign-folder":
        (merge_dir / "foreign").mkdir()
        (merge_dir / "foreign" / "notes.txt").write_text("mine")
    before = tree(merge_dir)
    argv = ["merge", str(merge_dir / "a"), str(merge_dir / "b"), "--weights", ".5", ".5", "--out",
            str(merge_dir if out is None else merge_dir / out), "--base-model", str(merge_dir / "base")]
    assert cli(argv + (["--into-base"] if into_base else [])) == 2
    assert "--out" in capsys.readouterr().err
    assert tree(merge_dir) == before


def test_merge_replaces_only_its_own_earlier_output(merge_dir, tmp_path):
    argv = ["merge", str(merge_dir / "a"), str(merge_dir / "b"), "--weights", ".5", ".5"]
    assert cli(argv + ["--out", str(tmp_path / "m")]) == 0
    assert cli(argv + ["--out", str(tmp_path / "m"), "--method", "svd"]) == 0
    full = ["--into-base", "--base-model", str(merge_dir / "base"), "--out", str(tmp_path / "full")]
    assert cli(argv + full) == 0 and cli(argv + full) == 0


def test_failed_merge_leaves_no_out_and_a_killed_ones_leftovers_are_removed(merge_dir, tmp_path):
    tmp_path = tmp_path / "outs"
    tmp_path.mkdir()
    out = tmp_path / "out"
    argv = ["merge", str(merge_dir / "a"), str(merge_dir / "b"), "--weights", "1e300", "1e300", "--out", str(out)]
    assert cli(argv) == 2  # the merged factors overflow float32 while the file is written
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".out.{int(dead.stdout)}.abcd.tmp"
    leftover.mkdir()
    (leftover / ".adapter.safetensors.x.tmp").write_bytes(b"half")
    assert cli(argv[:4] + ["0.5", "0.5", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dense_merge_checks_declared_shapes_before_allocating(world, tmp_path, capsys):
    huge = copy.deepcopy(world["adapters"]["a"])
    huge.shapes["model.layers.0.mlp.huge_proj"] = (10**6, 10**6)  # declared, rank 0: no tensor at all
    save_adapter(huge, tmp_path / "huge")
    assert (tmp_path / "huge" / FILE_NAME).stat().st_size < 64 * 1024
    argv = ["merge", str(tmp_path / "huge"), str(world["store"] / "b"), "--weights", ".5", ".5", "--method", "ties",
            "--density", "0.5", "--out", str(tmp_path / "m")]
    assert cli(argv) == 2
    assert "huge_proj" in capsys.readouterr().err
    assert cli(argv + ["--base-model", str(world["base_dir"])]) == 2
    assert "huge_proj" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# ---- 7, 8, 11: request bounds ------------------------------------------------------------------------------------

def test_stop_sequences_are_capped(world):
    client = world["server"].client
    code, message = status_of(lambda: client.generate(PROMPT, "a", stop=[f"w{i}" for i in range(1000)]))
    assert code == INVALID and "stop sequences" in message
    code, message = status_of(lambda: client.generate(PROMPT, "a", stop=["w5 " * 200]))
    assert code == INVALID and "at most" in message
    assert client.generate(PROMPT, "a", max_new_tokens=4, stop=[f"w{i} w{i}" for i in range(16)]).token_ids


def test_huge_and_empty_text_prompts_are_refused_before_the_tokenizer(world):
    client = world["server"].client
    health: list[str] = []
    worker = threading.Thread(target=lambda: health.append(client.health()))
    worker.start()
    code, message = status_of(lambda: client.generate("w5 " * 15000, "a"))
    worker.join(30)
    assert code == INVALID and "characters" in message and health == ["SERVING"]
    code, message = status_of(lambda: client.generate("   \n\t ", "a"))
    assert code == INVALID and "no tokens" in message and "tokenize" not in message


def test_health_answers_while_every_generation_step_is_stalled(world):
    """The model lock held (no step can run) with streams running and waiting: grpc.health.v1 and /healthz still
    answer SERVING within a 2 s deadline, and the streams then finish whole."""
    server = world["server"]
    port = server.server.metrics_port
    with server.backend.lock:
        streams = [server.client.generate_stream(PROMPT, "a", max_new_tokens=6, temperature=0) for _ in range(6)]
        assert until(lambda: server.backend.generator.waiting >= 1)
        reply = server.client.health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            assert response.status == 200
    expected = greedy_reference(world, "a", 6)
    for stream in streams:
        assert [t for reply in stream for t in reply.token_ids] == expected


def test_answer_over_the_message_limit_is_counted_as_refused(world):
    """GetAdapter of an adapter declaring 2000 modules: an answer over the server's 64 KiB message limit."""
    from prometheus_client import generate_latest

    server, wide = world["server"], copy.deepcopy(world["adapters"]["a"])
    for i in range(2000):
        wide.shapes[f"model.layers.0.mlp.declared_but_unused_{i}"] = (32, 32)
    save_adapter(wide, world["store"] / "wide")
    code, message = status_of(lambda: server.client.get_adapter("wide"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-message-bytes" in message, message
    scraped = generate_latest(server.server.metrics.registry).decode()
    statuses = {s.labels["status"] for f in text_string_to_metric_families(scraped) for s in f.samples
                if s.name == "adalora_requests_total" and s.labels.get("rpc") == "GetAdapter"}
    assert "RESOURCE_EXHAUSTED" in statuses and server.client.get_adapter("a").ranks


def test_error_messages_hold_no_server_paths_and_not_found_lists_no_ids(world):
    server, store = world["server"], world["store"]
    broken = store / "broken"
    save_adapter(world["adapters"]["a"], broken)
    (broken / FILE_NAME).write_bytes((broken / FILE_NAME).read_bytes()[:100])
    messages = [status_of(lambda: server.client.load_adapter("broken"))[1],
                status_of(lambda: server.client.load_adapter("nope"))[1],
                status_of(lambda: server.client.upload("up-broken", broken))[1]]
    for message in messages:
        assert str(store) not in message and str(store.resolve()) not in message, message
        assert str(world["base_dir"]) not in message and ".upload-" not in message, message
    assert "'a'" not in messages[1] and "'b'" not in messages[1]


# ---- 9: malformed JSON -------------------------------------------------------------------------------------------

def peft_config_edit(change):
    """A writer: the adapter saved as PEFT, then its adapter_config.json replaced by change(config dict) bytes."""
    def write(folder: Path, adapter) -> Path:
        save_peft(adapter, folder)
        (folder / "adapter_config.json").write_bytes(change(json.loads((folder / "adapter_config.json").read_text())))
        return folder
    return write


def manifest_edit(change):
    def write(folder: Path, adapter) -> Path:
        save_adapter(adapter, folder)
        rewrite_manifest(folder / FILE_NAME, change)
        return folder
    return write


MALFORMED = {  # name -> (writer(folder, adapter), words the message must hold)
    "config-is-a-list": (peft_config_edit(lambda c: b"[1, 2]"), "adapter_config.json"),
    "config-deep-nesting": (peft_config_edit(lambda c: b"[" * 20000 + b"]" * 20000), "adapter_config.json"),
    "config-not-utf8": (peft_config_edit(lambda c: b'{"peft_type": "\xff\xfe"}'), "adapter_config.json"),
    "config-init-r-text": (peft_config_edit(lambda c: json.dumps({**c, "init_r": "x"}).encode()), "init_r"),
    "config-rank-pattern-list": (peft_config_edit(lambda c: json.dumps({**c, "rank_pattern": [1, 2]}).encode()),
                                 "rank_pattern"),
    "manifest-modules-list": (manifest_edit(lambda m: m.update(modules=[1, 2])), "modules"),
    "manifest-init-r-text": (manifest_edit(lambda m: m.update(init_r="x")), "init_r"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_json_gets_a_clear_status_and_exit_code(world, tmp_path, capsys, name):
    server, store = world["server"], world["store"]
    writer, words = MALFORMED[name]
    folder = writer(store / f"bad-{name}", world["adapters"]["a"])
    code, message = status_of(lambda: server.client.load_adapter(f"bad-{name}"))
    assert code == PRECONDITION and words in message, message
    code, message = status_of(lambda: server.client.upload(f"up-bad-{name}", folder))
    assert code == INVALID and words in message, message
    base = ["--base-model", str(world["base_dir"])]
    for argv in (["inspect", str(folder)], ["convert", str(folder), str(tmp_path / "c"), "--to", "native", *base],
                 ["merge", str(folder), "--weights", "1", "--out", str(tmp_path / "m"), *base]):
        capsys.readouterr()
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


# ---- 10: symbolic links ------------------------------------------------------------------------------------------

def test_store_never_follows_a_symbolic_link(world, tmp_path):
    server, store = world["server"], world["store"]
    outside = tmp_path / "outside"
    save_adapter(world["adapters"]["b"], outside)
    (store / "linked").symlink_to(outside, target_is_directory=True)
    inner = store / "inner-link"
    inner.mkdir()
    (inner / FILE_NAME).symlink_to(outside / FILE_NAME)
    try:
        for adapter_id in ("linked", "inner-link"):
            code, message = status_of(lambda: server.client.generate(PROMPT, adapter_id, max_new_tokens=2))
            assert code == PRECONDITION and "symbolic link" in message, message
        listed = {a.id for a in server.client.list_adapters(include_store=True).adapters}
        assert "linked" not in listed
        code, message = status_of(lambda: server.client.upload("linked", store / "a", overwrite=True))
        assert code == PRECONDITION and "symbolic link" in message, message
        assert (store / "linked").is_symlink() and tree(outside) and not list(store.glob(".trash-*"))
        (store / ".trash-linked.0000000000000000deadbeef").symlink_to(outside, target_is_directory=True)
        config = ServerConfig(base_model=str(world["base_dir"]), adapter_dir=str(store), port=0)
        restarted = ServerThread(config)  # recovery meets the links and starts anyway
        try:
            assert restarted.client.health() == "SERVING"
            assert (outside / FILE_NAME).is_file()  # a link is removed, never what it points to
        finally:
            restarted.stop()
    finally:
        for link in [store / "linked", *store.glob(".trash-linked.*")]:
            if link.is_symlink():
                link.unlink()


# ---- no leaks ----------------------------------------------------------------------------------------------------

def _resources() -> tuple[int, int, int]:
    """(open file descriptors, threads, resident set in bytes) of this process, where the in-process server runs."""
    fds = len(os.listdir("/proc/self/fd"))
    status = Path("/proc/self/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
    return fds, threading.active_count(), rss


def test_repeated_load_unload_and_refusals_leak_nothing(world):
    """200 cycles of load, a request, unload (and a refused load of a broken folder): no descriptor, thread or
    memory growth beyond noise once warm."""
    server, store = world["server"], world["store"]
    save_adapter(world["adapters"]["a"], store / "cycle")
    (store / "cycle-broken").mkdir(exist_ok=True)
    (store / "cycle-broken" / FILE_NAME).write_bytes(b"\0" * 64)

    def cycle() -> None:
        server.client.load_adapter("cycle")
        server.client.generate(PROMPT, "cycle", max_new_tokens=2, temperature=0)
        server.client.unload_adapter("cycle")
        assert status_of(lambda: server.client.load_adapter("cycle-broken"))[0] == PRECONDITION

    for _ in range(20):  # warm: caches, thread pools, allocator arenas
        cycle()
    fds, threads, rss = _resources()
    for _ in range(200):
        cycle()
    fds2, threads2, rss2 = _resources()
    assert fds2 <= fds + 2 and threads2 <= threads + 2, (fds, fds2, threads, threads2)
    assert rss2 - rss < 64 * 1024**2, (rss, rss2)


ID_CASES = [("a", True), ("my-adapter_v2.1", True), ("0", True), ("x" * 64, True), ("x" * 65, False),
            ("Upper", False), (".hidden", False), ("-lead", False), ("a/b", False), ("..", False), ("", False),
            ("a b", False), ("a\x00", False), ("é", False), ("/etc", False)]


@pytest.mark.parametrize("adapter_id,valid", ID_CASES)
def test_adapter_ids_are_one_plain_folder_name(adapter_id, valid):
    from adalora.engine.errors import InvalidRequest
    from adalora.server.store import check_id

    if valid:
        assert check_id(adapter_id) == adapter_id
    else:
        with pytest.raises(InvalidRequest, match="must match"):
            check_id(adapter_id)
