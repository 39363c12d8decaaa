"""GPTQ / AWQ straight from a safetensors folder, never holding the float model (``--low-memory``).

:func:`quantize_from_disk` is :func:`lowbit.quantize` for the layer-by-layer path of
``sequential.quantize_from_safetensors``: the skeleton lives on ``meta``, each decoder layer is read
from disk, quantized and its float weights dropped; the result carries the same attributes
(``lowbit_config``, ``lowbit_scheme``, ``lowbit_report``, ``lowbit_calibration``) so ``lowbit.save``
writes the same files as after an in-memory run. Peak memory is measured in
``bench/sequential_memory.py``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from lowbit.algorithms._calib import calibration_info
from lowbit.algorithms._llm import group_norms, input_groups, lm_calibration, n_tokens, require_llama_layout, widest_input
from lowbit.algorithms.awq import AWQConfig, make_awq_process
from lowbit.algorithms.gptq import DEFAULT_CALIB_WINDOWS, GPTQConfig, check_enough_tokens, make_gptq_process
from lowbit.algorithms.sequential import causal_lm_skeleton, quantize_from_safetensors
from lowbit.models.adapters import adapter_for
from lowbit.api import QuantizeReport
from lowbit.config import config_to_json
from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

SUPPORTED = (GPTQConfig, AWQConfig)


def quantize_from_disk(folder: str | Path, config, calibration_data=None, n_calib: int | None = None) -> nn.Module:
    """Quantize the causal LM saved in ``folder`` (HF layout: config, tokenizer, ``model.safetensors``)
    with a GPTQ or AWQ ``config``, one decoder layer in memory at a time; returns the quantized model.

    Calibration: ``calibration_data`` (token-id batches) or the built-in text, ``n_calib`` windows."""
    from lowbit.algorithms.gptq_ranks import make_gptq_ranks_process, ranks_active

    if not isinstance(config, SUPPORTED):
        raise ConfigError(f"low-memory (layer-from-disk) quantization supports gptq and awq, not {config.scheme}")
    distributed = ranks_active()  # one rank of a torchrun job: this rank's share of the windows
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"{folder}: no model.safetensors to read layers from")
    model = causal_lm_skeleton(folder)
    layers_prefix = "lm." + adapter_for(model, "low-memory (layer-from-disk) quantization").layers
    model.lowbit_fp32_numel = sum(p.numel() for p in model.parameters())  # meta tensors know their size
    if isinstance(config, GPTQConfig):
        n = n_calib or config.n_calib or DEFAULT_CALIB_WINDOWS
    else:
        n = n_calib or config.calibration_windows()
    batches, source = lm_calibration(model, calibration_data, n)
    report = QuantizeReport()
    stats: dict = {}
    log.info("quantize from disk: %s", config_to_json(config))
    t0 = time.perf_counter()
    if isinstance(config, GPTQConfig) or config.rounding == "gptq":
        check_enough_tokens(batches, widest_input(model), batches[0].shape[-1])
    mine, world = batches, 1
    if distributed:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        if len(batches) < world:
            raise ConfigError(f"distributed {config.scheme} needs at least one calibration window per rank: "
                              f"{len(batches)} windows for {world} ranks (raise --calib or use fewer ranks)")
        mine = batches[rank::world]  # windows r, r + W, ...: statistics reduced in window order (ranks.py)
    if isinstance(config, GPTQConfig) and distributed:
        process = make_gptq_ranks_process(config, layers_prefix, report, stats, len(batches), input_groups(model),
                                           norms=group_norms(model))
    elif isinstance(config, GPTQConfig):
        process = make_gptq_process(config, layers_prefix, report, stats, groups=input_groups(model),
                                    norms=group_norms(model))
    else:  # AWQ: the same per-window, window-ordered path in one process and across ranks
        process = make_awq_process(config, layers_prefix, report, stats, require_llama_layout(model, config.scheme),
                                   n_batches=len(batches))
    with torch.no_grad():
        quantize_from_safetensors(folder, process, mine, skeleton=model)
    report.extra[config.kind] = {"seconds": time.perf_counter() - t0, "n_tokens": n_tokens(batches),
                                 "layers": stats, "from_disk": True, **({"world_size": world} if distributed else {})}
    if not report.layers:
        raise ConfigError(f"{config.scheme}: no layer matched (include={list(config.include)}, "
                          f"exclude={list(config.exclude)}); nothing was quantized")
    model.lowbit_calibration = calibration_info(batches, source)
    if distributed:
        model.lowbit_calibration = dict(model.lowbit_calibration, world_size=world)
    model.lowbit_config = config
    model.lowbit_scheme = config.scheme
    model.lowbit_report = report
    return model
