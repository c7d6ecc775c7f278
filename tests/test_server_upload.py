"""UploadAdapter over a real in-process server on port 0 with a tiny random Llama: an upload (native or PEFT) then
LoadAdapter serves exactly what the same adapter serves when its folder is placed in the store by hand; overwrite
replaces atomically while the loaded version keeps serving until a reload; a table of refused uploads (bytes that
do not match the header, names, pickle, header caps, dtype, NaN, another base, the size limit, stream order), each
with its status code and the store, byte for byte, and what it serves unchanged; concurrent uploads of one id;
admin credentials; `adalora upload`; and a restart after a crash that serves every adapter whole."""

import hashlib
import pickle
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from transformers import LlamaForCausalLM

from adalora import cli
from adalora.adapter_file import save_adapter, tensors_sha256, to_tensors
from adalora.peft_interop import save_peft
from adalora.server.client import AdaLoraClient
from adalora.server.config import ServerConfig
from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from adalora.server.manifest import MANIFEST_NAME
from adalora.server.store import QUARANTINE, STAGING_PREFIX, TRASH_PREFIX
from tests.conftest import tiny_llama_config
from tests.server_setup import ServerThread, status_of, word_tokenizer, write_base, write_store
from tests.factories import varied_llama
from tests.factories import random_adapter
from tests.test_store_integrity import Unpickled, float64, nan_values, native_with, snapshot

TOKEN = "upload-token"
PROMPT = [5, 6, 7, 8]
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A server (admin token, 3 MiB upload limit) whose store holds 'a' (loaded) and 'b-disk' (adapter b placed
    by hand), and source folders to upload: 'a', 'b', 'b-peft' (b as PEFT), 'alien' (another base's), 'alien-peft', 'f64', 'nan'."""
    root = tmp_path_factory.mktemp("upload")
    base = varied_llama()
    other = tiny_llama_config()
    other.num_hidden_layers = 3  # another base: same module shapes, another identity
    adapters = {"a": random_adapter(base, 1), "b": random_adapter(base, 2),
                "alien": random_adapter(LlamaForCausalLM(other), 5)}
    sources = root / "sources"
    for name in ("a", "b", "alien"):
        save_adapter(adapters[name], sources / name)
    save_peft(adapters["b"], sources / "b-peft")
    save_peft(adapters["alien"], sources / "alien-peft")
    native_with(adapters["b"], sources / "f64", float64)
    native_with(adapters["b"], sources / "nan", nan_values)
    store = write_store(root / "adapters", {"a": adapters["a"], "b-disk": adapters["b"]})
    config = ServerConfig(base_model=str(write_base(base, root / "base", word_tokenizer())), adapter_dir=str(store),
                          port=0, max_slots=16, max_new_tokens=64, admin_token=TOKEN, max_upload_bytes=3 * 1024 * 1024)
    server = ServerThread(config)
    admin = AdaLoraClient(server.target, timeout=30, admin_token=TOKEN)
    admin.load_adapter("a")
    yield SimpleNamespace(server=server, admin=admin, store=store, sources=sources, adapters=adapters)
    admin.close()
    server.stop()


def tokens(client: AdaLoraClient, adapter_id: str) -> list[int]:
    return list(client.generate(PROMPT, adapter_id, max_new_tokens=8, temperature=0).token_ids)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def requests(adapter_id: str, files: dict[str, bytes], overwrite: bool = True, sizes: dict | None = None,
             shas: dict | None = None, chunk: int = 64 * 1024) -> list[pb.UploadAdapterRequest]:
    """A whole upload stream, with a header that declares `sizes` / `shas` where given instead of the true ones."""
    declared = [pb.UploadFile(name=n, size=(sizes or {}).get(n, len(d)), sha256=(shas or {}).get(n, sha(d)))
                for n, d in files.items()]
    header = pb.UploadAdapterRequest(header=pb.UploadHeader(id=adapter_id, overwrite=overwrite, files=declared))
    return [header, *(pb.UploadAdapterRequest(chunk=pb.UploadChunk(name=n, data=d[i:i + chunk]))
                      for n, d in files.items() for i in range(0, len(d), chunk))]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != MANIFEST_NAME}


