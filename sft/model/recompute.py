"""Recomputation in backward, block by block, to fit activations: a block saves everything (``none``),
recomputes whole (``full``), or recomputes only its cheap ops (``selective``: the outputs of matmuls and of
the attention kernel are kept; norms, activations, the gated product, RoPE, casts, elementwise ops are not).

Contracts:
- ``MODES = ("none", "full", "selective")``.
- ``policy(ctx, func, *args, **kwargs) -> CheckpointPolicy``: ``MUST_SAVE`` for :data:`SAVE_OPS` (``mm``,
  ``addmm``, ``bmm``, ``baddbmm``, ``_scaled_mm``; the SDPA kernels of every backend, CPU included;
  FlexAttention's higher-order op, which torch redirects to the SAC modes, eager and compiled; a compiled
  region inside an eager checkpoint, where torch wraps it in a higher-order op (inductor's
  ``wrap_inductor_compiled_regions``); full ``max`` reductions, an FP8 scale), ``PREFER_RECOMPUTE`` for
  every other op.
- ``checkpoint_fn(mode) -> callable``: ``mode`` ``"full"`` or ``"selective"`` (ValueError otherwise);
  ``fn(function, *args, **kwargs)`` is non-reentrant ``torch.utils.checkpoint.checkpoint`` (``selective``:
  with :func:`policy` as its ``context_fn``).
  A transformers block gets the checkpoint inside its own ``forward`` (an instance attribute, set by
  :func:`set_recompute`; transformers' flag stays off) and our MPT checkpoints a selective block inside
  ``MPTBlock.forward``, so a compiled block (``block.compile()``) traces the checkpoint with its policy and the
  partitioner keeps only the saved ops' outputs that backward reads. (A selective checkpoint *around* a
  compiled region sees none of its ops and recomputes it whole: transformers 5.17 checkpoints in
  ``__call__``, and there a compiled Llama block's "selective" kept no more than "full", measured on an H100
  on 2026-12-07.)
- ``set_recompute(model, full, selective=0)``: blocks ``0..full-1`` recompute whole, the next ``selective``
  selectively, the rest save everything; transformers ``GradientCheckpointingLayer`` blocks and our MPT,
  LoRA-injected or not. ConfigError (one line) for a count that is not a whole number >= 0, ``full +
  selective`` above the blocks, or blocks that cannot be checkpointed one by one. ``set_recompute(model, n,
  0)`` is ``--checkpoint_blocks=n`` (``sft.training.engine.set_checkpoint_blocks``).
- ``recompute_modes(model) -> list[str]``: each block's mode as set.
- ``kept_bytes(fn, *args, **kwargs) -> (out, bytes)``: what the call keeps alive for backward, measured;
  ``saved_bytes``: what autograd saved, by ``saved_tensors_hooks`` (blind inside a checkpoint).
- ``kept_elements(shape, mode, compiled=True) -> float``: elements of ``d`` per token one block keeps
  (:data:`KEPT`).

What a block keeps, in elements of ``d`` per token (bf16), ``q = qkv_width / d``, ``f = ffn_width / d``, plus
the attention's fp32 log-sum-exp (``2 * heads / d``) in none and selective; measured with :func:`kept_bytes`
on the CPU (SDPA; tests/test_recompute.py pins the numbers, eager and compiled):

=============  ==============  ==============  ===============================================================
mode           Llama, gated    MPT, GELU       what
=============  ==============  ==============  ===============================================================
none compiled  ``5 + q + 3f``  ``5 + q + 2f``  memory.py's ``ACT_BASE`` (5.1, H200-calibrated) is this 5
selective c.   ``3 + q + 2f``  ``3 + q + f``   input, q/k/v, attention out, out-proj out, FFN up (and gate)
full           ``1``           ``1``           the input
none eager     ``9 + q + 4f``  ``5 + q + 2f``  transformers' RMSNorm keeps fp32 copies of its input
selective e.   ``4 + q + 2f``  ``4 + q + f``   + the FFN's down-projection output (SAC caches it, unread)
=============  ==============  ==============  ===============================================================

Selective keeps ``2 + f`` fewer than none (compiled): both norms' outputs and the activation (SiLU(gate) x up,
or GELU(up)) are recomputed. For the memory plan: ``activation_elements_per_layer(model) - 2 - ffn/d``.
Attention backends: SDPA on the CPU (``_scaled_dot_product_flash_attention_for_cpu``) and FlexAttention on the
GPU both keep the output and its log-sum-exp, so the formulas should hold for both (the GPU tests of
tests/test_recompute.py assert it for FlexAttention); with our MPT's ``sdpa`` path an un-recomputed block
also keeps the bf16 copy of the materialised ALiBi bias (``heads * T / d``: 8 elements of d at T=128 in the
tests; selective and full recompute the cast).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")


def _aten(*names: str) -> set:
    """The ``.default`` overloads of the named aten ops (one this torch lacks is skipped)."""
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


_SAVED = (
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm",
    # SDPA, by backend: CUDA flash / efficient / cuDNN, the CPU flash kernel, other devices, the math path
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable", "_scaled_dot_product_attention_math",
    # a full reduction (a scalar): the amax of an FP8 scale, saved so the recompute casts alike
    "max",
)  # fmt: skip
# ... and two higher-order ops: FlexAttention's (output and log-sum-exp; torch redirects it to the SAC modes,
# so the policy sees it in a compiled block's trace); a compiled region called inside an eager selective
# checkpoint (a compiled FlexAttention), visible only when compiled with ``wrap_inductor_compiled_regions``
_HOPS = ("flex_attention", "inductor_compiled_code")
SAVE_OPS = frozenset(
    _aten(*_SAVED)
    | {getattr(torch._higher_order_ops, n) for n in _HOPS if hasattr(torch._higher_order_ops, n)}
)


def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Selective recomputation's rule (module docstring)."""
    return CheckpointPolicy.MUST_SAVE if func in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """A fresh pair of SAC contexts (``context_fn`` of ``torch.utils.checkpoint.checkpoint``)."""
    return create_selective_checkpoint_contexts(policy)


