"""Export a quantized sentence encoder to ONNX: ``input_ids`` + ``attention_mask`` in, sentence embedding out.

The graph is the whole :class:`~lowbit.models.encoder.SentenceEncoder` (backbone, masked pooling, L2
normalisation) traced with ``torch.onnx.export(dynamo=False)``, batch and sequence axes dynamic, with
each quantized module replaced by the ONNX ops of its own arithmetic:

- :class:`DynamicQLinear` (W8A8-dynamic, ``lowbit.kernels.int8_dynamic``), per token ``m``::

      x' = x * smooth_inv                                   (Mul; SmoothQuant's 1/s, stored per layer)
      s[m] = max(ReduceMax(|x'[m]|) / 127, eps)             (Abs, ReduceMax, Div, Max)
      u = Cast<uint8>(Clip(Round(x' / s), -127, 127) + 128)  (Round is half-to-even, as torch.round)
      acc = MatMulInteger(u, W_u8, 128, 128)                (int32, exact: sum (u-128)(w-128))
      y = Cast<float>(acc) * (s * w_scale) + bias

  The integer codes equal lowbit's (same division, same rounding), so the result differs from
  lowbit's only where the float ops around it (attention, GELU, LayerNorm in ORT's kernels) move an
  activation across a rounding boundary. Weights are uint8 with zero-point 128, i.e. lowbit's int8
  codes + 128, and activations are shifted the same way: on x86 without VNNI (AVX2) ORT's u8s8 GEMM
  sums int16 pairs with saturation, its u8u8 one is exact (see ``lowbit.io.onnx_export``).
  SmoothQuant factors are not foldable into the LayerNorm before Q/K/V: each of the three layers has
  its own ``s`` (computed from the shared input range and its own weight), so they stay one Mul each.

- ``activations="per-tensor"`` writes instead ``DynamicQuantizeLinear(x') -> MatMulInteger(u, W_u8,
  z_x, 128) -> * (s_x * w_scale) + bias``, the pattern ORT's ``quantize_dynamic`` produces and
  fuses into its ``DynamicQuantizeMatMul`` kernel. ``DynamicQuantizeLinear`` is per *tensor* uint8
  asymmetric: ``s_x = (max(0, max x') - min(0, min x')) / 255``, ``z_x = round(-min(0, min x') / s_x)``
  over the whole (B, T, K) activation. That is not lowbit's arithmetic: one outlier token sets the
  step for every token in the batch (padding included), so a sentence's embedding depends on which
  sentences share its batch, and fidelity is lower. The default, ``"per-token"``, is lowbit's.

- :class:`QEmbedding`: ``Gather`` on the int8 table, ``Cast``, times ``Gather`` of the per-row scale.
- :class:`WeightOnlyQLinear` at 4 bits: ``com.microsoft.MatMulNBits`` (``lowbit.io.onnx_nbits``).
"""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path

import torch
from torch import nn

from lowbit.api import set_submodule
from lowbit.errors import ConfigError
from lowbit.io.onnx_common import write_onnx
from lowbit.io.onnx_nbits import MatMulNBitsLinear
from lowbit.kernels.int8_dynamic import ACT_SCALE_EPS
from lowbit.nn import DynamicQLinear, WeightOnlyQLinear
from lowbit.nn.base import QMODULES
from lowbit.nn.qembedding import QEmbedding

log = logging.getLogger(__name__)

OPSET = 17
ACTIVATIONS = ("per-token", "per-tensor")
WEIGHT_ZERO_POINT = 128  # uint8 weights = int8 codes + 128
TOKEN_ZERO_POINT = 128  # per-token codes in [-127, 127] shifted into uint8 [1, 255]


class _MatMulInteger(torch.autograd.Function):
    """ONNX ``MatMulInteger(a, b, a_zp, b_zp)``; the torch forward (used only while tracing) is exact."""

    @staticmethod
    def forward(ctx, a, b, a_zp, b_zp):
        # float64 holds every partial sum exactly (|sum| <= 255^2 K << 2^53)
        return ((a.double() - a_zp.double()) @ (b.double() - b_zp.double())).to(torch.int32)

    @staticmethod
    def symbolic(g, a, b, a_zp, b_zp):
        return g.op("MatMulInteger", a, b, a_zp, b_zp)


class _DynamicQuantizeLinear(torch.autograd.Function):
    """ONNX ``DynamicQuantizeLinear(x) -> (uint8 codes, scale, zero_point)``, per tensor (spec'd formula)."""

    @staticmethod
    def forward(ctx, x):
        lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
        scale = ((hi - lo) / 255.0).clamp_min(ACT_SCALE_EPS)
        zp = torch.round(-lo / scale).clamp(0, 255)
        u = (torch.round(x / scale) + zp).clamp(0, 255).to(torch.uint8)
        return u, scale, zp.to(torch.uint8)

    @staticmethod
    def symbolic(g, x):
        return g.op("DynamicQuantizeLinear", x, outputs=3)


