"""A small BatchNorm + ReLU CNN trained on scikit-learn's 8x8 digits, seeded, reproducible and cached.

Training runs single-threaded with deterministic algorithms so the same recipe gives bit-identical
weights on any machine with this torch build; the weights are cached as safetensors under a key
that hashes the whole recipe (change the recipe → new key → retrain), written atomically.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.core.threads import torch_threads
from lowbit.models._cache import atomic_write_file, cache_dir, recipe_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DigitsRecipe:
    split_seed: int = 0  # seed of the train/test permutation
    test_fraction: float = 0.25  # 450 of the 1,797 images held out (25.04%)
    train_seed: int = 0  # seed of init and batch order
    epochs: int = 20  # 99.1% test accuracy in ~3 s on one core
    batch_size: int = 64
    lr: float = 3e-3  # AdamW
    weight_decay: float = 1e-4
    arch: str = "c16-c32-pool-c64-gap-fc10"
    version: int = 2  # bump whenever DigitsCNN, digits_data or train_digits_cnn change (new cache key)


RECIPE = DigitsRecipe()


class DigitsCNN(nn.Module):
    """conv(1→16)-BN-ReLU, conv(16→32)-BN-ReLU, maxpool 2, conv(32→64)-BN-ReLU, global avg pool, Linear(64→10)."""

    model_name = "digits"
    task = "classifier"

    def wrapper_spec(self) -> dict:
        """``lowbit.load`` rebuilds this architecture by name (no code is read from the folder)."""
        return {"kind": "digits-cnn", "model_name": self.model_name}

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10) for images (B, 1, 8, 8) in [0, 1]."""
        x = self.relu1(self.bn1(self.conv1(x)))  # (B, 16, 8, 8)
        x = self.relu2(self.bn2(self.conv2(x)))  # (B, 32, 8, 8)
        x = self.pool(x)  # (B, 32, 4, 4)
        x = self.relu3(self.bn3(self.conv3(x)))  # (B, 64, 4, 4)
        x = self.gap(x).flatten(1)  # (B, 64)
        return self.fc(x)


def digits_data(recipe: DigitsRecipe = RECIPE):
    """(x_train, y_train, x_test, y_test): images float32 (N, 1, 8, 8) in [0, 1], labels int64, fixed split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(recipe.split_seed))
    n_test = math.ceil(len(x) * recipe.test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


@contextmanager
def _deterministic_single_thread():
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch_threads(1):
            yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def train_digits_cnn(recipe: DigitsRecipe = RECIPE) -> DigitsCNN:
    """Train DigitsCNN from scratch with `recipe`; same recipe → identical weights."""
    x_train, y_train, _, _ = digits_data(recipe)
    start = time.perf_counter()
    with _deterministic_single_thread():
        torch.manual_seed(recipe.train_seed)
        model = DigitsCNN()
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        steps = recipe.epochs * -(-len(x_train) // recipe.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps)
        gen = torch.Generator().manual_seed(recipe.train_seed)
        model.train()
        for _ in range(recipe.epochs):
            order = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(order), recipe.batch_size):
                idx = order[i : i + recipe.batch_size]
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    log.info("trained digits CNN in %.1f s", time.perf_counter() - start)
    return model


def load_digits_cnn(recipe: DigitsRecipe = RECIPE) -> DigitsCNN:
    """The trained DigitsCNN in eval mode: from the safetensors cache, or trained and cached now."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"digits-cnn-{recipe_key({**asdict(recipe), 'torch': torch.__version__})}.safetensors"
    model = DigitsCNN()
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)), strict=True)
            return model.eval()
        except Exception as exc:  # a damaged cache entry is retrained, never trusted
            log.warning("cache entry %s unreadable (%s); retraining", path, exc)
    model = train_digits_cnn(recipe)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write_file(path, lambda tmp: save_file(state, str(tmp), metadata={"recipe": str(asdict(recipe))}))
    return model
