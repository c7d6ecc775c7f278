"""The OpenAI API's request bodies and answers, translated to and from the serving layer's domain types: the only
module that knows OpenAI's JSON shapes (server.http serves them).

Requests are pydantic models (FastAPI validates them and publishes them in /openapi.json). OpenAI parameters this
server does not implement are refused by name unless they are absent or at their neutral value (`refuse_unsupported`);
an unknown parameter is refused too, so nothing a client sends is silently ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictBool

from adalora.engine import Classification, SamplingParams
from adalora.engine.engine import Selection
from adalora.engine.errors import AdapterNotFound, InvalidRequest
from adalora.server.config import ServerConfig
from adalora.server.domain import AdapterView, Completion, GenerateCall, model_selection, unsent
from adalora.server.store import check_id

FINISH = {"length": "length", "stop": "stop", "eos": "stop"}
"""Our finish reasons -> OpenAI's (an end-of-sequence token is a natural stop)."""
NEUTRAL: dict[str, tuple[JsonValue, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, False), "response_format": (None, {"type": "text"}), "dimensions": (None,),
    "min_tokens": (None, 0), "truncate_prompt_tokens": (None,), "min_p": (None, 0),
}
"""OpenAI (and vLLM) parameters this server does not implement, with the values that ask for nothing (accepted)."""
ACCEPTED_EXTRAS = frozenset({"user", "metadata", "store", "service_tier"})
"""Parameters that only label a request for the caller's own bookkeeping: accepted, and change nothing."""


class Body(BaseModel):
    """A request body: declared fields are validated; others are checked by name (`refuse_unsupported`)."""

    model_config = ConfigDict(extra="allow")

    def refuse_unsupported(self) -> None:
        bad, unknown = [], []
        for name, value in (self.model_extra or {}).items():
            if name in NEUTRAL:
                if value not in NEUTRAL[name]:
                    bad.append(name)
            elif name not in ACCEPTED_EXTRAS:
                unknown.append(name)
        if bad:
            raise InvalidRequest(f"parameter(s) {', '.join(sorted(bad))} are not supported by this server; leave them "
                                 f"out (or at their default)")
        if unknown:
            raise InvalidRequest(f"unknown parameter(s) {', '.join(sorted(unknown))}; see /openapi.json for the "
                                 f"parameters this server takes")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingBody(Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(description="the served base model's name, or an adapter id")
    max_tokens: int | None = Field(None, ge=1, description="default: the server's default max_new_tokens")
    temperature: float | None = Field(None, ge=0, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, description="completions per prompt")
    seed: int | None = Field(None, ge=0, description="choice j of a request samples with seed + j")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=0, description="extension: keep the k most likely tokens (0 = all)")
    repetition_penalty: float | None = Field(None, gt=0, description="extension: 1 = none")
    ignore_eos: StrictBool = Field(False, description="extension (vLLM's): go on past end-of-sequence tokens until "
                                                       "max_tokens or a stop")
    adapters: dict[str, float] | None = Field(None, description='extension: a weighted mix {"id": weight}; "model" '
                                                                'then names the base')

    def params(self, config: ServerConfig, max_tokens: int | None, choice: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_new_tokens=config.max_new(max_tokens),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else self.top_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=stop, seed=None if self.seed is None else self.seed + choice, ignore_eos=self.ignore_eos)

    def selection(self, config: ServerConfig) -> Selection:
        """The base (None), an adapter id, or a weighted mix: from "adapters", else from "model"."""
        if self.adapters is not None:
            if self.model != config.model_name:
                raise InvalidRequest(f'with "adapters" (a mix), "model" names the base, {config.model_name!r}; got '
                                     f'{self.model!r}')
            if not self.adapters:
                raise InvalidRequest('"adapters" is empty; give at least one {"id": weight}, or leave it out')
            return {check_id(adapter_id): weight for adapter_id, weight in self.adapters.items()}
        return model_selection(self.model, config)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, token ids, or a list of either (one completion group per prompt)")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def rendered(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatBody(SamplingBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")

    def max_new(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidRequest("give max_tokens or max_completion_tokens, not both")
        return self.max_completion_tokens or self.max_tokens


class EncodeBody(Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]


class EmbeddingBody(EncodeBody):
    encoding_format: Literal["float", "base64"] = "float"


class LoadLoraBody(Body):
    lora_name: str = Field(description="the adapter id (its folder's name in the store)")
    lora_path: str | None = Field(None, description="the adapter's folder: its id, or a path inside the store")
    load_inplace: bool = Field(False, description="replace a loaded older version of it")


class UnloadLoraBody(Body):
    lora_name: str
    lora_int_id: int | None = None


def texts_or_ids(value: str | list[str] | list[int] | list[list[int]], field: str) -> tuple[str | tuple[int, ...], ...]:
    """A prompt or input field as one item per text or token-id row: a text, token ids, or a list of either."""
    if isinstance(value, str):
        return (value,)
    if not value:
        raise InvalidRequest(f"{field} is an empty list; give a text, token ids, or a list of either")
    if all(isinstance(x, int) for x in value):
        return (tuple(value),)
    return tuple(x if isinstance(x, str) else tuple(x) for x in value)


def generate_calls(body: SamplingBody, prompts: Sequence[str | tuple[int, ...]], max_tokens: int | None,
                   config: ServerConfig, deadline: float) -> list[GenerateCall]:
    """n calls per prompt, prompt-major (choice index = prompt * n + j)."""
    if len(prompts) * body.n > config.max_inputs:
        raise InvalidRequest(f"{len(prompts)} prompt(s) x n={body.n} = {len(prompts) * body.n} completions, over "
                             f"this server's limit of {config.max_inputs} per request; send fewer")
    selection = body.selection(config)
    return [GenerateCall(p, selection, body.params(config, max_tokens, j), deadline)
            for p in prompts for j in range(body.n)]


# ---- answers -------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completions_usage(completions: Sequence[Completion], n: int) -> dict[str, int]:
    """Each prompt counted once (its first choice), every completion's tokens."""
    return usage(sum(c.prompt_tokens for c in completions[::n]), sum(c.completion_tokens for c in completions))


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before its first stop string (OpenAI leaves the stop sequence out; the engine keeps it)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(cuts)] if cuts else text


