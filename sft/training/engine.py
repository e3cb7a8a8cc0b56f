"""The one training engine: how a model is set up for speed, and the step that turns micro-batches into a
loss, a backward and an optimizer update. The trainer, the benchmarks and the tests all call it.

Contracts:
- ``resolve_attention(model, cfg, device) -> str``: the backend ``--attention`` names for this model
  (``flex`` | ``sdpa`` | ``eager``; ``auto`` = flex on CUDA, sdpa on CPU; transformers' MPT only has eager).
  A backend the model cannot use is a one-line ConfigError naming the model type and the choices.
- ``resolve_compile(model, cfg, device) -> bool``: ``--compile`` (``auto`` = on CUDA for our MPT and the
  Llama family, :data:`sft.model.family.COMPILE_FAMILY`).
- ``resolve(model, cfg, device) -> Resolved``: the one record of what this run is (attention backend, compile,
  autocast, FP8 recipe, loss chunk, clipping; ``.planned(plan)`` adds the memory plan's checkpointed blocks
  and step in backward). What follows takes this record, never the config.
- ``setup_model(model, resolved, device) -> dict``: converts the block linears to FP8 (``--fp8``, sft/model/fp8.py;
  refused beforehand by ``sft.model.fp8.check_fp8``), sets the attention backend, checkpoints the first
  ``resolved.checkpoint_blocks`` blocks whole and the next ``resolved.selective_blocks`` selectively
  (sft/model/recompute.py: non-reentrant, the checkpoint inside each block's forward) and compiles each
  block on its own (``torch.compile(dynamic=False)``: every micro-batch has the row shape, so one graph
  serves every block and every step). Call after LoRA and before FSDP sharding. Returns what it resolved.
- ``Engine(root, params, optimizer, resolved, device, info).step(micro, lr) -> StepResult``: one
  optimizer step over the micro-batches ``micro`` (Batch dicts on the CPU): each backpropagates
  ``W * sum CE / N`` with ``N`` the supervised targets of the whole step over all ``W`` ranks (CONTRACTS.md,
  "Loss"); then the global gradient norm is clipped to ``resolved.grad_clip`` (none when 0) and the optimizer steps,
  unless the loss or norm is not finite (then the update is skipped and ``skipped`` is True). With
  ``resolved.in_backward`` the optimizer already stepped each parameter inside backward (no clipping, no skip).
  The step's sums (CE, tokens, attention FLOP tokens and any ``flags``) are all-reduced once under FSDP2.
  ``dt`` is wall time with the device synchronised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time

import torch

from sft.config import ConfigError, TrainConfig
from sft.model import act_offload, fp8, recompute
from sft.model.family import family, is_ours, transformer_blocks
from sft.model.loss import chunked_cross_entropy_sum, count_supervised, step_loss
from sft.model.models import forward_hidden
from sft.training import distributed
from sft.training.distributed import DistInfo
from sft.training.flops import attention_flops_tokens

log = logging.getLogger("sft")

_HF_BACKEND = {"flex": "flex_attention", "sdpa": "sdpa", "eager": "eager"}
_FLEX_MIN_HEAD_DIM = 16  # inductor's flex kernel needs head_dim >= 16 (triton's tl.dot)


def resolve_attention(model, cfg: TrainConfig, device: torch.device) -> str:
    """The attention backend of this run (module docstring); ConfigError for one the model cannot use."""
    want = cfg.attention
    kind = family(model).name
    if family(model).hf_mpt:
        if want not in ("auto", "eager"):
            raise ConfigError(
                f"--attention={want}: transformers' MPT has eager attention only (choices: eager, auto); "
                "--mpt_impl=fast has flex and sdpa"
            )
        return "eager"
    if want == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if want == "eager" and is_ours(model):
        raise ConfigError("--attention=eager: our MPT has flex and sdpa (choices: flex, sdpa, auto)")
    if want == "flex":
        if device.type != "cuda":
            raise ConfigError(
                "--attention=flex: FlexAttention has no backward on CPU (choices there: sdpa, eager, auto)"
            )
        c = model.config
        heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_heads", 1)
        head_dim = getattr(c, "head_dim", None) or (getattr(c, "hidden_size", None) or c.d_model) // heads
        if head_dim < _FLEX_MIN_HEAD_DIM:
            raise ConfigError(
                f"--attention=flex: {kind} has head_dim {head_dim} < {_FLEX_MIN_HEAD_DIM}, which compiled "
                "FlexAttention cannot run on CUDA (choices: sdpa, eager)"
            )
        if not is_ours(model) and not getattr(model, "_supports_flex_attn", False):
            raise ConfigError(
                f"--attention=flex: transformers' {kind} has no FlexAttention path (choices: sdpa, eager)"
            )
    return want


def resolve_device(cfg: TrainConfig) -> torch.device:
    """``--device`` (``auto`` = CUDA when available); ConfigError for ``cuda`` without a CUDA device."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_compile(model, cfg: TrainConfig, device: torch.device) -> bool:
    """Whether to compile the blocks one by one (module docstring)."""
    if cfg.compile != "auto":
        return cfg.compile == "true"
    return device.type == "cuda" and family(model).compiles


def set_attention(model, backend: str) -> None:
    """Point ``model`` at ``backend`` (our MPT: its ``attn_impl``; transformers: its attention interface)."""
    if is_ours(model):
        model.attn_impl = backend
        return
    impl = _HF_BACKEND[backend]
    if getattr(model.config, "_attn_implementation", None) == impl:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def set_checkpoint_blocks(model, n: int) -> None:
    """Recompute the first ``n`` blocks in backward (non-reentrant checkpoint), the others not."""
    recompute.set_recompute(model, n, 0)


def compile_blocks(model) -> None:
    """``torch.compile`` each transformer block in place (static shapes)."""
    for block in transformer_blocks(model):
        block.compile(dynamic=False)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What this run is, resolved once from the config and the model (the trainer makes it in its set-up and
    hands it to the memory plan, :func:`setup_model` and :class:`Engine`; none of them reads the config):
    the attention backend, per-block compile, bf16 autocast, the FP8 recipe, the loss chunk, the clipping
    norm, and, once the memory plan is made (:meth:`planned`), the checkpointed blocks and the step in
    backward."""

    attention: str
    compile: bool
    autocast: bool
    fp8: str = "none"
    loss_chunk: int = 1024
    grad_clip: float = 0.0
    checkpoint_blocks: int = 0
    in_backward: bool = False
    selective_blocks: int = 0
    offload_blocks: int = 0

    def planned(self, plan) -> Resolved:
        """This record with the memory plan's choices (a :class:`sft.training.memory.MemoryPlan`)."""
        return dataclasses.replace(
            self,
            checkpoint_blocks=plan.checkpoint_blocks,
            in_backward=plan.in_backward,
            selective_blocks=plan.selective_blocks,
            offload_blocks=plan.offload_blocks,
        )


def resolve(model, cfg: TrainConfig, device: torch.device) -> Resolved:
    """The run's :class:`Resolved` before the memory plan: :func:`resolve_attention`, :func:`resolve_compile`,
    :func:`uses_autocast` and the step's settings (ConfigError for a backend the model cannot use)."""
    return Resolved(
        resolve_attention(model, cfg, device),
        resolve_compile(model, cfg, device),
        uses_autocast(cfg, device),
        fp8=cfg.fp8,
        loss_chunk=cfg.loss_chunk,
        grad_clip=cfg.grad_clip,
    )


def setup_model(model, resolved: Resolved, device: torch.device) -> dict:
    """FP8 block linears, attention backend, checkpointed blocks and per-block compile (module docstring),
    as ``resolved`` says (``offload_blocks``: the saved activations of that many blocks after the ones recomputed
    whole go to pinned host memory, sft/model/act_offload.py). Returns ``{"attention", "compile",
    "checkpoint_blocks", "selective_blocks", "offload_blocks", "fp8", "fp8_linears"}``."""
    n_fp8 = fp8.convert_blocks(model, resolved.fp8)  # before the compile: the compiled block fuses the casts
    set_attention(model, resolved.attention)
    recompute.set_recompute(model, resolved.checkpoint_blocks, resolved.selective_blocks)
    if resolved.offload_blocks:  # the first blocks that are not recomputed whole
        first = resolved.checkpoint_blocks
        act_offload.offload_blocks(model, list(range(first, first + resolved.offload_blocks)))
    if n_fp8 and not resolved.compile:
        log.warning(
            "--fp8=%s without --compile: the FP8 casts run unfused, likely slower than bf16", resolved.fp8
        )
    if resolved.compile:
        compile_blocks(model)
    return {
        "attention": resolved.attention,
        "compile": resolved.compile,
        "checkpoint_blocks": resolved.checkpoint_blocks,
        "selective_blocks": resolved.selective_blocks,
        "offload_blocks": resolved.offload_blocks,
        "fp8": resolved.fp8,
        "fp8_linears": n_fp8,
    }


# ----------------------------------------------------------------------------- the step


def uses_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast runs the model: on CUDA under ``--precision=auto`` or ``bf16-autocast``."""
    return device.type == "cuda" and cfg.precision in ("auto", "bf16-autocast")


def autocast_factory(autocast: bool):
    """A no-argument callable giving the run's autocast context (bf16 on CUDA when ``autocast``, see
    :func:`uses_autocast`), else a null context."""
    if autocast:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def ce_sum(root, batch: dict[str, torch.Tensor], chunk: int = 1024) -> torch.Tensor:
    """Sum of CE over the supervised targets of ``batch`` (0-d fp32). ``root`` is a plain model, or the
    FSDP root :class:`sft.training.distributed.LossModule` (which runs the head and the loss inside its forward)."""
    if isinstance(root, distributed.LossModule):
        return root(batch["input_ids"], batch["targets"], batch["document_ids"], batch["position_ids"])
    h, w = forward_hidden(root, batch)
    return chunked_cross_entropy_sum(h, w, batch["targets"], chunk)


@dataclasses.dataclass
class StepResult:
    """One optimizer step: ``loss`` (mean CE over the step's supervised targets), ``grad_norm`` (None with
    the step in backward), token counts over all ranks, ``attn_tokens`` (sum n_doc^2 with the padding tail as
    a document, for MFU on processed tokens) and ``attn_tokens_nonpad`` (real documents only, for MFU on
    non-pad tokens), ``dt`` seconds, ``skipped`` (non-finite: no update) and the all-reduced ``flags``."""

    loss: float
    grad_norm: float | None
    n_supervised: int
    processed: int
    nonpad: int
    attn_tokens: int
    attn_tokens_nonpad: int
    dt: float
    skipped: bool
    flags: list[int]


class Engine:
    """The training step of every run (module docstring)."""

    def __init__(self, root, params, optimizer, resolved: Resolved, device, info=None):
        self.root, self.params, self.optimizer, self.resolved = root, params, optimizer, resolved
        self.device, self.info = device, info or DistInfo()
        self.in_backward = resolved.in_backward
        if self.in_backward:
            from sft.training.optim import step_in_backward

            self.hooks = step_in_backward(optimizer, params)
        self.autocast = autocast_factory(resolved.autocast)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, micro: list[dict], lr: float, flags: list[int] | None = None) -> StepResult:
        info, W = self.info, self.info.world
        t0 = time.perf_counter()
        n_sup = distributed.all_reduce_sum(count_supervised(micro), info)  # N over all ranks
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        ce_sums = []
        # every micro-batch to the device before the first forward: a copy from pageable host memory waits
        # for the stream to drain, so one inside the loop would stall the CPU behind each backward
        on_device = [{k: v.to(self.device, non_blocking=True) for k, v in mb.items()} for mb in micro]
        for mb in on_device:
            with self.autocast():
                ce = ce_sum(self.root, mb, self.resolved.loss_chunk)
            # FSDP averages gradients over the W ranks: W * CE / N makes that average sum CE / N
            step_loss(ce * W, n_sup).backward()
            ce_sums.append(ce.detach())  # read once after the loop: no device sync between micro-batches
        # the step's counts on the CPU while the GPU still runs the queued backward, and the clipping norm
        # queued behind it, before the first read of a device value
        processed = sum(b["input_ids"].numel() for b in micro)
        nonpad = sum(int(b["attention_mask"].sum()) for b in micro)
        attn = sum(attention_flops_tokens(b["document_ids"]) for b in micro)
        attn_real = sum(attention_flops_tokens(b["document_ids"], b["attention_mask"]) for b in micro)
        norm = None
        if not self.in_backward:
            clip = self.resolved.grad_clip if self.resolved.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        ce_total = float(torch.stack(ce_sums).sum())
        flags = list(flags or [])
        if info.enabled:  # one all-reduce for the step's sums
            ce_total, processed, nonpad, attn, attn_real, *flags = distributed.all_reduce_sum(
                [ce_total, processed, nonpad, attn, attn_real, *flags], info
            )
        loss = ce_total / max(n_sup, 1)
        grad_norm, skipped = None, False
        if not self.in_backward:
            grad_norm = float(distributed.full_tensor(norm))
            skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
            if not skipped:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        dt = time.perf_counter() - t0
        return StepResult(
            loss,
            grad_norm,
            int(n_sup),
            int(processed),
            int(nonpad),
            int(attn),
            int(attn_real),
            dt,
            skipped,
            flags,
        )
