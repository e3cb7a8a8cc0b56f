"""The memory plan of a run, chosen before step 0: which blocks recompute in backward, whether the
optimizer steps inside backward, and whether the run fits at all.

Contracts:
- ``estimate_memory(model, work, autocast, world=1, checkpoint_blocks=0, in_backward=False) -> dict``:
  predicted peak bytes of one training process by part (``weights``, ``grads``, ``optimizer``,
  ``activations``, ``total``), from the loaded model (training dtype, before LoRA) and the step's
  :class:`Workload` alone (``Workload.of(cfg)``).
- ``plan_memory(model, cfg, device, autocast, world=1) -> MemoryPlan``: the one place the config's memory
  knobs are read (what follows takes the plan, see ``sft.training.engine.Resolved``): resolves
  ``--optimizer=auto``, the micro-batch split, ``--checkpoint_blocks`` (``auto`` = the fewest that fit),
  ``--optimizer_in_backward`` (``auto`` = on only where it is allowed and needed to fit) and
  ``--offload_optimizer`` (``auto``: the state in host memory, sft/training/offload.py, where nothing else
  runs at full speed and it is the fastest plan: the GPU then holds two staging slots of the largest
  parameter's state, the host the whole state, and each step pays the host link's time) against
  ``--memory_limit_gib`` (0 = the device's free memory); raises ConfigError (one line: the estimate by
  part, the limit, what to change) when nothing fits.

The activation model (calibrated on the committed H200 peaks, MPT-7B shape, ``runs/2026-11-30_h200_mpt7b_*``
and ``runs/20261130-062524_mpt-7b-random_guanaco-1k``: 54.5 / 70.7 / 86.8 / 102.9 GiB at 2 / 4 / 6 / 8 rows
of 2,048, 68.0 GiB with 16 of 32 blocks checkpointed, 75.5 GiB with 8 and the step in backward, 95.4 GiB for
the recipe at 4 rows x 4 micro-batches): a block that is not checkpointed keeps
``ACT_BASE + qkv_width/d + (3 if gated else 2) * ffn_width/d`` elements of ``d`` per token for backward
(16.1 for MPT: block input, norms, q/k/v, attention output and its log-sum-exp, FFN input, up projection
and GELU output); a checkpointed block keeps its input (1), plus one block's full set while it is recomputed
(by then backward has freed the sets of the un-checkpointed blocks after it). With ``--recompute=selective`` a
selectively recomputed block keeps ``2 + ffn/d`` fewer (both norms' outputs and the FFN activation are
recomputed; sft/model/recompute.py, measured on the CPU; with FlexAttention a Llama-family block also recomputes
RoPE's q and k, ``(heads + kv_heads) * head_dim / d`` more, measured on an H100), and the plan turns blocks
selective before it turns them full. A model with per-head norms of q and k (Qwen3) keeps ``(heads + kv_heads) * (head_dim + 2) / d`` more
(their bf16 outputs and fp32 statistics; measured on a compiled block on the CPU: 14.88 against Llama's 13.19).
Under transformers' FlexAttention path a model whose query head count is not a power of two keeps copies of k
and v for every query head, ``2 * (heads - kv_heads) * head_dim / d`` more (:func:`repeated_kv`; Qwen3-14B 1.6).
The peak is ``weights + optimizer state + dynamic`` (with the optimizer state on the host: ``weights +
max(dynamic, grads + staging slots)``, the slots living only through the optimizer step) where ``dynamic``
is, at the start of backward, the activations; during backward the activations are freed as the gradients appear, so
``max(activations, grads)`` with one micro-batch per step, ``grads + activations`` with accumulation (the
gradients of the earlier micro-batches are alive during the next forward), and ``activations`` alone with
the step in backward (each gradient is freed as soon as it is used). Plus one loss chunk of fp32 logits
and their gradient, and the head's gradient twice (the sum over the loss chunks so far and the current chunk's,
both alive at the start of backward: this term brought the Llama-3-8B-shape estimates from 1-3% under to within
1% of the committed peaks); for the materialised-mask attention paths the ``T x T`` mask (and MPT's fp32 ALiBi bias);
and 1 GiB of kernel workspaces for GPU-sized steps.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path

import torch

from sft.config import ConfigError, TrainConfig, parse_targets
from sft.model.family import is_ours, shape, transformer_blocks
from sft.training.offload import offload_refusal, offload_seconds

log = logging.getLogger("sft")

GIB = 2**30
# --optimizer=auto on bf16 weights: the most precise first (sft/training/optim.py)
AUTO_OPTIMIZERS = ("adamw_kahan", "adamw_sr", "adamw_8bit")
# the speed model that ranks plans (time per token relative to the plan with nothing recomputed): a
# checkpointed block runs its forward twice (~1/3 of its forward + backward); a micro-batch under 8,192 tokens
# loses SMALL_MICRO_BATCH_COST per halving (smaller matmuls). Measured on one H100 80GB, 2026-12-08
# (runs/2026-12-08_h100_80gb_auto, tests/test_memory_plan.py): Llama-3-8B 1 x 2,048 vs 2 x 2,048, 5.8%; MPT-7B
# 1 x 2,048 vs 4 x 2,048, 10.5% for two halvings; Llama-3-8B 4 x 2,048 with 22 of 32 blocks recomputed, 0.32
# of a block's time each
RECOMPUTE_COST = 1 / 3
# a selectively recomputed block reruns only its elementwise ops (norms, the FFN activation, RoPE): a guess
# of their share of the block's time, not measured on a GPU yet (sft/model/recompute.py)
SELECTIVE_COST = 0.05
SMALL_MICRO_BATCH_COST = 0.055
# --optimizer=auto: a more precise optimizer state is kept while its plan is within this share of the fastest
FULL_SPEED_TOLERANCE = 0.01
# elements of d per token kept by an un-checkpointed block beyond its projections (see the module docstring)
ACT_BASE = 5.1
# --fp8: the compiled FP8 blocks keep 0.85 element of d less per token for each element of d entering a block
# linear (their inputs are kept as FP8 copies for backward); fitted on the committed H200 peaks of
# runs/2026-12-02_h200_fp8 (Llama-3-8B shape 112.13 -> 101.13 GiB, MPT-7B 95.37 -> 83.37 GiB at 4 rows of 2,048:
# 0.846 and 0.857)
FP8_SAVED_FRACTION = 0.85
# the speed model's compute rate for the step time an offloaded state's host traffic is weighed against: an
# H100 / H200 at 50% of its dense bf16 peak (the recipes measure 55-60%); it only ranks plans
NOMINAL_FLOPS = 0.5 * 989e12
# kernels' workspaces and temporaries beyond the model (cuBLAS, compiled-kernel buffers, the fused optimizer's
# scratch): measured 0.6-0.9 GiB above the calibrated terms on the H200 (MPT-7B, 80 GB profile, 2026-12-02); only
# added for GPU-sized steps (>= 2^24 token x width elements), so tiny CPU runs keep their exact estimate
OVERHEAD_BYTES = 2**30
NF4_BYTES_PER_PARAM = 0.516  # 4 bits + one 8-bit scale per 64 values + the scales' own scales
IN_BACKWARD_OPTIMIZERS = ("adamw_kahan", "adamw_sr", "adamw_8bit")
# --offload_blocks on a CUDA device: refused until its GPU test gives bit-identical gradients (H100, 2026-12-08:
# tests/test_act_offload.py::test_gradients_equal_on_cuda_with_pinned_memory found a layer's weight gradient
# different from the run without offload, at one lead of four, eager and compiled; the CPU path is bit-exact)
OFFLOAD_BLOCKS_ON_CUDA = False
FREE_MEMORY_HEADROOM = 0.04  # of the device's free memory, when no --memory_limit_gib is given  # sft.training.optim.KahanAdamW: has step_parameter


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What the run will do to fit: ``checkpoint_blocks`` (the first N blocks recompute in backward),
    ``in_backward`` (per-parameter optimizer step in backward), ``offload`` (the optimizer state in host
    memory), the optimizer and micro-batch split, and the estimate (bytes by part)."""

    checkpoint_blocks: int
    in_backward: bool
    estimate: dict
    limit_bytes: int | None
    optimizer: str = "adamw"
    micro_batch: int = 1
    grad_accum: int = 1
    why: str = ""
    offload: bool = False  # the optimizer state in host memory (sft/training/offload.py)
    selective_blocks: int = 0  # the next N blocks after the checkpointed ones recompute selectively
    offload_blocks: int = 0  # saved activations of the next N blocks in pinned host memory


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one optimizer step holds, the input of :func:`estimate_memory`: the step's shape (rows per
    micro-batch, micro-batches, tokens per row, loss chunk) and what trains (optimizer, LoRA / QLoRA
    adapters). :meth:`of` reads it from a config; :func:`plan_memory` varies it over the plans it tries."""

    micro_batch: int
    grad_accum: int
    max_len: int
    optimizer: str
    loss_chunk: int
    lora: bool
    qlora: bool
    lora_rank: int
    lora_targets: str | None
    fp8: str

    @classmethod
    def of(cls, cfg: TrainConfig) -> Workload:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def activation_elements_per_layer(model, fp8: bool = False, attention: str = "flex") -> float:
    """Elements of ``d`` per token an un-checkpointed block keeps for backward (module docstring); with FP8
    block linears (``--fp8``) :data:`FP8_SAVED_FRACTION` less per element of ``d`` entering a linear; with
    ``attention`` flex, :func:`repeated_kv` more."""
    s = shape(model)
    kept = ACT_BASE + s.qkv_width / s.width + (3 if s.gated else 2) * s.ffn / s.width
    kept += repeated_kv(model, attention)
    if s.qk_norm:  # Qwen3's per-head norms of q and k: their bf16 outputs and fp32 statistics, per head
        kept += (s.heads + s.kv_heads) * (s.head_dim + 2) / s.width  # measured: compiled block, CPU
    if fp8:  # inputs of q/k/v (one, shared), the output projection, up (and gate, shared) and down
        kept -= FP8_SAVED_FRACTION * (3 + s.ffn / s.width)
    return kept


def _staging_bytes(model, optimizer: str) -> int:
    """:func:`sft.training.offload.offload_gpu_bytes` of the model's parameters, computed once per shape set and
    optimizer (the plan asks for every candidate)."""
    return _staging_of(tuple((tuple(p.shape), p.dtype) for p in model.parameters()), optimizer)


@functools.lru_cache(maxsize=8)
def _staging_of(shapes: tuple, optimizer: str) -> int:
    from sft.training.offload import offload_gpu_bytes

    return offload_gpu_bytes([torch.empty(s, dtype=d, device="meta") for s, d in shapes], optimizer)


def _kept_elements(
    model, fp8: bool, L: int, full: int, selective: int, offloaded: int = 0, in_flight: int = 0,
    attention: str = "flex",
) -> float:  # fmt: skip
    """Elements of ``d`` per token alive at the activations' peak with the first ``full`` blocks recomputed
    whole and the next ``selective`` selectively: the largest of the end of forward, the recomputation of the
    last selective block (its own set back beside the kept ones) and that of the last full block (by then
    backward has freed the sets of the blocks after it). ``offloaded`` blocks after the full ones keep their
    sets in host memory (sft/model/act_offload.py) except the last ``in_flight``, whose copies out have not
    ended with the forward; the copies back start early enough that they never add to the peak."""
    none = activation_elements_per_layer(model, fp8, attention)
    sel = max(none - selective_saved(model, attention), 1.0)
    full = min(max(full, 0), L)
    selective = min(max(selective, 0), L - full)
    sets = [sel] * selective + [none] * (L - full - selective)  # blocks full .. L-1
    away = sets[: max(offloaded, 0)]
    back = sum(away[len(away) - in_flight :]) if in_flight else 0.0
    kept = full + selective * sel
    peaks = [kept + (L - full - selective) * none - sum(away) + back]
    if selective:
        peaks.append(kept + none - sel)
    if full:
        peaks.append(full + none)
    return max(peaks)


def _offload_schedule(model, tokens: int, elem: int, full: int, n: int, attention: str = "flex"):
    """:func:`sft.model.act_offload.schedule` of ``n`` blocks offloaded after the ``full`` recomputed ones, one
    micro-batch of ``tokens``: each block's forward at :data:`NOMINAL_FLOPS` (2 FLOPs per parameter and token,
    backward twice that), its set's bytes over the measured host link. None when ``n`` is 0."""
    if n <= 0:
        return None
    from sft.model.act_offload import schedule

    s = shape(model)
    per_block = sum(p.numel() for p in transformer_blocks(model)[0].parameters())
    forward_s = 2.0 * per_block * tokens / NOMINAL_FLOPS
    block_bytes = tokens * s.width * elem * activation_elements_per_layer(model, attention=attention)
    return schedule(n, max(s.layers - full, n), block_bytes, forward_s, 2 * forward_s)


def selective_saved(model, attention: str = "flex") -> float:
    """Elements of ``d`` per token a selective block keeps fewer than an un-recomputed one: both norms' outputs
    and the FFN activation, ``2 + ffn/d`` (sft/model/recompute.py, measured on the CPU); with FlexAttention a
    rotary block (the Llama family) also recomputes RoPE's q and k from the kept projections,
    ``(heads + kv_heads) * head_dim / d`` more (measured on an H100, 2026-12-08: a compiled block of d 512, 8
    heads, 2 KV heads kept 8.78 elements of d per token, 10.03 without this term), and the copies of
    :func:`repeated_kv` (measured on the CPU)."""
    s = shape(model)
    rope = (s.heads + s.kv_heads) * s.head_dim / s.width if (s.gated and attention == "flex") else 0.0
    return 2 + s.ffn / s.width + rope + repeated_kv(model, attention)


def repeated_kv(model, attention: str = "flex") -> float:
    """Elements of ``d`` per token an un-recomputed block keeps for transformers' FlexAttention path beyond
    the k and v it computed: where the query head count is not a power of two, that path copies k and v to
    every query head (``repeat_kv``, transformers 5.17 to 5.24, ``integrations/flex_attention.py``) instead of
    passing ``enable_gqa``, and the compiled block's partition keeps the copies for the FlexAttention
    backward: ``2 * (heads - kv_heads) * head_dim / d`` (1.6 for Qwen3-14B: 40 heads, 8 KV heads). One KV head
    repeats as a view (nothing kept); a selective block recomputes the copies. Measured on the CPU through
    inductor's partition (tests/test_memory_plan.py); our MPT and the SDPA path keep none."""
    s = shape(model)
    power_of_two = s.heads & (s.heads - 1) == 0
    if attention != "flex" or is_ours(model) or power_of_two or not 1 < s.kv_heads < s.heads:
        return 0.0
    return 2 * (s.heads - s.kv_heads) * s.head_dim / s.width


