"""The real-model loaders: MiniLM matches sentence-transformers, SmolLM2 is a sane LM, the digits CNN is accurate and reproducible."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import ConfigError

# Same weights, same pooling: only float summation order may differ from sentence-transformers.
MINILM_ST_MIN_COSINE = 0.99999
# fp32 SmolLM2-135M on the CPython licence at context 512 measures ~12.8; a broken load gives
# hundreds or thousands, so this band catches it without pinning float noise.
SMOLLM2_PPL_RANGE = (5.0, 30.0)
# The recipe reaches ~99% on the 449 held-out digits; 97% leaves room for other torch builds.
DIGITS_MIN_ACCURACY = 97.0


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    from lowbit.data import eval_sentences
    from lowbit.models.minilm import minilm_dir

    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    assert st.max_seq_length == minilm.max_seq_length == 256
    long_text = " ".join(eval_sentences(40))  # > 256 tokens: exercises truncation
    sentences = eval_sentences(48) + [long_text, "Short."]
    ours = minilm.encode(sentences, batch_size=16)
    theirs = torch.as_tensor(st.encode(sentences, batch_size=16, convert_to_numpy=True))
    assert ours.shape == theirs.shape == (len(sentences), 384)
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=1)
    assert float(cos.min()) >= MINILM_ST_MIN_COSINE
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(sentences)), atol=1e-5)


def test_minilm_forward_matches_encode(minilm):
    sentences = ["The quick brown fox jumps.", "A sentence about the Python language and its grammar."]
    features = minilm.tokenize(sentences)
    with torch.inference_mode():
        direct = minilm(features["input_ids"], features["attention_mask"], features["token_type_ids"])
    assert direct.shape == (2, 384)
    assert torch.allclose(direct, minilm.encode(sentences), atol=1e-5)
    assert minilm.model_name == "minilm" and minilm.task == "encoder"


def test_smollm2_perplexity_is_sane(smollm2, smollm2_quick_eval):
    assert smollm2.model_name == "smollm2" and smollm2.task == "causal-lm"
    assert type(smollm2.lm).__name__ == "LlamaForCausalLM"
    assert smollm2_quick_eval["n_windows"] == 2 and smollm2_quick_eval["context"] == 512
    ppl = smollm2_quick_eval["ppl"]
    assert math.isfinite(ppl)
    assert SMOLLM2_PPL_RANGE[0] < ppl < SMOLLM2_PPL_RANGE[1]


def test_digits_cnn_accuracy(digits_cnn, digits_data):
    _, _, x_test, y_test = digits_data
    assert x_test.shape[1:] == (1, 8, 8) and x_test.dtype == torch.float32
    assert 0.0 <= float(x_test.min()) and float(x_test.max()) <= 1.0
    assert 0.25 <= len(x_test) / (len(x_test) + len(digits_data[0])) <= 0.30
    with torch.inference_mode():
        accuracy = 100.0 * float((digits_cnn(x_test).argmax(1) == y_test).float().mean())
    assert accuracy >= DIGITS_MIN_ACCURACY
    assert digits_cnn.model_name == "digits" and digits_cnn.task == "classifier"


def test_digits_training_is_reproducible():
    from lowbit.models.digits import DigitsRecipe, train_digits_cnn

    recipe = DigitsRecipe(epochs=1)
    a, b = train_digits_cnn(recipe).state_dict(), train_digits_cnn(recipe).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train_digits_cnn(DigitsRecipe(epochs=1, train_seed=1)).state_dict()
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_digits_cache_roundtrip_and_corruption(tmp_path, monkeypatch):
    from lowbit.models.digits import DigitsRecipe, load_digits_cnn

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    recipe = DigitsRecipe(epochs=1)
    first = load_digits_cnn(recipe)
    files = list(tmp_path.glob("digits-cnn-*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob(".*tmp"))  # no temp files left behind
    second = load_digits_cnn(recipe)
    assert all(torch.equal(x, y) for x, y in zip(first.state_dict().values(), second.state_dict().values()))
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncate the cache entry
    third = load_digits_cnn(recipe)  # retrained, not a crash
    assert all(torch.equal(x, y) for x, y in zip(first.state_dict().values(), third.state_dict().values()))


def test_load_model_unknown_name_lists_valid_names():
    from lowbit.models import MODELS, load_model

    with pytest.raises(ConfigError) as err:
        load_model("resnet50")
    for name in ("minilm", "smollm2", "digits"):
        assert name in str(err.value)
    assert set(MODELS) == {"minilm", "smollm2", "digits"}


def test_load_model_sets_name_and_task():
    from lowbit.models import TASKS, load_model

    model = load_model("digits")
    assert model.model_name == "digits" and model.task in TASKS
