"""The `lowbit` command line: a thin typer layer over the Python API.

Each command lives in its own module in this package and exposes `register(app)`. Modules are
discovered with pkgutil, so adding a command means adding a file. Heavy imports (transformers,
the models) happen inside the command functions so that `lowbit --help` stays instant.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil

import typer

app = typer.Typer(
    name="lowbit",
    help="Quantize neural networks and measure what it costs: size, speed, fidelity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every step (DEBUG)."),
) -> None:
    """lowbit: a PyTorch-native quantization toolkit."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _register_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_all()


def main() -> None:
    app()
