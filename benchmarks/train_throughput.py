"""Training throughput and memory of MPT-7B on one GPU: the 2023 recipe against this project's path.

One process, one GPU call (about 6-8 minutes on one H200, torch.compile included). Every config runs
in its own try/except and frees its memory before the next, so one OOM loses only itself.

Configs (all random-init MPT-7B shape: d_model 4096, 32 heads, 32 layers, vocab 50,432, expansion 4,
no bias, ALiBi; bf16 weights; sequences of at most 2,048 tokens from guanaco-1k.jsonl):

- ``2023_recipe``: transformers' ``MptForCausalLM`` (eager attention), the first exchange of each
  conversation (``### Human: q`` + newline + ``### Assistant: a``), loss on every token, pad = EOS
  masked out of the labels, batches of 4 in data order padded to their longest, torch AdamW
  (its default foreach implementation, as the HF Trainer's ``adamw_torch``), no checkpointing.
  Its peak is also measured on the data's longest batch (``peak_worst_batch_gib``).
- ``ours_rows{R}``: ``sft.mpt.MPTForCausalLM`` with FlexAttention (ALiBi score_mod, causal
  same-document block mask) and compiled blocks, whole conversations rendered by ``sft.render``
  (guanaco template, only replies supervised) and packed by ``sft.packing.pack`` into R rows of 2,048,
  ``sft.loss.chunked_cross_entropy_sum``, gradient clipping, fused pure-bf16 AdamW (``adamw_bf16``).
- ``80gb_kahan``: the same with ``adamw_kahan`` (bf16 weights + bf16 moments + bf16 Kahan buffer,
  10 bytes/param with gradients) and activation checkpointing on the fewest blocks that keep the peak
  allocated memory <= 76 GiB: candidate (rows, checkpointed blocks) settings are probed for one step
  each and the fastest one that fits is timed.
- ``lora_rows4``: peft LoRA r=16 on Wqkv/out_proj/up_proj/down_proj of our MPT, base frozen.

Measured per config: tokens/s processed, non-pad and supervised (total tokens of the timed steps /
their total time); step time median; peak ``torch.cuda.max_memory_allocated`` over the timed steps;
MFU = tokens/s * flops/token / 989e12 (H100/H200 bf16 dense peak), with flops/token =
``6N + 12 * L * d * T_attn`` (PaLM appendix B; N = all parameters). T_attn is PaLM's sequence
length T taken per token as the length of the document it belongs to (token-weighted mean): for
"processed" tokens the attended row (the padded row for the 2023 recipe, whose eager attention
computes all of it; the documents and the padding block for packed rows), for non-pad and
supervised tokens the real documents. LoRA rows report no MFU (6N does not apply).

Also: the time of one epoch of the full Guanaco train set (9,846 conversations) at each config's
non-pad tokens/s and the sample's measured mean tokens per conversation.

    python benchmarks/train_throughput.py --data-dir shared_data --out bench.json
    python benchmarks/train_throughput.py --quick   # tiny shape on CPU, SDPA, a few steps: tests the script
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import math
import os
import platform
import random
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

# Before torch is imported (the CUDA caching allocator reads it once): expandable segments
# avoid fragmentation between configs of different shapes. Peak *allocated* memory (what the
# table reports) does not depend on it; reserved memory and OOM headroom do.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sft.formats import guanaco  # noqa: E402
from sft.loss import chunked_cross_entropy_sum  # noqa: E402
from sft.mpt import MPTConfig, MPTForCausalLM  # noqa: E402
from sft.optim import build_optimizer, step_in_backward  # noqa: E402
from sft.packing import collate_rows, pack, pad_collate  # noqa: E402
from sft.render import Sample, render_batch  # noqa: E402
from sft.schema import IGNORE_INDEX  # noqa: E402

log = logging.getLogger("train_throughput")

PEAK_FLOPS = 989e12  # H100 / H200 SXM bf16 dense
GUANACO_TRAIN_CONVERSATIONS = 9846
GIB = 2**30
DEFAULT_CONFIGS = "recipe,ours4,ours2,ours4lc4096,ours6,ours8,ours8ck8,80gb,80gbinbwd,lora"
OURS_KEY = re.compile(r"ours(\d+)(?:ck(\d+))?(?:lc(\d+))?$")


def parse_ours(key: str) -> tuple[str, int, int, int | None]:
    """``ours<R>[ck<N>][lc<C>]`` -> (name, rows, checkpointed blocks, loss chunk or None)."""
    m = OURS_KEY.match(key)
    if not m:
        raise ValueError(f"unknown config {key!r}")
    rows, ck, lc = int(m[1]), int(m[2] or 0), int(m[3]) if m[3] else None
    name = f"ours_rows{rows}" + (f"_ck{ck}" if ck else "") + (f"_lc{lc}" if lc else "")
    return name, rows, ck, lc


# ----------------------------------------------------------------------------- data
def load_tokenizer(data_dir: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(data_dir / "gpt-neox-20b-tokenizer.json"),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|padding|>",
    )


def load_conversations(data_dir: Path, limit: int | None) -> list[list[dict]]:
    convs = []
    with open(data_dir / "guanaco-1k.jsonl") as f:
        for line in f:
            if line.strip():
                convs.append(guanaco(json.loads(line)))
            if limit and len(convs) >= limit:
                break
    return convs


def recipe_samples(convs, tokenizer, max_len: int) -> list[Sample]:
    """2023 recipe: first human/assistant exchange joined by a newline, every token a label."""
    texts = []
    for conv in convs:
        user = next(m["content"] for m in conv if m["role"] == "user")
        reply = next((m["content"] for m in conv if m["role"] == "assistant"), "")
        texts.append(f"### Human: {user}\n### Assistant: {reply}")
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [Sample(ids[:max_len], ids[:max_len]) for ids in enc]


def project_samples(convs, tokenizer, max_len: int) -> list[Sample]:
    """Whole conversations through the project's renderer (guanaco template), cut to max_len."""
    samples, _ = render_batch(convs, tokenizer, "guanaco")
    return [Sample(s.input_ids[:max_len], s.labels[:max_len]) for s in samples]


