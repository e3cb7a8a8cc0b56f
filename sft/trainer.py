"""The training loop: ``train(cfg) -> run_dir``, read top to bottom.

What one call does, in order:
1. checks every input (out_dir writable, data file present, model found, data valid) before making
   the run folder; any failure raises a one-line error (ConfigError, ModelError, DataError, RunError)
   and leaves no run folder behind;
2. loads model + tokenizer, prepares the data (render, split, pack), predicts the memory the run needs
   (:func:`check_memory`: weights + grads + optimizer state + a rough activation term against the free GPU
   memory; ConfigError naming the remedies if it cannot fit), moves the model to the device, applies LoRA
   (``--lora``), then creates the run folder;
3. evaluates the held-out loss and answers a few held-out prompts (before);
4. trains: each optimizer step takes ``grad_accum`` micro-batches of ``micro_batch`` rows, each
   backpropagating ``sum CE / N_step`` (N_step = supervised targets of the whole step, see sft/loss.py),
   clips the gradient norm, sets the learning rate (linear warm-up, then cosine/linear decay to
   ``lr * min_lr_ratio``), and steps AdamW; logs one line per ``log_every`` steps;
5. checkpoints every ``save_every`` steps, on SIGTERM/Ctrl-C (then exits) and at the end;
6. evaluates and answers the prompts again (after), writes ``final/``, ``loss.png``.

Data order is a pure function of the seed: epoch ``e`` visits the training rows in the order
``torch.randperm(R, generator=seed + e)``; step ``s`` takes micro-batches ``s*A .. s*A + A - 1`` of that
endless stream. So the data position of a checkpoint is just its step, and ``--resume`` reproduces the
losses of an uninterrupted run exactly (on CPU, bit for bit).

Several processes (``torchrun --nproc_per_node W``, or ``--distributed`` for a group of one): the model is
sharded with FSDP2 (sft/distributed.py). Rank r takes micro-batches ``(s*A + j)*W + r`` of the same seeded
stream, so W ranks with ``grad_accum=A`` see exactly what one process with ``grad_accum=A*W`` sees; N_step
and the step's sums are all-reduced, so the losses are that process's. Rank 0 alone writes the run folder
(its name broadcast to all), metrics, samples and ``final/`` (consolidated from the shards); checkpoints
are sharded (``torch.distributed.checkpoint``) and resume at the same world size.

LoRA (``--lora``, sft/lora.py): adapters are injected after the model is on its device and before
checkpointing, sharding or compiling; only they train (fp32 under ``--optimizer=adamw``, else the base
dtype), with ``--qlora`` over an NF4-quantized base. Checkpoints hold the adapter weights alone (the base is
reloaded from its source at resume); at the end ``adapter/`` holds the adapter in peft's format and
``final/`` the merged full weights (loads with ``AutoModelForCausalLM``). Not with FSDP2 yet (ConfigError).

MFU (GPU only, and ``null`` with LoRA: the frozen base has no weight gradient, so 6N does not apply): FLOPs per processed token = ``6 N + 12 L d T_attn`` (PaLM, appendix B) with N all
parameters and ``T_attn`` the token-weighted mean length of the document each token sits in
(``sum n_doc^2 / sum n_doc`` over the step's documents, padding counted as its own document); peak bf16
dense FLOP/s from :data:`PEAK_FLOPS` by device name; ``null`` on CPU or an unknown GPU.
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
from pathlib import Path

import torch

from sft import distributed, runs
from sft.config import ConfigError, TrainConfig, check_config, parse_args, parse_targets
from sft.distributed import DistInfo
from sft.loss import chunked_cross_entropy_sum, count_supervised
from sft.models import ModelError, forward_hidden, load_model_and_tokenizer
from sft.render import TemplateError
from sft.runs import RunError
from sft.schema import IGNORE_INDEX, DataError

log = logging.getLogger("sft")

PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


class TrainingStopped(RuntimeError):
    """The run stopped early (signal or non-finite loss) after saving a checkpoint."""


# ----------------------------------------------------------------------------- helpers


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``lr``, then decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(max(progress, 0.0), 1.0)
    lo = cfg.min_lr_ratio
    if cfg.decay == "cosine":
        return cfg.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.lr * (1 - (1 - lo) * progress)


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _layers_and_width(model) -> tuple[int, int]:
    c = model.config
    L = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers", 0)
    d = getattr(c, "hidden_size", None) or getattr(c, "d_model", 0)
    return int(L), int(d)


def attention_flops_tokens(document_ids: torch.Tensor) -> int:
    """``sum over documents of n_doc^2`` for a ``[B, T]`` document-id tensor (padding is a document)."""
    total = 0
    for row in document_ids:
        counts = torch.unique_consecutive(row, return_counts=True)[1]
        total += int((counts.long() ** 2).sum())
    return total


def enable_checkpointing(model) -> None:
    """Activation checkpointing (non-reentrant) on a transformers model or our MPT.

    transformers 5.24 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name warns, FutureWarning, until v6); older 5.x (the GPU image has 5.17) may only have the
    old name, so the new one is used when present."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:  # our MPT: a flag its forward reads
        model.gradient_checkpointing = True


