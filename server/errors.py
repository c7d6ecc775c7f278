"""Errors of the serving layer and the one table that maps every error a request can meet to a status code."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import grpc

from adalora.adapter_file import AdapterFormatError
from adalora.config import ConfigError
from adalora.engine.errors import (AdapterExists, AdapterMismatch, AdapterNotFound, BatchError,
                                           DeadlineExpired, InvalidRequest, NonFiniteOutput, RequestCancelled,
                                           SlotsFull)


class ServerError(Exception):
    """Base class of the serving layer's own errors; the message says what the caller can do."""


class NotReady(ServerError):
    """The base model is still loading, or the server is shutting down (UNAVAILABLE)."""


class StoreError(ServerError):
    """An adapter folder in the store that cannot be read or served (FAILED_PRECONDITION)."""


class StoreConflict(ServerError):
    """An adapter id another upload is writing, or one replaced while it was being read (ABORTED: retry)."""


class UploadTooLarge(ServerError):
    """An upload over max_upload_bytes, or one the store's disk has no room for (RESOURCE_EXHAUSTED)."""


class WrongModelKind(ServerError):
    """Generate on an encoder base, or Classify / Embed on a decoder base (FAILED_PRECONDITION)."""


class StoreFull(ServerError):
    """An upload past the store's quota, or past the uploads received at once (RESOURCE_EXHAUSTED)."""


class ResponseTooLarge(ServerError):
    """An answer over max_message_bytes: refused before it is sent (RESOURCE_EXHAUSTED), so it is counted as such."""


class QueueFull(ServerError):
    """max_queue generation requests already wait for a batch row (RESOURCE_EXHAUSTED)."""


class Unauthenticated(ServerError):
    """An admin RPC without `authorization: Bearer <token>` metadata (UNAUTHENTICATED)."""


class PermissionDenied(ServerError):
    """An admin RPC whose bearer token is not the server's admin token (PERMISSION_DENIED)."""


class RequestTooLarge(ServerError):
    """An HTTP request body over max_message_bytes (413 / RESOURCE_EXHAUSTED)."""


STATUS: tuple[tuple[type[BaseException], grpc.StatusCode, int], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (BatchError, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND, 404),
    (AdapterExists, grpc.StatusCode.ALREADY_EXISTS, 409),
    (SlotsFull, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (UploadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    (ResponseTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    (RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    (StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    (StoreConflict, grpc.StatusCode.ABORTED, 409),
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (RequestCancelled, grpc.StatusCode.CANCELLED, 499),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, 403),
    (AdapterMismatch, grpc.StatusCode.FAILED_PRECONDITION, 400),
    (NonFiniteOutput, grpc.StatusCode.FAILED_PRECONDITION, 422),
    (StoreError, grpc.StatusCode.FAILED_PRECONDITION, 422),
    (AdapterFormatError, grpc.StatusCode.FAILED_PRECONDITION, 400),
    (WrongModelKind, grpc.StatusCode.FAILED_PRECONDITION, 400),
    (NotReady, grpc.StatusCode.UNAVAILABLE, 503),
)
"""Each error a request can meet, with its gRPC status (adalora.v1, KServe) and its HTTP status (the OpenAI API).
First matching class wins; an error of no listed class is a server bug (INTERNAL, 500)."""
RETRYABLE_HTTP = frozenset({429, 503})
"""HTTP statuses answered with a Retry-After header."""


def _entry(error: BaseException) -> tuple[grpc.StatusCode, int]:
    for cls, code, http in STATUS:
        if isinstance(error, cls):
            return code, http
    return grpc.StatusCode.INTERNAL, 500


def status_of(error: BaseException) -> grpc.StatusCode:
    return _entry(error)[0]


def http_status_of(error: BaseException) -> int:
    return _entry(error)[1]


UPLOAD_FOLDER = re.compile(r"\.upload-[a-z0-9._-]+\.[0-9a-f]+/?")
"""An upload's staging folder name inside the store (server.store.STAGING_PREFIX)."""


def redactor(config) -> Callable[[str], str]:
    """A function that takes the server's own paths out of a message meant for a client: the store folder (an
    adapter's files are then named relative to it), an upload's staging folder and the base model folder."""
    store = {str(Path(config.adapter_dir)), str(Path(config.adapter_dir).resolve())}
    base = {str(Path(config.base_model)), str(Path(config.base_model).resolve())}
    swaps = sorted([(p, "") for p in store] + [(p, "the base model") for p in base], key=lambda x: -len(x[0]))

    def redact(message: str) -> str:
        for path, name in swaps:
            message = message.replace(path + os.sep, name).replace(path, name or "the store")
        return UPLOAD_FOLDER.sub("", message)

    return redact
