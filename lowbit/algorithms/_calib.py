"""Calibration plumbing shared by every method that looks at activations.

- :func:`default_calibration` gives the built-in calibration set of a real model (disjoint from its
  evaluation data: see ``lowbit.data``);
- :func:`run_batches` feeds any iterable of batches through a model (sentence lists for encoders,
  token-id tensors for causal LMs, image tensors for classifiers, dicts of tensors for any model);
- :func:`calibration_info` hashes what was used, for ``metadata.json``;
- :func:`capture_inputs` is a context manager that attaches forward hooks and removes them on exit.
"""

from __future__ import annotations

import hashlib
import logging
import re
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from rich.progress import Progress
from torch import nn

from lowbit.errors import CalibrationError

log = logging.getLogger(__name__)

ENCODER_CALIB_SENTENCES = 128  # enough for stable per-channel absmax; more changes cos by < 1e-4
LM_CALIB_TOKENS = 4096  # 8 windows of 512 tokens
LM_CALIB_WINDOW = 512
CLASSIFIER_CALIB_IMAGES = 256


def default_calibration(model: nn.Module, n: int | None = None, lm_text: str | None = None) -> list:
    """The built-in calibration batches for a model loaded by ``lowbit.models``.

    ``n`` counts samples: sentences (encoders), 512-token windows (causal LMs), images (classifiers).
    ``lm_text`` names the causal-LM text (:func:`lowbit.data.lm_calib_text`: ``"mix"``, ``"docs"``,
    the docs-only text older results used, or ``"mix-large"``; None: :func:`lowbit.data.lm_calib_default`, ``"mix"``
    unless inside ``lowbit.data.lm_calib_source(...)``); windows are cut from its start.
    """
    task = getattr(model, "task", None)
    if n is not None and n < 1:
        raise CalibrationError(f"calibration size must be at least 1, got {n}")
    if task == "encoder":
        from lowbit.data import calib_sentences

        s = calib_sentences(n or ENCODER_CALIB_SENTENCES)
        return [s[i:i + 32] for i in range(0, len(s), 32)]
    if task == "causal-lm":
        from lowbit.data import lm_calib_default, lm_calib_text

        lm_text = lm_text or lm_calib_default()
        want = (n or LM_CALIB_TOKENS // LM_CALIB_WINDOW) * LM_CALIB_WINDOW
        ids = model.tokenizer(lm_calib_text(lm_text), return_tensors="pt").input_ids[0][:want]
        k = ids.numel() // LM_CALIB_WINDOW
        if n is not None and k < n:
            raise CalibrationError(f"the built-in LM calibration text has only {k} windows of {LM_CALIB_WINDOW} tokens")
        return list(ids[: k * LM_CALIB_WINDOW].reshape(k, 1, LM_CALIB_WINDOW))  # k batches of (1, T)
    if task == "classifier":
        from lowbit.models.digits import digits_data

        x_train = digits_data()[0][: n or CLASSIFIER_CALIB_IMAGES]
        return list(x_train.split(64))
    raise CalibrationError(f"{type(model).__name__} has no built-in calibration data; pass calibration_data")


# The most samples taken from a user's file when ``n`` is not given, spread evenly over it: 8x the built-in
# defaults (a GPTQ run on 128 windows of SmolLM2 takes ~15 min here), so that a corpus passed whole gives a run
# that ends rather than one window per 512 tokens of it.
USER_LM_WINDOWS = 128
USER_ENCODER_SENTENCES = 8 * ENCODER_CALIB_SENTENCES
USER_CLASSIFIER_IMAGES = 8 * CLASSIFIER_CALIB_IMAGES
SPAN_CHARS_PER_TOKEN = 16  # characters cut per wanted token when a long text is sampled by spans (~4 in prose)


def spread(total: int, k: int) -> list[int]:
    """``k`` indices of ``range(total)`` spread evenly from the first to the last (``k >= total``: all)."""
    if k >= total:
        return list(range(total))
    if k == 1:
        return [0]
    return [(i * (total - 1)) // (k - 1) for i in range(k)]


def calibration_from_samples(model: nn.Module, samples, n: int | None = None) -> list:
    """Calibration batches from the user's samples (:func:`lowbit.data.user.read_samples`).

    Sentences in batches of 32 (encoders); the texts joined and cut into windows of 512 tokens
    (causal LMs; one shorter window when the text is short); images in batches of 64 (classifiers).
    ``n`` samples (sentences / windows / images), else at most ``USER_*`` of them, are taken spread
    evenly over the file (not its first ones: a file ordered by topic is covered), and logged."""
    task = getattr(model, "task", None)
    if n is not None and n < 1:
        raise CalibrationError(f"calibration size must be at least 1, got {n}")
    if isinstance(samples, torch.Tensor):
        if task not in (None, "classifier"):
            raise CalibrationError(f"image calibration data (.npy) given for a {task} model; use a .txt or .jsonl file")
        idx = spread(len(samples), n or USER_CLASSIFIER_IMAGES)
        _log_taken(len(idx), len(samples), "images", n)
        return list(samples[idx].split(64))
    samples = list(samples)
    if task == "encoder":
        idx = spread(len(samples), n or USER_ENCODER_SENTENCES)
        _log_taken(len(idx), len(samples), "sentences", n)
        taken = [samples[i] for i in idx]
        return [taken[i:i + 32] for i in range(0, len(taken), 32)]
    if task == "causal-lm":
        return lm_windows_from_text(model.tokenizer, "\n\n".join(samples), n)
    raise CalibrationError(f"text calibration data given for a model of task {task!r}")


def lm_windows_from_text(tokenizer, text: str, n: int | None = None) -> list[torch.Tensor]:
    """``n`` (else at most ``USER_LM_WINDOWS``) windows of ``LM_CALIB_WINDOW`` token ids, (1, T) each, spread
    evenly over ``text``. A text much longer than that needs is not tokenized whole: the windows are the first
    ``T`` tokens of evenly spaced character spans, each starting after a line break or space."""
    want = n or USER_LM_WINDOWS
    span = LM_CALIB_WINDOW * SPAN_CHARS_PER_TOKEN
    if len(text) > 4 * want * span:
        windows = []
        for start in spread(len(text) - span, want):
            back = max(0, start - span // 8)
            cut = max(text.rfind("\n", back, start), text.rfind(" ", back, start))
            start = cut + 1 if cut >= 0 else start
            ids = tokenizer(text[start:start + span], return_tensors="pt").input_ids[0]
            if ids.numel() < LM_CALIB_WINDOW:  # > 16 characters per token: whitespace runs, long numbers
                ids = tokenizer(text[start:start + 8 * span], return_tensors="pt").input_ids[0]
            if ids.numel() >= LM_CALIB_WINDOW:
                windows.append(ids[None, :LM_CALIB_WINDOW])
        if not windows:
            raise CalibrationError("no 512-token window found in the calibration text")
        (log.info if n else log.warning)(
            "calibration: %d windows of %d tokens spread evenly over %.1f MB of text (%s)", len(windows),
            LM_CALIB_WINDOW, len(text) / 1e6, f"--calib {n}" if n else f"at most {USER_LM_WINDOWS} unless --calib N "
            "says otherwise")
        return windows
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    k = ids.numel() // LM_CALIB_WINDOW
    if k == 0:
        if ids.numel() < 2:
            raise CalibrationError("the calibration text has fewer than 2 tokens")
        log.warning("calibration text has %d tokens, less than one %d-token window", ids.numel(), LM_CALIB_WINDOW)
        return [ids[None]]
    all_windows = ids[: k * LM_CALIB_WINDOW].reshape(k, 1, LM_CALIB_WINDOW)  # k batches of (1, T)
    idx = spread(k, want)
    _log_taken(len(idx), k, f"windows of {LM_CALIB_WINDOW} tokens", n)
    return list(all_windows[idx])


def _log_taken(taken: int, total: int, what: str, n: int | None) -> None:
    """Say how many of the file's samples were taken: a warning when the cap, not ``--calib``, cut them."""
    if taken < total:
        why = f"--calib {n}" if n else f"at most {taken} unless --calib N says otherwise"
        (log.info if n else log.warning)("calibration: %d of the file's %d %s, spread evenly over it (%s)",
                                         taken, total, what, why)
    elif n and n > total:
        log.warning("calibration: --calib %d asked for more than the file's %d %s; using all of them", n, total, what)


def run_batch(model: nn.Module, batch) -> None:
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], str):
        model.encode(list(batch), batch_size=len(batch))
    elif isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, torch.Tensor):
        model(batch)
    else:
        raise CalibrationError(f"unsupported calibration batch of type {type(batch).__name__}: "
                               "use lists of sentences, tensors or dicts of tensors")


