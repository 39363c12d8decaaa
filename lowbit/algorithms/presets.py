"""The seed notes' weight/activation presets (MISSION F.19) as named schemes.

| preset | weights | activations | meant as |
|---|---|---|---|
| ``w8a8`` | int8 per channel | int8 per token | conservative |
| ``w4a8`` | int4 g128 symmetric (GPTQ on causal LMs) | int8 per token | moderate |
| ``w4a4`` | int4 g128 symmetric (GPTQ on causal LMs) | int4 per token | aggressive |
| ``w2a8`` | int2 g64 affine (GPTQ on causal LMs) | int8 per token | ultra |

Every preset applies SmoothQuant first (alpha 0.5, folded into the norms on Llama) and leaves
embeddings and the LM head in float. ``rotate=True`` (CLI ``--rotate``; Llama-layout causal LMs)
replaces the smoothing by QuaRot's Hadamard rotations folded into the weights
(``lowbit.algorithms.rotation``; a tied LM head stays tied, its final norm rotates online), then GPTAQ
(MSE-searched group scales) runs on the rotated weights with the activation grid in its loop (``weight_method="auto"``: each
linear matches the float model's outputs from the activations it will multiply, measured better than
GPTQ on held-out calibration windows; ``"gptq"`` keeps plain GPTQ); ``act_clip`` (CLI ``--act-clip``)
clips each token's activation range; with GPTAQ each input's clip is searched (``ACT_CLIP_GRID`` and
``act_clip``: the one whose rounding moves the layer's outputs least, ``WAConfig.act_clip_search``).
``tune_windows`` then tunes the weight scales end to end (``lowbit.algorithms.scale_tuning``) at the
preset's learning rate (``PRESET_TUNE_LR``, else ``DEFAULT_TUNE_LR``).
``symmetric=False`` (CLI ``--affine``) gives W4A8 / W4A4 affine weight groups (a zero-point per group; on the
rotated W4A8 preset a fifth less KL on held-out calibration windows, docs/rotation.md).
``bench/presets.py`` and ``bench/rotation.py`` print the trade-off tables.
"""

from __future__ import annotations

from lowbit.algorithms.scale_tuning import DEFAULT_TUNE_LR
from lowbit.algorithms.smoothquant import DEFAULT_ALPHA, WAConfig
from lowbit.config import option_bool, register_scheme
from lowbit.errors import ConfigError

PRESETS = {
    "w8a8": dict(weight_bits=8, act_bits=8, group_size=0, symmetric=True),
    "w4a8": dict(weight_bits=4, act_bits=8, group_size=128, symmetric=True),
    "w4a4": dict(weight_bits=4, act_bits=4, group_size=128, symmetric=True),
    "w2a8": dict(weight_bits=2, act_bits=8, group_size=64, symmetric=False),
}
# scale tuning's Adam lr where it differs from DEFAULT_TUNE_LR, chosen on held-out calibration windows 99..106
# (bench/wa_gptaq_heldout.py ... tune:lr1e-3, rotated presets): W4A4 KL 0.405 at 5e-4 -> 0.385 at 1e-3; W4A8
# prefers 5e-4 (0.129 vs 0.136)
PRESET_TUNE_LR = {"w4a4": 1e-3}