# ----------------------------------------------------------------------------- memory prediction

# optimizer state in units of the trainable parameter's own element size (sft/optim.py's table): AdamW keeps
# two moments in the parameter's dtype; the Kahan variant adds one compensation buffer per parameter
OPTIMIZER_STATE_ELEMENTS = {"adamw": 2, "adamw_bf16": 2, "adamw_sr": 2, "adamw_kahan": 3}
# activations kept for backward per token and layer, in units of d_model elements. A deliberate lower
# bound, so that the check never refuses a run that fits: Korthikanti et al. 2022 count 34 bytes/h in 16-bit
# (17 elements) for an unfused block, but the fast path measured on an H200 (GUIDE.md section 3: MPT-7B,
# compiled blocks, FlexAttention, 2 rows of 2048) peaked 55.6 GiB with ~49.6 GiB of weights, grads and
# pure-bf16 AdamW state, i.e. ~6 elements; plain transformers with eager attention keeps far more.
# With checkpointing: one d-vector per layer (the block inputs) plus one block's set during recompute.
ACTIVATION_ELEMENTS_PER_LAYER = 6
NF4_BYTES_PER_PARAM = 0.516  # 4 bits + one 8-bit scale per 64 values + the scales' own scales


def _lora_adapter_params(model, cfg: TrainConfig) -> int:
    """Elements LoRA will add (and train): ``rank * (in + out)`` per targeted ``nn.Linear``."""
    from sft import lora

    try:
        suffixes = tuple(parse_targets(cfg.lora_targets) or lora.default_targets(model))
    except ValueError as e:
        raise ConfigError(f"--lora: {str(e).splitlines()[0]}") from None
    return sum(
        cfg.lora_rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in suffixes
    )


