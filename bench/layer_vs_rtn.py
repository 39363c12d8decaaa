"""Issue 18's "no method worse than RTN on any text **or any layer**": every decoder block of SmolLM2 scored
for each scheme against RTN on the same grid, on each of the three evaluation texts.

    flock /tmp/lowbit-heavy.lock nice -n 10 .venv/bin/python bench/layer_vs_rtn.py [--only awq,hqq] [--quick]

A *block* is one half of a decoder layer: attention (``input_layernorm`` .. ``o_proj``) or MLP
(``post_attention_layernorm`` .. ``down_proj``); SmolLM2 has 30 layers, 60 blocks. Blocks, not single
linears, because every scheme's changes stay inside one: AWQ folds its channel scales into the norms and
into ``v_proj`` / ``up_proj``, SINQ keeps a column scale per linear, QuaRot rotates the residual stream
(``h -> h Q``, ``Q = random_hadamard(576, seed)``, undone here) and adds a Hadamard before ``down_proj``;
what a block adds to the residual stream is comparable across all of them. Two errors per block, each a
token mean of relative squared errors over every window of a text (so the attention sink's ~1e4-sized
residual weighs as one token):

- **local**: the block run on the fp32 model's own input, against the fp32 block's output
  ``mean_t ||f_q(h_t) - f(h_t)||^2 / ||f(h_t)||^2`` (the per-layer error GPTQ's guard judges, on
  evaluation text instead of held-out calibration windows);
- **stream**: the residual stream after the block in the quantized model's own forward
  ``mean_t ||h^q_t - h_t||^2 / ||h_t||^2`` (what the layers have added up to by then);
- **linear** (schemes whose changes stay inside each linear: RTN, GPTQ / GPTAQ, HQQ, SINQ's column scales):
  every one of the 210 decoder linears on the fp32 model's input to it, against the fp32 linear's output.
  AWQ's scales and QuaRot's rotations span several linears, so for them only blocks are compared.

A scheme is *worse than RTN at a block* when its error there exceeds RTN's (same bits, group size and
symmetry; decoder linears only). GPTAQ-style rounding (``gptaq``, ``awq-gptaq``, ``gptaq-rot``) fits each
linear to the fp32 outputs from the *quantized* inputs, so it may trade local error for stream error by
design: the stream column is its judge. The RTN-fallback guard (``--guard``) keeps q_proj / k_proj by their pair's
attention output (stop 38), so a single q or k may err more than RTN's by design: the attention block is its judge. Schemes are built by ``lowbit.config.build_config`` exactly as
``lowbit quantize --scheme NAME`` builds them (built-in calibration mix, each scheme's defaults).
Writes bench/results/layer_vs_rtn.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import machine, quiet, rtn_decoder, write_results  # noqa: E402

# (row name, scheme, options for build_config, baseline RTN row); RTN rows have scheme None (bench's rtn_decoder:
# decoder linears only, the same group-size policy as every scheme)
W4 = dict(bits=4, group_size=128)
ROWS = [
    ("RTN W4 g128 sym", None, dict(W4, symmetric=True), None),
    ("GPTQ W4 g128 sym", "gptq", dict(W4, symmetric=True, attention_hessian=False, residual_weights=False), "RTN W4 g128 sym"),
    ("GPTAQ+guard W4 g128 sym (gptaq --plain-hessian)", "gptaq", dict(W4, symmetric=True, attention_hessian=False, residual_weights=False), "RTN W4 g128 sym"),
    ("AWQ W4 g128 sym (awq --symmetric)", "awq", dict(W4, symmetric=True), "RTN W4 g128 sym"),
    ("AWQ+GPTAQ-MSE W4 g128 sym (awq-gptaq --plain-hessian)", "awq-gptaq", dict(W4, symmetric=True, attention_hessian=False),
     "RTN W4 g128 sym"),
    ("GPTAQ-MSE-rot W4 g128 sym (gptaq-rot --plain-hessian)", "gptaq-rot", dict(W4, symmetric=True, attention_hessian=False, residual_weights=False),
     "RTN W4 g128 sym"),
    ("HQQ W4 g128 sym (hqq --symmetric)", "hqq", dict(W4, symmetric=True), "RTN W4 g128 sym"),
    ("SINQ W4 g128 sym (sinq --symmetric)", "sinq", dict(W4, symmetric=True), "RTN W4 g128 sym"),
    ("RTN W4 g128 affine", None, dict(W4, symmetric=False), None),
    ("GPTQ W4 g128 affine", "gptq", dict(W4, symmetric=False, attention_hessian=False, residual_weights=False), "RTN W4 g128 affine"),
    ("AWQ W4 g128 affine (awq)", "awq", dict(W4, symmetric=False), "RTN W4 g128 affine"),
    ("AWQ+HQQ W4 g128 affine (awq-hqq)", "awq-hqq", dict(W4, symmetric=False), "RTN W4 g128 affine"),
    ("HQQ W4 g128 affine (hqq)", "hqq", dict(W4, symmetric=False), "RTN W4 g128 affine"),
    ("HQQ+SINQ W4 g128 affine (hqq-sinq)", "hqq-sinq", dict(W4, symmetric=False), "RTN W4 g128 affine"),
    ("RTN W3 g128 affine", None, dict(bits=3, group_size=128, symmetric=False), None),
    ("SINQ W3 g128 affine (sinq --bits 3)", "sinq", dict(bits=3, group_size=128, symmetric=False),
     "RTN W3 g128 affine"),
    ("HQQ+SINQ W3 g128 affine (hqq-sinq --bits 3)", "hqq-sinq", dict(bits=3, group_size=128, symmetric=False),
     "RTN W3 g128 affine"),
    # v_proj's Hessian of attention-mixed inputs (stop 35: the GPTQ-family schemes' default since; the GPTQ-family
    # rows above were measured before it and now pass attention_hessian=False, the CLI's --plain-hessian)
    ("GPTQ+attnH W4 g128 sym (gptq --plain-tokens)", "gptq", dict(W4, symmetric=True, attention_hessian=True,
         residual_weights=False),
     "RTN W4 g128 sym"),
    ("GPTAQ+guard+attnH W4 g128 sym (gptaq --plain-tokens)", "gptaq", dict(W4, symmetric=True, attention_hessian=True,
         residual_weights=False),
     "RTN W4 g128 sym"),
    ("AWQ+GPTAQ-MSE+attnH W4 g128 sym (awq-gptaq --plain-tokens)", "awq-gptaq", dict(W4, symmetric=True,
                                                                                attention_hessian=True,
                                                                                residual_weights=False),
     "RTN W4 g128 sym"),
    ("GPTAQ-MSE-rot+attnH W4 g128 sym (gptaq-rot --plain-tokens)", "gptaq-rot", dict(W4, symmetric=True, attention_hessian=True,
         residual_weights=False),
     "RTN W4 g128 sym"),
    ("GPTQ+attnH W4 g128 affine (gptq --affine --plain-tokens)", "gptq", dict(W4, symmetric=False, attention_hessian=True,
         residual_weights=False),
     "RTN W4 g128 affine"),
    # o_proj / down_proj tokens weighted by 1 / rms of the residual after their add (stop 36: the GPTQ-family schemes'
    # default since; the rows above pass residual_weights=False, the CLI's --plain-tokens; residual_hessian.py)
    ("GPTQ+attnH+resW W4 g128 sym (gptq --residual-weights)", "gptq",
     dict(W4, symmetric=True, attention_hessian=True, residual_weights=True), "RTN W4 g128 sym"),
    ("GPTAQ+guard+attnH+resW W4 g128 sym (gptaq --residual-weights)", "gptaq",
     dict(W4, symmetric=True, attention_hessian=True, residual_weights=True), "RTN W4 g128 sym"),
    ("GPTAQ-MSE-rot+attnH+resW W4 g128 sym (gptaq-rot)", "gptaq-rot",
     dict(W4, symmetric=True, attention_hessian=True, residual_weights=True), "RTN W4 g128 sym"),
    ("GPTQ+attnH+resW W4 g128 affine (gptq --affine)", "gptq",
     dict(W4, symmetric=False, attention_hessian=True, residual_weights=True), "RTN W4 g128 affine"),
    ("AWQ+GPTAQ-MSE+attnH+resW W4 g128 sym (awq-gptaq)", "awq-gptaq",
     dict(W4, symmetric=True, attention_hessian=True, residual_weights=True), "RTN W4 g128 sym"),
    # GPTQ on SINQ's normalised weights as the CLI builds it since stop 36 (both GPTQ options on)
    ("GPTQ+SINQ+attnH+resW W4 g128 sym (gptq-sinq)", "gptq-sinq", dict(W4, symmetric=True), "RTN W4 g128 sym"),
    ("GPTQ+SINQ+attnH+resW W4 g128 affine (gptq-sinq --affine)", "gptq-sinq", dict(W4, symmetric=False),
     "RTN W4 g128 affine"),
    # AWQ's GPTQ / GPTAQ schemes with and without the q/k/v scale search (stop 38; AWQConfig.attention_scales)
    ("AWQ+GPTQ+attnH W4 g128 sym (awq-gptq --attention-scales)", "awq-gptq",
     dict(W4, symmetric=True, attention_scales=True), "RTN W4 g128 sym"),
    ("AWQ+GPTQ+attnH, no q/k/v scales W4 g128 sym (awq-gptq --no-attention-scales)", "awq-gptq",
     dict(W4, symmetric=True, attention_scales=False), "RTN W4 g128 sym"),
    ("AWQ+GPTAQ-MSE+attnH+resW, no q/k/v scales W4 g128 sym (awq-gptaq --no-attention-scales)", "awq-gptaq",
     dict(W4, symmetric=True, attention_scales=False), "RTN W4 g128 sym"),
    # the RTN-fallback guard (--guard; lowbit.algorithms.rtn_guard), judged on the mix's first 4 windows
    ("HQQ+guard W4 g128 sym (hqq --symmetric --guard)", "hqq", dict(W4, symmetric=True, guard=True),
     "RTN W4 g128 sym"),
    ("SINQ+guard W4 g128 sym (sinq --symmetric --guard)", "sinq", dict(W4, symmetric=True, guard=True),
     "RTN W4 g128 sym"),
    ("HQQ+guard W4 g128 affine (hqq --guard)", "hqq", dict(W4, symmetric=False, guard=True), "RTN W4 g128 affine"),
    ("HQQ+SINQ+guard W4 g128 affine (hqq-sinq --guard)", "hqq-sinq", dict(W4, symmetric=False, guard=True),
     "RTN W4 g128 affine"),
    ("SINQ+guard W3 g128 affine (sinq --bits 3 --guard)", "sinq", dict(bits=3, group_size=128, symmetric=False,
                                                                      guard=True), "RTN W3 g128 affine"),
    ("HQQ+SINQ+guard W3 g128 affine (hqq-sinq --bits 3 --guard)", "hqq-sinq",
     dict(bits=3, group_size=128, symmetric=False, guard=True), "RTN W3 g128 affine"),
]
TEXTS = (("held-out docs", "lm_heldout_text", 16), ("licence", "lm_eval_text", None),
         ("science", "lm_science_text", None))
SPANNING = ("awq", "awq-gptq", "awq-gptaq", "awq-hqq", "gptaq-rot")  # schemes whose transforms span linears: no "linear" measure
MEASURES = ("local", "stream", "linear")


def build(fp, scheme: str | None, options: dict):
    """The quantized copy of ``fp`` that ``lowbit quantize --scheme`` would make (RTN: decoder linears only)."""
    import lowbit
    from lowbit.config import build_config

    model = copy.deepcopy(fp)
    if scheme is None:
        return rtn_decoder(model, **options)
    lowbit.quantize(model, build_config(scheme, dict(options)))
    return model


def residual_basis(model) -> torch.Tensor | None:
    """QuaRot's residual rotation ``Q`` (the model's stream is ``h Q``), or None for an unrotated model."""
    from lowbit.core.hadamard import random_hadamard

    info = getattr(model, "lowbit_rotation", None)
    if not info:
        return None
    return random_hadamard(info["hidden"], info["seed"], torch.float32)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token relative squared error ``||x - ref||^2 / ||ref||^2`` (tokens on the leading dims)."""
    return ((x - ref) ** 2).sum(-1) / (ref ** 2).sum(-1).clamp_min(1e-30)