_CHECKPOINT = {
    "full": functools.partial(checkpoint, use_reentrant=False),
    "selective": functools.partial(checkpoint, use_reentrant=False, context_fn=selective_context),
}


def checkpoint_fn(mode: str):
    """The checkpoint callable of ``mode`` (``"full"`` or ``"selective"``); ValueError for any other."""
    if mode not in _CHECKPOINT:
        raise ValueError(f"recompute mode {mode!r}: expected one of {', '.join(_CHECKPOINT)}")
    return _CHECKPOINT[mode]


def _counts(full, selective, n_blocks: int) -> None:
    from sft.config import ConfigError

    for name, n in (("full", full), ("selective", selective)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"recompute: {name}={n!r} blocks; expected a whole number >= 0")
    if full + selective > n_blocks:
        raise ConfigError(
            f"recompute: full={full} + selective={selective} blocks, but the model has {n_blocks}"
        )


def set_recompute(model, full: int, selective: int = 0) -> None:
    """Blocks ``0..full-1`` recompute whole, the next ``selective`` selectively, the rest save everything
    (module docstring)."""
    from sft.model.family import family, is_ours, transformer_blocks

    blocks = transformer_blocks(model)
    _counts(full, selective, len(blocks))
    if is_ours(model):  # sft/model/mpt.py reads these in forward_hidden
        model.gradient_checkpointing = False
        model.checkpoint_blocks, model.selective_blocks = full, selective
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    if full + selective and not all(isinstance(b, GradientCheckpointingLayer) for b in blocks):
        from sft.config import ConfigError

        raise ConfigError(f"{family(model).name}: its blocks cannot be checkpointed one by one")
    for i, block in enumerate(blocks):
        mode = "full" if i < full else "selective" if i < full + selective else "none"
        _checkpoint_forward(block, mode)


def _checkpoint_forward(block, mode: str) -> None:
    """A transformers block recomputes in ``mode`` through its own ``forward`` (an instance attribute that
    ``block.compile()`` traces: the checkpoint and its policy are inside the compiled region on every
    transformers version; transformers' own flag stays off, since 5.17 checkpoints in ``__call__``, outside
    a compiled ``_call_impl``, where a selective policy sees one opaque region and recomputes it whole)."""
    block.gradient_checkpointing = False
    block.__dict__.pop("forward", None)
    block._sft_recompute = mode
    if mode == "none":
        return
    inner, ckpt = block.forward, _CHECKPOINT[mode]

    def forward(*args, **kwargs):
        if not (block.training and torch.is_grad_enabled()):
            return inner(*args, **kwargs)
        if kwargs.get("use_cache"):  # a recomputation would write the cache twice
            kwargs["use_cache"] = False
        kwargs.pop("past_key_values", None)
        return ckpt(functools.partial(inner, **kwargs), *args)

    block.forward = forward


def recompute_modes(model) -> list[str]:
    """Each block's mode (``none`` | ``full`` | ``selective``) as :func:`set_recompute` left it."""
    from sft.model.family import is_ours, transformer_blocks

    blocks = transformer_blocks(model)
    if is_ours(model):
        if model.gradient_checkpointing:
            return ["full"] * len(blocks)
        full, sel = model.checkpoint_blocks, getattr(model, "selective_blocks", 0)
        return ["full" if i < full else "selective" if i < full + sel else "none" for i in range(len(blocks))]
    return [getattr(b, "_sft_recompute", "none") for b in blocks]


def _storage_bytes(tree) -> int:
    seen = {}
    for t in torch.utils._pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def kept_bytes(fn, *args, **kwargs) -> tuple[object, int]:
    """``(fn(*args, **kwargs), bytes it keeps alive for backward)``: the net allocations of the call (the CPU
    profiler's memory events: what autograd saved, a selective checkpoint's cache, a checkpoint's RNG state)
    less its output. Tensors made before the call (weights, an input) are not counted even where kept: make
    the block's input inside ``fn`` to count it. For measurements and tests."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args, **kwargs)
    net = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return out, net - _storage_bytes(out)


def saved_bytes(fn, *args, **kwargs) -> tuple[object, int]:
    """``(fn(*args, **kwargs), bytes of the unique storages autograd saved for backward)``, counted by
    ``saved_tensors_hooks``. Blind inside a checkpoint (its own hooks are innermost; only the inputs it saves
    show): for plain blocks."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, sum(storages.values())


# Elements of d per token one block keeps for backward, bf16, measured with kept_bytes and saved_bytes on the
# CPU (tests/test_recompute.py pins them): (compiled, mode) -> (base, f coefficient) for the Llama family
# (gated SiLU FFN, RMSNorm) and MPT (GELU FFN, LayerNorm); plus q = qkv_width / d (not in full), f = ffn / d
# (a coefficient of 1 for q everywhere).
KEPT = {
    # compiled blocks, the GPU path (the partitioner keeps what backward reads): none keeps the block input,
    # both norms' outputs, q/k/v, the attention output, the FFN's projections and activation (memory.py's
    # ACT_BASE, 5.1, calibrated on the H200, is this 5); selective recomputes the norms (2) and the activation
    # (f, and SiLU x up): 2 + f fewer; full keeps the block input
    (True, "none"): {"llama": (5, 3), "mpt": (5, 2)},
    (True, "selective"): {"llama": (3, 2), "mpt": (3, 1)},
    (True, "full"): {"llama": (1, 0), "mpt": (1, 0)},
    # eager: transformers' RMSNorm keeps fp32 copies of its input (9 + q + 4f); selective also keeps the
    # output of the FFN's last matmul, which backward never reads (SAC caches every saved op's output): 1 more
    (False, "none"): {"llama": (9, 4), "mpt": (5, 2)},
    (False, "selective"): {"llama": (4, 2), "mpt": (4, 1)},
    (False, "full"): {"llama": (1, 0), "mpt": (1, 0)},
}


def kept_elements(shape, mode: str, compiled: bool = True) -> float:
    """Elements of ``d`` per token one block in ``mode`` keeps for backward (:data:`KEPT`; ``shape``: a
    :class:`sft.model.family.Shape`, gated = the Llama family), bf16, with the attention's fp32 log-sum-exp
    (``2 * heads / d``). Not included: what the blocks share (RoPE's cos/sin, a materialised mask or ALiBi
    bias); and, for our MPT's ``sdpa`` path, the bf16 copy of the ALiBi bias that an un-recomputed block
    keeps (``heads * T / d``; selective and full recompute it)."""
    base, per_f = KEPT[(compiled, mode)]["llama" if shape.gated else "mpt"]
    d = shape.width
    q, lse = (0, 0) if mode == "full" else (shape.qkv_width / d, 2 * shape.heads / d)
    return base + q + per_f * shape.ffn / d + lse