def estimate_memory(model, cfg: TrainConfig, autocast: bool, world: int = 1) -> dict[str, int]:
    """Predicted peak bytes of one training process, by part, before anything moves to the device.

    ``model``: the loaded model in its training dtype, before LoRA. Returns ``{"weights", "grads",
    "optimizer", "activations", "total"}`` in bytes:
    - weights: every parameter at its element size (NF4-quantized targets at ~0.52 B with ``--qlora``);
    - grads and optimizer state: trainable parameters only (all of them, or the LoRA adapters: fp32 under
      ``adamw``, else the base dtype), state = ``OPTIMIZER_STATE_ELEMENTS[optimizer]`` x element size
      (adamw on fp32: 4 + 8 = 12 B/param + 4 grad; adamw_bf16/adamw_sr 2 + 4 (+2); adamw_kahan 2 + 6 (+2));
    - activations (rough, a lower bound: no attention scores, no allocator slack): ``micro_batch * max_len``
      tokens x ``d`` x (6 per layer, or 1 per layer + 6 with ``--grad_checkpointing``; see
      ``ACTIVATION_ELEMENTS_PER_LAYER``) elements of 2 B under bf16 (autocast or weights), else 4 B; plus one
      loss chunk of fp32 logits and their gradient.
    So ``total`` is what the run needs at least: a run above the free memory cannot fit, one below may still
    run out (eager attention, fragmentation).
    Under FSDP2 (``world`` > 1) weights, grads and state are divided by ``world`` (sharded); activations not.
    """
    n_all = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    base_elem = next(model.parameters()).element_size()
    if cfg.lora:
        n_train = _lora_adapter_params(model, cfg)
        train_elem = 4 if cfg.optimizer == "adamw" else base_elem
        weights += n_train * train_elem
        if cfg.qlora:
            from sft import lora

            suffixes = tuple(parse_targets(cfg.lora_targets) or lora.default_targets(model))
            quantized = sum(
                m.weight.numel()
                for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in suffixes
            )
            weights -= int(quantized * (base_elem - NF4_BYTES_PER_PARAM))
    else:
        n_train, train_elem = n_all, base_elem
    grads = n_train * train_elem
    optimizer = n_train * train_elem * OPTIMIZER_STATE_ELEMENTS[cfg.optimizer]
    L, d = _layers_and_width(model)
    act_elem = 2 if (autocast or base_elem == 2) else 4
    per_token = (
        (L + ACTIVATION_ELEMENTS_PER_LAYER) if cfg.grad_checkpointing else ACTIVATION_ELEMENTS_PER_LAYER * L
    )
    vocab = getattr(model.config, "vocab_size", 0) if hasattr(model, "config") else 0
    tokens = cfg.micro_batch * cfg.max_len
    activations = tokens * d * per_token * act_elem + 2 * min(cfg.loss_chunk, tokens) * vocab * 4
    sharded = (weights + grads + optimizer) // max(world, 1)
    return {
        "weights": weights // max(world, 1),
        "grads": grads // max(world, 1),
        "optimizer": optimizer // max(world, 1),
        "activations": activations,
        "total": sharded + activations,
    }


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes free for this run: ``torch.cuda.mem_get_info`` on CUDA, the OS's available memory on CPU
    (psutil, else /proc/meminfo's MemAvailable); None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
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


def check_memory(model, cfg: TrainConfig, device: torch.device, autocast: bool, world: int = 1) -> dict:
    """Raise ConfigError (one line) when the run cannot fit, before the first step and the run folder.

    CUDA: the :func:`estimate_memory` total against :func:`free_memory_bytes`. CPU: only when the weights
    alone exceed the available memory (the OS swaps rather than fails, and a CPU run is a test or a small
    model). Returns the estimate (bytes by part).
    """
    est = estimate_memory(model, cfg, autocast, world)
    free = free_memory_bytes(device)
    need = est["total"] if device.type == "cuda" else est["weights"]
    log.info(
        "memory estimate: ~%.2f GiB (weights %.2f, grads %.2f, optimizer %.2f, activations ~%.2f)%s",
        est["total"] / 2**30,
        est["weights"] / 2**30,
        est["grads"] / 2**30,
        est["optimizer"] / 2**30,
        est["activations"] / 2**30,
        f"; {free / 2**30:.2f} GiB free" if free is not None else "",
    )
    if free is not None and need > free:
        where = "the GPU has" if device.type == "cuda" else "this machine has"
        what = "this run needs" if device.type == "cuda" else "the weights alone need"
        raise ConfigError(
            f"{what} ~{need / 2**30:.1f} GiB (weights {est['weights'] / 2**30:.1f}, grads "
            f"{est['grads'] / 2**30:.1f}, optimizer {est['optimizer'] / 2**30:.1f}, activations "
            f"~{est['activations'] / 2**30:.1f}), {where} {free / 2**30:.1f} GiB free: try --lora / "
            "--optimizer=adamw_kahan / --grad_checkpointing / smaller --micro_batch"
        )
    return est


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _install_stop_handlers(flag: dict) -> dict:
    """SIGTERM and SIGINT set ``flag["signal"]``; the loop checkpoints and stops after the current step."""
    previous = {}

    def handler(signum, frame):
        if flag.get("signal"):  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving a checkpoint, then stopping", flag["signal"])

    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[s] = signal.signal(s, handler)
        except ValueError:  # not in the main thread
            pass
    return previous


# ----------------------------------------------------------------------------- data


def data_sources(cfg: TrainConfig):
    """``(train specs, eval specs)`` parsed from ``--data`` / ``--eval_data`` (sft/mixture.py); one-line
    ConfigError / DataError for a bad spec or a missing file."""
    from sft.mixture import parse_sources

    defaults = {"fmt": cfg.fmt, "fields": cfg.fields, "limit": cfg.limit, "bad_rows": cfg.bad_rows}
    specs = parse_sources(cfg.data, what="--data", defaults=defaults)
    evals = (
        parse_sources(cfg.eval_data, what="--eval_data", defaults=defaults, weighted=False)
        if cfg.eval_data
        else []
    )
    return specs, evals


def prepare(cfg: TrainConfig, tokenizer):
    """Render, split, mix and return ``(Mixture, train_rows, eval_batches)`` (sft/mixture.py).

    ``train_rows``: a Batch dict of ``[R, T]`` tensors (packed) or the list of training Samples (padded
    per micro-batch). ``eval_batches``: held-out source name -> a list of Batch dicts of at most
    ``micro_batch`` rows, fixed order (``--eval_batches`` caps each source).
    """
    from sft.mixture import prepare_mixture
    from sft.packing import pack, pad_collate

    specs, eval_specs = data_sources(cfg)
    eval_size = int(cfg.eval_size) if cfg.eval_size >= 1 else cfg.eval_size
    prepared = prepare_mixture(
        specs,
        tokenizer,
        eval_specs=eval_specs,
        template=cfg.template,
        max_len=cfg.max_len,
        overlong=cfg.overlong,
        eval_size=eval_size,
        seed=cfg.seed,
    )
    if not prepared.train:
        raise DataError("no training sample left after the held-out split", source=cfg.data)

    pad_id = pad_token_id(tokenizer)

    def packed(samples):
        return _as_batch(pack(samples, cfg.max_len, pad_id))

    train_rows = packed(prepared.train) if cfg.packing else list(prepared.train)
    eval_batches = {}
    for name, samples in prepared.eval_by_source.items():
        if not samples:
            continue
        if cfg.packing:
            ev = packed(samples)
            n = ev["input_ids"].size(0)
            batches = [
                {k: v[i : i + cfg.micro_batch] for k, v in ev.items()} for i in range(0, n, cfg.micro_batch)
            ]
        else:
            batches = [
                _as_batch(pad_collate(samples[i : i + cfg.micro_batch], pad_id))
                for i in range(0, len(samples), cfg.micro_batch)
            ]
        eval_batches[name] = batches[: cfg.eval_batches] if cfg.eval_batches else batches
    return prepared, train_rows, eval_batches


def pad_token_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad id, else 0 (never a target: targets are IGNORE_INDEX there)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _as_batch(x) -> dict[str, torch.Tensor]:
    """A Batch dict from ``pack``'s output (a Batch already, or a list of rows for ``collate_rows``)."""
    if isinstance(x, dict):
        return x
    from sft.packing import collate_rows

    return collate_rows(list(x))


class MicroBatches:
    """Micro-batch ``i`` of the endless, seeded, epoch-shuffled stream over the training rows."""

    def __init__(self, rows, cfg: TrainConfig, pad_id: int = 0):
        self.rows, self.cfg, self.pad_id = rows, cfg, pad_id
        self.n_rows = rows["input_ids"].size(0) if isinstance(rows, dict) else len(rows)
        self.per_epoch = math.ceil(self.n_rows / cfg.micro_batch)
        self._order: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed + epoch)
            self._order = (epoch, torch.randperm(self.n_rows, generator=g))
        return self._order[1]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(i, self.per_epoch)
        idx = self.order(epoch)[j * self.cfg.micro_batch : (j + 1) * self.cfg.micro_batch]
        if isinstance(self.rows, dict):
            return {k: v[idx] for k, v in self.rows.items()}
        from sft.packing import pad_collate

        return _as_batch(pad_collate([self.rows[int(k)] for k in idx], self.pad_id))


