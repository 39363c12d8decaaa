"""QuaRot rotations: Hadamard matrices, the fast transform vs its dense twin, folds that keep the
function, the rotated W/A presets (save / load), the rotated KV cache, the kurtosis lint, and the
activation-grid options of WAQLinear."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.algorithms.presets import preset_config
from lowbit.algorithms.rotation import FOLD_ATOL, rotate_model
from lowbit.core.hadamard import hadamard, hadamard_pm1, paley_hadamard, random_hadamard, split_order
from lowbit.errors import ConfigError
from lowbit.kernels.hadamard import hadamard_transform, hadamard_transform_ref, hadamard_transform_t
from lowbit.nn import WAQLinear
from lowbit.nn.hadamard import HadamardMLP, RotatedRMSNorm
from lowbit.nn.kv_cache import KVCacheLM, make_cache
from tests._tiny_llama import tiny_batches, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TRANSFORM_RTOL = 1e-5  # fp32 butterflies vs a float64 dense product: a few ulps per log2(n) rounds


@pytest.mark.parametrize("n", [1, 2, 12, 64, 144, 576, 1536])
def test_hadamard_orders_are_hadamard(n):
    h = hadamard_pm1(n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))
    q = random_hadamard(n, seed=3)
    assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_paley_is_identity_plus_skew_and_unknown_orders_refused():
    s = paley_hadamard(11) - torch.eye(12, dtype=torch.float64)
    assert torch.equal(s, -s.t())  # Paley I: H = I + S with S skew-symmetric
    assert split_order(576) == (144, 4) and split_order(1536) == (12, 128) and split_order(64) == (1, 64)
    for bad in (20, 6, 7, 100):
        with pytest.raises(ConfigError, match="Hadamard"):
            split_order(bad)


@pytest.mark.parametrize("n", [12, 48, 64, 576, 1536])
def test_fast_transform_matches_dense_twin_and_inverts(n):
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    fast, ref = hadamard_transform(x), hadamard_transform_ref(x)
    assert ((fast - ref).norm() / ref.norm()) < TRANSFORM_RTOL
    assert torch.allclose(hadamard_transform_t(fast), x, atol=1e-5)
    assert torch.allclose(ref, x @ hadamard(n), atol=1e-5)


@pytest.mark.parametrize("hidden,inter", [(64, 128), (48, 96)])  # 48 = 12 x 4, 96 = 12 x 8: Paley factors
def test_rotated_float_model_keeps_its_logits(hidden, inter):
    fp = tiny_llama(hidden=hidden, inter=inter)
    with torch.no_grad():  # a final norm weight that is not all ones: folding it into a tied head would be wrong
        fp.lm.model.norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(7))
    x = tiny_batches(2, 24)[0]
    untied = copy.deepcopy(fp)
    info = rotate_model(untied, seed=1, tie_head=False)
    assert info["untied_head"] and untied.lm.lm_head.weight is not untied.lm.model.embed_tokens.weight
    assert not untied.lm.config.tie_word_embeddings
    assert all(isinstance(layer.mlp, HadamardMLP) for layer in untied.lm.model.layers)
    assert torch.equal(untied.lm.model.norm.weight, torch.ones(hidden))
    tied = copy.deepcopy(fp)
    info = rotate_model(tied, seed=1)  # the default keeps a tied head tied: one table, the final norm rotates online
    assert info["tied_head"] and not info["untied_head"]
    assert tied.lm.lm_head.weight is tied.lm.model.embed_tokens.weight and tied.lm.config.tie_word_embeddings
    assert isinstance(tied.lm.model.norm, RotatedRMSNorm)
    assert torch.equal(tied.lm.model.norm.weight, fp.lm.model.norm.weight)
    with torch.no_grad():
        ref = fp(x)
        assert torch.allclose(untied(x), ref, atol=FOLD_ATOL)
        assert torch.allclose(tied(x), ref, atol=FOLD_ATOL)
    with pytest.raises(ConfigError, match="already rotated"):
        rotate_model(tied)


def test_rotated_preset_saves_loads_and_records_it(tmp_path):
    m = tiny_llama()
    cfg = preset_config("w4a4", rotate=True, act_clip=0.9, act_per_group=True, act_symmetric=False)
    assert cfg.alpha is None and cfg.scheme == "w4a4-rot"
    lowbit.quantize(m, cfg, tiny_batches(4, 64))
    layers = list(m.lowbit_report.layers)
    assert layers[0].endswith(".mlp") and m.lowbit_report.layers[layers[0]]["class"] == "HadamardMLP"
    down = m.lm.model.layers[0].mlp.down_proj
    assert isinstance(down, WAQLinear) and down.act_clip == 0.9 and down.act_per_group and not down.act_symmetric
    x = tiny_batches(1, 32, seed=5)[0]
    with torch.no_grad():
        y = m(x)
    assert m.lm.lm_head.weight is m.lm.model.embed_tokens.weight  # tied head: stored once
    lowbit.save(m, tmp_path / "rot")
    loaded = lowbit.load(tmp_path / "rot", model=tiny_llama(seed=123))
    assert loaded.lowbit_config.rotate and loaded.lowbit_config.act_clip == 0.9
    assert isinstance(loaded.lm.model.norm, RotatedRMSNorm)
    assert loaded.lm.lm_head.weight is loaded.lm.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_rotate_refuses_smoothing_and_quantized_models():
    from lowbit.algorithms.smoothquant import WAConfig

    with pytest.raises(ConfigError, match="rotate replaces SmoothQuant"):
        WAConfig(weight_bits=4, act_bits=4, group_size=128, rotate=True)  # alpha 0.5 by default
    m = tiny_llama()
    lowbit.quantize(m, preset_config("w4a8", weight_method="rtn"), tiny_batches(2, 32))
    with pytest.raises(ConfigError, match="float model"):
        rotate_model(m)


def test_rotated_kv_cache_is_exact_unquantized_and_closer_at_int4():
    fp = tiny_llama()
    x = tiny_batches(1, 96, seed=2)[0]
    with torch.no_grad():
        full = fp(x)
        # with a window longer than the text nothing is quantized: the rotation alone must be exact
        cache = make_cache(fp.lm.config, "int4-rot")
        for layer in cache.layers:
            layer.residual = 1000
        out = fp.lm(input_ids=x, cache=cache, use_cache=True).logits
        assert torch.allclose(out, full, atol=1e-4)
        assert KVCacheLM(fp, "int4-rot").lowbit_scheme.endswith("kv-int4-rot")
        q4 = KVCacheLM(fp, "int4-rot", chunk=16)(x)
        assert (q4 - full).abs().max() < 0.5 * full.abs().max()
    with pytest.raises(ConfigError, match="-rot"):
        make_cache(fp.lm.config, "int3-rot")


def test_token_kurtosis_and_lint_report_before_after():
    from lowbit.analysis.lint import KURTOSIS_WARN, kurtosis_by_kind, lint, token_kurtosis

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4096, generator=g)
    assert abs(float(token_kurtosis(x).mean()) - 3.0) < 0.2  # Gaussian
    x[:, 7] = 80.0
    assert float(token_kurtosis(x).mean()) > 100  # one outlier channel per token
    m = tiny_llama()
    with torch.no_grad():
        m.lm.model.embed_tokens.weight[:, 3] *= 60  # an outlier channel in the residual stream
    report = lint(m, tiny_batches(2, 32))
    k = report.stats["kurtosis"]
    q = k["lm.model.layers.0.self_attn.q_proj"]
    assert q["before"] > KURTOSIS_WARN and q["after"] < q["before"] / 3
    assert any(f.rule == "activation-kurtosis" for f in report.findings)
    kinds = kurtosis_by_kind(k)  # what `lowbit lint` prints
    assert kinds["q_proj"]["n"] == 2 and kinds["q_proj"]["median_after"] < kinds["q_proj"]["median_before"] / 3


@pytest.mark.parametrize("per_group,symmetric", [(False, True), (True, True), (False, False), (True, False)])
def test_waqlinear_activation_grids_match_fake_quant_and_spec(per_group, symmetric):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 40)
    x = torch.randn(2, 7, 128) * 2 + 0.5
    m = WAQLinear.from_float(lin, 4, 32, True, 4, None, "auto", 0.9, per_group, symmetric)
    assert torch.allclose(m(x), m.fake_forward(x), atol=1e-4)
    twin = WAQLinear.from_spec({k: v for k, v in m.spec().items() if k != "class"})
    twin.load_state_dict(m.state_dict())
    assert torch.equal(twin(x), m(x))


def test_cli_options_build_the_rotated_preset():
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.config import build_config

    cfg = build_config("w4a4", {"rotate": True, "act_clip": 0.9, "act_per_group": True, "act_symmetric": False})
    assert cfg.rotate and cfg.alpha is None and cfg.act_clip == 0.9 and cfg.act_per_group and not cfg.act_symmetric
    with pytest.raises(ConfigError, match="does not take"):
        build_config("rtn", {"rotate": True})
    out = CliRunner().invoke(app, ["quantize", "--help"], terminal_width=200).output
    assert all(flag in out for flag in ("--rotate", "--act-clip", "--act-per-group", "--act-affine"))


def test_presets_take_the_gptq_hessian_options_in_their_weight_step():
    """--attention-hessian / --residual-weights on a W/A preset reach its GPTQ step: v_proj solves the
    attention-mixed Hessian, o_proj / down_proj the residual-weighted one (recorded per linear), layer 0's
    q_proj (same inputs, same plain Hessian) keeps its codes; where there is no GPTQ step they are refused."""
    from lowbit.algorithms.smoothquant import WAConfig
    from lowbit.config import build_config

    cfg = build_config("w4a8", {"rotate": True, "attention_hessian": True, "residual_weights": True})
    assert cfg.attention_hessian and cfg.residual_weights and cfg.scheme == "w4a8-rot-attnh-resw"
    fp, calib = tiny_llama(hidden=64, inter=128), tiny_batches(4, 64)
    models = {}
    for opts in (False, True):
        m = copy.deepcopy(fp)
        lowbit.quantize(m, preset_config("w4a8", rotate=True, group_size=32, attention_hessian=opts,
                                         residual_weights=opts), calib)
        models[opts] = m
    st = models[True].lowbit_report.extra["gptq"]["layers"]
    assert st["lm.model.layers.0.self_attn.v_proj"]["hessian"] == "attention-mixed inputs"
    assert st["lm.model.layers.1.self_attn.o_proj"]["hessian"] == "residual-weighted inputs"
    assert st["lm.model.layers.1.mlp.down_proj"]["hessian"] == "residual-weighted inputs"
    assert "hessian" not in models[False].lowbit_report.extra["gptq"]["layers"]["lm.model.layers.0.self_attn.v_proj"]
    layers = {k: m.lm.model.layers[0] for k, m in models.items()}
    assert torch.equal(layers[True].self_attn.q_proj.qweight, layers[False].self_attn.q_proj.qweight)
    assert not torch.equal(layers[True].self_attn.v_proj.qweight, layers[False].self_attn.v_proj.qweight)
    assert not torch.equal(layers[True].mlp.down_proj.qweight, layers[False].mlp.down_proj.qweight)
    with pytest.raises(ConfigError, match="not 'rtn'"):
        WAConfig(weight_bits=4, group_size=32, weight_method="rtn", attention_hessian=True)
    with pytest.raises(ConfigError, match="no GPTQ step"):
        lowbit.quantize(copy.deepcopy(fp), preset_config("w8a8", rotate=True, residual_weights=True), calib)
    plain = torch.nn.Sequential(torch.nn.Linear(64, 64))  # the generic path rounds its weights: refused, untouched
    with pytest.raises(ConfigError, match="not a Llama-layout"):
        lowbit.quantize(plain, WAConfig(weight_bits=4, group_size=32, alpha=None, weight_method="gptq",
                                        residual_weights=True), [torch.randn(2, 64)])
    assert isinstance(plain[0], torch.nn.Linear)


# The decoder and the model's forward compute in fp32 from the same dequantized weights and the same
# Hadamard (fast transform in torch, butterflies + the dense 12 x 12 factor in C): summation order only.
DECODER_LOGIT_TOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("inter", [128, 192])  # 192 = 12 x 16: the Paley factor in the online Hadamard
def test_fast_decoder_runs_rotated_weight_only_models(inter):
    """A rotated 4-bit model (online Hadamard before down_proj, tied head through RotatedRMSNorm) decodes
    on the fast decoder: prompt (torch path) and single tokens (the C step) match the model's forward."""
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.models.decode import Decoder

    m = tiny_llama(hidden=64, inter=inter)
    lowbit.quantize(m, GPTQConfig(bits=4, group_size=32, asymmetric_calib=True, rotate=True, kernel="reference"),
                    tiny_batches(4, 64))
    assert isinstance(m.lm.model.norm, RotatedRMSNorm)
    ids = tiny_batches(1, length=20, seed=3)[0]
    with torch.inference_mode():
        full = m(ids)
    for kernel in ("auto", "reference"):
        d = Decoder(m, max_len=32, kernel=kernel)
        assert (d._step is not None) == (kernel == "auto")
        with torch.inference_mode():
            steps = [d.forward(ids[:, :12], 0)]
            steps += [d.forward(ids[:, p:p + 1], p) for p in range(12, 20)]
        assert _rel(steps[0], full[:, 11]) < DECODER_LOGIT_TOL, kernel
        assert _rel(torch.stack(steps[1:], dim=1), full[:, 12:20]) < DECODER_LOGIT_TOL, kernel


