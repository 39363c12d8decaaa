"""``HadamardMLP``: a gated MLP with an online Hadamard rotation on down_proj's input (QuaRot).

The product ``act(gate(x)) * up(x)`` has no norm or linear before it that could absorb a rotation,
so it is rotated at run time: ``down((act(gate(x)) * up(x)) H_n / sqrt(n))`` with the inverse
``H_n`` folded into down_proj's weight by ``lowbit.algorithms.rotation`` (``(h H)(W H)^T = h W^T``).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.kernels.hadamard import hadamard_transform
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


__all__ = ["HadamardMLP"]
