"""lowbit.distributed: gradient compression for data-parallel training (MISSION item 24).

Compressors (plain objects, usable without DDP): ``encode(g, key) -> Payload`` with exact ``nbytes``,
``decode(payload) -> Tensor``, error-feedback memory per key where the method calls for it.

- :class:`OneBit`   1-bit SGD with error feedback (Seide et al. 2014)       ``onebit.py``
- :class:`TernGrad` stochastic ternary, max-norm scale (Wen et al. 2017)     ``terngrad.py``
- :class:`QSGD`     stochastic ``s``-level rounding (Alistarh et al. 2017)   ``qsgd.py``
- :class:`TopK`, :class:`RandomK` sparsification with memory (Stich et al. 2018)  ``topk.py``, ``randk.py``

DDP hooks (``hooks.py``): :func:`register_compression_hook` / :func:`compression_hook` over gloo, in two
modes: ``"allgather"`` (default), every rank's whole payload to every rank, bytes growing with ``W - 1``;
``"allreduce"``, a two-phase compressed all-reduce (compressed chunks to their owners, averaged,
re-compressed with their own error feedback, all-gathered) whose bytes per rank stay flat in ``W``
(within 1 pt of fp32 for 1-bit EF and QSGD, 2 pt below it for Top-K: see hooks.py).
:class:`CompressionState` counts bytes; :func:`compressed_bytes` is the formula.
"""

from lowbit.distributed.hooks import (
    MODES,
    CompressionState,
    allreduce_bytes,
    compressed_bytes,
    compression_hook,
    register_compression_hook,
    split_sizes,
)
from lowbit.distributed.onebit import OneBit, onebit_ref
from lowbit.distributed.payload import Compressor, Payload
from lowbit.distributed.qsgd import QSGD, qsgd_ref
from lowbit.distributed.randk import RandomK, randomk_ref
from lowbit.distributed.terngrad import TernGrad, terngrad_ref
from lowbit.distributed.topk import TopK, topk_ref

COMPRESSORS = {"onebit": OneBit, "terngrad": TernGrad, "qsgd": QSGD, "topk": TopK, "randomk": RandomK}


def make_compressor(name: str, **kwargs) -> Compressor:
    """Build a compressor by name (``onebit``, ``terngrad``, ``qsgd``, ``topk``, ``randomk``)."""
    from lowbit.errors import ConfigError

    try:
        cls = COMPRESSORS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown gradient compressor {name!r}; valid: {', '.join(COMPRESSORS)}") from None
    return cls(**kwargs)


__all__ = [
    "Payload", "Compressor", "COMPRESSORS", "make_compressor",
    "OneBit", "TernGrad", "QSGD", "TopK", "RandomK",
    "onebit_ref", "terngrad_ref", "qsgd_ref", "topk_ref", "randomk_ref",
    "CompressionState", "compression_hook", "register_compression_hook", "allreduce_bytes", "MODES",
    "compressed_bytes", "split_sizes",
]
