"""Helpers shared by the LLM benches: a memoised fp32 reference, RTN over decoder linears with the
same group-size policy as GPTQ/AWQ, timing (wall and CPU), result files."""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


class CachedReference(nn.Module):
    """Wraps the fp32 model so that evaluate() computes each reference window's logits only once."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.memo: dict[bytes, torch.Tensor] = {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        key = ids.numpy().tobytes()
        if key not in self.memo:
            self.memo[key] = self.model(ids)
        return self.memo[key]


def rtn_decoder(model: nn.Module, bits: int, group_size: int, symmetric: bool = True, fmt: str | None = None,
                double_quant: bool = False) -> nn.Module:
    """Round-to-nearest on every decoder-layer linear, with GPTQ/AWQ's group-size fallback (576 -> 64)."""
    from lowbit.algorithms._llm import decoder_layers, effective_group_size, layer_linears
    from lowbit.nn import WeightOnlyQLinear
    from lowbit.nn.double_quant import DoubleQuantQLinear

    cls = DoubleQuantQLinear if double_quant else WeightOnlyQLinear
    if not hasattr(model, "lowbit_fp32_numel"):
        model.lowbit_fp32_numel = sum(p.numel() for p in model.parameters())
    for layer in decoder_layers(model):
        for name, m in layer_linears(layer).items():
            g = effective_group_size(m.in_features, group_size)
            layer.set_submodule(name, cls.from_float(m, bits, g, symmetric, fmt))
    gran = f"g{group_size}"
    model.lowbit_scheme = f"rtn-{fmt or f'w{bits}'}-{gran}{'' if fmt else ('-sym' if symmetric else '-asym')}" \
                          f"{'-dq' if double_quant else ''}"
    return model


class Timer:
    """Wall and CPU (process) seconds of a block: CPU time is the load-independent figure on a shared box."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def read_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Memory read bandwidth for the roofline lines: best of ``repeats`` read-only passes
    (``torch.sum``) over ``mb`` MB of fp32, in GB/s."""
    x = torch.ones(mb * 2 ** 20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def machine() -> dict:
    import os

    load = os.getloadavg()
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "loadavg_1_5_15": [round(x, 2) for x in load]}


def write_results(name: str, rows: list[dict], md: str, meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(md)


def quiet() -> None:
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("torchao", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
