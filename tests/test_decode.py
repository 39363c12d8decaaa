"""The fast decoder (lowbit.models.decode) against the model's own forward and generate."""

import copy

import pytest
import torch

import lowbit
from lowbit.algorithms.hqq import HQQConfig
from lowbit.analysis.footprint import model_size_bytes
from lowbit.algorithms.rtn import WeightOnlyConfig
from lowbit.errors import ConfigError
from lowbit.models.decode import Decoder
from lowbit.nn.gguf_linear import QTableEmbedding
from tests._tiny_llama import tiny_batches, tiny_llama

# Both sides compute in fp32 from the same dequantized weights; only summation order differs.
LOGIT_TOL = 1e-4

SCHEMES = {
    "fp32": None,
    "int4-g32-sym": WeightOnlyConfig(bits=4, group_size=32, kernel="reference"),
    "int4-g64-affine": WeightOnlyConfig(bits=4, group_size=64, symmetric=False, kernel="reference"),
    "int8-per-channel": WeightOnlyConfig(bits=8, group_size=0, kernel="reference"),
    "q4_1": WeightOnlyConfig(gguf="q4_1", kernel="reference"),
    "q4_0": WeightOnlyConfig(gguf="q4_0", kernel="reference"),
    "hqq-float-zero-point": HQQConfig(bits=4, group_size=32, kernel="reference"),
    "int4-tied-embedding": WeightOnlyConfig(bits=4, group_size=32, kernel="reference", tie_embeddings=True),
    # SINQ: per-layer input scales t, so the fused q/k/v and gate/up products run each part on t_p * x
    "sinq-input-scale": HQQConfig(bits=4, group_size=32, sinkhorn=True, iters=0, kernel="reference"),
    "sinq-int8-input-scale": HQQConfig(bits=8, group_size=32, symmetric=True, sinkhorn=True, iters=0,
                                       kernel="reference"),
    "sinq-sym-input-scale": HQQConfig(bits=4, group_size=32, symmetric=True, sinkhorn=True, iters=0,
                                      kernel="reference"),  # implied offsets (no b) in each part
}


def _model(scheme: str):
    m = tiny_llama(layers=2)
    if SCHEMES[scheme] is not None:
        lowbit.quantize(m, SCHEMES[scheme])
    return m


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_logits_match_the_model_forward(scheme):
    m = _model(scheme)
    ids = tiny_batches(1, length=24)[0]
    with torch.inference_mode():
        ref = m(ids)
    got = Decoder(m, max_len=64).logits(ids)
    assert got.shape == ref.shape
    assert _rel(got, ref) < LOGIT_TOL, scheme


def test_quantized_layers_run_on_the_block_kernels():
    d = Decoder(_model("int4-tied-embedding"), max_len=32)
    assert all(p.uses_kernel for L in d.layers for p in (L["qkv"], L["o"], L["gate_up"], L["down"]))
    assert d.head.uses_kernel and d.nbytes() > 0


def test_input_scales_stay_on_the_block_kernels():
    """SINQ layers (input scales t) are fused with one row of t per part, and the C step takes them."""
    m = _model("sinq-input-scale")
    assert m.lm.model.layers[0].self_attn.q_proj.input_scale is not None
    d = Decoder(m, max_len=32)
    assert all(p.uses_kernel for L in d.layers for p in (L["qkv"], L["o"], L["gate_up"], L["down"]))
    qkv = d.layers[0]["qkv"].fused
    assert qkv.input_scale.shape == (3, 64) and sum(qkv.parts) == qkv.out_features
    assert d._step is not None


def test_incremental_decoding_equals_the_full_forward():
    """Prefill part of the sequence, then feed the rest one token at a time through the cache."""
    m = _model("int4-g32-sym")
    ids = tiny_batches(1, length=20)[0]
    d = Decoder(m, max_len=32)
    full = d.logits(ids)
    with torch.inference_mode():
        steps = [d.forward(ids[:, :12], 0)]
        for p in range(12, 20):
            steps.append(d.forward(ids[:, p:p + 1], p))
    got = torch.stack(steps[1:], dim=1)  # logits predicted at positions 12..19
    assert _rel(got, full[:, 12:20]) < LOGIT_TOL
    assert _rel(steps[0], full[:, 11]) < LOGIT_TOL


def test_greedy_generation_equals_hf_generate():
    m = _model("fp32")
    ids = tiny_batches(1, length=8)[0]
    with torch.inference_mode():
        hf = m.lm.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(Decoder(m, max_len=32).generate(ids, 12), hf)


