"""The friendliness lint on small constructed models with known problems (and clean twins without)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.analysis.lint import DEEP_LAYERS, OUTLIER_RATIO, lint
from lowbit.nn import WeightOnlyQLinear


def rules(report):
    return {f.rule for f in report.findings}


def test_silu_flagged_relu_not():
    silu = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32))
    relu = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    found = lint(silu).by_rule("activation-function")
    assert len(found) == 1 and found[0].where == "1" and "SiLU" in found[0].message and found[0].suggestion
    assert "activation-function" not in rules(lint(relu))


class SE(nn.Module):
    def __init__(self, c=32, r=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, c // r, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(c // r, c, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


def test_squeeze_excitation_flagged():
    model = nn.Sequential(nn.Conv2d(3, 32, 3), SE(), nn.Conv2d(32, 8, 1))
    found = lint(model).by_rule("squeeze-excitation")
    assert [f.where for f in found] == ["1"] and "8-bit" in found[0].suggestion
    assert "squeeze-excitation" not in rules(lint(nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU())))


def test_deep_narrow_flagged_wide_shallow_not():
    deep = nn.Sequential(*[m for _ in range(DEEP_LAYERS + 4) for m in (nn.Linear(8, 8), nn.ReLU())])
    found = lint(deep).by_rule("deep-narrow")
    assert len(found) == 1 and found[0].value == DEEP_LAYERS + 4
    wide = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    assert "deep-narrow" not in rules(lint(wide))


def test_large_softmax_head_flagged():
    lm = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 5000))
    found = lint(lm).by_rule("large-softmax")
    assert [f.where for f in found] == ["1"] and found[0].value == 5000
    assert "large-softmax" not in rules(lint(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))))


class Scaled(nn.Module):
    """Multiplies input channel 3 by 100 before a linear: a planted activation outlier channel."""

    def __init__(self):
        super().__init__()
        gain = torch.ones(32)
        gain[3] = 100.0
        self.register_buffer("gain", gain)
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        return self.fc(x * self.gain)


def test_activation_outlier_channel_named():
    torch.manual_seed(0)
    batches = [torch.randn(64, 32) for _ in range(2)]
    report = lint(Scaled(), batches)
    found = report.by_rule("activation-outliers")
    assert len(found) == 1 and found[0].where == "fc" and "[3]" in found[0].message
    assert found[0].value > OUTLIER_RATIO and "SmoothQuant" in found[0].suggestion
    assert report.stats["activations"]["fc"]["outlier_channels"] == [3]
    clean = nn.Sequential(nn.Linear(32, 16))
    assert "activation-outliers" not in rules(lint(clean, batches))


def test_weight_channel_range_flagged():
    torch.manual_seed(0)
    fc = nn.Linear(64, 32)
    with torch.no_grad():
        fc.weight[5] *= 50
    found = lint(nn.Sequential(fc)).by_rule("weight-range")
    assert found and all(f.where == "0" for f in found) and any("per-channel" in f.suggestion for f in found)
    assert "weight-range" not in rules(lint(nn.Sequential(nn.Linear(64, 32))))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.up, self.down = nn.Linear(64, 64), nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        h = self.inp(x)
        return h + self.down(torch.relu(self.up(h)))


def test_residual_join_of_different_precisions():
    model = Residual()
    assert "residual-precision" not in rules(lint(model))
    model.down = WeightOnlyQLinear.from_float(model.down, bits=4, group_size=64)
    found = lint(model).by_rule("residual-precision")
    assert len(found) == 1 and "int4" in found[0].message and "float32" in found[0].message
    assert found[0].where == "inp + down"


def test_residual_blocks_fallback_for_untraceable_models():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent: not fx-traceable
                return x
            return x + self.fc(x)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block() for _ in range(3)])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    model = Stack()
    model.blocks[1].fc = WeightOnlyQLinear.from_float(model.blocks[1].fc, bits=4, group_size=64)
    found = lint(model).by_rule("residual-precision")
    assert [f.where for f in found] == ["blocks.0.fc -> blocks.1.fc", "blocks.1.fc -> blocks.2.fc"]


def test_digits_cnn_is_relu_and_clean_of_structure_findings(digits_cnn, digits_data):
    report = lint(digits_cnn, [digits_data[0][:128]])
    assert not {"activation-function", "squeeze-excitation", "deep-narrow", "large-softmax",
                "residual-precision"} & rules(report)
    assert set(report.stats["activations"]) == {"conv1", "conv2", "conv3", "fc"}
    assert all(f.suggestion for f in report.findings)
