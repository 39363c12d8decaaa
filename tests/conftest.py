"""Shared fixtures. Real models load once per test session; nothing touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm():
    """The fp32 all-MiniLM-L6-v2 SentenceEncoder (shared: do not modify it in place)."""
    from lowbit.models.minilm import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def smollm2():
    """The fp32 SmolLM2-135M CausalLM (shared: do not modify it in place)."""
    from lowbit.models.smollm2 import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def digits_cnn():
    """The trained fp32 DigitsCNN from the cache (shared: do not modify it in place)."""
    from lowbit.models.digits import load_digits_cnn

    return load_digits_cnn()


@pytest.fixture(scope="session")
def digits_data():
    """(x_train, y_train, x_test, y_test) of the fixed digits split."""
    from lowbit.models.digits import digits_data as load

    return load()


@pytest.fixture(scope="session")
def smollm2_quick_eval(smollm2):
    """evaluate(smollm2, quick=True) computed once: two 512-token windows of the licence text."""
    from lowbit.analysis.evaluate import evaluate

    return evaluate(smollm2, quick=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny layers and matmuls run 10-40x faster on one thread on a shared 2-core machine (no OpenMP
    spin-waiting); modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
