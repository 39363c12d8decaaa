"""`lowbit export DIR --format gguf --type q4_0|q4_1|q8_0 --out FILE.gguf`: a quantized causal LM for llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowbit.cli._common import clean_errors

FORMATS = ("gguf",)


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
        fmt: str = typer.Option("gguf", "--format", help="Output format: gguf."),
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
        force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    ) -> None:
        """Export a quantized causal LM; layers already on the target grid keep their codes bit for bit."""
        from lowbit.errors import ConfigError

        if fmt not in FORMATS:
            raise ConfigError(f"unknown export format {fmt!r}; this command writes: {', '.join(FORMATS)}")
        from lowbit.io.gguf_export import export_gguf

        model = _load_source(target)
        report = export_gguf(model, out, qtype, source_gguf=tokenizer_from, embedding_type=embedding_type,
                             tokenizer_pre=tokenizer_pre, overwrite=force)
        hows = {h: report.count(h) for h in ("exact", "exact-codes", "requantized", "quantized", "float")}
        typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {qtype}): "
                   + ", ".join(f"{n} {h}" for h, n in hows.items() if n))
