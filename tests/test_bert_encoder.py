"""The fused C BERT encoder (lowbit.kernels.bert_encoder) against its twin, the torch forward of the same
quantized SentenceEncoder: a tiny random BERT (odd sizes, partial tiles) and the real MiniLM weights."""

import copy

import pytest
import torch

import lowbit
from lowbit.config import build_config
from lowbit.errors import ConfigError
from lowbit.io.open import open_model
from lowbit.kernels import bert_encoder
from tests._tiny_hf import tiny_folder

SENTENCES = ["the python documentation", "a module of the standard library and the module of the language",
             "library", "the documentation of a standard module"]


def _fused_or_skip(model):
    runner, why = bert_encoder.fused_encoder(model)
    if runner is None:
        pytest.skip(f"no fused encoder here: {why}")
    return runner


def _torch_forward(model, sentences, batch_size=32):
    model.fused = False
    try:
        return model.encode(sentences, batch_size)
    finally:
        del model.fused  # back to the class default


def _assert_close(fused, ref):
    one_minus_cos = 1 - torch.nn.functional.cosine_similarity(fused, ref, dim=1)
    assert float(one_minus_cos.max()) <= bert_encoder.EMBEDDING_COS_TOL, one_minus_cos


@pytest.fixture(scope="module")
def tiny_w8(tmp_path_factory):
    model = open_model(str(tiny_folder("bert", tmp_path_factory.mktemp("bert") / "bert")))
    lowbit.quantize(model, build_config("w8a8-dynamic"))
    return model


def test_tiny_bert_matches_torch_forward(tiny_w8):
    _fused_or_skip(tiny_w8)
    _assert_close(tiny_w8.encode(SENTENCES, 4), _torch_forward(tiny_w8, SENTENCES, 4))


def test_padding_and_batch_do_not_change_a_sentence(tiny_w8):
    """Padding tokens are dropped before the first layer: a sentence's embedding is bit-identical alone or batched."""
    _fused_or_skip(tiny_w8)
    batched = tiny_w8.encode(SENTENCES, 4)
    for i, s in enumerate(SENTENCES):
        assert torch.equal(tiny_w8.encode([s], 1)[0], batched[i])


def test_rebuilt_when_weights_change_in_place(tiny_w8):
    model = copy.deepcopy(tiny_w8)
    first = _fused_or_skip(model)
    before = model.encode(SENTENCES[:2])
    with torch.no_grad():
        model.bert.encoder.layer[0].output.LayerNorm.weight.mul_(1.5)
    assert bert_encoder.fused_encoder(model)[0] is not first
    after = model.encode(SENTENCES[:2])
    assert not torch.equal(before, after)
    _assert_close(after, _torch_forward(model, SENTENCES[:2]))


def test_rebuilt_when_a_module_is_swapped(tiny_w8):
    model = copy.deepcopy(tiny_w8)
    _fused_or_skip(model)
    before = model.encode(SENTENCES[:2])
    swapped = copy.deepcopy(model.bert.encoder.layer[1].output.dense)
    with torch.no_grad():
        swapped.w_scale.mul_(0.5)
    model.bert.encoder.layer[1].output.dense = swapped
    after = model.encode(SENTENCES[:2])
    assert not torch.equal(before, after)
    _assert_close(after, _torch_forward(model, SENTENCES[:2]))


def test_forward_hooks_get_the_torch_forward(tiny_w8):
    """Per-layer error and calibration taps hook the backbone's modules: with a hook the layers must run."""
    model = copy.deepcopy(tiny_w8)
    _fused_or_skip(model)
    seen = []
    handle = model.bert.encoder.layer[0].output.dense.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        assert bert_encoder.fused_encoder(model)[0] is None
        with torch.inference_mode():
            assert torch.equal(model.encode(SENTENCES), _torch_forward(model, SENTENCES))
        assert seen
    finally:
        handle.remove()
    assert bert_encoder.fused_encoder(model)[0] is not None


def test_fallback_without_compiler_is_the_torch_forward(tiny_w8, monkeypatch):
    model = copy.deepcopy(tiny_w8)
    monkeypatch.setattr(bert_encoder, "library", lambda: (None, "no C compiler found"))
    assert bert_encoder.fused_encoder(model) == (None, "no C compiler found")
    assert torch.equal(model.encode(SENTENCES), _torch_forward(model, SENTENCES))


def test_float_model_and_reference_kernel_are_not_fused(tiny_w8, tmp_path):
    fp32 = open_model(str(tiny_folder("bert", tmp_path / "bert")))
    assert bert_encoder.fused_encoder(fp32)[0] is None
    ref = lowbit.quantize(open_model(str(tmp_path / "bert")), build_config("w8a8-dynamic", {"kernel": "reference"}))
    assert "reference" in bert_encoder.fused_encoder(ref)[1]


def test_out_of_table_ids_are_a_clear_error(tiny_w8):
    runner = _fused_or_skip(tiny_w8)
    ids = torch.tensor([[2, 10, 100000, 3]])
    with pytest.raises(ConfigError, match="embedding tables"):
        runner(ids, torch.ones_like(ids), None)


def test_minilm_fused_matches_torch_forward(minilm):
    from lowbit.data import eval_sentences

    model = lowbit.quantize(copy.deepcopy(minilm), build_config("w8a8-dynamic"))
    _fused_or_skip(model)
    sentences = eval_sentences(24)
    _assert_close(model.encode(sentences, 12), _torch_forward(model, sentences, 12))