class Trace:
    """Hooks that record, per decoder layer, the block inputs / outputs of one forward (see module doc)."""

    def __init__(self, layers, keep_inputs: bool):
        from lowbit.algorithms._llm import layer_linears

        self.data: dict[tuple[str, int], torch.Tensor] = {}
        self.hooks = []
        for i, layer in enumerate(layers):
            if keep_inputs:
                for name, lin in layer_linears(layer).items():
                    self.hooks.append(lin.register_forward_pre_hook(self._save_in(name.split(".")[-1], i)))
                self.hooks.append(layer.register_forward_pre_hook(self._layer_in(i), with_kwargs=True))
                self.hooks.append(layer.self_attn.register_forward_hook(self._save("attn_out", i, first=True)))
                self.hooks.append(layer.mlp.register_forward_hook(self._save("mlp_out", i)))
            self.hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(self._save_in("mid", i)))
            self.hooks.append(layer.register_forward_hook(self._save("out", i)))

    def _layer_in(self, i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.data["in", i] = h.detach()
            self.data["kwargs", i] = {k: kwargs[k] for k in ("attention_mask", "position_ids", "position_embeddings")
                                      if k in kwargs}
        return hook

    def _save_in(self, key, i):
        def hook(module, args):
            self.data[key, i] = args[0].detach()
        return hook

    def _save(self, key, i, first=False):
        def hook(module, args, out):
            out = out[0] if first or isinstance(out, tuple) else out
            self.data[key, i] = out.detach()
        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


def score_window(fp, models: dict, ids: torch.Tensor, sums: dict) -> None:
    """Add one window's per-token errors (local, stream and linear) of every model to ``sums``."""
    from lowbit.algorithms._llm import decoder_layers, layer_linears

    layers = decoder_layers(fp)
    trace = Trace(layers, keep_inputs=True)
    fp(ids)
    trace.close()
    ref = trace.data
    linear_out = {}  # (short name, layer) -> the fp32 linear's output on its own input
    for name, (model, q, per_linear) in models.items():
        acc = sums.setdefault(name, {})
        for i, layer in enumerate(decoder_layers(model) if per_linear else ()):
            for full, lin in layer_linears(layers[i]).items():  # the fp32 layer names them (quantized: not nn.Linear)
                key = full.split(".")[-1], i
                if key not in linear_out:
                    linear_out[key] = lin(ref[key])
                err = float(_rel(layer.get_submodule(full)(ref[key]), linear_out[key]).double().sum())
                acc["linear", key[0], i] = acc.get(("linear", key[0], i), 0.0) + err
        qlayers = decoder_layers(model)
        rot = (lambda h: h) if q is None else (lambda h: h @ q)
        back = (lambda h: h) if q is None else (lambda h: h @ q.T)
        for i, layer in enumerate(qlayers):  # local: each block on fp32's input
            attn = layer.self_attn(hidden_states=layer.input_layernorm(rot(ref["in", i])), **ref["kwargs", i])[0]
            mlp = layer.mlp(layer.post_attention_layernorm(rot(ref["mid", i])))
            for kind, got, want in (("attn", attn, ref["attn_out", i]), ("mlp", mlp, ref["mlp_out", i])):
                acc["local", kind, i] = acc.get(("local", kind, i), 0.0) + float(_rel(back(got), want).double().sum())
        trace_q = Trace(qlayers, keep_inputs=False)  # stream: the model's own forward
        model(ids)
        trace_q.close()
        for i in range(len(qlayers)):
            for kind, key in (("attn", "mid"), ("mlp", "out")):
                err = _rel(back(trace_q.data[key, i]), ref[key, i])
                acc["stream", kind, i] = acc.get(("stream", kind, i), 0.0) + float(err.double().sum())
        acc["tokens"] = acc.get("tokens", 0) + ids.numel()


def summarise(per_text: dict, rows: list) -> list[dict]:
    """Per scheme, text and measure: blocks (linears) worse than its RTN, the worst ratio and where, the geometric
    mean ratio; ``per_text[text][name][(measure, kind, layer)]`` are token means."""
    import math

    out = []
    for name, scheme, options, base in rows:
        if base is None:
            continue
        rec = {"name": name, "scheme": scheme, "options": options, "baseline": base, "texts": {}}
        for text, errs in per_text.items():
            mine, theirs = errs[name], errs[base]
            t = {}
            for measure in MEASURES:
                ratios = {f"{kind}{i}": mine[measure, kind, i] / theirs[measure, kind, i]
                          for (m, kind, i) in mine if m == measure}
                if not ratios:
                    continue
                worst = max(ratios, key=ratios.get)
                t[measure] = {"worse": sorted(k for k, r in ratios.items() if r > 1.0), "n_blocks": len(ratios),
                              "worst": worst, "worst_ratio": ratios[worst],
                              "geomean_ratio": math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios)),
                              "last_ratio": ratios.get(f"mlp{max(i for (_, _, i) in theirs)}")}
            rec["texts"][text] = t
        out.append(rec)
    return out


