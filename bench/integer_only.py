"""Integer-only inference and ONNX Runtime export, measured on the digits CNN and MiniLM.

    .venv/bin/python bench/integer_only.py                  # digits + MiniLM (64 sentences) + ONNX
    .venv/bin/python bench/integer_only.py --n-eval 256     # MiniLM on the whole evaluation corpus

Digits (450 held-out images): fp32, the static W8A8 fake-quant model the integer pipeline is built
from (BN folded, affine activations, MSE observer), the real int8 static model, the integer-only
pipeline (int8 image codes -> int32 logits, gemmlowp requantization) and its bit-exactness against
the plain reference (64 images); the QDQ ONNX export run by onnxruntime (CPU EP). MiniLM: the
integer-only encoder (I-BERT operators) vs fp32 embeddings (cosine mean / min), built from 128
calibration sentences. Speeds are samples/s measured in this process, reported as ratios to fp32
(``--threads 1`` by default: the shared machine thrashes with two OpenMP threads per process).
Writes ``bench/results/integer_only.md`` and ``.json`` and prints them.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def per_second(fn, n: int, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / sorted(times)[len(times) // 2]


def digits(rows: list[dict]) -> None:
    import onnxruntime as ort

    import lowbit
    from lowbit.algorithms.static import StaticConfig
    from lowbit.integer.cnn import integer_digits_cnn
    from lowbit.io.onnx_export import export_onnx
    from lowbit.models import load_model
    from lowbit.models.digits import digits_data

    fp32 = load_model("digits")
    _, _, x, y = digits_data()

    def acc(logits):
        return 100.0 * float((logits.argmax(1) == y).float().mean())

    with torch.inference_mode():
        ref = fp32(x)
        sps_fp32 = per_second(lambda: fp32(x), len(x))
        rows.append({"model": "digits", "variant": "fp32", "accuracy": acc(ref), "speed_x_fp32": 1.0})
        icnn, fake = integer_digits_cnn(fp32)
        lf = fake(x)
        rows.append({"model": "digits", "variant": "static W8A8 fake-quant (mse, affine)", "accuracy": acc(lf),
                     "speed_x_fp32": per_second(lambda: fake(x), len(x)) / sps_fp32})
        real = lowbit.quantize(copy.deepcopy(fp32), StaticConfig(observer="mse", symmetric=False, smooth_alpha=None))
        lr = real(x)
        rows.append({"model": "digits", "variant": "static W8A8 int8 modules (_int_mm)", "accuracy": acc(lr),
                     "speed_x_fp32": per_second(lambda: real(x), len(x)) / sps_fp32,
                     "max_abs_vs_fake": float((lr - lf).abs().max())})
        li = icnn(x)
        q = icnn.quantize_input(x[:64])
        exact = bool(torch.equal(icnn.forward_int(q), icnn.forward_int_ref(q)))
        rows.append({"model": "digits", "variant": "integer-only (int8 in, int32 logits)", "accuracy": acc(li),
                     "speed_x_fp32": per_second(lambda: icnn(x), len(x)) / sps_fp32,
                     "bit_exact_vs_reference": exact,
                     "argmax_agree_vs_fake": float((li.argmax(1) == lf.argmax(1)).float().mean())})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits.onnx"
        summary = export_onnx(real, path, (x[:2],), input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        lo = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
        rows.append({"model": "digits", "variant": "ONNX Runtime QDQ export", "accuracy": acc(lo),
                     "speed_x_fp32": per_second(lambda: sess.run(None, {"x": x.numpy()}), len(x)) / sps_fp32,
                     "max_abs_vs_lowbit": float((lo - lr).abs().max()), "onnx_kb": summary["bytes"] / 1e3})


def minilm(rows: list[dict], n_eval: int, n_calib: int) -> None:
    from lowbit.data import calib_sentences, eval_sentences
    from lowbit.integer.minilm import IntegerMiniLM
    from lowbit.models import load_model

    fp32 = load_model("minilm")
    sentences = eval_sentences(n_eval)
    ref = fp32.encode(sentences)
    sps_fp32 = per_second(lambda: fp32.encode(sentences[:32]), 32, repeats=1)
    rows.append({"model": "minilm", "variant": "fp32", "cos_mean": 1.0, "cos_min": 1.0, "speed_x_fp32": 1.0})
    start = time.perf_counter()
    im = IntegerMiniLM(fp32, calib_sentences(n_calib))
    build = time.perf_counter() - start
    cos = torch.nn.functional.cosine_similarity(im.encode(sentences), ref, dim=1)
    rows.append({"model": "minilm", "variant": "integer-only (I-BERT ops, int8 matmuls)", "cos_mean": float(cos.mean()),
                 "cos_min": float(cos.min()), "build_s": build,
                 "speed_x_fp32": per_second(lambda: im.encode(sentences[:32]), 32, repeats=1) / sps_fp32})


def to_markdown(rows: list[dict], args) -> str:
    cols = ["model", "variant", "accuracy", "cos_mean", "cos_min", "speed_x_fp32", "bit_exact_vs_reference",
            "argmax_agree_vs_fake", "max_abs_vs_fake", "max_abs_vs_lowbit", "onnx_kb", "build_s"]
    out = ["# Integer-only inference and ONNX Runtime export", "",
           f"Command: `.venv/bin/python bench/integer_only.py --n-eval {args.n_eval}` (threads={args.threads})", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else (f"{v:.5g}" if isinstance(v, float) else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits", "minilm"], choices=["digits", "minilm"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--n-calib", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    if "digits" in args.models:
        digits(rows)
    if "minilm" in args.models:
        minilm(rows, args.n_eval, args.n_calib)
    RESULTS.mkdir(exist_ok=True)
    md = to_markdown(rows, args)
    (RESULTS / "integer_only.md").write_text(md)
    (RESULTS / "integer_only.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
