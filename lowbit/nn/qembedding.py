"""Int8 embedding tables: one symmetric scale per row (token), ``E[i] ≈ s_i * q_i``.

Word and position embeddings are most of a small encoder's bytes (MiniLM: 47.7 MB of 90.9 MB);
storing them int8 is what lets the whole model shrink ~4x, as ONNX Runtime's quantizer does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import choose_qparams, per_channel, quantize
from lowbit.nn.base import register_qmodule


@register_qmodule
class QEmbedding(nn.Module):
    """``forward(ids) = qweight[ids] * scale[ids]``; the reference dequantizes the whole table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> "QEmbedding":
        w = emb.weight.detach().float()
        qp = choose_qparams(w, "int8", symmetric=True, granularity=per_channel(0))
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
        m.qweight.copy_(quantize(w, qp))
        m.scale.copy_(qp.scale)
        return m

    def spec(self) -> dict:
        return {"class": type(self).__name__, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx}

    @classmethod
    def from_spec(cls, spec: dict) -> "QEmbedding":
        return cls(**spec)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (N, D), for code that reads ``embedding.weight`` (e.g. tied heads)."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)

    def forward_ref(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"