def _layer_order(names: list[str]) -> list[str]:
    """Block / linear names ("attn3", "q_proj12") by layer, then name."""
    import re

    return sorted(names, key=lambda n: (int(re.search(r"\d+$", n).group()), n))


def render(summary: list[dict], meta: dict) -> str:
    texts = [t for t, _, _ in TEXTS]
    md = ["# Every decoder block against RTN on the same grid (SmolLM2, issue 18's \"or any layer\")", "",
          f"`{meta['command']}`; load {meta['load_start']} at the start, {meta['load_end']} at the end; "
          f"calibration mix {meta['mix']}; windows per text: {meta['windows']}. 60 blocks (30 layers x attention / "
          "MLP), 210 linears. **local**: each block on the fp32 model's input; **stream**: the residual stream after "
          "each block in the scheme's own forward; **linear**: each decoder linear on the fp32 model's input to it "
          "(schemes whose transforms stay inside a linear); all token means of relative squared error "
          "(bench/layer_vs_rtn.py's doc). Cells: blocks (linears) worse than RTN / geometric-mean ratio to RTN / "
          "worst block (linear) and its ratio.", ""]
    for measure in MEASURES:
        md += [f"## {measure}", "", "| scheme | vs | " + " | ".join(texts) + " |",
               "|---|---|" + "---|" * len(texts)]
        for rec in summary:
            cells = []
            if measure not in rec["texts"][texts[0]]:
                continue
            for text in texts:
                s = rec["texts"][text][measure]
                cells.append(f"{len(s['worse'])} / {s['geomean_ratio']:.2f} / {s['worst']} {s['worst_ratio']:.2f}")
            md.append(f"| {rec['name']} | {rec['baseline']} | " + " | ".join(cells) + " |")
        md.append("")
    md += ["Where a scheme is worse than RTN (local blocks; stream blocks; linears), when it is anywhere:", ""]
    for rec in summary:
        parts = []
        for text in texts:
            s = rec["texts"][text]
            names = [", ".join(_layer_order(s[m]["worse"])) or "-" for m in MEASURES if m in s]
            if any(n != "-" for n in names):
                parts.append(f"{text}: " + "; ".join(names))
        md.append(f"- {rec['name']}: " + (" | ".join(parts) if parts else "nowhere"))
    return "\n".join(md) + "\n"


