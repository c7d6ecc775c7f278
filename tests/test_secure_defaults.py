"""Secure by default (issue 22), over the real server: admin closed beyond loopback without credentials (an `adalora
serve --host 0.0.0.0` subprocess, its log read), the explicit opt-in and its warning, the store quota counted from
what is on disk, and the cap on uploads received at once. After every refusal the store is byte-for-byte unchanged
and inference goes on."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import grpc
import pytest

from adalora.adapter_file import save_adapter
from adalora.config import ConfigError
from adalora.server.client import AdaLoraClient, upload_files, upload_header, upload_requests
from adalora.server.config import ServerConfig
from tests.server_setup import ServerThread, status_of, until, word_tokenizer, write_base, write_store
from tests.factories import varied_llama
from tests.factories import random_adapter
from tests.test_server_e2e import Served

DENIED = grpc.StatusCode.PERMISSION_DENIED
FULL = grpc.StatusCode.RESOURCE_EXHAUSTED
PROMPT = [5, 9, 13, 7]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    base = varied_llama()
    adapters = {"a": random_adapter(base, 1), "b": random_adapter(base, 2)}
    spare = root / "spare"
    save_adapter(random_adapter(base, 3), spare)
    return {"root": root, "base_dir": write_base(base, root / "base", word_tokenizer()), "adapters": adapters,
            "spare": spare}


def fresh_store(parts, name: str) -> Path:
    return write_store(parts["root"] / name, parts["adapters"])


# ---- admin closed beyond loopback --------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_in", [False, True], ids=["no-credentials", "insecure-open-admin"])
def test_server_on_all_interfaces_without_credentials(parts, opt_in, tmp_path):
    store = fresh_store(parts, f"store-{opt_in}")
    flags = ["--host", "0.0.0.0", "--max-new-tokens", "8"] + (["--insecure-open-admin"] if opt_in else [])
    served = Served.start(f"open-{opt_in}", tmp_path, parts["base_dir"], store, ("a",), flags)
    try:
        served.wait_ready()
        log = served.log.read_text()
        with AdaLoraClient(served.target, timeout=30) as client:
            assert client.generate(PROMPT, "a", max_new_tokens=4, temperature=0).token_ids  # inference serves
            before = tree(store)
            calls = {"LoadAdapter": lambda: client.load_adapter("b"),
                     "UnloadAdapter": lambda: client.unload_adapter("a"),
                     "UploadAdapter": lambda: client.upload("c", parts["spare"])}
            if not opt_in:
                for rpc, call in calls.items():
                    code, message = status_of(call)
                    assert code == DENIED and "ADALORA_ADMIN_TOKEN" in message and rpc in message, message
                assert tree(store) == before
                assert [a.id for a in client.list_adapters().adapters] == ["a"]
                assert "admin RPCs are closed to every caller" in log and "WARNING" in log
            else:
                assert client.load_adapter("b").adapter.id == "b"
                assert client.upload("c", parts["spare"]).adapter.id == "c"
                assert "OPEN to every caller" in log and "--insecure-open-admin" in log
            assert client.generate(PROMPT, "a", max_new_tokens=4, temperature=0).token_ids
    finally:
        served.stop()


ADMIN_CASES = [  # (host, token, open admin flag, admin open without credentials?)
    ("127.0.0.1", None, False, True),
    ("localhost", None, False, True),
    ("::1", None, False, True),
    ("127.0.0.2", None, False, True),
    ("0.0.0.0", None, False, False),
    ("::", None, False, False),
    ("10.1.2.3", None, False, False),
    ("my-host.example", None, False, False),
    ("0.0.0.0", None, True, True),
    ("0.0.0.0", "tok", False, False),
]


@pytest.mark.parametrize("host,token,open_flag,expected", ADMIN_CASES)
def test_admin_policy_table(parts, host, token, open_flag, expected):
    config = ServerConfig(base_model=str(parts["base_dir"]), adapter_dir=str(parts["root"]), host=host,
                          admin_token=token, insecure_open_admin=open_flag)
    assert config.admin_open is expected


def test_open_admin_flag_with_credentials_is_a_config_error(parts):
    with pytest.raises(ConfigError, match="--insecure-open-admin"):
        ServerConfig(base_model=str(parts["base_dir"]), adapter_dir=str(parts["root"]), admin_token="t",
                     insecure_open_admin=True)


# ---- store quota and concurrent uploads --------------------------------------------------------------------------

def test_upload_past_the_store_quota_is_refused_before_any_byte_is_written(parts):
    store = fresh_store(parts, "quota")
    (store / "notes.bin").write_bytes(b"x" * 4096)  # any file on disk counts, ids or not
    on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    spare = sum(f.stat().st_size for f in upload_files(parts["spare"]))
    config = ServerConfig(base_model=str(parts["base_dir"]), adapter_dir=str(store), port=0,
                          max_store_bytes=on_disk + spare - 1)
    server = ServerThread(config)
    try:
        before = tree(store)
        code, message = status_of(lambda: server.client.upload("c", parts["spare"]))
        assert code == FULL and str(on_disk) in message and str(on_disk + spare - 1) in message, message
        assert "--max-store-bytes" in message and tree(store) == before
        (store / "notes.bin").unlink()  # room again
        assert server.client.upload("c", parts["spare"]).adapter.id == "c"
        assert server.client.generate(PROMPT, "c", max_new_tokens=3, temperature=0).token_ids
    finally:
        server.stop()


def test_uploads_beyond_the_concurrent_cap_are_refused_at_once(parts):
    store = fresh_store(parts, "concurrent")
    server = ServerThread(ServerConfig(base_model=str(parts["base_dir"]), adapter_dir=str(store), port=0,
                                       max_concurrent_uploads=1))
    try:
        files = upload_files(parts["spare"])
        first = list(upload_requests(upload_header("slow", files), files, chunk_bytes=1024))
        gate, sent = threading.Event(), queue.Queue()

        def held():  # the header and one chunk, then waits: the upload stays in flight
            yield first[0]
            yield first[1]
            sent.put(True)
            gate.wait(30)
            yield from first[2:]

        result = {}
        worker = threading.Thread(target=lambda: result.update(r=server.client.stub.UploadAdapter(held(), timeout=60)))
        worker.start()
        sent.get(timeout=30)
        assert until(lambda: any(p.name.startswith(".upload-slow") for p in store.iterdir()))
        code, message = status_of(lambda: server.client.upload("other", parts["spare"]))
        assert code == FULL and "--max-concurrent-uploads" in message, message
        assert not (store / "other").exists()
        gate.set()
        worker.join(60)
        assert result["r"].adapter.id == "slow"
        assert server.client.upload("other", parts["spare"]).adapter.id == "other"  # the slot is free again
    finally:
        server.stop()


def test_the_quota_counts_an_upload_in_flight_at_its_declared_size(parts):
    store = fresh_store(parts, "inflight")
    on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    spare = sum(f.stat().st_size for f in upload_files(parts["spare"]))
    server = ServerThread(ServerConfig(base_model=str(parts["base_dir"]), adapter_dir=str(store), port=0,
                                       max_store_bytes=on_disk + spare + spare // 2))
    try:
        files = upload_files(parts["spare"])
        requests = list(upload_requests(upload_header("first", files), files, chunk_bytes=1024))
        gate, sent = threading.Event(), queue.Queue()

        def held():
            yield requests[0]
            sent.put(True)
            gate.wait(30)
            yield from requests[1:]

        worker = threading.Thread(target=lambda: server.client.stub.UploadAdapter(held(), timeout=60))
        worker.start()
        sent.get(timeout=30)
        assert until(lambda: any(p.name.startswith(".upload-first") for p in store.iterdir()))
        code, message = status_of(lambda: server.client.upload("second", parts["spare"]))
        assert code == FULL and "--max-store-bytes" in message, message
        gate.set()
        worker.join(60)
        assert (store / "first").is_dir() and not (store / "second").exists()
    finally:
        server.stop()