def test_fast_decoder_refuses_other_online_rotations_and_gguf_export_refuses_rotated(tmp_path):
    from lowbit.models.decode import Decoder

    rot = tiny_llama(hidden=64, inter=128)
    rotate_model(rot, seed=1)
    Decoder(rot, max_len=64)  # HadamardMLP + RotatedRMSNorm: run by the decoder
    rot.lm.model.layers[0].input_layernorm = RotatedRMSNorm(64, 1e-5)  # an online rotation it does not compute
    with pytest.raises(ConfigError, match="online rotation"):
        Decoder(rot, max_len=64)
    from lowbit.io.gguf_export import export_gguf

    with pytest.raises(ConfigError, match="rotated"):  # llama.cpp would skip the online Hadamards
        export_gguf(rot, tmp_path / "rot.gguf")
    assert not (tmp_path / "rot.gguf").exists()


def test_activation_aware_gptaq_lowers_the_w4a4_calibration_error():
    """weight_method='gptaq' puts each WAQLinear's run-time activation grid into GPTAQ's solve
    (min ||W X_fp - W_q Q_a(X_q)||): the rotated W4A4 model's logits on its calibration windows come
    closer to fp32 than with GPTQ's weights. (On a random tiny model unseen windows need not follow;
    the held-out claims are SmolLM2's, bench/rotation.py.) 'auto' picks it for rotated presets."""
    from lowbit.algorithms.gptq import GPTQConfig, make_gptq_process
    from lowbit.algorithms.smoothquant import WAConfig

    fp = tiny_llama(hidden=64, inter=128)
    calib = tiny_batches(8, 64)
    errors, used = {}, {}
    for method in ("gptq", "gptaq", "auto"):
        m = copy.deepcopy(fp)
        cfg = WAConfig(weight_bits=4, act_bits=4, group_size=16, alpha=None, rotate=True, weight_method=method,
                       act_clip=0.9)
        lowbit.quantize(m, cfg, calib)
        used[method] = m.lowbit_report.extra["wa"]["weight_method"]
        with torch.no_grad():
            errors[method] = sum(float((m(x) - fp(x)).pow(2).mean()) for x in calib)
    assert errors["gptaq"] < errors["gptq"], errors
    assert used == {"gptq": "gptq", "gptaq": "gptaq", "auto": "gptaq"} and errors["auto"] == errors["gptaq"]
    with pytest.raises(ConfigError, match="asymmetric_calib"):
        make_gptq_process(GPTQConfig(), "model.layers", None, {}, act_quant=lambda n, x: x)


