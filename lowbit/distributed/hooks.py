"""DDP communication hooks that exchange compressed gradients (``model.register_comm_hook(state, hook)``).

For each gradient bucket ``g_r`` (the flat buffer DDP hands the hook on rank ``r`` of ``W``):

    p_r   = compressor.encode(g_r, key=bucket index)          (error feedback lives in the compressor)
    [p_0 .. p_{W-1}] = all_gather(to_wire(p_r))               (one collective of raw uint8 bytes)
    g     = (1 / W) * sum_r decode(p_r)                       (every rank decodes the same bytes in the
                                                               same order, so parameters stay identical)

Bytes counted per rank and step: an all-gather of ``P`` bytes per rank makes each rank send its
payload to ``W - 1`` peers (gloo's ring forwards ``W - 1`` chunks of ``P``), so ``bytes_sent += (W - 1) * P``
per bucket. DDP's own fp32 all-reduce (gloo ring: reduce-scatter then all-gather) sends
``2 (W - 1) / W * 4 n`` for ``n`` elements (:func:`allreduce_bytes`); both counts match the bytes the
process actually writes to its sockets (checked in ``bench/grad_compression.py``). Note the scaling:
all-gather traffic grows with ``W - 1`` while all-reduce stays under ``2 * 4n``, so the saving against
all-reduce is ``(2 / W) * 4n / P`` - the full ratio at 2 ranks, half of it at 4.

Only the gloo backend (CPU tensors) is supported; buckets must hold real floating-point gradients
(fp16, bf16, fp32, fp64; encoded in fp32, written back in the bucket's dtype). Both are checked when
the state is built / the hook is registered and again on the first call, before any collective, so a
bad setup fails with :class:`~lowbit.errors.ConfigError` on every rank instead of hanging.
"""

# No `from __future__ import annotations`: DDP compares the hook's annotations to the real types.
import logging

import torch
import torch.distributed as dist

from lowbit.distributed.payload import Compressor, Payload
from lowbit.errors import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_BACKENDS = ("gloo",)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# all_gather_into_tensor is deprecated in favour of all_gather_single from torch 2.13
_all_gather_bytes = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def allreduce_bytes(numel: int, world_size: int, element_bytes: int = 4) -> float:
    """Bytes one rank sends in a ring all-reduce of ``numel`` elements: ``2 (W - 1) / W * numel * element_bytes``."""
    return 2 * (world_size - 1) / world_size * numel * element_bytes


def check_backend(process_group=None) -> str:
    """The process group's backend, or ConfigError if torch.distributed is not ready or the backend is unsupported."""
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("torch.distributed is not initialized: call "
                          "torch.distributed.init_process_group(backend='gloo', ...) before registering the hook")
    backend = str(dist.get_backend(process_group)).lower()
    if backend not in SUPPORTED_BACKENDS:
        raise ConfigError(f"gradient-compression hooks support the {', '.join(SUPPORTED_BACKENDS)} backend "
                          f"(CPU tensors), got {backend!r}; use torch's default all-reduce or PowerSGD hook there")
    return backend


def check_dtype(dtype: torch.dtype, where: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise ConfigError(f"{where} has dtype {str(dtype).replace('torch.', '')}, which the gradient compressors "
                          f"cannot encode (sign / level codes need real floats); supported: {names}")


class CompressionState:
    """Per-rank hook state: the compressor (with its error-feedback memory) and the byte counters.

    ``bytes_sent``: what this rank wrote to the wire, ``(W - 1) * P`` per bucket; ``payload_bytes``: the
    ``P`` it contributed; ``steps``: completed iterations (counted on the last bucket).
    """

    def __init__(self, compressor: Compressor, process_group=None):
        if not isinstance(compressor, Compressor):
            raise ConfigError(f"expected a lowbit.distributed compressor (OneBit, TernGrad, QSGD, TopK, RandomK), "
                              f"got {type(compressor).__name__}")
        self.backend = check_backend(process_group)
        self.compressor = compressor
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.bytes_sent = 0
        self.payload_bytes = 0
        self.steps = 0
        self._layouts: dict[int, tuple] = {}
        self._checked = False

    @property
    def bytes_per_step(self) -> float:
        """Average bytes this rank sent per completed iteration."""
        return self.bytes_sent / self.steps if self.steps else 0.0

    def _track_layout(self, bucket) -> None:
        """Reset the error-feedback memory of a bucket whose parameters changed (DDP rebuilds buckets once)."""
        layout = tuple((id(p), p.numel()) for p in bucket.parameters())
        index = bucket.index()
        if self._layouts.get(index, layout) != layout:
            logger.debug("bucket %d was rebuilt; resetting its error-feedback memory", index)
            self.compressor.reset(index)
        self._layouts[index] = layout


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: encode this rank's bucket, all-gather every rank's packed bytes, decode and average."""
    buf = bucket.buffer()  # (n,) flat gradients of this bucket
    if not state._checked:
        check_dtype(buf.dtype, f"gradient bucket {bucket.index()}")
        check_backend(state.process_group)
        state._checked = True
    state._track_layout(bucket)
    payload = state.compressor.encode(buf, key=bucket.index())
    wire = payload.to_wire()  # (P,) uint8
    world = state.world_size
    gathered = torch.empty(world * wire.numel(), dtype=torch.uint8)  # (W * P,)
    work = _all_gather_bytes(gathered, wire, group=state.process_group, async_op=True)
    state.payload_bytes += wire.numel()
    state.bytes_sent += (world - 1) * wire.numel()
    if bucket.is_last():
        state.steps += 1

    def average(fut: torch.futures.Future) -> torch.Tensor:
        fut.value()  # re-raises a failed collective
        rows = gathered.view(world, wire.numel())  # (W, P): one payload per rank
        total = torch.zeros(buf.numel(), dtype=torch.float32)
        for r in range(world):
            total += state.compressor.decode(Payload.from_wire(rows[r], like=payload)).reshape(-1)
        buf.copy_(total / world)
        return buf

    return work.get_future().then(average)


def register_compression_hook(model, compressor: Compressor, process_group=None) -> CompressionState:
    """Validate ``model`` (a DistributedDataParallel) and the backend, then register :func:`compression_hook`.

    Returns the state, whose ``bytes_sent`` / ``bytes_per_step`` count this rank's traffic.
    """
    if not hasattr(model, "register_comm_hook"):
        raise ConfigError(f"register_compression_hook needs a torch.nn.parallel.DistributedDataParallel model, "
                          f"got {type(model).__name__}")
    state = CompressionState(compressor, process_group)
    for name, p in model.named_parameters():
        if p.requires_grad:
            check_dtype(p.dtype, f"parameter {name!r}")
    model.register_comm_hook(state, compression_hook)
    logger.info("registered %r on %d ranks (%s)", compressor, state.world_size, state.backend)
    return state
