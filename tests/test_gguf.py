"""GGUF export / import, checked with the gguf package's own reader and reference (de)quantizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

import lowbit  # noqa: E402
from lowbit.algorithms.rtn import WeightOnlyConfig  # noqa: E402
from lowbit.errors import ConfigError, LoadError  # noqa: E402
from lowbit.io.gguf_blocks import decode_blocks, encode_blocks, permute_qk, unpermute_qk  # noqa: E402
from lowbit.io.gguf_export import LAYER_TENSORS, export_gguf  # noqa: E402
from lowbit.io.gguf_import import load_gguf  # noqa: E402
from lowbit.nn import BlockMinQLinear, WeightOnlyQLinear  # noqa: E402
from lowbit.nn.gguf_linear import ggml_quantize, linear_from_ggml  # noqa: E402
from tests._tiny_llama import tiny_batches, tiny_llama  # noqa: E402

GGML = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q8_0": T.Q8_0}

# Logits of the re-imported model vs the lowbit model it came from, both on the reference kernel:
# the weights are bit-identical, so only fp32 summation order differs (the tiny model's logits are ~1).
LOGIT_ATOL = 1e-4
# A layer off the target grid is requantized to Q4_0: each weight moves by at most one step |d| of its
# new block (half a step of rounding, but Q4_0's range d * [-8, 7] is lopsided: a value of the sign
# opposite to the block's extreme clips at 7 |d|), plus the fp16 rounding of d times the code.
REQUANT_STEPS = 1.01


def _weights(seed: int = 0, n: int = 48, k: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block: d = 0
    w[1, :32] = torch.linspace(-1, 1, 32)  # ties in |x|: the first extreme wins, as in numpy's argmax
    w[2, 5] = 3.0  # an outlier: d < 0 for Q4_0
    return w


def _lm_modules(model):
    for i, layer in enumerate(model.lm.model.layers):
        for hf, gn in LAYER_TENSORS.items():
            yield f"blk.{i}.{gn}.weight", gn, layer.get_submodule(hf)


def _file_weight(reader, name: str, cfg) -> torch.Tensor:
    """A tensor of the file, dequantized by gguf, in Hugging Face row order."""
    t = next(t for t in reader.tensors if t.name == name)
    w = torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32))
    w = w.reshape(int(t.shape[1]), int(t.shape[0]))  # (N, K): GGUF lists dims reversed
    if name.endswith("attn_q.weight"):
        w = unpermute_qk(w, cfg.num_attention_heads)
    elif name.endswith("attn_k.weight"):
        w = unpermute_qk(w, cfg.num_key_value_heads)
    return w


# ------------------------------------------------------------------------------ formats

@pytest.mark.parametrize("qtype", sorted(GGML))
def test_ggml_rounding_is_byte_identical_to_gguf_reference(qtype):
    w = _weights()
    codes, d, m = ggml_quantize(w, qtype)
    ours = encode_blocks(qtype, codes, d, m)
    ref = gguf_quantize(w.numpy(), GGML[qtype])
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("qtype", sorted(GGML))
def test_blocks_decode_encode_roundtrip_and_module_dequantizes_like_gguf(qtype):
    w = _weights(1)
    raw = gguf_quantize(w.numpy(), GGML[qtype])
    codes, d, m = decode_blocks(qtype, raw, tuple(w.shape))
    assert np.array_equal(encode_blocks(qtype, codes, d, m), raw)
    mod = linear_from_ggml(tuple(w.shape), qtype, codes, d, m)
    assert isinstance(mod, BlockMinQLinear if qtype == "q4_1" else WeightOnlyQLinear)
    assert torch.equal(mod.dequantized_weight(), torch.from_numpy(gguf_dequantize(raw, GGML[qtype])))
    # 4-bit codes stay 4-bit: half a byte per weight
    assert mod.qweight.numel() == w.numel() * (1 if qtype == "q8_0" else 0.5)


def test_qk_permutation_is_llama_cpp_order_and_inverts():
    # one head of 8 rows: HF halves [x0 x1 x2 x3 | y0 y1 y2 y3] -> GGML interleaved [x0 y0 x1 y1 ...]
    t = torch.arange(16).reshape(16, 1)
    p = permute_qk(t, 2)
    assert p[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert torch.equal(unpermute_qk(p, 2), t)


def test_block_min_linear_fast_kernel_matches_reference():
    w = _weights(2, n=64)
    codes, d, m = ggml_quantize(w, "q4_1")
    fast = linear_from_ggml(tuple(w.shape), "q4_1", codes, d, m, kernel="fast")
    x = torch.randn(5, w.shape[1])
    ref = fast.forward_ref(x)
    # the fast int4 kernel runs in bf16 (activations, scales, offsets): 8 bits of mantissa
    assert torch.allclose(fast(x), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


# ------------------------------------------------------------------------------ export

def _quantized_tiny(config):
    model = tiny_llama()
    return lowbit.quantize(model, config)


ON_GRID = [
    ("rtn w4 g32 sym [-7, 7] codes", WeightOnlyConfig(bits=4, group_size=32), "q4_0"),
    ("rtn w4 g64 sym", WeightOnlyConfig(bits=4, group_size=64), "q4_0"),
    ("rtn ggml q4_0 grid", WeightOnlyConfig(gguf="q4_0", group_size=32), "q4_0"),
    ("rtn w4 sym as q4_1 (m = -8 d)", WeightOnlyConfig(bits=4, group_size=32), "q4_1"),
    ("rtn ggml q4_1 grid", WeightOnlyConfig(gguf="q4_1", group_size=32, symmetric=False), "q4_1"),
    ("rtn w8 g32 sym", WeightOnlyConfig(bits=8, group_size=32), "q8_0"),
    ("rtn w8 per channel", WeightOnlyConfig(bits=8, group_size=0), "q8_0"),
    ("rtn w4 affine as q8_0 (q - zp)", WeightOnlyConfig(bits=4, group_size=32, symmetric=False), "q8_0"),
    ("rtn ggml q8_0 grid", WeightOnlyConfig(gguf="q8_0", bits=8, group_size=32), "q8_0"),
]


@pytest.mark.parametrize("label,config,qtype", ON_GRID, ids=[c[0] for c in ON_GRID])
def test_export_on_grid_is_bit_exact(tmp_path, label, config, qtype):
    model = _quantized_tiny(config)
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, qtype, embedding_type="f32")
    reader = gguf.GGUFReader(str(path))
    cfg = model.lm.config
    for name, _, mod in _lm_modules(model):
        assert report.tensors[name]["how"] == "exact", (name, report.tensors[name])
        assert torch.equal(_file_weight(reader, name, cfg), mod.dequantized_weight()), name
    head = model.lm.lm_head  # rtn quantized the (tied) head: written as output.weight
    assert torch.equal(_file_weight(reader, "output.weight", cfg), head.dequantized_weight())
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == GGML[qtype] and types["blk.0.attn_norm.weight"] == T.F32


def test_rtn_on_ggml_grid_writes_gguf_reference_bytes(tmp_path):
    """rtn with gguf='q4_0' rounds exactly like gguf's quantizer of the same fp32 weights."""
    fp32 = tiny_llama()
    ref = {name: gguf_quantize(permute_qk(mod.weight.detach(), fp32.lm.config.num_attention_heads).numpy()
                               if gn == "attn_q" else
                               permute_qk(mod.weight.detach(), fp32.lm.config.num_key_value_heads).numpy()
                               if gn == "attn_k" else mod.weight.detach().numpy(), T.Q4_0)
           for name, gn, mod in _lm_modules(fp32)}
    model = lowbit.quantize(fp32, WeightOnlyConfig(gguf="q4_0"))
    path = tmp_path / "m.gguf"
    export_gguf(model, path, "q4_0", embedding_type="f32")
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if t.name in ref:
            assert np.array_equal(np.asarray(t.data), ref[t.name]), t.name