# ----------------------------------------------------------------------------- eval and samples


def ce_sum(model, batch, fwd=forward_hidden, chunk: int = 1024) -> torch.Tensor:
    """Sum of CE over the supervised targets of ``batch`` (0-d fp32). ``model`` is a plain model, or the
    FSDP root :class:`sft.distributed.LossModule` (which runs the head and the loss inside its forward)."""
    if isinstance(model, distributed.LossModule):
        return model(batch["input_ids"], batch["targets"], batch["document_ids"], batch["position_ids"])
    h, w = fwd(model, batch)
    return chunked_cross_entropy_sum(h, w, batch["targets"], chunk)


@torch.no_grad()
def evaluate(model, batches, device, autocast, chunk: int, info: DistInfo | None = None) -> tuple[float, int]:
    """Held-out loss: sum of CE over all supervised targets / their number; returns ``(loss, N)``.

    Distributed: rank r takes batches r, r + W, ...; ranks with one batch fewer run a batch with every
    target ignored (FSDP needs the same number of forwards on every rank); sums are all-reduced.
    """
    if not batches:
        return float("nan"), 0
    if info is not None and info.enabled:
        W = info.world
        dummy = {**batches[0], "targets": torch.full_like(batches[0]["targets"], IGNORE_INDEX)}
        mine = batches[info.rank :: W]
        batches = mine + [dummy] * (math.ceil(len(batches) / W) - len(mine))
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with autocast():
            total += float(ce_sum(model, b, chunk=chunk))
        n += int((b["targets"] != IGNORE_INDEX).sum())
    model.train(was_training)
    if info is not None and info.enabled:
        total, n = distributed.all_reduce_sum(total, info), distributed.all_reduce_sum(n, info)
    return total / max(n, 1), n


def answer_samples(model, tokenizer, conversations, cfg: TrainConfig, device, autocast, n=None) -> list[dict]:
    """Greedy answers to the first ``n`` (default ``num_samples``) held-out conversations' last user turn
    (reference = the data's answer; ``stopped``: ended with the end-of-turn token; sft/evaluation.py)."""
    from sft.evaluation import answer

    def greedy(ids, max_new, stops):
        return _greedy(model, ids, max_new, stops, device, autocast, tokenizer)

    n = cfg.num_samples if n is None else n
    return answer(
        model, tokenizer, conversations[:n], template=cfg.template, max_new_tokens=cfg.samples_max_new_tokens,
        greedy=greedy,
    )  # fmt: skip


def held_out(root, model, tokenizer, eval_batches, prepared, cfg, device, autocast, info, fwd) -> dict:
    """One evaluation's metrics (the eval keys of metrics.jsonl after step and epoch): loss overall and per
    held-out source, token accuracy, stop rate over ``--eval_prompts`` held-out prompts (sft/evaluation.py).
    Under FSDP the loss alone (the sharded loss module gives no logits and no generation): the rest is None."""
    from sft import evaluation

    per = {}
    for name, batches in eval_batches.items():
        if info.enabled:
            loss, n = evaluate(root, batches, device, autocast, cfg.loss_chunk, info)
            per[name] = (loss * n, n, None)
        else:
            per[name] = evaluation.measure(
                root, batches, device=device, autocast=autocast, chunk=cfg.loss_chunk, fwd=fwd
            )
    m = evaluation.combine(per)
    rate = None
    if cfg.eval_prompts and not info.enabled and prepared.eval_conversations:
        convs = prepared.eval_conversations
        rate = evaluation.stop_rate(
            answer_samples(model, tokenizer, convs, cfg, device, autocast, cfg.eval_prompts)
        )
    return {
        "eval_loss": m["eval_loss"],
        "eval_tokens_supervised": m["eval_tokens_supervised"],
        "eval_token_accuracy": m["eval_token_accuracy"],
        "eval_stop_rate": rate,
        "eval_loss_by_source": m["eval_loss_by_source"],
    }


