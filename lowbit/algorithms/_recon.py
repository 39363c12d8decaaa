"""Output reconstruction: fit quantizer parameters so a quantized layer or block reproduces its fp32
output on calibration data (the engine of AdaRound, BRECQ and QDrop).

For a block ``B`` with fp32 output ``z = B(x)`` (computed on the fp32 model) and quantized output
``z_hat = B_q(x_hat)`` (its input ``x_hat`` coming from the already-quantized model before it):

    min  E || z - z_hat ||^2  +  lambda * sum_i (1 - |2 h(V_i) - 1|^beta)

over the AdaRound variables ``V`` of the block's weights (and the LSQ activation step sizes when
``learn_act``), with ``beta`` annealed linearly from 20 to 2 after a warm-up of 20% of the
iterations without the regulariser (Nagel et al. 2020, sec. 4-5). Blocks are reconstructed in
forward order, each one hardened before the next one's inputs are taken.

Blocks (:func:`find_blocks`): one per layer (AdaRound), or one per repeated unit, the children
of an ``nn.ModuleList`` such as a transformer layer (BRECQ, Li et al. 2021), falling back to runs
of ``chain`` consecutive layers for plain CNNs (the block ends at the last module before the next
quantized layer, e.g. conv-BN-ReLU-conv-BN-ReLU-pool). A block that is one module is run on its
cached inputs; a run of layers is reached by running the quantized model up to the block's output.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms._calib import run_batch
from lowbit.algorithms._learned import ActQuantizer, QuantLayer, WeightQuantizer
from lowbit.errors import CalibrationError, LowbitError

log = logging.getLogger(__name__)

BETA_START, BETA_END = 20.0, 2.0  # AdaRound's annealing range
WARMUP = 0.2  # fraction of iterations without the rounding regulariser


class TrainingError(LowbitError, RuntimeError):
    """A reconstruction or QAT step produced NaN/inf; the message names the layer, the state is the last good one."""


class _Stop(Exception):
    """Raised by a hook to end a forward pass early, carrying what it captured."""

    def __init__(self, value):
        self.value = value


@dataclass(frozen=True)
class Block:
    name: str
    layers: tuple[str, ...]  # the QuantLayers inside
    output: str  # the module whose output is reconstructed
    cached: bool  # True: ``output`` contains every layer and runs on its cached inputs


@dataclass
class ReconSettings:
    iters: int = 1000
    lr: float = 1e-3  # Adam on the AdaRound variables V
    act_lr: float = 4e-5  # Adam on LSQ activation step sizes (BRECQ / QDrop)
    reg_weight: float = 0.01  # lambda
    learn_act: bool = False
    drop_prob: float = 0.0  # QDrop
    seed: int = 0


# ------------------------------------------------------------------------------- running

def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _to_normal(obj):
    """Detached, non-inference copies of the tensors in a nested structure."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_normal(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_normal(v) for k, v in obj.items()}
    return obj


def _run_until(model: nn.Module, name: str, batch, *, inputs: bool, grad: bool = False):
    """Run ``batch`` through ``model`` and return the input (args, kwargs) or the output of module ``name``."""
    module = model.get_submodule(name)
    if inputs:
        def hook(mod, args, kwargs):
            raise _Stop((args, kwargs))

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        def hook(mod, args, output):
            raise _Stop(_first(output))

        handle = module.register_forward_hook(hook)
    try:
        with torch.set_grad_enabled(grad):
            if grad:
                if not isinstance(batch, torch.Tensor):
                    raise CalibrationError("reconstructing a run of layers needs tensor batches "
                                           f"(got {type(batch).__name__})")
                model(batch)
            else:
                run_batch(model, batch)
    except _Stop as stop:
        return stop.value if grad else _to_normal(stop.value)
    finally:
        handle.remove()
    raise CalibrationError(f"module {name!r} was not reached by the forward pass")


def execution_order(model: nn.Module, batch) -> list[str]:
    """Names of leaf modules in the order a forward pass first calls them."""
    order: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if name and not list(m.children()):
            handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: order.append(n) if n not in order else None))
    try:
        run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order


def find_blocks(model: nn.Module, layers: list[str], order: list[str], unit: str = "layer", chain: int = 2) -> list[Block]:
    """Reconstruction units over the quantized ``layers`` (given in forward ``order``)."""
    layers = sorted(layers, key=lambda n: order.index(n) if n in order else len(order))
    if unit == "layer":
        return [Block(n, (n,), n, True) for n in layers]
    blocks: list[Block] = []
    taken: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            for i, _ in enumerate(m):
                prefix = f"{name}.{i}"
                inside = tuple(n for n in layers if n.startswith(prefix + "."))
                if inside:
                    blocks.append(Block(prefix, inside, prefix, True))
                    taken.update(inside)
    rest = [n for n in layers if n not in taken]
    for i in range(0, len(rest), chain):
        group = tuple(rest[i:i + chain])
        nxt = rest[i + chain] if i + chain < len(rest) else None
        if len(group) == 1 and nxt is None:
            blocks.append(Block(group[0], group, group[0], True))
            continue
        # the block ends at the last leaf module before the next quantized layer
        stop = order.index(nxt) if nxt in order else len(order)
        blocks.append(Block("+".join(group), group, order[stop - 1], False))
    first = {b.name: min(order.index(n) if n in order else 10**9 for n in b.layers) for b in blocks}
    return sorted(blocks, key=lambda b: first[b.name])


