"""Check a saved folder's layer specs against its safetensors header before allocating anything.

``metadata.json`` records one spec per quantized layer; ``lowbit.load`` rebuilds each layer from its
spec and only then reads the weights. A spec with absurd sizes (50000 x 50000) would allocate its
tensors first. :func:`check_weights_header` reads only the JSON header of ``model.safetensors``
(8-byte little-endian length, then ``{name: {"dtype", "shape", "data_offsets"}}``), builds each spec's
module on the ``meta`` device (shapes and dtypes, no storage) and compares them, so a bad folder is
refused for the cost of reading a few kilobytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LoadError, LowbitError
from lowbit.io.metadata import WEIGHTS_FILE

MAX_HEADER_BYTES = 100 << 20  # the safetensors reference reader's own limit on the JSON header

# torch dtype -> safetensors dtype string (the format spec's names)
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
              "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header (``__metadata__`` dropped), checked for
    consistency with the file's size; :class:`LoadError` naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LoadError(f"{path}: unreadable safetensors (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise LoadError(f"{path}: unreadable safetensors (header length {n} with a file of {size} bytes)")
            raw = f.read(n)
    except OSError as exc:
        if isinstance(exc, LoadError):
            raise
        raise LoadError(f"{path}: unreadable ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoadError(f"{path}: unreadable safetensors (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path}: unreadable safetensors (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError
                numel *= d
            ok = (dtype in ITEM_BYTES and isinstance(start, int) and isinstance(end, int)
                  and 0 <= start <= end <= data_bytes and end - start == numel * ITEM_BYTES[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise LoadError(f"{path}: tensor {name!r} has an invalid header entry {str(entry)[:200]} "
                            f"(data section is {data_bytes} bytes)")
    return header


def check_weights_header(folder: str | Path, meta) -> None:
    """Refuse ``folder`` (:class:`LoadError` naming the file and tensor) unless every layer spec in
    ``meta.layers`` matches ``folder/model.safetensors``'s header in tensor names, shapes and dtypes.

    Nothing is allocated: the header is a few kilobytes of JSON and the modules are built on the
    ``meta`` device. Tensors of layers without a spec (the float ones) are checked by the strict
    load that follows.
    """
    from lowbit.nn import module_from_spec

    weights = Path(folder) / WEIGHTS_FILE
    header = read_header(weights)
    for layer, spec in meta.layers.items():
        try:
            with torch.device("meta"):
                module = module_from_spec(spec)
        except LoadError as exc:
            raise LoadError(f"{weights}: layer {layer!r}: {exc}") from None
        except (LowbitError, TypeError, ValueError, RuntimeError) as exc:
            raise LoadError(f"{weights}: layer {layer!r} has an invalid spec ({exc})") from None
        for key, t in module.state_dict().items():
            name = f"{layer}.{key}"
            entry = header.get(name) or header.get(getattr(meta, "aliases", {}).get(name, ""))
            want_dtype, want_shape = DTYPE_NAMES.get(t.dtype, str(t.dtype)), list(t.shape)
            if entry is None:
                raise LoadError(f"{weights}: tensor {name!r} is missing (the spec of layer {layer!r} in "
                                f"metadata.json needs it, {want_dtype} {want_shape})")
            if entry["dtype"] != want_dtype or list(entry["shape"]) != want_shape:
                raise LoadError(f"{weights}: tensor {name!r} is {entry['dtype']} {entry['shape']}; the spec of layer "
                                f"{layer!r} in metadata.json needs {want_dtype} {want_shape}")


__all__ = ["check_weights_header", "read_header"]