def _eval_line(step: int, ev: dict) -> str:
    """The console line of one evaluation: loss, per source when several, token accuracy, stop rate."""
    per = ev["eval_loss_by_source"]
    srcs = (
        " (" + ", ".join(f"{k} {v:.4f}" for k, v in per.items() if v is not None) + ")"
        if len(per) > 1
        else ""
    )
    acc, stop = ev["eval_token_accuracy"], ev["eval_stop_rate"]
    return (
        f"step {step}: held-out loss {ev['eval_loss']:.4f}{srcs} on {ev['eval_tokens_supervised']} tokens"
        + (f" | token accuracy {acc:.3f}" if acc is not None else "")
        + (f" | stop rate {stop:.2f}" if stop is not None else "")
    )


def save_best(run_dir: Path, model, best: dict) -> None:
    """``--keep_best``: the trainable weights of step ``best["step"]`` to ``<run>/best/`` (temp + rename)."""
    from safetensors.torch import save_file

    tmp = run_dir / "best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {k: p.detach().cpu().contiguous() for k, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    runs._write_json(tmp / "best.json", best)
    shutil.rmtree(run_dir / "best", ignore_errors=True)
    tmp.rename(run_dir / "best")


def load_best(run_dir: Path, model) -> dict:
    """Put ``<run>/best/``'s trainable weights back into ``model``; returns its ``{"step", "eval_loss"}``."""
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "best" / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    return runs._read_json(run_dir / "best" / "best.json")


