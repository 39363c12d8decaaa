"""MiniLM benchmark: lowbit against fp32 and every peer, in ONE run, on the same sentences.

    .venv/bin/python bench/minilm.py [--sentences 256] [--rounds 3] [--quick]

Rows: fp32 sentence-transformers (the reference every cosine is taken against), bf16, torch.ao
``quantize_dynamic`` int8 (the seed FAQ's exact recipe), torchao int8 dynamic / weight-only, ONNX
Runtime fp32 / dynamic int8 (per tensor, per channel), and lowbit's W8A8-dynamic (the default:
the whole encoder as one C call, ``lowbit.kernels.bert_encoder``; and its twin, the torch forward,
compiled and eager), int8 weight-only and int4 g128 weight-only (eager: each is one fused aten
kernel already).

The machine is shared and noisy, so throughput is measured round-robin: every configuration is
timed once per round (batch 1 on the first 64 sentences, batch 32 on all), for ``--rounds``
rounds, and the best round counts. Ratios are to ``fp32`` (batch 32) and ``ort-int8-dynamic`` (batch
1 and 32) of this run.
Tokenization is inside every timed region. Writes ``bench/results/minilm.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_peers as peers  # noqa: E402
from _llm_common import read_bandwidth_gbs  # noqa: E402

import lowbit  # noqa: E402
from lowbit.algorithms.rtn import WeightOnlyConfig  # noqa: E402
from lowbit.analysis.footprint import model_size_bytes  # noqa: E402
from lowbit.config import build_config  # noqa: E402
from lowbit.data import eval_sentences  # noqa: E402
from lowbit.kernels.bert_encoder import fused_encoder  # noqa: E402
from lowbit.kernels.compile import compiled  # noqa: E402
from lowbit.models import load_model  # noqa: E402

log = logging.getLogger("bench.minilm")
RESULTS = Path(__file__).resolve().parent / "results"


def lowbit_encoders(fp32) -> list[tuple[str, object, int, str]]:
    """(config, encode_fn, size_bytes, note) for lowbit's rows."""
    out = []
    w8 = lowbit.quantize(copy.deepcopy(fp32), build_config("w8a8-dynamic"))
    runner, why = fused_encoder(w8)
    out.append(("lowbit-w8a8-dynamic", w8.encode, model_size_bytes(w8),
                "int8 W per-channel + A per-token, SmoothQuant a=0.65, int8 embeddings; "
                + ("whole encoder in one C call (lowbit.kernels.bert_encoder)" if runner else f"torch forward: {why}")))
    torch_view = copy.copy(w8)  # shares every module and weight; only its ``fused`` flag differs
    torch_view.fused = False
    w8c = compiled(torch_view)
    out.append(("lowbit-w8a8-dynamic-compiled", w8c.encode, model_size_bytes(w8),
                "same model, torch forward under torch.compile (the fused encoder's twin)"))
    out.append(("lowbit-w8a8-dynamic-eager", torch_view.encode, model_size_bytes(w8), "same model, torch forward, eager"))
    i8 = lowbit.quantize(copy.deepcopy(fp32), WeightOnlyConfig(bits=8, group_size=0, quantize_embeddings=True))
    out.append(("lowbit-int8-weight-only", i8.encode, model_size_bytes(i8),
                "int8 per-channel + int8 embeddings, bf16 activations (_weight_int8pack_mm), eager"))
    i4 = lowbit.quantize(copy.deepcopy(fp32), WeightOnlyConfig(bits=4, group_size=128, quantize_embeddings=True))
    out.append(("lowbit-int4-g128", i4.encode, model_size_bytes(i4),
                "int4 g128 symmetric + int8 embeddings, bf16 activations (_weight_int4pack_mm), eager"))
    return out


def peer_encoders(st, tmp: Path) -> list[tuple[str, object, int, str]]:
    out = [("fp32", peers.st_encode_fn(st), model_size_bytes(st), "sentence-transformers")]
    bf16 = copy.deepcopy(st).to(torch.bfloat16)
    out.append(("bf16", peers.st_encode_fn(bf16), model_size_bytes(bf16), ""))
    q = peers.torch_ao_dynamic(st)
    out.append(("torch-ao-dynamic-int8", peers.st_encode_fn(q), model_size_bytes(q),
                f"seed FAQ recipe, engine {torch.backends.quantized.engine}"))
    for name, which in (("torchao-int8-dynamic", "dynamic"), ("torchao-int8-weight-only", "weight-only")):
        try:
            t = peers.torchao_quantized(st, which)
            out.append((name, peers.st_encode_fn(t), model_size_bytes(t), ""))
        except Exception as exc:  # torchao missing or incompatible: the row says so
            out.append((name, None, 0, f"skipped: {type(exc).__name__}: {exc}"[:160]))
    fp32_onnx = peers.export_onnx(tmp / "minilm.onnx")
    out.append(("ort-fp32", peers.ort_encode_fn(fp32_onnx, st.tokenizer), os.path.getsize(fp32_onnx), ""))
    for name, pc in (("ort-int8-dynamic", False), ("ort-int8-dynamic-per-channel", True)):
        path = peers.ort_quantize(fp32_onnx, tmp / f"{name}.onnx", per_channel=pc)
        out.append((name, peers.ort_encode_fn(path, st.tokenizer), os.path.getsize(path), ""))
    return out


