"""The PEER rows of the MiniLM benchmark: what others give you for all-MiniLM-L6-v2 on this CPU.

    .venv/bin/python bench/minilm_peers.py [--sentences 256] [--b1 64] [--repeats 3]

Every row encodes the same sentences (``lowbit.data.eval_sentences``) with tokenization inside the
timed region, sorted into length-homogeneous batches the way sentence-transformers does, and is
compared with fp32 sentence-transformers embeddings:

- ``fp32``: sentence-transformers itself (the reference);
- ``bf16``: the same model cast to bfloat16;
- ``torch-ao-dynamic-int8``: ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear},
  dtype=torch.qint8)``, the seed FAQ's recipe, on the x86 (fbgemm) engine;
- ``torchao-int8-dynamic`` / ``torchao-int8-weight-only``: torchao's
  Int8DynamicActivationInt8Weight / Int8WeightOnly configs (skipped with a note if torchao fails);
- ``ort-fp32``, ``ort-int8-dynamic``, ``ort-int8-dynamic-per-channel``: the whole pipeline
  (BERT + mean pooling + normalisation) exported with ``torch.onnx.export(..., dynamo=False)``
  and run by ONNX Runtime, then ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights).

Fields per row: ``config, cos_mean, cos_min, size_mb, sps_b1, sps_b32`` (+ ``note``). Size is
exact storage (lowbit.analysis.footprint) for torch rows and the .onnx file size for ORT rows.
``bench/minilm.py`` imports ``peer_rows`` and ``measure_encoder`` from here and adds lowbit's rows.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.analysis.footprint import model_size_bytes  # noqa: E402
from lowbit.models.minilm import load_minilm, minilm_dir  # noqa: E402

log = logging.getLogger("bench.minilm_peers")

EncodeFn = Callable[[Sequence[str], int], object]  # (sentences, batch_size) -> (N, 384) array/tensor
FIELDS = ("config", "cos_mean", "cos_min", "size_mb", "sps_b1", "sps_b32")


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_encoder(
    encode_fn: EncodeFn,
    sentences: Sequence[str],
    ref_embeddings: torch.Tensor,
    size_bytes: int,
    *,
    config: str = "",
    b1_sentences: int = 64,
    repeats: int = 3,
    note: str = "",
) -> dict:
    """One benchmark row: cosine mean/min vs ref_embeddings, size in MB, sentences/s at batch 1 and 32.

    encode_fn(sentences, batch_size) must tokenize and encode (tokenization is part of the timing).
    Batch 1 is timed on the first `b1_sentences` sentences, batch 32 on all of them; each is the
    median of `repeats` runs after one warm-up.
    """
    sentences = list(sentences)
    emb = _as_tensor(encode_fn(sentences, 32))
    cos = nn.functional.cosine_similarity(emb, _as_tensor(ref_embeddings), dim=1)  # (N,)
    b1 = sentences[:b1_sentences]
    t_b1 = _median_seconds(lambda: encode_fn(b1, 1), repeats)
    t_b32 = _median_seconds(lambda: encode_fn(sentences, 32), repeats)
    row = {
        "config": config,
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "size_mb": size_bytes / 1e6,
        "sps_b1": len(b1) / t_b1,
        "sps_b32": len(sentences) / t_b32,
        "note": note,
    }
    log.info("%s: %s", config, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return row


def skipped_row(config: str, note: str) -> dict:
    """A row for a peer that could not run here, with the reason."""
    return {"config": config, "cos_mean": None, "cos_min": None, "size_mb": None,
            "sps_b1": None, "sps_b32": None, "note": note}


# ------------------------------------------------------------------------- torch-side peers

def load_sentence_transformer():
    """sentence-transformers' own all-MiniLM-L6-v2 from the packaged folder, on CPU, eval mode."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu").eval()


def st_encode_fn(st) -> EncodeFn:
    """encode_fn for a SentenceTransformer (its own tokenization, length sorting and pooling)."""
    def encode(sentences, batch_size):
        with torch.inference_mode():
            return st.encode(list(sentences), batch_size=batch_size, convert_to_tensor=True,
                             show_progress_bar=False).float()
    return encode


def torch_ao_dynamic(st):
    """The seed FAQ's recipe: torch.ao quantize_dynamic on every nn.Linear, qint8, x86/fbgemm engine."""
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(st), {nn.Linear}, dtype=torch.qint8)


def torchao_quantized(st, which: str):
    """A copy of `st` with torchao's Int8DynamicActivationInt8Weight ('dynamic') or Int8WeightOnly config."""
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                      quantize_)

    model = copy.deepcopy(st)
    quantize_(model, Int8DynamicActivationInt8WeightConfig() if which == "dynamic" else Int8WeightOnlyConfig())
    return model


# ------------------------------------------------------------------------------- ORT peers