def _greedy(model, ids, max_new, stops, device, autocast, tokenizer) -> list[int]:
    if hasattr(model, "generate") and hasattr(model, "generation_config"):
        x = torch.tensor([ids], device=device)
        with autocast():
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=stops or None,
                pad_token_id=tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else (stops or [0])[0],
            )
        return y[0, len(ids) :].tolist()
    from sft.generate import generate  # our fast MPT

    return list(generate(model, [ids], max_new, stop_ids=stops).tokens[0])


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) one training run; return its run folder. See the module docstring.

    Under ``torchrun`` (WORLD_SIZE > 1) or with ``--distributed``, the model is sharded with FSDP2
    (sft/distributed.py) and every rank runs this same function; rank 0 alone writes the run folder.
    """
    t_start = time.time()
    resume_from, run_dir = None, None
    if cfg.resume:
        run_dir, resume_from = runs.find_resume(cfg.out_dir, cfg.resume)  # plain or sharded (DCP)
        saved = TrainConfig.from_dict(runs._read_json(resume_from / "config.json"))
        # the run continues with its own config; only these knobs may change on resume
        cfg = dataclasses.replace(saved, resume=cfg.resume, stop_after=cfg.stop_after, progress=cfg.progress)
    device = resolve_device(cfg)
    info = DistInfo()
    if distributed.wanted(cfg):
        info = distributed.init(device.type)
    sft_log = logging.getLogger("sft")
    level = sft_log.level
    if not info.is_main:  # one console: rank 0's (warnings still show on every rank)
        sft_log.setLevel(logging.WARNING)
    try:
        return _train(cfg, info, device, resume_from, run_dir, t_start)
    finally:
        sft_log.setLevel(level)
        if info.enabled:
            distributed.destroy()


def _train(cfg: TrainConfig, info: DistInfo, device, resume_from, run_dir, t_start) -> Path:
    W = info.world
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if resume_from is not None:
        log.info("resuming %s from %s", run_dir, resume_from.name)
        if distributed.is_dcp_checkpoint(resume_from) != info.enabled or (
            info.enabled and distributed.checkpoint_world_size(resume_from) != W
        ):
            n = (
                distributed.checkpoint_world_size(resume_from)
                if distributed.is_dcp_checkpoint(resume_from)
                else 1
            )
            how = f"torchrun --nproc_per_node {n}" if n > 1 else "one process"
            raise RunError(
                f"{resume_from} was written by {n} process(es) and this run has {W}: resume it with {how}"
            )
    if cfg.optimizer != "adamw" and cfg.precision != "bf16":
        raise ConfigError(f"--optimizer={cfg.optimizer} works on bf16 weights: add --precision=bf16")
    check_config(cfg)
    if cfg.lora and info.enabled:
        # the consolidated export and the DCP checkpoints do not know adapters yet (sft/distributed.py)
        raise ConfigError(
            "--lora with FSDP2 (torchrun / --distributed) is not supported yet: use one process"
        )
    if cfg.keep_best and info.enabled:
        raise ConfigError(
            "--keep_best with FSDP2 (torchrun / --distributed) is not supported yet: use one process"
        )
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # ---- inputs, cheapest checks first; the run folder comes only after all of them pass
    runs.check_writable(cfg.out_dir)
    data_sources(cfg)  # a bad --data / --eval_data fails before any model is loaded
    model, tokenizer = load_model_and_tokenizer(cfg)
    # distributed: rank 0 prepares (and caches) the data first, the other ranks then read its cache
    if not info.is_main:
        distributed.barrier(info)
    prepared, train_rows, eval_batches = prepare(cfg, tokenizer)
    if info.is_main:
        distributed.barrier(info)
    stream = MicroBatches(train_rows, cfg, pad_token_id(tokenizer))
    A = cfg.grad_accum
    # one optimizer step = A micro-batches on each of the W ranks: micro-batches s*A*W .. s*A*W + A*W - 1
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * stream.per_epoch / (A * W)))

    use_autocast = device.type == "cuda" and cfg.precision in ("auto", "bf16-autocast")
    # predicted memory against what the device has free: a run that cannot fit fails now, in one line,
    # before the run folder exists (ConfigError)
    check_memory(model, cfg, device, use_autocast, W)

    model.to(device)
    if cfg.lora:  # after .to(device) (NF4 quantizes on the device), before checkpointing/sharding/compile
        from sft import lora

        targets = parse_targets(cfg.lora_targets)
        try:
            if cfg.qlora:
                lora.quantize_nf4(model, targets=targets)
            # fp32 adapters under plain AdamW keep the small updates exact over a bf16 base
            lora.apply_lora(
                model,
                rank=cfg.lora_rank,
                alpha=cfg.lora_alpha,
                dropout=cfg.lora_dropout,
                targets=targets,
                adapter_dtype=torch.float32 if cfg.optimizer == "adamw" else None,
            )
        except ValueError as e:  # no default targets for this architecture, or a target matches nothing
            raise ConfigError(f"--lora: {str(e).splitlines()[0]}") from None
    if cfg.grad_checkpointing:  # before sharding: it wraps the block calls, FSDP hooks the blocks
        enable_checkpointing(model)

    def autocast():
        if use_autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    L, d = _layers_and_width(model)
    # MFU's 6N counts a full backward (weight + input gradients) for every parameter; with LoRA the frozen
    # base gets no weight gradient, so 6N overstates the work: MFU is reported as null
    peak = None if cfg.lora else peak_flops(device)
    cfg_dict = cfg.to_dict()
    model_info = {
        "class": type(model).__name__,
        "n_params": n_params,
        "n_trainable": n_trainable,
        "dtype": str(next(model.parameters()).dtype),
    }
    before = None
    if resume_from is None and cfg.num_samples and info.is_main:  # on the whole model, before sharding
        before = answer_samples(model, tokenizer, prepared.eval_conversations, cfg, device, autocast)

    # root: what the loop calls; under FSDP a LossModule over the sharded model (sft/distributed.py)
    root, fwd = model, forward_hidden
    if info.enabled:
        if cfg.compile:
            for block in distributed.transformer_blocks(model):
                block.compile()
        root = distributed.LossModule(model, cfg.loss_chunk)
        distributed.shard_model(
            root, distributed.mixed_precision(device, cfg.precision), device_type=device.type
        )
    elif cfg.compile:
        fwd = torch.compile(forward_hidden)

    from sft.optim import build_optimizer

    params = [p for p in root.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer = build_optimizer(groups, cfg.optimizer, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)

    def save_checkpoint():
        kw = dict(model=root, optimizer=optimizer, state=state, cfg_dict=cfg_dict, keep_last=cfg.keep_last)
        if info.enabled:
            return distributed.save_checkpoint(run_dir, state["step"], info=info, **kw)
        return runs.save_checkpoint(run_dir, state["step"], **kw)

    # ---- the run folder (rank 0 names it and makes it; every rank uses that name)
    created = False
    if resume_from is None:
        name = distributed.broadcast_object(cfg.run_name or runs.run_name(cfg.model, cfg.data), info)
        run_dir = Path(cfg.out_dir) / name
        if info.is_main:
            run_dir = runs.create_run_dir(cfg.out_dir, name)
            created = True
    try:
        if resume_from is None and info.is_main:
            dev_name = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
            runs.write_config(
                run_dir,
                cfg_dict,
                data={"fingerprint": prepared.fingerprint, "stats": prepared.stats},
                model=model_info,
                device=f"{dev_name} x {W} (FSDP2)" if info.enabled else dev_name,
            )
        writer = runs.MetricsWriter(run_dir) if info.is_main else _NoWriter()
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise

    state = {"step": 0, "tokens_processed": 0, "tokens_nonpad": 0, "tokens_supervised": 0, "skipped_steps": 0}
    if resume_from is not None:
        if info.enabled:
            state = distributed.load_checkpoint(resume_from, model=root, optimizer=optimizer, info=info)
        else:
            state = runs.load_checkpoint(resume_from, model=model, optimizer=optimizer)
        if info.is_main:
            runs.truncate_metrics(run_dir, state["step"])
        eval_before = state.get("eval_before")
    else:
        log.info(
            "run %s: %d train rows, %d held-out batches, %d steps of %d x %d rows%s, %.1fM parameters, %s",
            run_dir,
            stream.n_rows,
            len(eval_batches),
            total_steps,
            A,
            cfg.micro_batch,
            f" x {W} ranks (FSDP2)" if info.enabled else "",
            n_params / 1e6,
            device,
        )
        ev = held_out(root, model, tokenizer, eval_batches, prepared, cfg, device, autocast, info, fwd)
        eval_before = state["eval_before"] = ev["eval_loss"]
        writer.eval({"step": 0, "epoch": 0.0, **ev})
        log.info("before training: %s", _eval_line(0, ev))
        if before is not None:
            runs.write_samples(run_dir, [{"stage": "before", "step": 0, **s} for s in before])
            _print_samples("before", before)

    stop = {}
    previous_handlers = _install_stop_handlers(stop)
    bar = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    root.train()
    stopped_reason = None
    try:
        while state["step"] < total_steps:
            step = state["step"]
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # rank r takes micro-batches (s*A + j)*W + r: the ranks together read what one process with
            # grad_accum = A*W would, so losses match it (and each rank reads distinct rows)
            micro = [stream[(step * A + j) * W + info.rank] for j in range(A)]
            # N_step over all ranks: the loss is the mean over these (sft/loss.py)
            n_sup = distributed.all_reduce_sum(count_supervised(micro), info)
            lr = lr_at(step, cfg, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            ce_total = 0.0
            for mb in micro:
                mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
                with autocast():
                    ce = ce_sum(root, mb, fwd, cfg.loss_chunk)
                # FSDP averages gradients over the W ranks: W * CE / N makes that average sum CE / N
                ((ce * W) / max(n_sup, 1)).backward()
                ce_total += float(ce.detach())
            processed = sum(b["input_ids"].numel() for b in micro)
            nonpad = sum(int(b["attention_mask"].sum()) for b in micro)
            attn = sum(attention_flops_tokens(b["document_ids"]) for b in micro) if peak is not None else 0
            if info.enabled:  # one all-reduce for the step's sums; any rank's signal stops every rank
                ce_total, processed, nonpad, attn, n_signals = distributed.all_reduce_sum(
                    [ce_total, processed, nonpad, attn, int(bool(stop.get("signal")))], info
                )
                if n_signals and not stop.get("signal"):
                    stop["signal"] = "a signal on another rank"
            loss = ce_total / max(n_sup, 1)
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, clip)))
            if math.isfinite(loss) and math.isfinite(grad_norm):
                optimizer.step()
            else:
                state["skipped_steps"] += 1
                log.warning(
                    "step %d: non-finite loss %s / grad norm %s: update skipped", step + 1, loss, grad_norm
                )
                if cfg.on_nan == "stop":
                    optimizer.zero_grad(set_to_none=True)
                    stopped_reason = f"non-finite loss at step {step + 1} (--on_nan=stop)"
                    break
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0

            state["step"] = step + 1
            state["tokens_processed"] += processed
            state["tokens_nonpad"] += nonpad
            state["tokens_supervised"] += n_sup
            mfu = None
            if peak is not None:  # processed and attn are summed over the W ranks, so is the peak
                mfu = (6 * n_params * processed + 12 * L * d * attn) / dt / (peak * W)
            peak_mem = None
            if device.type == "cuda":
                peak_mem = distributed.all_reduce_max(torch.cuda.max_memory_allocated(device) / 2**30, info)
            epoch = (step + 1) * A * W / stream.per_epoch
            if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
                writer.train(
                    {
                        "step": state["step"],
                        "epoch": round(epoch, 4),
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "step_tokens_processed": processed,
                        "step_tokens_nonpad": nonpad,
                        "step_tokens_supervised": n_sup,
                        "tokens_processed": state["tokens_processed"],
                        "tokens_nonpad": state["tokens_nonpad"],
                        "tokens_supervised": state["tokens_supervised"],
                        "tokens_per_s": processed / dt,
                        "mfu": mfu,
                        "peak_mem_gib": peak_mem,
                        "step_time_s": dt,
                    }
                )
                line = step_line(state["step"], total_steps, loss, lr, dt, processed / dt, mfu, peak_mem)
                (bar.write(line) if bar is not None else log.info(line))
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < total_steps:
                ev = held_out(
                    root, model, tokenizer, eval_batches, prepared, cfg, device, autocast, info, fwd
                )
                writer.eval({"step": state["step"], "epoch": round(epoch, 4), **ev})
                log.info(_eval_line(state["step"], ev))
                _track_best(state, ev, cfg, run_dir, model, info)
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total_steps:
                save_checkpoint()
            if stop.get("signal"):
                stopped_reason = f"stopped by {stop['signal']}"
                break
            if cfg.stop_after and state["step"] >= cfg.stop_after and state["step"] < total_steps:
                stopped_reason = f"stopped after step {state['step']} (--stop_after)"
                break
    finally:
        if bar is not None:
            bar.close()
        for s, h in previous_handlers.items():
            signal.signal(s, h)

    # ---- end (or early stop): checkpoint, evaluate, answer again, export
    ckpt = save_checkpoint()
    if stopped_reason is not None:
        writer.close()
        if info.is_main:
            runs.plot_loss(run_dir)
        msg = f"{stopped_reason}: checkpoint {ckpt}; continue with --resume={run_dir}"
        if stop.get("signal") or cfg.on_nan == "stop" and "non-finite" in stopped_reason:
            raise TrainingStopped(msg)
        log.info(msg)
        return run_dir
    ev = held_out(root, model, tokenizer, eval_batches, prepared, cfg, device, autocast, info, fwd)
    eval_after = ev["eval_loss"]
    writer.eval({"step": state["step"], "epoch": round(state["step"] * A * W / stream.per_epoch, 4), **ev})
    log.info(_eval_line(state["step"], ev))
    _track_best(state, ev, cfg, run_dir, model, info)
    writer.close()
    if cfg.keep_best and state.get("best") and state["best"]["step"] != state["step"]:
        best = load_best(run_dir, model)  # final/ (and the samples below) are the best step's weights
        log.info("--keep_best: final/ is step %d (held-out loss %.4f)", best["step"], best["eval_loss"])
    export = model
    if info.enabled and (cfg.num_samples or cfg.save_final):
        # the full weights gathered to rank 0 into an unsharded copy (None on the other ranks)
        export = distributed.consolidated_model(root, info)
        if export is not None:
            export.to(device)
    if not info.is_main:
        return run_dir
    if cfg.num_samples:
        after = answer_samples(export, tokenizer, prepared.eval_conversations, cfg, device, autocast)
        runs.write_samples(run_dir, [{"stage": "after", "step": state["step"], **s} for s in after])
        _print_samples("after", after)
    if cfg.lora:
        from sft import lora

        lora.save_adapter(export, run_dir / "adapter")
    if cfg.save_final:
        from sft.render import attach_template

        attach_template(tokenizer, cfg.template)  # inference renders exactly as training did
        if cfg.lora:
            from sft import lora

            lora.merge_lora(export)  # in place: the plain architecture again, adapters folded in
        runs.save_final(run_dir, export, tokenizer)
        if cfg.keep_best and state.get("best"):  # which step final/ holds
            runs._write_json(
                run_dir / "final" / "keep_best.json", {**state["best"], "last_step": state["step"]}
            )
    runs.plot_loss(run_dir)
    log.info(
        "held-out loss %.4f -> %.4f (%+.4f) after %d steps in %.0f s; run folder %s",
        eval_before,
        eval_after,
        eval_after - eval_before,
        state["step"],
        time.time() - t_start,
        run_dir,
    )
    return run_dir


def _track_best(state: dict, ev: dict, cfg: TrainConfig, run_dir: Path, model, info: DistInfo) -> None:
    """``state["best"]``: the step with the lowest held-out loss so far; with ``--keep_best`` its weights are
    kept in ``<run>/best/`` (sft/evaluation.py's rule)."""
    from sft.evaluation import update_best

    state["best"], improved = update_best(state.get("best"), state["step"], ev["eval_loss"])
    if improved and cfg.keep_best and info.is_main:
        save_best(run_dir, model, state["best"])


class _NoWriter:
    """Stands in for :class:`sft.runs.MetricsWriter` on ranks other than 0 (they write nothing)."""

    def train(self, row) -> None:
        pass

    def eval(self, row) -> None:
        pass

    def close(self) -> None:
        pass


def step_line(step, total, loss, lr, dt, tok_s, mfu, mem) -> str:
    """The fixed-format console line: ``step | loss | lr | dt | tok/s | MFU | mem``."""
    mfu_s = f"{100 * mfu:5.1f}%" if mfu is not None else "    -"
    mem_s = f"{mem:6.2f} GiB" if mem is not None else "     - GiB"
    return (
        f"step {step:>6}/{total} | loss {loss:8.4f} | lr {lr:.3e} | dt {dt * 1000:8.1f} ms | "
        f"tok/s {tok_s:9.0f} | MFU {mfu_s} | mem {mem_s}"
    )


def _print_samples(stage: str, samples: list[dict]) -> None:
    for i, s in enumerate(samples):
        log.info(
            "[%s] sample %d\n  prompt: %s\n  answer: %s",
            stage,
            i + 1,
            _short(s["prompt"]),
            _short(s["answer"]),
        )


def _short(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------- command line


def setup_logging() -> None:
    """Console logging for scripts: INFO lines to stderr, without the library's own noise."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "huggingface_hub", "transformers", "datasets", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(defaults: TrainConfig, argv: list[str] | None = None, smoke: dict | None = None) -> int:
    """Entry point of the recipes: parse ``--field=value`` over ``defaults``, apply the recipe's ``smoke``
    overrides when ``--smoke`` (explicit arguments still win), train. Returns the exit status: 0 on
    success, 2 on bad input (one line on stderr, no run folder), 130 when stopped by a signal."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = parse_args(argv, defaults)
        if cfg.smoke and smoke:
            cfg = parse_args(argv, dataclasses.replace(defaults, **smoke))
        train(cfg)
    except (ConfigError, ModelError, DataError, RunError, TemplateError) as e:
        sys.stderr.write(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
        return 2
    except TrainingStopped as e:
        sys.stderr.write(f"{e}\n")
        return 130
    return 0