def preset_config(name: str, alpha: float | None = DEFAULT_ALPHA, weight_method: str = "auto",
                  kernel: str = "auto", rotate: bool = False, act_clip: float = 1.0, rotate_seed: int = 0,
                  act_per_group: bool = False, act_symmetric: bool = True, tune_windows: int = 0,
                  tune_lr: float | None = None, tune_epochs: int = 1, tune_bf16: bool = False,
                  group_size: int | None = None, symmetric: bool | None = None, attention_hessian: bool = False,
                  residual_weights: bool = False) -> WAConfig:
    """The preset ``name``; ``rotate=True`` turns smoothing off (the rotation replaces it) and names it ``<name>-rot``.
    ``group_size`` (None: the preset's) sets the weight groups of W4A8 / W4A4 / W2A8 (``<name>-g<N>`` when it differs);
    ``symmetric`` (None: the preset's) their grid: affine (a zero-point per group, ``-affine``) or symmetric (``-sym``).
    ``act_clip`` / ``act_per_group`` / ``act_symmetric``: the activation grid (``WAQLinear``); ``tune_windows``:
    end-to-end scale tuning afterwards (``lowbit.algorithms.scale_tuning``, ``-tuned`` in the name) at
    ``tune_lr`` (None: the preset's, ``PRESET_TUNE_LR``), ``tune_epochs`` passes, in bf16 with ``tune_bf16``;
    ``attention_hessian`` / ``residual_weights``: the GPTQ-family options of the weight step (``-attnh`` / ``-resw``)."""
    if rotate:
        alpha = None
    if tune_lr is None:
        tune_lr = PRESET_TUNE_LR.get(name, DEFAULT_TUNE_LR)
    fields = dict(PRESETS[name])
    if group_size is not None and group_size != fields["group_size"]:
        if not fields["group_size"]:
            raise ConfigError(f"{name} quantizes its weights per output channel: group_size is for the W4A8 / W4A4 / "
                              f"W2A8 presets")
        if group_size < 1:
            raise ConfigError(f"{name}: group_size must be >= 1, got {group_size}")
        fields["group_size"] = group_size
    if symmetric is not None and symmetric != fields["symmetric"]:
        if fields["weight_bits"] == 8:
            raise ConfigError(f"{name}'s int8 weights are symmetric (affine int8 codes overflow the int8 product)")
        fields["symmetric"] = symmetric
    groups = f"-g{fields['group_size']}" if fields["group_size"] != PRESETS[name]["group_size"] else ""
    if fields["symmetric"] != PRESETS[name]["symmetric"]:
        groups += "-sym" if fields["symmetric"] else "-affine"
    return WAConfig(**fields, alpha=alpha, weight_method=weight_method, kernel=kernel,
                    name=f"{name}{groups}{'-rot' if rotate else ''}{'-tuned' if tune_windows else ''}"
                         f"{'-attnh' if attention_hessian else ''}{'-resw' if residual_weights else ''}", rotate=rotate,
                    act_clip=act_clip, rotate_seed=rotate_seed, act_per_group=act_per_group,
                    act_symmetric=act_symmetric, tune_windows=tune_windows, tune_lr=tune_lr,
                    tune_epochs=tune_epochs, tune_bf16=tune_bf16, attention_hessian=attention_hessian,
                    residual_weights=residual_weights)


def _register(name: str, help: str) -> None:
    @register_scheme(name, help, options=("alpha", "kernel", "rotate", "act_clip", "act_per_group", "act_symmetric",
                                       "tune_windows", "tune_epochs", "tune_bf16", "group_size", "symmetric",
                                       "attention_hessian", "residual_weights"))
    def build(options: dict) -> WAConfig:
        alpha = options.get("alpha", DEFAULT_ALPHA)
        return preset_config(name, None if alpha in (None, "none") else float(alpha),
                             kernel=options.get("kernel", "auto"), rotate=option_bool(options.get("rotate", False)),
                             act_clip=float(options.get("act_clip", 1.0)),
                             act_per_group=option_bool(options.get("act_per_group", False)),
                             act_symmetric=option_bool(options.get("act_symmetric", True)),
                             tune_windows=int(options.get("tune_windows", 0)),
                             tune_epochs=int(options.get("tune_epochs", 1)),
                             tune_bf16=option_bool(options.get("tune_bf16", False)),
                             group_size=None if options.get("group_size") is None else int(options["group_size"]),
                             symmetric=None if options.get("symmetric") is None else option_bool(options["symmetric"]),
                             attention_hessian=option_bool(options.get("attention_hessian", False)),
                             residual_weights=option_bool(options.get("residual_weights", False)))


_register("w8a8", "preset W8A8 (conservative): SmoothQuant + int8 weights per channel x int8 activations per token")
_register("w4a8", "preset W4A8 (moderate): SmoothQuant + int4 g128 weights (GPTQ on LLMs) x int8 activations")
_register("w4a4", "preset W4A4 (aggressive): SmoothQuant + int4 g128 weights (GPTQ on LLMs) x int4 activations")
_register("w2a8", "preset W2A8 (ultra): SmoothQuant + int2 g64 affine weights (GPTQ on LLMs) x int8 activations")
