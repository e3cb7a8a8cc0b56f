"""The training loop: ``train(cfg) -> run_dir``, read top to bottom.

What one call does, in order:
1. checks every input (out_dir writable, data file present, model found, data valid) before making
   the run folder; any failure raises a one-line error (ConfigError, ModelError, DataError, RunError)
   and leaves no run folder behind;
2. loads model + tokenizer, prepares the data (render, split, pack), makes the memory plan
   (:func:`sft.training.memory.plan_memory`: the optimizer for ``--optimizer=auto``, the micro-batch split, the
   checkpointed blocks and the step in backward, from the estimate calibrated on measured peaks; ConfigError
   naming only changes that would fit), moves the model to the device, applies LoRA (``--lora``), then
   creates the run folder;
3. evaluates the held-out loss and answers a few held-out prompts (before);
4. trains: each optimizer step takes ``grad_accum`` micro-batches of ``micro_batch`` rows, each
   backpropagating ``sum CE / N_step`` (N_step = supervised targets of the whole step, see sft/model/loss.py),
   clips the gradient norm, sets the learning rate (linear warm-up, then cosine/linear decay to
   ``lr * min_lr_ratio``), and steps AdamW; logs one line per ``log_every`` steps;
5. checkpoints every ``save_every`` steps and at the end (only when ``save_every`` > 0), and on
   SIGTERM/Ctrl-C, ``--stop_after`` or ``--on_nan=stop`` (then stops: always, so it can be resumed);
6. evaluates and answers the prompts again (after), writes ``final/``, ``loss.png``, ``finished.json``, and
   with ``--export_gguf`` a GGUF file in ``final/``; logs the run folder's size.

Data order is a pure function of the seed: epoch ``e`` visits the training rows in the order
``torch.randperm(R, generator=seed + e)``; step ``s`` takes micro-batches ``s*A .. s*A + A - 1`` of that
endless stream. So the data position of a checkpoint is just its step, and ``--resume`` reproduces the
losses of an uninterrupted run exactly (on CPU, bit for bit).

Several processes (``torchrun --nproc_per_node W``, or ``--distributed`` for a group of one): the model is
sharded with FSDP2 (sft/training/distributed.py). Rank r takes micro-batches ``(s*A + j)*W + r`` of the same seeded
stream, so W ranks with ``grad_accum=A`` see exactly what one process with ``grad_accum=A*W`` sees; N_step
and the step's sums are all-reduced, so the losses are that process's. Rank 0 alone writes the run folder
(its name broadcast to all), metrics, samples and ``final/`` (consolidated from the shards); checkpoints
are sharded (``torch.distributed.checkpoint``) and resume at the same world size.

LoRA (``--lora``, sft/model/lora.py): adapters are injected after the model is on its device and before
checkpointing, sharding or compiling; only they train (fp32 under ``--optimizer=adamw``, else the base
dtype), with ``--qlora`` over an NF4-quantized base. Checkpoints hold the adapter weights alone (the base is
reloaded from its source at resume); at the end ``adapter/`` holds the adapter in peft's format and
``final/`` the merged full weights (loads with ``AutoModelForCausalLM``). Not with FSDP2 yet (ConfigError).

MFU: :mod:`sft.training.flops` (``6 N + 12 L d T_attn`` over the bf16 peak; GPU only, and ``null`` with LoRA:
the frozen base has no weight gradient, so 6N does not apply).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from sft.config import (
    ConfigError,
    TrainConfig,
    check_config,
    check_warmup,
    error_exit,
    parse_updates,
    resume_config,
)
from sft.data.batches import MicroBatches, data_sources, pad_token_id, prepare
from sft.data.render import TemplateError
from sft.data.schema import DataError
from sft.model import lora
from sft.model.family import shape
from sft.model.fp8 import check_fp8
from sft.model.models import ModelError, forward_hidden, lm_head, load_model_and_tokenizer, without_torchao
from sft.training import checkpoints, distributed, offload, optim, runs
from sft.training.console import (
    NoWriter,
    console_beside_bar,
    install_stop_handlers,
    out_of_memory,
    setup_logging,
    step_line,
)
from sft.training.distributed import DistInfo
from sft.training.engine import Engine, autocast_factory, resolve, resolve_device, setup_model
from sft.training.evaluation import answer_samples, eval_line, held_out, load_best, print_samples, track_best
from sft.training.flops import peak_flops, step_mfus
from sft.training.memory import plan_memory
from sft.training.runs import RunError

log = logging.getLogger("sft")


class TrainingStopped(RuntimeError):
    """The run stopped early (signal or non-finite loss) after saving a checkpoint."""


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, given: Iterable[str] | None = None) -> Path:
    """Run (or resume) one training run; return its run folder. See the module docstring.

    Under ``torchrun`` (WORLD_SIZE > 1) or with ``--distributed``, the model is sharded with FSDP2
    (sft/training/distributed.py) and every rank runs this same function; rank 0 alone writes the run folder.
    Rank 0 holds the run folder's lock (:func:`sft.training.runs.hold_run_lock`) from the moment it exists (or, on
    ``--resume``, before its checkpoint is loaded) to the end: a second process on the same folder gets RunError
    naming this one's PID. Every log record of the run also goes to ``<run>/train.log``.
    ``given``: the fields set on the command line; on ``--resume`` they decide what may change
    (:func:`sft.config.resume_config`; None = the fields that differ from ``TrainConfig()``'s defaults).
    """
    t_start = time.time()
    resume_from, run_dir = None, None
    if cfg.resume:
        run_dir, resume_from = checkpoints.find_resume(cfg.out_dir, cfg.resume)  # plain or sharded (DCP)
        saved = TrainConfig.from_dict(runs._read_json(resume_from / "config.json"))
        step = int(runs._read_json(resume_from / "state.json").get("step", 0))
        # the run continues with its own config; only some knobs may change on resume (the rest: refused)
        cfg = resume_config(saved, cfg, given, step=step)
        checkpoints.refuse_finished(run_dir, resume_from, saved, cfg, step)
    device = resolve_device(cfg)
    info = DistInfo()
    if distributed.wanted(cfg):
        info = distributed.init(device.type)
    held = contextlib.ExitStack()
    run_log = held.enter_context(runs.run_logging(info.is_main))

    def open_run(path: Path) -> None:
        """The run folder exists (made or resumed): rank 0 holds it and logs into it."""
        if info.is_main:
            held.enter_context(runs.hold_run_lock(path))
            run_log.open(path)

    try:
        with held, without_torchao(needed=cfg.qlora or cfg.fp8 != "none"):
            if resume_from is not None:
                open_run(run_dir)
            # a warm-up longer than the run: refused when typed (or set in Python), said when a recipe's default
            warmup_given = given is None or "warmup_steps" in set(given)
            # the run in phases: set-up (inputs, model, plan, run folder), the loop of engine steps with what
            # follows each step (log, eval, save, stop), and the finish (checkpoint, eval, samples, final/)
            run = _setup(cfg, info, device, resume_from, run_dir, open_run, warmup_given)
            run_dir = _finish(run, _loop(run), t_start)
        distributed.leave_together(info)  # the other ranks wait for rank 0's samples and final/
        return run_dir
    finally:
        if info.enabled:
            distributed.destroy()


@dataclasses.dataclass
class _Run:
    """Everything the phases of one run share (built by :func:`_setup`)."""

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    model: torch.nn.Module  # the whole model (LoRA included), before sharding
    root: torch.nn.Module  # what the engine calls: the model, or its FSDP LossModule
    tokenizer: object
    prepared: object
    stream: MicroBatches
    eval_batches: list
    engine: Engine
    optimizer: torch.optim.Optimizer
    run_dir: Path
    writer: object
    state: dict
    total_steps: int
    n_params: int
    layers: int
    width: int
    peak: float | None
    cfg_dict: dict
    eval_before: float | None = None
    stop: dict = dataclasses.field(default_factory=dict)

    def autocast(self):
        return self.engine.autocast()

    def save_checkpoint(self):
        kw = dict(
            model=self.root,
            optimizer=self.optimizer,
            state=self.state,
            cfg_dict=self.cfg_dict,
            keep_last=self.cfg.keep_last,
        )
        if self.info.enabled:
            return distributed.save_checkpoint(self.run_dir, self.state["step"], info=self.info, **kw)
        return checkpoints.save_checkpoint(self.run_dir, self.state["step"], **kw)

    def held_out(self) -> dict:
        """One evaluation (loss overall and per source, token accuracy, stop rate): :func:`held_out`."""
        return held_out(
            self.root, self.model, self.tokenizer, self.eval_batches, self.prepared, self.cfg, self.device,
            self.autocast, self.info, forward_hidden,
        )  # fmt: skip

    def evaluate_and_log(self, step: int) -> dict:
        """Evaluate, write the eval line of metrics.jsonl, say it, and track the best step (--keep_best)."""
        ev = self.held_out()
        self.writer.eval({"step": step, "epoch": self.epoch(step), **ev})
        log.info(eval_line(step, ev))
        if step:  # only trained steps are candidates for --keep_best
            track_best(self.state, ev, self.cfg, self.run_dir, self.model, self.info)
        return ev

    def epoch(self, step: int) -> float:
        return round(step * self.cfg.grad_accum * self.info.world / self.stream.per_epoch, 4)


def _setup(
    cfg: TrainConfig, info: DistInfo, device, resume_from, run_dir, open_run, warmup_given: bool = True
) -> _Run:
    """Check every input, load and prepare, plan memory, set up the model and engine, make the run folder.
    Every refusal happens before the run folder exists; ``open_run(run_dir)`` is called as soon as a new
    one exists (rank 0 locks it and logs into it)."""
    _refuse_early(cfg, info, resume_from, run_dir)
    model, tokenizer, prepared, train_rows, eval_batches, resolved = _load_inputs(
        cfg, info, device, resume_from, run_dir
    )
    # the memory plan resolves --optimizer=auto and the micro-batch split (same rows per step): from here on
    # cfg holds what this run does, and config.json records it (a resume continues with the same choices)
    asked = {"optimizer": cfg.optimizer, "micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum}
    plan = plan_memory(model, cfg, device, resolved.autocast, info.world, attention=resolved.attention)
    cfg = dataclasses.replace(
        cfg, optimizer=plan.optimizer, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum
    )
    pad_to = (
        cfg.max_len if (resolved.compile and not cfg.packing) else None
    )  # one shape for the compiled blocks
    stream = MicroBatches(train_rows, cfg, pad_token_id(tokenizer), pad_to)
    W = info.world
    # one optimizer step = A micro-batches on each of the W ranks: micro-batches s*A*W .. s*A*W + A*W - 1
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * stream.per_epoch / (cfg.grad_accum * W)))
    if resume_from is None and (warn := check_warmup(cfg, total_steps, warmup_given)):
        log.warning("%s", warn)
    resolved = resolved.planned(plan)  # the one record of this run: the engine and set-up read it, not cfg
    setup, before = _prepare_model(model, tokenizer, prepared, cfg, info, device, resume_from, resolved)
    n_params = sum(p.numel() for p in model.parameters())
    s = shape(model)
    L, d = s.layers, s.width
    said = {**setup, "optimizer_in_backward": plan.in_backward, "optimizer_offload": plan.offload}
    said.update(plan_why=plan.why, asked=asked)
    cfg_dict = {**cfg.to_dict(), "resolved": said}
    root = model
    if info.enabled:  # the FSDP root: a LossModule over the sharded model (sft/training/distributed.py)
        root = distributed.LossModule(model, cfg.loss_chunk)
        distributed.shard_model(
            root, distributed.mixed_precision(device, cfg.precision), device_type=device.type
        )
    params, optimizer = (offload.build_for if plan.offload else optim.build_for)(root, cfg)
    engine = Engine(root, params, optimizer, resolved, device, info=info)
    run_dir, writer = _open_run_folder(
        cfg, info, device, resume_from, run_dir, open_run, cfg_dict, prepared, model
    )
    state = {"step": 0, "tokens_processed": 0, "tokens_nonpad": 0, "tokens_supervised": 0, "skipped_steps": 0}
    run = _Run(
        cfg, info, device, model, root, tokenizer, prepared, stream, eval_batches, engine, optimizer, run_dir,
        writer, state, total_steps, n_params, L, d,
        None if cfg.lora else peak_flops(device),  # 6N does not apply to LoRA's frozen base: MFU null
        cfg_dict,
    )  # fmt: skip
    if resume_from is not None:
        _restore(run, resume_from)
    else:
        _start(run, before)
    return run


def _refuse_early(cfg: TrainConfig, info: DistInfo, resume_from, run_dir) -> None:
    """The config-only refusals (one line each), before anything is loaded; seeds the RNGs."""
    if resume_from is not None:
        log.info("resuming %s from %s", run_dir, resume_from.name)
        distributed.check_resume_world(resume_from, info)
    if cfg.optimizer not in ("adamw", "auto") and cfg.precision != "bf16":
        raise ConfigError(f"--optimizer={cfg.optimizer} works on bf16 weights: add --precision=bf16")
    check_config(cfg)
    for flag, on in (("--keep_best", cfg.keep_best), ("--lora", cfg.lora)):
        # LoRA: the consolidated export and the DCP checkpoints do not know adapters yet (sft/training/distributed.py)
        if on and info.enabled:
            raise ConfigError(
                f"{flag} with FSDP2 (torchrun / --distributed) is not supported yet: use one process"
            )
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)


def _load_inputs(cfg: TrainConfig, info: DistInfo, device, resume_from, run_dir):
    """Out dir, data spec, model and tokenizer (with the head, attention, FP8 and compile checks), then the
    prepared data; cheapest checks first. Returns ``(model, tokenizer, prepared, train_rows, eval_batches,
    resolved)``: ``resolved`` (sft.training.engine.Resolved: attention backend, compile, autocast) is made here
    once and handed on."""
    runs.check_writable(cfg.out_dir)
    data_sources(cfg)  # a bad --data / --eval_data fails before any model is loaded
    model, tokenizer = load_model_and_tokenizer(cfg)
    lm_head(model)  # refuses (ModelError) an output head the loss cannot apply as the model does
    resolved = resolve(model, cfg, device)  # a backend the model cannot use fails before data preparation
    check_fp8(model, cfg.fp8, device, adapters=cfg.lora or cfg.qlora)  # so does --fp8 where it cannot run
    if cfg.export_gguf != "none":  # refused now, not after the whole run
        from sft.model.gguf import ExportError, check_exportable

        try:
            check_exportable(model, tokenizer)
        except ExportError as e:
            raise ConfigError(f"--export_gguf={cfg.export_gguf}: {e}") from None
    # distributed: rank 0 prepares (and caches) the data first, the other ranks then read its cache
    if not info.is_main:
        distributed.barrier(info)
    prepared, train_rows, eval_batches = prepare(cfg, tokenizer)
    if info.is_main:
        distributed.barrier(info)
    if resume_from is not None:  # the rows of a resumed run are found by position: they must be the same
        checkpoints.check_resume_inputs(
            run_dir, prepared.fingerprint, prepared.inputs, cfg.resume_changed_data
        )
    return model, tokenizer, prepared, train_rows, eval_batches, resolved


def _prepare_model(
    model, tokenizer, prepared, cfg: TrainConfig, info: DistInfo, device, resume_from, resolved
):
    """The model on its device (LoRA applied), the samples answered before training (whole model, before
    compile and sharding), then the engine's set-up as ``resolved`` (planned) says. Returns ``(setup, before)``."""
    model.to(device)
    if cfg.lora:
        lora.apply_from_config(model, cfg)
    before = None
    if resume_from is None and cfg.num_samples and info.is_main:
        convs = prepared.eval_conversations
        before = answer_samples(model, tokenizer, convs, cfg, device, autocast_factory(resolved.autocast))
    setup = setup_model(model, resolved, device)  # before sharding
    log.info(
        "engine: attention %s, %s, %d checkpointed blocks%s%s%s",
        setup["attention"],
        "blocks compiled one by one" if setup["compile"] else "not compiled",
        resolved.checkpoint_blocks,
        f" (+{resolved.selective_blocks} selectively)" if resolved.selective_blocks else "",
        f", {resolved.offload_blocks} blocks' activations on the host" if resolved.offload_blocks else "",
        ", optimizer step in backward" if resolved.in_backward else "",
    )
    return setup, before


def _open_run_folder(cfg, info: DistInfo, device, resume_from, run_dir, open_run, cfg_dict, prepared, model):
    """A new run: rank 0 names and makes the folder (every rank uses that name), locks it and writes
    config.json; a resumed one: its folder. Returns ``(run_dir, metrics writer)``; a failure removes a
    folder made here."""
    created = False
    if resume_from is None:
        if info.is_main:  # a generated name gets -2, -3... if taken; a chosen one is never changed
            name = cfg.run_name or runs.run_name(cfg.model, cfg.data)
            run_dir = runs.create_run_dir(cfg.out_dir, name, unique=cfg.run_name is None)
            created = True
        run_dir = Path(cfg.out_dir) / distributed.broadcast_object(
            run_dir.name if info.is_main else None, info
        )
    try:
        if created:
            open_run(run_dir)  # locked from its creation to the end of the run
        if resume_from is None and info.is_main:
            name = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
            name = f"{name} x {info.world} (FSDP2)" if info.enabled else name
            runs.write_config(run_dir, cfg_dict, prepared=prepared, model=model, device=name)
        writer = runs.MetricsWriter(run_dir) if info.is_main else NoWriter()
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir, writer


def _restore(run: _Run, resume_from: Path) -> None:
    """Load the checkpoint's weights, optimizer state, step and RNG; drop metrics written after it."""
    if run.info.enabled:
        run.state = distributed.load_checkpoint(
            resume_from, model=run.root, optimizer=run.optimizer, info=run.info
        )
    else:
        run.state = checkpoints.load_checkpoint(resume_from, model=run.model, optimizer=run.optimizer)
    if run.info.is_main:
        runs.truncate_metrics(run.run_dir, run.state["step"], at_end=run.state["step"] >= run.total_steps)
    run.eval_before = run.state.get("eval_before")


def _start(run: _Run, before: list[dict] | None) -> None:
    """A new run: say what it is, evaluate before training, write the samples answered before it."""
    cfg, info = run.cfg, run.info
    log.info(
        "run %s: %d train rows, %d held-out batches, %d steps of %d x %d rows%s, %.1fM parameters, %s",
        run.run_dir,
        run.stream.n_rows,
        sum(len(b) for b in run.eval_batches.values()),
        run.total_steps,
        cfg.grad_accum,
        cfg.micro_batch,
        f" x {info.world} ranks (FSDP2)" if info.enabled else "",
        run.n_params / 1e6,
        run.device,
    )
    run.eval_before = run.state["eval_before"] = run.evaluate_and_log(0)["eval_loss"]
    if before is not None:
        runs.write_samples(run.run_dir, [{"stage": "before", "step": 0, **s} for s in before])
        print_samples("before", before)


def _loop(run: _Run) -> str | None:
    """Engine steps until the last one, a stop signal, ``--stop_after`` or ``--on_nan=stop``; returns why it
    stopped early (None when it ran to the end)."""
    cfg, info, state = run.cfg, run.info, run.state
    A, W = cfg.grad_accum, info.world
    previous_handlers = install_stop_handlers(run.stop)
    bar = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=run.total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True
        )
    run.root.train()
    beside_bar = contextlib.ExitStack()
    if bar is not None:
        beside_bar.enter_context(console_beside_bar(tqdm))
    try:
        while state["step"] < run.total_steps:
            step = state["step"]
            if run.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(run.device)
            # rank r takes micro-batches (s*A + j)*W + r: the ranks together read what one process with
            # grad_accum = A*W would, so losses match it (and each rank reads distinct rows)
            micro = [run.stream[(step * A + j) * W + info.rank] for j in range(A)]
            lr = optim.lr_at(step, cfg, run.total_steps)
            res = run.engine.step(micro, lr, flags=[int(bool(run.stop.get("signal")))])
            if res.flags[0] and not run.stop.get("signal"):  # any rank's signal stops every rank
                run.stop["signal"] = "a signal on another rank"
            reason = _after_step(run, step, lr, res, bar)
            if reason:
                return reason
    finally:
        beside_bar.close()
        if bar is not None:
            bar.close()
        for s, h in previous_handlers.items():
            signal.signal(s, h)
    return None


def _after_step(run: _Run, step: int, lr: float, res, bar) -> str | None:
    """Count, log, evaluate, checkpoint and decide whether to stop after step ``step`` (0-based)."""
    cfg, state = run.cfg, run.state
    if res.skipped or (res.grad_norm is None and not math.isfinite(res.loss)):
        state["skipped_steps"] += 1
        log.warning(
            "step %d: non-finite loss %s / grad norm %s: update skipped", step + 1, res.loss, res.grad_norm
        )
        if cfg.on_nan == "stop":
            return f"non-finite loss at step {step + 1} (--on_nan=stop)"
    state["step"] = step + 1
    state["tokens_processed"] += res.processed
    state["tokens_nonpad"] += res.nonpad
    state["tokens_supervised"] += res.n_supervised
    mfus = step_mfus(run.n_params, run.layers, run.width, res, run.peak, run.info.world)
    peak_mem = None
    if run.device.type == "cuda":
        peak_mem = distributed.all_reduce_max(torch.cuda.max_memory_allocated(run.device) / 2**30, run.info)
    epoch = run.epoch(state["step"])
    if state["step"] % cfg.log_every == 0 or state["step"] == run.total_steps:
        run.writer.train(runs.train_row(state, epoch, res, lr, mfus, peak_mem))
        line = step_line(
            state["step"], run.total_steps, res.loss, lr, res.dt, res.processed / res.dt, mfus[0], peak_mem
        )
        log.info(line)  # console (stderr, beside the bar: console_beside_bar) and train.log
    if bar is not None:
        bar.update(1)
    last = state["step"] >= run.total_steps
    if cfg.eval_every and state["step"] % cfg.eval_every == 0 and not last:
        run.evaluate_and_log(state["step"])
    if cfg.save_every and state["step"] % cfg.save_every == 0 and not last:
        run.save_checkpoint()
    if run.stop.get("signal"):
        return f"stopped by {run.stop['signal']}"
    if cfg.stop_after and state["step"] >= cfg.stop_after and not last:
        return f"stopped after step {state['step']} (--stop_after)"
    return None


