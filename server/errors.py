"""Errors of the serving layer and the one table that maps every error a request can meet to a status code."""

from __future__ import annotations

import grpc

from adalora_runtime.adapter_file import AdapterFormatError
from adalora_runtime.config import ConfigError
from adalora_runtime.engine.errors import (AdapterExists, AdapterMismatch, AdapterNotFound, BatchError,
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


class QueueFull(ServerError):
    """max_queue generation requests already wait for a batch row (RESOURCE_EXHAUSTED)."""


class Unauthenticated(ServerError):
    """An admin RPC without `authorization: Bearer <token>` metadata (UNAUTHENTICATED)."""


class PermissionDenied(ServerError):
    """An admin RPC whose bearer token is not the server's admin token (PERMISSION_DENIED)."""


STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (BatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (AdapterExists, grpc.StatusCode.ALREADY_EXISTS),
    (SlotsFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UploadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreConflict, grpc.StatusCode.ABORTED),
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestCancelled, grpc.StatusCode.CANCELLED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (AdapterMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (NonFiniteOutput, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterFormatError, grpc.StatusCode.FAILED_PRECONDITION),
    (WrongModelKind, grpc.StatusCode.FAILED_PRECONDITION),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
)
"""First matching class wins; an error of no listed class is a server bug (INTERNAL)."""


def status_of(error: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL
