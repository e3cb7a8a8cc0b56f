"""Our MPT: the mathematics of MosaicML's MPT / transformers' ``MptForCausalLM``, made fast and packable.

Architecture (MPT-7B and relatives): token embedding tied to the output head; ``n_layers`` pre-LayerNorm
blocks without biases (``x = x + out_proj(attn(norm_1(x)))``, ``x = x + down(gelu(up(norm_2(x))))``);
fused QKV projection; ALiBi positional bias (no position embedding); exact-erf GELU MLP of width
``expansion_ratio * d_model``; a final LayerNorm; logits optionally multiplied by ``logit_scale``.

Attention rule (CONTRACTS.md): query t may attend key s iff ``s <= t`` and
``document_ids[b, s] == document_ids[b, t]``; the ALiBi bias added to the score of (t, s) is
``slope[h] * (s - t)`` (<= 0). transformers adds ``slope[h] * (s - (T - 1))`` instead, which differs by a
constant per query row and so gives the same softmax. Attention implementations (``model.attn_impl``):

- ``"flex"``: ``torch.nn.attention.flex_attention`` compiled; ALiBi as a ``score_mod``, the causal and
  same-document rule as a ``BlockMask`` (the GPU training path);
- ``"flex_eager"``: the same, uncompiled (CPU tests; FlexAttention has no backward on CPU);
- ``"sdpa"``: ``scaled_dot_product_attention`` with the same bias and mask materialised as a float
  ``[B, H, T, T]`` tensor (CPU training, the reference the flex paths are tested against). SDPA wants
  the mask in the query dtype, so in bf16 this path rounds the ALiBi bias to bf16; flex keeps it fp32;
- ``"auto"`` (default): ``"flex"`` on CUDA tensors, ``"sdpa"`` otherwise.

Checkpoints: ``load_mpt`` reads MosaicML ``mpt-7b``-style and transformers-native folders (their state-dict
names are the same: ``transformer.wte.weight``, ``transformer.blocks.{i}.{norm_1,attn.Wqkv,attn.out_proj,
norm_2,ffn.up_proj,ffn.down_proj}.weight``, ``transformer.norm_f.weight``); ``save_hf`` writes what
``transformers.MptForCausalLM.from_pretrained`` loads.

Configuration options this module does not implement are refused with a ``ValueError`` naming the key,
never silently ignored (transformers' own MPT ignores several of them: ``expansion_ratio`` (always 4),
``logit_scale``, ``attn_config.alibi_bias_max`` (always 8), ``no_bias=False``); ``save_hf`` and
``from_hf_model`` refuse configs that transformers would evaluate differently.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from sft.model.recompute import checkpoint_fn

log = logging.getLogger(__name__)

ATTN_IMPLS = ("auto", "flex", "flex_eager", "sdpa")

# Keys every transformers PretrainedConfig carries (4.x and 5.x); none changes MPT's mathematics.
_GENERIC_HF_KEYS = frozenset(
    {
        "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
        "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
        "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16",
        "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
        "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "id2label",
        "label2id", "num_labels", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
        "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
        "task_specific_params", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
        "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
        "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
        "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "output_router_logits", "use_return_dict",
    }
)  # fmt: skip
# MPT keys about initialisation, devices, caching or tokenizers: irrelevant to a forward pass.
_IGNORED_MPT_KEYS = frozenset(
    {"init_device", "init_config", "initializer_range", "use_cache", "verbose", "tokenizer_name",
     "use_pad_tok_in_ffn", "attn_config", "ffn_config"}
)  # fmt: skip
# attn_config keys that only choose a kernel (same mathematics) or are read below.
_ATTN_KEYS = frozenset(
    {"attn_type", "attn_pdrop", "attn_impl", "clip_qkv", "softmax_scale", "prefix_lm", "qk_ln", "qk_gn",
     "fused_qkv", "attn_uses_sequence_id", "sliding_window_size", "alibi", "alibi_bias_max", "rope",
     "rope_theta", "rope_impl", "rope_dail_config", "rope_hf_config", "kv_n_heads", "kv_dim",
     "attn_logit_softcapping", "use_attn_mask"}
)  # fmt: skip


def _refuse(key: str, value: Any, why: str) -> None:
    raise ValueError(f"MPT config: {key}={value!r} is not supported by sft.model.mpt ({why})")


@dataclass
class MPTConfig:
    """The MPT hyper-parameters this implementation supports (defaults: MPT-7B).

    ``ffn_hidden_size`` defaults to ``int(expansion_ratio * d_model)``. ``logit_scale`` multiplies the
    logits (``None`` = 1). ALiBi is always on, biases always off (the only variant implemented).
    """

    d_model: int = 4096
    n_heads: int = 32
    n_layers: int = 32
    expansion_ratio: float = 4
    max_seq_len: int = 2048
    vocab_size: int = 50432
    alibi_bias_max: float = 8
    layer_norm_epsilon: float = 1e-5
    logit_scale: float | None = None
    ffn_hidden_size: int | None = None

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"MPT config: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = int(self.expansion_ratio * self.d_model)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_hf(cls, cfg: dict | Any) -> MPTConfig:
        """Read a transformers ``MptConfig`` or a MosaicML ``config.json`` dict.

        Raises ``ValueError`` naming the key for any option whose value changes the mathematics in a
        way not implemented here, and for any key it does not know (so that a new option is never
        silently dropped). Generic transformers keys and init/device/cache keys are ignored.
        """
        if not isinstance(cfg, dict):
            cfg = cfg.to_dict()
        cfg = dict(cfg)
        if cfg.get("model_type", "mpt") not in ("mpt", ""):
            _refuse("model_type", cfg["model_type"], "not an MPT config")
        known = {f for f in cls.__dataclass_fields__} | {
            "no_bias", "learned_pos_emb", "norm_type", "resid_pdrop", "emb_pdrop", "embedding_fraction",
            "tie_word_embeddings", "fc_type", "block_overrides", "final_logit_softcapping",
        }  # fmt: skip
        for key in cfg:
            if key not in known and key not in _IGNORED_MPT_KEYS and key not in _GENERIC_HF_KEYS:
                _refuse(key, cfg[key], "unknown option; refusing rather than ignoring it")

        attn = cfg.get("attn_config") or {}
        if not isinstance(attn, dict):
            attn = attn.to_dict()
        for key in attn:
            if key not in _ATTN_KEYS and key not in _GENERIC_HF_KEYS:
                _refuse(f"attn_config.{key}", attn[key], "unknown attention option")

        def want(key, value, ok, why):
            if not ok(value):
                _refuse(key, value, why)

        # MosaicML's defaults differ from transformers' (alibi False there): an absent key means the
        # MosaicML default, which for alibi is unsupported.
        want("attn_config.alibi", attn.get("alibi", True), lambda v: v is True, "only ALiBi positions")
        want("attn_config.attn_type", attn.get("attn_type", "multihead_attention"),
             lambda v: v == "multihead_attention", "only multi-head attention")  # fmt: skip
        want("attn_config.attn_pdrop", attn.get("attn_pdrop", 0), lambda v: not v, "no dropout")
        want("attn_config.clip_qkv", attn.get("clip_qkv"), lambda v: v is None, "no QKV clipping")
        want("attn_config.softmax_scale", attn.get("softmax_scale"), lambda v: v is None,
             "only the default 1/sqrt(head_dim)")  # fmt: skip
        want("attn_config.prefix_lm", attn.get("prefix_lm", False), lambda v: not v, "causal LM only")
        want("attn_config.qk_ln", attn.get("qk_ln", False), lambda v: not v, "no QK LayerNorm")
        want("attn_config.qk_gn", attn.get("qk_gn", False), lambda v: not v, "no QK GroupNorm")
        want("attn_config.fused_qkv", attn.get("fused_qkv", True), lambda v: v, "fused Wqkv only")
        want("attn_config.attn_uses_sequence_id", attn.get("attn_uses_sequence_id", False), lambda v: not v,
             "document masking comes from document_ids, not the config")  # fmt: skip
        want("attn_config.sliding_window_size", attn.get("sliding_window_size", -1),
             lambda v: v in (-1, None), "no sliding window")  # fmt: skip
        want("attn_config.rope", attn.get("rope", False), lambda v: not v, "ALiBi, not RoPE")
        want("attn_config.attn_logit_softcapping", attn.get("attn_logit_softcapping"), lambda v: v is None,
             "no softcapping")  # fmt: skip
        n_heads = int(cfg.get("n_heads", 16))
        want("attn_config.kv_n_heads", attn.get("kv_n_heads"), lambda v: v in (None, n_heads),
             "no grouped-query attention")  # fmt: skip
        want("attn_config.kv_dim", attn.get("kv_dim"), lambda v: v is None, "no separate kv_dim")

        want("no_bias", cfg.get("no_bias", True), lambda v: v is True, "bias-free layers only")
        want("norm_type", cfg.get("norm_type", "low_precision_layernorm"),
             lambda v: v in ("layernorm", "low_precision_layernorm"), "LayerNorm only")  # fmt: skip
        # learned_pos_emb=True beside alibi=True: MosaicML's original mpt-7b code and transformers add
        # no position embedding; load_mpt refuses a checkpoint that does carry transformer.wpe.weight.
        for key in ("resid_pdrop", "emb_pdrop"):
            want(key, cfg.get(key, 0), lambda v: not v, "no dropout")
        want("embedding_fraction", cfg.get("embedding_fraction", 1.0), lambda v: v == 1, "must be 1")
        want("tie_word_embeddings", cfg.get("tie_word_embeddings", True), lambda v: v is not False,
             "the output head is tied to the embedding")  # fmt: skip
        fc = cfg.get("fc_type", "torch")
        want("fc_type", fc, lambda v: v == "torch" or v == {"name": "torch"}, "plain nn.Linear only")
        want("block_overrides", cfg.get("block_overrides"), lambda v: not v, "uniform blocks only")
        want("final_logit_softcapping", cfg.get("final_logit_softcapping"), lambda v: v is None,
             "no softcapping")  # fmt: skip

        ffn = cfg.get("ffn_config") or {}
        ffn_hidden = None
        for key, value in ffn.items():
            if key == "ffn_type":
                want("ffn_config.ffn_type", value, lambda v: v == "mptmlp", "MPT's GELU MLP only")
            elif key == "ffn_act_fn":
                want("ffn_config.ffn_act_fn", value,
                     lambda v: v is None or v == {"name": "gelu", "approximate": "none"}, "exact GELU only")  # fmt: skip
            elif key == "ffn_hidden_size":
                ffn_hidden = value
            elif key not in ("fc_type", "bias"):
                _refuse(f"ffn_config.{key}", value, "unknown MLP option")

        logit_scale = cfg.get("logit_scale")
        d_model = int(cfg.get("d_model", 2048))
        if logit_scale == "inv_sqrt_d_model":
            logit_scale = 1 / math.sqrt(d_model)
        elif logit_scale is not None and not isinstance(logit_scale, int | float):
            _refuse("logit_scale", logit_scale, "a number, None or 'inv_sqrt_d_model'")
        return cls(
            d_model=d_model,
            n_heads=n_heads,
            n_layers=int(cfg.get("n_layers", 24)),
            expansion_ratio=cfg.get("expansion_ratio", 4),
            max_seq_len=int(cfg.get("max_seq_len", 2048)),
            vocab_size=int(cfg.get("vocab_size", 50368)),
            alibi_bias_max=attn.get("alibi_bias_max", 8),
            layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
            logit_scale=None if logit_scale is None else float(logit_scale),
            ffn_hidden_size=ffn_hidden,
        )


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8, device=None) -> Tensor:
    """MPT's ALiBi slopes, float32 ``[n_heads]``, exactly as MosaicML / transformers compute them.

    With ``n = 2**ceil(log2(n_heads))``: ``slope_i = 2**(-(i+1) * alibi_bias_max / n)``; for a head count
    that is not a power of two, the odd-indexed then the even-indexed slopes of the ``n`` list, truncated.
    """
    n = 2 ** math.ceil(math.log2(n_heads))
    base = torch.arange(1, n + 1, dtype=torch.int64, device=device).float() * (alibi_bias_max / n)
    slopes = 1.0 / torch.pow(2, base)
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def alibi_document_bias(slopes: Tensor, document_ids: Tensor | None, T: int, B: int = 1) -> Tensor:
    """Float32 ``[B, H, T, T]`` additive attention bias: ``slope[h] * (s - t)`` where query t may attend
    key s (causal and same document), ``-inf`` elsewhere. Every row keeps its diagonal, so no NaN."""
    pos = torch.arange(T, device=slopes.device)
    rel = (pos[None, :] - pos[:, None]).float()  # [t, s] = s - t
    allowed = rel <= 0
    if document_ids is not None:
        allowed = allowed[None] & (document_ids[:, :, None] == document_ids[:, None, :])  # [B, T, T]
    else:
        allowed = allowed[None].expand(B, T, T)
    bias = slopes[None, :, None, None] * rel[None, None]
    return bias.masked_fill(~allowed[:, None], float("-inf"))


def _causal_mask_mod(b, h, q_idx, kv_idx):
    # Module level (not a fresh closure per call) so compiled blocks guard on one function.
    return kv_idx <= q_idx


def document_block_mask(document_ids: Tensor | None, B: int, T: int, device) -> BlockMask:
    """FlexAttention ``BlockMask`` for the attention rule (causal, and same document when given)."""
    # on CUDA the mask is built by a compiled kernel: never a T x T tensor (1 GiB at 32k tokens)
    build = torch.device(device).type == "cuda"
    if document_ids is None:
        return create_block_mask(_causal_mask_mod, None, None, T, T, device=device, _compile=build)

    docs = document_ids

    def doc_mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    return create_block_mask(doc_mask_mod, B, None, T, T, device=device, _compile=build)


def _alibi_score_mod(slopes: Tensor):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return score_mod


# Compiled once per process, lazily (compiling at import would slow every CPU import down).
_flex_compiled = None
# Inductor's FlexAttention kernel needs head_dim >= 16 (triton's tl.dot); below that it raises.
_FLEX_MIN_HEAD_DIM = 16
# Distinct (query length, cache length) prefill shapes compiled for flex before falling back to the
# materialised path: each new shape is a recompile (dynamic=False), which a chat with varying prompt
# lengths would otherwise pay on every turn, and dynamo's cache limit would then silently run eager flex.
_MAX_PREFILL_SHAPES = 8


def _flex(compiled: bool):
    global _flex_compiled
    if not compiled:
        return flex_attention
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


class MPTAttention(nn.Module):
    """Fused-QKV multi-head attention, no biases. ``x [B, T, d] -> [B, T, d]``."""

    def __init__(self, cfg: MPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.Wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q, k, v = self.Wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, H, T, hd]

    def _out(self, y: Tensor) -> Tensor:
        B, H, T, hd = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H * hd))

    def forward(self, x: Tensor, attn: dict) -> Tensor:
        q, k, v = self._qkv(x)
        if attn["impl"] == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn["bias"].to(q.dtype))
        else:
            y = attn["flex_fn"](
                q, k, v, score_mod=_alibi_score_mod(attn["slopes"]), block_mask=attn["block_mask"]
            )
        return self._out(y)

    def forward_cached(self, x: Tensor, bias: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor):
        """Write this step's K/V at ``input_pos`` (dim 2 of ``[B, H, S, hd]`` caches), attend over cache
        slots ``0..n-1`` with ``bias`` (float32 ``[1, H, t, n]``, ``n <= S``, ``-inf`` past each query's
        position): the materialised path (the compiled decode step, CPU, fallbacks)."""
        q, k, v = self._qkv(x)
        k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
        v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
        n = bias.shape[-1]
        keys, values = k_cache[:, :, :n], v_cache[:, :, :n]
        # Scores in the cache dtype, plus the float32 bias, softmax in float32: transformers' order. A
        # bf16 bias would round slope * distance by up to |bias| / 256 at long range.
        scores = (q @ keys.transpose(-1, -2)) * (self.head_dim**-0.5) + bias
        y = torch.softmax(scores.float(), dim=-1).to(v_cache.dtype) @ values
        return self._out(y)

    def forward_cached_flex(
        self, x: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor, flex_fn, score_mod, block_mask
    ) -> Tensor:
        """Like :meth:`forward_cached`, attending through FlexAttention over the whole cache: the ALiBi
        bias is added in float32 inside the kernel (``score_mod``), ``block_mask`` skips key blocks past
        the last position, so no ``[t, S]`` score tensor is materialised (the prefill path on CUDA)."""
        q, k, v = self._qkv(x)
        k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
        v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
        y = flex_fn(q.to(k_cache.dtype), k_cache, v_cache, score_mod=score_mod, block_mask=block_mask)
        return self._out(y.to(x.dtype))


class MPTMLP(nn.Module):
    def __init__(self, cfg: MPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class MPTBlock(nn.Module):
    """Pre-LayerNorm block; LayerNorms have a weight and no bias (``no_bias=True``)."""

    def __init__(self, cfg: MPTConfig):
        super().__init__()
        self.norm_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, bias=False)
        self.attn = MPTAttention(cfg)
        self.norm_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, bias=False)
        self.ffn = MPTMLP(cfg)
        # Non-persistent buffers (not in the state dict): cudagraphs treat buffers as static addresses,
        # so the in-place cache writes of a compiled decode step stay inside the captured graph.
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x: Tensor, attn: dict, selective: bool = False) -> Tensor:
        """``selective``: recompute the cheap ops in backward (sft/model/recompute.py). The checkpoint is
        inside ``forward``, so a compiled block traces it with its policy."""
        if selective:
            return checkpoint_fn("selective")(self._forward, x, attn)
        return self._forward(x, attn)

    def _forward(self, x: Tensor, attn: dict) -> Tensor:
        x = x + self.attn(self.norm_1(x), attn)
        return x + self.ffn(self.norm_2(x))

    def forward_cached(self, x: Tensor, bias: Tensor, input_pos: Tensor) -> Tensor:
        x = x + self.attn.forward_cached(self.norm_1(x), bias, input_pos, self.k_cache, self.v_cache)
        return x + self.ffn(self.norm_2(x))

    def forward_cached_flex(self, x: Tensor, input_pos: Tensor, flex_fn, score_mod, block_mask) -> Tensor:
        y = self.attn.forward_cached_flex(
            self.norm_1(x), input_pos, self.k_cache, self.v_cache, flex_fn, score_mod, block_mask
        )
        x = x + y
        return x + self.ffn(self.norm_2(x))


class _Transformer(nn.Module):
    # Exists so that state-dict names are MosaicML's / transformers' ("transformer.blocks.0...").
    def __init__(self, cfg: MPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(MPTBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, bias=False)


class MPTForCausalLM(nn.Module):
    """MPT causal LM. Parameters: ``transformer.wte.weight [V, d]`` (also the output head),
    per block ``norm_1/norm_2.weight [d]``, ``attn.Wqkv.weight [3d, d]`` (rows q, k, v),
    ``attn.out_proj.weight [d, d]``, ``ffn.up_proj.weight [f, d]``, ``ffn.down_proj.weight [d, f]``;
    ``transformer.norm_f.weight [d]``.

    ``attn_impl``: see the module docstring. ``gradient_checkpointing``: recompute each block in backward
    (non-reentrant ``torch.utils.checkpoint``) when training; ``checkpoint_blocks = N``: only the first N
    blocks (the memory plan of sft/training/memory.py chooses N); ``selective_blocks = M``: the next M blocks
    recompute only their cheap ops (sft/model/recompute.py; ``set_recompute`` sets both).
    ``cached_prefill_impl``: attention of an
    eager multi-token ``forward_cached`` (the prefill): ``"auto"`` (compiled flex on CUDA when
    ``head_dim >= 16``, else ``"math"``), ``"flex"``, ``"flex_eager"`` (uncompiled; CPU tests of the flex
    prefill), ``"math"`` (float32 bias materialised over the filled keys).
    """

    def __init__(self, config: MPTConfig, attn_impl: str = "auto"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r}; expected one of {ATTN_IMPLS}")
        self.config = config
        self.attn_impl = attn_impl
        self.gradient_checkpointing = False
        self.checkpoint_blocks = 0
        self.selective_blocks = 0
        self.transformer = _Transformer(config)
        self._cache_len = 0
        self._warned_small_head = False
        # Cached (inference) attention for t > 1 outside a compiled graph: see forward_cached.
        self.cached_prefill_impl = "auto"
        self._prefill_flex_failed = False
        self._prefill_shapes: set[tuple[int, int]] = set()
        self._prefill_masks: dict[tuple[int, int, int], BlockMask] = {}

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for tests and benchmarks: Linear/Embedding ~ N(0, std), LayerNorm weights 1."""
        for name, p in self.named_parameters():
            if name.endswith(("norm_1.weight", "norm_2.weight", "norm_f.weight")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)

    @property
    def lm_head_weight(self) -> Tensor:
        """The output head ``[V, d]``: the token embedding itself (tied)."""
        return self.transformer.wte.weight

    # ---------------------------------------------------------------- training / scoring path
    def _resolve_impl(self, device: torch.device) -> str:
        impl = self.attn_impl
        if impl == "auto":
            impl = "flex" if device.type == "cuda" else "sdpa"
        if impl == "flex" and device.type == "cuda" and self.config.head_dim < _FLEX_MIN_HEAD_DIM:
            # Inductor's flex kernel raises NotImplementedError for head_dim < 16 (tl.dot needs >= 16).
            if not self._warned_small_head:
                log.warning(
                    "head_dim=%d < %d: compiled FlexAttention cannot run on CUDA; using sdpa",
                    self.config.head_dim,
                    _FLEX_MIN_HEAD_DIM,
                )
                self._warned_small_head = True
            impl = "sdpa"
        return impl

    def forward_hidden(self, input_ids: Tensor, document_ids: Tensor | None = None) -> Tensor:
        """``input_ids`` long ``[B, T]``, ``document_ids`` int ``[B, T]`` (non-decreasing per row) or None
        (one document per row) -> final-LayerNorm hidden states ``[B, T, d]`` in the parameters' dtype.

        Attention: query t sees key s iff ``s <= t`` and (when given) the same document id, so a packed
        row computes what each of its documents computes alone.
        """
        B, T = input_ids.shape
        tr = self.transformer
        impl = self._resolve_impl(input_ids.device)
        slopes = alibi_slopes(self.config.n_heads, self.config.alibi_bias_max, device=input_ids.device)
        if impl == "sdpa":
            attn = {"impl": impl, "bias": alibi_document_bias(slopes, document_ids, T, B)}
        else:
            attn = {
                "impl": impl,
                # resolved here, outside any compiled block, so the lazy torch.compile never runs in a trace
                "flex_fn": _flex(impl == "flex"),
                "slopes": slopes,
                "block_mask": document_block_mask(document_ids, B, T, input_ids.device),
            }
        x = tr.wte(input_ids)
        n_full = len(tr.blocks) if self.gradient_checkpointing else self.checkpoint_blocks
        n_sel = 0 if self.gradient_checkpointing else self.selective_blocks
        recompute = self.training and torch.is_grad_enabled()
        for i, block in enumerate(tr.blocks):
            if recompute and i < n_full:  # the checkpoint wraps the (compiled) block
                x = checkpoint_fn("full")(block, x, attn)
            elif recompute and i < n_full + n_sel:
                x = block(x, attn, selective=True)
            else:
                x = block(x, attn)
        return tr.norm_f(x)

    def _logits(self, h: Tensor) -> Tensor:
        logits = F.linear(h, self.lm_head_weight)
        if self.config.logit_scale is not None:
            logits = logits * self.config.logit_scale
        return logits

    def forward(self, input_ids: Tensor, document_ids: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, V]`` (times ``logit_scale`` if set), same dtype as the parameters."""
        return self._logits(self.forward_hidden(input_ids, document_ids))

    def compile_blocks(self, **kw) -> None:
        """``torch.compile`` each block in place (GPU path; all blocks share one compiled graph)."""
        for block in self.transformer.blocks:
            block.compile(**kw)

    # ---------------------------------------------------------------- static KV cache (inference)
    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> None:
        """Allocate zeroed K/V caches ``[batch_size, H, max_seq_len, head_dim]`` per block (not in the
        state dict). ``dtype``/``device`` default to the parameters'."""
        p = self.transformer.wte.weight
        dtype, device = dtype or p.dtype, device or p.device
        shape = (batch_size, self.config.n_heads, max_seq_len, self.config.head_dim)
        for block in self.transformer.blocks:
            block.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            block.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self._cache_len = max_seq_len
        self._prefill_masks.clear()

    def release_cache(self) -> None:
        """Drop the K/V caches and the cached prefill masks (``setup_cache`` allocates them again): a
        model sampled from during training carries no inference state into the next step."""
        for block in self.transformer.blocks:
            block.k_cache = None
            block.v_cache = None
        self._cache_len = 0
        self._prefill_masks.clear()

    def _use_flex_prefill(self, t: int, device: torch.device) -> bool:
        """Whether a t-token eager ``forward_cached`` goes through compiled FlexAttention."""
        impl = self.cached_prefill_impl
        if impl == "math" or t == 1 or torch.compiler.is_compiling() or self._prefill_flex_failed:
            return False
        if impl == "auto" and (device.type != "cuda" or self.config.head_dim < _FLEX_MIN_HEAD_DIM):
            return False
        shape = (t, self._cache_len)
        if shape not in self._prefill_shapes:
            if len(self._prefill_shapes) >= _MAX_PREFILL_SHAPES:
                log.info("prefill shape %s: %d flex shapes compiled already; using the materialised path",
                         shape, _MAX_PREFILL_SHAPES)  # fmt: skip
                return False
            self._prefill_shapes.add(shape)
        return True

    def _prefill_block_mask(self, input_pos: Tensor, t: int) -> BlockMask:
        # Query i (absolute position input_pos[i] = first + i: positions are contiguous) may attend
        # cache slot s iff s <= first + i. Depends only on (t, cache length, first): cached, so a repeated
        # prompt length does not rebuild it (it costs a [t, S] mask evaluation).
        first = int(input_pos[0])
        key = (t, self._cache_len, first)
        mask = self._prefill_masks.get(key)
        if mask is None:
            offset = torch.tensor(first, device=input_pos.device)

            def offset_causal(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + offset

            mask = create_block_mask(offset_causal, None, None, t, self._cache_len, device=input_pos.device)
            if len(self._prefill_masks) >= 16:
                self._prefill_masks.pop(next(iter(self._prefill_masks)))
            self._prefill_masks[key] = mask
        return mask

    def forward_cached(self, input_ids: Tensor, input_pos: Tensor, logits_to_keep: int = 0) -> Tensor:
        """``input_ids [B, t]`` at absolute positions ``input_pos`` (long ``[t]``, contiguous and
        increasing, all ``< max_seq_len`` of ``setup_cache``) -> logits ``[B, t, V]``, or
        ``[B, logits_to_keep, V]`` (the last positions only) when ``logits_to_keep > 0``.

        Writes each block's K/V at ``input_pos``; query i attends to cache slots ``s <= input_pos[i]``
        with bias ``slope * (s - input_pos[i])``, softmax in float32. Three attention paths, same rule:

        - inside a compiled graph (the t=1 decode step): the whole cache under a float32 bias ``[1, H,
          t, S]`` built once per forward; shapes are static, so it compiles with
          ``mode="reduce-overhead"`` and has no host sync;
        - eager, t > 1, CUDA, ``head_dim >= 16`` (``cached_prefill_impl="auto"`` or ``"flex"``): compiled
          FlexAttention with ALiBi as a float32 ``score_mod`` and a causal block mask offset by
          ``input_pos[0]`` (one host read of it); each new ``(t, S)`` compiles once (at most 8 shapes,
          then the next path). Any failure logs a warning and falls back to the next path for good;
        - otherwise (CPU, ``"math"``, fallbacks): the float32 bias materialised over keys
          ``0..input_pos[-1]`` only (one host read of it), not the whole static cache.
        """
        if self._cache_len == 0:
            raise RuntimeError("call setup_cache(batch_size, max_seq_len) before forward_cached")
        t = input_ids.shape[1]
        dev = input_ids.device
        slopes = alibi_slopes(self.config.n_heads, self.config.alibi_bias_max, device=dev)
        x = self.transformer.wte(input_ids)
        h = None
        if self._use_flex_prefill(t, dev):
            try:
                h = self._blocks_cached_flex(x, input_pos, slopes)
            except Exception as e:  # a kernel/compile failure must not stop generation: math path is exact
                log.warning("flex prefill failed (%s: %s); using the materialised path from now on",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")  # fmt: skip
                self._prefill_flex_failed = True
        if h is None:
            h = self._blocks_cached_math(x, input_pos, slopes)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self._logits(self.transformer.norm_f(h))

    def _blocks_cached_flex(self, x: Tensor, input_pos: Tensor, slopes: Tensor) -> Tensor:
        t = x.shape[1]
        block_mask = self._prefill_block_mask(input_pos, t)
        pos = input_pos

        def alibi_at_pos(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - pos[q_idx])

        flex_fn = _flex(self.cached_prefill_impl != "flex_eager")
        for block in self.transformer.blocks:
            x = block.forward_cached_flex(x, input_pos, flex_fn, alibi_at_pos, block_mask)
        return x

    def _blocks_cached_math(self, x: Tensor, input_pos: Tensor, slopes: Tensor) -> Tensor:
        n_keys = self._cache_len
        if not torch.compiler.is_compiling() and (x.shape[1] > 1 or x.device.type == "cpu"):
            n_keys = int(input_pos[-1]) + 1  # eager: keys past the last position are never attended
        s = torch.arange(n_keys, device=x.device)
        rel = (s[None, :] - input_pos[:, None]).float()  # [t, n]
        # Built once per forward (not per block): float32 [1, H, t, n].
        bias = (slopes[:, None, None] * rel[None]).masked_fill(rel[None] > 0, float("-inf"))[None]
        for block in self.transformer.blocks:
            x = block.forward_cached(x, bias, input_pos)
        return x


# -------------------------------------------------------------------- checkpoints
_BLOCK_PARAMS = (
    "norm_1.weight", "attn.Wqkv.weight", "attn.out_proj.weight", "norm_2.weight",
    "ffn.up_proj.weight", "ffn.down_proj.weight",
)  # fmt: skip


def _resolve_folder(path_or_id: str, allow_pickle: bool) -> Path:
    path = Path(path_or_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors"] + (["*.bin"] if allow_pickle else [])
    # Offline-safe: with HF_HUB_OFFLINE=1 this resolves from the local cache or raises at once.
    return Path(snapshot_download(str(path_or_id), allow_patterns=patterns))


def _read_state_dict(folder: Path, allow_pickle: bool) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as _load_file

    def load_file(path: Path) -> dict[str, Tensor]:
        # a truncated or corrupt file: one line naming it, not the Rust deserializer's message alone
        try:
            return _load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {path} ({e}); is the file complete?") from None

    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        sd: dict[str, Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(folder / shard))
        return sd
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        if not allow_pickle:
            raise ValueError(
                f"{folder} holds only pickle weights ({bins[0].name}); pickles can run code when loaded. "
                "Convert them to safetensors, or pass allow_pickle=True if you trust the source."
            )
        sd = {}
        for b in bins:  # weights_only=True: tensors only, even when pickles are allowed
            sd.update(torch.load(b, map_location="cpu", weights_only=True))
        return sd
    raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or *.bin in {folder}")


def load_state_dict_into(model: MPTForCausalLM, sd: dict[str, Tensor], *, dtype, device) -> None:
    """Assign a MosaicML/transformers MPT state dict to ``model`` (cast to ``dtype``, moved to ``device``).

    Accepts an optional ``lm_head.weight`` only if equal to the embedding (tied); refuses
    ``transformer.wpe.weight`` (learned positions are not implemented) and any missing/unexpected key.
    """
    sd = dict(sd)
    if "transformer.wpe.weight" in sd:
        raise ValueError("checkpoint has transformer.wpe.weight (learned positions): not supported")
    head = sd.pop("lm_head.weight", None)
    if (
        head is not None
        and "transformer.wte.weight" in sd
        and not torch.equal(head, sd["transformer.wte.weight"])
    ):
        raise ValueError(
            "checkpoint's lm_head.weight differs from transformer.wte.weight: untied head not supported"
        )
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"MPT checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_mpt(
    path_or_id: str | os.PathLike, *, dtype=torch.float32, device="cpu", allow_pickle: bool = False
) -> MPTForCausalLM:
    """Load an MPT from a local folder or a hub id (resolved through the local cache when offline).

    Weights: ``model.safetensors``, sharded ``model.safetensors.index.json``, or — only with
    ``allow_pickle=True`` — ``pytorch_model*.bin``. Config: ``config.json`` read by ``MPTConfig.from_hf``
    (MosaicML or transformers keys). Returns the model in eval mode with ``attn_impl="auto"``.
    """
    folder = _resolve_folder(str(path_or_id), allow_pickle)
    cfg = MPTConfig.from_hf(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = MPTForCausalLM(cfg)
    load_state_dict_into(model, _read_state_dict(folder, allow_pickle), dtype=dtype, device=device)
    log.info("loaded MPT %s from %s (%s, %s)", asdict(cfg), folder, dtype, device)
    return model.eval()


def _check_hf_expressible(cfg: MPTConfig) -> None:
    # transformers' MPT hard-codes a 4x MLP and ignores logit_scale: refuse rather than write a
    # checkpoint that it would load into a different function.
    if cfg.ffn_hidden_size != 4 * cfg.d_model:
        raise ValueError(f"transformers' MptForCausalLM only has a 4*d_model MLP; got {cfg.ffn_hidden_size}")
    if cfg.logit_scale is not None:
        raise ValueError("transformers' MptForCausalLM ignores logit_scale; cannot express logit_scale set")
    if cfg.alibi_bias_max != 8:
        # MptModel.forward calls build_mpt_alibi_tensor without it, so the default 8 is always used.
        raise ValueError(
            f"transformers' MptForCausalLM ignores alibi_bias_max (uses 8); got {cfg.alibi_bias_max}"
        )


def hf_config(cfg: MPTConfig):
    """The ``transformers.MptConfig`` computing the same function as ``cfg``."""
    from transformers import MptConfig

    _check_hf_expressible(cfg)
    return MptConfig(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        expansion_ratio=4,
        max_seq_len=cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        learned_pos_emb=False,  # ALiBi only: tells MosaicML's code, too, not to build a wpe
        attn_config={"alibi": True, "alibi_bias_max": cfg.alibi_bias_max},
        no_bias=True,
        logit_scale=None,
        architectures=["MptForCausalLM"],
    )


def save_hf(model: MPTForCausalLM, out_dir: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers.MptForCausalLM.from_pretrained``
    loads into the same function (tied head: ``lm_head.weight`` is not stored). Weights keep their dtype."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config(model.config).save_pretrained(out)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})


def from_hf_model(hf) -> MPTForCausalLM:
    """Our model with the same weights (shared storage, same dtype/device) as a transformers
    ``MptForCausalLM``; refuses configs that transformers evaluates differently from their keys."""
    cfg = MPTConfig.from_hf(hf.config)
    _check_hf_expressible(cfg)
    p = hf.transformer.wte.weight
    with torch.device("meta"):
        model = MPTForCausalLM(cfg)
    sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("lm_head.")}
    load_state_dict_into(model, sd, dtype=p.dtype, device=p.device)
    return model
