"""`adalora serve` options: gRPC server reflection behind --reflection (listed services read back over the wire
with grpc_reflection's own client), and the defaults of --base-model (the prepared SmolLM2) and --adapter-dir
(./adapters, created)."""

import argparse
import asyncio
import threading
import time

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from adalora.assets import NotPreparedError
from adalora.config import ConfigError
from adalora.engine import GeneratorConfig
from adalora.server.adapter_checks import AdapterLimits
from adalora.server.app import in_daemon_thread
from adalora.server.commands import serve as serve_command
from adalora.server.config import ServerConfig
from tests.server_setup import ServerThread, word_tokenizer, write_base
from tests.factories import varied_llama

SERVICES = {"adalora.v1.AdaLora", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
            "grpc.reflection.v1.ServerReflection", "inference.GRPCInferenceService"}


@pytest.mark.parametrize("reflection", [True, False])
def test_reflection_lists_the_services_only_when_asked(tmp_path, reflection):
    base = write_base(varied_llama(), tmp_path / "base", word_tokenizer())
    (tmp_path / "adapters").mkdir()
    server = ServerThread(ServerConfig(base_model=str(base), adapter_dir=str(tmp_path / "adapters"), port=0,
                                       reflection=reflection))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            if reflection:
                assert set(database.get_services()) == SERVICES
                service = DescriptorPool(database).FindServiceByName("adalora.v1.AdaLora")
                names = {m.name for m in service.methods}
                assert {"Generate", "GenerateStream", "LoadAdapter", "UploadAdapter"} <= names
            else:
                with pytest.raises(grpc.RpcError) as refused:
                    database.get_services()
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop()


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    return parser.parse_args(list(flags))


def test_default_adapter_dir_is_created_and_the_default_base_must_be_prepared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADALORA_CACHE", str(tmp_path / "empty-cache"))
    config = serve_command.config_from(parse("--base-model", "some/model"))
    assert config.adapter_dir == "adapters" and (tmp_path / "adapters").is_dir()
    assert config.base_model == "some/model" and not config.reflection
    with pytest.raises(NotPreparedError, match="adalora prepare"):
        serve_command.config_from(parse())
    assert serve_command.config_from(parse("--base-model", "m", "--adapter-dir", "elsewhere")).adapter_dir == \
        "elsewhere" and not (tmp_path / "elsewhere").exists()
    assert serve_command.config_from(parse("--base-model", "m", "--reflection")).reflection


def test_a_stop_does_not_wait_for_a_base_model_still_loading():
    """serve() loads the base model through in_daemon_thread: asyncio.run returns while the load still runs
    (with asyncio.to_thread it would wait for it: 30 s here), and results and errors reach the awaiting side."""
    gate = threading.Event()

    async def stopped_while_loading():
        loading = in_daemon_thread(gate.wait, 30)
        await asyncio.sleep(0.05)
        return loading.done()

    async def finished():
        with pytest.raises(ZeroDivisionError):
            await in_daemon_thread(lambda: 1 / 0)
        return await in_daemon_thread(sum, [1, 2, 3])

    started = time.monotonic()
    assert asyncio.run(stopped_while_loading()) is False
    assert time.monotonic() - started < 5
    gate.set()
    assert asyncio.run(finished()) == 6


def test_adapter_limit_flags_reach_the_config(tmp_path):
    config = serve_command.config_from(parse("--base-model", "m", "--adapter-dir", str(tmp_path), "--max-adapter-rank",
                                             "16", "--max-adapter-bytes", "1000000", "--adapter-dtypes", "F32", "BF16"))
    assert (config.adapter_limits.max_rank, config.adapter_limits.max_tensor_bytes) == (16, 1_000_000)
    assert config.adapter_limits.dtypes == ("F32", "BF16")
    assert serve_command.config_from(parse("--base-model", "m", "--adapter-dir", str(tmp_path))).adapter_limits == \
        AdapterLimits()


@pytest.mark.parametrize("flags,pattern", [
    (("--max-adapter-rank", "0"), "AdapterLimits.max_rank must be a positive integer"),
    (("--max-adapter-bytes", "-5"), "AdapterLimits.max_tensor_bytes must be a positive integer"),
    (("--adapter-dtypes", "F64"), r"AdapterLimits.dtypes must be a non-empty tuple of \['BF16', 'F16', 'F32'\]"),
])
def test_bad_adapter_limit_flags_are_refused(tmp_path, flags, pattern):
    with pytest.raises(ConfigError, match=pattern):
        serve_command.config_from(parse("--base-model", "m", "--adapter-dir", str(tmp_path), *flags))


def test_no_cuda_graphs_reaches_the_config_and_a_bad_value_is_refused(tmp_path):
    """On by default (they run only on CUDA); --no-cuda-graphs turns them off; a config of another type is refused
    by name, at the server's config and at the Generator's."""
    flags = ("--base-model", "m", "--adapter-dir", str(tmp_path))
    assert serve_command.config_from(parse(*flags)).cuda_graphs is True
    assert serve_command.config_from(parse(*flags, "--no-cuda-graphs")).cuda_graphs is False
    with pytest.raises(ConfigError, match="cuda_graphs must be True or False, got 'no'"):
        ServerConfig(base_model="m", adapter_dir=str(tmp_path), cuda_graphs="no")
    with pytest.raises(ConfigError, match="cuda_graphs must be True or False, got 0"):
        GeneratorConfig(cuda_graphs=0)


def test_gather_ms_reaches_the_config_and_a_bad_value_is_refused(tmp_path):
    flags = ("--base-model", "m", "--adapter-dir", str(tmp_path))
    assert serve_command.config_from(parse(*flags)).gather_ms == 4.0
    assert serve_command.config_from(parse(*flags, "--gather-ms", "0")).gather_ms == 0.0
    for bad in (-1.0, 26.0, True):
        with pytest.raises(ConfigError, match=r"gather_ms must be a number of milliseconds in \[0, 25\], got .* "
                                              r"\(check --gather-ms\)"):
            ServerConfig(base_model="m", adapter_dir=str(tmp_path), gather_ms=bad)
