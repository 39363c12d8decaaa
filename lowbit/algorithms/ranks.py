"""Calibration across ``torch.distributed`` ranks: sharding and fixed-order reductions (gloo on CPU).

Every rank-aware method (GPTQ in ``gptq_ranks.py``, AWQ, SmoothQuant, static calibration) follows
the same rules, implemented here once:

- **sharding**: with ``W`` ranks and ``B`` calibration batches (windows) ``x_0 .. x_{B-1}``, rank ``r``
  runs batches ``b = r, r + W, r + 2W, ...`` (:func:`shard`, :func:`owner`); every rank still holds the
  whole batch list, so any rank can name any batch by its index;
- **order-free reductions** (``max``, ``min``, sums of integers such as histogram counts) use one
  all-reduce (:func:`all_max`, :func:`all_min`, :func:`all_sum_counts`): the float result does not
  depend on ``W``;
- **float sums** are made independent of ``W`` by summing per-batch terms in batch order: each
  batch's term is broadcast by its owner and every rank adds ``((t_0 + t_1) + t_2) + ...``
  (:func:`ordered_sum`); :func:`gather_batches` returns every batch's tensor, in batch order, to
  every rank (for replays such as an EMA, or rows sampled by global index). One broadcast per batch
  instead of one all-reduce: the price of bit-identical results at 1 and ``W`` ranks (each batch's
  term is computed from that batch alone, so it does not depend on which rank computed it, given
  the same torch thread count on every rank);
- a collective that fails (a peer died and closed its sockets, or timed out) becomes a
  :class:`~lowbit.errors.LowbitError` naming the step (:func:`collective_guard`); nothing is
  written by the methods themselves: rank 0's caller writes the folder atomically at the end.

Without an initialized process group every helper is the single-process identity (``W = 1``, no
collectives), so callers need no branches for that case.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from lowbit.errors import ConfigError, LowbitError

HEADER_DIMS = 8  # the most dimensions gather_batches transmits in its per-batch shape header


def ranks_active() -> bool:
    """True when a torch.distributed process group is initialized (the run is one rank of several)."""
    return dist.is_available() and dist.is_initialized()


def world_rank() -> tuple[int, int]:
    """``(W, r)``: the world size and this rank; ``(1, 0)`` in a single process."""
    if not ranks_active():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def owner(b: int) -> int:
    """The rank that runs batch ``b``: ``b mod W``."""
    return b % world_rank()[0]


def local_indices(n_batches: int) -> list[int]:
    """Indices of the batches this rank runs: ``r, r + W, ...`` below ``n_batches``."""
    world, rank = world_rank()
    return list(range(rank, n_batches, world))


def shard(batches: Sequence) -> list:
    """This rank's share of ``batches``: ``batches[r::W]`` (all of them in a single process)."""
    world, rank = world_rank()
    return list(batches[rank::world])


def require_batches(n_batches: int, method: str) -> None:
    """A :class:`ConfigError` when there are fewer batches than ranks (a rank would calibrate on nothing)."""
    world, _ = world_rank()
    if n_batches < world:
        raise ConfigError(f"distributed {method} needs at least one calibration batch per rank: {n_batches} "
                          f"batches for {world} ranks (raise --calib or use fewer ranks)")


def with_world_size(record: dict) -> dict:
    """``metadata.json``'s calibration record plus ``world_size`` when the run spans ranks."""
    return dict(record, world_size=world_rank()[0]) if ranks_active() else record


@contextmanager
def collective_guard(what: str) -> Iterator[None]:
    """Turn a failed collective (gloo: a peer closed its sockets or timed out) into a clear LowbitError."""
    try:
        yield
    except RuntimeError as exc:
        if not ranks_active():
            raise
        world, rank = world_rank()
        raise LowbitError(f"rank {rank} of {world}: distributed {what} failed ({type(exc).__name__}: "
                          f"{str(exc)[:300]}); a peer rank probably died. Nothing was written.") from exc


