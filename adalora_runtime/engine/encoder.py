"""Encoder serving: batched sequence classification (each row's adapter with its own head and labels) and
mean-pooled embeddings, one backbone forward per batch with per-row adapters.

    runner = EncoderRunner(engine, tokenizer)
    runner.classify(["great", "awful"], ["sentiment", "topic"])  # each row its own adapter, head and labels
    runner.embed(["a", "b"], [None, "retrieval"], normalize=True)  # (2, hidden)

Heads live beside each adapter's slot (engine.heads), not in the model's head module, so adapters with
different label sets share one base. A row's logits are what `*ForSequenceClassification` computes with
that adapter attached: BERT's 'classifier' reads the pooler output (dropout is the identity in eval), a
decoder's 'score' reads the last non-pad token. Inputs are right-padded; padding never changes a row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adalora.engine.engine import AdapterEngine, Selection
from adalora.engine.errors import AdapterMismatch, EngineError, InvalidRequest
from adalora.engine.heads import Head
from adalora.engine.multi_linear import BatchContext


@dataclass(frozen=True)
class EncodedBatch:
    """Right-padded token ids of a batch; attention_mask is 1 on each row's tokens, then 0 on its padding."""

    input_ids: torch.Tensor
    """(B, T) long"""
    attention_mask: torch.Tensor
    """(B, T), every row a run of ones (at least one) followed by zeros."""
    token_type_ids: torch.Tensor | None = None
    """(B, T) long, or None (the model's default: all zeros for BERT)."""

    def __post_init__(self) -> None:
        ids, mask = self.input_ids, self.attention_mask
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise InvalidRequest(f"input_ids must be (batch, tokens) with both at least 1, got shape {tuple(ids.shape)}")
        for name, tensor in (("attention_mask", mask), ("token_type_ids", self.token_type_ids)):
            if tensor is not None and tensor.shape != ids.shape:
                raise InvalidRequest(f"{name} has shape {tuple(tensor.shape)}, input_ids {tuple(ids.shape)}; they must match")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise InvalidRequest("attention_mask must hold only 0 and 1")
        starts_with_token = mask[:, 0] == 1
        ones_then_zeros = (mask[:, 1:] <= mask[:, :-1]).all(dim=1)
        bad = (~(starts_with_token & ones_then_zeros)).nonzero().flatten().tolist()
        if bad:
            raise InvalidRequest(f"rows {bad} are empty or not right-padded (attention_mask must be ones then zeros); "
                                 f"pad on the right, as `encode` does")

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) tokens per row, padding excluded."""
        return self.attention_mask.sum(dim=1)

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device)}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids.to(device)
        return inputs


def encode(tokenizer: Callable, texts: Sequence[str], max_length: int | None = None,
           truncation: bool = True) -> EncodedBatch:
    """Tokenize `texts` into one right-padded batch (truncated to max_length, else the tokenizer's limit)."""
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("texts must be a non-empty list of strings (wrap a single text in a list)")
    out = tokenizer(list(texts), padding=True, truncation=truncation, max_length=max_length,
                    return_tensors="pt", padding_side="right")
    return EncodedBatch(out["input_ids"], out["attention_mask"], out.get("token_type_ids"))


def from_token_ids(rows: Sequence[Sequence[int]], pad_token_id: int = 0) -> EncodedBatch:
    """Right-pad pre-tokenized rows (ids already including special tokens such as [CLS] / [SEP])."""
    if not rows or any(len(row) == 0 for row in rows):
        raise InvalidRequest("token id rows must be a non-empty list of non-empty lists")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[b, :len(row)] = 1
    return EncodedBatch(ids, mask)


@dataclass(frozen=True)
class Classification:
    """One row's result under its adapter's head."""

    label: str
    """The label with the highest logit."""
    scores: dict[str, float]
    """label -> softmax probability."""
    logits: torch.Tensor
    """(num_labels,) float32 on the CPU, in the head's label order."""


def pool_cls(outputs, batch: EncodedBatch) -> torch.Tensor:
    """BERT's pooler output: tanh(dense(h[:, 0])), (B, hidden)."""
    return outputs.pooler_output


def pool_last(outputs, batch: EncodedBatch) -> torch.Tensor:
    """The last non-pad token's hidden state (decoder seq-cls), (B, hidden)."""
    hidden = outputs.last_hidden_state  # (B, T, H)
    last = (batch.lengths - 1).to(hidden.device)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLING: dict[str, Callable] = {"classifier": pool_cls, "score": pool_last}
"""Head module name -> what its *ForSequenceClassification feeds it."""


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each row's hidden states over its non-pad tokens, in float32: (B, T, H), (B, T) -> (B, H)."""
    weights = mask.to(device=hidden.device, dtype=torch.float32)[..., None]  # (B, T, 1)
    return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1)


Inputs = Sequence[str] | Sequence[Sequence[int]] | EncodedBatch
"""Texts (needs a tokenizer), pre-tokenized id rows (right-padded here), or an EncodedBatch."""


