"""Bias correction, AdaRound, BRECQ, QDrop: each beats round-to-nearest on a fixed small model,
the learned quantizers' math, and the bad-input errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms._learned import GAMMA, ZETA, ActQuantizer, QuantLayer, WeightQuantizer
from lowbit.algorithms._recon import TrainingError, find_blocks
from lowbit.algorithms.adaround import AdaRoundConfig
from lowbit.algorithms.bias_correction import BiasCorrectionConfig, expected_input
from lowbit.algorithms.brecq import BrecqConfig
from lowbit.algorithms.qdrop import QDropConfig
from lowbit.errors import CalibrationError, ConfigError

ITERS = 150  # enough for every method to pull ahead of RTN on this model (it does at ~50)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops, one thread


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16)).eval()  # N % 16 == 0: the int4 fast kernel needs it


def small_batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 16, generator=g).abs() + 0.2 for _ in range(n)]  # positive mean inputs


def output_error(model: nn.Module, ref: nn.Module, batches) -> float:
    with torch.no_grad():
        return float(sum((model(b) - ref(b)).pow(2).mean() for b in batches) / len(batches))


@pytest.fixture(scope="module")
def rtn_error():
    ref, batches = small_model(), small_batches()
    out = {}
    for act in (None, 4):
        m = copy.deepcopy(ref)
        lowbit.quantize(m, BiasCorrectionConfig(bits=2, act_bits=act, mode="none", first_last_bits=None), batches)
        out[act] = output_error(m, ref, batches)
    return out


@pytest.mark.parametrize("act_bits", [None, 4])
@pytest.mark.parametrize("config", [
    BiasCorrectionConfig(bits=2, first_last_bits=None),
    AdaRoundConfig(bits=2, first_last_bits=None, iters=ITERS),
    BrecqConfig(bits=2, first_last_bits=None, iters=ITERS),
    QDropConfig(bits=2, first_last_bits=None, iters=ITERS),
], ids=lambda c: c.kind)
def test_method_beats_rtn_reconstruction_error(config, act_bits, rtn_error):
    ref, batches = small_model(), small_batches()
    model = copy.deepcopy(ref)
    config = lowbit.config.override(config, act_bits=act_bits)
    lowbit.quantize(model, config, batches)
    err = output_error(model, ref, batches)
    assert err < 0.9 * rtn_error[act_bits], f"{config.scheme}: output MSE {err:.4g} vs RTN {rtn_error[act_bits]:.4g}"
    # the result is made of real modules, not fake-quant wrappers
    kinds = {type(m).__name__ for m in model.modules()}
    assert not kinds & {"QuantLayer", "ActQuantizer"}
    assert kinds & {"WeightOnlyQLinear", "StaticQLinear"}


def test_reconstruction_lowers_every_block_loss():
    ref, batches = small_model(), small_batches()
    model = copy.deepcopy(ref)
    lowbit.quantize(model, AdaRoundConfig(bits=2, first_last_bits=None, iters=ITERS), batches)
    for name, r in model.lowbit_report.extra["reconstruction"].items():
        assert r["loss_after"] < r["loss_before"], name


def test_adaround_init_and_regulariser():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    wq = WeightQuantizer(w, 4, rounding="adaround")
    s = wq.qparams().scale[:, None]
    rest = w / s - torch.floor(w / s)
    torch.testing.assert_close(wq.h(), rest, atol=1e-5, rtol=0)  # soft rounding starts at the float weight
    wq.hard = False
    torch.testing.assert_close(wq(w), torch.clamp(w / s, wq.qmin, wq.qmax) * s, atol=1e-5, rtol=0)
    wq.hard = True  # hardened at init = round to nearest (V >= 0 <=> rest >= 0.5)
    assert torch.equal(wq.codes(w), torch.round(w / s).clamp(wq.qmin, wq.qmax).to(torch.int8))
    # regulariser: 0 when every h is 0 or 1, 1 per element at h = 0.5
    with torch.no_grad():
        wq.alpha.fill_(10.0)
    assert float(wq.regulariser(2.0).detach()) == 0.0
    with torch.no_grad():
        wq.alpha.fill_(float(-torch.log(torch.tensor((ZETA - GAMMA) / (0.5 - GAMMA) - 1))))
    assert float(wq.regulariser(2.0).detach()) == pytest.approx(w.numel(), rel=1e-4)


def test_weight_quantizer_mse_scale_beats_absmax():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[0, 0] = 12.0  # an outlier: clipping it costs less than a coarse grid
    wq = WeightQuantizer(w, 4)
    absmax = (w.abs().amax(1) / 7)[:, None]
    rtn = torch.round(w / absmax).clamp(-8, 7) * absmax
    assert float((wq(w) - w).pow(2).sum()) < float((rtn - w).pow(2).sum())


def test_qdrop_drops_about_half():
    aq = ActQuantizer(2, name="x")
    aq(torch.rand(1000) * 4)
    aq.init_from_observer()
    aq.drop_prob = 0.5
    x = torch.rand(20000) * 4
    kept_float = (aq(x) == x).float().mean()
    aq.drop_prob = 0.0
    exact = (aq(x) == x).float().mean()  # values that happen to sit on the grid
    assert 0.45 < float(kept_float) - float(exact) * 0.5 < 0.55


def test_blocks_of_a_chain_and_of_a_module_list():
    m = small_model()
    order = ["0", "1", "2", "3", "4"]
    blocks = find_blocks(m, ["0", "2", "4"], order, "block")
    assert [b.layers for b in blocks] == [("0", "2"), ("4",)]
    assert blocks[0].output == "3" and not blocks[0].cached  # ends after the ReLU before the next layer

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)) for _ in range(2)])

    s = Stack()
    blocks = find_blocks(s, ["layers.0.0", "layers.0.2", "layers.1.0", "layers.1.2"],
                         ["layers.0.0", "layers.0.1", "layers.0.2", "layers.1.0", "layers.1.1", "layers.1.2"], "block")
    assert [(b.name, b.cached) for b in blocks] == [("layers.0", True), ("layers.1", True)]


def test_data_free_expected_input_matches_sampling():
    """E[ReLU(z)], z ~ N(beta, gamma^2), against a Monte-Carlo estimate."""
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    model = nn.Sequential(bn, nn.ReLU(), nn.Linear(3, 2))
    ex, _ = expected_input(model, "2", ["0", "1", "2"])
    z = torch.randn(400_000, 3, generator=torch.Generator().manual_seed(0)) * bn.weight.detach() + bn.bias.detach()
    torch.testing.assert_close(ex, z.relu().mean(0), atol=0.01, rtol=0)


def test_digits_w2a4_bias_correction_beats_rtn(digits_cnn):
    """On the real digits CNN: RTN at W2A4 loses > 10 points, bias correction recovers most of them."""
    from lowbit.analysis.evaluate import evaluate

    accs = {}
    for mode in ("none", "data-free"):
        m = copy.deepcopy(digits_cnn)
        lowbit.quantize(m, BiasCorrectionConfig(bits=2, act_bits=4, mode=mode))
        accs[mode] = evaluate(m, quick=True)["accuracy"]
    assert accs["data-free"] > accs["none"] + 5.0, accs
    assert accs["data-free"] >= DIGITS_W2A4_BIASCORR_FLOOR, accs


DIGITS_W2A4_BIASCORR_FLOOR = 97.0  # measured 98.4 (fp32 99.3); RTN 84.2


# ------------------------------------------------------------------------------- bad input

def test_mismatched_calibration_batches():
    model = small_model()
    with pytest.raises(CalibrationError, match="per-sample shape"):
        lowbit.quantize(model, AdaRoundConfig(bits=4, iters=1), [torch.randn(4, 16), torch.randn(4, 12)])
    with pytest.raises(CalibrationError, match="does not fit the model"):
        lowbit.quantize(model, AdaRoundConfig(bits=4, iters=1), [torch.randn(4, 12)])
    with pytest.raises(CalibrationError, match="empty"):
        lowbit.quantize(model, BrecqConfig(bits=4, iters=1), [])
    assert isinstance(model[0], nn.Linear)  # untouched


def test_no_quantizable_layer():
    with pytest.raises(ConfigError, match="no quantizable layer"):
        lowbit.quantize(nn.Sequential(nn.ReLU()), QDropConfig(bits=4, iters=1), [torch.randn(2, 3)])


def test_bad_configs():
    with pytest.raises(ConfigError, match="bits"):
        AdaRoundConfig(bits=5)
    with pytest.raises(ConfigError, match="symmetric"):
        BrecqConfig(bits=4, act_bits=4, symmetric=False)
    with pytest.raises(ConfigError, match="drop_prob"):
        QDropConfig(drop_prob=1.0)
    with pytest.raises(ConfigError, match="mode"):
        BiasCorrectionConfig(mode="magic")


def test_nan_during_reconstruction_names_layer_and_restores():
    ref, batches = small_model(), small_batches()
    model = copy.deepcopy(ref)
    state = {"grad_calls": 0}

    def poison(mod, args, out):  # from the 3rd training step on, the ReLU "1" outputs NaN
        if torch.is_grad_enabled():
            state["grad_calls"] += 1
        return out * float("nan") if state["grad_calls"] > 2 else out

    model[1].register_forward_hook(poison)
    with pytest.raises(TrainingError, match="layer '1'"):
        lowbit.quantize(model, BrecqConfig(bits=4, first_last_bits=None, iters=5), batches)
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)  # handed back in float


def test_config_json_round_trip():
    from lowbit.config import config_from_json, config_to_json

    for cfg in (BiasCorrectionConfig(mode="data-free", act_bits=4), AdaRoundConfig(bits=2), QDropConfig(act_bits=4)):
        assert config_from_json(config_to_json(cfg)) == cfg


def test_quant_layer_rejects_other_modules():
    with pytest.raises(ConfigError, match="Conv2d or Linear"):
        QuantLayer(nn.ReLU(), None, None)