class _OnnxPipeline(nn.Module):
    """BERT + masked mean pooling + L2 norm as one graph, so ONNX Runtime runs the whole pipeline."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.encoder(input_ids, attention_mask, token_type_ids)


def export_onnx(path: Path) -> Path:
    """Export the fp32 MiniLM pipeline to `path` (dynamic batch and sequence axes, TorchScript exporter)."""
    encoder = load_minilm()
    encoder.bert.config._attn_implementation = "eager"  # a plain-op attention graph for the exporter
    features = encoder.tokenize(["An example sentence to trace the graph.", "Another one."])
    args = (features["input_ids"], features["attention_mask"], features["token_type_ids"])
    dynamic = {0: "batch", 1: "seq"}
    with torch.no_grad():
        torch.onnx.export(
            _OnnxPipeline(encoder).eval(), args, str(path), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["embedding"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "token_type_ids": dynamic,
                          "embedding": {0: "batch"}},
        )
    return path


def ort_quantize(src: Path, dst: Path, per_channel: bool) -> Path:
    """onnxruntime.quantization.quantize_dynamic with int8 weights (per tensor or per channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    return dst


def ort_encode_fn(path: Path, tokenizer, threads: int | None = None) -> EncodeFn:
    """encode_fn running an exported pipeline in ONNX Runtime, tokenizing and batching like sentence-transformers."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def encode(sentences, batch_size):
        sentences = list(sentences)
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out = np.empty((len(sentences), 384), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            feats = tokenizer([sentences[i] for i in idx], padding=True, truncation="longest_first",
                              max_length=256, return_tensors="np")
            inputs = {k: feats[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
            out[idx] = session.run(["embedding"], inputs)[0]
        return out

    return encode


# ------------------------------------------------------------------------------- the table

def reference_embeddings(sentences: Sequence[str], st=None) -> torch.Tensor:
    """fp32 sentence-transformers embeddings (N, 384) of `sentences`: what every row is compared with."""
    st = st or load_sentence_transformer()
    return st_encode_fn(st)(sentences, 32)


def peer_rows(sentences: Sequence[str], *, b1_sentences: int = 64, repeats: int = 3,
              only: Sequence[str] | None = None) -> list[dict]:
    """Build and measure every peer row (or those named in `only`) on `sentences`, in table order."""
    want = (lambda name: only is None or name in only)
    opts = dict(b1_sentences=b1_sentences, repeats=repeats)
    st = load_sentence_transformer()
    ref = reference_embeddings(sentences, st)
    rows = []
    if want("fp32"):
        rows.append(measure_encoder(st_encode_fn(st), sentences, ref, model_size_bytes(st), config="fp32", **opts))
    if want("bf16"):
        bf16 = copy.deepcopy(st).to(torch.bfloat16)
        rows.append(measure_encoder(st_encode_fn(bf16), sentences, ref, model_size_bytes(bf16), config="bf16", **opts))
        del bf16
    if want("torch-ao-dynamic-int8"):
        q = torch_ao_dynamic(st)
        rows.append(measure_encoder(st_encode_fn(q), sentences, ref, model_size_bytes(q),
                                    config="torch-ao-dynamic-int8",
                                    note=f"engine {torch.backends.quantized.engine}", **opts))
        del q
    for name, which in (("torchao-int8-dynamic", "dynamic"), ("torchao-int8-weight-only", "weight-only")):
        if not want(name):
            continue
        try:
            q = torchao_quantized(st, which)
        except Exception as exc:  # torchao missing or incompatible with this torch: a note, not a crash
            rows.append(skipped_row(name, f"skipped: {type(exc).__name__}: {exc}"[:200]))
            continue
        rows.append(measure_encoder(st_encode_fn(q), sentences, ref, model_size_bytes(q), config=name, **opts))
        del q
    ort_names = ("ort-fp32", "ort-int8-dynamic", "ort-int8-dynamic-per-channel")
    if any(want(n) for n in ort_names):
        with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as tmp:
            fp32_path = export_onnx(Path(tmp) / "minilm.onnx")
            paths = {
                "ort-fp32": fp32_path,
                "ort-int8-dynamic": lambda: ort_quantize(fp32_path, Path(tmp) / "int8.onnx", per_channel=False),
                "ort-int8-dynamic-per-channel": lambda: ort_quantize(fp32_path, Path(tmp) / "int8pc.onnx",
                                                                     per_channel=True),
            }
            for name in ort_names:
                if not want(name):
                    continue
                path = paths[name] if isinstance(paths[name], Path) else paths[name]()
                rows.append(measure_encoder(ort_encode_fn(path, st.tokenizer), sentences, ref,
                                            os.path.getsize(path), config=name, **opts))
    return rows


def markdown_table(rows: list[dict], baseline: str = "fp32") -> str:
    """Rows as a markdown table with sentences/s ratios to the `baseline` row."""
    base = next((r for r in rows if r["config"] == baseline and r["sps_b32"]), None)

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    lines = ["| config | cos mean | cos min | MB | sent/s b1 | sent/s b32 | b32 vs fp32 | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['sps_b32'] / base['sps_b32']:.2f}x" if base and r["sps_b32"] else "—")
        lines.append(f"| {r['config']} | {fmt(r['cos_mean'], '.5f')} | {fmt(r['cos_min'], '.5f')} | "
                     f"{fmt(r['size_mb'], '.1f')} | {fmt(r['sps_b1'], '.0f')} | {fmt(r['sps_b32'], '.0f')} | "
                     f"{ratio} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from lowbit.data import eval_sentences

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--b1", type=int, default=64, help="sentences timed at batch size 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # our rows; onnxruntime.quantization logs every skipped node at INFO on root
    rows = peer_rows(eval_sentences(args.sentences), b1_sentences=args.b1, repeats=args.repeats, only=args.only)
    print(f"all-MiniLM-L6-v2 peers, {args.sentences} sentences, torch threads {torch.get_num_threads()}")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