def test_sampling_is_seeded_and_respects_top_p():
    d = Decoder(_model("int4-g32-sym"), max_len=48)
    ids = tiny_batches(1, length=6)[0]
    a = d.generate(ids, 10, temperature=1.0, top_p=0.9, seed=3)
    b = d.generate(ids, 10, temperature=1.0, top_p=0.9, seed=3)
    assert torch.equal(a, b)
    # top_p close to 0 keeps only the most probable token: sampling becomes greedy
    assert torch.equal(d.generate(ids, 10, temperature=1.0, top_p=1e-6, seed=5), d.generate(ids, 10))


def test_tied_embedding_is_stored_once():
    m = _model("int4-tied-embedding")
    emb = m.lm.model.embed_tokens
    assert isinstance(emb, QTableEmbedding) and emb.table is m.lm.lm_head
    untied = _model("int4-g32-sym")
    assert model_size_bytes(m) < model_size_bytes(untied)


def test_tied_embedding_survives_save_and_load(tmp_path):
    from lowbit.models.hf import load_hf
    from tests._tiny_hf import tiny_folder

    m = load_hf(tiny_folder("llama", tmp_path / "llama"))
    lowbit.quantize(m, SCHEMES["int4-tied-embedding"])
    lowbit.save(m, tmp_path / "m")
    back = lowbit.load(tmp_path / "m")
    emb = back.lm.model.embed_tokens
    assert isinstance(emb, QTableEmbedding) and emb.table is back.lm.lm_head
    ids = tiny_batches(1, length=10)[0]
    with torch.inference_mode():
        assert torch.equal(back(ids), m(ids))


def test_bad_requests_are_refused_clearly():
    d = Decoder(_model("fp32"), max_len=16)
    with pytest.raises(ConfigError, match="exceed"):
        d.generate(tiny_batches(1, length=10)[0], 10)
    with pytest.raises(ConfigError, match="one prompt"):
        list(d.stream(torch.zeros(2, 3, dtype=torch.long), 2))
    with pytest.raises(ConfigError, match="top_p"):
        list(d.stream(torch.zeros(1, 3, dtype=torch.long), 2, top_p=0.0))
    with pytest.raises(ConfigError, match="max_len"):
        Decoder(_model("fp32"), max_len=0)


def test_other_families_are_refused_with_the_alternative(tmp_path):
    from lowbit.models.hf import load_hf
    from tests._tiny_hf import tiny_folder

    gpt2 = load_hf(tiny_folder("gpt2", tmp_path / "gpt2"))
    with pytest.raises(ConfigError, match="generate"):
        Decoder(gpt2)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_llama_layout_families(family, tmp_path):
    """Qwen2 has q/k/v biases; Mistral an untied head: both fit the same decoder."""
    from lowbit.models.hf import load_hf
    from tests._tiny_hf import tiny_folder

    m = load_hf(tiny_folder(family, tmp_path / family))
    lowbit.quantize(m, WeightOnlyConfig(bits=4, group_size=32, kernel="reference"))
    ids = tiny_batches(1, length=16, vocab=256)[0]
    with torch.inference_mode():
        ref = m(ids)
    assert _rel(Decoder(copy.deepcopy(m), max_len=32).logits(ids), ref) < LOGIT_TOL


def test_int8_activations_stay_close_and_differ_only_by_the_activation_rounding():
    """W4A8 decoding: close to the weight-only logits (rounding x to int8 per block of 32 moves them
    by well under A8_TOL of their range), and exactly what the W4A8 reference kernel computes."""
    from lowbit.kernels import block_gemv

    m = _model("int4-g32-sym")
    ids = tiny_batches(1, length=1)[0]
    exact = Decoder(m, max_len=8).logits(ids)
    a8 = Decoder(m, max_len=8, activations="int8")
    got = a8.logits(ids)
    assert 0 < _rel(got, exact) < A8_TOL
    x = torch.randn(1, 64)
    w = a8.layers[0]["gate_up"].fused
    ref = block_gemv.block_linear_a8_ref(x, w.packed, w.s, w.b, 4, w.group_size, w.bias)
    assert _rel(w(x), ref) < LOGIT_TOL


A8_TOL = 0.05  # int8 per block of 32 keeps ~40 dB per activation; two layers of it move logits by ~1 %
# int8 activations, C step vs torch: where the two sides' fp32 sums differ in the last bit, one activation's int8
# code can round the other way (seen: 8.5e-4 at one step of sinq-sym at 2 threads, 1e-7 at every other step); a
# wrong product (part offsets, scales) moves logits by > 1e-2
A8_FLIP_TOL = 2e-3


@pytest.mark.parametrize("scheme", ["int4-tied-embedding", "q4_1", "int8-per-channel", "hqq-float-zero-point",
                                    "sinq-input-scale", "sinq-int8-input-scale", "sinq-sym-input-scale"])
