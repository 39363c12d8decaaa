"""Issue 18: do learned rotations (SpinQuant: Liu et al. 2024, arXiv 2405.16406) pay for themselves on
SmolLM2 on top of what lowbit ships (QuaRot's randomised Hadamard, then GPTAQ with the activation grid)?

    .venv/bin/python bench/learned_rotation.py [--windows 64] [--lr 0.003] [--weights rtn|fp32]

1. An extra residual rotation ``R`` (576 x 576) is learned on top of QuaRot's ``Q``: the stream becomes
   ``x Q R`` (embedding ``E Q R``, readers ``W Q R``, writers ``R^T Q^T W``; the decoder norms' weights are
   folded, so ``RMSNorm(x R) = RMSNorm(x) R``). ``R`` is the Cayley transform ``(I + A)^-1 (I - A)`` of a
   skew matrix ``A = B - B^T`` (orthogonal for every ``B``; ``B = 0`` gives ``R = I``), ``B`` trained by
   plain SGD (Adam moves all 576^2 entries by ``lr`` every step, a random walk that was worse at every
   lr tried in development runs of a prototype, not offered here) with a cosine schedule, one
   calibration window per step, loss = KL of the fp32 model's top-128 next-token distribution
   (:func:`lowbit.algorithms.scale_tuning.kl_topk`). In the loop: the W4A4 preset's activation grid (per token and group, affine, clip 0.9) and, with ``--weights rtn``,
   RTN W4 g128 symmetric weights (SpinQuant's setting), both with the straight-through estimator on the
   rounding only (activations: :func:`lowbit.algorithms.scale_tuning.clipped_grid`), so the grids' ranges
   (max / min) carry the gradient that moves outliers.
2. Judged on held-out calibration windows 99..106 (never fitted): KL of the fake-quantized model before
   and after, then the real W4A4 preset (GPTAQ + activation grid, ``rotate=True``) with and without ``R``
   (the head untied for both, since the tied head's ``RotatedRMSNorm`` assumes ``Q = D H``).

Results: bench/results/learned_rotation.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import RESULTS, machine, quiet  # noqa: E402
from lowbit.algorithms.scale_tuning import clipped_grid  # noqa: E402

HELD_OUT = range(99, 107)
HIDDEN = 576
ACT_CLIP = 0.9
READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def round_ste(u: torch.Tensor) -> torch.Tensor:
    """``round(u)`` forward, identity backward."""
    return u + (torch.round(u) - u).detach()


def group_of(k: int) -> int:
    return 64 if k % 128 else 128  # lowbit's g128 policy: 576-wide inputs use 64


def fake_weights(w: torch.Tensor) -> torch.Tensor:
    """RTN W4 symmetric per group (N, K): ``s = max|w| / 7``, codes in [-8, 7]."""
    n, k = w.shape
    g = group_of(k)
    wg = w.reshape(n, k // g, g)  # (N, G, g)
    s = (wg.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-8)
    return (round_ste(wg / s).clamp(-8, 7) * s).reshape(n, k)


class RotatedLinear(nn.Module):
    """A float linear seen in the stream's ``R`` basis, quantized on the fly."""

    def __init__(self, linear: nn.Linear, role: str, state: dict, rtn_weights: bool):
        super().__init__()
        self.linear, self.role, self.state, self.rtn_weights = [linear], role, state, rtn_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin, r = self.linear[0], self.state["R"]
        w, b = lin.weight, lin.bias
        if self.role == "reader":
            w = w @ r
        else:
            w, b = r.t() @ w, (None if b is None else b @ r)
        if self.rtn_weights:
            w = fake_weights(w)
        return F.linear(clipped_grid(x, 4, self.state["clip"], group_of(x.shape[-1]), symmetric=False), w, b)