def test_rotated_weight_only_gptaq_saves_loads_and_beats_unrotated_calibration_error(tmp_path):
    """GPTQConfig(rotate=True) (scheme gptaq-rot): the rotations are folded in before GPTAQ, recorded
    ahead of the linears, and rebuilt on load; on a tiny model whose residual stream has outlier
    channels (the reason for rotating) the rotated W4 model's calibration logits are closer to fp32."""
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.config import build_config
    from lowbit.nn import WeightOnlyQLinear

    fp = tiny_llama(hidden=64, inter=128)
    with torch.no_grad():  # outlier input channels, as real LMs have
        fp.lm.model.embed_tokens.weight[:, :3] *= 30.0
    calib = tiny_batches(8, 64)
    errors = {}
    for rotate in (False, True):
        m = copy.deepcopy(fp)
        lowbit.quantize(m, GPTQConfig(bits=4, group_size=16, asymmetric_calib=True, init="mse", rotate=rotate), calib)
        with torch.no_grad():
            errors[rotate] = sum(float((m(x) - fp(x)).pow(2).mean()) for x in calib)
    assert errors[True] < errors[False], errors
    assert m.lowbit_config.scheme.endswith("-rot") and m.lowbit_report.extra["rotation"]["online_down"]
    assert isinstance(m.lm.model.layers[0].mlp.down_proj, WeightOnlyQLinear)
    assert list(m.lowbit_report.layers)[0].endswith(".mlp")  # the HadamardMLP, ahead of its linears
    x = tiny_batches(1, 32, seed=5)[0]
    with torch.no_grad():
        y = m(x)
    lowbit.save(m, tmp_path / "rot")
    loaded = lowbit.load(tmp_path / "rot", model=tiny_llama(hidden=64, inter=128, seed=123))
    assert isinstance(loaded.lm.model.norm, RotatedRMSNorm) and loaded.lowbit_config.rotate
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    cfg = build_config("gptaq-rot")
    assert cfg.rotate and cfg.asymmetric_calib and cfg.init == "mse" and cfg.scheme == "gptaq-w4-g128-sym-mseinit-rot-attnh-resw"
    with pytest.raises(ConfigError, match="gguf"):
        GPTQConfig(bits=4, group_size=32, gguf="q4_0", rotate=True)


