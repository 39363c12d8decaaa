"""Architecture adapters: one row per model family, everything a method needs to know about its layout.

A row names, relative to the Hugging Face model (``CausalLM.lm`` or ``SentenceEncoder.bert``):

- ``layers``: the ``ModuleList`` of transformer blocks;
- ``input_groups``: the linears of a block grouped by the input they share (one Hessian for GPTQ,
  one smoothing factor for AWQ / SmoothQuant), each with the norm before it whose weight can absorb
  a per-channel scale (``None`` where no norm directly precedes the group);
- ``norm_offset``: 1.0 for norms that compute ``x * (1 + w)`` (Gemma), else 0.0 — folding a scale
  ``s`` into such a norm is ``w <- (1 + w) / s - 1``;
- ``embeddings`` and ``head``: the token embedding and the LM head (tied when the config says so).

Adding a family is adding a row. A family not in the table still gets every generic scheme (all
``nn.Linear`` layers); the LLM methods (gptq, awq, smoothquant) raise a :class:`ConfigError` naming
what they need. GPT-2's ``Conv1D`` layers are turned into ``nn.Linear`` at load time
(``lowbit.models.hf``) so that one module type carries every projection.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import ConfigError

Group = tuple[tuple[str, ...], "str | None"]  # (linears sharing one input, the norm before them)


@dataclass(frozen=True)
class Adapter:
    family: str  # config.model_type
    task: str  # "causal-lm" | "encoder"
    layers: str  # dotted path of the block list inside the HF model
    input_groups: tuple[Group, ...] = ()
    embeddings: str = ""
    head: str = ""
    norm_offset: float = 0.0

    def groups(self) -> list[tuple[tuple[str, ...], str | None]]:
        return [tuple(g) for g in self.input_groups]


LLAMA_GROUPS: tuple[Group, ...] = (
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    (("self_attn.o_proj",), None),
    (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    (("mlp.down_proj",), None),
)
_BERT_GROUPS: tuple[Group, ...] = (
    (("attention.self.query", "attention.self.key", "attention.self.value"), None),
    (("attention.output.dense",), None),
    (("intermediate.dense",), None),
    (("output.dense",), None),
)


def _llama_like(family: str, norm_offset: float = 0.0) -> Adapter:
    return Adapter(family, "causal-lm", "model.layers", LLAMA_GROUPS, "model.embed_tokens", "lm_head", norm_offset)


def _bert_like(family: str, prefix: str = "") -> Adapter:
    return Adapter(family, "encoder", f"{prefix}encoder.layer", _BERT_GROUPS, f"{prefix}embeddings.word_embeddings")


ADAPTERS: dict[str, Adapter] = {a.family: a for a in (
    _llama_like("llama"),
    _llama_like("mistral"),
    _llama_like("qwen2"),
    _llama_like("qwen3"),
    _llama_like("gemma", norm_offset=1.0),
    # Gemma 2's sandwich norms: post_attention_layernorm normalises the attention *output* before the add and
    # pre_feedforward_layernorm feeds gate / up, so the methods that fold scales into Llama's norms refuse it
    Adapter("gemma2", "causal-lm", "model.layers", (
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        (("self_attn.o_proj",), None),
        (("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm"),
        (("mlp.down_proj",), None),
    ), "model.embed_tokens", "lm_head", norm_offset=1.0),
    Adapter("phi3", "causal-lm", "model.layers", (
        (("self_attn.qkv_proj",), "input_layernorm"),
        (("self_attn.o_proj",), None),
        (("mlp.gate_up_proj",), "post_attention_layernorm"),
        (("mlp.down_proj",), None),
    ), "model.embed_tokens", "lm_head"),
    Adapter("gpt2", "causal-lm", "transformer.h", (
        (("attn.c_attn",), "ln_1"),
        (("attn.c_proj",), None),
        (("mlp.c_fc",), "ln_2"),
        (("mlp.c_proj",), None),
    ), "transformer.wte", "lm_head"),
    _bert_like("bert"),
    _bert_like("roberta"),
    _bert_like("xlm-roberta"),
    Adapter("distilbert", "encoder", "transformer.layer", (
        (("attention.q_lin", "attention.k_lin", "attention.v_lin"), None),
        (("attention.out_lin",), None),
        (("ffn.lin1",), None),
        (("ffn.lin2",), None),
    ), "embeddings.word_embeddings"),
    Adapter("mpnet", "encoder", "encoder.layer", (
        (("attention.attn.q", "attention.attn.k", "attention.attn.v"), None),
        (("attention.attn.o",), None),
        (("intermediate.dense",), None),
        (("output.dense",), None),
    ), "embeddings.word_embeddings"),
)}


def backbone(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a lowbit task wrapper (``.lm`` / ``.bert``), or the model itself."""
    for attr in ("lm", "bert"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def backbone_prefix(model: nn.Module) -> str:
    """Dotted prefix of the backbone's module names inside ``model`` (``"lm."``, ``"bert."`` or ``""``)."""
    inner = backbone(model)
    return "" if inner is model else next(n for n, m in model.named_children() if m is inner) + "."


def family_of(model: nn.Module) -> str | None:
    config = getattr(backbone(model), "config", None)
    return getattr(config, "model_type", None)


def adapter_for(model: nn.Module, need: str = "") -> Adapter:
    """The adapter row of ``model``'s family; ``ConfigError`` saying what ``need`` requires otherwise."""
    family = family_of(model)
    row = ADAPTERS.get(family or "")
    if row is None:
        raise ConfigError(
            f"model family {family!r} ({type(backbone(model)).__name__}) has no architecture adapter (block list, "
            f"linears grouped by shared input, the norm each group folds into); {need or 'this'} cannot run "
            f"without one. Known families: {', '.join(sorted(ADAPTERS))}. Generic schemes (rtn, nf4, "
            "w8a8-dynamic, static) work on any model's nn.Linear layers; to add a "
            "family, add a row to lowbit.models.adapters.ADAPTERS")
    return row


def require_causal_lm(model: nn.Module, need: str) -> Adapter:
    """The adapter row of ``model``, which must be a causal LM's: ``need`` (a method that calibrates on token
    windows through decoder layers) cannot run on an encoder's sentences; ``ConfigError`` otherwise."""
    row = adapter_for(model, need)
    if row.task != "causal-lm":
        raise ConfigError(f"{need}: causal LMs only (token windows through decoder layers); {row.family!r} is an "
                          f"{row.task}. Schemes for any model's nn.Linear layers: rtn, nf4, hqq, sinq, hqq-sinq, "
                          "w8a8-dynamic, static")
    return row


def decoder_layers(model: nn.Module, need: str = "") -> nn.ModuleList:
    """The block list of ``model`` (a task wrapper or a bare HF model) per its adapter row."""
    row = adapter_for(model, need)
    try:
        layers = backbone(model).get_submodule(row.layers)
    except AttributeError:
        raise ConfigError(f"{row.family}: no block list at {row.layers!r} in {type(backbone(model)).__name__}") from None
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ConfigError(f"{row.family}: {row.layers!r} is not a non-empty ModuleList")
    return layers


def fold_scale_into_norm(norm: nn.Module, s, offset: float = 0.0) -> None:
    """Divide a norm's output by ``s`` per channel: ``w <- (offset + w) / s - offset``, ``b <- b / s``."""
    norm.weight.data = (offset + norm.weight.data) / s - offset
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.data = bias.data / s