class EncoderRunner:
    """Classification and embeddings over an AdapterEngine whose model is an encoder (`AutoModel`) or a
    `*ForSequenceClassification`; the backbone is `model.base_model`, the model's own head is not used."""

    def __init__(self, engine: AdapterEngine, tokenizer: Callable | None = None, max_length: int | None = None) -> None:
        backbone = getattr(engine.model, "base_model", None)
        if backbone is None:
            raise EngineError("the engine's model has no base_model; serve a transformers encoder or "
                              "*ForSequenceClassification model")
        pooler_paths = [path for path in engine.layers if "pooler" in path.split(".")]
        if pooler_paths:
            raise EngineError(f"the pooler layers {pooler_paths} are served by the engine, but the pooler sees one "
                              f"token per row; create the engine with target_modules that exclude the pooler")
        self.engine, self.backbone = engine, backbone
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad_token_id = getattr(getattr(engine.model, "config", None), "pad_token_id", None) or 0

    def batch_of(self, inputs: Inputs) -> EncodedBatch:
        if isinstance(inputs, EncodedBatch):
            return inputs
        if isinstance(inputs, str) or not inputs:
            raise InvalidRequest("inputs must be a non-empty list of texts or token id rows, or an EncodedBatch")
        if all(isinstance(x, str) for x in inputs):
            if self.tokenizer is None:
                raise InvalidRequest("texts need a tokenizer: create the EncoderRunner with one, or pass token ids")
            return encode(self.tokenizer, inputs, self.max_length)
        if all(isinstance(x, Sequence) and all(isinstance(i, int) for i in x) for x in inputs):
            return from_token_ids(inputs, self.pad_token_id)
        raise InvalidRequest("inputs must be all texts or all token id rows, not a mix")

    def _context(self, batch: EncodedBatch, requests: Sequence[Selection]) -> BatchContext:
        """Validates the requests (ids loaded, mixtures well-formed) without running anything."""
        if self.engine.model.training:
            raise EngineError("the model is in training mode (dropout active); call model.eval() before serving")
        rows = batch.input_ids.shape[0]
        if len(requests) != rows:
            raise InvalidRequest(f"{len(requests)} adapter requests for {rows} input rows; give one per row "
                                 f"(None for the base model)")
        return self.engine.context(requests, tokens_per_row=batch.input_ids.shape[1])

    def _forward(self, batch: EncodedBatch, context: BatchContext):
        with torch.no_grad(), self.engine.batch(context):
            return self.backbone(**batch.model_inputs(self.engine.device))

    def _head(self, row: int, request: Selection) -> Head:
        """The one head row `row` is classified with; InvalidRequest / AdapterMismatch naming the adapter."""
        if request is None:
            raise InvalidRequest(f"row {row}: classification needs an adapter with a head; None (the base model) "
                                 f"has no head in this engine")
        names = [request] if isinstance(request, str) else list(request)
        heads = [(name, self.engine.head(name)) for name in names]
        for name, head in heads:
            if head is None:
                task = self.engine.slots.adapter(name).task_type
                raise InvalidRequest(f"row {row}: adapter {name!r} (task {task!r}) carries no classification head; "
                                     f"classify with a seq-cls adapter that has one, or use embed()")
        first_name, first = heads[0]
        differing = [name for name, head in heads[1:] if not head.same_as(first)]
        if differing:
            raise AdapterMismatch(f"row {row}: a mixture must share one head, but {differing} differ from "
                                  f"{first_name!r}'s head or labels; mix adapters trained with one head")
        if first.name not in POOLING:
            raise AdapterMismatch(f"row {row}: adapter {first_name!r} has a head {first.name!r} this runner cannot pool "
                                  f"for (known: {sorted(POOLING)})")
        if first.name == "classifier" and getattr(self.backbone, "pooler", None) is None:
            raise AdapterMismatch(f"row {row}: adapter {first_name!r} has a BERT-style 'classifier' head, which reads "
                                  f"the pooler output, but this base has no pooler")
        return first

    def classify(self, inputs: Inputs, adapters: Sequence[Selection]) -> list[Classification]:
        """Row b classified by adapters[b] (an id, or a mixture whose members share one head)."""
        batch = self.batch_of(inputs)
        context = self._context(batch, adapters)
        heads = [self._head(row, request) for row, request in enumerate(adapters)]
        outputs = self._forward(batch, context)
        pooled = {name: POOLING[name](outputs, batch) for name in {h.name for h in heads}}  # name -> (B, H)
        logits: list[torch.Tensor | None] = [None] * len(heads)
        for head in {id(h): h for h in heads}.values():
            rows = [b for b, h in enumerate(heads) if h is head]
            out = head(pooled[head.name][rows]).float().cpu()  # (len(rows), num_labels)
            for i, b in enumerate(rows):
                logits[b] = out[i]
        return [classification(row_logits, head.labels) for row_logits, head in zip(logits, heads)]

    def embed(self, inputs: Inputs, adapters: Sequence[Selection], normalize: bool = False) -> torch.Tensor:
        """(B, hidden) float32: mean of the last hidden state over each row's tokens under adapters[b]
        (None = base), L2-normalized when `normalize`."""
        batch = self.batch_of(inputs)
        outputs = self._forward(batch, self._context(batch, adapters))
        embeddings = mean_pool(outputs.last_hidden_state, batch.attention_mask)  # (B, H)
        return F.normalize(embeddings, dim=-1) if normalize else embeddings


def classification(logits: torch.Tensor, labels: tuple[str, ...]) -> Classification:
    probs = torch.softmax(logits, dim=-1)
    return Classification(label=labels[int(logits.argmax())],
                          scores={label: float(p) for label, p in zip(labels, probs)}, logits=logits)
