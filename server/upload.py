"""The write path of UploadAdapter: an adapter streamed in chunks becomes a store folder whole, or not at all.

    header      id, overwrite, files (plain allow-listed names, a native or a PEFT set, sizes, sha256):
                checked before any byte is written; a total over max_upload_bytes is refused at once
    chunks      written into a staging folder of the store (AdapterStore.staging), the files whole and one after
                another in the header's order; a file is refused as soon as it passes its declared size, and its
                sha256 checked (and the file fsynced) as soon as it is complete
    then        the folder is read back through the store's own validation (AdapterStore.read_folder) and checked
                against the serving base, MANIFEST.sha256.json is written last, and the folder renamed into place
                (AdapterStore.commit, crash safe)

A refused upload leaves the store as it was: the staging folder is deleted, and the id's folder (and any loaded
version) is untouched. Two uploads of one id at the same time: the second is refused at its header with ABORTED
(StoreConflict) while the first runs; retry it afterwards. The upload is not loaded.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from adalora.config import is_int
from adalora.atomic import fsync_dir
from adalora.engine.errors import AdapterExists, AdapterMismatch, InvalidRequest
from adalora.engine.slots import AdapterSlots, check_adapter
from adalora.peft_interop import BaseMismatch
from adalora.server.adapter_checks import ADAPTER_FILES, PICKLE_SUFFIXES
from adalora.server.errors import UploadTooLarge
from adalora.server.manifest import FileDigest, write_manifest
from adalora.server.store import READ_ERRORS, AdapterStore, StoredAdapter, check_id

T = TypeVar("T")

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
FILE_SETS = {"native": frozenset(n for n, f in ADAPTER_FILES.items() if f == "native"),
             "peft": frozenset(n for n, f in ADAPTER_FILES.items() if f == "peft")}
"""The file sets an upload may carry: exactly one format's files."""


@dataclass(frozen=True)
class UploadFile:
    name: str
    """A plain name from ADAPTER_FILES."""
    size: int
    """Bytes, at least 1."""
    sha256: str
    """64 lower-case hex digits."""


@dataclass(frozen=True)
class UploadHeader:
    """What an upload declares before its bytes arrive; InvalidRequest says what is wrong with it."""

    adapter_id: str
    overwrite: bool
    """Replace a stored adapter of this id (else ALREADY_EXISTS)."""
    files: tuple[UploadFile, ...]
    """In the order their bytes will arrive."""

    def __post_init__(self) -> None:
        check_id(self.adapter_id)
        for f in self.files:
            _check_file(f)
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise InvalidRequest(f"the upload declares a file twice ({sorted(names)}); declare each file once")
        if frozenset(names) not in FILE_SETS.values():
            raise InvalidRequest(f"the upload declares {sorted(names)}; upload either "
                                 f"{' + '.join(sorted(FILE_SETS['native']))} (native) or "
                                 f"{' + '.join(sorted(FILE_SETS['peft']))} (PEFT), nothing else")

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _check_file(f: UploadFile) -> None:
    if f.name not in ADAPTER_FILES:
        if f.name in ("", ".", "..") or any(c in f.name for c in "/\\\0"):
            why = "not a plain file name: files are named, never given a path"
        elif Path(f.name).suffix.lower() in PICKLE_SUFFIXES:
            why = "a pickle-format file, never accepted: save the adapter as safetensors"
        else:
            why = "not an adapter file"
        raise InvalidRequest(f"upload file name {f.name!r} is {why}; allowed: {', '.join(sorted(ADAPTER_FILES))}")
    if not is_int(f.size, 1):
        raise InvalidRequest(f"upload file {f.name}: size {f.size!r} must be a positive number of bytes")
    if not isinstance(f.sha256, str) or not SHA256_HEX.fullmatch(f.sha256):
        raise InvalidRequest(f"upload file {f.name}: sha256 {f.sha256!r} must be 64 lower-case hex digits")


