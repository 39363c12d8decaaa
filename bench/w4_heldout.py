"""Issue 18, W4 g128: how the GPTQ / AWQ options of that work were chosen, on held-out *calibration* windows
(never an evaluation text), as bench/gptq_damping.py and bench/gptaq_alpha.py did for their choices.

    .venv/bin/python bench/w4_heldout.py --method gptq --init mse      # one setting per run (appends)
    .venv/bin/python bench/w4_heldout.py --method awq-gptaq --no-clip --calib 32 --percdamp 0.05
    .venv/bin/python bench/w4_heldout.py --render                      # -> results/w4_heldout.md

SmolLM2 W{bits} g128 sym (g64 on the 576-wide inputs). Every method is fitted on the first ``--calib``
512-token windows of lowbit.data.lm_calib_text() (the mix; default 16, AWQ's search the first 4 of them) and
scored by perplexity and KL(fp32 || model) on windows 99..106 of the same text (the last 8 of its 107
windows: never fitted at any --calib up to 99). Methods: rtn, rtn-mse (RTN with the MSE group-scale search),
gptq, gptaq (GPTAQ, alpha 0.25, no guard), awq, awq-gptq, awq-gptaq, gptq-rot / gptaq-rot (QuaRot rotations
folded in first, online Hadamard before down_proj); --init mse for the GPTQ step's group
scales, --init hqq for HQQ's rounding (rtn --init hqq: plain HQQ; awq --init hqq: AWQ's searches and codes with
HQQ instead of RTN; awq --init sinq: with RTN on SINQ's Sinkhorn-normalised weights); --affine for affine groups;
--no-clip drops AWQ's clipping search, --value-scales adds AWQ's v -> o scales (shared per KV head), --attn-hessian gives GPTQ / GPTAQ (and AWQ's GPTQ / GPTAQ step) v_proj's attention-mixed Hessian, --resid-weights weighs the residual writers' tokens by 1 / rms of
the residual after their add, --duo uses AWQ's duo scaling; --tune-windows N then tunes the
group scales end to end on the first N windows (N <= 96: the held-out windows stay unseen).

Writes bench/results/w4_heldout.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import RESULTS, Timer, machine, quiet, rtn_decoder, write_results  # noqa: E402

HELD_OUT = range(99, 107)
METHODS = ("rtn", "rtn-mse", "gptq", "gptaq", "awq", "awq-gptq", "awq-gptaq", "gptq-rot", "gptaq-rot")


def quantize(fp, method: str, bits: int, init: str, clip: bool, n_calib: int | None, percdamp: float | None,
             search_tokens: int | None = None, tune_windows: int = 0, tune_lr: float | None = None,
             duo: bool = False, affine: bool = False, sink_tokens: int = 0, attn_hessian: bool = False, resid_weights: bool = False,
             attn_scales: bool = True, value_scales: bool = False):
    import lowbit
    from lowbit.algorithms.awq import AWQConfig
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.algorithms.hqq import HQQConfig

    from bench.llm_methods import rtn_mse_decoder

    model = copy.deepcopy(fp)
    w = dict(bits=bits, group_size=128, symmetric=not affine)
    damp = {} if percdamp is None else {"percdamp": percdamp}
    if method == "rtn" and init == "hqq":  # plain HQQ (calibration-free), on GPTQ / AWQ's groups
        lowbit.quantize(model, HQQConfig(**w))
    elif method == "rtn":
        rtn_decoder(model, **w)
    elif method == "rtn-mse":
        rtn_mse_decoder(model, **w)
    elif method in ("gptq", "gptaq", "gptq-rot", "gptaq-rot"):
        tune = dict(tune_windows=tune_windows, **({} if tune_lr is None else {"tune_lr": tune_lr}))
        lowbit.quantize(model, GPTQConfig(**w, init=init, n_calib=n_calib, asymmetric_calib=method.startswith("gptaq"),
                                          rotate=method.endswith("-rot"), attention_hessian=attn_hessian,
                                          residual_weights=resid_weights, **damp,
                                          **tune))
    else:
        if (attn_hessian or resid_weights) and method == "awq":
            raise SystemExit("--attn-hessian / --resid-weights: GPTQ / GPTAQ and AWQ's GPTQ / GPTAQ rounding only")
        if percdamp is not None:
            raise SystemExit("--percdamp: GPTQ / GPTAQ only (AWQ's GPTQ step keeps the default)")
        rounding = {"awq": "rtn", "awq-gptq": "gptq", "awq-gptaq": "gptaq"}[method]
        search = {} if search_tokens is None else {"search_tokens": search_tokens}
        lowbit.quantize(model, AWQConfig(**w, rounding=rounding, init=init, clip=clip, n_calib=n_calib, duo_scaling=duo,
                                         sink_tokens=sink_tokens, attention_hessian=attn_hessian,
                                         residual_weights=resid_weights, attention_scales=attn_scales,
                                         value_scales=value_scales, **search))
    return model


def _name(row: dict) -> str:
    if row["method"] == "rtn" and row["init"] == "hqq":
        return "hqq"
    return f"awq-{row['init']}" if row["method"] == "awq" and row["init"] in ("hqq", "sinq") else row["method"]


def _sink(row: dict) -> str:
    return (f" sink {row['sink']}" if row.get("sink") else "") + (" + attention Hessian" if row.get("attnh") else "") \
        + (" + residual weights" if row.get("resw") else "") + (" - attention scales" if row.get("noattn") else "") \
        + (" + v->o scales" if row.get("voscales") else "")


def _tuned(row: dict) -> str:
    if not row.get("tune_windows"):
        return ""
    return f"{row['tune_windows']} ({row.get('tune_lr') or 'default'})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=METHODS)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--init", default="minmax", choices=("minmax", "mse", "hqq", "sinq"))
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--calib", type=int, default=None, help="calibration windows (default: the method's own)")
    ap.add_argument("--percdamp", type=float, default=None)
    ap.add_argument("--search-tokens", type=int, default=None, help="AWQ: tokens of its scale search (default 2048)")
    ap.add_argument("--tune-windows", type=int, default=0, help="GPTQ / GPTAQ: then tune the group scales end to "
                    "end on the first N calibration windows (lowbit.algorithms.scale_tuning)")
    ap.add_argument("--tune-lr", type=float, default=None)
    ap.add_argument("--duo", action="store_true", help="AWQ: duo scaling (AWQConfig.duo_scaling)")
    ap.add_argument("--affine", action="store_true", help="affine weight groups (a zero-point per group)")
    ap.add_argument("--sink-tokens", type=int, default=0, help="AWQ: each window's first tokens left out of its "
                    "statistics and losses (AWQConfig.sink_tokens)")
    ap.add_argument("--resid-weights", action="store_true", help="GPTQ / GPTAQ (also awq-gptq / awq-gptaq): o_proj / down_proj tokens weighted by "
                    "1 / rms of the residual after their add (lowbit.algorithms.residual_hessian)")
    ap.add_argument("--attn-hessian", action="store_true", help="GPTQ / GPTAQ (also awq-gptq / awq-gptaq): v_proj's Hessian of the attention-mixed "
                    "inputs (GPTQConfig.attention_hessian)")
    ap.add_argument("--no-attn-scales", action="store_true", help="AWQ: no scale search for q/k/v "
                    "(AWQConfig.attention_scales=False)")
    ap.add_argument("--value-scales", action="store_true", help="AWQ: o_proj's input scales folded into v_proj's "
                    "rows, shared per KV head (AWQConfig.value_scales)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    path = RESULTS / "w4_heldout.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    if not args.render:
        quiet()
        torch.set_num_threads(args.threads)
        from lowbit.algorithms._calib import default_calibration
        from lowbit.analysis.evaluate import lm_scores
        from lowbit.models import load_model

        fp = load_model("smollm2")
        held = torch.cat(default_calibration(fp, max(HELD_OUT) + 1)[HELD_OUT.start:HELD_OUT.stop])  # (8, 512)
        if max(args.calib or 0, args.tune_windows) > HELD_OUT.start:
            raise SystemExit(f"--calib / --tune-windows above {HELD_OUT.start} would fit the held-out windows")
        with Timer() as t:
            model = quantize(fp, args.method, args.bits, args.init, not args.no_clip, args.calib, args.percdamp,
                             args.search_tokens, args.tune_windows, args.tune_lr, args.duo, args.affine,
                             args.sink_tokens, args.attn_hessian, args.resid_weights, not args.no_attn_scales,
                             args.value_scales)
        s = lm_scores(model, fp, held)
        from lowbit.data import lm_calib_composition

        key = dict(mix=lm_calib_composition()["sha256"][:12], method=args.method, bits=args.bits, init=args.init, clip=not args.no_clip, calib=args.calib,
                   percdamp=args.percdamp, search_tokens=args.search_tokens, tune_windows=args.tune_windows or None,
                   tune_lr=args.tune_lr, duo=args.duo or None, affine=args.affine or None,
                   sink=args.sink_tokens or None, attnh=args.attn_hessian or None,
                   resw=args.resid_weights or None, noattn=args.no_attn_scales or None,
                   voscales=args.value_scales or None)
        rows = [r for r in rows if {k: r.get(k) for k in key} != key]  # rows without "mix": an earlier environment
        rows.append({**key, "ppl": s["ppl"], "kl": s["kl"], "fp32_ppl": lm_scores(fp, None, held)["ppl"],
                     "quant_cpu_s": t.cpu, "quant_wall_s": t.wall, "loadavg": machine()["loadavg_1_5_15"]})
        print(rows[-1], flush=True)
    rows.sort(key=lambda r: (r.get("mix") or "", r["bits"], bool(r.get("affine")), METHODS.index(r["method"]), r["init"], not r["clip"], r["calib"] or 0,
                             r["percdamp"] or 0, r.get("search_tokens") or 0, r.get("tune_windows") or 0))
    md = ["# W4 choices of issue 18, judged on held-out calibration windows", "",
          f"SmolLM2 W-bits g128 sym (bits 'affine': a zero-point per group); fitted on the first `calib` windows of the calibration mix (empty: the method's "
          f"default: GPTQ 16, AWQ 4, AWQ+GPTQ 16), scored on calibration windows {HELD_OUT.start}..{HELD_OUT.stop - 1} "
          "(never fitted; no evaluation text). percdamp empty: the default (0.1). Lower KL is better.", "",
          "Compare rows of one calibration mix only (`mix`: the first 12 hex digits of its sha256; it holds the installed "
          "packages' licences and READMEs, so it moves with the environment; empty: rows from before stop 32, one "
          "earlier environment, fp32 ppl 12.713 there).", "",
          "| mix | bits | method | init | AWQ clip | calib | percdamp | AWQ search tokens | ppl held-out calib | fp32 ppl | KL | "
          "tuned windows (lr) | quantize CPU s | load |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r.get('mix') or ''} | {r['bits']}{' affine' if r.get('affine') else ''} | {_name(r)}{' duo' if r.get('duo') else ''}{_sink(r)} | {r['init']} | {r['clip'] if r['method'].startswith('awq') else ''} | "
           f"{r['calib'] or ''} | {r['percdamp'] or ''} | {r.get('search_tokens') or ''} | {r['ppl']:.3f} | {r['fp32_ppl']:.3f} | {r['kl']:.4f} | "
           f"{_tuned(r)} | {r['quant_cpu_s']:.0f} | {r['loadavg']} |" for r in rows]
    write_results("w4_heldout", rows, "\n".join(md) + "\n", {"machine": machine()})
    print("\n".join(md))


if __name__ == "__main__":
    main()