def doc_lengths(batch: dict, real_only: bool) -> list[int]:
    """Lengths of the documents of a [B, T] batch (padding block excluded when real_only)."""
    out = []
    for doc, am in zip(batch["document_ids"].tolist(), batch["attention_mask"].tolist()):
        counts: dict[int, int] = {}
        for d, a in zip(doc, am):
            if a or not real_only:
                counts[d] = counts.get(d, 0) + 1
        out.extend(counts.values())
    return out


def token_weighted_len(lengths: list[int]) -> float:
    total = sum(lengths)
    return sum(n * n for n in lengths) / total if total else 0.0


def batch_stats(batch: dict, padded_attention: bool) -> dict:
    B, T = batch["input_ids"].shape
    real = doc_lengths(batch, real_only=True)
    return {
        "processed": B * T,
        "non_pad": int(batch["attention_mask"].sum()),
        "supervised": int((batch["targets"] != IGNORE_INDEX).sum()),
        # for T_attn: (sum n^2, sum n) over the attended blocks and over the real documents
        "attn_processed": (B * T * T, B * T)
        if padded_attention
        else (sum(n * n for n in doc_lengths(batch, False)), B * T),
        "attn_real": (sum(n * n for n in real), sum(real)),
    }


# ----------------------------------------------------------------------------- measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory():
    # compiled graphs keep references to the parameters they were traced with: drop them first,
    # or each config inherits the previous one's model (seen: LoRA peak 95 GiB instead of 45.5)
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def flops_per_token(n_params: int, n_layers: int, d_model: int, t_attn: float) -> float:
    return 6 * n_params + 12 * n_layers * d_model * t_attn


