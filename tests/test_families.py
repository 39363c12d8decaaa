"""Any model in and out: every family of the adapter table, as a tiny random Hugging Face folder.

Pipeline tests only (random weights): open the folder, quantize, save, rebuild from the saved folder
alone, identical outputs; the LLM methods on every decoder family, and clear errors where a method
needs what a family lacks.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.awq import AWQConfig
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.algorithms.smoothquant import fold_llama_smoothing
from lowbit.config import build_config
from lowbit.errors import ConfigError, LoadError
from lowbit.io.open import open_model
from lowbit.models.adapters import ADAPTERS
from lowbit.nn import WeightOnlyQLinear
from tests._tiny_hf import DECODERS, ENCODERS, FAMILIES, VOCAB, tiny_folder

IDS = torch.tensor([[5, 10, 20, 30, 40, 50, 60, 7]])
SENTENCES = ["the python documentation", "a module of the standard library"]
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3", "gemma")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_folder(f, root / f) for f in FAMILIES}


def _out(model):
    with torch.inference_mode():
        return model.encode(SENTENCES) if model.task == "encoder" else model(IDS)


def _calib(n=6, t=64):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(7, VOCAB, (1, t), generator=g) for _ in range(n)]


def test_every_family_has_a_tiny_folder_and_an_adapter_row():
    assert set(FAMILIES) <= set(ADAPTERS)


@pytest.mark.parametrize("family", FAMILIES)
def test_open_quantize_save_load_self_contained(family, folders, tmp_path):
    model = open_model(str(folders[family]))
    assert model.task == ("encoder" if family in ENCODERS else "causal-lm")
    lowbit.quantize(model, build_config("rtn", {"bits": 4, "group_size": 16, "symmetric": True}))
    assert any(isinstance(m, WeightOnlyQLinear) for m in model.modules())
    saved = tmp_path / "q"
    lowbit.save(model, saved)
    assert (saved / "config.json").is_file()
    source = tmp_path / "gone"
    shutil.copytree(saved, source)  # the copy must rebuild without the source folder or lowbit's loaders
    again = lowbit.load(source)
    assert torch.equal(_out(model), _out(again))
    assert again.lowbit_metadata.wrapper["kind"] == model.task
    assert not [n for n, p in again.named_parameters() if p.is_meta]


@pytest.mark.parametrize("family", DECODERS)
def test_gptq_on_every_decoder_family(family, folders):
    model = open_model(str(folders[family]))
    n_linear = sum(isinstance(m, nn.Linear) for m in model.lm.get_submodule(ADAPTERS[family].layers).modules())
    lowbit.quantize(model, GPTQConfig(bits=4, group_size=16), _calib())
    assert len(model.lowbit_report.layers) == n_linear  # every decoder linear, fused ones included
    assert torch.isfinite(_out(model)).all()


@pytest.mark.parametrize("family", DECODERS)
def test_awq_folds_into_llama_layouts_and_names_what_others_lack(family, folders):
    model = open_model(str(folders[family]))
    if family in LLAMA_LAYOUT:
        lowbit.quantize(model, AWQConfig(bits=4, group_size=16), _calib(2))
        assert model.lowbit_report.layers and torch.isfinite(_out(model)).all()
    else:
        with pytest.raises(ConfigError, match="laid out differently"):
            lowbit.quantize(model, AWQConfig(bits=4, group_size=16), _calib(2))


@pytest.mark.parametrize("family", LLAMA_LAYOUT)
def test_smoothing_fold_keeps_outputs(family, folders):
    """Folding s into the norms (Gemma's ``x (1 + w)`` included) and into the next linears is exact."""
    model = open_model(str(folders[family]))
    before = _out(model)
    with torch.no_grad():
        fold_llama_smoothing(model, _calib(2), alpha=0.5)
    torch.testing.assert_close(_out(model), before, rtol=1e-4, atol=1e-4)


def test_family_without_an_adapter_gets_generic_schemes_and_a_clear_llm_error(tmp_path):
    import transformers as tf

    from tests._tiny_hf import tiny_tokenizer

    cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "opt"))
    tiny_tokenizer().save_pretrained(str(tmp_path / "opt"))
    model = open_model(str(tmp_path / "opt"))
    assert model.task == "causal-lm"  # from the config's architectures
    with pytest.raises(ConfigError, match="has no architecture adapter"):
        lowbit.quantize(model, GPTQConfig(bits=4, group_size=16), _calib())
    lowbit.quantize(model, build_config("rtn", {"bits": 8, "group_size": 0}))
    assert len(model.lowbit_report.layers) == 13  # 2 x (q, k, v, out, fc1, fc2) + lm_head


@pytest.mark.parametrize("config", [GPTQConfig(bits=4, group_size=16), AWQConfig(bits=4, group_size=16),
                                    build_config("hqq", {"group_size": 16, "guard": True})], ids=["gptq", "awq", "guard"])
