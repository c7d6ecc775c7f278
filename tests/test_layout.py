"""Packaging and layering (issue 16): one import namespace, `adalora`, over the repository's folders; the library
(adalora_runtime/, imported as `adalora`) never imports the server or the tools, only the CLI on top does; the
tools never import the server. Checked over the source, and over a wheel built from this checkout."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = {"adalora.cli"}
"""Library-folder modules allowed to import everything: the console command."""


def module_name(path: Path) -> str:
    """The import name of a source file under one of the mapped folders."""
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    prefix = {"adalora_runtime": ["adalora"], "server": ["adalora", "server"], "tools": ["adalora", "tools"]}[folder]
    parts = prefix + [p for p in rest if p != "__init__"]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; a relative import resolved against the file's package)."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def sources(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "gen" not in p.relative_to(ROOT).parts)


RULES = {  # folder -> (packages its modules may not import, modules exempt)
    "adalora_runtime": (("adalora.server", "adalora.tools", "server", "tools"), TOP),
    "tools": (("adalora.server", "server"), set()),
}


def offenders(folder: str) -> list[str]:
    forbidden, allowed = RULES[folder]
    found = []
    for path in sources(folder):
        if module_name(path) in allowed:
            continue
        bad = sorted(n for n in imports(path) if any(n == f or n.startswith(f + ".") for f in forbidden))
        if bad:
            found.append(f"{path.relative_to(ROOT)} imports {bad}")
    return found


@pytest.mark.parametrize("folder", sorted(RULES))
def test_layers_import_only_downwards(folder):
    assert offenders(folder) == []


@pytest.mark.parametrize("line", ["from adalora.server.config import ServerConfig", "import adalora.tools.merge",
                                  "from .. import server", "from tools.merge import pipeline"])
def test_the_rule_checker_sees_an_upward_import(line):
    probe = ROOT / "adalora_runtime" / "engine" / "_layout_probe.py"
    probe.write_text(line + "\n")
    try:
        assert [o for o in offenders("adalora_runtime") if "_layout_probe" in o], line
    finally:
        probe.unlink()


def test_a_wheel_installs_only_the_adalora_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("adalora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"adalora"}, top
    for needed in ("adalora/cli.py", "adalora/engine/engine.py", "adalora/server/app.py", "adalora/server/commands/demo.py",
                   "adalora/server/gen/adalora/v1/adalora_pb2.py", "adalora/tools/merge/pipeline.py"):
        assert needed in names, needed
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "adalora = adalora.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
