"""The adapter store's integrity, without a server: every read is checked from the files' headers before a tensor is
read (a table of crafted files, each refused with the file, value and cap named; no pickle is ever loaded); an
upload written through server.upload gets a manifest; a crash at every step of a replacement, a leftover upload
folder and damaged manifested folders all end, once the store is opened again, with every adapter whole (old or new
version) and the damaged ones in .quarantine, byte for byte."""

import copy
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
from safetensors.torch import save_file

from adalora.adapter_file import METADATA_KEY, manifest, save_adapter, tensors_sha256, to_tensors
from adalora.config import ConfigError
from adalora.engine import AdapterEngine, EngineConfig
from adalora.peft_interop import save_peft
from adalora.server.adapter_checks import ADAPTER_FILES, AdapterLimits
from adalora.server.client import UPLOAD_FILES, file_sha256, upload_files
from adalora.server.errors import StoreConflict, StoreError
from adalora.server.manifest import MANIFEST_NAME
from adalora.server.store import QUARANTINE, STAGING_PREFIX, AdapterStore
from adalora.server.upload import Staging, UploadFile, UploadHeader, finish, prepare
from tests.conftest import tiny_llama
from tests.server_setup import write_base
from tests.factories import random_adapter

SMALL = AdapterLimits(max_header_bytes=64 * 1024, max_tensors=50, max_tensor_bytes=1024 * 1024, max_rank=8)
"""Caps the tiny adapters fit under (42 tensors of rank <= 4, a few KB) and crafted files break."""


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture
def store_root(tmp_path, base):
    root = tmp_path / "adapters"
    root.mkdir()
    return root, write_base(base, tmp_path / "base")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (dot-names included) and the bytes of each file."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def safetensors_bytes(entries: dict, data: bytes = b"", length: int | None = None) -> bytes:
    """A hand-made safetensors file: 8-byte little-endian header length (or `length`), JSON header, data."""
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def f32(n: int, begin: int = 0) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


def first_lam(tensors: dict) -> str:
    return next(name for name in sorted(tensors) if name.endswith(".lam") and tensors[name].numel())


def native_with(adapter, folder: Path, change) -> None:
    """adapter.safetensors of `adapter` with change(tensors) applied and its manifest (tensor sha256 included) made
    to match, so that only the change itself can be refused."""
    tensors = {name: t.clone() for name, t in to_tensors(adapter).items()}  # the adapter itself unchanged
    change(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter.safetensors"),
              metadata={METADATA_KEY: json.dumps(manifest(adapter, tensors), sort_keys=True)})


def nan_values(tensors: dict) -> None:
    tensors[first_lam(tensors)][0] = float("nan")


def float64(tensors: dict) -> None:
    name = first_lam(tensors)
    tensors[name] = tensors[name].double()