def all_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks, in place (exact: the order of a max does not matter)."""
    if world_rank()[0] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_min(t: torch.Tensor) -> torch.Tensor:
    """Elementwise min over ranks, in place (exact)."""
    if world_rank()[0] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_sum_counts(t: torch.Tensor) -> torch.Tensor:
    """Sum of integer-valued counts over ranks (a histogram), in place: exact in any order, summed in
    float64 so counts up to 2^53 stay integers in transit."""
    if world_rank()[0] > 1:
        wide = t.double()
        dist.all_reduce(wide, op=dist.ReduceOp.SUM)
        t.copy_(wide)
    return t


def broadcast_from(t: torch.Tensor, src: int) -> torch.Tensor:
    """``t`` from rank ``src`` on every rank, in place (a no-op in one process)."""
    if world_rank()[0] > 1:
        dist.broadcast(t, src=src)
    return t


def ordered_sum(local: Sequence[torch.Tensor], n_batches: int, shape, dtype=torch.float32) -> torch.Tensor:
    """``((t_0 + t_1) + t_2) + ...`` over every batch's term, the same float result on every rank and at
    every world size. ``local``: this rank's terms, for batches ``r, r + W, ...`` in that order, each of
    ``shape``. One (shape) buffer is broadcast per batch; memory is two ``shape`` tensors."""
    world, rank = world_rank()
    mine = local_indices(n_batches)
    if len(local) != len(mine):
        raise LowbitError(f"rank {rank}: {len(local)} per-batch terms for {len(mine)} batches")
    total = torch.zeros(shape, dtype=dtype)
    buf = torch.empty(shape, dtype=dtype)
    for b in range(n_batches):
        src = b % world
        if src == rank:
            buf.copy_(local[b // world])
        broadcast_from(buf, src)
        total += buf
    return total


def gather_batches(local: Sequence[torch.Tensor], n_batches: int, dtype=torch.float32) -> list[torch.Tensor]:
    """Every batch's tensor, in batch order, on every rank (shapes may differ between batches).

    ``local``: this rank's tensors for batches ``r, r + W, ...``. Each is broadcast by its owner after
    a shape header, and arrives as an exact copy."""
    world, rank = world_rank()
    mine = local_indices(n_batches)
    if len(local) != len(mine):
        raise LowbitError(f"rank {rank}: {len(local)} per-batch tensors for {len(mine)} batches")
    if world == 1:
        return [t.to(dtype) for t in local]
    out = []
    for b in range(n_batches):
        src = b % world
        header = torch.full((HEADER_DIMS + 1,), -1, dtype=torch.int64)  # [ndim, size_0, size_1, ...]
        if src == rank:
            t = local[b // world].to(dtype).contiguous()
            if t.dim() > HEADER_DIMS:
                raise LowbitError(f"gather_batches: {t.dim()} dimensions, at most {HEADER_DIMS}")
            header[0] = t.dim()
            header[1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        dist.broadcast(header, src=src)
        shape = tuple(int(s) for s in header[1:1 + int(header[0])])
        buf = t if src == rank else torch.empty(shape, dtype=dtype)
        if buf.numel():
            dist.broadcast(buf, src=src)
        out.append(buf)
    return out


def gather_scalars(local: Sequence[float], n_batches: int) -> list[float]:
    """Every batch's float (this rank's for batches ``r, r + W, ...``), in batch order, on every rank."""
    world, rank = world_rank()
    mine = local_indices(n_batches)
    if len(local) != len(mine):
        raise LowbitError(f"rank {rank}: {len(local)} per-batch values for {len(mine)} batches")
    if world == 1:
        return [float(v) for v in local]
    slots = torch.zeros(n_batches, dtype=torch.float64)
    slots[mine] = torch.tensor([float(v) for v in local], dtype=torch.float64)
    parts = [torch.empty(n_batches, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(parts, slots)
    return [float(parts[b % world][b]) for b in range(n_batches)]
