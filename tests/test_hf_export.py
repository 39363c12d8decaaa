"""--format hf: compressed-tensors pack-quantized folders, read back with compressed-tensors' own code
(its int32 unpacker and PackedQuantizationCompressor.decompress) and transformers' from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.algorithms.rtn import WeightOnlyConfig
from lowbit.errors import ConfigError
from lowbit.io.hf_export import export_hf, pack_int32, unpack_int32
from lowbit.nn import WeightOnlyQLinear
from tests._tiny_llama import tiny_batches, tiny_llama

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# transformers decompresses to dense fp32 weights equal to lowbit's dequantized ones (the same products
# (q - z) * s in fp32), then runs the same fp32 model as lowbit's reference kernel: measured 0.0.
LOGIT_MAX_ABS = 1e-5
# vs a model saved with the default kernel, whose int4 path runs activations in bf16 (8 mantissa bits)
LOGIT_FAST_KERNEL_TOL = 5e-2

CONFIGS = {
    "int4-g32-sym": dict(bits=4, group_size=32),
    "uint4-g16-affine": dict(bits=4, group_size=16, symmetric=False),
    "int8-per-channel": dict(bits=8, group_size=0),
    "int3-g32-sym": dict(bits=3, group_size=32),  # 3-bit codes straddle int32 words
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_compressed_tensors(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, 77), generator=g).to(torch.int8)  # ragged 77
    packed = pack_int32(codes, bits)
    assert torch.equal(packed, pack_to_int32(codes, bits))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size([5, 77])), codes)
    assert torch.equal(unpack_int32(packed, bits, 77), codes)


def _quantized(name):
    return lowbit.quantize(tiny_llama(), WeightOnlyConfig(kernel="reference", **CONFIGS[name]))


@pytest.mark.parametrize("name", CONFIGS)
def test_compressed_tensors_decompressor_gives_lowbit_weights(name, tmp_path):
    q = _quantized(name)
    report = export_hf(q, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(config)  # the library's own parser
    assert qc.format == "pack-quantized" and len(qc.config_groups) == 1
    scheme = next(iter(qc.config_groups.values()))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    layers = {n: m for n, m in q.lm.named_modules() if isinstance(m, WeightOnlyQLinear)}
    assert report["quantized_linears"] == len(layers) == 15
    for prefix, m in layers.items():
        local = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        assert "weight" not in local and local["weight_packed"].dtype == torch.int32
        out = PackedQuantizationCompressor.decompress(local, scheme)
        assert torch.equal(out["weight"].float(), m.dequantized_weight()), prefix


@pytest.mark.parametrize("name", ["int4-g32-sym", "int8-per-channel"])
def test_transformers_loads_the_folder(name, tmp_path):
    from transformers import AutoModelForCausalLM

    q = _quantized(name)
    export_hf(q, tmp_path / "hf")
    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.cat(tiny_batches(2, 16))
    with torch.inference_mode():
        got = lm(input_ids=x, use_cache=False).logits
        want = q(x)
    assert float((got - want).abs().max()) <= LOGIT_MAX_ABS


def test_unquantized_head_is_ignored_and_tied(tmp_path):
    q = lowbit.quantize(tiny_llama(), WeightOnlyConfig(bits=4, group_size=32, kernel="reference",
                                                       exclude=("lm.lm_head",)))
    report = export_hf(q, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert report["float_linears"] == ["lm_head"] and config["quantization_config"]["ignore"] == ["lm_head"]
    assert config["tie_word_embeddings"] is True
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors  # stored once


def test_hf_export_refuses_what_it_cannot_write(tmp_path, digits_cnn):
    with pytest.raises(ConfigError, match="causal LM"):
        export_hf(digits_cnn, tmp_path / "a")
    with pytest.raises(ConfigError, match="quantize it first"):
        export_hf(tiny_llama(), tmp_path / "b")
    nf4 = lowbit.quantize(tiny_llama(), WeightOnlyConfig(fmt="nf4", group_size=32))
    with pytest.raises(ConfigError, match="codebook"):
        export_hf(nf4, tmp_path / "c")
    ragged = lowbit.quantize(tiny_llama(), WeightOnlyConfig(bits=4, group_size=48))  # K = 64, 128
    with pytest.raises(ConfigError, match="divisible by group_size"):
        export_hf(ragged, tmp_path / "d")
    (tmp_path / "e").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        export_hf(_quantized("int4-g32-sym"), tmp_path / "e")


def test_cli_quantize_then_export_a_user_folder(tmp_path):
    """The user's flow: a Hugging Face folder -> lowbit quantize -> lowbit export --format hf -> transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from lowbit.cli import app
    from tests._tiny_hf import tiny_folder

    src = tiny_folder("llama", tmp_path / "src")
    run = CliRunner()
    r = run.invoke(app, ["quantize", "--model", str(src), "--scheme", "rtn", "--bits", "4", "--group-size", "32",
                         "--out", str(tmp_path / "w4"), "--no-eval"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "w4-hf"
    r = run.invoke(app, ["export", str(tmp_path / "w4"), "--format", "hf", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "pack-quantized linears" in r.output
    lm = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok(["the python documentation"], return_tensors="pt")["input_ids"]
    q = lowbit.load(tmp_path / "w4")
    with torch.inference_mode():
        assert torch.allclose(lm(input_ids=ids, use_cache=False).logits, q(ids), atol=LOGIT_FAST_KERNEL_TOL)
    r = run.invoke(app, ["export", str(tmp_path / "w4"), "--format", "hf", "--out", str(out)])
    assert r.exit_code == 2 and "exists" in r.output