def time_steps(step_fn, batches, warmup: int, device) -> tuple[list[float], list[dict], float]:
    """Run warm-up steps (untimed), then one timed step per batch. Returns times, stats, peak bytes."""
    for b in batches[:warmup]:
        step_fn(b)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, stats = [], []
    for b in batches[warmup:]:
        sync(device)
        t0 = time.perf_counter()
        step_fn(b)
        sync(device)
        times.append(time.perf_counter() - t0)
        stats.append(b["_stats"])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return times, stats, peak


def summarize(name, times, stats, peak, n_params, cfg, extra=None, mfu=True) -> dict:
    total_t = sum(times)
    res = {"name": name, "steps_timed": len(times), "step_time_median_s": statistics.median(times)}
    res["tokens_per_s"] = {
        k: sum(s[k] for s in stats) / total_t for k in ("processed", "non_pad", "supervised")
    }
    t_proc = sum(s["attn_processed"][0] for s in stats) / max(sum(s["attn_processed"][1] for s in stats), 1)
    t_real = sum(s["attn_real"][0] for s in stats) / max(sum(s["attn_real"][1] for s in stats), 1)
    res["t_attn"] = {"processed": t_proc, "real": t_real}
    if mfu:
        fp = flops_per_token(n_params, cfg.n_layers, cfg.d_model, t_proc)
        fr = flops_per_token(n_params, cfg.n_layers, cfg.d_model, t_real)
        tps = res["tokens_per_s"]
        res["mfu"] = {
            "processed": tps["processed"] * fp / PEAK_FLOPS,
            "non_pad": tps["non_pad"] * fr / PEAK_FLOPS,
            "supervised": tps["supervised"] * fr / PEAK_FLOPS,
        }
    else:
        res["mfu"] = None
    res["peak_alloc_gib"] = peak / GIB
    res["n_params"] = n_params
    res.update(extra or {})
    return res


def to_device(batch: dict, device, padded_attention: bool) -> dict:
    stats = batch_stats(batch, padded_attention)
    out = {k: v.to(device) for k, v in batch.items()}
    out["_stats"] = stats
    return out


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- (a) 2023 recipe
def run_recipe(args, samples, shape: MPTConfig, device) -> dict:
    from transformers import MptConfig, MptForCausalLM

    hf_cfg = MptConfig(
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        n_layers=shape.n_layers,
        expansion_ratio=int(shape.expansion_ratio),
        max_seq_len=shape.max_seq_len,
        vocab_size=shape.vocab_size,
        no_bias=True,
    )
    with device, default_dtype(torch.bfloat16):
        model = MptForCausalLM(hf_cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    # The recipe's optimizer: torch AdamW with its default (foreach) implementation, bf16 state.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    eos = 0  # pad = EOS (<|endoftext|>, id 0), masked out of the labels

    def make(batch_samples):
        b = pad_collate(batch_samples, pad_id=eos)
        return to_device(b, device, padded_attention=True)

    def step(b):
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, IGNORE_INDEX)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    batches_all = [samples[i : i + 4] for i in range(0, len(samples) - 3, 4)]
    n = args.warmup + args.steps
    batches = [make(bs) for bs in batches_all[:n]]
    times, stats, peak = time_steps(step, batches, args.warmup, device)
    # The recipe's stats over ALL its batches (padding waste), and its peak on the longest batch.
    all_proc = sum(4 * max(len(s) for s in bs) for bs in batches_all)
    all_real = sum(len(s) for bs in batches_all for s in bs)
    extra = {
        "rows": 4,
        "optimizer": "torch AdamW (foreach), bf16 state",
        "non_pad_fraction_all_batches": all_real / all_proc,
        "mean_tokens_per_sample": all_real / (4 * len(batches_all)),
    }
    worst = max(batches_all, key=lambda bs: max(len(s) for s in bs))
    try:
        wb = make(worst)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step(wb)
        sync(device)
        extra["worst_batch_len"] = int(wb["input_ids"].shape[1])
        extra["peak_worst_batch_gib"] = (
            torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0
        )
    except torch.OutOfMemoryError as e:
        extra["peak_worst_batch_gib"] = f"OOM: {str(e).splitlines()[0]}"
    res = summarize("2023_recipe", times, stats, peak, n_params, shape, extra)
    return res


