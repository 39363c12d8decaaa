"""Test helper: run a worker function as ``world`` gloo ranks in spawned processes on 127.0.0.1."""

from __future__ import annotations

import socket

TIMEOUT_S = 60  # a collective waiting on a dead peer gives up after this (gloo usually notices at once)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int, *args) -> list[int]:
    """Exit codes of ``worker(rank, world, port, *args)`` run as ``world`` spawned processes (killed
    after 3 x TIMEOUT_S)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S * 3)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


def run_ranks_retrying(worker, world: int, *args, attempts: int = 3) -> list[int]:
    """:func:`run_ranks` for runs that must succeed, again up to ``attempts`` times while some rank exits non-zero:
    on this shared 2-core machine gloo was seen to abort a rank while tearing down (``terminate called without an
    active exception``, exit -6) after every result was written, and a probed free port can be taken before gloo
    binds it. A real bug fails every attempt; each failed attempt is reported as a warning."""
    import warnings

    codes: list[int] = []
    for attempt in range(attempts):
        codes = run_ranks(worker, world, *args)
        if all(c == 0 for c in codes):
            break
        warnings.warn(f"{world} ranks, attempt {attempt + 1}: exit codes {codes}, retrying", stacklevel=2)
    return codes
