"""The adapter store: --adapter-dir/<id>/ holds one adapter (native or PEFT, detected) per id.

A client names an adapter by id only, never by path: ids match ID_PATTERN, so an id is always one plain
folder name directly under the store. Each read reports two digests:
  sha256   the adapter's tensors (names, dtypes, shapes, bytes), as `adalora inspect` prints it;
  version  the folder's files (names and bytes): any edited file, config included, is a new version.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from adalora_runtime import peft_interop
from adalora_runtime.adapter import Adapter
from adalora_runtime.adapter_file import AdapterFormatError, tensors_sha256, to_tensors
from adalora_runtime.engine.errors import AdapterNotFound, InvalidRequest
from server.errors import StoreError

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


class AdapterStore:
    """Reads adapters by id from `root`; PEFT folders get their base identity from `base_model_dir`."""

    def __init__(self, root: str | Path, base_model_dir: str | Path) -> None:
        self.root, self.base_model_dir = Path(root), Path(base_model_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"adapter store {self.root}: no such directory; create it and put one folder "
                                    f"per adapter id in it")

    def ids(self) -> list[str]:
        """Ids of the folders in the store (names that are not valid ids are skipped)."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and ID_PATTERN.fullmatch(p.name))

    def holds(self, adapter_id: str) -> bool:
        """Whether `adapter_id` is a valid id with a folder in the store (never raises)."""
        return bool(ID_PATTERN.fullmatch(adapter_id)) and (self.root / adapter_id).is_dir()

    def folder(self, adapter_id: str) -> Path:
        folder = self.root / check_id(adapter_id)
        if not folder.is_dir():
            raise AdapterNotFound(f"adapter {adapter_id!r} is not in the store {self.root}: put its folder (native or "
                                  f"PEFT) at {folder}, or pick one of {self.ids()}")
        return folder

    def format(self, adapter_id: str) -> str:
        folder = self.folder(adapter_id)
        try:
            return peft_interop.detect_format(folder)
        except (peft_interop.InteropError, AdapterFormatError, FileNotFoundError) as e:
            raise StoreError(f"adapter {adapter_id!r} in the store cannot be read: {e}") from e

    def version(self, adapter_id: str) -> str:
        """sha256 of the folder's file names and bytes (sorted by name)."""
        digest = hashlib.sha256()
        for file in sorted(p for p in self.folder(adapter_id).rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(self.root / adapter_id).as_posix()}\n".encode())
            digest.update(file.read_bytes())
        return digest.hexdigest()

    def read(self, adapter_id: str) -> StoredAdapter:
        """Read and validate the adapter (StoreError says why a folder cannot be served)."""
        fmt = self.format(adapter_id)
        version = self.version(adapter_id)
        try:
            adapter = peft_interop.load_any(self.folder(adapter_id), base_model_dir=self.base_model_dir)
        except (peft_interop.InteropError, AdapterFormatError, OSError) as e:
            raise StoreError(f"adapter {adapter_id!r} in the store cannot be read: {e}") from e
        return StoredAdapter(adapter_id, fmt, adapter, tensors_sha256(to_tensors(adapter)), version)
