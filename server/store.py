"""The adapter store: --adapter-dir/<id>/ holds one adapter (native or PEFT, detected) per id.

A client names an adapter by id only, never by path: ids match ID_PATTERN, so an id is always one plain
folder name directly under the store. Each read reports two digests:
  sha256   the adapter's tensors (names, dtypes, shapes, bytes), as `adalora inspect` prints it;
  version  the folder's files (names and bytes; the manifest excluded): any edited file, config included, is a
           new version.

Every read is validated before it can serve: the folder's files and safetensors headers against AdapterLimits
(server.adapter_checks, before any tensor is read), its manifest if it has one (server.manifest), then the
format's own reader (shapes, finite values, tensor sha256).

Names in the store that start with '.' are never ids:
  .upload-<id>.<token>/     an upload being written (server.upload); a leftover one is deleted at startup
  .trash-<id>.<token>/      the old version of <id> during its replacement by an upload
  .quarantine/<id>.<time>/  a folder that no longer matched its manifest at startup (kept, never deleted)
One server process writes to a store at a time (opening a store deletes the upload folders in it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from adalora import peft_interop
from adalora.adapter import Adapter
from adalora.adapter_file import AdapterFormatError, tensors_sha256, to_tensors
from adalora.atomic import fsync_dir
from adalora.engine.errors import AdapterExists, AdapterNotFound, InvalidRequest
from adalora.server.adapter_checks import SAFETENSORS_FILES, AdapterLimits, AdapterRejected, check_folder, check_safetensors
from adalora.server.errors import StoreConflict, StoreError, StoreFull
from adalora.server.manifest import MANIFEST_NAME, folder_digests, has_manifest, manifest_problems, version_of

log = logging.getLogger("adalora.store")

STAGING_PREFIX = ".upload-"
TRASH_PREFIX = ".trash-"
QUARANTINE = ".quarantine"
READ_ERRORS = (AdapterFormatError, AdapterRejected, OSError)
"""What reading an adapter folder raises for a folder that cannot be served."""

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""Lower-case letters, digits, '.', '_', '-'; starts with a letter or digit; at most 64 characters."""


def check_id(adapter_id: object) -> str:
    if not isinstance(adapter_id, str) or not ID_PATTERN.fullmatch(adapter_id):
        raise InvalidRequest(f"adapter id {adapter_id!r} must match ^{ID_PATTERN.pattern}$ (lower-case letters, "
                             f"digits, '.', '_', '-'; at most 64 characters; no path)")
    return adapter_id


@dataclass(frozen=True)
class StoredAdapter:
    """One adapter as read from the store."""

    id: str
    format: str
    """'native' or 'peft'."""
    adapter: Adapter
    sha256: str
    version: str


