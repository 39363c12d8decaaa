"""The encoder task: a transformer backbone + pooling (+ optional L2 normalisation) with its tokenizer.

This is the pipeline sentence-transformers runs (modules.json: Transformer -> Pooling -> Normalize)
for any BERT-family backbone (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, MPNet, ...). The backbone is
held as ``self.bert`` for every family (the first bundled model was BERT; saved folders and layer
patterns such as ``bert.encoder.layer.*`` keep that name).
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

POOLINGS = ("mean", "cls", "max")


def mean_pool(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over positions where attention_mask is 1: (B, T, H), (B, T) -> (B, H)."""
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)  # (B, T, 1)
    summed = (token_states * mask).sum(dim=1)  # (B, H)
    counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return summed / counts


def pool(token_states: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) token states -> (B, H) by masked mean, the first token ([CLS]) or masked max."""
    if how == "mean":
        return mean_pool(token_states, attention_mask)
    if how == "cls":
        return token_states[:, 0]
    masked = token_states.masked_fill(attention_mask.unsqueeze(-1) == 0, float("-inf"))  # (B, T, H)
    return masked.amax(dim=1)


class SentenceEncoder(nn.Module):
    """Backbone + pooling + optional L2 normalisation, with its tokenizer attached.

    Inference on a W8A8-dynamic BERT (int8 embeddings, every linear a ``DynamicQLinear``, mean
    pooling) runs the whole forward as one C call (:mod:`lowbit.kernels.bert_encoder`) when
    ``fused`` is true and no gradient is wanted; its reference twin is this module's torch forward,
    which runs with ``fused = False`` or whenever the fused encoder does not apply.
    """

    model_name = "encoder"
    task = "encoder"
    fused = True  # take the fused C encoder where it applies (set False for the torch forward)

    def __init__(self, bert: nn.Module, tokenizer, max_seq_length: int = 256, *, model_name: str | None = None,
                 pooling: str = "mean", normalize: bool = True, source: str = ""):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.bert = bert
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.pooling, self.normalize = pooling, normalize
        if model_name is not None:
            self.model_name = model_name
        self.source = source
        self.architecture = type(bert).__name__
        accepted = inspect.signature(bert.forward).parameters
        self._takes_token_types = "token_type_ids" in accepted

    @property
    def embedding_dim(self) -> int:
        return int(self.bert.config.hidden_size)

    def wrapper_spec(self) -> dict:
        """What ``lowbit.load`` needs to rebuild this wrapper around a backbone (JSON-able)."""
        return {"kind": "encoder", "max_seq_length": self.max_seq_length, "pooling": self.pooling,
                "normalize": self.normalize, "model_name": self.model_name}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sentence embeddings (B, H) from token ids (B, T); unit norm when ``normalize``."""
        if (self.fused and not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing()):  # exporters trace the torch forward
            runner = self._fused_runner()
            if runner is not None:
                return runner(input_ids, attention_mask, token_type_ids)
        extra = {"token_type_ids": token_type_ids} if self._takes_token_types else {}
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, **extra)
        pooled = pool(out.last_hidden_state, attention_mask, self.pooling)  # (B, H)
        return nn.functional.normalize(pooled.float(), p=2, dim=1) if self.normalize else pooled.float()

    def fused_runs(self) -> bool:
        """True when inference calls run the one-call C encoder (:mod:`lowbit.kernels.bert_encoder`)."""
        return bool(self.fused) and self._fused_runner() is not None

    def _fused_runner(self):
        from lowbit.kernels.bert_encoder import fused_encoder

        runner, why = fused_encoder(self)
        if runner is None and why != self.__dict__.get("_fused_why"):
            self.__dict__["_fused_why"] = why  # log each reason once
            log.debug("torch forward for %s: %s", self.model_name, why)
        return runner

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        """Token ids, attention mask (and token types), padded to the longest sentence, truncated."""
        return self.tokenizer(
            list(sentences),
            padding=True,
            truncation="longest_first",
            max_length=self.max_seq_length,
            return_tensors="pt",
        )

    def encode(self, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
        """Embeddings (N, H) for N sentences, in input order; batches are formed by length to cut padding."""
        sentences = list(sentences)
        if not sentences:
            return torch.empty(0, self.embedding_dim)
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out = torch.empty(len(sentences), self.embedding_dim)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                features = self.tokenize([sentences[i] for i in idx])
                emb = self(
                    features["input_ids"],
                    features["attention_mask"],
                    features.get("token_type_ids"),
                )
                out[idx] = emb.float()
        return out
