"""`lowbit generate MODEL --prompt TEXT`: text from a causal LM through lowbit's fast decoder."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from lowbit.cli._common import clean_errors


def register(app: typer.Typer) -> None:
    @app.command("generate")
    @clean_errors
    def generate_command(
        target: str = typer.Argument(..., metavar="MODEL",
                                     help="A saved lowbit folder, a .gguf file, an HF folder or a model name."),
        prompt: str = typer.Option(..., "--prompt", "-p", help="The text to continue."),
        max_tokens: int = typer.Option(128, "--max-tokens", help="New tokens to generate (stops early at EOS)."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling."),
        activations: str = typer.Option("fp32", "--activations",
                                        help="fp32 (exact weight-only math) | int8 (W4A8 per block of 32: faster)"),
        stats: bool = typer.Option(False, "--stats", help="Print prefill seconds and decode tokens/s on stderr."),
    ) -> None:
        """Stream a continuation of --prompt to stdout (Llama, Mistral and Qwen2 layouts)."""
        import time

        import torch

        from lowbit.errors import ConfigError
        from lowbit.io.open import open_model
        from lowbit.models.decode import Decoder

        if max_tokens < 1:
            raise ConfigError(f"--max-tokens must be >= 1, got {max_tokens}")
        model = open_model(target)
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ConfigError(f"{target}: the model has no tokenizer to encode the prompt with")
        ids = tok(prompt, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise ConfigError("--prompt encodes to no tokens")
        limit = getattr(getattr(getattr(model, "lm", None), "config", None), "max_position_embeddings", None) or 2048
        decoder = Decoder(model, max_len=min(int(limit), ids.shape[1] + max_tokens), activations=activations)
        del model  # the decoder holds its own kernel layouts; the stored form is no longer needed
        eos = getattr(tok, "eos_token_id", None)
        start = time.perf_counter()
        first = None
        new: list[int] = []
        printed = ""
        for token in decoder.stream(ids, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                    eos_token_id=eos):
            if first is None:
                first = time.perf_counter()
            if token == eos:
                break
            new.append(token)
            text = tok.decode(new, skip_special_tokens=True)
            sys.stdout.write(text[len(printed):])  # print what the new token completed
            sys.stdout.flush()
            printed = text
        end = time.perf_counter()
        sys.stdout.write("\n")
        if stats and first is not None:
            tps = (len(new) - 1) / (end - first) if len(new) > 1 else 0.0
            typer.echo(f"prefill {first - start:.3f} s ({ids.shape[1]} tokens), decode {tps:.1f} tokens/s "
                       f"({len(new)} tokens, {torch.get_num_threads()} threads, activations {activations})", err=True)