def test_affine_q4_1_keeps_codes(tmp_path):
    """Affine uint4: codes and d unchanged; m = -scale * zero_point is exact when fp16 holds it."""
    model = _quantized_tiny(WeightOnlyConfig(bits=4, group_size=32, symmetric=False))
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, "q4_1", embedding_type="f32")
    reader = gguf.GGUFReader(str(path))
    for name, _, mod in _lm_modules(model):
        how = report.tensors[name]["how"]
        assert how in ("exact", "exact-codes")
        w = _file_weight(reader, name, model.lm.config)
        ref = mod.dequantized_weight()
        if how == "exact":
            assert torch.equal(w, ref), name
        else:  # only m was rounded to fp16: half an fp16 ulp of |m| <= 15 |d|
            bound = 15 * mod.scale.float().max() * 2.0 ** -11
            assert (w - ref).abs().max() <= bound, name


def test_export_off_grid_requantizes_within_one_step(tmp_path, caplog):
    model = _quantized_tiny(WeightOnlyConfig(bits=4, group_size=128, symmetric=False))
    path = tmp_path / "m.gguf"
    with caplog.at_level("WARNING", logger="lowbit.io.gguf_export"):
        report = export_gguf(model, path, "q4_0", embedding_type="f32")
    assert "requantized" in caplog.text
    reader = gguf.GGUFReader(str(path))
    for name, _, mod in _lm_modules(model):
        assert report.tensors[name]["how"] == "requantized"
        w = _file_weight(reader, name, model.lm.config)
        ref = mod.dequantized_weight()
        d = ref.reshape(ref.shape[0], -1, 32).abs().amax(-1) / 8  # |d| of each Q4_0 block of the requantized weight
        err = (w - ref).abs().reshape(ref.shape[0], -1, 32).amax(-1)
        assert (err <= REQUANT_STEPS * d + 1e-7).all(), name


