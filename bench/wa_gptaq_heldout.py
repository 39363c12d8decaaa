"""Issue 18: how the rotated W/A presets' weight method was chosen — GPTQ vs GPTAQ, with and without the
activation grid in GPTAQ's loop — judged on held-out *calibration* windows (99..106 of the calibration mix,
never fitted), with the three evaluation texts reported beside.

    .venv/bin/python bench/wa_gptaq_heldout.py CALIB PRESET RUN [RUN ...]
    .venv/bin/python bench/wa_gptaq_heldout.py 16 w4a4 gptq gptaq:0.25 gptaq:0.25:noact
    .venv/bin/python bench/wa_gptaq_heldout.py 16 w4a8 gptq gptaq:0.25

PRESET ``w4a4`` runs QuaRot-rotated W4A4 with per-token-and-group affine activations clipped at 0.9
(``w4a4-rot-g-asym`` of bench/rotation.py), ``w4a8`` the rotated W4A8 preset. RUN = ``METHOD[:ALPHA][:noact]
[:mse]``: METHOD the preset's ``weight_method`` (gptq / gptaq), ALPHA GPTAQ's asym_alpha (default 0.25),
``noact`` = GPTAQ without the activation grid (its x_q is the layer input as is), ``mse`` / ``minmax`` =
GPTQ's group-scale init (the presets' default since stop 24: ``mse`` with GPTAQ, ``minmax`` with GPTQ),
``attnh`` = v_proj's GPTQ Hessian of attention-mixed inputs (``GPTQConfig.attention_hessian``; its inputs on
the activation grid first), ``resw`` = o_proj / down_proj's tokens weighted by ``1 / ms`` of the residual after
their add (``GPTQConfig.residual_weights``), ``clipsearch`` = each input's activation clip searched (``WAConfig.act_clip_search``), ``tune`` = then the
group scales tuned end to end on the first 96 calibration windows (``WAConfig.tune_windows``; ``tune2``: two
passes, ``tune_epochs=2``, ``tuneN``: N passes; ``lrX``: tuning learning rate X instead of the preset's, e.g. ``lr1e-3``;
``learnclip``: the activation clips trained too, ``tune_scales(learn_clip=True)``; ``bf16``: the tuning under bf16
autocast, ``tune_bf16=True``; ``gN``: weight group size N instead of the preset's 128, e.g. ``g32``; ``asym``: affine weight groups
(a zero-point per group) instead of the preset's symmetric ones; ``moreN``: the tuning runs on 96 + N
windows (``tune_windows=96+N``; the library's built-in windows past 96 are windows 115.. of the calibration mix built with
5x its budgets, ``lm_calib_text("mix-large")``: text past the mix's 107 windows, so past the held-out windows, with an
8-window margin; needs ``tune``; the 8-gram overlap with the held-out windows is printed). The variants are set by patching the GPTQConfig the preset builds (a side experiment,
not an API). Prints one line per run: perplexity as a multiple of fp32 on the evaluation texts (all
windows) and KL / perplexity on the held-out calibration windows. The runs of 2026-12-05 are logged in
bench/results/wa_gptaq_heldout.log.
"""

from __future__ import annotations

import copy
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import CachedReference, quiet  # noqa: E402

HELD_OUT = range(99, 107)  # the last 8 of the mix's 107 windows: never fitted at CALIB <= 99


def print_extra_overlap(fp, n: int, held: torch.Tensor) -> None:
    """The share of the held-out windows' token 8-grams that occur in the ``n`` tuning windows past the first
    96 (the library's built-in windows: 115.. of ``lm_calib_text("mix-large")``); shared boilerplate puts
    12.7 % of them in the default tuning windows 0..95 on a fresh install (11.4 % in the stop-28 environment)."""
    from lowbit.algorithms.scale_tuning import DEFAULT_TUNE_WINDOWS, builtin_tuning_windows

    windows, source = builtin_tuning_windows(fp, DEFAULT_TUNE_WINDOWS + n)

    def grams(t):
        t = t.reshape(-1).tolist()
        return {tuple(t[i:i + 8]) for i in range(len(t) - 7)}

    held_grams = grams(held)
    extra_grams = set().union(*(grams(w) for w in windows[DEFAULT_TUNE_WINDOWS:]))
    print(f"  more{n}: {source}; {len(held_grams & extra_grams) / len(held_grams):.2%} of the held-out windows' "
          f"token 8-grams occur in the extra windows", flush=True)


