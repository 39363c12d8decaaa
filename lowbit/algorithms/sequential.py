"""Layer-by-layer (sequential) processing of a decoder LM, as in GPTQ (Frantar et al. 2022, sec. 4).

The calibration batches are run up to the first decoder layer once; their hidden states (and the
keyword arguments the layers receive: rotary embeddings, mask, positions) are kept. Then for each
layer ``i``: ``process(i, layer, inputs, kwargs)`` collects what it needs from the layer's float
forward and swaps in quantized modules, and the *quantized* layer is run on the inputs to give the
inputs of layer ``i + 1``. So layer ``i`` is calibrated on what the already-quantized layers ``< i``
really produce, and only one layer's activations are alive at a time.

:func:`quantize_from_safetensors` goes further for models bigger than RAM: the model skeleton lives
on the ``meta`` device, and each layer is materialised from the safetensors file just before it is
processed (tensors read with ``pread``, no mmap, so untouched layers cost nothing), quantized, and
its float weights dropped. Peak memory is then ~ float embeddings + quantized layers so far + one
float layer + calibration activations, whatever the depth.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Callable

import torch
from rich.progress import Progress
from torch import nn

from lowbit.algorithms._llm import decoder_layers
from lowbit.errors import CalibrationError, ConfigError, LoadError

log = logging.getLogger(__name__)

Process = Callable[[int, nn.Module, list, dict], None]


def _libc():
    """glibc through ctypes, or None where it is absent (then the memory helpers are no-ops)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so a layer's freed float weights
    and temporaries do not stay in the resident set; a no-op where glibc is absent."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_allocations() -> None:
    """Serve every allocation of 1 MiB or more with its own ``mmap``, so it returns to the OS when freed.

    glibc otherwise raises its mmap threshold after the first large free (up to 32 MiB), and later
    layer-sized buffers come from the heap, where freed pages stay resident until a trim: the peak
    resident set then holds several layers' worth of dead temporaries. Process-wide, and it turns
    off glibc's dynamic threshold for the rest of the process; used by the from-disk path only."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


class _ReachedLayer(Exception):
    """Raised by the pre-hook on layer 0 to stop the forward once its inputs are captured."""


def capture_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering decoder layer 0 for each batch ((B, T, C) each), and the shared kwargs.

    The kwargs (rotary ``position_embeddings``, ``attention_mask``, ``position_ids``) depend only on
    the sequence length, so batches must all have the same length.
    """
    layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    shared: dict = {}
    lengths = {b.shape[-1] for b in batches}
    if len(lengths) != 1:
        raise CalibrationError(f"sequential calibration needs batches of one length, got lengths {sorted(lengths)}")

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if not torch.isfinite(hidden).all():
            raise CalibrationError("non-finite (NaN/inf) activation entering decoder layer 0 during calibration")
        inputs.append(hidden.detach())
        if not shared:
            shared.update({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")})
            shared["use_cache"] = False
            shared["cache"] = None  # transformers >= 5.25 names the cache `cache` (was `past_key_values`)
        raise _ReachedLayer

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for b in batches:
                try:
                    model(b)
                except _ReachedLayer:
                    pass
    finally:
        handle.remove()
    return inputs, shared


def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, index: int | None = None,
              keep: bool = True) -> list[torch.Tensor]:
    """Outputs of one decoder layer for each input; a non-finite output names the layer.

    ``keep=False`` runs the layer only for its hooks (statistics passes) and returns ``[]``, so the
    outputs of all windows are never alive at once."""
    outs = []
    with torch.inference_mode():
        for h in inputs:
            y = layer(h, **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            if not torch.isfinite(y).all():
                raise CalibrationError(f"non-finite (NaN/inf) output from decoder layer {index} during calibration")
            if keep:
                outs.append(y)
    return outs


def process_layerwise(model: nn.Module, batches: list[torch.Tensor], process: Process,
                      materialize: Callable[[int, nn.Module], None] | None = None,
                      desc: str = "layers") -> int:
    """Run ``process`` on each decoder layer in order, feeding it the outputs of the processed layers.

    ``materialize(i, layer)``, when given, loads layer ``i``'s weights just before it is processed.
    Returns the number of layers processed.

    A process with ``float_stream = True`` (GPTAQ) also gets the *float* model's hidden states entering
    layer ``i`` (one extra activation stream, the same windows): ``process(i, layer, inputs, kwargs,
    float_inputs)``, and must replace ``float_inputs[j]`` by the float layer's output (it runs the float
    layer anyway, before swapping in quantized modules). Both streams start from the same embeddings.
    """
    layers = decoder_layers(model)
    hidden, kwargs = capture_layer_inputs(model, batches)
    float_hidden = list(hidden) if getattr(process, "float_stream", False) else None  # entries replaced, not mutated
    with Progress(transient=True, disable=len(layers) < 4) as bar:
        task = bar.add_task(desc, total=len(layers))
        for i, layer in enumerate(layers):
            if materialize is not None:
                materialize(i, layer)
            if float_hidden is None:
                process(i, layer, hidden, kwargs)
            else:
                process(i, layer, hidden, kwargs, float_hidden)
            for j in range(len(hidden)):  # outputs replace inputs window by window: one copy alive, not two
                hidden[j] = run_layer(layer, [hidden[j]], kwargs, i)[0]
            for m in layer.modules():  # kernel-layout copies are rebuilt when the model is used
                if hasattr(m, "release_kernel_layout"):
                    m.release_kernel_layout()
            if materialize is not None:
                release_free_memory()
            bar.advance(task)
    return len(layers)


# ------------------------------------------------------------------------------ safetensors

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
           "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsReader:
    """Reads single tensors of a ``.safetensors`` file with ``os.pread`` (no mmap, no full load)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            self.header = json.loads(os.pread(self.fd, n, 8))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LoadError(f"{self.path}: not a readable safetensors file ({exc})") from None
        self.header.pop("__metadata__", None)
        self.base = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> torch.Tensor:
        info = self.header.get(name)
        if info is None:
            raise LoadError(f"{self.path}: no tensor {name!r}")
        start, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        view = out.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes: read straight into them
        if view.nbytes != end - start:
            raise LoadError(f"{self.path}: tensor {name!r} has {end - start} bytes, expected {view.nbytes}")
        done = 0
        while done < view.nbytes:  # one copy from the file, no intermediate buffer
            n = os.preadv(self.fd, [view[done:]], self.base + start + done)
            if n <= 0:
                raise LoadError(f"{self.path}: truncated while reading {name!r}")
            done += n
        return out

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_module_from(reader: SafetensorsReader, module: nn.Module, prefix: str) -> None:
    """Materialise ``module`` (possibly on ``meta``) with the tensors ``prefix.*`` of the file.

    The tensors read from disk become the parameters (``assign=True``): one copy in memory, none
    transient."""
    state = {}
    for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
        key = f"{prefix}.{name}"
        if key in reader.header:
            state[name] = reader.get(key)
    missing, _ = module.load_state_dict(state, strict=False, assign=True)
    if missing:
        raise LoadError(f"{reader.path}: tensors missing for {prefix}: {missing[:4]}")


def causal_lm_skeleton(folder: Path):
    """A ``CausalLM`` of the HF folder whose parameters live on ``meta`` (no memory), with its tokenizer
    and config; buffers that are not saved (rotary frequencies) are computed on the CPU as usual."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.causal_lm import CausalLM
    from lowbit.models.hf import conv1d_to_linear

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if conv1d_to_linear(lm):
        raise ConfigError(f"{folder}: layer-from-disk quantization reads weights as stored, and this family "
                          f"({config.model_type}) stores Conv1D (in, out) weights; quantize it in memory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError):  # a folder without tokenizer files (tests): calibration ids are given
        tokenizer = None
    return CausalLM(lm.eval(), tokenizer, model_name=Path(folder).name, source=str(folder)).eval()


smollm2_skeleton = causal_lm_skeleton  # the name bench/ and older callers use


def quantize_from_safetensors(folder: str | Path, process: Process, batches: list[torch.Tensor],
                              skeleton: nn.Module | None = None) -> nn.Module:
    """Build a causal LM from ``folder`` (HF layout, one ``model.safetensors``) a layer at a time.

    Everything outside the decoder blocks (embeddings, final norm, an untied head) is materialised
    up front; each block is read from disk, processed (quantized) by ``process``, and its float
    weights released. The block list comes from the family's adapter row. ``skeleton``: the model
    from :func:`causal_lm_skeleton` if the caller already built one (to tokenize the calibration
    text), so the tokenizer is not loaded twice; it is filled in place.
    """
    from lowbit.models.adapters import adapter_for
    from lowbit.models.hf import retie

    folder = Path(folder)
    map_large_allocations()
    model = skeleton if skeleton is not None else causal_lm_skeleton(folder)
    blocks = adapter_for(model, "low-memory (layer-from-disk) quantization").layers
    with SafetensorsReader(folder / "model.safetensors") as reader:
        outside = {n.rpartition(".")[0] for n, _ in model.lm.named_parameters() if not n.startswith(blocks + ".")}
        for name in sorted(outside):
            module = model.lm.get_submodule(name) if name else model.lm
            if any(f"{name}.{p}" in reader.header for p, _ in module.named_parameters(recurse=False)):
                _load_direct(reader, module, name)
        retie(model)

        def materialize(i: int, layer: nn.Module) -> None:
            load_module_from(reader, layer, f"{blocks}.{i}")

        process_layerwise(model, batches, process, materialize, desc="sequential (from disk)")
    return model


def _load_direct(reader: SafetensorsReader, module: nn.Module, prefix: str) -> None:
    """Materialise ``module``'s own parameters (not its children's) from ``prefix.*`` of the file."""
    for pname, p in list(module.named_parameters(recurse=False)):
        key = f"{prefix}.{pname}"
        if key in reader.header:
            setattr(module, pname, nn.Parameter(reader.get(key), requires_grad=False))