def _finish(run: _Run, stopped_reason: str | None, t_start: float) -> Path:
    """Checkpoint; then, unless stopped early: evaluate, answer the prompts again, write final/ and the plot."""
    cfg, info, state, run_dir = run.cfg, run.info, run.state, run.run_dir
    # a run that finished keeps a checkpoint only if checkpoints were asked for (--save_every): final/ holds
    # its weights; one stopped early always gets one, to resume from. Before final/ is written there is
    # always one (removed again once final/ is in place if none was asked for): a failure while writing
    # final/ (full disk, a second Ctrl-C) then leaves a run that --resume finishes
    safety_only = stopped_reason is None and not cfg.save_every and cfg.save_final
    try:
        ckpt = (
            run.save_checkpoint() if (stopped_reason is not None or cfg.save_every or safety_only) else None
        )
    except KeyboardInterrupt:
        raise TrainingStopped(
            f"interrupted while writing the last checkpoint (step {state['step']}); the checkpoints already "
            f"there are intact: continue with --resume={run_dir}"
        ) from None
    if stopped_reason is not None:
        run.writer.close()
        if info.is_main:
            runs.plot_loss(run_dir)
            runs.log_run_size(run_dir)
        msg = f"{stopped_reason}: checkpoint {ckpt}; continue with --resume={run_dir}"
        if run.stop.get("signal") or cfg.on_nan == "stop" and "non-finite" in stopped_reason:
            raise TrainingStopped(msg)
        log.info(msg)
        return run_dir
    eval_after = run.evaluate_and_log(state["step"])["eval_loss"]
    run.writer.close()
    if cfg.keep_best and state.get("best") and state["best"]["step"] != state["step"]:
        best = load_best(run_dir, run.model)  # final/ (and the samples below) are the best step's weights
        log.info("--keep_best: final/ is step %d (held-out loss %.4f)", best["step"], best["eval_loss"])
    export = run.model
    if info.enabled and (cfg.num_samples or cfg.save_final):
        # the full weights gathered to rank 0 into an unsharded copy (None on the other ranks)
        export = distributed.consolidated_model(run.root, info)
        if export is not None:
            export.to(run.device)
    if not info.is_main:
        return run_dir
    if cfg.num_samples:
        after = answer_samples(
            export, run.tokenizer, run.prepared.eval_conversations, cfg, run.device, run.autocast
        )
        runs.write_samples(run_dir, [{"stage": "after", "step": state["step"], **s} for s in after])
        print_samples("after", after)
    if cfg.lora:
        lora.save_adapter(export, run_dir / "adapter")
    if cfg.save_final:
        _write_final(run, export, ckpt)
    runs.plot_loss(run_dir)
    checkpoints.mark_finished(run_dir, state["step"])  # --resume=latest passes this run by now
    if safety_only and ckpt is not None:  # final/ is in place: the checkpoint nobody asked for goes
        checkpoints.discard(ckpt)
    if cfg.export_gguf != "none":  # check_config: save_final is on
        runs.export_final_gguf(run_dir, cfg.export_gguf)
    log.info(
        "held-out loss %.4f -> %.4f (%+.4f) after %d steps in %.0f s; run folder %s", run.eval_before,
        eval_after, eval_after - run.eval_before, state["step"], time.time() - t_start, run_dir,
    )  # fmt: skip
    runs.log_run_size(run_dir)
    return run_dir