def test_activation_clip_search_picks_per_input_clips():
    """act_clip_search (the GPTAQ presets' default): each input's clip minimises ||(Q_c(x) - x) W^T||
    over ACT_CLIP_GRID and act_clip; the linears sharing an input share it; a 4-bit grid over 256
    Gaussian channels clips (the rare large values cost less clipped than the step they widen), and the
    rotated W4A4 model's calibration logits come no further from fp32."""
    from lowbit.algorithms.smoothquant import ACT_CLIP_GRID, WAConfig, search_act_clip
    from lowbit.nn.wa_linear import fake_quantize_activations

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(16, 256, generator=g)  # (T, K), (N, K)
    clip = search_act_clip(x, w, 4, 0, True, 1.0)

    def err(c):
        return float(((fake_quantize_activations(x, 4, c, 0, True) - x) @ w.T).pow(2).sum())

    assert clip < 1.0 and err(clip) == min(err(c) for c in ACT_CLIP_GRID)
    fp = tiny_llama(hidden=64, inter=128)
    calib = tiny_batches(8, 64)
    errors = {}
    for search in (False, None):
        m = copy.deepcopy(fp)
        cfg = WAConfig(weight_bits=4, act_bits=4, group_size=16, alpha=None, rotate=True, weight_method="auto",
                       act_clip=0.9, act_clip_search=search)
        lowbit.quantize(m, cfg, calib)
        with torch.no_grad():
            errors[search] = sum(float((m(x) - fp(x)).pow(2).mean()) for x in calib)
    assert errors[None] <= errors[False], errors
    chosen = m.lowbit_report.extra["wa"]["act_clips"]
    assert len(chosen) == 4 * 2 and set(chosen.values()) <= set(ACT_CLIP_GRID)  # 4 inputs per layer, 2 layers
    attn = m.lm.model.layers[0].self_attn
    assert attn.q_proj.act_clip == attn.k_proj.act_clip == attn.v_proj.act_clip == chosen[
        "lm.model.layers.0.self_attn.q_proj"]
    with pytest.raises(ConfigError, match="act_clip_search"):
        WAConfig(weight_bits=4, act_bits=4, alpha=None, weight_method="gptq", act_clip_search=True)