class Unpickled:
    """Creates `marker` when unpickled: proof that a pickle file was (or was not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


DUPLICATE_KEY = b'{"x": {"dtype":"F32","shape":[0],"data_offsets":[0,0]}, "y": 1, "x": {"dtype":"F32"}}'


def crafted(files: dict[str, bytes | str]):
    """A folder writer: these files with these contents."""
    def write(folder: Path, adapter, tmp_path: Path) -> None:
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return write


def real(kind: str, extra: dict[str, bytes | str] | None = None, change=None):
    """A folder writer: the adapter saved natively ('native', with change(tensors) applied if given) or as PEFT,
    then `extra` files written beside it (a callable value gets tmp_path)."""
    def write(folder: Path, adapter, tmp_path: Path) -> None:
        if change is not None:
            native_with(adapter, folder, change)
        else:
            (save_adapter if kind == "native" else save_peft)(adapter, folder)
        for name, data in (extra or {}).items():
            data = data(tmp_path) if callable(data) else data
            (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return write


def pickle_bomb(tmp_path: Path) -> bytes:
    return pickle.dumps(Unpickled(tmp_path / "unpickled"))


REFUSED = [  # (case, folder writer, fragment of the StoreError, refused from the headers alone)
    ("header length of 1 TiB", crafted({"adapter.safetensors": struct.pack("<Q", 1 << 40) + b"{}"}),
     "safetensors header of 1099511627776 bytes, over the cap of 65536", True),
    ("header past the end", crafted({"adapter.safetensors": safetensors_bytes({}, length=900)}),
     "runs past the end of the file", True),
    ("header not JSON", crafted({"adapter.safetensors": struct.pack("<Q", 4) + b"\xff\xfe{["}), "not JSON", True),
    ("shorter than 8 bytes", crafted({"adapter.safetensors": b"abc"}), "too short", True),
    ("a key twice", crafted({"adapter.safetensors": struct.pack("<Q", len(DUPLICATE_KEY)) + DUPLICATE_KEY}),
     "names a key twice", True),
    ("60 tensors", crafted({"adapter.safetensors": safetensors_bytes(
        {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(60)})}),
     "60 tensors, over the cap of 50", True),
    ("2 MiB of tensor data declared", crafted({"adapter.safetensors": safetensors_bytes({"head.w": f32(512 * 1024)})}),
     "2097152 bytes of tensor data, over the cap of 1048576", True),
    ("native rank 16", crafted({"adapter.safetensors": safetensors_bytes({"layers.m.lam": f32(16)}, bytes(64))}),
     "rank 16, over the cap of 8", True),
    ("PEFT rank 16", crafted({"adapter_config.json": "{}", "adapter_model.safetensors": safetensors_bytes(
        {"base_model.model.m.lora_B.weight": {"dtype": "F32", "shape": [4, 16], "data_offsets": [0, 256]}},
        bytes(256))}), "rank 16, over the cap of 8", True),
    ("int64 tensor", crafted({"adapter.safetensors": safetensors_bytes(
        {"x": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8))}), "dtype 'I64'", True),
    ("float64 factors", real("native", change=float64), "dtype 'F64'", True),
    ("offsets disagree with the shape", crafted({"adapter.safetensors": safetensors_bytes(
        {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8))}), "need 12", True),
    ("trailing bytes", crafted({"adapter.safetensors": safetensors_bytes({"x": f32(2)}, bytes(13))}),
     "trailing bytes", True),
    ("overlapping tensors", crafted({"adapter.safetensors": safetensors_bytes({"x": f32(2), "y": f32(2)}, bytes(8))}),
     "overlap", True),
    ("training checkpoint beside the adapter", real("native", {"checkpoint.pt": pickle_bomb}),
     "checkpoint.pt: pickle-format", True),
    ("PEFT .bin weights", crafted({"adapter_config.json": "{}", "adapter_model.bin": pickle.dumps([1, 2])}),
     "adapter_model.bin: pickle-format", True),
    ("pickle named adapter.safetensors", real("native", {"adapter.safetensors": pickle_bomb}),
     "over the cap of 65536", True),
    ("oversized adapter_config.json", real("peft", {"adapter_config.json": " " * (1024 * 1024 + 1)}),
     "1048577 bytes, over the cap of 1048576", True),
    ("NaN values", real("native", change=nan_values), "NaN or inf", False),
]


@pytest.mark.parametrize("case, write, fragment, from_headers", REFUSED, ids=[r[0] for r in REFUSED])
def test_reads_are_refused_with_the_file_value_and_cap_named(store_root, base, tmp_path, case, write, fragment,
                                                             from_headers):
    root, base_dir = store_root
    write(root / "x", random_adapter(base, 1), tmp_path)
    store = AdapterStore(root, base_dir, limits=SMALL)
    with pytest.raises(StoreError) as refused:
        store.read("x")
    assert "adapter 'x'" in str(refused.value) and fragment in str(refused.value), str(refused.value)
    if from_headers:  # the listing reads no tensor, yet refuses the same folder
        with pytest.raises(StoreError, match="cannot be read"):
            store.format("x")
    assert not (tmp_path / "unpickled").exists()  # no pickle was ever loaded


def test_valid_adapters_read_within_small_caps(store_root, base):
    root, base_dir = store_root
    adapter = random_adapter(base, 2)
    save_adapter(adapter, root / "native")
    save_peft(adapter, root / "peft")
    store = AdapterStore(root, base_dir, limits=SMALL)
    want = tensors_sha256(to_tensors(adapter))
    read = [store.read(adapter_id) for adapter_id in ("native", "peft")]
    assert [(r.format, r.sha256) for r in read] == [("native", want), ("peft", want)]


@pytest.mark.parametrize("field, value", [("max_header_bytes", 0), ("max_tensors", -1), ("max_rank", True),
                                          ("max_tensor_bytes", 1.5), ("dtypes", ("F32", "I64")), ("dtypes", ())])
def test_limits_are_validated(field, value):
    with pytest.raises(ConfigError, match=f"AdapterLimits.{field}"):
        AdapterLimits(**{field: value})


def test_client_sends_exactly_the_files_the_server_allows():
    assert {name for names in UPLOAD_FILES.values() for name in names} == set(ADAPTER_FILES)


# ---- uploads, manifests, crashes and recovery ------------------------------------------------------------------

@pytest.fixture
def world(store_root, base, tmp_path):
    """A store holding 'keep' (hand-placed, no manifest) and 'a' (uploaded, v1), the sources of versions 1 and 2
    of 'a', and the serving base's slots."""
    root, base_dir = store_root
    sources = tmp_path / "sources"
    save_adapter(random_adapter(base, 1), sources / "v1")
    save_peft(random_adapter(base, 2), sources / "v2")
    save_adapter(random_adapter(base, 3), root / "keep")
    serving = AdapterEngine(copy.deepcopy(base), EngineConfig(max_slots=2)).slots
    store = AdapterStore(root, base_dir)
    put(store, "a", sources / "v1", serving)
    return store, sources, serving


