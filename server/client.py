"""A small blocking client of adalora.v1.

    with AdaLoraClient("localhost:50051") as client:     # TLS: tls=ClientTLS(ca="ca.pem"[, cert=..., key=...])
        client.load_adapter("support")
        reply = client.generate("Hello", adapter="support", max_new_tokens=32, temperature=0)
        print(reply.text)

Errors arrive as grpc.RpcError with .code() and .details().
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from adalora.server.gen.adalora.v1 import adalora_pb2_grpc as pb_grpc
from adalora.server.tls import ClientTLS

Adapter = str | Mapping[str, float] | None
Prompt = str | Sequence[int]
UPLOAD_FILES = {"native": ("adapter.safetensors",), "peft": ("adapter_config.json", "adapter_model.safetensors")}
"""The files an upload sends, by format: the server's allow-list (server.adapter_checks.ADAPTER_FILES). A folder's
other files (report.json, ranks.png) stay behind."""
CHUNK_BYTES = 1 << 20
"""Bytes per upload chunk: well under the server's message size limit (4 MiB by default)."""


def upload_files(folder: str | os.PathLike) -> list[Path]:
    """The files of the adapter in `folder`: the native file if there is one (as the server reads it), else
    PEFT's two."""
    folder = Path(folder)
    for names in UPLOAD_FILES.values():
        if all((folder / name).is_file() for name in names):
            return [folder / name for name in names]
    raise FileNotFoundError(f"{folder}: no adapter to upload; expected {UPLOAD_FILES['native'][0]} (native) or "
                            f"{' + '.join(UPLOAD_FILES['peft'])} (PEFT)")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def upload_header(adapter_id: str, files: Sequence[Path], overwrite: bool = False) -> pb.UploadHeader:
    return pb.UploadHeader(id=adapter_id, overwrite=overwrite,
                           files=[pb.UploadFile(name=f.name, size=f.stat().st_size, sha256=file_sha256(f))
                                  for f in files])


def upload_requests(header: pb.UploadHeader, files: Sequence[Path],
                    chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.UploadAdapterRequest]:
    """The header message, then each file's bytes in order, in chunks of at most chunk_bytes."""
    yield pb.UploadAdapterRequest(header=header)
    for path in files:
        with open(path, "rb") as f:
            while data := f.read(chunk_bytes):
                yield pb.UploadAdapterRequest(chunk=pb.UploadChunk(name=path.name, data=data))


def selection(adapter: Adapter) -> pb.AdapterSelection:
    if adapter is None:
        return pb.AdapterSelection()
    if isinstance(adapter, str):
        return pb.AdapterSelection(id=adapter)
    return pb.AdapterSelection(mix=pb.AdapterMix(adapters=[pb.WeightedAdapter(id=k, weight=w)
                                                            for k, w in adapter.items()]))


def generate_request(prompt: Prompt, adapter: Adapter = None, max_new_tokens: int = 0,
                     temperature: float | None = None, top_k: int = 0, top_p: float | None = None,
                     repetition_penalty: float | None = None, seed: int | None = None,
                     stop: Sequence[str | Sequence[int]] = ()) -> pb.GenerateRequest:
    params = pb.SamplingParams(max_new_tokens=max_new_tokens, top_k=top_k, temperature=temperature, top_p=top_p,
                               repetition_penalty=repetition_penalty, seed=seed,
                               stop=[pb.StopSequence(text=s) if isinstance(s, str)
                                     else pb.StopSequence(token_ids=pb.TokenIds(ids=s)) for s in stop])
    request = pb.GenerateRequest(adapter=selection(adapter), params=params)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def encoder_inputs(inputs: Sequence[Prompt]) -> list[pb.EncoderInput]:
    return [pb.EncoderInput(text=x) if isinstance(x, str) else pb.EncoderInput(token_ids=pb.TokenIds(ids=x))
            for x in inputs]


class AdaLoraClient:
    """One channel to a server; every method is one RPC."""

    def __init__(self, target: str, timeout: float | None = 60.0, admin_token: str | None = None,
                 tls: ClientTLS | None = None) -> None:
        """`admin_token`: sent as `authorization: Bearer <token>` with the admin RPCs. `tls`: reach a
        TLS port (the CA to trust, and a client certificate for mutual TLS); None = plaintext."""
        self.channel = grpc.insecure_channel(target) if tls is None else grpc.secure_channel(target,
                                                                                               tls.credentials())
        self.admin = () if admin_token is None else (("authorization", f"Bearer {admin_token}"),)
        self.stub = pb_grpc.AdaLoraStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> AdaLoraClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, prompt: Prompt, adapter: Adapter = None, **params) -> pb.GenerateResponse:
        return self.stub.Generate(generate_request(prompt, adapter, **params), timeout=self.timeout)

    def generate_stream(self, prompt: Prompt, adapter: Adapter = None, **params) -> Iterator[pb.GenerateStreamResponse]:
        return self.stub.GenerateStream(generate_request(prompt, adapter, **params), timeout=self.timeout)

    def classify(self, inputs: Sequence[Prompt], adapter: Adapter) -> pb.ClassifyResponse:
        return self.stub.Classify(pb.ClassifyRequest(adapter=selection(adapter), inputs=encoder_inputs(inputs)),
                                  timeout=self.timeout)

    def embed(self, inputs: Sequence[Prompt], adapter: Adapter = None, normalize: bool = False) -> pb.EmbedResponse:
        return self.stub.Embed(pb.EmbedRequest(adapter=selection(adapter), inputs=encoder_inputs(inputs),
                                               normalize=normalize), timeout=self.timeout)

    def load_adapter(self, adapter_id: str, reload: bool = False, pin: bool = False) -> pb.LoadAdapterResponse:
        return self.stub.LoadAdapter(pb.LoadAdapterRequest(id=adapter_id, reload=reload, pin=pin),
                                     timeout=self.timeout, metadata=self.admin)

    def unload_adapter(self, adapter_id: str) -> pb.UnloadAdapterResponse:
        return self.stub.UnloadAdapter(pb.UnloadAdapterRequest(id=adapter_id), timeout=self.timeout,
                                       metadata=self.admin)

    def upload(self, adapter_id: str, folder: str | os.PathLike, overwrite: bool = False,
               chunk_bytes: int = CHUNK_BYTES) -> pb.UploadAdapterResponse:
        """Store the adapter of `folder` (its upload_files) in the server's adapter store as `adapter_id`
        (overwrite: replace a stored one). It is not loaded: call load_adapter next (reload=True to replace a
        loaded version)."""
        files = upload_files(folder)
        requests = upload_requests(upload_header(adapter_id, files, overwrite), files, chunk_bytes)
        return self.stub.UploadAdapter(requests, timeout=self.timeout, metadata=self.admin)

    def list_adapters(self, include_store: bool = False) -> pb.ListAdaptersResponse:
        return self.stub.ListAdapters(pb.ListAdaptersRequest(include_store=include_store), timeout=self.timeout)

    def get_adapter(self, adapter_id: str) -> pb.AdapterInfo:
        return self.stub.GetAdapter(pb.GetAdapterRequest(id=adapter_id), timeout=self.timeout).adapter

    def health(self, service: str = "") -> str:
        """'SERVING', 'NOT_SERVING', ... of the standard grpc.health.v1 service."""
        reply = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