def _write_final(run: _Run, export, ckpt: Path) -> None:
    """``final/``: the training chat template on the tokenizer, LoRA merged, and with ``--keep_best`` which
    step it holds; a failure names the complete checkpoint ``ckpt`` that ``--resume`` finishes from."""
    from sft.data.render import attach_template

    attach_template(run.tokenizer, run.cfg.template)  # inference renders exactly as training did
    if run.cfg.lora:
        lora.merge_lora(export)  # in place: the plain architecture again, adapters folded in
    best = run.state.get("best") if run.cfg.keep_best else None
    notes = {"keep_best.json": {**best, "last_step": run.state["step"]}} if best else None
    resume_hint = f"checkpoint {ckpt.name} is complete: --resume={run.run_dir} writes final/"
    try:
        runs.save_final(run.run_dir, export, run.tokenizer, notes)
    except RunError as e:  # "could not write .../final (no space left on <run folder>); ..."
        raise RunError(f"{e}; {resume_hint}") from None
    except KeyboardInterrupt:
        raise TrainingStopped(
            f"interrupted while writing final/ (nothing half-written left); {resume_hint}"
        ) from None


# ----------------------------------------------------------------------------- command line


def main(defaults: TrainConfig, argv: list[str] | None = None, smoke: dict | None = None) -> int:
    """Entry point of the recipes: parse ``--field=value`` over ``defaults``, apply the recipe's ``smoke``
    overrides when ``--smoke`` (explicit arguments still win), train. Returns the exit status: 0 on
    success, 2 on bad input (one line on stderr, no run folder; also a run folder in use by another
    process, or ``--resume`` with a flag that cannot change), 130 when stopped by a signal."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        given = parse_updates(argv, defaults)
        cfg = dataclasses.replace(defaults, **given)
        if cfg.smoke and smoke:
            cfg = dataclasses.replace(defaults, **{**smoke, **given})
        train(cfg, given=given)
    except (ConfigError, ModelError, DataError, RunError, TemplateError) as e:
        return error_exit(e)
    except TrainingStopped as e:
        sys.stderr.write(f"{e}\n")
        return 130
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        why = out_of_memory(e)
        if why is None:
            raise
        # the run folder's lock went with the unwinding (hold_run_lock); its checkpoints, if any, are intact
        sys.stderr.write(
            f"error: out of memory ({why}) although the memory plan expected the run to fit: lower "
            "--micro_batch or --max_len, or give --memory_limit_gib below what is free\n"
        )
        return 2
    return 0
