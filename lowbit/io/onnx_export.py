"""Export a static-quantized model to ONNX in QDQ form (QuantizeLinear / DequantizeLinear pairs).

Each :class:`StaticQLinear` / :class:`StaticQConv2d` is written as

    x -> [x * smooth_inv] -> QuantizeLinear(s_x, z_x) -> DequantizeLinear -> MatMul/Gemm/Conv <- DequantizeLinear(uint8 W, s_W, 128, axis 0)

which is the representation ONNX Runtime's quantization tools produce and its CPU provider fuses
into integer kernels (QLinearConv / MatMulInteger). Weights are stored as uint8 initializers with
zero-point 128, i.e. lowbit's int8 codes + 128 (the ``QuantizeLinear`` of a constant float weight is
folded away after export), so the file holds the same values lowbit computed. uint8 rather than int8
weights: on x86 without VNNI (AVX2) ORT runs int8-weight graphs through u8s8 kernels whose int16 pair
sums saturate (measured on the digits CNN: logits off by up to 3.8, 1.1 % of labels changed); its
u8u8 kernels are exact. Float-only layers (LayerNorm, softmax, ...) are exported as they are.

ONNX int8 is ``[-128, 127]``; lowbit's symmetric activations use ``[-127, 127]``, so only a value
below ``-127.5 s_x`` (outside the calibrated range) can round differently.
"""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.api import set_submodule
from lowbit.errors import ConfigError
from lowbit.io.atomic import atomic_write_bytes
from lowbit.nn.static import StaticQConv2d, StaticQLinear

log = logging.getLogger(__name__)

OPSET = 17


class _QDQ(nn.Module):
    """Export-time stand-in for a static int8 module: fake-quant ops that the exporter turns into Q/DQ."""

    def __init__(self, m):
        super().__init__()
        self.conv = isinstance(m, StaticQConv2d)
        self.scale, self.zp = float(m.act_scale), int(m.act_zero_point)
        w = m.qweight_t.t().float()  # (N, K), integer values
        if self.conv:
            w = w.reshape(m.out_channels, m.in_channels, *m.kernel_size)
            self.stride, self.padding = m.stride, m.padding
        self.register_buffer("w", w * m.w_scale.reshape(-1, *([1] * (w.dim() - 1))))
        self.register_buffer("w_scale", m.w_scale.clone())
        # weights go out as uint8 with zero-point 128 (the same values as int8 codes, exactly): ORT's
        # u8s8 kernels on x86 without VNNI (AVX2) saturate int16 pair sums, u8u8 ones do not.
        self.register_buffer("w_zp", torch.full((m.w_scale.shape[0],), 128, dtype=torch.int32))
        self.register_buffer("bias", None if m.bias is None else m.bias.clone())
        self.register_buffer("smooth_inv", None if m.smooth_inv is None else m.smooth_inv.clone())

    def forward(self, x):
        if self.smooth_inv is not None:
            x = x * self.smooth_inv
        x = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zp, -128, 127)
        w = torch.fake_quantize_per_channel_affine(self.w, self.w_scale, self.w_zp, 0, 0, 255)
        if self.conv:
            return F.conv2d(x, w, self.bias, self.stride, self.padding)
        return F.linear(x, w, self.bias)


def _fold_weight_quantize(model_proto):
    """Replace ``QuantizeLinear(constant float W)`` by the int8 initializer it computes."""
    import numpy as np
    from onnx import numpy_helper

    graph = model_proto.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    keep, folded = [], 0
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and all(i in consts for i in node.input) and consts[node.input[0]].ndim > 1:
            w, s = consts[node.input[0]], consts[node.input[1]]
            z = consts[node.input[2]] if len(node.input) > 2 else np.zeros_like(s, dtype=np.int8)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * w.ndim
            if s.ndim:
                shape[axis] = -1
            lo, hi = np.iinfo(z.dtype).min, np.iinfo(z.dtype).max
            q = np.clip(np.rint(w / s.reshape(shape)) + z.reshape(shape).astype(np.float32), lo, hi).astype(z.dtype)
            graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
            folded += 1
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:  # the float weights the folded QuantizeLinear nodes consumed
        graph.initializer.remove(t)
    return folded


def export_onnx(model: nn.Module, path: str | Path, example_inputs: tuple, input_names: list[str] | None = None,
                output_names: list[str] | None = None, dynamic_axes: dict | None = None, opset: int = OPSET) -> dict:
    """Write ``model`` (with static int8 modules) as a QDQ ONNX file atomically; returns a summary."""
    import onnx

    qdq = copy.deepcopy(model)
    n = 0
    for name, m in list(qdq.named_modules()):
        if isinstance(m, (StaticQLinear, StaticQConv2d)):
            set_submodule(qdq, name, _QDQ(m))
            n += 1
    if n == 0:
        raise ConfigError("export_onnx expects a static-quantized model (w8a8-static); no StaticQLinear/Conv2d found")
    qdq.eval()
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(qdq, example_inputs, buf, opset_version=opset, dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    folded = _fold_weight_quantize(proto)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    atomic_write_bytes(Path(path), data)
    ops = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    log.info("exported %s: %d quantized layers, %d 8-bit weight initializers, %.2f MB", path, n, folded, len(data) / 1e6)
    return {"path": str(path), "quantized_layers": n, "quantized_weights": folded, "bytes": len(data), "ops": ops}