def header(adapter_id: str, source: Path, overwrite: bool = False) -> UploadHeader:
    files = upload_files(source)
    return UploadHeader(adapter_id, overwrite, tuple(UploadFile(f.name, f.stat().st_size, file_sha256(f))
                                                     for f in files))


def staged(store: AdapterStore, adapter_id: str, source: Path, serving, overwrite: bool = False) -> Path:
    """The staging folder of an upload of `source`, written and prepared (manifest last) but not committed,
    made by hand as the server makes it, so that nothing deletes it when the "crash" comes."""
    folder = store.root / f"{STAGING_PREFIX}{adapter_id}.{'0' * 24}"
    folder.mkdir()
    staging = Staging(folder, header(adapter_id, source, overwrite))
    for f in upload_files(source):
        staging.write(f.name, f.read_bytes())
    prepare(store, staging, serving)
    return folder


def put(store: AdapterStore, adapter_id: str, source: Path, serving, overwrite: bool = False):
    with store.staging(adapter_id) as folder:
        staging = Staging(folder, header(adapter_id, source, overwrite))
        for f in upload_files(source):
            staging.write(f.name, f.read_bytes())
        return finish(store, staging, serving)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != MANIFEST_NAME}


def sources_bytes(source: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in upload_files(source)}


def test_upload_writes_the_files_and_a_manifest_last(world):
    store, sources, _ = world
    folder = store.root / "a"
    assert files_of(folder) == sources_bytes(sources / "v1")
    listed = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    assert listed == {"adapter.safetensors": {"size": (sources / "v1" / "adapter.safetensors").stat().st_size,
                                              "sha256": file_sha256(sources / "v1" / "adapter.safetensors")}}
    assert store.ids() == ["a", "keep"] and not [p for p in store.root.iterdir() if p.name.startswith(".")]
    assert store.read("a").version == store.version("a")


CRASHES = [  # (the replacement's last step done when the process dies (None: staged, never committed), whether it
    #          died half way through deleting the old version, the version found whole afterwards)
    (None, False, "v1"), ("moved aside", False, "v1"), ("moved in", False, "v2"), ("moved in", True, "v2"),
    ("old deleted", False, "v2")]


