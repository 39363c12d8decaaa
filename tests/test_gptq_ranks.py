"""GPTQ across gloo ranks: 1 and 2 ranks and one plain process give bit-identical codes on a tiny
Llama (the Hessian is summed in window order everywhere), and a dying rank fails the run clearly."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

import lowbit
from lowbit.algorithms.awq import AWQConfig
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.errors import LowbitError
from tests._ranks import TIMEOUT_S, free_port, run_ranks, run_ranks_retrying
from tests._tiny_llama import tiny_batches, tiny_llama

CONFIG = GPTQConfig(bits=4, group_size=16)
N_WINDOWS = 4




def _quantized_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(tiny_batches(1, seed=9)[0])
    return getattr(out, "logits", out)


def _worker(rank: int, world: int, port: int, out_dir: str, die_at_layer: int | None) -> None:
    torch.set_num_threads(1)  # the same thread count on every rank and run: same GEMM summation order
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        if die_at_layer is not None and rank == world - 1:
            import lowbit.algorithms.gptq_ranks as gr

            real = gr.reduce_hessian
            calls = {"n": 0}

            def dying(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] > 4 * die_at_layer:  # 4 Hessian groups per layer (qkv, o, gate/up, down)
                    os._exit(3)
                return real(*args, **kwargs)

            gr.reduce_hessian = dying
        model = tiny_llama()
        try:
            lowbit.quantize(model, CONFIG, tiny_batches(N_WINDOWS))
        except LowbitError as exc:
            with open(os.path.join(out_dir, f"error_{rank}.txt"), "w") as f:
                f.write(str(exc))
            return
        if rank == 0:  # rank 0 writes, and only after every layer is done
            torch.save({"tensors": _quantized_tensors(model), "calib": model.lowbit_calibration,
                        "logits": _logits(model)}, os.path.join(out_dir, f"world{world}.pt"))
    finally:
        if die_at_layer is None:
            dist.barrier()  # tear down together: a rank leaving while rank 0 still saves aborted in gloo (~1 in 3)
            dist.destroy_process_group()


def _run(world: int, out_dir: str, die_at_layer: int | None = None) -> list[int]:
    if die_at_layer is None:  # must succeed: retried past gloo's teardown aborts (tests/_ranks.py)
        return run_ranks_retrying(_worker, world, out_dir, die_at_layer)
    return run_ranks(_worker, world, out_dir, die_at_layer)


def test_one_and_two_ranks_bit_identical(tmp_path):
    assert _run(1, str(tmp_path)) == [0]
    assert _run(2, str(tmp_path)) == [0, 0]
    one, two = (torch.load(tmp_path / f"world{w}.pt", weights_only=True) for w in (1, 2))
    assert one["tensors"].keys() == two["tensors"].keys()
    for k in one["tensors"]:
        assert torch.equal(one["tensors"][k], two["tensors"][k]), k
    assert one["calib"]["world_size"] == 1 and two["calib"]["world_size"] == 2
    assert one["calib"]["sha256"] == two["calib"]["sha256"]  # the same windows, sharded differently
    # one plain process (no process group) at the ranks' thread count: the same codes, bit for bit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = tiny_llama()
        lowbit.quantize(single, CONFIG, tiny_batches(N_WINDOWS))
    finally:
        torch.set_num_threads(threads)
    plain = _quantized_tensors(single)
    assert plain.keys() == one["tensors"].keys()
    for k in plain:
        assert torch.equal(plain[k], one["tensors"][k]), k
    assert torch.equal(_logits(single), one["logits"])
    assert not torch.equal(one["logits"], _logits(tiny_llama()))  # not vacuous: 4 bits move the logits


def test_hessian_reduce_equals_add_batch(tmp_path):
    """H from the across-ranks fixed-order sum equals GPTQ.add_batch's, bit for bit."""
    from lowbit.algorithms.gptq import GPTQ
    from lowbit.algorithms.gptq_ranks import reduce_hessian

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        xs = [torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        ref = GPTQ(16)
        for x in xs:
            ref.add_batch(x)
        flat = [x.reshape(-1, 16) for x in xs]
        got = reduce_hessian([f.T @ f for f in flat], [32] * 3, 3, 16)
        assert got.n == ref.n == 96
        assert torch.equal(got.H, ref.H)
    finally:
        dist.destroy_process_group()


def test_dead_rank_fails_clearly_and_writes_nothing(tmp_path):
    codes = _run(2, str(tmp_path), die_at_layer=1)
    assert codes[1] == 3  # the rank that died
    message = (tmp_path / "error_0.txt").read_text()
    assert "distributed GPTQ failed at decoder layer 1" in message and "peer rank" in message
    assert not (tmp_path / "world2.pt").exists()


def test_torchrun_cli_one_and_two_ranks_write_the_same_folder(tmp_path):
    """`torchrun --nproc-per-node N -m lowbit quantize --scheme gptq`: rank 0 writes; 1 and 2 ranks agree."""
    import hashlib
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests._tiny_hf import tiny_folder

    src = tiny_folder("llama", tmp_path / "src")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for n in (1, 2):
        run = subprocess.run([torchrun, "--standalone", "--nproc-per-node", str(n), "-m", "lowbit", "quantize",
                              "--model", str(src), "--scheme", "gptq", "--bits", "4", "--group-size", "16",
                              "--calib", "4", "--no-eval", "--out", str(tmp_path / f"q{n}")],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    meta = [json.loads((tmp_path / f"q{n}" / "metadata.json").read_text()) for n in (1, 2)]
    assert [m["calibration"]["world_size"] for m in meta] == [1, 2]
    digest = [hashlib.sha256((tmp_path / f"q{n}" / "model.safetensors").read_bytes()).hexdigest() for n in (1, 2)]
    assert digest[0] == digest[1]
    assert not [p for p in tmp_path.iterdir() if p.name not in ("src", "q1", "q2")]  # no stray partial folders


AWQ_CONFIG = AWQConfig(bits=4, group_size=16, n_grid=3, search_tokens=64, clip_tokens=16, rounding="gptq")
# awq-hqq: the clipping searches (round-robin over ranks) and the stored codes with HQQ's rounding
AWQ_HQQ_CONFIG = AWQConfig(bits=4, group_size=16, symmetric=False, n_grid=3, search_tokens=64, clip_tokens=16,
                           init="hqq")
DISK_CONFIGS = (("gptq", CONFIG), ("awq", AWQ_CONFIG), ("awq-hqq", AWQ_HQQ_CONFIG))


def _disk_worker(rank: int, world: int, port: int, folder: str, out_dir: str) -> None:
    from lowbit.algorithms.from_disk import quantize_from_disk

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        for name, config in DISK_CONFIGS:
            model = quantize_from_disk(folder, config, tiny_batches(N_WINDOWS))
            if rank == 0:
                torch.save({"tensors": _quantized_tensors(model), "calib": model.lowbit_calibration},
                           os.path.join(out_dir, f"disk{world}_{name}.pt"))
        dist.barrier()  # tear down together (see _worker)
    finally:
        dist.destroy_process_group()


def test_low_memory_across_ranks_equals_in_memory(tmp_path):
    """GPTQ, AWQ(+GPTQ) and AWQ with HQQ's rounding a layer at a time from safetensors on 2 ranks give the in-memory
    result of one plain process bit for bit."""
    tiny_llama().lm.save_pretrained(str(tmp_path / "fp"))
    assert run_ranks_retrying(_disk_worker, 2, str(tmp_path / "fp"), str(tmp_path)) == [0, 0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, config in DISK_CONFIGS:
            mem = lowbit.quantize(tiny_llama(), config, tiny_batches(N_WINDOWS))
            disk = torch.load(tmp_path / f"disk2_{name}.pt", weights_only=True)
            mem_tensors = _quantized_tensors(mem)
            quantized = [k for k in mem_tensors if k.endswith("qweight")]
            assert quantized and all(torch.equal(disk["tensors"][k], mem_tensors[k]) for k in mem_tensors), name
            assert disk["calib"]["world_size"] == 2 and disk["calib"]["sha256"] == mem.lowbit_calibration["sha256"]
    finally:
        torch.set_num_threads(threads)


def test_factor_does_not_depend_on_the_thread_count():
    """GPTQ's factorisation runs at one thread (LAPACK's Cholesky sums by thread: at SmolLM2's widest
    input, K = 1536, MKL's 1- and 2-thread factors differ by ~1e-5), so the inverse factor and the
    codes are the same at 1 and 2 torch threads."""
    from lowbit.algorithms.gptq import GPTQ

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 1536, generator=gen)
    w = torch.randn(64, 1536, generator=gen)
    threads = torch.get_num_threads()
    factors, codes = [], []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            g = GPTQ(1536)
            g.add_batch(x)
            factors.append(g.inverse_factor(0.1, True, torch.float32)[1])
            codes.append(g.solve(w, "int4", True, 128)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(factors[0], factors[1])
    assert torch.equal(codes[0], codes[1])