class Staging:
    """One upload's files being written into its staging folder, whole and in the header's order, each one's size
    and sha256 checked against the header as its bytes arrive."""

    def __init__(self, folder: Path, header: UploadHeader) -> None:
        self.folder, self.header = folder, header
        self._index = 0
        """The file being written: header.files[_index] (== len(files) once all are complete)."""
        self._out: BinaryIO | None = None
        self._written = 0
        self._sha = hashlib.sha256()

    def _current(self) -> UploadFile | None:
        return self.header.files[self._index] if self._index < len(self.header.files) else None

    def write(self, name: str, data: bytes) -> None:
        """Append a chunk of file `name`; InvalidRequest when it is not the file due or overflows its size."""
        expected = self._current()
        if expected is None or name != expected.name:
            raise InvalidRequest(self._misplaced(name, expected))
        if self._written + len(data) > expected.size:
            raise InvalidRequest(f"upload file {name}: more than its declared {expected.size} bytes arrived; declare "
                                 f"the file's real size")
        if not data:
            return
        try:
            if self._out is None:
                self._out = open(self.folder / name, "xb")  # noqa: SIM115 - closed by _finish_file or close()
            self._out.write(data)
        except OSError as e:
            raise _disk_error(e) from e
        self._sha.update(data)
        self._written += len(data)
        if self._written == expected.size:
            self._finish_file(expected)

    def _misplaced(self, name: str, expected: UploadFile | None) -> str:
        declared = {f.name: i for i, f in enumerate(self.header.files)}
        if name not in declared:
            return f"a chunk of file {name!r}, which the upload header does not declare; declare every file first"
        if declared[name] < self._index:
            size = self.header.files[declared[name]].size
            return f"upload file {name}: more than its declared {size} bytes arrived; declare the file's real size"
        return (f"a chunk of file {name} arrived while {expected.name} has {self._written} of its {expected.size} "
                f"bytes; send the files whole, one after another in the header's order")

    def _finish_file(self, expected: UploadFile) -> None:
        out, self._out = self._out, None
        try:
            out.flush()
            os.fsync(out.fileno())
        except OSError as e:
            raise _disk_error(e) from e
        finally:
            out.close()
        got = self._sha.hexdigest()
        if got != expected.sha256:
            raise InvalidRequest(f"upload file {expected.name}: the bytes received have sha256 {got[:12]}..., the "
                                 f"header says {expected.sha256[:12]}...: corrupted in transit, or a wrong header; "
                                 f"upload it again")
        self._index, self._written, self._sha = self._index + 1, 0, hashlib.sha256()

    def complete(self) -> None:
        """Check that every declared file arrived whole, and make the folder's entries durable."""
        expected = self._current()
        if expected is not None:
            missing = [f.name for f in self.header.files[self._index + 1:]]
            rest = f", and {', '.join(missing)} never began" if missing else ""
            raise InvalidRequest(f"the upload ended with file {expected.name} at {self._written} of its "
                                 f"{expected.size} bytes{rest}; send every declared file whole")
        fsync_dir(self.folder)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _disk_error(error: OSError) -> Exception:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return UploadTooLarge(f"the adapter store's disk has no room for this upload ({error.strerror}); free space "
                              f"in --adapter-dir")
    return error


def prepare(store: AdapterStore, staging: Staging, serving: AdapterSlots) -> StoredAdapter:
    """Validate the complete staging folder as the store would read it, against the serving base, then write its
    manifest, last (blocking). The folder is then ready for AdapterStore.commit."""
    staging.complete()
    header = staging.header
    try:
        stored = store.read_folder(staging.folder, header.adapter_id)
    except BaseMismatch as e:  # a well-formed PEFT adapter of another base: as check_adapter says for native ones
        raise AdapterMismatch(f"the uploaded adapter {header.adapter_id!r} does not fit this server's base: {e}") from e
    except READ_ERRORS as e:
        raise InvalidRequest(f"the uploaded adapter {header.adapter_id!r} is refused: {e}") from e
    check_adapter(stored.adapter, serving.identity, serving.shapes)  # another base: AdapterMismatch
    write_manifest(staging.folder, {f.name: FileDigest(f.size, f.sha256) for f in header.files})
    return stored


def finish(store: AdapterStore, staging: Staging, serving: AdapterSlots) -> tuple[StoredAdapter, bool]:
    """prepare(), then move the folder into place: (the adapter as stored, whether it replaced a stored one)."""
    stored = prepare(store, staging, serving)
    return stored, store.commit(staging.header.adapter_id, staging.folder, staging.header.overwrite)


async def receive(store: AdapterStore, header: UploadHeader, chunks: AsyncIterable[tuple[str, bytes]],
                  max_bytes: int, serving: AdapterSlots) -> tuple[StoredAdapter, bool]:
    """Store the upload: (the adapter as stored, whether it replaced a stored version). `chunks` yields (file
    name, bytes); `serving` (the engine's slots) gives the base identity and module shapes the adapter must
    match. File work runs in threads."""
    if header.total_bytes > max_bytes:
        raise UploadTooLarge(f"the upload declares {header.total_bytes} bytes, over this server's limit of "
                             f"{max_bytes} (--max-upload-bytes)")
    if not header.overwrite and store.holds(header.adapter_id):
        raise AdapterExists(f"adapter {header.adapter_id!r} is already in the store; upload with overwrite=true to "
                            f"replace it")
    with store.staging(header.adapter_id, header.total_bytes) as folder:
        staging = Staging(folder, header)
        try:
            async for name, data in chunks:
                await _in_thread(staging.write, name, data)
        finally:
            staging.close()
        return await _in_thread(finish, store, staging, serving)


async def _in_thread(fn: Callable[..., T], *args) -> T:
    """fn(*args) in a worker thread. A caller cancelled meanwhile (the client went away) still waits for the
    thread to end, so the staging folder and the id's reservation outlive every write into them."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    finally:
        if not task.done():
            await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # retrieved here: the caller that would have seen it is gone
