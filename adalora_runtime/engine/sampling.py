"""Per-request sampling: a validated `SamplingParams` and pure transforms on one row of logits.

Order (as in transformers' generate): repetition penalty, then, unless greedy, temperature, top-k,
top-p, and a draw from the request's own torch.Generator, so a seeded request draws the same numbers
whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adalora.config import is_int, is_number
from adalora.engine.errors import InvalidRequest, NonFiniteOutput

Stop = str | tuple[int, ...]
"""A stop sequence: token ids, or a string matched in the decoded completion (needs a tokenizer)."""

MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2
"""A sampling temperature is 0 (greedy) or within these: below, logits / t overflows; above, it is uniform noise."""
MIN_PENALTY, MAX_PENALTY = 1e-2, 1e6
"""repetition_penalty bounds: a smaller one divides logits into infinity, a larger one pushes them past the float
range."""
MAX_STOPS, MAX_STOP_LENGTH = 16, 256
MAX_SEED = 2**64 - 1
"""The largest seed torch.Generator.manual_seed takes."""
"""At most this many stop sequences, each of at most this many characters or token ids: per-token stop matching
then costs a bounded amount whatever a request asks (OpenAI allows 4)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_new_tokens: int = 16
    """Upper bound on generated tokens (finish reason 'length' when reached)."""
    temperature: float = 1.0
    """Logits are divided by it; 0 = greedy (argmax, no draw)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 = no limit."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p; 1 = no limit."""
    repetition_penalty: float = 1.0
    """Logits of tokens already in the prompt or completion: divided by it if positive, else multiplied."""
    stop: tuple[Stop, ...] = ()
    """Stop sequences; the completion ends (reason 'stop') with the first one it contains, kept in the output."""
    seed: int | None = None
    """Seed of this request's own generator; None = a fresh random seed."""
    ignore_eos: bool = False
    """Go on past an end-of-sequence token (it is kept in the output) until max_new_tokens or a stop: for
    benchmarks that need every request to make the same number of tokens."""

    def __post_init__(self) -> None:
        if not is_int(self.max_new_tokens, 1):
            raise InvalidRequest(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not is_number(self.temperature) or not (self.temperature == 0
                                                 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise InvalidRequest(f"temperature must be >= 0 (0 = greedy), and when sampling in [{MIN_TEMPERATURE:g}, "
                                 f"{MAX_TEMPERATURE:g}]; got {self.temperature!r}")
        if not is_int(self.top_k, 0):
            raise InvalidRequest(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1] (1 = no limit), got {self.top_p!r}")
        if not is_number(self.repetition_penalty) or not MIN_PENALTY <= self.repetition_penalty <= MAX_PENALTY:
            raise InvalidRequest(f"repetition_penalty must be > 0 (1 = none), within [{MIN_PENALTY:g}, "
                                 f"{MAX_PENALTY:g}]; got {self.repetition_penalty!r}")
        if isinstance(self.stop, (str, list)) or not isinstance(self.stop, tuple):
            raise InvalidRequest(f"stop must be a tuple of stop sequences, got {self.stop!r:.200}; write (stop,)")
        if len(self.stop) > MAX_STOPS:
            raise InvalidRequest(f"{len(self.stop)} stop sequences given; at most {MAX_STOPS} are accepted")
        object.__setattr__(self, "stop", tuple(_stop(s, i) for i, s in enumerate(self.stop)))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.seed is not None and not is_int(self.seed, 0, MAX_SEED):
            raise InvalidRequest(f"seed must be a non-negative integer or None, at most 2**64 - 1; got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s for s in self.stop if isinstance(s, str))

    def stop_ids(self) -> tuple[tuple[int, ...], ...]:
        return tuple(s for s in self.stop if not isinstance(s, str))


def _stop(s: object, i: int) -> Stop:
    if isinstance(s, (str, tuple, list)) and len(s) > MAX_STOP_LENGTH:
        raise InvalidRequest(f"stop[{i}] is {len(s)} long; a stop sequence has at most {MAX_STOP_LENGTH} characters "
                             f"or token ids")
    if isinstance(s, str):
        if not s:
            raise InvalidRequest(f"stop[{i}] is an empty string; remove it or give at least one character")
        return s
    if not isinstance(s, (tuple, list)) or not s:
        raise InvalidRequest(f"stop[{i}] must be a non-empty string or a non-empty sequence of token ids, "
                             f"got {s!r:.200}")
    if not all(is_int(t, 0) for t in s):
        raise InvalidRequest(f"stop[{i}] token ids must be non-negative integers, got {list(s)!r}")
    return tuple(s)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (V,), seen (S,) token ids -> (V,) with each seen token's logit pushed towards less likely."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]  # (S,)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(0, seen, picked)


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """(V,) -> (V,); t > 0."""
    return logits if t == 1.0 else logits / t


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(V,) -> (V,) with -inf below the k-th largest logit (ties with it kept); k = 0 keeps all."""
    if k == 0 or k >= logits.shape[0]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(V,) -> (V,) keeping the most likely tokens until their probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    probs, order = torch.softmax(logits, dim=-1).sort(descending=True)  # (V,), (V,)
    mass_before = probs.cumsum(0) - probs  # (V,) probability of the more likely tokens
    dropped = mass_before >= p
    dropped[0] = False  # the most likely token always stays (p below float32's range rounds to 0)
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter(0, order, dropped)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One row: logits (V,) float, seen (S,) ids of prompt + completion -> the chosen token id. NonFiniteOutput
    when the row's probabilities are not finite (the caller fails that row alone)."""
    logits = repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = top_p(top_k(temperature(logits, params.temperature), params.top_k), params.top_p)
    probs = torch.softmax(logits, dim=-1).to(generator.device)  # (V,)
    if not bool(torch.isfinite(probs).all()):
        raise NonFiniteOutput("sampling probabilities are NaN or infinite: the adapter or mix overflows this model; "
                              "lower its weights or check the adapter")
    return int(torch.multinomial(probs, 1, generator=generator))


def request_generator(seed: int | None) -> torch.Generator:
    """A CPU generator of one request: seeded, or from fresh OS entropy."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