def upload_metric(world, adapter_id: str, status: str) -> float | None:
    return world.server.server.metrics.registry.get_sample_value(
        "adalora_requests_total", {"rpc": "UploadAdapter", "adapter": adapter_id, "status": status})


@pytest.mark.parametrize("adapter_id, source, fmt", [("up-native", "b", "native"), ("up-peft", "b-peft", "peft")])
def test_upload_then_load_serves_what_the_same_folder_serves_from_disk(world, adapter_id, source, fmt):
    w = world
    reply = w.admin.upload(adapter_id, w.sources / source)
    info = reply.adapter
    assert not reply.replaced and (info.id, info.residency, info.format) == (adapter_id, pb.RESIDENCY_DISK, fmt)
    assert info.sha256 == tensors_sha256(to_tensors(w.adapters["b"])) and len(info.version) == 64
    assert files_of(w.store / adapter_id) == files_of(w.sources / source)  # byte for byte, plus a manifest
    assert (w.store / adapter_id / MANIFEST_NAME).is_file()
    assert w.admin.get_adapter(adapter_id).version == info.version

    loaded = w.admin.load_adapter(adapter_id)
    assert loaded.adapter.version == info.version and loaded.adapter.residency == pb.RESIDENCY_DEVICE
    w.admin.load_adapter("b-disk")
    assert tokens(w.admin, adapter_id) == tokens(w.admin, "b-disk") != tokens(w.admin, "a")
    assert upload_metric(w, adapter_id, "OK") == 1


def test_overwrite_replaces_atomically_and_the_loaded_version_serves_until_reload(world):
    w = world
    first = w.admin.upload("over", w.sources / "a")
    w.admin.load_adapter("over")
    old = tokens(w.admin, "over")
    assert old == tokens(w.admin, "a")
    code, details = status_of(lambda: w.admin.upload("over", w.sources / "b"))
    assert code == Code.ALREADY_EXISTS and "overwrite=true" in details

    second = w.admin.upload("over", w.sources / "b-peft", overwrite=True)
    assert second.replaced and second.adapter.version != first.adapter.version
    assert (second.adapter.residency, second.adapter.format) == (pb.RESIDENCY_DISK, "peft")  # v1 is what is loaded
    assert files_of(w.store / "over") == files_of(w.sources / "b-peft")
    assert [p.name for p in w.store.iterdir() if p.name.startswith(".")] == []  # no staging or trash left
    assert tokens(w.admin, "over") == old  # still the loaded version

    code, details = status_of(lambda: w.admin.load_adapter("over"))
    assert code == Code.ALREADY_EXISTS and "reload=true" in details
    assert not w.admin.load_adapter("over", reload=True).already_loaded
    w.admin.load_adapter("b-disk")
    assert tokens(w.admin, "over") == tokens(w.admin, "b-disk") != old

    again = w.admin.upload("over", w.sources / "b-peft", overwrite=True)  # the same files once more
    assert again.replaced and again.adapter.version == second.adapter.version
    assert again.adapter.residency == pb.RESIDENCY_DEVICE  # exactly this version is loaded


def native(w, source: str = "b") -> dict[str, bytes]:
    return {"adapter.safetensors": (w.sources / source / "adapter.safetensors").read_bytes()}


def peft(w, source: str = "b-peft") -> dict[str, bytes]:
    return {name: (w.sources / source / name).read_bytes() for name in ("adapter_config.json",
                                                                       "adapter_model.safetensors")}


def corrupted(w):
    good = native(w)["adapter.safetensors"]
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    return requests("a", {"adapter.safetensors": bytes(bad)}, shas={"adapter.safetensors": sha(good)})


def named(name: str):
    return lambda w: requests("a", {name: native(w)["adapter.safetensors"]})


def zero_tensors(n: int) -> bytes:
    header = ("{" + ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n)) +
              "}").encode()
    return struct.pack("<Q", len(header)) + header


def out_of_order(w):
    header, *chunks = requests("a", peft(w))
    return [header, *reversed(chunks)]  # adapter_model.safetensors (one chunk) before adapter_config.json


