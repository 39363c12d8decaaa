"""Observers (range estimation) and the static fake-quant / int8 modules built on them."""

import pytest
import torch
from torch import nn

from lowbit.core import fake_quantize, qparams_from_range
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.static import ActQuantizer, FakeQuantConv2d, FakeQuantLinear, StaticQConv2d, StaticQLinear
from lowbit.observers import OBSERVERS, make_observer
from lowbit.observers.histogram import _rebin


def heavy_tailed(n=200_000, seed=0):
    """Laplace(0, 1) samples: an exponential magnitude with a random sign."""
    g = torch.Generator().manual_seed(seed)
    return torch.empty(n).exponential_(1.0, generator=g) * torch.sign(torch.rand(n, generator=g) - 0.5)


def quant_mse(x, lo, hi, fmt, symmetric):
    qp = qparams_from_range(lo, hi, fmt, symmetric)
    return float(((fake_quantize(x, qp) - x) ** 2).mean())


def test_registry_has_the_six_methods_and_rejects_unknown_names():
    assert set(OBSERVERS) == {"minmax", "ema", "percentile", "mse", "kl", "output"}
    with pytest.raises(ConfigError, match="valid observers"):
        make_observer("entropy")
    with pytest.raises(ConfigError, match="uniform"):
        make_observer("minmax", fmt="nf4")


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_no_data_is_a_calibration_error(name):
    with pytest.raises(CalibrationError, match="saw no data"):
        make_observer(name).compute_range()


def test_minmax_is_exact_and_ema_moves_by_the_averaging_constant():
    o = make_observer("minmax", symmetric=False)
    o.observe(torch.tensor([-1.0, 2.0]))
    o.observe(torch.tensor([-3.0, 0.5]))
    assert [float(v) for v in o.compute_range()] == [-3.0, 2.0]
    e = make_observer("ema", symmetric=False, averaging_constant=0.25)
    e.observe(torch.tensor([-1.0, 2.0]))
    e.observe(torch.tensor([-3.0, 6.0]))
    lo, hi = e.compute_range()
    assert float(lo) == pytest.approx(-1.5) and float(hi) == pytest.approx(3.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_matches_exact_quantile_across_growing_batches(symmetric):
    x = heavy_tailed()
    o = make_observer("percentile", symmetric=symmetric, percentile=99.9)
    for chunk in torch.cat([x[:1000] * 0.1, x[1000:]]).split(50_000):  # the range grows: old counts re-binned
        o.observe(chunk)
    _, hi = o.compute_range()
    data = torch.cat([x[:1000] * 0.1, x[1000:]])
    exact = torch.quantile((data.abs() if symmetric else data)[:100_000], 0.999)
    assert float(hi) == pytest.approx(float(exact), rel=0.05)  # histogram + 100k-sample quantile noise


def test_rebin_keeps_the_total_count_and_the_mass_location():
    hist = torch.zeros(1, 100)
    hist[0, 10] = 50.0  # mass at [1.0, 1.1) on [0, 10]
    new = _rebin(hist, torch.zeros(1), torch.full((1,), 10.0), torch.zeros(1), torch.full((1,), 20.0))
    assert float(new.sum()) == pytest.approx(50.0)
    assert int(new.argmax()) == 5  # [1.0, 1.2) on [0, 20]


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_observer_beats_minmax_on_its_own_objective(bits):
    x = heavy_tailed(seed=1)
    fmt = f"int{bits}"
    mm, ms = make_observer("minmax", fmt), make_observer("mse", fmt)
    for chunk in x.split(40_000):
        mm.observe(chunk)
        ms.observe(chunk)
    lo_m, hi_m = mm.compute_range()
    lo_s, hi_s = ms.compute_range()
    assert float(hi_s) < float(torch.maximum(-lo_m, hi_m))  # it clips the exponential tail
    assert quant_mse(x, lo_s, hi_s, fmt, True) < quant_mse(x, lo_m, hi_m, fmt, True)


def test_kl_observer_clips_a_gaussian_inside_its_max():
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(2))
    o = make_observer("kl")
    o.observe(x)
    _, hi = o.compute_range()
    assert 2.0 < float(hi) < float(x.abs().max())


@pytest.mark.parametrize("name", ["minmax", "percentile", "mse", "ema"])
def test_per_channel_ranges_follow_each_channel(name):
    x = torch.randn(4096, 6, generator=torch.Generator().manual_seed(3)) * torch.tensor([0.1, 1, 2, 5, 10, 50.0])
    o = make_observer(name, axis=1)
    o.observe(x)
    lo, hi = o.compute_range()
    assert hi.shape == (6,) and bool((hi[1:] > hi[:-1]).all())


def test_act_quantizer_names_the_layer_on_nan_and_quantizes_on_grid():
    q = ActQuantizer(bits=4, symmetric=False, observer="minmax", name="enc.0.fc")
    with pytest.raises(CalibrationError, match="enc.0.fc"):
        q(torch.tensor([1.0, float("nan")]))
    q(torch.linspace(-1, 3, 50))  # observe
    q.calibrate()
    y = q(torch.linspace(-1, 3, 50))
    codes = y / q.scale + q.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.min() >= -8 and codes.max() <= 7
    with pytest.raises(CalibrationError, match="saw no calibration"):
        ActQuantizer(name="never").calibrate()


def _calibrated(fq, x):
    fq(x)
    fq.act.calibrate()
    return fq


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kernel", ["fast", "reference"])
def test_static_qlinear_equals_its_fake_quant_twin(symmetric, kernel):
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(48, 20)
    x = torch.randn(3, 7, 48, generator=g) + 0.5
    smooth = torch.rand(48, generator=g) + 0.5
    fq = _calibrated(FakeQuantLinear(lin, act_symmetric=symmetric, observer="mse", smooth=smooth), x)
    real = StaticQLinear.from_fake(fq, kernel=kernel)
    with torch.no_grad():
        assert torch.allclose(real(x), fq(x), atol=1e-4, rtol=1e-4)  # same codes; float sum order differs
    assert real(x).shape == (3, 7, 20)


@pytest.mark.parametrize("symmetric", [True, False])
def test_static_qconv_pads_with_the_zero_point_and_equals_fake_quant(symmetric):
    g = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
    x = torch.rand(2, 3, 9, 9, generator=g) + 0.2  # all positive: the affine zero-point is not 0
    fq = _calibrated(FakeQuantConv2d(conv, act_symmetric=symmetric), x)
    real = StaticQConv2d.from_fake(fq)
    with torch.no_grad():
        assert torch.allclose(real(x), fq(x), atol=1e-4, rtol=1e-4)
    fast, ref = StaticQConv2d.from_fake(fq, "fast"), StaticQConv2d.from_fake(fq, "reference")
    assert torch.equal(fast(x), ref(x))


def test_unsupported_conv_is_refused_with_the_reason():
    fq = FakeQuantConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="grouped"):
        StaticQConv2d.from_fake(fq)


def test_fake_quant_weights_pass_straight_through_gradients():
    lin = nn.Linear(8, 4)
    fq = _calibrated(FakeQuantLinear(lin, weight_bits=4, act_bits=4), torch.randn(16, 8))
    fq.train()
    fq(torch.randn(5, 8)).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