def test_calibrated_llm_methods_refuse_an_encoder_by_name(folders, config):
    # an encoder's calibration is sentences, not token windows: once a bare ValueError from torch.as_tensor
    model = open_model(str(folders["bert"]))
    with pytest.raises(ConfigError, match="causal LMs only.*'bert' is an encoder.*rtn, nf4, hqq"):
        lowbit.quantize(model, config)


def test_users_own_module_saves_and_loads_given_its_constructor(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    net = Net()
    lowbit.quantize(net, build_config("rtn", {"bits": 4, "group_size": 16, "symmetric": True}))
    lowbit.save(net, tmp_path / "net")
    x = torch.randn(3, 16)
    again = lowbit.load(tmp_path / "net", model=Net())
    assert torch.equal(net(x), again(x))
    with pytest.raises(LoadError):  # without its constructor lowbit cannot know the architecture
        lowbit.load(tmp_path / "net")


def test_not_a_model_path_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a model folder|no config.json"):
        open_model(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="neither a bundled model"):
        open_model(str(tmp_path / "missing"))


def test_cli_quantizes_a_folder(folders, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["quantize", "--model", str(folders["qwen2"]), "--scheme", "rtn", "--bits", "8",
                                   "--group-size", "0", "--no-eval", "--out", str(out)])
    assert res.exit_code == 0, res.output
    again = lowbit.load(out)
    assert again.lowbit_metadata.is_quantized and again.lowbit_config.bits == 8


@pytest.mark.parametrize("weighted", (False, True))
@pytest.mark.parametrize("family", ("qwen2", "gemma"))
def test_low_memory_matches_in_memory(family, weighted, folders, caplog):
    """Layer-from-disk GPTQ on another family gives the same model as the in-memory run (with v_proj's
    attention-mixed Hessian and the residual writers' token weights too: the probe finds these families' attention
    probabilities, the hooks their norms)."""
    from lowbit.algorithms.from_disk import quantize_from_disk

    cfg = GPTQConfig(bits=4, group_size=16, attention_hessian=weighted, residual_weights=weighted)
    a = open_model(str(folders[family]))
    lowbit.quantize(a, cfg, _calib())
    b = quantize_from_disk(folders[family], cfg, calibration_data=_calib())
    assert a.lowbit_report.layers == b.lowbit_report.layers
    assert torch.equal(_out(a), _out(b))
    stats = a.lowbit_report.extra["gptq"]["layers"]
    assert sum(s.get("hessian") == "attention-mixed inputs" for s in stats.values()) == (2 if weighted else 0)
    assert sum(s.get("hessian") == "residual-weighted inputs" for s in stats.values()) == (4 if weighted else 0)
    assert "no attention probabilities" not in caplog.text


def test_low_memory_refuses_conv1d_layouts(folders):
    from lowbit.algorithms.from_disk import quantize_from_disk

    with pytest.raises(ConfigError, match="Conv1D"):
        quantize_from_disk(folders["gpt2"], GPTQConfig(bits=4, group_size=16), calibration_data=_calib())


def test_gemma_scaled_embedding_stays_float_under_w8a8(folders):
    """QEmbedding would drop Gemma's sqrt(hidden) embedding scale: the table stays float, with a reason."""
    model = open_model(str(folders["gemma"]))
    ref = _out(model)
    lowbit.quantize(model, build_config("w8a8-dynamic"))
    assert "changes the lookup" in model.lowbit_report.skipped["lm.model.embed_tokens"]
    assert torch.nn.functional.kl_div(torch.log_softmax(_out(model), -1), torch.log_softmax(ref, -1),
                                      log_target=True, reduction="batchmean") < 0.05


def test_cli_gguf_grid_and_no_double_quantization(folders, tmp_path):
    """--gguf q4_0 quantizes on llama.cpp's grid; export names what it cannot carry (a word-level
    tokenizer); an already quantized model is not quantized twice."""
    from typer.testing import CliRunner

    from lowbit.cli import app

    run = CliRunner().invoke
    out = tmp_path / "q"
    res = run(app, ["quantize", "--model", str(folders["llama"]), "--scheme", "rtn", "--gguf", "q4_0", "--no-eval",
                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = lowbit.load(out).lowbit_config
    assert (cfg.gguf, cfg.group_size, cfg.bits) == ("q4_0", 32, 4)
    res = run(app, ["export", str(out), "--format", "gguf", "--type", "q4_0", "--out", str(tmp_path / "m.gguf")])
    assert res.exit_code == 2 and "BPE tokenizers" in res.output
    res = run(app, ["quantize", "--model", str(out), "--scheme", "rtn", "--no-eval"])
    assert res.exit_code == 2 and "already quantized" in res.output