# ----------------------------------------------------------------------------- our path
class Checkpointed(torch.nn.Module):
    """Wraps one (compiled) block; when ``enabled``, recomputes it in backward (selective checkpointing)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block
        self.enabled = False

    def forward(self, x, attn):
        if self.enabled and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.block, x, attn, use_reentrant=False)
        return self.block(x, attn)


def build_ours(shape: MPTConfig, device, attn: str, compile_blocks: bool, lora: bool = False):
    with device, default_dtype(torch.bfloat16):
        model = MPTForCausalLM(shape, attn_impl=attn)
        model.init_weights(std=0.02)
    if lora:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["Wqkv", "out_proj", "up_proj", "down_proj"])
        model = inject_adapter_in_model(cfg, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        model.to(device=device, dtype=torch.bfloat16)
    if compile_blocks:
        model.compile_blocks(dynamic=False)
    blocks = model.transformer.blocks
    for i in range(len(blocks)):
        blocks[i] = Checkpointed(blocks[i])
    model.train()
    return model


def set_checkpointed(model, n: int) -> None:
    for i, b in enumerate(model.transformer.blocks):
        b.enabled = i < n


class Phases:
    """CUDA events around the phases of a step (forward, loss, backward, clip, optimizer).

    ``mark(name)`` records an event on the current stream when enabled; ``split()`` (after a
    synchronize) returns milliseconds per phase. Disabled, it only opens profiler ranges.
    """

    NAMES = ("forward", "loss", "backward", "clip", "optimizer")

    def __init__(self):
        self.enabled = False
        self.events: list[tuple[str, torch.cuda.Event]] = []
        self.totals: dict[str, float] = {}

    def mark(self, name: str) -> None:
        if self.enabled:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append((name, ev))

    def collect(self) -> None:
        torch.cuda.synchronize()
        for (name, a), (_, b) in zip(self.events, self.events[1:]):
            self.totals[name] = self.totals.get(name, 0.0) + a.elapsed_time(b)
        self.events.clear()


def ours_step_fn(model, opt, params, chunk: int, in_backward: bool = False, phases: Phases | None = None):
    """One training step; with ``in_backward`` the optimizer already ran in backward hooks (no clipping)."""
    ph = phases or Phases()
    rf = torch.profiler.record_function

    def step(b):
        n_sup = b["_stats"]["supervised"]
        ph.mark("forward")
        with rf("forward"):
            h = model.forward_hidden(b["input_ids"], b["document_ids"])
        ph.mark("loss")
        with rf("loss"):
            ce = chunked_cross_entropy_sum(h, model.lm_head_weight, b["targets"], chunk)
        ph.mark("backward")
        with rf("backward"):
            (ce / max(n_sup, 1)).backward()
        if not in_backward:
            ph.mark("clip")
            with rf("clip"):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            ph.mark("optimizer")
            with rf("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
        ph.mark("end")

    return step


def packed_batches(rows, n_rows: int, n_batches: int, device) -> list[dict]:
    out = []
    for i in range(n_batches):
        chunk = [rows[(i * n_rows + j) % len(rows)] for j in range(n_rows)]
        out.append(to_device(collate_rows(chunk), device, padded_attention=False))
    return out


def run_ours(args, name, rows, n_rows, shape, device, optimizer="adamw_bf16", lora=False, n_ckpt=0) -> dict:
    model = build_ours(shape, device, args.attn, args.compile, lora=lora)
    set_checkpointed(model, n_ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, optimizer, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    n_params = sum(p.numel() for p in model.parameters())
    step = ours_step_fn(model, opt, params, args.loss_chunk)
    batches = packed_batches(rows, n_rows, args.warmup + args.steps, device)
    t0 = time.perf_counter()
    times, stats, peak = time_steps(step, batches, args.warmup, device)
    extra = {
        "rows": n_rows,
        "optimizer": optimizer,
        "checkpointed_blocks": n_ckpt,
        "loss_chunk": args.loss_chunk,
        "warmup_and_compile_s": time.perf_counter() - t0 - sum(times),
    }
    if lora:
        extra["trainable_params"] = sum(p.numel() for p in params)
        extra["mfu_note"] = "LoRA: base weights get no weight gradient; 6N does not apply"
    res = summarize(name, times, stats, peak, n_params, shape, extra, mfu=not lora)
    return res


def run_80gb(args, rows, shape, device, limit_gib: float, in_backward: bool = False) -> dict:
    """Kahan optimizer; probe (rows, checkpointed blocks) settings one step each, time the fastest that fits.

    ``in_backward``: the Kahan step runs per parameter in post-accumulate-grad hooks
    (``sft.optim.step_in_backward``), so each gradient is freed as soon as it is used and the
    model's gradients (2 bytes/param) are never all alive; the price is no gradient clipping.
    """
    model = build_ours(shape, device, args.attn, args.compile)
    params = list(model.parameters())
    opt = build_optimizer(params, "adamw_kahan", lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    if in_backward:
        step_in_backward(opt, params)
    n_params = sum(p.numel() for p in model.parameters())
    step = ours_step_fn(model, opt, params, args.loss_chunk, in_backward=in_backward)
    L = shape.n_layers
    # rows 4 and 2 only: the blocks are compiled for those batch shapes already (static shapes).
    if in_backward:
        candidates = [(4, 0), (4, L // 8), (4, L // 4), (4, L // 2), (2, 0)]
    else:
        candidates = [(4, L), (4, 3 * L // 4), (4, L // 2), (2, L // 2), (2, L // 4), (2, 0)]
    if args.quick:
        candidates = [(2, L // 2)]
    probes = []
    t0 = time.perf_counter()
    step(packed_batches(rows, 2, 1, device)[0])  # optimizer state (and its compilation) before any probe
    sync(device)
    for n_rows, n_ckpt in candidates:
        set_checkpointed(model, n_ckpt)
        probe = {"rows": n_rows, "checkpointed_blocks": n_ckpt}
        try:
            bs = packed_batches(rows[len(probes) * 7 :], n_rows, 2, device)
            times, stats, peak = time_steps(step, bs, 1, device)
            probe["peak_alloc_gib"] = peak / GIB
            probe["non_pad_tokens_per_s"] = stats[0]["non_pad"] / times[0]
        except torch.OutOfMemoryError as e:
            probe["error"] = f"OOM: {str(e).splitlines()[0]}"
            for p in params:
                p.grad = None
            free_memory()
        probes.append(probe)
        log.info("80gb probe %s", probe)
    fits = [p for p in probes if p.get("peak_alloc_gib", math.inf) <= limit_gib]
    if not fits:
        raise RuntimeError(f"no probed setting fits {limit_gib} GiB: {probes}")
    best = max(fits, key=lambda p: p["non_pad_tokens_per_s"])
    set_checkpointed(model, best["checkpointed_blocks"])
    batches = packed_batches(rows, best["rows"], args.warmup + args.steps, device)
    probe_s = time.perf_counter() - t0
    times, stats, peak = time_steps(step, batches, args.warmup, device)
    extra = {
        "rows": best["rows"],
        "optimizer": "adamw_kahan (bf16 moments)" + (", step in backward" if in_backward else ""),
        "grad_clip": None if in_backward else 1.0,
        "checkpointed_blocks": best["checkpointed_blocks"],
        "limit_gib": limit_gib,
        "probes": probes,
        "optimizer_compiled": opt.compile,  # False: the compiled update failed, the eager fallback ran
        "warmup_and_probe_s": probe_s,
    }
    name = "80gb_kahan_inbwd" if in_backward else "80gb_kahan"
    res = summarize(name, times, stats, peak, n_params, shape, extra)
    return res


def profile_ours(args, rows, n_rows, n_ckpt, shape, device, top: int = 15) -> dict:
    """Where a step's time goes: CUDA-event time per phase over 2 steps, then torch.profiler's top kernels.

    Builds the config afresh (its compilation is cached from the timed run), warms up, times the
    phases (forward, loss, backward, clip, optimizer; events in the stream, so GPU time) of two
    steps, then profiles two more and prints the ``top`` ops by self device time.
    """
    model = build_ours(shape, device, args.attn, args.compile)
    set_checkpointed(model, n_ckpt)
    params = list(model.parameters())
    opt = build_optimizer(params, "adamw_bf16", lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    phases = Phases()
    step = ours_step_fn(model, opt, params, args.loss_chunk, phases=phases)
    batches = packed_batches(rows, n_rows, args.warmup + 4, device)
    for b in batches[: args.warmup]:
        step(b)
    sync(device)
    out: dict = {"rows": n_rows, "checkpointed_blocks": n_ckpt, "steps": 2}
    if device.type == "cuda":
        phases.enabled = True
        for b in batches[args.warmup : args.warmup + 2]:
            step(b)
            phases.collect()
        phases.enabled = False
        total = sum(phases.totals.values())
        out["phase_ms_per_step"] = {k: v / 2 for k, v in phases.totals.items()}
        out["phase_fraction"] = {k: v / total for k, v in phases.totals.items()}
        log.info("phase split (ms per step): %s", out["phase_ms_per_step"])
    acts = [torch.profiler.ProfilerActivity.CPU]
    sort_key = "self_cpu_time_total"
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        sort_key = "self_cuda_time_total"
    with torch.profiler.profile(activities=acts) as prof:
        for b in batches[args.warmup + 2 : args.warmup + 4]:
            step(b)
        sync(device)
    ka = prof.key_averages()
    out["top_ops_table"] = ka.table(sort_by=sort_key, row_limit=top, max_name_column_width=60)
    rows_out = []
    for e in ka:
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0.0)
        rows_out.append(
            {
                "name": e.key,
                "self_device_ms": dev / 1e3,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "calls": e.count,
            }
        )
    rows_out.sort(key=lambda r: -(r["self_device_ms"] or r["self_cpu_ms"]))
    out["top_ops"] = rows_out[:top]
    # the record_function ranges (forward/loss/backward/clip/optimizer) as the profiler saw them
    out["ranges"] = {r["name"]: r for r in rows_out if r["name"] in Phases.NAMES}
    return out


# ----------------------------------------------------------------------------- main
def print_table(results: list[dict]) -> None:
    head = f"{'config':<18} {'rows':>4} {'ckpt':>4} {'step s':>7} {'tok/s proc':>10} {'non-pad':>9} {'superv':>8} {'MFU proc':>8} {'MFU np':>7} {'MFU sup':>7} {'peak GiB':>8}"
    print(head)
    print("-" * len(head))
    for r in results:
        if r.get("error"):
            print(f"{r['name']:<18} ERROR {r['error'][:100]}")
            continue
        t, m = r["tokens_per_s"], r["mfu"] or {}

        def pct(k, m=m):
            return f"{100 * m[k]:.1f}%" if k in m else "-"

        print(
            f"{r['name']:<18} {r.get('rows', ''):>4} {r.get('checkpointed_blocks', 0):>4} "
            f"{r['step_time_median_s']:>7.3f} {t['processed']:>10.0f} {t['non_pad']:>9.0f} {t['supervised']:>8.0f} "
            f"{pct('processed'):>8} {pct('non_pad'):>7} {pct('supervised'):>7} {r['peak_alloc_gib']:>8.1f}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("train_throughput.json"))
    ap.add_argument("--quick", action="store_true", help="tiny shape on CPU with SDPA: tests the script")
    ap.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="comma list: recipe, ours<R>[ck<N>][lc<C>] (R rows, N checkpointed blocks, loss chunk C), "
        "80gb, 80gbinbwd (Kahan step in backward), lora",
    )
    ap.add_argument("--steps", type=int, default=10, help="timed steps per config")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--loss-chunk", type=int, default=1024, help="tokens per chunk of the chunked CE")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the configs: phase split (CUDA events) and top ops (torch.profiler) of 2 steps of the best ours config",
    )
    ap.add_argument("--profile-config", default=None, help="ours<R>[ck<N>] to profile instead of the best")
    ap.add_argument("--limit-gib", type=float, default=76.0, help="peak allocated bound of the 80gb profile")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=330.0,
        help="start no new config after this many seconds (the profile gets 60 s more)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()

    if args.quick:
        # vocabulary 1,024 (token ids taken modulo it): a 50k-row bf16 head is slow on CPU.
        shape = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=1024)
        args.seq_len, args.steps, args.warmup = 128, 1, 1
        args.attn, args.compile, limit = "sdpa", False, 40
        device = torch.device("cpu")
        # Tiny tensors on a shared CPU: intra-op threads only contend (measured 30x slower with 2).
        torch.set_num_threads(1)
    else:
        shape = MPTConfig()  # MPT-7B
        args.attn, args.compile, limit = "flex", True, None
        device = torch.device("cuda")
        # Each batch shape (rows 2..8) and checkpointing choice is a recompile of the shared block
        # graph; the default limit (8) would silently fall back to eager for later configs.
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    torch.manual_seed(0)
    random.seed(0)

    tokenizer = load_tokenizer(args.data_dir)
    convs = load_conversations(args.data_dir, limit)
    rec_samples = recipe_samples(convs, tokenizer, args.seq_len)
    our_samples = project_samples(convs, tokenizer, args.seq_len)
    if args.quick:
        V = shape.vocab_size
        rec_samples, our_samples = (
            [Sample([i % V for i in s.input_ids], [x if x < 0 else x % V for x in s.labels]) for s in ss]
            for ss in (rec_samples, our_samples)
        )
    rows = pack(our_samples, args.seq_len, pad_id=tokenizer.pad_token_id)
    random.Random(0).shuffle(rows)
    mean_conv_tokens = sum(len(s) for s in our_samples) / len(our_samples)
    data = {
        "conversations": len(convs),
        "mean_tokens_per_conversation": mean_conv_tokens,
        "mean_tokens_first_exchange": sum(len(s) for s in rec_samples) / len(rec_samples),
        "packed_rows": len(rows),
        "packing_efficiency": sum(int(r["attention_mask"].sum()) for r in rows) / (len(rows) * args.seq_len),
        "supervised_fraction": sum(s.n_supervised for s in our_samples) / sum(len(s) for s in our_samples),
    }
    log.info("data: %s", data)

    plan = [c.strip() for c in args.configs.split(",") if c.strip()]
    results = []
    for key in plan:
        if time.perf_counter() - start > args.budget_s:
            results.append({"name": key, "error": f"skipped: over the {args.budget_s:.0f} s budget"})
            continue
        t0 = time.perf_counter()
        try:
            if key == "recipe":
                r = run_recipe(args, rec_samples, shape, device)
            elif key.startswith("ours"):
                name, n_rows, n_ckpt, lc = parse_ours(key)
                a = argparse.Namespace(**{**vars(args), "loss_chunk": lc or args.loss_chunk})
                r = run_ours(a, name, rows, n_rows, shape, device, n_ckpt=n_ckpt)
                r["key"] = key
            elif key == "80gb":
                r = run_80gb(args, rows, shape, device, args.limit_gib)
            elif key == "80gbinbwd":
                r = run_80gb(args, rows, shape, device, args.limit_gib, in_backward=True)
            elif key == "lora":
                r = run_ours(args, "lora_rows4", rows, 4, shape, device, optimizer="adamw", lora=True)
            else:
                raise ValueError(f"unknown config {key!r}")
        except Exception as e:  # one failing config must not lose the others
            r = {"name": key, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            log.error("config %s failed:\n%s", key, traceback.format_exc())
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        log.info("result: %s", json.dumps(r))
        free_memory()

    # One Guanaco epoch (9,846 conversations) at each config's non-pad rate and per-sample length.
    epoch = {}
    for r in results:
        if r.get("error"):
            continue
        per_sample = r.get("mean_tokens_per_sample", mean_conv_tokens)
        seconds = GUANACO_TRAIN_CONVERSATIONS * per_sample / r["tokens_per_s"]["non_pad"]
        epoch[r["name"]] = {"tokens_per_sample": per_sample, "seconds": seconds, "minutes": seconds / 60}
    ours = [r for r in results if not r.get("error") and r["name"].startswith("ours")]
    recipe = next((r for r in results if r["name"] == "2023_recipe" and not r.get("error")), None)
    summary = {}
    if ours:
        best = max(ours, key=lambda r: r["tokens_per_s"]["non_pad"])
        summary["best"] = best["name"]
        summary["best_epoch_minutes"] = epoch[best["name"]]["minutes"]
        if recipe:
            summary["non_pad_speedup_vs_2023"] = (
                best["tokens_per_s"]["non_pad"] / recipe["tokens_per_s"]["non_pad"]
            )
        summary["best_mfu_non_pad"] = best["mfu"]["non_pad"]
    for r in results:
        if r["name"].startswith("80gb") and not r.get("error"):
            summary[r["name"]] = {"peak_alloc_gib": r["peak_alloc_gib"], "mfu_non_pad": r["mfu"]["non_pad"]}

    profile = None
    if args.profile:
        target = args.profile_config or (best.get("key") if ours else None)
        if target is None:
            profile = {"error": "no ours config succeeded"}
        elif time.perf_counter() - start > args.budget_s + 60:
            profile = {"error": f"skipped: over the {args.budget_s:.0f} s budget (+60 s for the profile)"}
        else:
            try:
                _, n_rows, n_ckpt, lc = parse_ours(target)
                a = argparse.Namespace(**{**vars(args), "loss_chunk": lc or args.loss_chunk})
                profile = {"config": target, **profile_ours(a, rows, n_rows, n_ckpt, shape, device)}
            except Exception as e:
                profile = {"config": target, "error": f"{type(e).__name__}: {e}"}
                log.error("profile failed:\n%s", traceback.format_exc())
            free_memory()

    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
        "shape": {k: getattr(shape, k) for k in ("d_model", "n_heads", "n_layers", "vocab_size")},
        "seq_len": args.seq_len,
        "peak_flops": PEAK_FLOPS,
        "data": data,
        "configs": results,
        "epoch": epoch,
        "summary": summary,
        "profile": profile,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "wall_s": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    if profile and "top_ops_table" in profile:
        print(f"\nprofile of {profile['config']} (2 steps after warm-up), top ops by self device time:")
        print(profile["top_ops_table"])
    if profile and "phase_ms_per_step" in profile:
        split = ", ".join(
            f"{k} {v:.1f} ms ({100 * profile['phase_fraction'][k]:.1f}%)"
            for k, v in profile["phase_ms_per_step"].items()
        )
        print(f"phase split per step ({profile['config']}, CUDA events): {split}")
    elif profile:
        print(f"profile: {profile.get('error', 'no phase split (CPU)')}")
    print()
    print(f"device {out['device']}, {out['date']}, seq_len {args.seq_len}, MFU of {PEAK_FLOPS:.3g} FLOP/s")
    print_table(results)
    for name, e in epoch.items():
        print(f"one Guanaco epoch (9,846 conversations) at {name}: {e['minutes']:.1f} min")
    if summary:
        print(json.dumps(summary))
    return 0 if any(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