def test_presets_take_a_group_size_that_reaches_the_modules_and_the_saved_folder(tmp_path):
    from lowbit.config import build_config

    cfg = build_config("w4a8", {"rotate": True, "group_size": 32})
    assert cfg.group_size == 32 and cfg.scheme == "w4a8-g32-rot"
    assert build_config("w4a8", {"group_size": 128}).scheme == "w4a8"  # the preset's own: name unchanged
    with pytest.raises(ConfigError, match="per output channel"):
        preset_config("w8a8", group_size=32)
    with pytest.raises(ConfigError, match="group_size must be >= 1"):
        preset_config("w4a4", group_size=-1)
    m = tiny_llama()
    lowbit.quantize(m, cfg, tiny_batches(4, 64))
    q = m.lm.model.layers[0].self_attn.q_proj
    assert isinstance(q, WAQLinear) and q.group_size == 32 and q.scale.shape[-1] * 32 == q.in_features
    x = tiny_batches(1, 32, seed=5)[0]
    with torch.no_grad():
        y = m(x)
    lowbit.save(m, tmp_path / "g32")
    loaded = lowbit.load(tmp_path / "g32", model=tiny_llama(seed=123))
    assert loaded.lowbit_config.group_size == 32
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_affine_preset_weights_move_unsigned_codes_to_the_signed_grid(tmp_path):
    from lowbit.algorithms.gptq import rtn_solution
    from lowbit.config import build_config

    # GPTQ / RTN give affine 4-bit codes on uint4 ([0, 15]); WAQLinear's int8 product wants them signed, same q - z
    lin = torch.nn.Linear(64, 8, bias=False)
    codes, qp = rtn_solution(lin.weight.detach(), "uint4", False, 32)
    assert int(codes.min()) >= 0 and int(codes.max()) > 7
    m = WAQLinear.from_quantized(lin, codes, qp, 32)
    scale = qp.scale.reshape(8, 2, 1).half().float()  # stored in fp16
    want = (codes.float().reshape(8, 2, 32) - qp.zero_point.float().reshape(8, 2, 1)) * scale  # (N, G, g)
    assert torch.equal(m.dequantized_weight(), want.reshape(8, 64))
    assert int(m.codes().min()) >= -8 and int(m.codes().max()) <= 7

    cfg = build_config("w4a8", {"rotate": True, "symmetric": False})
    assert not cfg.symmetric and cfg.scheme == "w4a8-affine-rot"
    assert build_config("w2a8", {"symmetric": True}).scheme == "w2a8-sym"
    assert build_config("w4a8", {"symmetric": True}).scheme == "w4a8"  # the preset's own: name unchanged
    with pytest.raises(ConfigError, match="int8 weights are symmetric"):
        preset_config("w8a8", symmetric=False)
    model = tiny_llama()
    lowbit.quantize(model, cfg, tiny_batches(4, 64))
    q = model.lm.model.layers[0].self_attn.q_proj
    assert isinstance(q, WAQLinear) and q.zero_point is not None
    x = tiny_batches(1, 32, seed=5)[0]
    with torch.no_grad():
        y = model(x)
    lowbit.save(model, tmp_path / "affine")
    loaded = lowbit.load(tmp_path / "affine", model=tiny_llama(seed=123))
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