def final_text(completion: Completion, stops: Sequence[str]) -> str:
    return cut_at_stop(completion.text, stops) if completion.finish_reason == "stop" else completion.text


def completion_response(model: str, completions: Sequence[Completion], n: int, stops: Sequence[str]) -> dict:
    choices = [{"index": i, "text": final_text(c, stops), "finish_reason": FINISH[c.finish_reason], "logprobs": None}
               for i, c in enumerate(completions)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": completions_usage(completions, n)}


def chat_response(model: str, completions: Sequence[Completion], n: int, stops: Sequence[str]) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": final_text(c, stops)},
                "finish_reason": FINISH[c.finish_reason], "logprobs": None} for i, c in enumerate(completions)]
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": completions_usage(completions, n)}


class StreamShape:
    """The chunks of one streamed answer (completions or chat): same id and creation time in every chunk."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _chunk(self, choices: list[dict], **extra) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def start(self, index: int) -> dict | None:
        """Chat's first chunk of a choice names the role; completions have none."""
        if not self.chat:
            return None
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None}])

    def text(self, index: int, text: str, finish_reason: str | None = None) -> dict:
        if self.chat:
            delta = {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return self._chunk([choice])

    def usage(self, counts: dict[str, int]) -> dict:
        return self._chunk([], usage=counts)


class StopHold:
    """Streams a choice's text so that no character of a stop sequence is ever sent: the last (longest stop - 1)
    characters wait until more text shows they start no stop, and the final text is cut at the first stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.sent = "", 0

    def add(self, delta: str) -> str:
        """Text that can be sent now."""
        self.text += delta
        cut = len(cut_at_stop(self.text, self.stops))  # a whole stop sequence: the text ends before it
        safe = max(self.sent, min(cut, len(self.text) - self.hold))
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def finish(self, completion: Completion) -> str:
        """The rest of the final text (empty when what was sent is not a prefix of it)."""
        return unsent(final_text(completion, self.stops), self.text[:self.sent])


def model_entry(model_id: str, created: int, parent: str | None, **extra) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "adalora", "root": model_id,
            "parent": parent, **extra}


def base_entry(config: ServerConfig, created: int, max_positions: int | None) -> dict:
    return model_entry(config.model_name, created, None, max_model_len=max_positions, loaded=True)


def adapter_entry(view: AdapterView, config: ServerConfig, created: int) -> dict:
    return model_entry(view.id, created, config.model_name, loaded=view.residency == "device",
                       residency=view.residency)


def classify_response(model: str, results: Sequence[Classification], prompt_tokens: int) -> dict:
    data = [{"index": i, "label": r.label, "probs": list(r.scores.values()), "num_classes": len(r.scores)}
            for i, r in enumerate(results)]
    return {"id": new_id("classify"), "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": usage(prompt_tokens, 0)}


def embeddings_response(model: str, rows: Sequence[JsonValue], prompt_tokens: int) -> dict:
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def error_code(error: BaseException) -> str | None:
    return "model_not_found" if isinstance(error, AdapterNotFound) else None


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kinds: Mapping[int, str] = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                                404: "not_found_error", 409: "conflict_error", 413: "request_too_large",
                                422: "unprocessable_entity_error", 429: "rate_limit_error", 503: "service_unavailable",
                                504: "timeout_error"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"), "param": param, "code": code}}