ADAPTER = "adapter.safetensors"
REFUSED = [  # (case, the stream, status, fragment of the details)
    ("corrupted chunk", corrupted, Code.INVALID_ARGUMENT, "the header says"),
    ("more bytes than declared", lambda w: requests("a", native(w), sizes={ADAPTER: len(native(w)[ADAPTER]) - 10}),
     Code.INVALID_ARGUMENT, "more than its declared"),
    ("stream ends early", lambda w: requests("a", native(w), chunk=4096)[:-1], Code.INVALID_ARGUMENT,
     "the upload ended with file adapter.safetensors"),
    ("parent path", named("../adapter.safetensors"), Code.INVALID_ARGUMENT, "not a plain file name"),
    ("sub folder", named("sub/adapter.safetensors"), Code.INVALID_ARGUMENT, "not a plain file name"),
    ("absolute path", named("/etc/passwd"), Code.INVALID_ARGUMENT, "not a plain file name"),
    ("not an adapter file", named("report.json"), Code.INVALID_ARGUMENT, "not an adapter file"),
    ("pickle weights", lambda w: requests("a", {"adapter_config.json": b"{}", "adapter_model.bin": pickle.dumps(
        Unpickled(w.store / "unpickled"))}), Code.INVALID_ARGUMENT, "pickle-format file, never accepted"),
    ("pickle named adapter.safetensors", lambda w: requests("a", {ADAPTER: pickle.dumps(
        Unpickled(w.store / "unpickled"))}), Code.INVALID_ARGUMENT, "over the cap of 8388608"),
    ("header length of 1 TiB", lambda w: requests("a", {ADAPTER: struct.pack("<Q", 1 << 40) + b"{}"}),
     Code.INVALID_ARGUMENT, "safetensors header of 1099511627776 bytes, over the cap of 8388608"),
    ("20000 tensors", lambda w: requests("a", {ADAPTER: zero_tensors(20000)}), Code.INVALID_ARGUMENT,
     "20000 tensors, over the cap of 16384"),
    ("float64 tensor", lambda w: requests("a", native(w, "f64")), Code.INVALID_ARGUMENT, "dtype 'F64'"),
    ("NaN values", lambda w: requests("a", native(w, "nan")), Code.INVALID_ARGUMENT, "NaN or inf"),
    ("another base's adapter", lambda w: requests("a", native(w, "alien")), Code.FAILED_PRECONDITION,
     "trained on base"),
    ("another base's PEFT adapter", lambda w: requests("a", peft(w, "alien-peft")), Code.FAILED_PRECONDITION,
     "does not fit this server's base"),
    ("native and PEFT files together", lambda w: requests("a", {**native(w), **peft(w)}), Code.INVALID_ARGUMENT,
     "upload either"),
    ("over --max-upload-bytes", lambda w: requests("a", native(w), sizes={ADAPTER: 4 * 1024 * 1024}),
     Code.RESOURCE_EXHAUSTED, "over this server's limit of 3145728"),
    ("stored id without overwrite", lambda w: requests("a", native(w), overwrite=False), Code.ALREADY_EXISTS,
     "overwrite=true"),
    ("bad id", lambda w: requests("../a", native(w)), Code.INVALID_ARGUMENT, "must match"),
    ("sha256 not hex", lambda w: requests("a", native(w), shas={ADAPTER: "Z" * 64}), Code.INVALID_ARGUMENT,
     "64 lower-case hex"),
    ("no header first", lambda w: requests("a", native(w))[1:], Code.INVALID_ARGUMENT, "starts with a header"),
    ("empty stream", lambda w: [], Code.INVALID_ARGUMENT, "starts with a header"),
    ("a second header", lambda w: [*requests("a", native(w)), requests("a", native(w))[0]], Code.INVALID_ARGUMENT,
     "one header"),
    ("undeclared file", lambda w: [*requests("a", native(w)), *requests("a", peft(w))[1:2]], Code.INVALID_ARGUMENT,
     "does not declare"),
    ("files out of order", out_of_order, Code.INVALID_ARGUMENT, "in the header's order"),
]


