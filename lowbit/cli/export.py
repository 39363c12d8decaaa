"""`lowbit export DIR --format gguf|onnx|hf --out PATH`: a quantized model for llama.cpp, ONNX Runtime or HF.

- gguf: a quantized causal LM (``--type q4_0|q4_1|q8_0``), ``lowbit.io.gguf_export``.
- hf: a weight-only causal LM as a Hugging Face folder with a compressed-tensors ``quantization_config``
  (``lowbit.io.hf_export``), which transformers and vLLM load.
- onnx: a quantized encoder — a W8A8-dynamic BERT as ORT's fused int8 kernels (``lowbit.io.onnx_bert``), any
  other quantized encoder traced op for op (``lowbit.io.onnx_encoder``) — or a weight-only causal LM with
  MatMulNBits linears (``lowbit.io.onnx_nbits``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowbit.cli._common import clean_errors

FORMATS = ("gguf", "onnx", "hf")


def _load_source(target: str):
    """A saved lowbit folder → lowbit.load; a .gguf file → its import; a model name → the fp32 model."""
    from lowbit.errors import ConfigError, LoadError
    from lowbit.models import MODELS, load_model

    path = Path(target)
    if path.is_dir():
        from lowbit.io.checkpoint import load

        return load(path)
    if path.suffix == ".gguf":
        from lowbit.io.gguf_import import load_gguf

        return load_gguf(path)
    if target in MODELS:
        return load_model(target)
    if not path.exists():
        raise LoadError(f"{target}: no such folder or .gguf file (and not a model name: {', '.join(sorted(MODELS))})")
    raise ConfigError(f"{target!r} is neither a saved lowbit folder, a .gguf file nor a model name")


def register(app: typer.Typer) -> None:
    @app.command("export")
    @clean_errors
    def export_command(
        target: str = typer.Argument(..., metavar="DIR",
                                     help="A saved lowbit model folder (or a .gguf file / model name to convert)."),
        fmt: str = typer.Option("gguf", "--format", help="Output format: gguf | onnx | hf (a compressed-tensors folder)."),
        qtype: str = typer.Option("q4_0", "--type", help="GGUF type of the linear layers: q4_0 | q4_1 | q8_0."),
        out: Path = typer.Option(..., "--out", "-o", help="The file to write (atomically)."),
        embedding_type: str = typer.Option("q8_0", "--embedding-type",
                                           help="token_embd (and the tied head): q8_0 | q4_0 | q4_1 | f16 | f32."),
        tokenizer_from: Optional[Path] = typer.Option(None, "--tokenizer-from",
                                                      help="Copy the tokenizer from this GGUF file "
                                                           "(default: the model's source GGUF, else its HF tokenizer)."),
        tokenizer_pre: str = typer.Option("default", "--tokenizer-pre",
                                          help="llama.cpp pre-tokenizer name when the tokenizer comes from the HF "
                                               "tokenizer (e.g. smollm); ignored with a source GGUF."),
        graph: str = typer.Option("auto", "--graph",
                                  help="onnx, W8A8 encoders: fused (ORT's fused int8 kernels; BERT, mean pooling) | "
                                       "traced (lowbit's per-token arithmetic, any encoder) | auto (fused where it "
                                       "applies)."),
        activations: Optional[str] = typer.Option(None, "--activations",
                                                  help="onnx, W8A8 encoders: traced graph: per-token (default) | "
                                                       "per-tensor; fused graph: rownorm (default: the FFN-down input "
                                                       "scaled per token) | per-tensor."),
        force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    ) -> None:
        """Export a quantized model; layers already on the target grid keep their codes bit for bit."""
        from lowbit.errors import ConfigError

        if fmt not in FORMATS:
            raise ConfigError(f"unknown export format {fmt!r}; this command writes: {', '.join(FORMATS)}")
        if out.exists() and not force:
            raise ConfigError(f"{out} exists (use --force to replace it)")
        if fmt == "onnx":
            _export_onnx(_load_source(target), out, graph, activations, force)
            return
        if fmt == "hf":
            from lowbit.io.hf_export import export_hf

            report = export_hf(_load_source(target), out, overwrite=force)
            typer.echo(f"wrote {out}/ ({report['bytes'] / 1e6:.1f} MB safetensors): {report['quantized_linears']} "
                       f"pack-quantized linears (compressed-tensors), {len(report['float_linears'])} float linears")
            return
        from lowbit.io.gguf_export import export_gguf

        model = _load_source(target)
        report = export_gguf(model, out, qtype, source_gguf=tokenizer_from, embedding_type=embedding_type,
                             tokenizer_pre=tokenizer_pre, overwrite=force)
        hows = {h: report.count(h) for h in ("exact", "exact-codes", "requantized", "quantized", "float")}
        typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {qtype}): "
                   + ", ".join(f"{n} {h}" for h, n in hows.items() if n))


def _export_onnx(model, out: Path, graph: str, activations: str | None, force: bool) -> None:
    """An encoder -> lowbit.io.onnx_bert (fused) or onnx_encoder (traced), then checked in onnxruntime;
    a causal LM -> MatMulNBits."""
    from lowbit.errors import ConfigError

    task = getattr(model, "task", None)
    if task == "encoder":
        from lowbit.data import eval_sentences
        from lowbit.io.onnx_bert import DOWN_MODES, bert_parts, export_bert_onnx
        from lowbit.io.onnx_encoder import ACTIVATIONS, export_encoder_onnx, verify_encoder_onnx

        if graph not in ("auto", "fused", "traced"):
            raise ConfigError(f"--graph must be auto, fused or traced, got {graph!r}")
        if graph == "auto":
            parts, why = bert_parts(model)
            graph = "fused" if parts is not None and activations in (None, *DOWN_MODES) else "traced"
            if graph == "traced" and parts is None:
                typer.echo(f"traced graph (the fused one does not apply: {why})")
        if graph == "fused":
            if activations not in (None, *DOWN_MODES):
                raise ConfigError(f"--activations for the fused graph: {' | '.join(DOWN_MODES)} (ORT has no fused "
                                  f"per-token kernel; --graph traced writes lowbit's per-token codes)")
            report = export_bert_onnx(model, out, down=activations or DOWN_MODES[0], overwrite=force)
            what = (f"fused graph: {report['int8_linears']} int8 linears (per-tensor activations, FFN-down input "
                    f"{report['down']}), QAttention in {report['shared_qkv_layers']} of {report['layers']} layers")
        else:
            if activations not in (None, *ACTIVATIONS):
                raise ConfigError(f"--activations for the traced graph: {' | '.join(ACTIVATIONS)}")
            activations = activations or ACTIVATIONS[0]
            report = export_encoder_onnx(model, out, activations=activations, overwrite=force)
            what = (f"traced graph: {report['int8_linears']} int8 linears ({activations} activations), "
                    f"{report['int4_linears']} MatMulNBits linears")
        check = verify_encoder_onnx(model, out, eval_sentences(16))
        typer.echo(f"wrote {out} ({report['bytes'] / 1e6:.1f} MB): {what}, {report['int8_embeddings']} int8 "
                   f"embedding table(s); onnxruntime vs lowbit on {check['n']} sentences: cosine min "
                   f"{check['cos_min']:.5f}")
    elif task == "causal-lm":
        from lowbit.io.onnx_nbits import export_causal_lm_onnx

        report = export_causal_lm_onnx(model, out, overwrite=force)
        typer.echo(f"wrote {out} ({report['bytes'] / 1e6:.1f} MB): {report['matmulnbits_layers']} MatMulNBits linears")
    else:
        raise ConfigError(f"--format onnx exports encoders and weight-only causal LMs; got {type(model).__name__} "
                          f"(task {task!r}); a static-quantized model exports with lowbit.io.onnx_export.export_onnx")
