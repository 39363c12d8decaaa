"""The causal-LM task: a Hugging Face ``*ForCausalLM`` with its tokenizer attached."""

from __future__ import annotations

import torch
from torch import nn


class CausalLM(nn.Module):
    """A Hugging Face causal LM with its tokenizer; ``forward`` returns next-token logits (B, T, vocab)."""

    model_name = "causal-lm"
    task = "causal-lm"

    def __init__(self, lm: nn.Module, tokenizer, *, model_name: str | None = None, source: str = ""):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        if model_name is not None:
            self.model_name = model_name
        self.source = source
        self.architecture = type(lm).__name__

    def wrapper_spec(self) -> dict:
        """What ``lowbit.load`` needs to rebuild this wrapper around a backbone (JSON-able)."""
        return {"kind": "causal-lm", "model_name": self.model_name}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T), without a KV cache."""
        return self.lm(input_ids=input_ids, use_cache=False).logits
