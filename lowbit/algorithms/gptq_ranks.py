"""Sequential GPTQ across ``torch.distributed`` ranks (one process per rank, gloo on CPU).

Used by the GPTQ handler when a process group is initialized (``torchrun ... -m lowbit quantize
--scheme gptq``). With ``W`` ranks and ``B`` calibration windows ``x_0 .. x_{B-1}``:

- calibration sharded: rank ``r`` runs windows ``b = r, r + W, r + 2W, ...`` through the layers
  (embedding, then each already-quantized layer), so every rank holds ``~B / W`` windows' activations;
- Hessians reduced in a fixed order: for each linear group, window ``b``'s sum ``S_b = x_b^T x_b``
  (K, K) and token count ``m_b`` are broadcast by the rank that owns ``b``, and every rank adds them
  in window order, ``H = 2 / (sum_b m_b) * (((S_0 + S_1) + S_2) + ...)``. The float result depends
  only on the windows, not on ``W`` or on timing: 1 and 2 ranks build bit-identical Hessians (each
  window's forward is computed alone, so ``S_b`` does not depend on which rank ran it, given the same
  thread count), and so does one plain process (``GPTQ.add_batch`` adds the windows in that order);
- solves split: the layer's linears, in the adapter's order, go round-robin to ranks (linear ``k`` on
  rank ``k mod W``); each rank solves its own, then every result (codes (N, K), scale, zero_point,
  qmin/qmax, loss) is broadcast from its owner, and every rank swaps in the same modules, so the next
  layer's inputs are computed by the same quantized layer everywhere.

Bytes per layer and rank: ``B / W`` broadcasts of ``4 K^2`` per Hessian group sent by each owner (the
broadcast tree forwards them), plus the codes and scales of the linears it solved. The order of the
sum is fixed at the cost of ``B`` broadcasts instead of one all-reduce.

A rank that fails (an exception, or a peer that died and closed its sockets) raises
:class:`~lowbit.errors.LowbitError` naming the layer; nothing is written by this module (rank 0's
caller writes the folder atomically after the whole model is done), so a failed run leaves no output.
"""

from __future__ import annotations

import contextlib

import logging
import time

import torch
import torch.distributed as dist
from torch import nn

from lowbit.algorithms._calib import calibration_info, capture_inputs
from lowbit.algorithms._llm import effective_group_size, group_norms, input_groups, layer_prefix, n_tokens
from lowbit.algorithms.ranks import ordered_sum, ranks_active  # noqa: F401 (ranks_active: gptq.py imports it here)
from lowbit.algorithms.sequential import process_layerwise, run_layer
from lowbit.core import Kind, QParams, get_format, per_channel, per_group
from lowbit.errors import ConfigError, LowbitError

log = logging.getLogger(__name__)


def reduce_hessian(sums: list[torch.Tensor], counts: list[int], n_batches: int, in_features: int):
    """A ``GPTQ`` whose ``H = 2 / sum(m_b) * sum_b S_b``, summed in window order over every rank's windows
    (:func:`lowbit.algorithms.ranks.ordered_sum`).

    ``sums`` / ``counts``: this rank's windows ``rank, rank + W, ...`` in that order."""
    from lowbit.algorithms.gptq import GPTQ

    total = ordered_sum(sums, n_batches, (in_features, in_features))  # (K, K)
    n = int(ordered_sum([torch.tensor(c, dtype=torch.int64) for c in counts], n_batches, (), torch.int64))
    g = GPTQ(in_features)
    g.S, g.n = total, n  # GPTQ.H scales it by 2 / n, as the single-process path does
    return g


def check_ranks_support(config) -> None:
    """The across-ranks step runs plain GPTQ (v_proj's attention-mixed Hessian included): GPTAQ's float
    activation stream and the guard's held-out windows are not sharded (yet)."""
    if getattr(config, "asymmetric_calib", False) or getattr(config, "guard", False):
        raise ConfigError(f"{config.scheme}: GPTAQ (asymmetric_calib) and the RTN-fallback guard run in one process "
                          "only, not across torchrun ranks; run it without torchrun, or use plain gptq")


