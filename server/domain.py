"""The serving layer's domain types: what a front-end (adalora.v1 gRPC, the OpenAI HTTP API, KServe v2 gRPC) turns
its wire messages into, and what the Backend answers with. No protobuf and no HTTP here: server.convert,
server.openai_api and server.kserve_convert translate to and from these."""

from __future__ import annotations

from dataclasses import dataclass

from adalora.engine import SamplingParams
from adalora.engine.engine import Selection
from adalora.engine.errors import AdapterNotFound, InvalidRequest
from adalora.server.config import ServerConfig
from adalora.server.store import StoredAdapter, check_id


@dataclass(frozen=True)
class GenerateCall:
    prompt: str | tuple[int, ...]
    """Text (tokenized here) or token ids."""
    adapter: Selection
    params: SamplingParams
    """max_new_tokens already resolved against the server's default and cap."""
    deadline: float | None = None
    """time.monotonic() by which it must be admitted to the batch, else it is dropped unrun; None = none."""


@dataclass(frozen=True)
class EncodeCall:
    inputs: tuple[str, ...] | tuple[tuple[int, ...], ...]
    """Texts or token id rows (not a mix)."""
    adapter: Selection
    normalize: bool = False
    """Embed only: L2-normalize each embedding."""


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    """Until the engine step that admitted the request began."""
    first_token_ms: float
    total_ms: float


@dataclass(frozen=True)
class TokenDelta:
    """One generated token and the text it added (empty while a character is incomplete)."""

    token_id: int
    text: str


@dataclass(frozen=True)
class Completion:
    """The end of a generation: the whole completion, why it ended, counts and timings."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: Timings


@dataclass(frozen=True)
class AdapterView:
    """What the admin RPCs report about one adapter."""

    id: str
    residency: str
    """'device' (in a slot), 'host' (in host memory) or 'disk' (only in the store)."""
    format: str
    """'native', 'peft', or '' when the folder could not be read (listing only)."""
    stored: StoredAdapter | None
    """None for a store-only entry of a listing (the folder was not read)."""
    device_bytes: int = 0
    pinned: bool = False
    in_flight: int = 0


def unsent(final: str, sent: str) -> str:
    """What a stream still owes of its final text after sending `sent`: the rest, or nothing when what was sent is
    not a prefix of it (a decode that changed an earlier character)."""
    return final[len(sent):] if final.startswith(sent) else ""


def adapter_ids(request: Selection) -> set[str]:
    if request is None:
        return set()
    return {request} if isinstance(request, str) else set(request)


def model_selection(model: str, config: ServerConfig) -> Selection:
    """What a front-end's model name selects (the OpenAI API's "model", a v2 model name): the base for its served
    name, else the adapter of that id; AdapterNotFound when the name cannot be an id."""
    if model == config.model_name:
        return None
    try:
        return check_id(model)
    except InvalidRequest:
        raise AdapterNotFound(f"model {model!r} is not served here: ask for {config.model_name!r} (the base) or an "
                              f"adapter id (ListAdapters, GET /v1/models and RepositoryIndex list them)") from None