@pytest.mark.parametrize("case, build, code, fragment", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_uploads_change_nothing(world, case, build, code, fragment):
    w = world
    before, served, version = snapshot(w.store), tokens(w.admin, "a"), w.admin.get_adapter("a").version
    got, details = status_of(lambda: w.admin.stub.UploadAdapter(iter(build(w)), timeout=30, metadata=w.admin.admin))
    assert got == code and fragment in details, details
    assert snapshot(w.store) == before  # the old version byte for byte on disk, nothing left over, nothing unpickled
    assert tokens(w.admin, "a") == served and w.admin.get_adapter("a").version == version


def test_concurrent_uploads_of_one_id_one_wins_the_other_is_aborted(world):
    w = world
    release, result = threading.Event(), {}
    stream = requests("race", native(w), overwrite=False)

    def held():  # the header, then nothing until released
        yield stream[0]
        release.wait(30)
        yield from stream[1:]

    def first():
        result["reply"] = w.admin.stub.UploadAdapter(held(), timeout=30, metadata=w.admin.admin)

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 10
    while not any(p.name.startswith(f"{STAGING_PREFIX}race.") for p in w.store.iterdir()):
        assert time.monotonic() < deadline, "the first upload never started writing"
        time.sleep(0.01)
    code, details = status_of(lambda: w.admin.upload("race", w.sources / "a", overwrite=True))
    release.set()
    thread.join(30)
    assert code == Code.ABORTED and "in progress" in details
    assert result["reply"].adapter.sha256 == w.admin.get_adapter("race").sha256 == \
        tensors_sha256(to_tensors(w.adapters["b"]))


@pytest.mark.parametrize("token, code", [(None, Code.UNAUTHENTICATED), ("wrong", Code.PERMISSION_DENIED)])
def test_upload_needs_admin_credentials(world, token, code):
    w = world
    before = snapshot(w.store)
    with AdaLoraClient(w.server.target, timeout=30, admin_token=token) as client:
        got, details = status_of(lambda: client.upload("sneaky", w.sources / "b"))
    assert got == code and "UploadAdapter" in details
    assert snapshot(w.store) == before


def test_cli_upload(world, capsys):
    w = world
    argv = ["upload", "--server", w.server.target, "--id", "cli-up", "--admin-token", TOKEN, str(w.sources / "b-peft")]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("stored cli-up (peft, version ")
    assert cli.main(argv) == 2
    assert "ALREADY_EXISTS" in capsys.readouterr().err
    assert cli.main([*argv[:-1], str(w.sources / "missing")]) == 2
    assert "no adapter to upload" in capsys.readouterr().err


def test_a_restart_after_a_crash_serves_every_adapter_whole(tmp_path):
    base = varied_llama()
    adapters = {"x": random_adapter(base, 1), "y": random_adapter(base, 2)}
    for name, adapter in adapters.items():
        save_adapter(adapter, tmp_path / "sources" / name)
    store = tmp_path / "adapters"
    store.mkdir()
    config = ServerConfig(base_model=str(write_base(base, tmp_path / "base", word_tokenizer())),
                          adapter_dir=str(store), port=0)
    server = ServerThread(config)
    try:
        for name in adapters:
            server.client.upload(name, tmp_path / "sources" / name)
            server.client.load_adapter(name)
        want = {name: tokens(server.client, name) for name in adapters}
        version_x = server.client.get_adapter("x").version
    finally:
        server.stop()
    token = "0" * 16 + "ab12cd34"
    (store / "x").rename(store / f"{TRASH_PREFIX}x.{token}")  # died replacing x: the old version moved aside
    (store / f"{STAGING_PREFIX}x.{token}").mkdir()  # ... and the new one half written
    (store / f"{STAGING_PREFIX}x.{token}" / "adapter.safetensors").write_bytes(b"half")
    damaged = bytearray((store / "y" / "adapter.safetensors").read_bytes())
    damaged[-5] ^= 0x10  # y rotted on disk
    (store / "y" / "adapter.safetensors").write_bytes(bytes(damaged))

    server = ServerThread(config)  # opening the store recovers it
    try:
        listing = server.client.list_adapters(include_store=True).adapters
        assert [a.id for a in listing] == ["x"]
        assert server.client.get_adapter("x").version == version_x
        server.client.load_adapter("x")
        assert tokens(server.client, "x") == want["x"]
        assert [p.name for p in store.iterdir() if p.name.startswith(".")] == [QUARANTINE]
        [kept] = (store / QUARANTINE).iterdir()
        assert kept.name.startswith("y.") and (kept / "adapter.safetensors").read_bytes() == bytes(damaged)
        assert not server.client.upload("y", tmp_path / "sources" / "y").replaced  # upload it again
        server.client.load_adapter("y")
        assert tokens(server.client, "y") == want["y"]
    finally:
        server.stop()