class DynamicQLinearOnnx(nn.Module):
    """Export-time stand-in for :class:`DynamicQLinear`: the ops in the module docstring."""

    def __init__(self, m: DynamicQLinear, activations: str = "per-token"):
        super().__init__()
        self.per_token = activations == "per-token"
        # (K, N) uint8: int8 codes + 128, the same values exactly
        self.register_buffer("w_u8", (m.qweight_t.to(torch.int16) + WEIGHT_ZERO_POINT).to(torch.uint8))
        self.register_buffer("w_scale", m.w_scale.detach().float().clone())
        self.register_buffer("w_zp", torch.tensor(WEIGHT_ZERO_POINT, dtype=torch.uint8))
        self.register_buffer("x_zp", torch.tensor(TOKEN_ZERO_POINT, dtype=torch.uint8))
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())
        self.register_buffer("smooth_inv", None if m.smooth_inv is None else m.smooth_inv.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth_inv is not None:
            x = x * self.smooth_inv
        if self.per_token:
            s = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(ACT_SCALE_EPS)  # (B, T, 1)
            u = (torch.round(x / s).clamp(-127, 127) + TOKEN_ZERO_POINT).to(torch.uint8)  # (B, T, K)
            acc = _MatMulInteger.apply(u, self.w_u8, self.x_zp, self.w_zp)  # (B, T, N) int32
        else:
            u, s, zp = _DynamicQuantizeLinear.apply(x)  # s, zp: scalars
            acc = _MatMulInteger.apply(u, self.w_u8, zp, self.w_zp)
        if self.per_token:
            # (acc * s) * w_scale, not acc * (s * w_scale) as lowbit: ORT's MatMulIntegerToFloat fusion
            # takes the two factors of a scale product for per-tensor scales and reads s (B, T, 1)
            # as one number (measured: cosine 0.53 to the unfused graph); this order is left unfused.
            y = (acc.float() * s) * self.w_scale
        else:
            y = acc.float() * (s * self.w_scale)
        return y if self.bias is None else y + self.bias


def _check_encoder(model: nn.Module) -> None:
    task = getattr(model, "task", None)
    if task != "encoder":
        raise ConfigError(f"ONNX encoder export needs a sentence encoder (task 'encoder'); got "
                          f"{type(model).__name__} (task {task!r}). Causal LMs: --format gguf or hf, or "
                          "lowbit.io.onnx_nbits.export_weight_only_onnx for their 4-bit linears")


def encoder_standins(model: nn.Module, activations: str = "per-token") -> tuple[nn.Module, dict]:
    """A deep copy of ``model`` with every quantized module swapped for its ONNX stand-in; counts per kind."""
    if activations not in ACTIVATIONS:
        raise ConfigError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    out = copy.deepcopy(model).eval()
    counts = {"int8_linears": 0, "int4_linears": 0, "int8_embeddings": 0}
    unsupported = []
    for name, m in list(out.named_modules()):
        if isinstance(m, DynamicQLinear):
            set_submodule(out, name, DynamicQLinearOnnx(m, activations))
            counts["int8_linears"] += 1
        elif isinstance(m, WeightOnlyQLinear):
            set_submodule(out, name, MatMulNBitsLinear(m))  # raises for what MatMulNBits cannot hold
            counts["int4_linears"] += 1
        elif isinstance(m, QEmbedding):
            counts["int8_embeddings"] += 1  # its forward (Gather int8, Cast, Mul) exports as it is
        elif type(m).__name__ in QMODULES:
            unsupported.append(f"{name} ({type(m).__name__})")
    if unsupported:
        raise ConfigError("ONNX encoder export handles DynamicQLinear (w8a8-dynamic), 4-bit WeightOnlyQLinear "
                          f"and QEmbedding; cannot export {', '.join(unsupported[:4])}"
                          + (f" and {len(unsupported) - 4} more" if len(unsupported) > 4 else ""))
    if not counts["int8_linears"] + counts["int4_linears"]:
        raise ConfigError(f"{type(model).__name__} has no quantized linear layers; quantize it first "
                          "(lowbit quantize --scheme w8a8-dynamic) — an fp32 encoder exports with torch.onnx.export")
    return out, counts


def export_encoder_onnx(model: nn.Module, path: str | Path, activations: str = "per-token",
                        overwrite: bool = False, opset: int = OPSET) -> dict:
    """Write the quantized encoder as ONNX (atomically); returns a summary (counts, bytes, op histogram)."""
    import onnx

    path = Path(path)
    _check_encoder(model)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists (use --force / overwrite=True to replace it)")
    graph_model, counts = encoder_standins(model, activations)
    sentences = ["An example sentence to trace the graph.", "A second, shorter one."]
    features = model.tokenize(sentences)
    names = ["input_ids", "attention_mask"]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "sentence_embedding": {0: "batch"}}
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(graph_model, (features["input_ids"], features["attention_mask"]), buf, opset_version=opset,
                          dynamo=False, input_names=names, output_names=["sentence_embedding"], dynamic_axes=axes,
                          do_constant_folding=True)
    size, ops = write_onnx(onnx.load_from_string(buf.getvalue()), path)
    log.info("exported %s: %s, activations %s, %.2f MB", path, counts, activations, size / 1e6)
    return {"path": str(path), "activations": activations, **counts, "bytes": size, "ops": ops}


def run_encoder_onnx(path: str | Path, features: dict, threads: int | None = None) -> torch.Tensor:
    """Sentence embeddings (B, H) from the exported file in onnxruntime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"input_ids": features["input_ids"].numpy().astype("int64"),
            "attention_mask": features["attention_mask"].numpy().astype("int64")}
    return torch.from_numpy(sess.run(None, feed)[0])


def verify_encoder_onnx(model: nn.Module, path: str | Path, sentences: list[str]) -> dict:
    """Cosine between onnxruntime's and lowbit's embeddings of ``sentences`` (one batch): mean and min."""
    features = model.tokenize(sentences)
    got = run_encoder_onnx(path, features)
    with torch.inference_mode():
        want = model(features["input_ids"], features["attention_mask"]).float()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "max_abs": float((got - want).abs().max()), "n": len(sentences)}
