"""ONNX export of quantized models, run in onnxruntime: the W8A8-dynamic MiniLM encoder (MatMulInteger,
int8 embeddings) and weight-only linears as com.microsoft.MatMulNBits (tiny Llama)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.algorithms.dynamic import Int8DynamicConfig
from lowbit.algorithms.rtn import WeightOnlyConfig
from lowbit.errors import ConfigError
from lowbit.nn import WeightOnlyQLinear
from tests._tiny_llama import tiny_batches, tiny_llama

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from lowbit.io.onnx_encoder import export_encoder_onnx, run_encoder_onnx  # noqa: E402
from lowbit.io.onnx_nbits import (  # noqa: E402
    export_causal_lm_onnx,
    matmulnbits_tensors,
    matmulnbits_weight_ref,
)

# The fidelity floor for the exported MiniLM against fp32 sentence embeddings (lowbit's own
# W8A8 model: 0.99912 / 0.99776 on these 256 sentences).
FP32_COS_MEAN_MIN, FP32_COS_MIN = 0.998, 0.995
# ORT vs lowbit: the same integer arithmetic, but ORT's float kernels (attention, GELU, LayerNorm) and the
# re-associated scale product differ from torch's by ~1 ulp, and per-token int8 rounding amplifies that:
# an activation moved across a rounding boundary is one code off, and the change propagates through the
# following layers. (In torch alone, (acc * s) * w_scale instead of acc * (s * w_scale) already gives
# cosine min 0.99962 on a batch of 32; with lowbit's order the stand-in is bit-identical.) Measured on
# the 256 sentences (per-linear SmoothQuant factors, before Q/K/V shared them): mean 0.99986, min 0.99894 — as close as two equally valid W8A8 roundings get; the
# distance to fp32 (0.99912 / 0.99777) is the same as lowbit's own (0.99911 / 0.99761).
ONNX_VS_LOWBIT_COS_MEAN_MIN = 0.9995
ONNX_VS_LOWBIT_COS_MIN = 0.998
# MatMulNBits (fp32 in ORT) vs lowbit's reference kernel (fp32 F.linear on the same dequantized
# weights): accumulation order only; measured 3.6e-7 on logits of magnitude ~1.4.
NBITS_LOGIT_MAX_ABS_REF = 1e-4
# vs lowbit's fast int4 kernel, which runs activations in bf16 (8 mantissa bits): ~1e-2 on these logits.
NBITS_LOGIT_MAX_ABS_FAST = 5e-2


@pytest.fixture(scope="module")
def w8a8(minilm):
    return lowbit.quantize(copy.deepcopy(minilm), Int8DynamicConfig())


@pytest.fixture(scope="module")
def exported(w8a8, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx_enc") / "minilm_w8a8.onnx"
    return path, export_encoder_onnx(w8a8, path)


def _batches(model, sentences, size=32):
    for start in range(0, len(sentences), size):
        yield model.tokenize(sentences[start:start + size])


def test_graph_is_integer(exported):
    path, summary = exported
    assert summary["int8_linears"] == 36 and summary["int8_embeddings"] == 3  # 6 layers x 6 linears
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulInteger") == 36 and ops.count("MatMul") == 12  # the 12 are attention's QK^T, PV
    inits = {t.name: t for t in proto.graph.initializer}
    u8 = [t for t in inits.values() if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 2]
    assert len(u8) == 36  # weights: int8 codes + 128
    i8 = [t for t in inits.values() if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(i8) == 3  # word, position, token-type tables
    assert not [t for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 384 * 384]
    assert summary["bytes"] < 25e6  # fp32 graph: 90.4 MB
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]


def test_onnxruntime_matches_lowbit_and_fp32(exported, w8a8, minilm):
    from lowbit.data import eval_sentences

    path, _ = exported
    sentences = eval_sentences(256)
    got, want, ref = [], [], []
    with torch.inference_mode():
        for f in _batches(w8a8, sentences):
            got.append(run_encoder_onnx(path, f))
            want.append(w8a8(f["input_ids"], f["attention_mask"]))
            ref.append(minilm(f["input_ids"], f["attention_mask"]))
    got, want, ref = torch.cat(got), torch.cat(want), torch.cat(ref)
    to_lowbit = F.cosine_similarity(got, want, dim=1)
    to_fp32 = F.cosine_similarity(got, ref, dim=1)
    assert float(to_lowbit.mean()) >= ONNX_VS_LOWBIT_COS_MEAN_MIN and float(to_lowbit.min()) >= ONNX_VS_LOWBIT_COS_MIN
    assert float(to_fp32.mean()) >= FP32_COS_MEAN_MIN and float(to_fp32.min()) >= FP32_COS_MIN


def test_dynamic_axes_and_batch_invariance(exported, w8a8):
    path, _ = exported
    sentences = ["Quantization keeps the model small.", "A much longer sentence, so that the first one is "
                 "padded when both share a batch with this one and its many extra tokens."]
    both = run_encoder_onnx(path, w8a8.tokenize(sentences))
    alone = run_encoder_onnx(path, w8a8.tokenize(sentences[:1]))
    assert both.shape == (2, 384) and alone.shape == (1, 384)
    # per-token scales ignore the padding: the same sentence up to float noise (amplified as above)
    assert float(F.cosine_similarity(both[:1], alone)) >= ONNX_VS_LOWBIT_COS_MIN


def test_per_tensor_activations_are_ort_dynamic_quantize(w8a8, tmp_path):
    path = tmp_path / "pt.onnx"
    summary = export_encoder_onnx(w8a8, path, activations="per-tensor")
    assert summary["ops"]["DynamicQuantizeLinear"] == 36 and "Round" not in summary["ops"]
    f = w8a8.tokenize(["Quantization keeps the model small.", "Per-tensor scales span the whole batch."])
    with torch.inference_mode():
        want = w8a8(f["input_ids"], f["attention_mask"])
    assert float(F.cosine_similarity(run_encoder_onnx(path, f), want, dim=1).min()) > 0.99


def test_encoder_export_refuses_bad_input(w8a8, minilm, digits_cnn, tmp_path):
    with pytest.raises(ConfigError, match="sentence encoder"):
        export_encoder_onnx(digits_cnn, tmp_path / "a.onnx")
    with pytest.raises(ConfigError, match="no quantized linear layers"):
        export_encoder_onnx(minilm, tmp_path / "b.onnx")
    with pytest.raises(ConfigError, match="activations"):
        export_encoder_onnx(w8a8, tmp_path / "c.onnx", activations="per-row")
    existing = tmp_path / "d.onnx"
    existing.write_bytes(b"keep")
    with pytest.raises(ConfigError, match="exists"):
        export_encoder_onnx(w8a8, existing)
    assert existing.read_bytes() == b"keep"


def test_cli_onnx_export(w8a8, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    folder = tmp_path / "minilm-w8a8"
    lowbit.save(w8a8, folder)
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(app, ["export", str(folder), "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "36 int8 linears" in r.output and out.stat().st_size > 20e6
    r = CliRunner().invoke(app, ["export", str(folder), "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 2 and "exists" in r.output and "--force" in r.output
    r = CliRunner().invoke(app, ["export", "minilm", "--format", "onnx", "--out", str(tmp_path / "fp.onnx")])
    assert r.exit_code == 2 and "quantize it first" in r.output


# ---- MatMulNBits --------------------------------------------------------------------------------

NBITS_CONFIGS = {
    "int4-g32-sym": dict(bits=4, group_size=32),
    "uint4-g16-affine": dict(bits=4, group_size=16, symmetric=False),
    "int4-per-channel": dict(bits=4, group_size=0),
    "int8-g32-sym": dict(bits=8, group_size=32),
}


def _weight_only_linears(model):
    return [m for m in model.modules() if isinstance(m, WeightOnlyQLinear)]


@pytest.mark.parametrize("name", NBITS_CONFIGS)
def test_matmulnbits_tensors_decode_to_lowbit_weights(name):
    q = lowbit.quantize(tiny_llama(), WeightOnlyConfig(kernel="reference", **NBITS_CONFIGS[name]))
    for m in _weight_only_linears(q):
        t = matmulnbits_tensors(m)
        w = matmulnbits_weight_ref(t["B"], t["scales"], t["zero_points"], t["K"], t["bits"], t["block_size"])
        assert torch.equal(w, m.dequantized_weight())


def test_matmulnbits_packs_low_nibble_first():
    lin = torch.nn.Linear(32, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(32, dtype=torch.float32).reshape(1, 32) - 16)  # codes -16..15 at scale 1
    m = WeightOnlyQLinear.from_float(lin, bits=4, group_size=16)  # symmetric int4: codes in [-8, 7]
    codes = m.codes().to(torch.int32)[0]  # (32,)
    t = matmulnbits_tensors(m)
    assert t["B"].shape == (1, 2, 8) and t["zero_points"] is None and t["block_size"] == 16
    u = codes + 8
    assert int(t["B"][0, 0, 0]) == int(u[0]) | (int(u[1]) << 4)
    assert int(t["B"][0, 1, 7]) == int(u[30]) | (int(u[31]) << 4)


def test_matmulnbits_float_zero_points(tmp_path):
    """HQQ-style fp16 zero-points go unpacked as float and run in onnxruntime."""
    from lowbit.core import choose_qparams, per_group, quantize

    model = tiny_llama()
    for name, lin in list(model.named_modules()):
        if isinstance(lin, torch.nn.Linear) and name.endswith("mlp.up_proj"):
            qp = choose_qparams(lin.weight.detach(), "uint4", False, per_group(32))
            codes = quantize(lin.weight.detach(), qp)
            qp.zero_point = qp.zero_point.float() + 0.25  # off the integer grid
            lowbit.api.set_submodule(model, name, WeightOnlyQLinear.from_quantized(lin, codes, qp, 32, "reference"))
    m = _weight_only_linears(model)[0]
    t = matmulnbits_tensors(m)
    assert t["zero_points"].dtype == torch.float32 and t["zero_points"].shape == (m.out_features, m.in_features // 32)
    w = matmulnbits_weight_ref(t["B"], t["scales"], t["zero_points"], t["K"], t["bits"], t["block_size"])
    assert torch.allclose(w, m.dequantized_weight(), atol=1e-6)
    _check_causal_lm_in_ort(model, tmp_path / "fzp.onnx", NBITS_LOGIT_MAX_ABS_REF)


def test_matmulnbits_with_sinq_column_scales(tmp_path):
    """SINQ's per-input-channel scales go as a Mul before MatMulNBits and match lowbit's reference."""
    from lowbit.algorithms.hqq import HQQConfig

    q = lowbit.quantize(tiny_llama(), HQQConfig(bits=4, group_size=32, iters=0, sinkhorn=True, kernel="reference"))
    summary = _check_causal_lm_in_ort(q, tmp_path / "sinq.onnx", NBITS_LOGIT_MAX_ABS_REF)
    assert summary["ops"]["Mul"] >= summary["matmulnbits_layers"]


def _check_causal_lm_in_ort(model, path, tol):
    summary = export_causal_lm_onnx(model, path)
    assert summary["ops"]["MatMulNBits"] == summary["matmulnbits_layers"] == len(_weight_only_linears(model))
    x = torch.cat(tiny_batches(3, 20, seed=5))  # (3, 20): batch and sequence differ from the traced (1, 8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input_ids": x.numpy(), "attention_mask": np.ones_like(x.numpy())})[0])
    with torch.inference_mode():
        want = model(x)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= tol
    return summary


@pytest.mark.parametrize("name", NBITS_CONFIGS)
def test_matmulnbits_causal_lm_matches_lowbit_reference(name, tmp_path):
    q = lowbit.quantize(tiny_llama(), WeightOnlyConfig(kernel="reference", **NBITS_CONFIGS[name]))
    summary = _check_causal_lm_in_ort(q, tmp_path / f"{name}.onnx", NBITS_LOGIT_MAX_ABS_REF)
    assert summary["matmulnbits_layers"] == 15  # 2 layers x 7 linears + the (quantized) head


def test_matmulnbits_vs_lowbit_fast_int4_kernel(tmp_path):
    q = lowbit.quantize(tiny_llama(), WeightOnlyConfig(bits=4, group_size=32))
    _check_causal_lm_in_ort(q, tmp_path / "fast.onnx", NBITS_LOGIT_MAX_ABS_FAST)


def test_matmulnbits_refuses_what_it_cannot_hold(tmp_path):
    nf4 = lowbit.quantize(tiny_llama(), WeightOnlyConfig(fmt="nf4", group_size=32))
    with pytest.raises(ConfigError, match="codebook"):
        export_causal_lm_onnx(nf4, tmp_path / "nf4.onnx")
    g24 = lowbit.quantize(tiny_llama(), WeightOnlyConfig(bits=4, group_size=24))
    with pytest.raises(ConfigError, match="power of two"):
        export_causal_lm_onnx(g24, tmp_path / "g24.onnx")
    with pytest.raises(ConfigError, match="quantize it first"):
        export_causal_lm_onnx(tiny_llama(), tmp_path / "fp.onnx")
    with pytest.raises(ConfigError, match="causal LM"):
        export_causal_lm_onnx(copy.deepcopy(torch.nn.Linear(4, 4)), tmp_path / "lin.onnx")


def test_int4_weight_only_encoder_exports_as_matmulnbits(minilm, tmp_path):
    q = lowbit.quantize(copy.deepcopy(minilm), WeightOnlyConfig(bits=4, group_size=32, kernel="reference"))
    summary = export_encoder_onnx(q, tmp_path / "w4.onnx")
    assert summary["int4_linears"] == 36 and summary["ops"]["MatMulNBits"] == 36
    f = q.tokenize(["Quantization keeps the model small.", "Weight-only int4 runs through MatMulNBits."])
    with torch.inference_mode():
        want = q(f["input_ids"], f["attention_mask"])
    # float activations throughout: only fp32 accumulation order differs from lowbit's reference kernel
    assert float((run_encoder_onnx(tmp_path / "w4.onnx", f) - want).abs().max()) <= NBITS_LOGIT_MAX_ABS_REF