def _lora_params(model, cfg: Workload) -> tuple[int, int]:
    """``(adapter elements, base elements of the targeted linears)`` for ``--lora``."""
    from sft.model import lora

    try:
        suffixes = tuple(parse_targets(cfg.lora_targets) or lora.default_targets(model))
    except ValueError as e:
        raise ConfigError(f"--lora: {str(e).splitlines()[0]}") from None
    targets = [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in suffixes
    ]
    return sum(cfg.lora_rank * (m.in_features + m.out_features) for m in targets), sum(
        m.weight.numel() for m in targets
    )


def _attention_extra(model, cfg: Workload, attention: str, elem: int) -> int:
    """Bytes the attention path adds beyond the block activations (materialised masks and scores)."""
    B, T = cfg.micro_batch, cfg.max_len
    s = shape(model)
    L, H = s.layers, s.heads
    if attention == "eager":  # scores and probabilities per layer, kept for backward
        return L * B * H * T * T * elem * 2
    if attention == "sdpa":
        return B * H * T * T * 4 if is_ours(model) else B * T * T  # MPT's fp32 ALiBi bias; else a bool mask
    return 0


def estimate_memory(
    model,
    cfg: Workload,
    autocast: bool,
    world: int = 1,
    checkpoint_blocks: int = 0,
    in_backward: bool = False,
    attention: str = "flex",
    offload: bool = False,
    selective_blocks: int = 0,
    offload_blocks: int = 0,
) -> dict[str, int]:
    """Predicted peak bytes of one training process by part (module docstring) for the step ``cfg``
    (:class:`Workload`). ``model``: the loaded model in its training dtype, before LoRA. Under FSDP2 (``world`` > 1) weights, grads and optimizer
    state are divided by ``world``; activations are not."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    base_elem = next(model.parameters()).element_size()
    if cfg.lora:
        n_train, n_targeted = _lora_params(model, cfg)
        train_elem = 4 if cfg.optimizer == "adamw" else base_elem
        weights += n_train * train_elem
        if cfg.qlora:
            weights -= int(n_targeted * (base_elem - NF4_BYTES_PER_PARAM))
    else:
        n_train, train_elem = sum(p.numel() for p in model.parameters()), base_elem
    W = max(world, 1)
    grads = n_train * train_elem // W
    optimizer = int(n_train * state_bytes_per_param(cfg.optimizer, train_elem)) // W
    host = 0
    if offload:  # the state lives on the host; the GPU holds the staging slots (sft/training/offload.py)
        host, optimizer = optimizer, _staging_bytes(model, cfg.optimizer)
    weights //= W
    s = shape(model)
    L, d = s.layers, s.width
    elem = 2 if (autocast or base_elem == 2) else 4
    tokens = cfg.micro_batch * cfg.max_len
    sched = _offload_schedule(model, tokens, elem, checkpoint_blocks, offload_blocks, attention)
    in_flight = max(1, sched.in_flight) if sched else 0
    kept = _kept_elements(
        model, cfg.fp8 != "none", L, checkpoint_blocks, selective_blocks, offload_blocks, in_flight, attention
    )
    vocab = getattr(model.config, "vocab_size", 0)
    activations = int(tokens * d * kept * elem) + 2 * min(cfg.loss_chunk, tokens) * vocab * 4
    # the head's gradient at the start of backward: the running sum of the loss chunks' contributions and the
    # current chunk's, two [vocab, d] tensors (none for LoRA: the head is frozen)
    activations += 0 if cfg.lora else 2 * vocab * d * train_elem
    activations += _attention_extra(model, cfg, attention, elem)
    if in_backward:
        dynamic = activations
    elif cfg.grad_accum > 1:
        dynamic = grads + activations
    else:
        dynamic = max(grads, activations)
    # the offloaded state's staging slots exist only during the optimizer step (given back at its end)
    held = max(dynamic, grads + optimizer) if offload else optimizer + dynamic
    return {
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer,
        "activations": activations,
        "total": weights + held + (OVERHEAD_BYTES if tokens * d >= 2**24 else 0),
        "host": host,
    }


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes free for this run: ``torch.cuda.mem_get_info`` on CUDA, the OS's available memory on CPU
    (psutil, else /proc/meminfo's MemAvailable); None when unknown."""
    if device.type == "cuda":  # free to the driver + cached by torch's allocator but unused
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + cached
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def in_backward_refusal(cfg: TrainConfig, world: int = 1) -> str | None:
    """Why the optimizer step cannot run in backward for this config (None when it can)."""
    if cfg.grad_accum > 1:
        return f"--grad_accum={cfg.grad_accum} (the step needs every micro-batch's gradient)"
    if cfg.grad_clip > 0:
        return f"--grad_clip={cfg.grad_clip} (clipping needs the whole gradient first; set --grad_clip=0)"
    if cfg.optimizer not in IN_BACKWARD_OPTIMIZERS:
        return f"--optimizer={cfg.optimizer} (only {', '.join(IN_BACKWARD_OPTIMIZERS)} step per parameter)"
    if world > 1:
        return "FSDP2 (several processes)"
    return None


