"""Modules with an online Hadamard rotation that ``lowbit.algorithms.rotation`` (QuaRot) leaves in a model.

- :class:`HadamardMLP`: the product ``act(gate(x)) * up(x)`` has no norm or linear before it that
  could absorb a rotation, so it is rotated at run time: ``down((act(gate(x)) * up(x)) H_n / sqrt(n))``
  with the inverse ``H_n`` folded into down_proj's weight (``(h H)(W H)^T = h W^T``).
- :class:`RotatedRMSNorm`: the final norm of a model whose embedding table is tied to its LM head.
  The table is rotated once (``E Q``), so the tied head reads ``E Q`` too; the norm's weight ``g``
  cannot be folded into a tied head, so it is applied in the unrotated basis:
  ``rms(x) Q^T diag(g) Q = ((rms(x) H^T) * g) H`` for ``Q = D H`` (the ±1 diagonal ``D`` cancels).
  Logits: ``rms(h Q) Q^T diag(g) Q (E Q)^T = rms(h) diag(g) E^T``, the unrotated model's.

:func:`rotation_modules` names the modules of a model that only its own forward runs correctly.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.kernels.hadamard import hadamard_transform, hadamard_transform_t
from lowbit.nn.base import register_qmodule


@register_qmodule
class HadamardMLP(nn.Module):
    """A gated MLP with an online Hadamard on down_proj's input:
    ``down((act(gate(x)) * up(x)) H_n / sqrt(n))``, ``n`` = intermediate size.

    Holds ``gate_proj``, ``up_proj``, ``down_proj`` under the names of the MLP it replaces, so every
    method finds them where they were (GPTQ's Hessian of down_proj is then the rotated one). Saved
    like a quantized layer: its spec names only the activation; the three linears are layers of
    their own in ``metadata.json`` (``from_spec`` leaves ``nn.Identity`` placeholders for them, which
    ``lowbit.load`` replaces right after, since this layer is recorded before them).
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, hidden_act: str = "silu"):
        super().__init__()
        from transformers.activations import ACT2FN

        if hidden_act not in ACT2FN:
            raise ConfigError(f"unknown MLP activation {hidden_act!r}")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # (B, T, n)
        return self.down_proj(hadamard_transform(h))

    def spec(self) -> dict:
        return {"class": type(self).__name__, "hidden_act": self.hidden_act}

    @classmethod
    def from_spec(cls, spec: dict) -> "HadamardMLP":
        return cls(nn.Identity(), nn.Identity(), nn.Identity(), **spec)


@register_qmodule
class RotatedRMSNorm(nn.Module):
    """RMSNorm whose weight acts in the unrotated basis: ``y = ((rms(x) H^T) * (offset + g)) H``,
    ``rms(x) = x / sqrt(mean(x^2) + eps)``, ``H`` the orthogonal Hadamard of the hidden size (fast
    transforms, ``n log n``). Replaces the final norm of a rotated model whose LM head stays tied to
    the (rotated) embedding table; the state is the norm's own ``weight`` under its own name."""

    def __init__(self, hidden: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.hidden, self.eps, self.offset = int(hidden), float(eps), float(offset)
        self.weight = nn.Parameter(torch.ones(self.hidden))

    @classmethod
    def from_norm(cls, norm: nn.Module, offset: float = 0.0) -> "RotatedRMSNorm":
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
        if eps is None or getattr(norm, "bias", None) is not None:
            raise ConfigError(f"{type(norm).__name__} is not an RMSNorm with a weight and an epsilon")
        new = cls(norm.weight.shape[0], eps, offset)
        new.weight.data = norm.weight.detach().clone()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., hidden)
        g = self.offset + self.weight.float()
        return hadamard_transform(hadamard_transform_t(x) * g).to(dtype)

    def spec(self) -> dict:
        return {"class": type(self).__name__, "hidden": self.hidden, "eps": self.eps, "offset": self.offset}

    @classmethod
    def from_spec(cls, spec: dict) -> "RotatedRMSNorm":
        return cls(**spec)


def rotation_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose online rotations only the model's own forward runs (kernels and
    exporters that read the weights directly must refuse such a model)."""
    return [n for n, m in model.named_modules() if isinstance(m, (HadamardMLP, RotatedRMSNorm))]


__all__ = ["HadamardMLP", "RotatedRMSNorm", "rotation_modules"]