@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_c_step_matches_the_torch_forward(scheme, activations):
    """The one-call C step (single tokens) against its reference twin, the decoder's torch forward,
    over a prompt and 12 decoded tokens: same logits at every step."""
    m = _model(scheme)
    ids = tiny_batches(1, length=6)[0]
    fast = Decoder(m, max_len=32, activations=activations)
    ref = Decoder(m, max_len=32, activations=activations, kernel="reference")
    assert fast._step is not None and ref._step is None
    with torch.inference_mode():
        a, b = fast.forward(ids, 0), ref.forward(ids, 0)
        for p in range(6, 18):
            token = torch.argmax(b, dim=-1, keepdim=True)
            a, b = fast.forward(token, p), ref.forward(token, p)
            assert _rel(a, b) < (LOGIT_TOL if activations == "fp32" else A8_FLIP_TOL), (scheme, activations, p)


def test_cache_grows_on_demand(monkeypatch):
    """The cache starts small and doubles; logits across the growth points equal the full forward."""
    import lowbit.models.decode as decode

    monkeypatch.setattr(decode, "INITIAL_CAPACITY", 4)
    m = _model("int4-g32-sym")
    ids = tiny_batches(1, length=19)[0]
    d = Decoder(m, max_len=64)
    assert d.capacity == 4
    full = Decoder(m, max_len=64, kernel="reference").logits(ids)
    with torch.inference_mode():
        steps = [d.forward(ids[:, :3], 0)] + [d.forward(ids[:, p:p + 1], p) for p in range(3, 19)]
    assert d.capacity == 32  # 4 -> 8 -> 16 -> 32
    assert _rel(torch.stack(steps[1:], dim=1), full[:, 3:19]) < LOGIT_TOL


def test_generate_command_streams_text_from_a_saved_quantized_folder(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.models.hf import load_hf
    from tests._tiny_hf import tiny_folder

    m = load_hf(tiny_folder("llama", tmp_path / "llama"))
    lowbit.quantize(m, WeightOnlyConfig(bits=4, group_size=32, tie_embeddings=True))
    lowbit.save(m, tmp_path / "q")
    runner = CliRunner()
    ok = runner.invoke(app, ["generate", str(tmp_path / "q"), "-p", "hello world", "--max-tokens", "5",
                             "--activations", "int8", "--stats"])
    assert ok.exit_code == 0, ok.output
    assert "decode" in ok.output and "tokens/s" in ok.output
    bad = runner.invoke(app, ["generate", str(tmp_path / "q"), "-p", "hello", "--max-tokens", "0"])
    assert bad.exit_code != 0 and "--max-tokens" in bad.output
    bad = runner.invoke(app, ["generate", str(tmp_path / "q"), "-p", "hello", "--activations", "int3"])
    assert bad.exit_code != 0 and "activations" in bad.output


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_w4a8_kernel_paths_match_reference(seed):
    """Every path of the W4A8 kernel (decoding row, small-group tiles with and without stored offsets,
    the general tile) against its reference twin."""
    from lowbit.kernels.block_gemv import block_linear_a8, block_linear_a8_ref, example_block_linear_a8

    ex = example_block_linear_a8(seed)
    fast, ref = block_linear_a8(*ex["fast"]), block_linear_a8_ref(*ex["reference"])
    assert ((fast - ref).norm() / ref.norm()) <= ex["tol"]


def test_w4a8_without_vnni_gives_identical_outputs(monkeypatch):
    """The maddubs build (no VNNI) and the default build (vpdpbusd where the CPU has it) compute the
    same integers, so every W4A8 path returns identical floats."""
    from lowbit.kernels import block_gemv, native

    default, why = block_gemv.library()
    if default is None:
        pytest.skip(f"no C compiler: {why}")
    plain, why = native.native_library("block_gemv_no_vnni", block_gemv._C_SOURCE, {
        "lowbit_quantize_blocks": block_gemv._QUANT_ARGS, "lowbit_q4a8_linear": block_gemv._A8_ARGS,
    }, cflags=("-ffp-contract=off", "-mno-avxvnni", "-mno-avx512vnni"))
    if plain is None:
        pytest.skip(f"the compiler cannot build without VNNI: {why}")
    for seed in range(4):
        ex = block_gemv.example_block_linear_a8(seed)
        want = block_gemv.block_linear_a8(*ex["fast"])
        monkeypatch.setattr(block_gemv, "library", lambda: (plain, ""))
        got = block_gemv.block_linear_a8(*ex["fast"])
        monkeypatch.undo()
        assert torch.equal(got, want), seed