@dataclass(frozen=True)
class Recovery:
    """What AdapterStore.recover() found and did."""

    removed: tuple[str, ...] = ()
    """Leftover folders deleted: uploads that never finished, old versions of replacements that did."""
    restored: tuple[str, ...] = ()
    """Ids whose replacement stopped before the new version arrived: the old version is back in place."""
    quarantined: tuple[Path, ...] = ()
    """Where the folders that did not match their manifest now are."""


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (or of the file itself); symbolic links count as nothing."""
    try:
        if path.is_symlink():
            return 0
        if path.is_file():
            return path.stat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    except OSError:  # removed while it was walked
        return 0


def _real_dir(path: Path) -> bool:
    """A directory that is not a symbolic link (the store never follows one)."""
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    """Delete a leftover folder, or only the link if it is a symbolic link (never what a link points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


def _recovered(action, what: str) -> bool:
    """Run one start-up repair; a failure is logged and skipped, so recovery never blocks start-up."""
    try:
        action()
        return True
    except OSError as e:
        log.error("store recovery: %s failed (%s); left as it is", what, e)
        return False


def check_no_links(folder: Path) -> None:
    """AdapterRejected when the folder, or anything in it, is a symbolic link: the store never reads through one."""
    links = [p for p in [folder, *folder.rglob("*")] if p.is_symlink()]
    if links:
        name = links[0].name if links[0] != folder else folder.name
        raise AdapterRejected(f"adapter folder {folder.name!r} holds a symbolic link ({name}); the store never "
                              f"follows links: put the real files there")


def _token() -> str:
    """Unique, and sortable by creation time: 16 hex digits of nanoseconds, then 8 random ones."""
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


TRASH_NAME = re.compile(rf"{re.escape(TRASH_PREFIX)}(?P<id>{ID_PATTERN.pattern})\.(?P<token>[0-9a-f]{{24}})")


class AdapterStore:
    """Reads adapters by id from `root`, each validated within `limits` before it can serve; PEFT folders get
    their base identity from `base_model_dir`. Opening a store recovers it first (recover()) unless
    recover=False. Uploads write through staging() and commit()."""

    def __init__(self, root: str | Path, base_model_dir: str | Path, limits: AdapterLimits = AdapterLimits(),
                 recover: bool = True, max_bytes: int = 0, max_uploads: int = 4) -> None:
        self.root, self.base_model_dir, self.limits = Path(root), Path(base_model_dir), limits
        self.max_bytes, self.max_uploads = max_bytes, max_uploads
        """Quota of the whole store in bytes (0 = none), and uploads received at once."""
        self._reserved: dict[Path, int] = {}
        """Staging folder -> the bytes its upload declared: counted at that size until it is done."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"adapter store {self.root}: no such directory; create it and put one folder "
                                    f"per adapter id in it")
        self._lock = threading.Lock()
        self._claimed: set[str] = set()
        """Ids an upload is being received for: one upload per id at a time."""
        self._swaps: Counter[str] = Counter()
        """Per id, bumped before and after each replacement (odd while one is under way), so a read can tell."""
        if recover:
            self.recover()

    def ids(self) -> list[str]:
        """Ids of the folders in the store (names that are not valid ids, and symbolic links, are skipped)."""
        return sorted(p.name for p in self.root.iterdir() if _real_dir(p) and ID_PATTERN.fullmatch(p.name))

    def holds(self, adapter_id: str) -> bool:
        """Whether `adapter_id` is a valid id with a folder (not a link) in the store (never raises)."""
        return bool(ID_PATTERN.fullmatch(adapter_id)) and _real_dir(self.root / adapter_id)

    def folder(self, adapter_id: str) -> Path:
        """The id's folder, which every read goes through; a symbolic link, the folder or one in it, is refused (the
        store never follows a link out of itself)."""
        folder = self.root / check_id(adapter_id)
        if folder.is_symlink():
            raise StoreError(f"adapter {adapter_id!r} is a symbolic link in the store, which is never followed; "
                             f"the operator must put a real folder there")
        if not folder.is_dir():
            raise AdapterNotFound(f"adapter {adapter_id!r} is not in the store: upload it, or list the stored ids "
                                  f"with ListAdapters(include_store=true)")
        try:
            check_no_links(folder)  # every read of a store folder comes through here, the version's digest too
        except AdapterRejected as e:
            raise StoreError(f"adapter {adapter_id!r} in the store cannot be read: {e}") from e
        return folder

    def format(self, adapter_id: str) -> str:
        """'native' or 'peft', from the folder's files and safetensors headers (no tensor is read)."""
        folder = self.folder(adapter_id)
        try:
            return self._checked_format(folder)
        except READ_ERRORS as e:
            raise StoreError(f"adapter {adapter_id!r} in the store cannot be read: {e}") from e

    def version(self, adapter_id: str) -> str:
        """sha256 over the folder's file names and contents, the manifest excluded (server.manifest.version_of)."""
        with self._steady(adapter_id):
            return version_of(folder_digests(self.folder(adapter_id)))

    def read(self, adapter_id: str) -> StoredAdapter:
        """Read and validate the adapter (StoreError says why a folder cannot be served)."""
        with self._steady(adapter_id):
            folder = self.folder(adapter_id)
            try:
                return self.read_folder(folder, adapter_id)
            except READ_ERRORS as e:
                raise StoreError(f"adapter {adapter_id!r} in the store cannot be read: {e}") from e

    def read_folder(self, folder: Path, adapter_id: str) -> StoredAdapter:
        """Validate and read the adapter in `folder` (a store folder, or an upload's staging folder) as
        `adapter_id`: its manifest if it has one, its files' headers within self.limits, then the format's reader.
        Raises one of READ_ERRORS for a folder that cannot be served."""
        digests = folder_digests(folder)
        problems = manifest_problems(folder, digests)
        if problems:
            raise AdapterRejected(f"{folder} does not match its {MANIFEST_NAME} ({'; '.join(problems[:3])}): the "
                                  f"folder is corrupt; upload the adapter again (a restart moves it to {QUARANTINE}/)")
        fmt = self._checked_format(folder)
        adapter = peft_interop.load_any(folder, base_model_dir=self.base_model_dir)
        return StoredAdapter(adapter_id, fmt, adapter, tensors_sha256(to_tensors(adapter)), version_of(digests))

    def _checked_format(self, folder: Path) -> str:
        check_folder(folder, self.limits)
        for name in SAFETENSORS_FILES:
            if (folder / name).is_file():
                check_safetensors(folder / name, self.limits)
        return peft_interop.detect_format(folder)

    @contextlib.contextmanager
    def _steady(self, adapter_id: str) -> Iterator[None]:
        """Raise StoreConflict when an upload replaces `adapter_id` while the block reads it."""
        before = self._swaps[adapter_id]
        conflict = StoreConflict(f"adapter {adapter_id!r} was being replaced by an upload while it was read; retry")
        if before % 2:
            raise conflict
        try:
            yield
        except Exception as e:
            if self._swaps[adapter_id] != before:
                raise conflict from e
            raise
        if self._swaps[adapter_id] != before:
            raise conflict

    # ---- uploads --------------------------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes the store holds: every file under it (links not followed), an upload in flight at its declared
        size instead of what it has written so far."""
        staging = set(self._reserved)
        total = sum(self._reserved.values())
        for entry in self.root.iterdir():
            if entry not in staging:
                total += _tree_bytes(entry)
        return total

    @contextlib.contextmanager
    def staging(self, adapter_id: str, size: int = 0) -> Iterator[Path]:
        """Reserve `adapter_id` and `size` bytes of the quota for one upload and yield a new empty folder in the
        store to write it into (.upload-<id>.<token>, never listed as an id); it is deleted on exit unless commit()
        moved it into place. Refused before anything is written: another upload of the id meanwhile (StoreConflict,
        ABORTED); max_uploads already receiving, or `size` past the quota (StoreFull, RESOURCE_EXHAUSTED)."""
        check_id(adapter_id)
        folder = self.root / f"{STAGING_PREFIX}{adapter_id}.{_token()}"
        with self._lock:
            if adapter_id in self._claimed:
                raise StoreConflict(f"another upload of adapter {adapter_id!r} is in progress; retry once it has "
                                    f"finished")
            if len(self._claimed) >= self.max_uploads:
                raise StoreFull(f"{len(self._claimed)} uploads are already being received, this server's limit "
                                f"(--max-concurrent-uploads {self.max_uploads}); retry shortly")
            if self.max_bytes:
                used = self.used_bytes()
                if used + size > self.max_bytes:
                    raise StoreFull(f"the store holds {used} bytes (uploads in flight included); this upload of "
                                    f"{size} bytes would pass its quota of {self.max_bytes} (--max-store-bytes): "
                                    f"remove adapters from the store or raise the quota")
            self._claimed.add(adapter_id)
            self._reserved[folder] = size
        try:
            folder.mkdir()
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            with self._lock:
                self._claimed.discard(adapter_id)
                self._reserved.pop(folder, None)

    def commit(self, adapter_id: str, staged: Path, overwrite: bool) -> bool:
        """Move the complete folder `staged` (from staging()) into place as `adapter_id`; returns whether it
        replaced a stored version. A stored id without `overwrite`: AdapterExists. Crash safe (commit_steps)."""
        with self._lock:
            if (self.root / adapter_id).is_symlink():
                raise StoreError(f"adapter {adapter_id!r} is a symbolic link in the store, which is never replaced "
                                 f"through; the operator must remove the link first")
            replacing = (self.root / adapter_id).exists()
            if replacing and not overwrite:
                raise AdapterExists(f"adapter {adapter_id!r} is already in the store; upload with overwrite=true to "
                                    f"replace it")
            self._swaps[adapter_id] += 1
            try:
                for _ in self.commit_steps(adapter_id, staged):
                    pass
            finally:
                self._swaps[adapter_id] += 1
        return replacing

    def commit_steps(self, adapter_id: str, staged: Path) -> Iterator[str]:
        """The renames of a commit, each made durable (fsync of the store folder) before the next. A new id is one
        rename. A replacement moves the old folder aside to .trash-<id>.<token> (a crash now: recover() moves it
        back), renames the new one into place (a crash now: recover() deletes the old one), then deletes the old
        one. Yields the name of each step once it is done, so a test can stop part way, as a crash would."""
        target = self.root / adapter_id
        if not target.exists():
            os.rename(staged, target)
            fsync_dir(self.root)
            yield "moved in"
            return
        trash = self.root / f"{TRASH_PREFIX}{adapter_id}.{_token()}"
        os.rename(target, trash)
        fsync_dir(self.root)
        yield "moved aside"
        try:
            os.rename(staged, target)
        except OSError:
            os.rename(trash, target)
            raise
        fsync_dir(self.root)
        yield "moved in"
        _remove(trash)
        yield "old deleted"

    # ---- startup --------------------------------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Repair what a crash can leave behind, then quarantine the folders that no longer match their manifest:
          .trash-<id>.<token>  a replacement of <id> that stopped part way: without a folder <id> the new version
                               never arrived and the old one (the newest, if several) is moved back; otherwise the
                               replacement was done and the old one is deleted;
          .upload-*            an upload that never finished: deleted;
          <id>/ with a manifest that a file no longer matches (changed, missing, or an adapter file added): moved
                               whole to .quarantine/<id>.<UTC time>/ and logged, never deleted.
        Folders without a manifest are left as they are; they are validated when read."""
        removed, restored = [], []
        entries = sorted(self.root.iterdir())  # a trash token starts with its time: oldest first per id
        for path in entries:
            if path.is_symlink():
                log.error("store entry %s is a symbolic link: the store never follows or serves it; replace it with "
                          "a real folder", path.name)
        trash: dict[str, list[Path]] = {}
        for path in entries:
            match = TRASH_NAME.fullmatch(path.name)
            if match and (path.is_dir() or path.is_symlink()):
                trash.setdefault(match["id"], []).append(path)
        for adapter_id, folders in trash.items():
            target = self.root / adapter_id
            if not target.exists() and not target.is_symlink() and _real_dir(folders[-1]):
                if _recovered(lambda: os.rename(folders[-1], target), f"restoring {folders[-1].name}"):
                    folders.pop()
                    restored.append(adapter_id)
                    log.warning("adapter %r: its replacement by an upload was interrupted; the old version is back",
                                adapter_id)
            for folder in folders:
                if _recovered(lambda f=folder: _remove(f), f"deleting {folder.name}"):
                    removed.append(folder.name)
        for path in entries:
            if path.name.startswith(STAGING_PREFIX) and (path.is_dir() or path.is_symlink()):
                if _recovered(lambda p=path: _remove(p), f"deleting {path.name}"):
                    removed.append(path.name)
                    log.warning("deleted %s: an upload that never finished", path.name)
        fsync_dir(self.root)
        quarantined = []
        for adapter_id in self.ids():
            folder = self.root / adapter_id
            try:
                problems = manifest_problems(folder, folder_digests(folder)) if has_manifest(folder) else []
                if problems:
                    quarantined.append(self._quarantine(folder, problems))
            except (OSError, ValueError) as e:  # never blocks start-up: the folder is refused when read instead
                log.error("adapter %r could not be checked at start-up (%s); it is validated when read",
                          adapter_id, e)
        return Recovery(tuple(removed), tuple(restored), tuple(quarantined))

    def _quarantine(self, folder: Path, problems: list[str]) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.root / QUARANTINE / f"{folder.name}.{stamp}"
        target.parent.mkdir(exist_ok=True)
        os.rename(folder, target)
        fsync_dir(self.root)
        fsync_dir(target.parent)
        log.error("adapter %r does not match its %s (%s): moved to %s; upload it again", folder.name, MANIFEST_NAME,
                  "; ".join(problems), target)
        return target