def measure(configs, sentences, ref, rounds: int, b1_n: int) -> list[dict]:
    rows = {}
    b1 = sentences[:b1_n]
    for name, fn, size, note in configs:
        if fn is None:
            rows[name] = peers.skipped_row(name, note)
            continue
        emb = peers._as_tensor(fn(sentences, 32))  # also the warm-up (and torch.compile's first run)
        fn(b1[:4], 1)
        cos = nn.functional.cosine_similarity(emb, ref, dim=1)  # (N,)
        rows[name] = {"config": name, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                      "size_mb": size / 1e6, "sps_b1": 0.0, "sps_b32": 0.0, "note": note}
        log.info("%s: cos %.5f / %.5f, %.1f MB", name, rows[name]["cos_mean"], rows[name]["cos_min"], size / 1e6)
    for r in range(rounds):
        for name, fn, _, _ in configs:
            if fn is None:
                continue
            t = time.perf_counter()
            fn(sentences, 32)
            sps32 = len(sentences) / (time.perf_counter() - t)
            t = time.perf_counter()
            fn(b1, 1)
            sps1 = len(b1) / (time.perf_counter() - t)
            row = rows[name]
            row["sps_b32"], row["sps_b1"] = max(row["sps_b32"], sps32), max(row["sps_b1"], sps1)
        log.info("round %d/%d done", r + 1, rounds)
    return [rows[name] for name, *_ in configs]


def add_ratios(rows: list[dict]) -> None:
    by = {r["config"]: r for r in rows}
    for r in rows:
        for base, key in (("fp32", "x_fp32"), ("ort-int8-dynamic", "x_ort_int8")):
            b = by.get(base)
            r[key] = (r["sps_b32"] / b["sps_b32"]) if (b and b.get("sps_b32") and r.get("sps_b32")) else None
        b = by.get("ort-int8-dynamic")
        r["x_ort_int8_b1"] = (r["sps_b1"] / b["sps_b1"]) if (b and b.get("sps_b1") and r.get("sps_b1")) else None


def markdown(rows: list[dict], header: str) -> str:
    def f(v, spec):
        return "—" if v is None else format(v, spec)

    lines = [header, "",
             "| config | cos mean | cos min | MB | sent/s b1 | sent/s b32 | b32 × fp32 | b1 × ORT int8 | b32 × ORT int8 | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {f(r['cos_mean'], '.5f')} | {f(r['cos_min'], '.5f')} | "
                     f"{f(r['size_mb'], '.1f')} | {f(r['sps_b1'], '.0f')} | {f(r['sps_b32'], '.0f')} | "
                     f"{f(r.get('x_fp32'), '.2f')} | {f(r.get('x_ort_int8_b1'), '.2f')} | {f(r.get('x_ort_int8'), '.2f')} | "
                     f"{r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def roofline(rows: list[dict], bw_gbs: float, name: str = "lowbit-w8a8-dynamic") -> str:
    """The roofline line: every forward reads the whole model once (weights and int8 tables; activations
    stay in cache), so at batch b one sentence costs size / b bytes and bandwidth * b / size is the
    sentences/s ceiling; the share of it that ``name`` reaches."""
    r = next((r for r in rows if r["config"] == name and r.get("size_mb")), None)
    if r is None:
        return f"**Roofline**: read bandwidth {bw_gbs:.1f} GB/s (torch.sum over 512 MB); no {name} row."
    ceil1 = bw_gbs * 1e3 / r["size_mb"]
    ceil32 = 32 * ceil1
    return (f"**Roofline**: read bandwidth {bw_gbs:.1f} GB/s (torch.sum over 512 MB, measured in this run); {name} "
            f"reads its {r['size_mb']:.1f} MB once per forward, so the bandwidth ceiling is {ceil1:.0f} sentences/s at "
            f"batch 1 (reached: {100 * r['sps_b1'] / ceil1:.0f} %) and {ceil32:.0f} at batch 32 "
            f"({100 * r['sps_b32'] / ceil32:.1f} %: batch 32 is bound by the int8 products, not by memory).")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="MiniLM: lowbit vs fp32 and peers, one run")
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--b1", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="64 sentences, 1 round (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.sentences, args.rounds, args.b1 = 64, 1, 16
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sentences = eval_sentences(args.sentences)
    st = peers.load_sentence_transformer()
    ref = peers.reference_embeddings(sentences, st)
    fp32 = load_model("minilm")
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        configs = peer_encoders(st, Path(tmp)) + lowbit_encoders(fp32)
        rows = measure(configs, sentences, ref, args.rounds, args.b1)
    add_ratios(rows)
    load = os.getloadavg()[0]
    header = (f"# all-MiniLM-L6-v2: lowbit vs peers\n\n{len(sentences)} sentences from lowbit.data.eval_sentences, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.rounds} round-robin "
              f"rounds, 1-min load average at the end {load:.1f}. Command: `python bench/minilm.py`.")
    header += "\n\n" + roofline(rows, read_bandwidth_gbs())
    RESULTS.mkdir(exist_ok=True)
    from lowbit.io.atomic import atomic_write_text

    if not args.quick:
        atomic_write_text(RESULTS / "minilm.json", json.dumps(rows, indent=2))
        atomic_write_text(RESULTS / "minilm.md", markdown(rows, header))
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