def main() -> None:
    import lowbit
    import lowbit.algorithms.smoothquant as sq
    from lowbit.algorithms import gptq
    from lowbit.algorithms._calib import default_calibration
    from lowbit.algorithms.presets import preset_config
    from lowbit.config import override
    from lowbit.analysis.evaluate import evaluate, lm_scores
    from lowbit.models import load_model

    n_calib, preset, runs = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if n_calib > HELD_OUT.start or preset not in ("w4a4", "w4a8") or not runs:
        raise SystemExit(__doc__)
    quiet()
    torch.set_num_threads(2)
    fp = load_model("smollm2")
    ref = CachedReference(fp)
    calib = default_calibration(fp, n_calib)
    held = torch.cat(default_calibration(fp, HELD_OUT.stop)[HELD_OUT.start:HELD_OUT.stop])  # (8, 512)
    import functools

    from lowbit.algorithms import scale_tuning

    config_cls, fake_quantize, tune = gptq.GPTQConfig, sq.fake_quantize_activations, scale_tuning.tune_scales
    from lowbit.data import lm_calib_composition

    mix = lm_calib_composition("mix")  # the text depends on the installed packages: name it in the log
    print(f"  calibration mix: {mix['bytes']} bytes, sha256 {mix['sha256'][:12]}", flush=True)
    base = evaluate(fp, ref, quick=False)
    for run in runs:
        parts = run.split(":")
        method, alpha = (parts + ["0.25"])[:2]
        extra = dict(init="mse") if "mse" in parts else dict(init="minmax") if "minmax" in parts else {}
        if "attnh" in parts:  # v_proj's Hessian of attention-mixed (activation-quantized) inputs
            extra["attention_hessian"] = True
        if "resw" in parts:  # o_proj / down_proj's tokens weighted by 1 / ms(residual after their add)
            extra["residual_weights"] = True
        gptq.GPTQConfig = (lambda a, e: (lambda **kw: config_cls(**{**kw, "asym_alpha": a, **e})))(float(alpha), extra)
        sq.fake_quantize_activations = (lambda x, *a, **k: x) if "noact" in parts else fake_quantize
        scale_tuning.tune_scales = functools.partial(tune, learn_clip=True) if "learnclip" in parts else tune
        more = next((int(p[4:]) for p in parts if re.fullmatch(r"more\d+", p)), 0)
        if more and not any(re.fullmatch(r"tune\d*", p) for p in parts):
            raise SystemExit(f"{run}: moreN adds tuning windows, so it needs tune (or tuneN)")
        if more:
            print_extra_overlap(fp, more, held)
        kw = dict(rotate=True, weight_method=method)
        if preset == "w4a4":
            kw.update(act_clip=0.9, act_per_group=True, act_symmetric=False)
        config = preset_config(preset, **kw)
        if "clipsearch" in parts:  # each input's activation clip searched (WAConfig.act_clip_search)
            config = override(config, act_clip_search=True)
        group = next((int(p[1:]) for p in parts if re.fullmatch(r"g\d+", p)), None)
        if group is not None:
            config = override(config, group_size=group)
        if "asym" in parts:  # affine weight groups (an int8-stored zero-point per group) instead of symmetric
            config = override(config, symmetric=False)
        m = copy.deepcopy(fp)
        t = time.time()
        tune_parts = [p for p in parts if re.fullmatch(r"tune\d*", p)]
        if tune_parts:  # built-in windows: the first n_calib (= calib) for weights, 96 (+ moreN) tuning
            epochs = int(tune_parts[0][4:] or 1)
            lr = next((float(p[2:]) for p in parts if p.startswith("lr")), config.tune_lr)
            lowbit.quantize(m, override(config, n_calib=n_calib, tune_windows=96 + more, tune_epochs=epochs, tune_lr=lr,
                                        tune_bf16="bf16" in parts))
            print(f"  tuning: {m.lowbit_report.extra['scale_tuning']}", flush=True)
        else:
            lowbit.quantize(m, config, calib)
        if "clipsearch" in parts:
            chosen = m.lowbit_report.extra["wa"]["act_clips"]
            print(f"  clips: {sorted(set(chosen.values()))}, mean {sum(chosen.values()) / len(chosen):.3f}", flush=True)
        r = evaluate(m, ref, quick=False)
        h = lm_scores(m, fp, held)
        print(f"{preset} {run} calib {n_calib}: x fp32 held-out {r['ppl_heldout'] / base['ppl_heldout']:.3f} "
              f"licence {r['ppl'] / base['ppl']:.3f} science {r['ppl_science'] / base['ppl_science']:.3f} "
              f"| held-out calib KL {h['kl']:.4f} ppl {h['ppl']:.3f} | KL {r['kl_heldout']:.4f} {r['kl']:.4f} "
              f"{r['kl_science']:.4f} ({time.time() - t:.0f} s)", flush=True)
    gptq.GPTQConfig, sq.fake_quantize_activations, scale_tuning.tune_scales = config_cls, fake_quantize, tune


if __name__ == "__main__":
    main()
