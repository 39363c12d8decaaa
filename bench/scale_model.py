"""The arithmetic behind docs/scale.md: memory, compute and network bytes of sequential GPTQ for a
Llama-layout model on W ranks, from the architecture and the costs measured on SmolLM2-135M.

    .venv/bin/python bench/scale_model.py          # prints the markdown tables of docs/scale.md

Nothing here is measured; every input is either an architecture constant (public configs) or a
measurement quoted with its source, and every output is a formula below.
"""

from __future__ import annotations

from dataclasses import dataclass

# Measured (bench/results/llm_methods_merged.md, "GPTQ W4 g128 sym"): SmolLM2-135M, 16 windows x 512
# tokens, torch threads 1, 113 CPU s for the whole model (30 layers).
SMOL_GPTQ_CPU_S = 113.0
SMOL_TOKENS = 16 * 512


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int  # h
    inter: int  # I
    layers: int  # L
    heads: int
    kv_heads: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_params(self) -> int:
        """q, o: h x h; k, v: h x kv; gate, up, down: h x I."""
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.inter

    @property
    def hessian_floats(self) -> int:
        """One K x K Hessian per distinct input: q/k/v, o, gate/up (K = h) and down (K = I)."""
        return 3 * self.hidden ** 2 + self.inter ** 2

    def flops_per_layer(self, tokens: int, window: int) -> dict[str, float]:
        """Forward twice (Hessian capture, then the quantized layer's outputs), x^T x, solve, factorizations."""
        h, i = self.hidden, self.inter
        windows = tokens / window
        forward = 2 * (2 * self.layer_params * tokens + 2 * 2 * window * window * h * windows)
        hessian = 2 * tokens * self.hessian_floats
        # GPTQ's column updates: ~ N K^2 multiply-adds per linear (N outputs, K inputs)
        k_h = 2 * h * h + 2 * h * self.kv_dim + 2 * h * i  # params of the linears that read K = h
        solve = 2 * (k_h * h + h * i * i)
        # cholesky (K^3/3) + cholesky_inverse (~K^3) + cholesky (K^3/3) per Hessian
        factor = (5 / 3) * (3 * h ** 3 + i ** 3)
        return {"forward": forward, "hessian": hessian, "solve": solve, "factor": factor}


SMOL = Arch("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152)
LLAMA7 = Arch("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000)
LLAMA70 = Arch("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000)


def rate_flops_per_cpu_s() -> float:
    """Effective FLOP per CPU second of our GPTQ on this machine, from the SmolLM2 measurement."""
    total = SMOL.layers * sum(SMOL.flops_per_layer(SMOL_TOKENS, 512).values())
    return total / SMOL_GPTQ_CPU_S


def gb(x: float) -> str:
    return f"{x / 1e9:,.2f}"


def table(archs, calib: tuple[int, int], worlds=(1, 8, 64)) -> str:
    n_win, window = calib
    tokens = n_win * window
    rate = rate_flops_per_cpu_s()
    out = [f"Calibration {n_win} windows x {window} tokens ({tokens:,} tokens).", "",
           "| model | W ranks | float layer GB (fp16) | Hessians GB | solve temporaries GB | activations / rank GB | "
           "per-window sums / rank GB (fixed order) | CPU-hours total | CPU-hours / rank (ideal) | "
           "network GB / rank, fixed order | network GB / rank, all-reduce |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in archs:
        flops = a.flops_per_layer(tokens, window)
        cpu_h = a.layers * sum(flops.values()) / rate / 3600
        hbytes = 4 * a.hessian_floats
        for w in worlds:
            if w > n_win:
                continue
            acts = 4 * tokens / w * a.hidden + 4 * window * (9 * a.hidden + 2 * a.kv_dim + 4 * a.inter)
            sums = -(-n_win // w) * hbytes
            # fixed order: each window's sums broadcast to W-1 peers; per rank: its windows' share
            fixed = a.layers * (n_win / w) * hbytes * (w - 1)
            allreduce = a.layers * 2 * (w - 1) / w * hbytes
            # codes (int8 per weight) + fp32 scales are tiny next to Hessians: codes of its 1/W share to W-1
            codes = a.layers * a.layer_params / w * (w - 1)
            par = (flops["forward"] + flops["hessian"]) / w + (flops["solve"] + flops["factor"]) / min(w, 7)
            out.append(f"| {a.name} | {w} | {gb(2 * a.layer_params)} | {gb(hbytes)} | {gb(2 * 4 * a.inter ** 2)} | "
                       f"{gb(acts)} | {gb(sums)} | {cpu_h:,.1f} | {a.layers * par / rate / 3600:,.1f} | "
                       f"{gb(fixed + codes)} | {gb(allreduce + codes)} |")
    return "\n".join(out)


def main() -> None:
    rate = rate_flops_per_cpu_s()
    smol = SMOL.flops_per_layer(SMOL_TOKENS, 512)
    print("SmolLM2 per layer GFLOP: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in smol.items())
          + f"; total {SMOL.layers * sum(smol.values()) / 1e12:.2f} TFLOP in {SMOL_GPTQ_CPU_S:.0f} CPU s "
          f"-> {rate / 1e9:.1f} GFLOP per CPU s")
    for a in (SMOL, LLAMA7, LLAMA70):
        print(f"{a.name}: layer params {a.layer_params / 1e6:.1f} M, Hessian floats {a.hessian_floats / 1e6:.1f} M, "
              f"fp32 layer {gb(4 * a.layer_params)} GB, whole fp32 model ~{gb(4 * (a.layers * a.layer_params + a.vocab * a.hidden))} GB")
    print()
    print(table((SMOL, LLAMA7, LLAMA70), (16, 512)))
    print()
    print(table((LLAMA7, LLAMA70), (128, 2048)))


if __name__ == "__main__":
    main()
