"""The evaluation harness and `lowbit eval`: fields, values on fp32 models, clean errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lowbit.errors import ConfigError

COMMON_FIELDS = {"model", "scheme", "task", "size_bytes", "bits_per_weight"}


def test_evaluate_classifier(digits_cnn):
    from lowbit.analysis.evaluate import evaluate

    result = evaluate(digits_cnn, quick=True)
    assert COMMON_FIELDS | {"accuracy", "sps"} <= result.keys()
    assert result["model"] == "digits" and result["scheme"] == "fp32"
    assert result["accuracy"] > 90.0 and result["sps"] > 0
    n_params = sum(p.numel() for p in digits_cnn.parameters())
    assert result["size_bytes"] >= 4 * n_params  # parameters plus BatchNorm buffers
    json.dumps(result)  # JSON-ready


def test_evaluate_encoder(minilm):
    from lowbit.analysis.evaluate import evaluate

    result = evaluate(minilm, quick=True)  # fp32 minilm is its own reference
    assert COMMON_FIELDS | {"cos_mean", "cos_min", "top10_agreement", "sps_b1", "sps_b32"} <= result.keys()
    assert result["cos_min"] > 0.99999 and result["top10_agreement"] == 1.0
    assert result["sps_b1"] > 0 and result["sps_b32"] > 0
    assert abs(result["bits_per_weight"] - 32.0) < 0.01  # fp32, plus two small int64 index buffers


def test_evaluate_causal_lm(smollm2_quick_eval):
    result = smollm2_quick_eval
    assert COMMON_FIELDS | {"ppl", "kl", "prefill_tps", "ppl_heldout", "kl_heldout", "ppl_science",
                            "kl_science"} <= result.keys()
    assert math.isfinite(result["ppl"]) and result["kl"] == 0.0 and result["prefill_tps"] > 0
    assert result["n_windows"] == 2
    # all three texts reported: licence, held-out docs, science (quick: 1 window each for the last two)
    for suffix in ("_heldout", "_science"):
        assert math.isfinite(result[f"ppl{suffix}"]) and result[f"kl{suffix}"] == 0.0
        assert result[f"n_windows{suffix}"] == 1
    assert len({result["ppl"], result["ppl_heldout"], result["ppl_science"]}) == 3  # three different texts
    # tied input/output embeddings are one storage: counted once
    assert abs(result["bits_per_weight"] - 32.0) < 0.01


class _TinyLM(nn.Module):
    """A bigram LM over SmolLM2's vocabulary: cheap logits for testing the KL/perplexity arithmetic."""

    model_name = "tiny"
    task = "causal-lm"

    def __init__(self, tokenizer, seed: int):
        super().__init__()
        self.tokenizer = tokenizer
        torch.manual_seed(seed)
        self.emb = nn.Embedding(len(tokenizer), 16)
        self.head = nn.Linear(16, len(tokenizer))

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))


def test_causal_lm_kl_against_a_reference(smollm2):
    from lowbit.analysis.evaluate import evaluate

    a, b = _TinyLM(smollm2.tokenizer, 0), _TinyLM(smollm2.tokenizer, 1)
    a.lowbit_scheme = "test"
    same = evaluate(a, reference=a, quick=True)
    other = evaluate(a, reference=b, quick=True)
    assert abs(same["kl"]) < 1e-6 and other["kl"] > 1e-3
    assert same["ppl"] == other["ppl"] and same["scheme"] == "test"


def test_topk_agreement():
    from lowbit.analysis.evaluate import topk_agreement

    emb = torch.randn(40, 8)
    assert topk_agreement(emb, emb) == 1.0
    assert topk_agreement(emb, torch.randn(40, 8)) < 0.6


def test_size_counts_int8_buffers_and_shared_storage():
    from lowbit.analysis.footprint import fp32_numel, model_size_bytes

    class Int8Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("qdata", torch.zeros(100, 64, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(100, dtype=torch.float16))
            self.bias = nn.Parameter(torch.zeros(100))
            self.lowbit_fp32_numel = 100 * 64 + 100

    holder = Int8Holder()
    assert model_size_bytes(holder) == 6400 + 200 + 400
    assert fp32_numel(holder) == 6500
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert model_size_bytes(tied) == 10 * 4 * 4


def test_size_counts_torch_ao_packed_weights():
    from lowbit.analysis.footprint import model_size_bytes

    model = nn.Sequential(nn.Linear(256, 128))
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    size = model_size_bytes(q)
    assert 256 * 128 <= size <= 256 * 128 + 128 * 4 + 64  # int8 codes + fp32 bias + a scale


def test_evaluate_rejects_unknown_task():
    from lowbit.analysis.evaluate import evaluate

    with pytest.raises(ConfigError, match="encoder, causal-lm, classifier"):
        evaluate(nn.Linear(2, 2))


def test_cli_eval_digits_json():
    from typer.testing import CliRunner

    from lowbit.cli import app

    result = CliRunner().invoke(app, ["eval", "digits", "--json", "--quick"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["model"] == "digits" and payload["accuracy"] > 90.0
    assert COMMON_FIELDS <= payload.keys()


def test_cli_eval_unknown_target_is_a_clean_error(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    result = CliRunner().invoke(app, ["eval", "resnet50", "--json"])
    assert result.exit_code == 2
    assert "minilm" in result.output and "Traceback" not in result.output
    empty = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert empty.exit_code == 2 and "Traceback" not in empty.output
