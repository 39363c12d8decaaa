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
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="-v: log each step's details (INFO, e.g. every layer left in float); -vv: DEBUG."),
) -> None:
    """lowbit: a PyTorch-native quantization toolkit."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lowbit").setLevel(level)  # other libraries stay at WARNING
    if verbose == 0:  # commands show their own one-line-per-step progress instead
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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
