"""AWQ, SmoothQuant (and the W/A presets) and static calibration across gloo ranks: 1 and 2 ranks give
bit-identical modules on a tiny Llama, and the methods whose reductions are order-free (max / min,
replayed per-batch ranges, per-batch losses summed in batch order) equal one plain process."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

import lowbit
from lowbit.algorithms.awq import AWQConfig
from lowbit.algorithms.smoothquant import WAConfig
from lowbit.algorithms.static import StaticConfig
from tests._ranks import TIMEOUT_S, free_port, run_ranks, run_ranks_retrying
from tests._tiny_llama import tiny_batches, tiny_llama

N_WINDOWS = 4  # of 32 tokens: rank 0 runs windows 0 and 2, rank 1 windows 1 and 3
# AWQ searches the first 3 windows (96 tokens): ranks hold 2 and 1 of them; the clip sample (40 of 96
# rows) is drawn across windows of both ranks
AWQ = dict(bits=4, group_size=16, n_grid=5, search_tokens=96, clip_tokens=40)
CONFIGS = {
    "awq": AWQConfig(**AWQ),
    "awq-gptq": AWQConfig(**AWQ, rounding="gptq"),
    # one search window (32 tokens): rank 1 holds none of it and still takes part in every reduction
    "awq-one-window": AWQConfig(bits=4, group_size=16, n_grid=3, search_tokens=32, clip_tokens=16),
    "smoothquant": WAConfig(alpha=0.6),
    "w4a8-gptq": WAConfig(weight_bits=4, act_bits=8, group_size=16, alpha=0.5, weight_method="gptq"),
    "static-minmax-auto": StaticConfig(observer="minmax"),  # smooth_alpha "auto": sampled rows gathered
    "static-minmax": StaticConfig(observer="minmax", smooth_alpha=0.5),
    "static-ema": StaticConfig(observer="ema", smooth_alpha=0.5),
    "static-percentile": StaticConfig(observer="percentile", symmetric=False, smooth_alpha=None),
    "static-output": StaticConfig(observer="output", smooth_alpha=0.5, output_samples=3, output_ratios=(1.0, 0.7)),
}
# equal to one plain process bit for bit: max reductions, replayed (min, max) ranges, ordered loss sums,
# AWQ's per-window statistics and GPTQ's Hessians summed in window order in one process too
SAME_AS_ONE_PROCESS = ("awq", "awq-gptq", "awq-one-window", "smoothquant", "w4a8-gptq", "static-minmax",
                       "static-ema", "static-output")




def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(tiny_batches(1, seed=9)[0])
    return getattr(out, "logits", out)


def _quantize_all() -> dict:
    out = {}
    for name, config in CONFIGS.items():
        model = lowbit.quantize(tiny_llama(), config, tiny_batches(N_WINDOWS))
        out[name] = {"tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
                     "calib": model.lowbit_calibration, "logits": _logits(model)}
    return out


def _worker(rank: int, world: int, port: int, out_dir: str, die: bool = False) -> None:
    torch.set_num_threads(1)  # the same thread count on every rank and run: the same GEMM summation order
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    if die:  # the last rank dies in AWQ's first scale search of decoder layer 1 (3 searches per layer)
        from lowbit.errors import LowbitError

        import lowbit.algorithms.awq as awq

        real, calls = awq.search_scale, {"n": 0}

        def dying(*args, **kwargs):
            calls["n"] += 1
            if rank == world - 1 and calls["n"] > 3:
                os._exit(3)
            return real(*args, **kwargs)

        awq.search_scale = dying
        try:
            lowbit.quantize(tiny_llama(), CONFIGS["awq"], tiny_batches(N_WINDOWS))
        except LowbitError as exc:
            with open(os.path.join(out_dir, f"error_{rank}.txt"), "w") as f:
                f.write(str(exc))
        return
    try:
        result = _quantize_all()
        if rank == 0:
            torch.save(result, os.path.join(out_dir, f"world{world}.pt"))
        dist.barrier()  # tear down together: a rank leaving while rank 0 still saves aborted in gloo now and then
    finally:
        dist.destroy_process_group()


def _run(world: int, out_dir: str, die: bool = False) -> list[int]:
    if not die:  # must succeed: retried past gloo's teardown aborts (tests/_ranks.py)
        return run_ranks_retrying(_worker, world, out_dir, die)
    return run_ranks(_worker, world, out_dir, die)


def test_one_and_two_ranks_bit_identical_for_awq_smoothquant_static(tmp_path):
    assert _run(1, str(tmp_path)) == [0]
    assert _run(2, str(tmp_path)) == [0, 0]
    one, two = (torch.load(tmp_path / f"world{w}.pt", weights_only=True) for w in (1, 2))
    for name in CONFIGS:
        a, b = one[name], two[name]
        assert a["tensors"].keys() == b["tensors"].keys(), name
        for k in a["tensors"]:
            assert torch.equal(a["tensors"][k], b["tensors"][k]), (name, k)
        assert a["calib"]["world_size"] == 1 and b["calib"]["world_size"] == 2, name
        assert a["calib"]["sha256"] == b["calib"]["sha256"], name
    torch.set_num_threads(1)
    single = _quantize_all()  # no process group: the plain single-process paths
    for name in SAME_AS_ONE_PROCESS:
        for k, v in single[name]["tensors"].items():
            assert torch.equal(v, one[name]["tensors"][k]), (name, k)
        assert "world_size" not in single[name]["calib"]
    dense = _logits(tiny_llama())
    for name in ("awq", "awq-gptq", "w4a8-gptq"):
        assert not torch.equal(single[name]["logits"], dense), name  # not vacuous: the model was quantized


def test_dead_rank_fails_awq_clearly(tmp_path):
    codes = _run(2, str(tmp_path), die=True)
    assert codes[1] == 3  # the rank that died
    message = (tmp_path / "error_0.txt").read_text()
    assert "distributed AWQ at decoder layer 1 failed" in message and "peer rank" in message


def test_cli_joins_ranks_for_awq_smoothquant_static(monkeypatch):
    """`lowbit quantize` under torchrun (WORLD_SIZE set) joins the gloo group for these schemes and still
    refuses the others. (The full `torchrun --nproc-per-node 1|2 -m lowbit quantize` runs of awq,
    smoothquant and w8a8-static write byte-identical model.safetensors; that check takes ~6 s a launch,
    so the suite runs it for gptq only: test_gptq_ranks.py.)"""
    import atexit
    import logging

    import pytest

    from lowbit.algorithms.rtn import WeightOnlyConfig
    from lowbit.cli.quantize import _join_ranks
    from lowbit.errors import ConfigError

    monkeypatch.setattr(atexit, "register", lambda *a, **k: None)
    for k, v in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    log = logging.getLogger("test")
    with pytest.raises(ConfigError, match="w8a8-static"):
        _join_ranks(WeightOnlyConfig(), False, log)
    with pytest.raises(ConfigError, match="--low-memory .* runs gptq, awq and awq-gptq"):
        _join_ranks(CONFIGS["smoothquant"], True, log)
    for config in (CONFIGS["awq"], CONFIGS["smoothquant"], CONFIGS["static-minmax"]):
        assert _join_ranks(config, False, log) == 0
        dist.destroy_process_group()
