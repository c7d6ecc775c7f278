"""Generate the Python stubs of protos/adalora/v1/*.proto into server/gen/ with grpcio-tools.

    python -m adalora.server.gen_protos            # rewrite the committed stubs
    python -m adalora.server.gen_protos --out DIR  # write them under DIR instead (the staleness test compares)

The proto root is mapped to the virtual path adalora/server/gen (the import path of the folder server/gen), so the
generated grpc module imports `adalora.server.gen.adalora.v1.adalora_pb2` and needs no sys.path changes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("server/gen")
"""Where the stubs live, relative to the repository root."""
IMPORT_PATH = Path("adalora/server/gen")
"""The import path of that folder (setuptools maps adalora.server to server/), which the stubs are generated for."""


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi, *_pb2_grpc.py and the packages' __init__.py under out/server/gen; returns
    the written files relative to `out`."""
    from grpc_tools import protoc  # dev dependency: only this script needs it

    protos = [str(IMPORT_PATH / p.relative_to(PROTO_ROOT)) for p in proto_files()]
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"--proto_path={IMPORT_PATH}={PROTO_ROOT}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {protos}; its message is above")
        for file in Path(tmp, IMPORT_PATH).rglob("*"):
            if file.is_file():
                target = out / PACKAGE / file.relative_to(Path(tmp, IMPORT_PATH))
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target)
    for package in {(out / PACKAGE / Path(proto).relative_to(IMPORT_PATH)).parent for proto in protos}:
        while package != out / PACKAGE.parent:
            (package / "__init__.py").touch()
            package = package.parent
    return sorted(p.relative_to(out) for p in (out / PACKAGE).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write server/gen/ under (default: the repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
