"""QuaRot rotations on SmolLM2-135M: W4A8 / W4A4 with and without Hadamard rotations, a 4-bit KV
cache with and without rotated keys/values, and the activation kurtosis before/after.

    .venv/bin/python bench/rotation.py [--quick] [--only ROW ...] [--calib 4] [--weight-method auto]

Rows (``--only`` takes these names; rows not run keep their numbers from bench/results/rotation.json):

- ``fp32``, ``fp32-rot``: the float model and the same model with every rotation folded in
  (``rotate_model``; should equal fp32 up to float rounding);
- ``w4a8``, ``w4a4``: the presets as shipped (SmoothQuant alpha 0.5 + GPTQ weights + per-token
  activations), ``w4a8-rot``, ``w4a4-rot``: the presets with ``rotate=True`` (no smoothing; GPTQ on
  the rotated weights); A4 grids on the rotated weights: ``-clip`` (0.9 of each token's max),
  ``-asym`` (affine, clipped), ``-g`` (one grid per token and weight group, clipped), ``-g-asym``.
  Weights: one quantization per row with that row's preset and activation grid, by the presets' default
  (``--weight-method auto``: GPTAQ with the row's activation grid in the loop on the rotated rows, GPTQ
  on the others), or ``gptq`` / ``gptaq`` for every row; ``w4a8-rot-tuned``, ``w4a4-rot-g-asym-tuned``: then
  the group scales tuned end to end on 96 calibration windows (``tune_windows``; not run into rotation.md
  yet: their full-window numbers come from bench/wa_gptaq_heldout.py, log in results). (Results before 2026-12-05 10:00 shared one
  GPTQ run per weight kind, built with the W4A8 grid: the A4 rows' later layers were then calibrated
  on A8 outputs of the earlier ones, not the same model as a fresh W4A4 quantization);
- ``kv4``, ``kv4-rot``: fp32 weights, int4 KIVI cache (chunks of 64 tokens), plain and with keys and
  values quantized in the Hadamard basis (``int4-rot``);
- ``kurtosis``: per-token input kurtosis of every linear before/after rotation (1 calibration window).

Perplexity / KL on the evaluation texts (``--quick``: 2 windows each). Writes
bench/results/rotation.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import RESULTS, CachedReference, Timer, machine, quiet, write_results  # noqa: E402

CLIP = 0.9  # QuaRot's activation clip ratio for A4
# row -> (weights: "sq" = the shipped presets' SmoothQuant + GPTQ, "rot" = rotate=True + GPTQ, "rot-tuned" = the same
# then its scales tuned end to end on TUNE_WINDOWS calibration windows; activation grid)
WA_ROWS = {
    "w4a8": ("sq", dict(act_bits=8)),
    "w4a4": ("sq", dict(act_bits=4)),
    "w4a8-rot": ("rot", dict(act_bits=8)),
    "w4a4-rot": ("rot", dict(act_bits=4)),
    "w4a4-rot-clip": ("rot", dict(act_bits=4, act_clip=CLIP)),
    "w4a4-rot-asym": ("rot", dict(act_bits=4, act_clip=CLIP, act_symmetric=False)),
    "w4a4-rot-g": ("rot", dict(act_bits=4, act_clip=CLIP, act_per_group=True)),
    "w4a4-rot-g-asym": ("rot", dict(act_bits=4, act_clip=CLIP, act_per_group=True, act_symmetric=False)),
    "w4a8-rot-tuned": ("rot-tuned", dict(act_bits=8)),
    "w4a4-rot-g-asym-tuned": ("rot-tuned", dict(act_bits=4, act_clip=CLIP, act_per_group=True, act_symmetric=False)),
}
TUNE_WINDOWS = 96  # -tuned rows: group scales then tuned end to end (lowbit.algorithms.scale_tuning)
ROWS = ("fp32", "fp32-rot", *WA_ROWS, "kv4", "kv4-rot", "kurtosis")
_BASES: dict = {}


def _quantized(kind: str, fp, calib, act: dict, method: str = "auto"):
    """A row's weights: one ``lowbit.quantize`` with that row's preset and activation grid. Rows do not
    share a run: even plain GPTQ sees the grid of the layers before (their outputs, through WAQLinear,
    are the next layer's calibration inputs), and GPTAQ with the grid in its loop fits it directly."""
    import dataclasses

    import lowbit
    from lowbit.algorithms.presets import preset_config

    rotate = kind.startswith("rot")
    tune = TUNE_WINDOWS if kind == "rot-tuned" else 0
    key = (kind, tuple(sorted(act.items())), method)
    if key not in _BASES:
        _BASES.clear()  # one base alive at a time
        m = copy.deepcopy(fp)
        preset = "w4a4" if act.get("act_bits") == 4 else "w4a8"
        grid = {k: v for k, v in act.items() if k != "act_bits"}
        with Timer() as t:
            if tune:  # the built-in windows: the first len(calib) for the weights (= calib), the first 96 for tuning
                cfg = dataclasses.replace(preset_config(preset, rotate=rotate, weight_method=method, tune_windows=tune,
                                                        **grid), n_calib=len(calib))
                lowbit.quantize(m, cfg)
            else:
                lowbit.quantize(m, preset_config(preset, rotate=rotate, weight_method=method, **grid), calib)
        t.save_load_diff = _save_load_diff(m) if rotate else None
        t.weight_method = m.lowbit_report.extra["wa"]["weight_method"]
        _BASES[key] = (m, t)
    return _BASES[key]


def _save_load_diff(m) -> float:
    """Save the rotated model, load it from the folder alone, max |logit difference| on 64 tokens (0 expected)."""
    import tempfile

    import lowbit

    ids = torch.arange(100, 164)[None]  # (1, 64)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        lowbit.save(m, Path(tmp) / "rot")
        loaded = lowbit.load(Path(tmp) / "rot")
        return float((loaded(ids) - m(ids)).abs().max())


def _with_activations(m, act_bits: int, act_clip: float = 1.0, act_per_group: bool = False,
                      act_symmetric: bool = True):
    from lowbit.nn import WAQLinear

    out = copy.deepcopy(m)
    for mod in out.modules():
        if isinstance(mod, WAQLinear):
            mod.act_bits, mod.act_clip, mod.act_per_group, mod.act_symmetric = act_bits, act_clip, act_per_group, \
                act_symmetric
            mod._prepared = None
    return out


def kurtosis_rows(fp) -> dict:
    from lowbit.algorithms._calib import default_calibration
    from lowbit.analysis.lint import kurtosis_by_kind, kurtosis_report

    with torch.no_grad():
        return kurtosis_by_kind(kurtosis_report(fp, default_calibration(fp, 1)))


def run_row(name: str, fp, ref, quick: bool, calib, method: str = "auto") -> dict:
    from lowbit.algorithms.rotation import rotate_model
    from lowbit.analysis.evaluate import evaluate
    from lowbit.nn.kv_cache import KVCacheLM

    if name == "fp32":
        return evaluate(fp, ref, quick=quick)
    if name == "fp32-rot":
        m = copy.deepcopy(fp)
        rotate_model(m)
        return evaluate(m, ref, quick=quick)
    if name in ("kv4", "kv4-rot"):
        return evaluate(KVCacheLM(fp, "int4" if name == "kv4" else "int4-rot"), ref, quick=quick)
    kind, act = WA_ROWS[name]
    base, t = _quantized(kind, fp, calib, act, method)
    return {**evaluate(_with_activations(base, **act), ref, quick=quick), "quant_wall_s": t.wall, "quant_cpu_s": t.cpu,
            "weights": kind, "weight_method": t.weight_method, "save_load_max_abs_diff": t.save_load_diff, **act}


TEXTS = (("", "licence"), ("_heldout", "held-out docs"), ("_science", "science"))


def render(rows: dict, meta: dict) -> str:
    base = rows.get("fp32")
    texts = [(s, t) for s, t in TEXTS if base and f"ppl{s}" in base]
    out = ["# SmolLM2-135M: QuaRot Hadamard rotations for W4A8, W4A4 and a 4-bit KV cache", "",
           "Rotations folded into the weights (RMSNorms fused, residual x randomised Hadamard 576 = 12·12·4, "
           "values/out per head 64, online Hadamard 1536 = 12·128 on down_proj's input; "
           f"{meta.get('head', 'LM head untied: +113 MB fp32')}). Weights: W4 g128 sym (g64 on 576-wide inputs) by the row's "
           "method (GPTQ; GPTAQ = asymmetric calibration with the row's activation grid in the loop) on "
           f"{meta['calib']} calibration windows; activations int per token; embeddings and LM head fp32. "
           "KV: fp32 weights, int4 KIVI cache fed in chunks of 64 tokens, keys/values quantized in the "
           f"Hadamard basis for -rot. {'Quick: 2 windows per text.' if meta['quick'] else 'All windows.'}", "",
           "| row | weights | MB | " + " | ".join(f"ppl {t} | × fp32 | KL {t}" for _, t in texts) + " | quantize s |",
           "|---|---|---|" + "---|---|---|" * len(texts) + "---|"]
    for name in ROWS:
        r = rows.get(name)
        if r is None or name == "kurtosis":
            continue
        cells = []
        for s, _ in texts:
            cells.append(f"{r[f'ppl{s}']:.3f} | {r[f'ppl{s}'] / base[f'ppl{s}']:.3f} | {r[f'kl{s}']:.4f}")
        q = r.get("quant_wall_s")
        out.append(f"| {name} | {r.get('weight_method', 'gptq' if q is not None else '')} | {r['size_mb']:.1f} | "
                   + " | ".join(cells) + f" | {'' if q is None else f'{q:.0f}'} |")
    k = rows.get("kurtosis")
    if k:
        out += ["", "## Activation kurtosis per token across input channels (Gaussian = 3), 1 calibration window", "",
                "| linear input | n | median before | max before | median after | max after |",
                "|---|---|---|---|---|---|"]
        for kind, v in k.items():
            out.append(f"| {kind} | {v['n']} | {v['median_before']:.1f} | {v['max_before']:.1f} | "
                       f"{v['median_after']:.1f} | {v['max_after']:.1f} |")
    diffs = {r.get("save_load_max_abs_diff") for n, r in rows.items() if n != "kurtosis"} - {None}
    if diffs:
        out += ["", f"Rotated W4 model saved and loaded from its folder alone: max |logit difference| {max(diffs):.3g}."]
    out += ["", "Targets (issue 18): W4A4 rotated <= 1.25x fp32, W4A8 <= 1.05x fp32, KV 4-bit <= +1 %.", ""]
    for name, m in meta.get("runs", {}).items():
        out.append(f"- {name}: load {m['loadavg_1_5_15']}, torch threads {m['torch_threads']}")
    out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=ROWS, default=None)
    ap.add_argument("--calib", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weight-method", default="auto", choices=("auto", "gptq", "gptaq"),
                    help="the W/A rows' weights: the presets' default (auto: GPTAQ with the activation grid on "
                         "rotated rows, GPTQ on the others), or one method for every row")
    ap.add_argument("--out", default="rotation", help="results name under bench/results (for side experiments)")
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    from lowbit.algorithms._calib import default_calibration
    from lowbit.models import load_model

    old = RESULTS / f"{args.out}.json"
    rows, meta = {}, {"quick": args.quick, "calib": args.calib, "runs": {},
                      "head": "LM head tied to the embedding: one rotated table, the final norm's weight applied "
                              "online in the unrotated basis (RotatedRMSNorm)"}
    if args.only is not None and old.is_file():
        prev = json.loads(old.read_text())
        if prev["meta"].get("quick") == args.quick and prev["meta"].get("calib") == args.calib:
            rows, meta["runs"] = prev["rows"], prev["meta"].get("runs", {})
    fp = load_model("smollm2")
    ref = CachedReference(fp)
    calib = default_calibration(fp, args.calib)
    names = list(args.only or ROWS)
    if "fp32" not in rows and "fp32" not in names:  # every ratio is to fp32
        names.insert(0, "fp32")
    for name in names:
        print(f"... {name}", flush=True)
        rows[name] = kurtosis_rows(fp) if name == "kurtosis" else run_row(name, fp, ref, args.quick, calib,
                                                                            args.weight_method)
        meta["runs"][name] = machine()
        if name != "kurtosis":
            print({k: round(v, 4) for k, v in rows[name].items() if k.startswith(("ppl", "kl"))}, flush=True)
        write_results(args.out, rows, render(rows, meta), meta)
    print(render(rows, meta))


if __name__ == "__main__":
    main()
