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
