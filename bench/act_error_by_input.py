"""Issue 18: where the rotated W4A4 preset's activation error comes from, input kind by input kind, and
whether an online Hadamard across heads before o_proj would pay (SmolLM2).

    .venv/bin/python bench/act_error_by_input.py [--seeds 1 2 3 4]

The QuaRot-rotated fp32 model (``rotate_model``: weights float, the function unchanged), with the W4A4
preset's activation grid (4 bits per token and group of 64 / 128 inputs, affine, clip 0.9:
:func:`lowbit.nn.wa_linear.fake_quantize_activations`) applied to the inputs of one kind of linear at
a time (q/k/v, o_proj, gate/up, down_proj), then to all. ``o_proj + H576``: o_proj's input first
multiplied by the orthogonal Hadamard of order 576 = 12·12·4 (``W_o <- W_o H``: an online rotation
across heads, which the folded per-head rotation of V / O cannot give since 9 heads have no Hadamard
order). ``--seeds``: the "all" row again for QuaRot's other random sign draws (``rotate_model(seed=)``),
to see whether the draw matters. Scored on held-out calibration windows 99..106: perplexity and KL to fp32. Writes
bench/results/act_error_by_input.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import machine, quiet, write_results  # noqa: E402

HELD_OUT = range(99, 107)
KINDS = {"q/k/v": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o_proj": ("self_attn.o_proj",),
         "gate/up": ("mlp.gate_proj", "mlp.up_proj"), "down_proj": ("mlp.down_proj",)}
ROWS = (("none", (), False), ("q/k/v", ("q/k/v",), False), ("o_proj", ("o_proj",), False),
        ("o_proj + H576 online", ("o_proj",), True), ("gate/up", ("gate/up",), False),
        ("down_proj", ("down_proj",), False), ("all", tuple(KINDS), False))
ACT_BITS, ACT_CLIP = 4, 0.9


def main() -> None:
    from lowbit.algorithms._calib import default_calibration
    from lowbit.algorithms._llm import decoder_layers
    from lowbit.algorithms.rotation import rotate_model
    from lowbit.analysis.evaluate import lm_scores
    from lowbit.core.hadamard import hadamard
    from lowbit.models import load_model
    from lowbit.nn.wa_linear import fake_quantize_activations

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[], help="more rotation seeds for the 'all' row")
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(2)
    start = machine()
    fp = load_model("smollm2")
    held = torch.cat(default_calibration(fp, HELD_OUT.stop)[HELD_OUT.start:HELD_OUT.stop])  # (8, 512)
    h576 = hadamard(576)

    def quantizing_hook(online: torch.Tensor | None):
        def hook(module, args):
            x = args[0] if online is None else args[0] @ online
            group = 64 if x.shape[-1] % 128 else 128  # the preset's per-group grid: the weights' g128 policy
            return (fake_quantize_activations(x, ACT_BITS, ACT_CLIP, group, symmetric=False).to(args[0].dtype),)
        return hook

    rows = []
    runs = [(0, row) for row in ROWS] + [(seed, ROWS[-1]) for seed in args.seeds]
    rotated, rotated_seed = None, None
    for seed, (label, kinds, online) in runs:
        if seed != rotated_seed:
            rotated, rotated_seed = copy.deepcopy(fp), seed
            rotate_model(rotated, seed=seed)
        handles, restore = [], []
        for layer in decoder_layers(rotated):
            for kind in kinds:
                for name in KINDS[kind]:
                    linear = layer.get_submodule(name)
                    if online:
                        restore.append((linear, linear.weight.data))
                        linear.weight.data = linear.weight.data @ h576  # (x H)(W H)^T = x W^T
                    handles.append(linear.register_forward_pre_hook(quantizing_hook(h576 if online else None)))
        try:
            s = lm_scores(rotated, fp, held)
        finally:
            for h in handles:
                h.remove()
            for linear, w in restore:
                linear.weight.data = w
        rows.append({"inputs at A4": label, "seed": seed, "ppl": round(s["ppl"], 3), "kl": round(s["kl"], 4)})
        print(rows[-1], flush=True)
    command = " ".join([".venv/bin/python bench/act_error_by_input.py", *sys.argv[1:]])
    md = ["# Rotated SmolLM2, 4-bit activations on one input kind at a time (weights fp32)", "",
          f"`{command}` (see its docstring); held-out calibration windows "
          f"99..106; load {start['loadavg_1_5_15']} -> {machine()['loadavg_1_5_15']}.", "",
          "| inputs at A4 (per token and group, affine, clip 0.9) | rotation seed | ppl | KL to fp32 |",
          "|---|---|---|---|"]
    md += [f"| {r['inputs at A4']} | {r['seed']} | {r['ppl']:.3f} | {r['kl']:.4f} |" for r in rows]
    write_results("act_error_by_input", rows, "\n".join(md) + "\n", {"machine": start})
    print("\n".join(md))


if __name__ == "__main__":
    main()