def test_export_rejects_non_llama_and_bad_type(tmp_path):
    model = tiny_llama()
    with pytest.raises(ConfigError, match="valid"):
        export_gguf(model, tmp_path / "m.gguf", "q5_k")
    model.lm.config.model_type = "bert"
    with pytest.raises(ConfigError, match="Llama"):
        export_gguf(model, tmp_path / "m.gguf", "q4_0")
    assert not list(tmp_path.iterdir())  # nothing half-written


# ------------------------------------------------------------------------------ import

@pytest.mark.parametrize("qtype", sorted(GGML))
def test_import_is_bit_exact_and_logits_match(tmp_path, qtype):
    config = WeightOnlyConfig(gguf=qtype, bits=8 if qtype == "q8_0" else 4, group_size=32,
                              symmetric=qtype != "q4_1", kernel="reference")
    model = _quantized_tiny(config)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, qtype, embedding_type=qtype)
    back = load_gguf(path, kernel="reference", tokenizer=False)
    reader = gguf.GGUFReader(str(path))
    cfg = model.lm.config
    for (name, _, mod), (_, _, got) in zip(_lm_modules(model), _lm_modules(back)):
        assert type(got) is type(mod)
        assert torch.equal(got.codes(), mod.codes()), name  # the very codes lowbit chose
        assert torch.equal(got.dequantized_weight(), _file_weight(reader, name, cfg)), name
    emb = back.lm.model.embed_tokens
    assert torch.equal(emb.weight, _file_weight(reader, "token_embd.weight", cfg))
    # the lowbit model with the embedding table the file holds, then compare logits
    model.lm.model.embed_tokens.weight.data.copy_(emb.weight)
    ids = tiny_batches(2)[0]
    with torch.inference_mode():
        assert torch.allclose(back(ids), model(ids), atol=LOGIT_ATOL, rtol=0)


def test_import_tied_head_shares_the_table(tmp_path):
    fp32 = tiny_llama()
    model = lowbit.quantize(fp32, WeightOnlyConfig(gguf="q4_0", exclude=("lm.lm_head",)))
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, "q4_0", embedding_type="q8_0")
    assert "output.weight" not in report.tensors
    back = load_gguf(path, tokenizer=False)
    assert back.lm.lm_head is back.lm.model.embed_tokens.table
    assert {"lm.lm_head", "lm.model.embed_tokens"} <= set(back.lowbit_report.layers)
    ids = tiny_batches(1)[0]
    with torch.inference_mode():
        ref, got = model(ids), back(ids)
    # the head and embeddings went through Q8_0 (fp32 in the lowbit model): ~0.4% of each weight
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999


def test_import_reexport_is_byte_identical(tmp_path):
    model = _quantized_tiny(WeightOnlyConfig(gguf="q4_1", group_size=32, symmetric=False))
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export_gguf(model, a, "q4_1", embedding_type="q8_0")
    report = export_gguf(load_gguf(a, tokenizer=False), b, "q4_1", embedding_type="q8_0")
    assert report.count("requantized") == 0 and report.count("quantized") == 0
    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert ta.name == tb.name and ta.tensor_type == tb.tensor_type
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


