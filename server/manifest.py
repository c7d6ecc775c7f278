"""MANIFEST.sha256.json: the list of an uploaded store folder's files with their sizes and sha256, written last.

    {"format": "adalora-store-manifest", "format_version": 1,
     "files": {"adapter.safetensors": {"size": 1234, "sha256": "<64 hex>"}}}

A folder with a manifest is whole exactly when every listed file has its size and sha256 and no other adapter or
tensor file sits beside them; the store checks it on every read and at startup (a folder that fails is
quarantined). Folders without one (placed by hand, or written by `adalora train`) are validated when read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from adalora.atomic import write_text_atomic
from adalora.server.adapter_checks import ADAPTER_FILES, PICKLE_SUFFIXES

MANIFEST_NAME = "MANIFEST.sha256.json"
FORMAT = "adalora-store-manifest"
FORMAT_VERSION = 1
BLOCK = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str


def digest_file(path: Path) -> FileDigest:
    """Size and sha256 of a file, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
            size += len(block)
    return FileDigest(size, digest.hexdigest())


def folder_digests(folder: Path) -> dict[str, FileDigest]:
    """Every file under `folder` but the manifest, by its relative POSIX path, in sorted order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): digest_file(p) for p in files if p.name != MANIFEST_NAME
            or p.parent != folder}


def version_of(digests: dict[str, FileDigest]) -> str:
    """The store's version of a folder: sha256 over its files' names and sha256s (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(f"{name}\n{digests[name].sha256}\n".encode())
    return digest.hexdigest()


def write_manifest(folder: Path, files: dict[str, FileDigest]) -> None:
    """Write folder/MANIFEST.sha256.json atomically (temp file, fsync, rename, fsync of the folder)."""
    listing = {name: {"size": d.size, "sha256": d.sha256} for name, d in sorted(files.items())}
    write_text_atomic(folder / MANIFEST_NAME, json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                          "files": listing}, indent=1) + "\n")


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).is_file()


def manifest_problems(folder: Path, digests: dict[str, FileDigest]) -> list[str]:
    """Why `folder` (whose files have `digests`) does not match its manifest; [] when it does or has none."""
    if not has_manifest(folder):
        return []
    try:
        listed = _read(folder / MANIFEST_NAME)
    except (OSError, ValueError) as e:
        return [f"{MANIFEST_NAME} is unreadable ({e})"]
    problems = []
    for name, want in listed.items():
        got = digests.get(name)
        if got is None:
            problems.append(f"{name} is missing")
        elif got.size != want.size:
            problems.append(f"{name} has {got.size} bytes, the manifest says {want.size}")
        elif got.sha256 != want.sha256:
            problems.append(f"{name} has sha256 {got.sha256[:12]}..., the manifest says {want.sha256[:12]}...")
    extra = [name for name in digests if name not in listed and _adapter_data(name)]
    problems += [f"{name} is not in the manifest" for name in extra]
    return problems


def _adapter_data(name: str) -> bool:
    """Whether a file would change what the store reads as the adapter (an adapter file, or any tensor file)."""
    path = Path(name)
    return path.name in ADAPTER_FILES or path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)


def _read(path: Path) -> dict[str, FileDigest]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} manifest")
    files = data.get("files")
    if not isinstance(files, dict):
        raise ValueError("no 'files' object")
    try:
        return {name: FileDigest(int(d["size"]), str(d["sha256"])) for name, d in files.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed file entry ({e})") from e
