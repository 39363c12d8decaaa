"""How GPTQ's damping and calibration size were chosen: held-out *calibration* windows, never eval text.

    .venv/bin/python bench/gptq_damping.py

Windows 0..31 of lowbit.data.lm_calib_text feed the Hessians; windows 40..47 (also calibration text,
never used to fit) measure each solution's layer output error ``mean ||X (W - Q)^T||^2``, relative
to round-to-nearest's, on 16 SmolLM2 linears (q/o/gate/down of layers 2, 10, 18, 26), W4 g128 sym
(g64 on the 576-wide inputs). Lower is better; 1.0 = no better than RTN.

Writes bench/results/gptq_damping.md and .json.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import machine, quiet, write_results  # noqa: E402

LAYERS = (2, 10, 18, 26)
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
FIT_WINDOWS = (8, 16, 32)
DAMPS = (0.01, 0.03, 0.1, 0.3)
HELD_OUT = range(40, 48)


def main() -> None:
    quiet()
    torch.set_num_threads(2)
    from lowbit.algorithms._calib import default_calibration
    from lowbit.algorithms._llm import effective_group_size, layer_prefix
    from lowbit.algorithms.gptq import GPTQ
    from lowbit.models import load_model
    from lowbit.nn import WeightOnlyQLinear

    fp = load_model("smollm2")
    calib = default_calibration(fp, max(HELD_OUT) + 1)
    mods = dict(fp.named_modules())
    prefix = layer_prefix(fp)  # "lm.model.layers"
    names = [f"{prefix}.{i}.{n}" for i in LAYERS for n in LINEARS]
    fit: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    held: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    sink = [fit]
    hooks = [mods[n].register_forward_pre_hook(
        lambda m, a, n=n: sink[0][n].append(a[0].reshape(-1, a[0].shape[-1]).clone())) for n in names]
    with torch.inference_mode():
        for b in calib[: max(FIT_WINDOWS)]:
            fp(b)
        sink[0] = held
        for i in HELD_OUT:
            fp(calib[i])
    for h in hooks:
        h.remove()

    ratios: dict[tuple[int, float], list[float]] = {}
    for n in names:
        m = mods[n]
        w = m.weight.detach().float()
        x = torch.cat(held[n])  # (M, K)
        g = effective_group_size(w.shape[1], 128)
        err = lambda q: float(((x @ (w - q).T) ** 2).mean())  # noqa: E731
        rtn = err(WeightOnlyQLinear.from_float(m, 4, g, True).dequantized_weight())
        for nw in FIT_WINDOWS:
            for damp in DAMPS:
                h = GPTQ(w.shape[1])
                for xb in fit[n][:nw]:
                    h.add_batch(xb)
                codes, qp, _ = h.solve(w, "int4", True, g, percdamp=damp)
                ratios.setdefault((nw, damp), []).append(
                    err(WeightOnlyQLinear.from_quantized(m, codes, qp, g).dequantized_weight()) / rtn)
    rows = [{"fit_windows": nw, "percdamp": d, "mean_ratio": statistics.mean(v), "worst_ratio": max(v)}
            for (nw, d), v in ratios.items()]
    md = ["# GPTQ damping x calibration size, judged on held-out calibration windows", "",
          "Layer output error of GPTQ relative to RTN (W4 g128 sym) on calibration windows 40..47, never fitted; "
          f"16 linears (q/o/gate/down of layers {', '.join(map(str, LAYERS))}). 1.0 = no better than RTN.", "",
          "| fit windows (x512 tokens) | percdamp | mean GPTQ/RTN error | worst layer |", "|---|---|---|---|"]
    md += [f"| {r['fit_windows']} | {r['percdamp']} | {r['mean_ratio']:.3f} | {r['worst_ratio']:.3f} |" for r in rows]
    md += ["", f"Machine: {machine()}", ""]
    write_results("gptq_damping", rows, "\n".join(md), {"machine": machine()})
    print("\n".join(md))


if __name__ == "__main__":
    main()
