"""What a gradient compressor sends: the :class:`Payload`, and the one base class, :class:`Compressor`.

A payload is a handful of flat tensors whose sizes depend only on the gradient's element count, so
every rank's payload for the same bucket has the same byte length and can travel through one
``all_gather`` of raw bytes:

    wire = codes (uint8, bit-packed by lowbit.core.pack) | scales (float32) | indices (int32) | values (float32)
    nbytes = len(codes) + 4 * len(scales) + 4 * len(indices) + 4 * len(values)

Error feedback (Seide et al. 2014; Stich et al. 2018, "Sparsified SGD with memory"): the compressor
encodes ``x_t = g_t + e_t`` and keeps ``e_{t+1} = x_t - decode(encode(x_t))`` per key (a tensor name
or a DDP bucket index), so ``sum_t decode_t = sum_t g_t - e_{T+1}``: what was not sent is delayed,
never lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lowbit.errors import ConfigError

logger = logging.getLogger(__name__)

_EMPTY_U8 = torch.empty(0, dtype=torch.uint8)
_EMPTY_F32 = torch.empty(0, dtype=torch.float32)
_EMPTY_I32 = torch.empty(0, dtype=torch.int32)


@dataclass
class Payload:
    """The compressed form of one gradient tensor. ``shape`` is the original shape (not sent)."""

    shape: torch.Size
    codes: torch.Tensor = field(default_factory=lambda: _EMPTY_U8)  # (bytes,) uint8, packed codes
    scales: torch.Tensor = field(default_factory=lambda: _EMPTY_F32)  # (n_scales,) float32
    indices: torch.Tensor = field(default_factory=lambda: _EMPTY_I32)  # (k,) int32, sparse methods
    values: torch.Tensor = field(default_factory=lambda: _EMPTY_F32)  # (k,) float32, sparse methods

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Exact bytes on the wire (the shape is known to every rank and not sent)."""
        return self.codes.numel() + 4 * (self.scales.numel() + self.indices.numel() + self.values.numel())

    def to_wire(self) -> torch.Tensor:
        """Concatenate every field as raw bytes: ``(nbytes,)`` uint8."""
        parts = [self.codes, self.scales.contiguous().view(torch.uint8),
                 self.indices.contiguous().view(torch.uint8), self.values.contiguous().view(torch.uint8)]
        return torch.cat(parts)

    @staticmethod
    def from_wire(buf: torch.Tensor, like: "Payload") -> "Payload":
        """Inverse of :meth:`to_wire` for a payload with the same field sizes as ``like``."""
        if buf.dtype != torch.uint8 or buf.numel() != like.nbytes:
            raise ConfigError(f"wire buffer has {buf.numel()} {buf.dtype} elements, expected {like.nbytes} uint8")
        sizes = [like.codes.numel(), 4 * like.scales.numel(), 4 * like.indices.numel(), 4 * like.values.numel()]
        codes, scales, indices, values = torch.split(buf, sizes)
        # clone: a byte slice at an odd offset cannot be viewed as float32 in place
        return Payload(like.shape, codes.clone(), scales.clone().view(torch.float32),
                       indices.clone().view(torch.int32), values.clone().view(torch.float32))


class Compressor:
    """Base class: ``encode(g, key) -> Payload`` and ``decode(payload) -> Tensor`` with optional error feedback.

    Subclasses implement ``_encode(x)`` on a flat float32 tensor and ``_decode(payload)`` returning a
    flat float32 tensor, plus ``nbytes(numel)``, the exact payload size for ``numel`` elements.
    Stochastic methods draw from ``self.generator`` (seeded with ``seed``; give each rank its own
    seed so that rounding noise averages out across ranks).
    """

    name = "compressor"

    def __init__(self, error_feedback: bool = False, seed: int | None = None):
        self.error_feedback = error_feedback
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        self._residual: dict[object, torch.Tensor] = {}
        self._templates: dict[int, Payload] = {}

    # -- subclass interface ------------------------------------------------------------------
    def _encode(self, x: torch.Tensor) -> Payload:  # x: (n,) float32
        raise NotImplementedError

    def _decode(self, p: Payload) -> torch.Tensor:  # -> (n,) float32
        raise NotImplementedError

    def nbytes(self, numel: int) -> int:
        """Exact payload bytes for a gradient of ``numel`` elements."""
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------------
    def encode(self, g: torch.Tensor, key: object = 0) -> Payload:
        """Compress ``g`` (any shape, any real float dtype); with error feedback, ``g + residual[key]``."""
        if not (g.is_floating_point() and not g.is_complex()):
            raise ConfigError(f"{self.name} compresses real floating-point gradients, got dtype {g.dtype}")
        x = g.detach().reshape(-1).to(torch.float32)  # (n,)
        if self.error_feedback:
            r = self._residual.get(key)
            if r is not None and r.numel() == x.numel():
                x = x + r
            elif r is not None:
                logger.debug("%s: residual for key %r has %d elements, gradient %d; reset", self.name, key,
                             r.numel(), x.numel())
        payload = self._encode(x)
        payload.shape = torch.Size(g.shape)
        if self.error_feedback:
            self._residual[key] = x - self._decode(payload)
        return payload

    def decode(self, payload: Payload) -> torch.Tensor:
        """Dense float32 tensor of the payload's shape."""
        return self._decode(payload).reshape(payload.shape)

    def template(self, numel: int) -> Payload:
        """A payload with the field sizes every ``numel``-element payload has (for :meth:`Payload.from_wire`).

        Field sizes depend only on ``numel``, so encoding zeros gives them; the generator's state is
        restored and no error-feedback memory is touched, so the next real encode is unaffected.
        """
        cached = self._templates.get(numel)
        if cached is None:
            state = self.generator.get_state()
            cached = self._encode(torch.zeros(numel, dtype=torch.float32))
            self.generator.set_state(state)
            self._templates[numel] = cached
        return cached

    def residual(self, key: object = 0) -> torch.Tensor | None:
        """The error-feedback memory for ``key`` (flat), or None."""
        return self._residual.get(key)

    def reset(self, key: object | None = None) -> None:
        """Forget the error-feedback memory of one key, or of all keys."""
        if key is None:
            self._residual.clear()
        else:
            self._residual.pop(key, None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(error_feedback={self.error_feedback})"


def chunked(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad flat ``x`` to whole chunks: ``(n_chunks, chunk)`` values and a same-shape validity mask."""
    n = x.numel()
    n_chunks = max(1, -(-n // chunk))
    pad = n_chunks * chunk - n
    xp = torch.nn.functional.pad(x, (0, pad)).reshape(n_chunks, chunk)  # (n_chunks, chunk)
    valid = (torch.arange(n_chunks * chunk) < n).reshape(n_chunks, chunk)  # (n_chunks, chunk)
    return xp, valid


def n_chunks(numel: int, chunk: int) -> int:
    return max(1, -(-numel // chunk))


def check_chunk(chunk: int | None, name: str) -> None:
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ConfigError(f"{name}: chunk must be a positive int or None (whole tensor), got {chunk!r}")