@pytest.mark.parametrize("stop, half_deleted, survivor", CRASHES)
def test_a_crash_at_any_step_of_a_replacement_leaves_old_or_new_whole(world, stop, half_deleted, survivor):
    store, sources, serving = world
    keep = snapshot(store.root / "keep")
    folder = staged(store, "a", sources / "v2", serving, overwrite=True)
    if stop is not None:
        for step in store.commit_steps("a", folder):
            if step == stop:
                break  # the process dies here
    if half_deleted:
        trash = next(p for p in store.root.iterdir() if p.name.startswith(".trash-a."))
        next(trash.iterdir()).unlink()

    reopened = AdapterStore(store.root, store.base_model_dir)  # a restart opens the store: it recovers
    assert files_of(reopened.root / "a") == sources_bytes(sources / survivor)
    assert reopened.read("a").format == ("native" if survivor == "v1" else "peft")
    assert reopened.ids() == ["a", "keep"] and snapshot(reopened.root / "keep") == keep
    assert [p.name for p in reopened.root.iterdir() if p.name.startswith(".")] == []  # nothing left over


def test_recover_reports_what_it_repaired(world):
    store, sources, serving = world
    folder = staged(store, "a", sources / "v2", serving, overwrite=True)
    steps = store.commit_steps("a", folder)
    assert next(steps) == "moved aside"
    (store.root / f"{STAGING_PREFIX}b.{'1' * 24}").mkdir()  # an upload of a new id that never finished
    recovery = AdapterStore(store.root, store.base_model_dir, recover=False).recover()
    assert recovery.restored == ("a",)
    assert sorted(recovery.removed) == [f"{STAGING_PREFIX}a.{'0' * 24}", f"{STAGING_PREFIX}b.{'1' * 24}"]


def test_a_new_id_is_one_rename(world):
    store, sources, serving = world
    folder = staged(store, "fresh", sources / "v2", serving)
    assert list(store.commit_steps("fresh", folder)) == ["moved in"]
    assert store.read("fresh").format == "peft"


def flip_byte(folder: Path) -> None:
    path = folder / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = [  # (case, damage the manifested folder, quarantined?)
    ("a flipped byte", flip_byte, True),
    ("truncated", lambda f: (f / "adapter.safetensors").write_bytes((f / "adapter.safetensors").read_bytes()[:-9]),
     True),
    ("file deleted", lambda f: (f / "adapter.safetensors").unlink(), True),
    ("extra tensor file", lambda f: (f / "more.safetensors").write_bytes(b"x"), True),
    ("PEFT files added", lambda f: (f / "adapter_config.json").write_text("{}"), True),
    ("pickle added", lambda f: (f / "extra.bin").write_bytes(b"x"), True),
    ("manifest garbled", lambda f: (f / MANIFEST_NAME).write_text("{"), True),
    ("a note beside it", lambda f: (f / "NOTES.txt").write_text("hi"), False),
]


@pytest.mark.parametrize("case, damage, quarantined", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_manifested_folder_is_quarantined_whole(world, case, damage, quarantined):
    store, sources, _ = world
    (store.root / "broken").mkdir()  # hand-placed and unreadable, but without a manifest: left alone
    (store.root / "broken" / "adapter.safetensors").write_bytes(b"junk")
    damage(store.root / "a")
    damaged, keep = snapshot(store.root / "a"), snapshot(store.root / "keep")
    if quarantined:
        with pytest.raises(StoreError, match=f"does not match its {MANIFEST_NAME}"):  # refused before a restart
            store.read("a")

    recovery = AdapterStore(store.root, store.base_model_dir, recover=False).recover()
    ids = ["a", "broken", "keep"]
    if quarantined:
        assert len(recovery.quarantined) == 1
        where = recovery.quarantined[0]
        assert where.parent == store.root / QUARANTINE and where.name.startswith("a.")
        assert snapshot(where) == damaged  # kept byte for byte, never deleted
        ids.remove("a")
    else:
        assert recovery.quarantined == () and store.read("a").format == "native"
    assert store.ids() == ids and snapshot(store.root / "keep") == keep
    assert (store.root / "broken" / "adapter.safetensors").read_bytes() == b"junk"


def test_staging_reserves_the_id_and_cleans_up(world):
    store, sources, serving = world
    with store.staging("b") as folder:
        assert folder.is_dir() and folder.name.startswith(f"{STAGING_PREFIX}b.") and "b" not in store.ids()
        with pytest.raises(StoreConflict, match="another upload of adapter 'b' is in progress"):
            with store.staging("b"):
                pass
    assert not folder.exists()
    put(store, "b", sources / "v1", serving)  # the id is free again
    assert store.ids() == ["a", "b", "keep"]
