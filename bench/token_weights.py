"""Issue 18, stop 37: how much each token's error matters, and GPTQ token weightings that were measured and not adopted.

    flock /tmp/lowbit-heavy.lock nice -n 10 .venv/bin/python bench/token_weights.py --sensitivity
    flock /tmp/lowbit-heavy.lock nice -n 10 .venv/bin/python bench/token_weights.py --gptq guided [--power 0.5] [--labels sample --samples 2]
    flock /tmp/lowbit-heavy.lock nice -n 10 .venv/bin/python bench/token_weights.py --gptq clamp --clamp 16
    .venv/bin/python bench/token_weights.py --render                   # -> results/token_weights.md

``--sensitivity``: the fp32 model on calibration windows 0 and 1 of the mix; after decoder layer L the residual of
one token t is moved by ``eps * ||r_t|| * u`` (u a random unit vector, eps 0.02, two draws) and the summed
next-token ``KL(p_fp32 || p_moved)`` over the window is recorded. Token 0 is the attention sink; the others are
ordinary positions. ``1 / ms(r_t)`` weighting (GPTQConfig.residual_weights) assumes equal *relative* errors cost
the same at every token; this measures that.

``--gptq guided``: GPTQ W4 g128 sym (v_proj's plain Hessian, plain tokens otherwise) whose every linear weighs each
token by ``w_t = ||dL/dy_t||^2`` (the loss gradient at that linear's output in the fp32 model, summed over output
channels), normalised to mean 1 and raised to ``--power``: the single-group form of GuidedQuant's end-loss
guidance (Kim et al. 2025, arXiv 2505.07004). ``--labels true``: L = cross-entropy on the calibration text;
``sample``: on labels drawn from the model (the Fisher's expectation, ``--samples`` draws summed). The weights
enter through GPTQ's input hook (``x_t * sqrt(w_t)``), an ablation harness, not a library option.

``--gptq clamp``: GPTQ W4 with v_proj's attention-mixed Hessian and the residual writers' token weights with the
discount capped: ``1 / min(ms(r_t), c * median_t ms(r_t))`` in place of ``1 / ms(r_t)``, so a massive-activation
token is discounted at most c times more than the window's median token.

Both GPTQ rows score windows 99..106 of the mix (never fitted), as bench/w4_heldout.py; compare with its rows
(GPTQ W4: plain 0.393, attention-mixed v_proj 0.245, + residual weights 0.250).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import RESULTS, Timer, machine, quiet, write_results  # noqa: E402

HELD_OUT = range(99, 107)
N_CALIB = 16
EPS = 0.02
LAYERS = (3, 11, 20, 28)
TOKENS = (0, 1, 5, 30, 100, 200, 300, 400, 500)


def sensitivity(fp, windows: list[torch.Tensor]) -> list[dict]:
    """Per window and layer: summed KL after moving one token's residual by EPS of its norm (mean of two draws)."""
    layers = fp.lm.model.layers
    gen = torch.Generator().manual_seed(0)
    rows = []

    def logp(ids, hook=None, at=None):
        handle = layers[at].register_forward_hook(hook) if hook is not None else None
        try:
            with torch.no_grad():
                return fp(ids).float().log_softmax(-1)
        finally:
            if handle is not None:
                handle.remove()

    for w_idx, w in enumerate(windows):
        ids = w.view(1, -1)
        base = logp(ids)
        for at in LAYERS:
            kl, rms = {}, {}
            for t in TOKENS:
                draws = []
                for _ in range(2):
                    u = torch.randn(fp.lm.config.hidden_size, generator=gen)
                    u = u / u.norm()

                    def hook(mod, args, out, t=t, u=u):
                        x = out[0] if isinstance(out, tuple) else out
                        x = x.clone()
                        rms[t] = float(x[0, t].pow(2).mean().sqrt())
                        x[0, t] = x[0, t] + EPS * x[0, t].norm() * u
                        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x

                    moved = logp(ids, hook, at)
                    draws.append(float((base.exp() * (base - moved)).sum()))
                kl[t] = sum(draws) / len(draws)
            ordinary = [kl[t] for t in TOKENS if t != 0]
            rms_ord = sorted(rms[t] for t in TOKENS if t != 0)
            rows.append({"kind": "sensitivity", "window": w_idx, "layer": at, "kl_sink": kl[0],
                         "kl_ordinary_mean": sum(ordinary) / len(ordinary), "rms_sink": rms[0],
                         "rms_ordinary_median": rms_ord[len(rms_ord) // 2], "kl": {str(t): kl[t] for t in TOKENS}})
            print(rows[-1], flush=True)
    return rows


def gradient_weights(fp, windows: list[torch.Tensor], labels: str, samples: int, power: float) -> dict:
    """``{layer-relative linear name: [(T,) weights per window]}``: ``||dL/dy_t||^2`` at each decoder linear's output."""
    acc: dict[str, list] = collections.defaultdict(list)
    lin = {n: m for n, m in fp.lm.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    def record(name: str):
        def hook(mod, args, out) -> None:  # returns None: the output stays the module's
            out.register_hook(lambda g: acc[name].append(g[0].float().pow(2).sum(-1)))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in lin.items()]
    handles.append(fp.lm.model.embed_tokens.register_forward_hook(lambda m, a, o: o.requires_grad_()))
    gen = torch.Generator().manual_seed(0)
    try:
        for w in windows:
            ids = w.view(1, -1)
            for _ in range(samples if labels == "sample" else 1):
                logits = fp(ids)[0, :-1].float()  # (T-1, V)
                y = ids[0, 1:] if labels == "true" else torch.multinomial(logits.detach().softmax(-1), 1, generator=gen)[:, 0]
                torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    per = samples if labels == "sample" else 1
    out = {}
    for n, gs in acc.items():
        v = torch.stack([sum(gs[i:i + per]) for i in range(0, len(gs), per)])  # (windows, T)
        out[n] = list((v / v.mean()).pow(power))
    return out


@contextlib.contextmanager
def weighted_gptq_inputs(weights: dict):
    """GPTQ's input hook sees ``x_t * sqrt(w_t)`` for every linear in ``weights`` (windows in calibration order)."""
    import lowbit.algorithms.gptq as gptq_module

    original = gptq_module.capture_inputs
    seen: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def capture(modules, fn):
        def weighted(name, x):
            key = name.split("layers.", 1)[-1]
            if key in weights:
                w = weights[key][seen[key] % N_CALIB]
                seen[key] += 1
                x = x.float() * w.sqrt().view(1, -1, 1)
            fn(name, x)

        with original(modules, weighted):
            yield

    gptq_module.capture_inputs = capture
    try:
        yield
    finally:
        gptq_module.capture_inputs = original


@contextlib.contextmanager
def capped_residual_discount(c: float):
    """``1 / min(ms(r_t), c * median_t ms(r_t))`` in place of residual_hessian.inverse_rms's ``1 / ms(r_t)``."""
    import lowbit.algorithms.residual_hessian as rh

    original = rh.inverse_rms

    def capped(r):
        ms = r.detach().float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12)  # (B, T, 1)
        return torch.rsqrt(torch.minimum(ms, c * ms.median(dim=-2, keepdim=True).values))

    rh.inverse_rms = capped
    try:
        yield
    finally:
        rh.inverse_rms = original


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sensitivity", action="store_true")
    ap.add_argument("--gptq", choices=("guided", "clamp"))
    ap.add_argument("--power", type=float, default=1.0)
    ap.add_argument("--labels", choices=("true", "sample"), default="true")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--clamp", type=float, default=16.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    path = RESULTS / "token_weights.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    if not args.render:
        quiet()
        torch.set_num_threads(args.threads)
        import lowbit
        from lowbit.algorithms._calib import default_calibration
        from lowbit.algorithms.gptq import GPTQConfig
        from lowbit.analysis.evaluate import lm_scores
        from lowbit.data import lm_calib_composition
        from lowbit.models import load_model

        fp = load_model("smollm2").eval()
        wins = default_calibration(fp, max(HELD_OUT) + 1)
        mix = lm_calib_composition()["sha256"][:12]
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1]
        if args.sensitivity:
            rows = [r for r in rows if r["kind"] != "sensitivity"] + [
                {**r, "mix": mix} for r in sensitivity(fp, wins[:2])]
        if args.gptq:
            model = copy.deepcopy(fp)
            if args.gptq == "guided":
                weights = gradient_weights(fp, wins[:N_CALIB], args.labels, args.samples, args.power)
                setting = f"guided, labels {args.labels} x{args.samples}, power {args.power}"
                ctx, cfg = weighted_gptq_inputs(weights), GPTQConfig(bits=4, group_size=128, n_calib=N_CALIB)
            else:
                setting = f"attention-mixed v_proj + residual weights, discount capped at {args.clamp:g}x the median"
                ctx = capped_residual_discount(args.clamp)
                cfg = GPTQConfig(bits=4, group_size=128, n_calib=N_CALIB, attention_hessian=True, residual_weights=True)
            with ctx, Timer() as t:
                lowbit.quantize(model, cfg)
            s = lm_scores(model, fp, torch.cat(wins[HELD_OUT.start:HELD_OUT.stop]))
            rows = [r for r in rows if r.get("setting") != setting] + [
                {"kind": "gptq", "setting": setting, "mix": mix, "ppl": s["ppl"], "kl": s["kl"],
                 "quant_wall_s": t.wall, "load": load}]
            print(rows[-1], flush=True)
    sens = [r for r in rows if r["kind"] == "sensitivity"]
    md = ["# Token weights in GPTQ's Hessian (issue 18, stop 37)", "",
          "## How much a relative error costs at the sink and at ordinary tokens", "",
          f"Residual after decoder layer L moved at one token by {EPS} of its norm (random direction, two draws), summed "
          "next-token KL(fp32 || moved) over the 512-token window; calibration windows 0 and 1 of the mix. `ratio`: "
          "sink / mean of the ordinary positions " + ", ".join(str(t) for t in TOKENS[1:]) + ".", "",
          "| window | layer | KL, sink | KL, ordinary (mean) | ratio | rms sink | rms ordinary (median) | "
          "ratio / (rms ratio)^2 |", "|---|---|---|---|---|---|---|---|"]
    for r in sens:
        ratio = r["kl_sink"] / r["kl_ordinary_mean"]
        ms_ratio = (r["rms_sink"] / r["rms_ordinary_median"]) ** 2
        md.append(f"| {r['window']} | {r['layer']} | {r['kl_sink']:.4g} | {r['kl_ordinary_mean']:.4g} | {ratio:.3g} | "
                  f"{r['rms_sink']:.4g} | {r['rms_ordinary_median']:.4g} | {ratio / ms_ratio:.3g} |")
    md += ["", "The last column is the sink's cost per unit of *absolute* error against an ordinary token's: what the "
           "plain Hessian takes as 1, the residual writers' `1 / ms(r)` weighting as 1 / (rms ratio)^2 (it takes the `ratio` "
           "column as 1).", "",
           "## GPTQ W4 g128 sym with other token weights (held-out calibration windows 99..106)", "",
           "| setting | ppl | KL | quantize wall s | load |", "|---|---|---|---|---|"]
    md += [f"| {r['setting']} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['quant_wall_s']:.0f} | {r['load']} |"
           for r in rows if r["kind"] == "gptq"]
    write_results("token_weights", rows, "\n".join(md) + "\n", {"machine": machine()})
    print("\n".join(md))


if __name__ == "__main__":
    main()