def test_corrupt_or_truncated_gguf_is_a_load_error(tmp_path):
    model = _quantized_tiny(WeightOnlyConfig(gguf="q4_0"))
    good = tmp_path / "m.gguf"
    export_gguf(model, good, "q4_0")
    data = good.read_bytes()
    cases = {
        "truncated.gguf": data[: len(data) // 2],
        "header-only.gguf": data[:64],
        "garbage.gguf": b"not a gguf file at all" * 10,
        "empty.gguf": b"",
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(LoadError, match=name):
            load_gguf(p, tokenizer=False)
    with pytest.raises(LoadError, match="no such file"):
        load_gguf(tmp_path / "missing.gguf")


def test_rtn_gguf_option_validates():
    with pytest.raises(ConfigError, match="q4_0"):
        WeightOnlyConfig(gguf="q3_k")
    from lowbit.config import build_config, config_from_json, config_to_json

    cfg = build_config("rtn", {"gguf": "q4_1"})
    assert (cfg.bits, cfg.group_size, cfg.symmetric, cfg.gguf) == (4, 32, False, "q4_1")
    assert config_from_json(config_to_json(cfg)) == cfg


def test_cli_export_rejects_missing_folder(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    result = CliRunner().invoke(app, ["export", str(tmp_path / "nope"), "--format", "gguf", "--type", "q4_0",
                                      "--out", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2
    assert "error" in result.output


def test_gptq_on_q4_0_grid_exports_its_own_codes(tmp_path):
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.config import build_config

    assert build_config("gptq", {"gguf": "q4_0"}) == GPTQConfig(bits=4, group_size=32, gguf="q4_0",
                                                             attention_hessian=True, residual_weights=True)
    with pytest.raises(ConfigError, match="q4_0"):
        GPTQConfig(bits=4, group_size=128, gguf="q4_0")
    model = lowbit.quantize(tiny_llama(), GPTQConfig(bits=4, group_size=32, gguf="q4_0"), tiny_batches(4, 64))
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, "q4_0", embedding_type="f32")
    reader = gguf.GGUFReader(str(path))
    low = []
    for name, _, mod in _lm_modules(model):
        assert report.tensors[name]["how"] == "exact", name
        assert torch.equal(_file_weight(reader, name, model.lm.config), mod.dequantized_weight()), name
        low.append(int(mod.codes().min()))
    assert min(low) == -8  # the full Q4_0 range is used, not lowbit's restricted [-7, 7]


AWQ_ON_GRID = [  # (label, AWQConfig fields, target type, module class)
    ("awq q4_0", dict(gguf="q4_0", bits=4, group_size=32), "q4_0", WeightOnlyQLinear),
    ("awq q4_1", dict(gguf="q4_1", bits=4, group_size=32, symmetric=False), "q4_1", BlockMinQLinear),
    ("awq q8_0", dict(gguf="q8_0", bits=8, group_size=32), "q8_0", WeightOnlyQLinear),
    ("awq-gptq q4_0", dict(gguf="q4_0", bits=4, group_size=32, rounding="gptq"), "q4_0", WeightOnlyQLinear),
]


@pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread
@pytest.mark.parametrize("label,fields,qtype,cls", AWQ_ON_GRID, ids=[c[0] for c in AWQ_ON_GRID])
def test_awq_on_ggml_grid_exports_its_own_codes(tmp_path, label, fields, qtype, cls):
    """AWQConfig(gguf=...): every decoder linear holds ggml codes (blocks of 32, fp16 d) and the export
    writes them unchanged ("exact": the file dequantizes to the module's weight bit for bit)."""
    from lowbit.algorithms.awq import AWQConfig

    model = lowbit.quantize(tiny_llama(), AWQConfig(n_grid=4, clip_tokens=64, **fields), tiny_batches(4, 64))
    assert model.lowbit_scheme.endswith("-ggml")
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, qtype, embedding_type="f32")
    reader = gguf.GGUFReader(str(path))
    low = []
    for name, _, mod in _lm_modules(model):
        assert type(mod) is cls and mod.group_size == 32 and mod.scale.dtype == torch.float16, name
        assert report.tensors[name]["how"] == "exact", (name, report.tensors[name])
        assert torch.equal(_file_weight(reader, name, model.lm.config), mod.dequantized_weight()), name
        codes = mod.codes()
        if qtype == "q4_0":
            assert -8 <= int(codes.min()) and int(codes.max()) <= 7, name
            low.append(int(codes.min()))
            if "rounding" not in fields:  # ggml's own rounding: re-rounding the stored weight is the identity
                c2, d2, _ = ggml_quantize(mod.dequantized_weight(), "q4_0")
                assert torch.equal(c2, codes) and torch.equal(d2, mod.scale), name
    if qtype == "q4_0":
        assert min(low) == -8  # Q4_0's full [-8, 7], not lowbit's symmetric [-7, 7]


@pytest.mark.usefixtures("one_thread")
def test_awq_gguf_option_validates_and_cli_accepts_it(tmp_path):
    from typer.testing import CliRunner

    from lowbit.algorithms.awq import AWQConfig
    from lowbit.cli import app
    from lowbit.config import build_config, config_from_json, config_to_json
    from tests._tiny_hf import tiny_folder

    cfg = build_config("awq", {"gguf": "q4_1"})
    assert (cfg.bits, cfg.group_size, cfg.symmetric, cfg.gguf, cfg.rounding) == (4, 32, False, "q4_1", "rtn")
    assert config_from_json(config_to_json(cfg)) == cfg
    cfg = build_config("awq-gptq", {"gguf": "q4_0"})
    assert (cfg.bits, cfg.group_size, cfg.symmetric, cfg.rounding) == (4, 32, True, "gptq")
    assert cfg.gptq_config().gguf == "q4_0" and cfg.scheme == "awq-gptq-w4-g32-sym-ggml-attnh"
    for bad in (dict(gguf="q5_k"), dict(gguf="q4_0"), dict(gguf="q4_0", group_size=32, symmetric=False),
                dict(gguf="q8_0", bits=4, group_size=32), dict(gguf="q4_0", group_size=32, fmt="nf4"),
                dict(gguf="q8_0", bits=8, group_size=32, rounding="gptq")):
        with pytest.raises(ConfigError, match="gguf"):
            AWQConfig(**bad)
    with pytest.raises(ConfigError, match="'q4_0' only"):
        build_config("awq-gptq", {"gguf": "q4_1"})
    with pytest.raises(ConfigError, match="multiple of"):  # q/k/v read 48 inputs: no blocks of 32
        lowbit.quantize(tiny_llama(hidden=48, layers=1), AWQConfig(gguf="q4_0", group_size=32, n_grid=2),
                        tiny_batches(1, 16))

    src = tiny_folder("llama", tmp_path / "src")
    run = CliRunner().invoke
    res = run(app, ["quantize", "--model", str(src), "--scheme", "awq-gptq", "--gguf", "q8_0", "--no-eval"])
    assert res.exit_code == 2 and "'q4_0' only" in res.output
    out = tmp_path / "q"
    res = run(app, ["quantize", "--model", str(src), "--scheme", "awq", "--gguf", "q4_0", "--calib", "1",
                    "--no-eval", "--out", str(out)])
    assert res.exit_code == 0, res.output
    model = lowbit.load(out)
    assert (model.lowbit_config.gguf, model.lowbit_config.group_size) == ("q4_0", 32)
    model.tokenizer = None  # the tiny folder's word-level tokenizer has no GGUF form; the weights are the point
    report = export_gguf(model, tmp_path / "m.gguf", "q4_0", embedding_type="f32")
    assert all(report.tensors[name]["how"] == "exact" for name, _, _ in _lm_modules(model))


@pytest.mark.slow
def test_smollm2_q4_1_file_imports_bit_exact():
    """SmolLM2's own file: a Q4_1 layer (rows permuted back for attn_q) and the Q8_0 embedding table."""
    from lowbit.io.gguf_import import _File
    from lowbit.models.smollm2 import smollm2_gguf

    f = _File(smollm2_gguf())
    heads = int(f.value("llama.attention.head_count"))
    for name, n_head, cls in (("blk.3.attn_q.weight", heads, BlockMinQLinear),
                              ("blk.3.ffn_down.weight", None, BlockMinQLinear),
                              ("token_embd.weight", None, WeightOnlyQLinear)):
        t = f.tensor(name)
        shape = (int(t.shape[1]), int(t.shape[0]))
        mod = f.linear(name, shape, n_head, "reference")
        assert type(mod) is cls
        ref = torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type))).reshape(shape)
        if n_head:
            ref = unpermute_qk(ref, n_head)
        assert torch.equal(mod.dequantized_weight(), ref), name
