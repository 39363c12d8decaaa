"""Per-window perplexity and per-token KL on one evaluation text: fp32, RTN and schemes (SmolLM2).

    flock /tmp/lowbit-heavy.lock .venv/bin/python bench/licence_windows.py            # AWQ W4 g128 sym, licence
    flock /tmp/lowbit-heavy.lock nice -n 10 .venv/bin/python bench/licence_windows.py \
        --text licence --rows "awq --symmetric;hqq --symmetric;sinq --symmetric --guard" --part sym

Why a scheme can be worse than RTN in perplexity while closer to fp32 in KL (issue 18): the text's windows
of 512 tokens scored one by one (the whole-text perplexity is the geometric mean of the windows'), then
every predicted token bucketed by the probability fp32 gives the true next token: summed NLL, mean entropy
of the predicted distribution and mean KL(fp32 || model) per bucket and model. Each row is built by
``lowbit.config.build_config`` as ``lowbit quantize --scheme`` builds it (W4 g128, built-in calibration mix,
the scheme's defaults; ``--symmetric`` / ``--guard`` as the CLI flags) and compared with its RTN twin
(``lowbit.analysis.rtn_baseline.rtn_twin``: RTN on exactly the linears it quantized, at each one's grid).
Stops <= 39 built AWQ with ``AWQConfig(bits=4, group_size=128, symmetric=True)`` and RTN with the bench's
``rtn_decoder``: the same models (decoder linears, g64 on the 576-wide inputs).
Last, every model's perplexity with its logits divided by a temperature T (``TEMPERATURES``): a gap to RTN that
closes at each model's best T is the sharpness of the distributions, not the ranking (stop 41).
Writes bench/results/licence_windows[_part_NAME].{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import machine, quiet, write_results  # noqa: E402

BUCKETS = (0.0, 0.01, 0.1, 0.5, 0.9, 1.01)  # edges of fp32's probability of the true token
# logits / T: how much of a perplexity gap is only the sharpness of the predicted distributions (analysis only:
# a temperature chosen on an evaluation text is no method)
TEMPERATURES = (0.9, 0.95, 0.975, 1.0, 1.025, 1.05, 1.075, 1.1, 1.15, 1.2, 1.3, 1.5)
TEXTS = {"licence": ("lm_eval_text", None), "held-out docs": ("lm_heldout_text", 16),
         "science": ("lm_science_text", None)}  # evaluate.py's window counts
FLAGS = {"--symmetric": ("symmetric", True), "--affine": ("symmetric", False), "--guard": ("guard", True)}


def parse_row(spec: str) -> tuple[str, dict]:
    """``"hqq --symmetric --guard"`` -> (scheme, build_config options at W4 g128)."""
    scheme, *flags = spec.split()
    options = dict(bits=4, group_size=128)
    for f in flags:
        if f not in FLAGS:
            raise SystemExit(f"unknown flag {f!r} in row {spec!r}; known: {', '.join(FLAGS)}")
        key, value = FLAGS[f]
        options[key] = value
    return scheme, options


def token_stats(models: dict, windows: torch.Tensor, tokenizer) -> tuple[list[dict], dict]:
    """Per-window perplexity / KL and every predicted token's NLL, entropy and KL(fp32 || model), per model;
    the first model is the reference. ``nll_t``: per window, the summed NLL with the logits divided by each of
    ``TEMPERATURES`` (T,)."""
    rows, tokens = [], {n: {"nll": [], "entropy": [], "kl": [], "nll_t": []} for n in models}
    temps = torch.tensor(TEMPERATURES)
    with torch.inference_mode():
        for i in range(windows.shape[0]):
            row = {"window": i, "first_tokens": tokenizer.decode(windows[i, :12])}
            target = windows[i, 1:, None]  # (T-1, 1): the true next tokens
            ref = None
            for name, m in models.items():
                logits = m(windows[i:i + 1])[0, :-1].float()  # (T-1, V)
                logp = torch.log_softmax(logits, dim=-1)
                ref = logp if ref is None else ref
                per = tokens[name]
                per["nll"].append(-logp.gather(1, target)[:, 0])
                per["entropy"].append(-(logp.exp() * logp).sum(-1))
                per["kl"].append((ref.exp() * (ref - logp)).sum(-1))
                per["nll_t"].append(torch.stack([-torch.log_softmax(logits / t, dim=-1).gather(1, target).sum()
                                                 for t in temps])[None])  # (1, len(TEMPERATURES))
                row[name] = {"ppl": math.exp(float(per["nll"][-1].mean())), "kl": float(per["kl"][-1].mean())}
            rows.append(row)
    return rows, {n: {k: torch.cat(v) for k, v in per.items()} for n, per in tokens.items()}


def main() -> None:
    import lowbit
    import lowbit.data
    from lowbit.analysis.evaluate import lm_windows
    from lowbit.analysis.rtn_baseline import rtn_twin
    from lowbit.config import build_config
    from lowbit.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", choices=list(TEXTS), default="licence")
    ap.add_argument("--rows", default="awq --symmetric", help="';'-separated schemes with CLI flags")
    ap.add_argument("--part", default=None, help="write licence_windows_part_NAME.{md,json}")
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(2)
    start = machine()
    fp = load_model("smollm2")
    fn, max_windows = TEXTS[args.text]
    windows = lm_windows(fp.tokenizer, getattr(lowbit.data, fn)(), max_windows=max_windows)  # (W, 512)
    models, pairs = {"fp32": fp}, []
    for spec in [s.strip() for s in args.rows.split(";") if s.strip()]:
        scheme, options = parse_row(spec)
        q = lowbit.quantize(copy.deepcopy(fp), build_config(scheme, options))
        rtn = rtn_twin(fp, q)
        if rtn is None:
            raise SystemExit(f"{spec}: no RTN twin (not a weight-only scheme)")
        grid = "sym" if q.lowbit_config.symmetric else "affine"
        rtn_name = f"RTN W4 g128 {grid} (twin of {spec})"
        models[rtn_name], models[spec] = rtn, q
        pairs.append((rtn_name, spec))
    rows, tokens = token_stats(models, windows, fp.tokenizer)
    p_true = (-tokens["fp32"]["nll"]).exp()
    buckets = []
    for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:]):
        sel = (p_true >= lo) & (p_true < hi)
        buckets.append({"p_fp32": [lo, min(hi, 1.0)], "tokens": int(sel.sum()),
                        **{n: {k: float(v[sel].sum() if k == "nll" else v[sel].mean()) for k, v in per.items()
                               if k != "nll_t"} for n, per in tokens.items()}})
    total = {n: math.exp(sum(math.log(r[n]["ppl"]) for r in rows) / len(rows)) for n in models}
    kl = {n: float(tokens[n]["kl"].mean()) for n in models}
    entropy = {n: float(tokens[n]["entropy"].mean()) for n in models}
    n_tok = tokens["fp32"]["nll"].numel()
    by_t = {n: [math.exp(float(v) / n_tok) for v in tokens[n]["nll_t"].sum(0)] for n in models}  # ppl per T
    cmd = "flock /tmp/lowbit-heavy.lock nice -n 10 .venv/bin/python bench/licence_windows.py " \
          f"--text \"{args.text}\" --rows \"{args.rows}\"" + (f" --part {args.part}" if args.part else "")
    md = [f"# {args.text}, window by window: fp32, RTN twins and schemes at W4 g128 (SmolLM2)", "",
          f"`{cmd}`; load {start['loadavg_1_5_15']} at the start, {machine()['loadavg_1_5_15']} at the end. "
          "ppl per 512-token window; KL(fp32 || model) per token.", ""]
    for rtn_name, name in pairs:
        md += [f"## {name} against {rtn_name}", "",
               "| window | starts with | fp32 ppl | RTN ppl | RTN KL | scheme ppl | scheme KL | scheme vs RTN ppl |",
               "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            text = r["first_tokens"].replace("\n", " ").replace("|", "/").strip()
            md.append(f"| {r['window']} | {text} | {r['fp32']['ppl']:.3f} | {r[rtn_name]['ppl']:.3f} | "
                      f"{r[rtn_name]['kl']:.3f} | {r[name]['ppl']:.3f} | {r[name]['kl']:.3f} | "
                      f"{r[name]['ppl'] / r[rtn_name]['ppl'] - 1:+.1%} |")
        md += ["", f"Whole text: fp32 {total['fp32']:.3f}, RTN {total[rtn_name]:.3f}, scheme {total[name]:.3f}; "
               f"mean KL RTN {kl[rtn_name]:.3f}, scheme {kl[name]:.3f}; mean entropy fp32 {entropy['fp32']:.3f}, "
               f"RTN {entropy[rtn_name]:.3f}, scheme {entropy[name]:.3f}.", "",
               "Every predicted token by the probability fp32 gives the true next token (NLL summed over the "
               "bucket's tokens, entropy and KL averaged, in nats):", "",
               "| p_fp32(true) | tokens | NLL fp32 | NLL RTN | NLL scheme | entropy fp32 | entropy RTN | entropy scheme "
               "| KL RTN | KL scheme |", "|---|---|---|---|---|---|---|---|---|---|"]
        names = ["fp32", rtn_name, name]
        for b in buckets:
            md.append(f"| [{b['p_fp32'][0]}, {b['p_fp32'][1]}) | {b['tokens']} | "
                      + " | ".join(f"{b[n]['nll']:.0f}" for n in names) + " | "
                      + " | ".join(f"{b[n]['entropy']:.3f}" for n in names) + " | "
                      + " | ".join(f"{b[n]['kl']:.3f}" for n in names[1:]) + " |")
        md.append("")
    md += ["## Perplexity with the logits divided by T (each model's lowest in bold)", "",
           "Analysis only: T is read off the evaluation text. Where a scheme at its best T scores below RTN at RTN's "
           "best T, its loss at T = 1 is the sharpness of its distributions (closer to fp32's), not what it "
           "ranks first.", "",
           "| model | " + " | ".join(f"T {t}" for t in TEMPERATURES) + " | best T |",
           "|---|" + "---|" * (len(TEMPERATURES) + 1)]
    for n in models:
        best = min(range(len(TEMPERATURES)), key=lambda k: by_t[n][k])
        md.append(f"| {n} | " + " | ".join((f"**{v:.3f}**" if k == best else f"{v:.3f}")
                                           for k, v in enumerate(by_t[n])) + f" | {TEMPERATURES[best]} |")
    md.append("")
    name = "licence_windows" + (f"_part_{args.part}" if args.part else "")
    write_results(name, rows, "\n".join(md),
                  {"machine": start, "command": cmd, "total_ppl": total, "mean_kl": kl, "mean_entropy": entropy,
                   "buckets": buckets, "temperatures": list(TEMPERATURES), "ppl_by_temperature": by_t})
    print("\n".join(md))


if __name__ == "__main__":
    main()