def main() -> None:
    import lowbit
    import lowbit.algorithms.rotation as rotation
    from lowbit.algorithms._calib import default_calibration
    from lowbit.algorithms._llm import decoder_layers
    from lowbit.algorithms.presets import preset_config
    from lowbit.algorithms.scale_tuning import kl_topk, teacher_targets
    from lowbit.analysis.evaluate import lm_scores
    from lowbit.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=64, help="calibration windows 0..N-1, one SGD step each")
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--weights", choices=("rtn", "fp32"), default="rtn", help="weights in the training loop")
    ap.add_argument("--no-preset", action="store_true", help="skip step 2's two W4A4 preset quantizations")
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(2)
    load0 = machine()["loadavg_1_5_15"]
    fp = load_model("smollm2")
    windows = default_calibration(fp, HELD_OUT.stop)
    train, held = windows[:args.windows], windows[HELD_OUT.start:HELD_OUT.stop]
    model = copy.deepcopy(fp)
    rotation.rotate_model(model, tie_head=False)
    for p in model.parameters():
        p.requires_grad_(False)
    targets, held_targets = teacher_targets(fp, train), teacher_targets(fp, held)

    state: dict = {"clip": torch.tensor(ACT_CLIP)}
    b = nn.Parameter(torch.zeros(HIDDEN, HIDDEN))
    eye = torch.eye(HIDDEN)

    def cayley() -> torch.Tensor:
        a = b - b.t()
        return torch.linalg.solve(eye + a, eye - a)

    for layer in decoder_layers(model):
        for names, role in ((READERS, "reader"), (WRITERS, "writer")):
            for name in names:
                layer.set_submodule(name, RotatedLinear(layer.get_submodule(name), role, state, args.weights == "rtn"))
    lm = model.lm.model
    lm.embed_tokens.register_forward_hook(lambda m, a, out: out @ state["R"])
    lm.norm.register_forward_pre_hook(lambda m, a: (a[0] @ state["R"].t(),))  # the untied head reads x Q

    def held_kl() -> float:
        with torch.no_grad():
            state["R"] = cayley()
            return sum(float(kl_topk(torch.log_softmax(model(ids)[0, :-1].float(), -1), *t))
                       for ids, t in zip(held, held_targets)) / len(held)

    before = held_kl()
    opt = torch.optim.SGD([b], lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, len(train))
    t0 = time.perf_counter()
    for step, (ids, t) in enumerate(zip(train, targets)):
        state["R"] = cayley()
        loss = kl_topk(torch.log_softmax(model(ids)[0, :-1].float(), -1), *t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 8 == 7:
            print(f"  step {step + 1}: KL_k {float(loss):.4f}, |A|_F {float((b - b.t()).norm()):.3f}", flush=True)
    train_s = time.perf_counter() - t0
    after = held_kl()
    r = cayley().detach().to(torch.float64)
    print(f"fake-quant held-out KL_k {before:.4f} -> {after:.4f} ({train_s:.0f} s)", flush=True)

    presets = {}
    if not args.no_preset:
        plain = rotation.random_hadamard
        for label, extra in (("QuaRot Q", None), ("QuaRot Q, learned R", r)):
            if extra is not None:
                rotation.random_hadamard = (lambda n, seed=0, dtype=torch.float64:
                                            plain(n, seed, dtype) @ extra if n == HIDDEN else plain(n, seed, dtype))
            rotate = rotation.rotate_model
            rotation.rotate_model = lambda m, seed=0, **kw: rotate(m, seed, **{**kw, "tie_head": False})
            try:
                m = copy.deepcopy(fp)
                lowbit.quantize(m, preset_config("w4a4", rotate=True, act_clip=ACT_CLIP, act_per_group=True,
                                                 act_symmetric=False))
            finally:
                rotation.random_hadamard, rotation.rotate_model = plain, rotate
            h = lm_scores(m, fp, torch.cat(held))
            presets[label] = {"kl": round(h["kl"], 4), "ppl": round(h["ppl"], 3)}
            print(f"W4A4 preset, {label}: held-out KL {h['kl']:.4f} ppl {h['ppl']:.3f}", flush=True)
    load1 = machine()["loadavg_1_5_15"]
    record = {"windows": args.windows, "lr": args.lr, "weights_in_loop": args.weights, "heldout_kl_topk_before":
              round(before, 4), "heldout_kl_topk_after": round(after, 4), "train_seconds": round(train_s, 1),
              "presets": presets, "load": [load0, load1]}
    path = RESULTS / "learned_rotation.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append(record)
    path.write_text(json.dumps(runs, indent=1) + "\n")
    lines = ["# Learned residual rotation (SpinQuant-style) on top of QuaRot, SmolLM2 W4A4", "",
             "`bench/learned_rotation.py` (see its docstring). Held-out calibration windows 99..106; KL_k = top-128 "
             "KL of the fake-quantized training model, KL / ppl = the real W4A4 preset (GPTAQ + activation grid, per "
             "token and group, affine, clip 0.9).", "",
             "| windows | lr | weights in loop | KL_k before | KL_k after | preset KL, QuaRot | preset KL, + learned R "
             "| train s | load |", "|---|---|---|---|---|---|---|---|---|"]
    for rec in runs:
        p = rec["presets"]
        cell = (lambda k: f"{p[k]['kl']:.4f} (ppl {p[k]['ppl']:.3f})" if k in p else "")
        lines.append(f"| {rec['windows']} | {rec['lr']} | {rec['weights_in_loop']} | "
                     f"{rec['heldout_kl_topk_before']:.4f} | {rec['heldout_kl_topk_after']:.4f} | "
                     f"{cell('QuaRot Q')} | {cell('QuaRot Q, learned R')} | "
                     f"{rec['train_seconds']:.0f} | {rec['load'][0]} -> {rec['load'][1]} |")
    (RESULTS / "learned_rotation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