def run_batches(model: nn.Module, batches: Iterable, desc: str = "calibrating") -> int:
    """Run every batch through ``model`` without gradients; returns the number of batches."""
    n = 0
    batches = list(batches)
    if not batches:
        raise CalibrationError("calibration data is empty: give at least one batch")
    with torch.inference_mode(), Progress(transient=True, disable=len(batches) < 4) as bar:
        task = bar.add_task(desc, total=len(batches))
        for batch in batches:
            run_batch(model, batch)
            n += 1
            bar.advance(task)
    return n


def calibration_info(batches: list, source: str) -> dict:
    """Size and sha256 of calibration data, as recorded in metadata.json."""
    h = hashlib.sha256()
    n_samples = 0
    n_tokens = 0
    for b in batches:
        if isinstance(b, (list, tuple)) and b and isinstance(b[0], str):
            for s in b:
                h.update(s.encode("utf-8") + b"\0")
            n_samples += len(b)
        elif isinstance(b, torch.Tensor):
            h.update(b.detach().cpu().contiguous().numpy().tobytes())
            n_samples += b.shape[0]
            n_tokens += b.numel() if not b.is_floating_point() else 0
        elif isinstance(b, dict):
            for k in sorted(b):
                h.update(k.encode() + b.get(k).detach().cpu().contiguous().numpy().tobytes())
            n_samples += next(iter(b.values())).shape[0]
    info = {"source": source, "n_samples": n_samples, "n_tokens": n_tokens or None, "sha256": h.hexdigest()}
    if source.startswith("lowbit.data.lm_calib_text"):
        # which built-in text the windows were cut from: bytes per domain of the whole text (every
        # prefix of the mix holds the domains in the same proportions) and its sha256
        from lowbit.data import lm_calib_composition

        m = re.match(r"lowbit\.data\.lm_calib_text\('([\w-]+)'\)", source)
        name = m.group(1) if m else "mix"
        comp = lm_calib_composition(name)
        info["calib_text"] = {"name": name, "bytes": comp["bytes"], "sha256": comp.get("sha256"),
                              "domain_bytes": {d: v["bytes"] for d, v in comp["domains"].items()}}
    return info


@contextmanager
def capture_inputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, input)`` on each forward of the given modules; hooks are removed on exit.

    Non-finite inputs raise a :class:`CalibrationError` naming the layer.
    """

    def make(name):
        def hook(mod, inputs, output):
            x = inputs[0].detach()
            if not torch.isfinite(x).all():
                raise CalibrationError(f"non-finite (NaN/inf) activation entering layer {name!r} during calibration")
            fn(name, x)

        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