def _receive_layout(config, weight: torch.Tensor, g: int):
    """Empty codes, scale and zero_point of the shapes and dtypes ``GPTQ.solve`` returns for ``weight``."""
    f = get_format(config.format_name)
    N, K = weight.shape
    codes = torch.empty(N, K, dtype=torch.int8 if (f.kind is Kind.UNIFORM and f.signed) else torch.uint8)
    shape = (N, K // g) if g else (N,)  # g: the effective group size; 0 = per channel
    scale = torch.empty(shape, dtype=torch.float32)
    zero_point = None if config.symmetric or f.kind is not Kind.UNIFORM else torch.empty(shape, dtype=torch.int32)
    return f, codes, scale, zero_point


def _broadcast_solution(config, weight, g, owner: int, solved):
    """Every rank gets the owner's ``(codes, qparams, loss)`` for one linear."""
    f, codes, scale, zero_point = _receive_layout(config, weight, g)
    header = torch.zeros(5, dtype=torch.float64)  # [has qmin, qmin, has qmax, qmax, loss]
    if dist.get_rank() == owner:
        c, qp, loss = solved
        codes.copy_(c)
        scale.copy_(qp.scale)
        if zero_point is not None:
            zero_point.copy_(qp.zero_point)
        header[:] = torch.tensor([qp.qmin is not None, qp.qmin or 0, qp.qmax is not None, qp.qmax or 0, loss],
                                 dtype=torch.float64)
    for t in (codes, scale, zero_point, header):
        if t is not None and dist.get_world_size() > 1:
            dist.broadcast(t, src=owner)
    qmin = int(header[1]) if header[0] else None
    qmax = int(header[3]) if header[2] else None
    gran = per_group(g) if g else per_channel(0)
    qp = QParams(f, gran, scale, zero_point, qmin, qmax,
                 codebook=f.codebook_tensor() if f.kind is Kind.CODEBOOK else None)
    return codes, qp, float(header[4])


def make_gptq_ranks_process(config, prefix: str, report, stats: dict, n_batches: int,
                            groups: tuple[tuple[str, ...], ...], wrap=None,
                            norms: tuple[str | None, ...] | None = None):
    """The per-layer step of :func:`quantize_gptq_ranks`: sharded Hessians, fixed-order reduce, split solve.

    ``wrap(name, linear, codes, qparams, group_size) -> module`` as in ``make_gptq_process`` (default:
    ``WeightOnlyQLinear``); the W/A presets pass one that builds ``WAQLinear``. ``norms``: the norm feeding each
    group (``config.residual_weights`` needs them; default: Llama's)."""
    from lowbit.algorithms._llm import LLAMA_GROUP_NORMS
    from lowbit.algorithms.attention_hessian import mixed_value_inputs, mixed_value_linear
    from lowbit.algorithms.residual_hessian import residual_sources, residual_weighted_inputs
    from lowbit.algorithms.gptq import selected_linears, wrap_quantized

    check_ranks_support(config)

    def process(i: int, layer: nn.Module, inputs: list, kwargs: dict) -> None:
        linears, owner = selected_linears(config, layer, f"{prefix}.{i}", groups)
        if not linears:
            return
        # v_proj (when attention_hessian): its own Hessian, of the attention-mixed inputs (attention_hessian.py)
        attn, mixed_v = mixed_value_linear(layer, linears, owner, config.attention_hessian)
        # Hessian groups in the adapter's linear order: every rank issues the same collectives in the
        # same order (a set's order depends on each process's string hash seed)
        sums: dict[str, list[torch.Tensor]] = {n: [] for n in dict.fromkeys(owner[n] for n in linears)}
        counts: dict[str, list[int]] = {n: [] for n in sums}
        full = {f"{prefix}.{i}.{n}": n for n in sums}

        def add(f: str, x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).float()  # (M, K)
            sums[full[f]].append(x.T @ x)
            counts[full[f]].append(x.shape[0])

        # the residual writers (when residual_weights): inputs scaled by 1 / rms of the residual after their add
        sources = residual_sources(layer, tuple(zip(groups, norms or LLAMA_GROUP_NORMS))) \
            if config.residual_weights else {}
        wsrc = {f: sources[n] for f, n in full.items() if n in sources}
        try:
            fv = f"{prefix}.{i}.{mixed_v}"
            with capture_inputs({f: linears[n] for f, n in full.items() if n != mixed_v and f not in wsrc}, add), \
                    (residual_weighted_inputs(layer, {f: linears[full[f]] for f in wsrc}, wsrc, add) if wsrc
                     else contextlib.nullcontext()), \
                    (mixed_value_inputs(attn, lambda z: add(fv, z)) if mixed_v is not None
                     else contextlib.nullcontext()):
                run_layer(layer, inputs, kwargs, i, keep=False)
            hess = {n: reduce_hessian(sums[n], counts[n], n_batches, linears[n].in_features) for n in sums}
            del sums
            world, rank = dist.get_world_size(), dist.get_rank()
            names = list(linears)
            solved = {}
            for k, n in enumerate(names):  # this rank's share of the solves
                if k % world == rank:
                    m = linears[n]
                    t = time.perf_counter()
                    g = effective_group_size(m.in_features, config.group_size)
                    solved[n] = hess[owner[n]].solve(
                        m.weight, config.format_name, config.symmetric, g, config.block_size, config.percdamp,
                        config.act_order, double_quant=config.double_quant, grid=config.gguf)
                    stats[f"{prefix}.{i}.{n}"] = {"seconds": time.perf_counter() - t, "rank": rank}
            for k, n in enumerate(names):
                m = linears[n]
                g = effective_group_size(m.in_features, config.group_size)
                codes, qp, loss = _broadcast_solution(config, m.weight, g, k % world, solved.get(n))
                new = (wrap(n, m, codes, qp, g) if wrap is not None
                       else wrap_quantized(m, codes, qp, g, config.kernel, config.double_quant))
                layer.set_submodule(n, new)
                name = f"{prefix}.{i}.{n}"
                report.layers[name] = new.spec()
                stats.setdefault(name, {"rank": k % world})
                stats[name].update(loss=loss, group_size=g)
        except RuntimeError as exc:  # gloo: a peer closed its sockets or timed out
            raise LowbitError(f"rank {dist.get_rank()} of {dist.get_world_size()}: distributed GPTQ failed at "
                              f"decoder layer {i} ({type(exc).__name__}: {str(exc)[:300]}); a peer rank probably "
                              "died. Nothing was written.") from exc

    return process


def quantize_gptq_ranks(model: nn.Module, config, batches: list[torch.Tensor], source: str):
    """GPTQ with the calibration windows sharded over the ranks of the initialized process group."""
    from lowbit.api import QuantizeReport

    world, rank = dist.get_world_size(), dist.get_rank()
    if len(batches) < world:
        raise ConfigError(f"distributed GPTQ needs at least one calibration window per rank: {len(batches)} "
                          f"windows for {world} ranks (raise --calib or use fewer ranks)")
    report = QuantizeReport()
    stats: dict[str, dict] = {}
    t0 = time.perf_counter()
    process = make_gptq_ranks_process(config, layer_prefix(model), report, stats, len(batches), input_groups(model),
                                      norms=group_norms(model))
    log.info("rank %d of %d: %d of %d calibration windows", rank, world, len(batches[rank::world]), len(batches))
    process_layerwise(model, batches[rank::world], process, desc=config.scheme)
    report.extra["gptq"] = {"seconds": time.perf_counter() - t0, "n_tokens": n_tokens(batches), "layers": stats,
                            "world_size": world}
    model.lowbit_calibration = dict(calibration_info(batches, source), world_size=world)
    return report
