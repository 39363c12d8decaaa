"""Helpers shared by CLI commands: library errors as one clean line and exit code 2, and progress
shown as one line per step."""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import typer

from lowbit.errors import LowbitError

F = TypeVar("F", bound=Callable)


def clean_errors(fn: F) -> F:
    """Report a LowbitError as `error: message` with exit code 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LowbitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


@dataclass
class Step:
    """What a running step reports when it ends: ``summary`` replaces its title in the done line."""

    title: str
    summary: str = ""


@contextmanager
def step(title: str) -> Iterator[Step]:
    """A spinner on stderr while the block runs (on a terminal), then ``✓ summary (seconds)``.

    stdout stays for results (tables, ``--json``); the per-layer detail is behind ``-v``.
    """
    from rich.console import Console

    console = Console(stderr=True)
    s = Step(title)
    start = time.perf_counter()
    with console.status(title + " ..."):
        yield s
    console.print(f"[green]✓[/green] {s.summary or title} [dim]({time.perf_counter() - start:.1f} s)[/dim]",
                  highlight=False, soft_wrap=True)
