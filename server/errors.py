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


STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (BatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (AdapterExists, grpc.StatusCode.ALREADY_EXISTS),
    (SlotsFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UploadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResponseTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
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
