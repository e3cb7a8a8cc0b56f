"""Model families: the one place that answers what the engine, the memory plan, FP8 and FSDP2 need to know
about a model, so no other module asks "is this our MPT?" or reads shape keys from a config.

- :func:`family` -> :class:`Family`: ``name`` (for messages), ``ours`` (sft/model/mpt.py: ``forward_hidden``,
  ``attn_impl``, ``checkpoint_blocks``; LoRA keeps the attribute), ``backends`` (attention backends it can
  train with: our MPT flex/sdpa; transformers' MPT eager only; the others flex when transformers has a flex
  path, and sdpa/eager), ``compiles`` (``--compile=auto`` compiles its blocks one by one on CUDA),
  ``model_type`` (transformers' name of the architecture, ``"mpt"`` for ours too; ``""`` when none),
  ``llama_like`` (Llama's block: ``sft.model.generate.LlamaCached`` decodes it) and ``hf_mpt`` (transformers'
  ``MptForCausalLM``, not ours: eager attention, a True-means-blocked mask, converted for decoding).
- :func:`family_of_config`: the same answers from a transformers config, before a model exists (load time).
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
# transformers model types with Llama's block (pre-RMSNorm, RoPE, gated MLP; Qwen2 adds q/k/v biases, Qwen3
# q/k norms): what sft.model.generate.LlamaCached recomputes with a static KV cache
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
BLOCK_PATHS = ("model.layers", "transformer.blocks", "blocks")


@dataclass(frozen=True)
class Family:
    name: str
    ours: bool
    backends: tuple[str, ...]
    compiles: bool
    model_type: str = ""
    llama_like: bool = False

    @property
    def hf_mpt(self) -> bool:
        """transformers' ``MptForCausalLM`` (not ours): eager attention only, its mask True where blocked, no
        cached decoder of its own (``sft.model.mpt.from_hf_model`` makes ours)."""
        return self.model_type == "mpt" and not self.ours


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
    qk_norm: bool = False  # an RMSNorm over each head of q and of k (Qwen3)

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


def is_ours(model) -> bool:
    """Our MPT (sft/model/mpt.py), LoRA-wrapped or not."""
    return hasattr(model, "forward_hidden")


def family(model) -> Family:
    if is_ours(model):
        return Family("mpt (ours)", True, ("flex", "sdpa"), True, "mpt")
    config = getattr(model, "config", None)
    return _transformers_family(config, type(model).__name__, getattr(model, "_supports_flex_attn", False))


def family_of_config(config) -> Family:
    """The :class:`Family` of the transformers model ``config`` builds, known before that model exists (load
    time). Whether transformers has a flex path is the model class's to say: ``backends`` leaves flex out."""
    return _transformers_family(config, type(config).__name__, flex=False)


def _transformers_family(config, fallback: str, flex: bool) -> Family:
    model_type = getattr(config, "model_type", None) or ""
    kind = model_type or fallback
    if kind == "mpt":
        return Family("transformers' mpt", False, ("eager",), False, "mpt")
    backends = (*(("flex",) if flex else ()), "sdpa", "eager")
    return Family(kind, False, backends, kind in COMPILE_FAMILY, model_type, kind in LLAMA_LIKE)


def shape(model) -> Shape:
    c = model.config
    L = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers", 0)
    d = getattr(c, "hidden_size", None) or getattr(c, "d_model", 0)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_heads", 1)
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    ffn = getattr(c, "intermediate_size", None) or int(getattr(c, "expansion_ratio", 4) * d)
    names = [name for name, _ in model.named_modules()]
    gated = any(name.endswith("gate_proj") for name in names)
    qk_norm = any(name.endswith("self_attn.q_norm") for name in names)
    vocab = getattr(c, "vocab_size", 0)
    return Shape(int(L), int(d), int(heads), int(kv), int(head_dim), int(ffn), gated, int(vocab), qk_norm)


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