def _fmt(est: dict) -> str:
    return (
        f"~{est['total'] / GIB:.1f} GiB (weights {est['weights'] / GIB:.1f}, grads {est['grads'] / GIB:.1f}, "
        f"optimizer {est['optimizer'] / GIB:.1f}, activations ~{est['activations'] / GIB:.1f})"
    )


def state_bytes_per_param(optimizer: str, elem: int) -> float:
    """Optimizer state bytes per trainable parameter of ``elem`` bytes (``auto`` resolved first): optim's table."""
    from sft.training import optim

    return optim.state_bytes_per_param(optimizer, torch.float32 if elem == 4 else torch.bfloat16)


def _optimizers(cfg: TrainConfig) -> list[str]:
    """The optimizers the plan may choose, most precise first: ``--optimizer`` itself unless it is ``auto``."""
    if cfg.optimizer != "auto":
        return [cfg.optimizer]
    if cfg.precision != "bf16" or cfg.lora:  # fp32 / autocast weights, or small adapters: plain AdamW
        return ["adamw"] if cfg.precision != "bf16" else ["adamw_kahan"]
    return list(AUTO_OPTIMIZERS)


def _splits(cfg: TrainConfig, device: torch.device) -> list[tuple[int, int]]:
    """(micro_batch, grad_accum) with the same rows per optimizer step, largest micro-batch first."""
    if cfg.plan_split == "off" or device.type != "cuda":
        return [(cfg.micro_batch, cfg.grad_accum)]
    rows = cfg.micro_batch * cfg.grad_accum
    return [(mb, rows // mb) for mb in range(cfg.micro_batch, 0, -1) if rows % mb == 0]


def _candidates(cfg: TrainConfig, L: int, world: int, device: torch.device) -> list[tuple]:
    """``(full, selective, in_backward, offload)`` settings to try for one optimizer and split: per
    (in_backward, offload) kind, from the least recomputation to the most (each step frees memory)."""
    if cfg.optimizer_in_backward == "true":
        why = in_backward_refusal(cfg, world)
        if why:
            raise ConfigError(f"--optimizer_in_backward=true is not possible with {why}")
        ib = [True]
    elif cfg.optimizer_in_backward == "auto" and in_backward_refusal(cfg, world) is None and not cfg.lora:
        ib = [False, True]
    else:
        ib = [False]
    off = _offload_choices(cfg, world, device)
    return [(f, s, b, o) for o in off for b in ib if not (b and o) for f, s in _recompute_steps(cfg, L)]


def _recompute_steps(cfg: TrainConfig, L: int) -> list[tuple[int, int]]:
    """``(full, selective)`` block counts the plan may use, least recomputation first: with ``--recompute``
    selective, blocks turn selective one by one, then selective blocks turn full; else blocks turn full."""
    if cfg.grad_checkpointing:
        counts = [L]
    elif cfg.checkpoint_blocks != "auto":
        counts = [min(int(cfg.checkpoint_blocks), L)]
    else:  # the fewest that fit (a CPU run that fits without any, the usual case, gets none)
        counts = list(range(L + 1))
    if cfg.recompute != "selective":
        return [(n, 0) for n in counts]
    if len(counts) == 1:  # a fixed number of recomputed blocks: all selective
        return [(0, counts[0])]
    return [(0, n) for n in range(L + 1)] + [(n, L - n) for n in range(1, L + 1)]


def _offload_choices(cfg: TrainConfig, world: int, device: torch.device) -> list[bool]:
    """Whether the plan may keep the optimizer state on the host (``--offload_optimizer``): ``auto`` tries it
    after the GPU-resident plans, for full fine-tuning on CUDA with an optimizer that supports it."""
    why = offload_refusal(cfg.optimizer, False, world)
    if cfg.offload_optimizer == "true":
        if why or cfg.lora:
            raise ConfigError(f"--offload_optimizer=true is not possible with {why or '--lora'}")
        return [True]
    if cfg.offload_optimizer == "auto" and why is None and not cfg.lora and device.type == "cuda":
        return [False, True]
    return [False]


def relative_time(
    n_ck: int, layers: int, micro_tokens: int, offload_s: float = 0.0, step_s: float = 1.0, n_sel: int = 0
) -> float:
    """The speed model's time per token of a plan relative to one with nothing recomputed (module constants):
    ``n_ck`` blocks recomputed whole, ``n_sel`` selectively; ``offload_s`` seconds of host-link traffic per
    optimizer step of ``step_s`` seconds of compute add theirs."""
    small = max(0.0, math.log2(8192 / max(micro_tokens, 1)))
    recompute = RECOMPUTE_COST * n_ck + SELECTIVE_COST * n_sel
    compute = (1 + recompute / max(layers, 1)) * (1 + SMALL_MICRO_BATCH_COST * small)
    return compute * (1 + offload_s / max(step_s, 1e-9))


def _step_seconds(model, cfg: TrainConfig) -> float:
    """Compute seconds of one optimizer step for the speed model: ``6 N`` FLOPs per token at
    :data:`NOMINAL_FLOPS` (only ranks plans against the host-link time of an offloaded state)."""
    n = sum(p.numel() for p in model.parameters())
    return 6.0 * n * cfg.micro_batch * cfg.grad_accum * cfg.max_len / NOMINAL_FLOPS


def _act_offload_cost(model, cfg: TrainConfig, full: int, autocast: bool, attention: str) -> float:
    """Time factor of ``--offload_blocks``: the forward's lag and the backward's stall waiting for the host
    link (:func:`_offload_schedule`) over one micro-batch's compute (``6 N`` FLOPs per token)."""
    tokens = cfg.micro_batch * cfg.max_len
    elem = 2 if (autocast or next(model.parameters()).element_size() == 2) else 4
    sched = _offload_schedule(model, tokens, elem, full, cfg.offload_blocks, attention)
    if sched is None:
        return 1.0
    compute = 6.0 * sum(p.numel() for p in model.parameters()) * tokens / NOMINAL_FLOPS
    return 1 + (sched.forward_lag + sched.backward_stall) / compute


def host_memory_bytes() -> int | None:
    """Memory the OS has available for the host-resident optimizer state (None when unknown)."""
    return free_memory_bytes(torch.device("cpu"))


def _limit(cfg: TrainConfig, device: torch.device, model) -> int | None:
    limit = int(cfg.memory_limit_gib * GIB) if cfg.memory_limit_gib > 0 else free_memory_bytes(device)
    if cfg.memory_limit_gib <= 0 and limit is not None and device.type == "cuda":
        # weights already on the GPU (a random-init preset is built there) are in the estimate, not free
        limit += sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda")
        # the whole card: keep FREE_MEMORY_HEADROOM of it for the allocator's fragmentation (seen: a plan
        # estimated at 138.2 of 139.2 GiB ran out of memory at 32k tokens, H200, 2026-12-02)
        limit = int(limit * (1 - FREE_MEMORY_HEADROOM))
    return limit


def _best_for(model, cfg, device, autocast, world, attention, limit, L):
    """The fastest fitting ``(relative time, MemoryPlan)`` for ``cfg``'s optimizer over splits, blocks, the
    step in backward and host-resident state, or ``(None, last estimate)`` when nothing fits."""
    best, est = None, None
    host, n_params = host_memory_bytes(), sum(p.numel() for p in model.parameters())
    for mb, ga in _splits(cfg, device):
        c = dataclasses.replace(cfg, micro_batch=mb, grad_accum=ga)
        work, tried = Workload.of(c), set()
        for n_ck, n_sel, ib, off in _candidates(c, L, world, device):
            if (ib, off) in tried:
                continue  # more blocks recomputed for this kind only costs more
            if n_ck + cfg.offload_blocks > L:
                continue  # the offloaded blocks come after the ones recomputed whole
            est = estimate_memory(
                model, work, autocast, world, n_ck, ib, attention, off, n_sel, cfg.offload_blocks
            )
            # the CPU as the GPU: over the available memory, the kernel's OOM killer ends the run (or, on a
            # shared machine, another process), so it is refused here, before the run folder exists
            if limit is not None and est["total"] > limit:
                continue
            if off and host is not None and est["host"] > host * (1 - FREE_MEMORY_HEADROOM):
                est = {**est, "host_available": host}  # fits the GPU, not the host: said in the refusal
                continue
            tried.add((ib, off))
            off_s = offload_seconds(n_params, c.optimizer) if off else 0.0
            step_s = _step_seconds(model, c) if off else 1.0
            t = relative_time(n_ck, L, mb * cfg.max_len, off_s, step_s, n_sel)
            t *= _act_offload_cost(model, c, n_ck, autocast, attention)
            if best is None or t < best[0] - 1e-9:
                plan = MemoryPlan(
                    n_ck, ib, est, limit, cfg.optimizer, mb, ga,
                    offload=off, selective_blocks=n_sel, offload_blocks=cfg.offload_blocks,
                )  # fmt: skip
                best = (t, plan)
    return (best, None) if best else (None, est)


def plan_memory(
    model, cfg: TrainConfig, device: torch.device, autocast: bool, world: int = 1, attention="flex"
) -> MemoryPlan:
    """The :class:`MemoryPlan` of this run, or ConfigError (one line) when nothing fits; see the module
    docstring. Per optimizer (``--optimizer=auto``: kahan, sr, 8bit, most precise first), the fastest fitting
    (micro-batch split, checkpointed blocks, step in backward, state on the host) by :func:`relative_time`;
    the first optimizer whose best plan runs at full speed (the state on the GPU and within
    :data:`FULL_SPEED_TOLERANCE` of the asked micro-batch with nothing recomputed) wins, else the most precise
    within that tolerance of the fastest plan of all: on an 80 GB card the 8-bit state's larger micro-batch
    beats ``adamw_sr`` at 1 row (measured 5.8% faster, Llama-3-8B, H100).
    CPU runs are planned and refused the same way, against the memory the OS has available."""
    L = shape(model).layers
    if cfg.offload_blocks > L:
        raise ConfigError(f"--offload_blocks={cfg.offload_blocks}: the model has {L} blocks")
    whole = (
        L
        if cfg.grad_checkpointing
        else None
        if cfg.checkpoint_blocks == "auto"
        else int(cfg.checkpoint_blocks)
    )
    if cfg.offload_blocks and whole is not None and whole + cfg.offload_blocks > L:
        raise ConfigError(
            f"--offload_blocks={cfg.offload_blocks}: only {max(L - whole, 0)} of the {L} blocks are not recomputed "
            f"whole ({'--grad_checkpointing' if cfg.grad_checkpointing else f'--checkpoint_blocks={whole}'})"
        )
    if cfg.offload_blocks and device.type == "cuda" and not OFFLOAD_BLOCKS_ON_CUDA:
        raise ConfigError(
            f"--offload_blocks={cfg.offload_blocks} is off on CUDA until its gradients are bit-identical there "
            "(a GPU test found them different): use --recompute=selective or --checkpoint_blocks instead"
        )
    if cfg.offload_blocks and world > 1:
        raise ConfigError(
            f"--offload_blocks={cfg.offload_blocks} with FSDP2 is not supported yet: use one process"
        )
    limit = _limit(cfg, device, model)
    found, notes, est = [], [], None
    full_t = relative_time(0, L, cfg.micro_batch * cfg.max_len)  # the asked split, nothing recomputed
    for opt in _optimizers(cfg):
        best, est_o = _best_for(
            model, dataclasses.replace(cfg, optimizer=opt), device, autocast, world, attention, limit, L
        )
        est = est_o or est
        if best is None:
            notes.append((opt, f"{opt} does not fit"))
            continue
        found.append(best)
        if _full_speed(*best, full_t):  # the most precise such optimizer wins
            break
        notes.append((opt, _slower(*best, full_t)))
    if found:
        t, plan = _pick(found)
        # why the more precise states lost: the notes before the chosen optimizer's own
        names = [o for o, _ in notes]
        cut = names.index(plan.optimizer) if plan.optimizer in names else len(notes)
        why = "; ".join(n for _, n in notes[:cut])
        plan = dataclasses.replace(plan, why=why)
        log.info(
            "memory plan: %s, %d x %d rows, %d of %d blocks checkpointed%s%s%s; estimate %s%s%s",
            plan.optimizer, plan.grad_accum, plan.micro_batch, plan.checkpoint_blocks, L,
            f" (+{plan.selective_blocks} selectively)" if plan.selective_blocks else "",
            ", optimizer step in backward" if plan.in_backward else "",
            f", optimizer state on the host ({plan.estimate['host'] / GIB:.1f} GiB)" if plan.offload else "",
            _fmt(plan.estimate),
            f" against {limit / GIB:.1f} GiB" if limit is not None else "",
            f" (why: {why})" if why else "",
        )  # fmt: skip
        return plan
    raise _refusal(model, cfg, device, autocast, world, attention, limit, L, est)


def _refusal(model, cfg, device, autocast, world, attention, limit, L, est) -> ConfigError:
    """The one-line ConfigError of a run nothing fits: the last estimate, the limit, and the single changes
    that would fit (:func:`_fixes`)."""
    where = (
        "--memory_limit_gib"
        if cfg.memory_limit_gib > 0
        else ("free on the device" if device.type == "cuda" else "available in this machine's memory")
    )
    what = "this run needs"
    if "host_available" in est:  # the GPU side fits with the state on the host, the host side does not
        where += (
            f"; with --offload_optimizer the {est['host'] / GIB:.1f} GiB of optimizer state does not fit the "
            f"host's {est['host_available'] / GIB:.1f} GiB available"
        )
    fixes = _fixes(model, cfg, device, autocast, world, attention, limit, L)
    return ConfigError(
        f"{what} {_fmt(est)} even with the most economical plan, {limit / GIB:.1f} GiB {where}: "
        + (
            f"try {' or '.join(fixes)}"
            if fixes
            else "no single change fits ("
            + (
                "a larger GPU, or FSDP2 over several)"
                if device.type == "cuda"
                else "lower --max_len or --micro_batch)"
            )
        )
    )


def _full_speed(t: float, plan: MemoryPlan, full_t: float) -> bool:
    """The state on the GPU and within :data:`FULL_SPEED_TOLERANCE` of ``full_t``, the speed model's time of
    the asked micro-batch with nothing recomputed (a smaller micro-batch costs its measured share)."""
    return t <= full_t * (1 + FULL_SPEED_TOLERANCE) and not plan.offload


def _slower(t: float, plan: MemoryPlan, full_t: float) -> str:
    """Why an optimizer's best plan is not at full speed, for the plan's line."""
    if plan.offload:
        return f"{plan.optimizer} needs its state on the host"
    blocks = plan.checkpoint_blocks + plan.selective_blocks
    if blocks:
        return f"{plan.optimizer} needs {blocks} blocks recomputed"
    return f"{plan.optimizer} needs {plan.micro_batch} x {plan.grad_accum} rows (~{100 * (t / full_t - 1):.1f}% slower)"


def _pick(found: list[tuple[float, MemoryPlan]]) -> tuple[float, MemoryPlan]:
    """The most precise optimizer's plan (``found`` is most precise first) within :data:`FULL_SPEED_TOLERANCE`
    of the fastest."""
    fastest = min(t for t, _ in found)
    return next(f for f in found if f[0] <= fastest * (1 + FULL_SPEED_TOLERANCE))


def _fixes(model, cfg, device, autocast, world, attention, limit, L) -> list[str]:
    """The single changes that would fit (checked with the same estimate), for the refusal message."""
    tries = []
    if cfg.optimizer not in ("auto", "adamw_8bit") and cfg.precision == "bf16":
        tries.append(("--optimizer=adamw_8bit", dict(optimizer="adamw_8bit")))
    if cfg.micro_batch > 1:
        tries.append(
            (
                f"--micro_batch=1 --grad_accum={cfg.micro_batch * cfg.grad_accum}",
                dict(micro_batch=1, grad_accum=cfg.micro_batch * cfg.grad_accum),
            )
        )
    if cfg.max_len > 512:
        tries.append((f"--max_len={cfg.max_len // 2}", dict(max_len=cfg.max_len // 2)))
    if cfg.offload_optimizer == "false" and device.type == "cuda":
        tries.append(("--offload_optimizer=auto", dict(offload_optimizer="auto")))
    if not cfg.lora:
        tries.append(("--lora", dict(lora=True)))
    out = []
    for flag, change in tries:
        c = dataclasses.replace(cfg, **change)
        for opt in _optimizers(c):
            try:
                best, _ = _best_for(
                    model, dataclasses.replace(c, optimizer=opt), device, autocast, world, attention, limit, L
                )
            except ConfigError:
                best = None
            if best is not None:
                out.append(flag)
                break
    return out