def main() -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated substrings of scheme rows (their RTN rows are added)")
    ap.add_argument("--quick", action="store_true", help="2 windows per text (a smoke run, not a result)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", default="", help="write results/layer_vs_rtn_part_<PART>.* (rows run separately)")
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    from lowbit.analysis.evaluate import lm_windows
    from lowbit.data import lm_calib_composition
    from lowbit.models import load_model
    import lowbit.data as data

    wanted = [s for s in args.only.split(",") if s]
    rows = [r for r in ROWS if r[3] is not None and (not wanted or any(w in r[0] for w in wanted))]
    bases = {r[3] for r in rows}
    rows = [r for r in ROWS if r[0] in bases] + rows
    load_start = [round(x, 2) for x in os.getloadavg()]
    fp = load_model("smollm2")
    fp.eval()
    windows = {text: lm_windows(fp.tokenizer, getattr(data, fn)(), max_windows=2 if args.quick else n)
               for text, fn, n in TEXTS}
    models, seconds = {}, {}
    for name, scheme, options, _ in rows:
        t0 = time.perf_counter()
        model = build(fp, scheme, options).eval()
        seconds[name] = round(time.perf_counter() - t0, 1)
        models[name] = (model, residual_basis(model), scheme not in SPANNING)
        print(f"built {name} in {seconds[name]} s", flush=True)
    per_text = {}
    with torch.inference_mode():
        for text, ids in windows.items():
            sums = {}
            for w in range(ids.shape[0]):
                score_window(fp, models, ids[w:w + 1], sums)
            per_text[text] = {name: {k: v / acc["tokens"] for k, v in acc.items() if k != "tokens"}
                              for name, acc in sums.items()}
            print(f"scored {text}: {ids.shape[0]} windows", flush=True)
    summary = summarise(per_text, rows)
    meta = {"command": "bench/layer_vs_rtn.py" + (f" --only \"{args.only}\"" if args.only else "")
                       + (f" --part {args.part}" if args.part else "")
                       + (" --quick" if args.quick else ""),
            "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()],
            "mix": lm_calib_composition()["sha256"][:12], "windows": {t: int(i.shape[0]) for t, i in windows.items()},
            "build_seconds": seconds, "machine": machine()}
    blocks = {text: {name: {f"{m}/{k}{i}": v for (m, k, i), v in errs.items()} for name, errs in per.items()}
              for text, per in per_text.items()}
    md = render(summary, meta)
    out = "layer_vs_rtn" + (f"_part_{args.part}" if args.part else "") + ("_quick" if args.quick else "")
    write_results(out, summary, md, {**meta, "blocks": blocks})
    print(md)


if __name__ == "__main__":
    main()
