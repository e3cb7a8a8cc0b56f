"""Model families: the one place that answers what the engine, the memory plan, FP8 and FSDP2 need to know
about a model, so no other module asks "is this our MPT?" or reads shape keys from a config.

- :func:`family` -> :class:`Family`: ``name`` (for messages), ``ours`` (sft/model/mpt.py: ``forward_hidden``,
  ``attn_impl``, ``checkpoint_blocks``; LoRA keeps the attribute), ``backends`` (attention backends it can
  train with: our MPT flex/sdpa; transformers' MPT eager only; the others flex when transformers has a flex
  path, and sdpa/eager), ``compiles`` (``--compile=auto`` compiles its blocks one by one on CUDA).
- :func:`shape` -> :class:`Shape`: layers, width, heads, KV heads, head dim, FFN width, gated FFN, vocabulary,
  from the config of a transformers model or our MPT.
- :func:`transformer_blocks`: the repeated blocks (the units FSDP2 shards, FP8 converts and checkpointing
  wraps), of the model or of a wrapper exposing ``inner_model`` (the FSDP loss module).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# transformers model types whose decoder layers compile one by one with FlexAttention inside
COMPILE_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
BLOCK_PATHS = ("model.layers", "transformer.blocks", "blocks")


@dataclass(frozen=True)
class Family:
    name: str
    ours: bool
    backends: tuple[str, ...]
    compiles: bool


@dataclass(frozen=True)
class Shape:
    layers: int
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    gated: bool
    vocab: int

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


def is_ours(model) -> bool:
    """Our MPT (sft/model/mpt.py), LoRA-wrapped or not."""
    return hasattr(model, "forward_hidden")


def family(model) -> Family:
    if is_ours(model):
        return Family("mpt (ours)", True, ("flex", "sdpa"), True)
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    if kind == "mpt":
        return Family("transformers' mpt", False, ("eager",), False)
    flex = ("flex",) if getattr(model, "_supports_flex_attn", False) else ()
    return Family(kind, False, (*flex, "sdpa", "eager"), kind in COMPILE_FAMILY)


def shape(model) -> Shape:
    c = model.config
    L = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers", 0)
    d = getattr(c, "hidden_size", None) or getattr(c, "d_model", 0)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_heads", 1)
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    ffn = getattr(c, "intermediate_size", None) or int(getattr(c, "expansion_ratio", 4) * d)
    gated = any(name.endswith("gate_proj") for name, _ in model.named_modules())
    vocab = getattr(c, "vocab_size", 0)
    return Shape(int(L), int(d), int(heads), int(kv), int(head_dim), int(ffn), gated, int(vocab))


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model`` (or of ``model.inner_model``); ValueError when there are none."""
    inner = getattr(model, "inner_model", model)
    for path in BLOCK_PATHS:
        found = _get(inner, path)
        if isinstance(found, nn.ModuleList) and len(found):
            return list(found)
    raise ValueError(f"{type(inner).__name__}: no transformer blocks at any of {', '.join(BLOCK_PATHS)}")
