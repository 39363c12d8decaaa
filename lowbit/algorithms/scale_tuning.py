"""End-to-end tuning of a quantized causal LM's group scales, integer codes fixed (MISSION G.20).

EfficientQAT's end-to-end step (Chen et al. 2024, "EfficientQAT: Efficient Quantization-Aware Training
for Large Language Models", sec. 3.3, E2E-QP) and PEQA (Kim et al. 2023): once a PTQ method (GPTQ,
GPTAQ, RTN, ...) has chosen every weight's integer code ``q``, train only the step sizes so that the
whole model's next-token distribution matches the fp32 model's on calibration windows:

    W = (q - z) * s0 * exp(t)          one t per group scale s0, t = 0 at the start
    min_t  mean over tokens of KL_k(p_fp32 || p_q)

``KL_k`` is the KL divergence of the teacher's top-k tokens plus one bucket for the rest of the
vocabulary (the coarsened distributions ``(p_1 .. p_k, 1 - sum p_i)``), so the fp32 targets are k
log-probabilities and indices per token (:func:`teacher_targets`), computed before quantization,
instead of the whole vocabulary. The log-multiplier ``t`` makes the learning rate relative to each
scale. Adam, cosine learning rate, one pass over the windows (``epochs``: more), one window per step. Linears with
quantized activations (``WAQLinear``) run their activation grid as a fake quantizer with the
straight-through estimator (rounding passes the gradient unchanged; clip ranges fixed). With
``learn_clip`` each ``WAQLinear``'s activation clip is trained too, as LSQ trains a step size (Esser et al.
2020): ``clip = min(1, c0 exp(u))`` scales the grid's range, the rounding alone is straight-through
(:func:`clipped_grid`), so the gradient reaches ``u`` through the step ``s(clip)``; the learned clip is
written back as the module's ``act_clip``. ``bf16`` runs the training's forward and backward under bf16 autocast
(~1.6x faster on CPUs with bf16 dot products; the scales, the optimizer and the targets stay fp32).

At the end ``s = fp16(s0 exp(t))`` is written into each module's ``scale`` buffer: the tuned model is
the same modules, codes and kernels as before, only different scales.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from lowbit.algorithms._recon import TrainingError
from lowbit.core import Kind, get_format
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.qlinear import WeightOnlyQLinear
from lowbit.nn.wa_linear import WAQLinear, fake_quantize_activations

log = logging.getLogger(__name__)

DEFAULT_TUNE_WINDOWS = 96  # calibration windows 0..95 of the mix: held-out windows 99..106 stay unseen
# Built-in tuning past 96 windows: windows EXTRA_FROM.. of lm_calib_text("mix-large") (the mix at 5x budgets,
# whose text up to ~window 104 is the mix's own), so past the mix's 107 windows and its held-out windows 99..106.
EXTRA_FROM = 115
DEFAULT_TUNE_LR = 5e-4  # Adam on t; chosen on held-out calibration windows (bench/w4_heldout.py --tune-lr)
TOPK = 128  # teacher tokens kept per position (KL_k); the rest of the vocabulary is one bucket
CLIP_LR_FACTOR = 20  # learn_clip: Adam's lr on the log clip ratio is this times the scales' lr


def check_tuning_fields(tune_windows: int, tune_lr: float, storage: str | None = None, tune_epochs: int = 1) -> None:
    """Config validation shared by the configs that offer scale tuning (``storage``: a codebook format
    or double-quantized scales, which hold no tunable fp16 group scale)."""
    if tune_epochs < 1:
        raise ConfigError(f"tune_epochs must be >= 1, got {tune_epochs}")
    if tune_windows < 0:
        raise ConfigError(f"tune_windows must be >= 0 (0 = no scale tuning), got {tune_windows}")
    if not 0 < tune_lr < 1:
        raise ConfigError(f"tune_lr must be in (0, 1), got {tune_lr}")
    if tune_windows and storage:
        raise ConfigError(f"scale tuning trains fp16 group scales of integer codes: not with {storage}")


def teacher_targets(model: nn.Module, windows: list[torch.Tensor], k: int = TOPK) -> list[tuple]:
    """Top-k next-token log-probabilities (T-1, k) and their token ids (T-1, k) per window (1, T)."""
    out = []
    with torch.no_grad(), Progress(transient=True, disable=len(windows) < 4) as bar:
        task = bar.add_task("scale tuning: fp32 targets", total=len(windows))
        for ids in windows:
            logp = torch.log_softmax(model(ids)[0, :-1].float(), dim=-1)  # (T-1, V)
            values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
            out.append((values.clone(), indices.clone()))  # plain tensors (autograd may save them)
            bar.advance(task)
    return out


def kl_topk(logp: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q) on (top-k tokens, rest): ``logp`` (T, V) the model's
    log-probabilities, ``values`` / ``indices`` (T, k) the teacher's top-k log-probabilities."""
    lq = logp.gather(1, indices)  # (T, k)
    p = values.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - lq.exp().sum(-1)).clamp_min(1e-12)
    return ((p * (values - lq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())).mean()


def _round_ste(u: torch.Tensor) -> torch.Tensor:
    """``round(u)`` forward, identity backward."""
    return u + (torch.round(u) - u).detach()


def clipped_grid(x: torch.Tensor, act_bits: int, clip: torch.Tensor, group_size: int = 0,
                 symmetric: bool = True) -> torch.Tensor:
    """:func:`~lowbit.nn.wa_linear.fake_quantize_activations` with ``clip`` a tensor that gets a gradient:
    the same grids (symmetric ``s = clip max|x| / qmax``, codes in ``[-qmax, qmax]``; affine ``[lo, hi] =
    clip [min(x, 0), max(x, 0)]``, ``s = (hi - lo) / (2^a - 1)``, zero-point ``round(-lo / s)``), the
    rounding straight-through, the zero-point's rounding constant."""
    from lowbit.kernels.wa_int import ACT_SCALE_EPS

    xg = x.reshape(*x.shape[:-1], -1, group_size or x.shape[-1])  # (..., G, g)
    if symmetric:
        qmax = 2 ** (act_bits - 1) - 1
        scale = (clip * xg.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(ACT_SCALE_EPS)
        return (_round_ste(xg / scale).clamp(-qmax, qmax) * scale).reshape_as(x)
    levels = 2 ** act_bits - 1
    lo = clip * xg.amin(dim=-1, keepdim=True).clamp_max(0)
    hi = clip * xg.amax(dim=-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / levels).clamp_min(ACT_SCALE_EPS)
    zp = torch.round(-lo / scale).clamp(0, levels).detach()
    return ((_round_ste(xg / scale) + zp).clamp(0, levels) - zp).mul(scale).reshape_as(x)


class TunedScales(nn.Module):
    """A quantized linear's differentiable twin: ``y = x_hat @ ((q - z) s0 exp(t))^T + b`` with the
    module's codes, zero-points and bias fixed (``x_hat``: the activation grid with the straight-through
    estimator for a ``WAQLinear``, ``x`` otherwise; ``learn_clip``: the grid's clip trained as well)."""

    def __init__(self, module: WeightOnlyQLinear | WAQLinear, learn_clip: bool = False):
        super().__init__()
        if getattr(module, "input_scale", None) is not None:
            raise ConfigError("scale tuning does not handle per-input-channel scales (SINQ); tune a model without them")
        self.source = [module]  # a list: not a submodule
        n, k = module.out_features, module.in_features
        g = module.group_size or k
        kp = -(-k // g) * g  # whole groups: a ragged last group is zero-padded (WeightOnlyQLinear's rule)
        codes = F.pad(module.codes().float(), (0, kp - k)).reshape(n, kp // g, g)  # (N, G, g)
        zp = module.zero_point
        if zp is not None:
            codes = codes - zp.float().reshape(n, -1)[..., None]
        self.register_buffer("centred", codes)
        self.register_buffer("s0", module.scale.float().reshape(n, -1))  # (N, G)
        self.t = nn.Parameter(torch.zeros_like(self.s0))
        self.k = k
        self.bias = None if module.bias is None else module.bias.detach().float()
        self.u = nn.Parameter(torch.zeros(())) if learn_clip and isinstance(module, WAQLinear) else None

    def scale(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.t)

    def clip(self) -> torch.Tensor:
        """``min(1, c0 exp(u))`` (``c0`` the module's act_clip)."""
        return (self.source[0].act_clip * torch.exp(self.u)).clamp_max(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.source[0]
        w = (self.centred * self.scale()[..., None]).reshape(self.centred.shape[0], -1)[:, : self.k]  # (N, K)
        x = x.float()
        if isinstance(m, WAQLinear):
            if m.smooth_inv is not None:
                x = x * m.smooth_inv
            g = (m.group_size or m.in_features) if m.act_per_group else 0
            if self.u is None:
                xq = fake_quantize_activations(x.detach(), m.act_bits, m.act_clip, g, m.act_symmetric)
            else:
                xq = clipped_grid(x.detach(), m.act_bits, self.clip(), g, m.act_symmetric)
            x = x + (xq - x.detach())  # straight-through in x: the forward sees the grid, x's gradient does not
        return F.linear(x, w, self.bias)

    def write_back(self) -> float:
        """Store ``fp16(s0 exp(t))`` in the module; returns the largest relative scale change."""
        m = self.source[0]
        new = self.scale().detach()
        m.scale.copy_(new.reshape(m.scale.shape).to(m.scale.dtype))
        m.release_kernel_layout()  # the kernel layout holds the old scales
        if self.u is not None:
            m.act_clip = float(self.clip().detach())
        return float((new / self.s0 - 1).abs().max())


def tunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's integer-code linears whose scales this tunes (WeightOnlyQLinear with a uniform
    format, WAQLinear)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, WAQLinear) or (isinstance(m, WeightOnlyQLinear) and type(m) is WeightOnlyQLinear
                                        and get_format(m.fmt).kind is Kind.UNIFORM):
            out[name] = m
    return out


def tune_scales(model: nn.Module, windows: list[torch.Tensor], targets: list[tuple], lr: float = DEFAULT_TUNE_LR,
                seed: int = 0, epochs: int = 1, learn_clip: bool = False, bf16: bool = False) -> dict:
    """``epochs`` passes of Adam (a fresh random order each) over ``windows`` (each (1, T) token ids)
    against ``targets`` (from :func:`teacher_targets` on the same windows, fp32 model); scales (and with
    ``learn_clip`` the WAQLinears' activation clips, lr ``CLIP_LR_FACTOR * lr``) written back in place.
    ``bf16``: the training's forward and backward run under bfloat16 autocast (matmuls in bf16; the
    scales, the optimizer, the targets and the written-back scales stay fp32 / fp16).
    Returns what metadata records: windows, epochs, steps, lr, mean KL_k of the first and last quarter of
    steps, largest relative scale change, seconds (and the learned clips' min / mean / max)."""
    if len(windows) != len(targets) or not windows:
        raise ConfigError(f"scale tuning needs one teacher target per window, got {len(windows)} windows and "
                          f"{len(targets)} targets")
    modules = tunable_modules(model)
    if not modules:
        raise ConfigError("scale tuning found no integer-code linear (WeightOnlyQLinear / WAQLinear) to tune")
    twins = {name: TunedScales(m, learn_clip) for name, m in modules.items()}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for name, twin in twins.items():
        model.set_submodule(name, twin)
    groups = [{"params": [twin.t for twin in twins.values()], "lr": lr}]
    clips = [twin.u for twin in twins.values() if twin.u is not None]
    if clips:
        groups.append({"params": clips, "lr": CLIP_LR_FACTOR * lr})
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(seed)
    order = [i for _ in range(epochs) for i in torch.randperm(len(windows), generator=gen).tolist()]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, len(order))
    losses, start = [], time.perf_counter()
    try:
        with torch.enable_grad(), Progress(transient=True, disable=len(order) < 4) as bar:
            task = bar.add_task("scale tuning", total=len(order))
            for step, i in enumerate(order, 1):
                with torch.autocast(windows[i].device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = model(windows[i])[0, :-1]
                loss = kl_topk(torch.log_softmax(logits.float(), dim=-1), *targets[i])
                if not math.isfinite(loss.item()):
                    raise TrainingError(f"scale tuning diverged at step {step} (KL {float(loss)}); the scales are "
                                        "the last finite step's: try a lower tune_lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.advance(task)
                if step % 8 == 0 or step == len(order):
                    log.info("scale tuning: step %d/%d, KL_k %.4f (%.1f s)", step, len(order), losses[-1],
                             time.perf_counter() - start)
    finally:
        changes = {}
        for name, twin in twins.items():
            changes[name] = twin.write_back()
            model.set_submodule(name, twin.source[0])
        for p in frozen:
            p.requires_grad_(True)
    quarter = max(1, len(losses) // 4)
    info = {"windows": len(windows), "epochs": epochs, "steps": len(losses), "lr": lr,
            "topk": int(targets[0][0].shape[-1]), **({"bf16": True} if bf16 else {}),
            "kl_first_quarter": sum(losses[:quarter]) / quarter, "kl_last_quarter": sum(losses[-quarter:]) / quarter,
            "max_scale_change": max(changes.values()), "seconds": time.perf_counter() - start}
    if clips:
        learned = [twin.source[0].act_clip for twin in twins.values() if twin.u is not None]
        info["act_clips"] = {"min": min(learned), "mean": sum(learned) / len(learned), "max": max(learned)}
    return info



# ------------------------------------------------------------------------------- the handlers' two calls

def builtin_tuning_windows(model: nn.Module, n_windows: int) -> tuple[list[torch.Tensor], str]:
    """``n_windows`` built-in tuning windows (1, 512) and their source: the mix's windows 0..95, then
    windows ``EXTRA_FROM``.. of ``lm_calib_text("mix-large")``. The windows 96..114 between are never read,
    so the held-out calibration windows 99..106 (on which lowbit's defaults are chosen) stay unseen."""
    from lowbit.algorithms._calib import default_calibration
    from lowbit.algorithms._llm import warn_if_overlaps_eval

    first = default_calibration(model, min(n_windows, DEFAULT_TUNE_WINDOWS), lm_text="mix")
    source = f"lowbit.data.lm_calib_text('mix') windows 0..{len(first) - 1}"
    extra = n_windows - len(first)
    if extra > 0:
        try:
            large = default_calibration(model, EXTRA_FROM + extra, lm_text="mix-large")
        except CalibrationError:
            from lowbit.algorithms._calib import LM_CALIB_WINDOW
            from lowbit.data import lm_calib_text

            have = len(model.tokenizer(lm_calib_text("mix-large")).input_ids) // LM_CALIB_WINDOW
            raise CalibrationError(f"tune_windows={n_windows}: the built-in tuning text holds at most "
                                   f"{DEFAULT_TUNE_WINDOWS + max(0, have - EXTRA_FROM)} windows of {LM_CALIB_WINDOW} "
                                   f"tokens for this model ({DEFAULT_TUNE_WINDOWS} of the mix + windows {EXTRA_FROM}.."
                                   f"{have - 1} of 'mix-large'); ask for fewer or pass calibration data") from None
        first = first + large[EXTRA_FROM:]
        source += f" + lowbit.data.lm_calib_text('mix-large') windows {EXTRA_FROM}..{EXTRA_FROM + extra - 1}"
    source += f" ({getattr(model, 'model_name', 'model')})"
    warn_if_overlaps_eval(model, first)
    return first, source


def start_tuning(model: nn.Module, calibration_data, n_windows: int) -> tuple[list, list, str] | None:
    """Before quantization: ``n_windows`` calibration rows (1, T) and the fp32 model's targets on them
    (None when ``n_windows`` is 0): the first rows of ``calibration_data``, or without it the built-in
    windows (:func:`builtin_tuning_windows`, also inside ``lowbit.data.lm_calib_source("mix-large")``, whose start
    is the mix; the first rows of the docs-only text inside ``lowbit.data.lm_calib_source("docs")``)."""
    from lowbit.algorithms._llm import lm_calibration
    from lowbit.data import lm_calib_default

    if not n_windows:
        return None
    builtin = lm_calib_default() in ("mix", "mix-large")
    if calibration_data is None and builtin and getattr(model, "task", None) == "causal-lm":
        windows, source = builtin_tuning_windows(model, n_windows)
    else:
        batches, source = lm_calibration(model, calibration_data, n_windows)
        windows = [row[None] for b in batches for row in b][:n_windows]  # (1, T) each
    start = time.perf_counter()
    targets = teacher_targets(model, windows)
    log.info("scale tuning: fp32 targets on %d windows (%.1f s)", len(windows), time.perf_counter() - start)
    return windows, targets, source


def finish_tuning(model: nn.Module, prepared: tuple | None, lr: float, report, epochs: int = 1,
                  bf16: bool = False) -> None:
    """After quantization: tune the scales and record what was done in the report and the model's
    calibration record (metadata.json)."""
    if prepared is None:
        return
    windows, targets, source = prepared
    info = {**tune_scales(model, windows, targets, lr, epochs=epochs, bf16=bf16), "source": source}
    report.extra["scale_tuning"] = info
    record = getattr(model, "lowbit_calibration", None)
    if isinstance(record, dict):
        record["scale_tuning"] = info
    log.info("scale tuning: %d steps, KL_k %.4f -> %.4f, largest scale change %.1f%% (%.0f s)", info["steps"],
             info["kl_first_quarter"], info["kl_last_quarter"], 100 * info["max_scale_change"], info["seconds"])


__all__ = ["CLIP_LR_FACTOR", "DEFAULT_TUNE_LR", "DEFAULT_TUNE_WINDOWS", "EXTRA_FROM", "TOPK", "TunedScales",
           "builtin_tuning_windows", "check_tuning_fields",
           "clipped_grid", "finish_tuning", "kl_topk", "start_tuning", "teacher_targets", "tune_scales",
           "tunable_modules"]
