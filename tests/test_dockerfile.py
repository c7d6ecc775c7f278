"""The Docker image's recipe, checked without a Docker daemon: the files the Dockerfile COPYs are built into a
wheel and installed apart from the source tree; the image's ENTRYPOINT + CMD run from that install (model,
paths, device and ports swapped for a tiny random model on the CPU), and the image's HEALTHCHECK passes
against it. Fails when the image lacks a file the package needs, or when its CMD names a flag `adalora serve`
does not have. (The base image and the CUDA torch index are not reachable here: the current torch stands in.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server_setup import word_tokenizer, write_base
from tests.factories import varied_llama
from tests.test_server_e2e import dockerfile_healthcheck

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, comments dropped and continuation lines joined."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip()]


def copied_sources() -> list[str]:
    """Every source path of the COPY instructions (all arguments but the destination)."""
    return [src for op, args in instructions() if op == "COPY" for src in args.split()[:-1]]


def json_form(op: str) -> list[str]:
    """The JSON (exec) form of the one ENTRYPOINT or CMD instruction at the top level."""
    (args,) = [args for name, args in instructions() if name == op]
    return json.loads(args)


def swapped(cmd: list[str], values: dict[str, str]) -> list[str]:
    """cmd with the value after each flag of `values` replaced; every such flag must be in cmd."""
    out = list(cmd)
    for flag, value in values.items():
        assert flag in out, f"the Dockerfile's CMD has no {flag}"
        out[out.index(flag) + 1] = value
    return out


@pytest.mark.slow
def test_the_images_files_install_apart_from_the_source_and_serve(tmp_path):
    context = tmp_path / "context"
    context.mkdir()
    for src in copied_sources():
        path = ROOT / src
        if path.is_dir():
            shutil.copytree(path, context / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, context / src)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(context)], check=True,
                   cwd=tmp_path)
    (wheel,) = wheels.glob("adalora-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    where = subprocess.run([sys.executable, "-c", "import adalora, adalora.server.app, adalora.tools.merge as m; "
                            "print(adalora.__file__, adalora.server.app.__file__, m.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert all(Path(f).is_relative_to(site) for f in where.stdout.split()), where.stdout  # not the source tree

    base = write_base(varied_llama(), tmp_path / "base", word_tokenizer())
    (tmp_path / "adapters").mkdir()
    ready = tmp_path / "ready.json"
    assert json_form("ENTRYPOINT") == ["adalora"]
    args = swapped(json_form("CMD"), {"--base-model": str(base), "--adapter-dir": str(tmp_path / "adapters"),
                                      "--host": "127.0.0.1", "--port": "0", "--metrics-port": "0",
                                      "--device": "cpu", "--dtype": "float32"})
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(site / "bin" / "adalora"), *args, "--ready-file", str(ready)], cwd=tmp_path,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        port = json.loads(ready.read_text())["metrics_port"]
        check = dockerfile_healthcheck().replace(":9090/", f":{port}/")
        assert subprocess.run([sys.executable, "-c", check], env=env, timeout=60).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