# ------------------------------------------------------------------------------- NaN guard

class StepGuard:
    """Keep the last parameters that gave a finite loss; on NaN/inf, restore them and name the layer."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.good = [p.detach().clone() for p in params]

    def restore(self) -> None:
        with torch.no_grad():
            for p, g in zip(self.params, self.good):
                p.copy_(g)

    def mark_good(self) -> None:
        for g, p in zip(self.good, self.params):
            g.copy_(p.detach())

    def check(self, loss: torch.Tensor, model: nn.Module, rerun, where: str) -> None:
        """Raise :class:`TrainingError` if ``loss`` is not finite, after restoring the good state."""
        if torch.isfinite(loss).all():
            return
        culprit = first_nonfinite_layer(model, rerun)
        self.restore()
        raise TrainingError(f"{where}: the loss became NaN/inf (first non-finite output: layer {culprit!r}); "
                            "stopped and restored the last parameters with a finite loss")


def first_nonfinite_layer(model: nn.Module, rerun) -> str:
    """Rerun a forward with hooks and return the first quantized (or leaf) module whose output is not finite."""
    found: list[str] = []

    def make(name):
        def hook(mod, args, out):
            out = _first(out)
            if not found and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                found.append(name)
        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in model.named_modules()
               if n and (isinstance(m, QuantLayer) or not list(m.children()))]
    try:
        with torch.no_grad():
            try:
                rerun()
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "<unknown: the loss itself overflowed>"


# ------------------------------------------------------------------------------- reconstruction

def _block_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over features, averaged over samples."""
    return (out - target).pow(2).reshape(out.shape[0], -1).sum(1).mean()


def reconstruct(qmodel: nn.Module, fpmodel: nn.Module, blocks: list[Block], batches: list,
                settings: ReconSettings) -> dict[str, dict[str, float]]:
    """Reconstruct every block in order; returns ``{block: {"loss_before", "loss_after"}}`` (hard rounding)."""
    results = {}
    gen = torch.Generator().manual_seed(settings.seed)
    for block in blocks:
        qlayers = [qmodel.get_submodule(n) for n in block.layers]
        targets = [_run_until(fpmodel, block.output, b, inputs=False) for b in batches]
        if block.cached:
            cached = [_run_until(qmodel, block.output, b, inputs=True) for b in batches]
            module = qmodel.get_submodule(block.output)

            def run(i: int):
                args, kwargs = cached[i]
                return _first(module(*args, **kwargs))
        else:
            def run(i: int):
                return _run_until(qmodel, block.output, batches[i], inputs=False, grad=True)

        def total_loss() -> float:
            with torch.no_grad():
                return float(sum(_block_loss(run(i), targets[i]) for i in range(len(batches))) / len(batches))

        wqs = [q.wq for q in qlayers if isinstance(q.wq, WeightQuantizer) and q.wq.rounding == "adaround"]
        aqs = [q.aq for q in qlayers if isinstance(q.aq, ActQuantizer) and q.aq.mode == "quantize"]
        for wq in wqs:
            wq.hard = True
        before = total_loss()
        params = [{"params": [wq.alpha for wq in wqs], "lr": settings.lr}] if wqs else []
        act_params = [aq.scale for aq in aqs if aq.learn == "lsq"] if settings.learn_act else []
        if act_params:
            params.append({"params": act_params, "lr": settings.act_lr})
        if params and settings.iters > 0:
            for wq in wqs:
                wq.hard = False
            for aq in aqs:
                aq.drop_prob = settings.drop_prob
            flat = [p for g in params for p in g["params"]]
            for p in flat:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params)
            guard = StepGuard(flat)
            warm = int(WARMUP * settings.iters)
            try:
                for it in range(settings.iters):
                    i = int(torch.randint(len(batches), (1,), generator=gen))
                    with torch.random.fork_rng():
                        torch.manual_seed(settings.seed * 100003 + it)  # QDrop masks: reproducible
                        out = run(i)
                    loss = _block_loss(out, targets[i])
                    if wqs and it >= warm:
                        frac = (it - warm) / max(1, settings.iters - warm)
                        beta = BETA_START + (BETA_END - BETA_START) * frac
                        loss = loss + settings.reg_weight * sum(wq.regulariser(beta) for wq in wqs)
                    guard.check(loss, qmodel, lambda: run(i), f"reconstructing block {block.name!r}")
                    guard.mark_good()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            finally:
                for wq in wqs:
                    wq.hard = True
                for aq in aqs:
                    aq.drop_prob = 0.0
                for p in flat:
                    p.requires_grad_(False)
        after = total_loss()
        if not after == after or after == float("inf"):
            raise TrainingError(f"block {block.name!r}: reconstruction ended with a non-finite loss")
        results[block.name] = {"loss_before": before, "loss_after": after}
        log.info("reconstructed %s: loss %.4g -> %.4g", block.name, before, after)
    return results


def fp_copy(model: nn.Module) -> nn.Module:
    """A frozen fp32 copy of ``model`` for the reconstruction targets."""
    fp = copy.deepcopy(model).eval()
    for p in fp.parameters():
        p.requires_grad_(False)
    return fp


__all__ = ["Block", "ReconSettings", "TrainingError", "StepGuard", "find_blocks", "execution_order", "reconstruct",
           "fp_copy", "first_nonfinite_layer"]
