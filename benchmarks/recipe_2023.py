"""The 2023 recipe's training step on one GPU, reproduced as the baseline the trainer is compared with.

This is NOT the project's step (that is ``sft.training.engine``, driven by ``benchmarks/train_throughput.py``): it is
what the 2023 demo did with TRL's ``SFTTrainer``, kept as the reference point of the speed-up, so it has its
own forward/backward. Random-init MPT-7B shape (d_model 4096, 32 heads, 32 layers, vocabulary 50,432) in
transformers' ``MptForCausalLM`` (eager attention), bf16 weights; the first exchange of each conversation of
``guanaco-1k.jsonl`` (``### Human: q`` + newline + ``### Assistant: a``), loss on every token, pad = EOS masked
out of the labels, batches of 4 in data order padded to their longest, torch AdamW (foreach, bf16 state), no
checkpointing, no clipping. Its peak is also measured on the data's longest batch (``peak_worst_batch_gib``).

Per run: tokens/s processed, non-pad and supervised; MFU of each (``sft.training.flops``: ``6N + 12 L d T_attn``, T_attn
the padded row for processed tokens since eager attention computes all of it, the real documents otherwise);
step time median after warm-up; peak ``torch.cuda.max_memory_allocated``; the time of one Guanaco epoch
(9,846 conversations, first exchanges only) at its non-pad rate.

    python benchmarks/recipe_2023.py --data-dir .devdata --out recipe_2023.json
    python benchmarks/recipe_2023.py --quick     # tiny shape on CPU: tests the script
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sft.data.formats import guanaco  # noqa: E402
from sft.data.packing import pad_collate  # noqa: E402
from sft.data.render import Sample  # noqa: E402
from sft.data.schema import IGNORE_INDEX  # noqa: E402
from sft.model.models import RANDOM_PRESETS  # noqa: E402
from sft.training.flops import PEAK_FLOPS, flops_per_token  # noqa: E402

log = logging.getLogger("recipe_2023")
PEAK = PEAK_FLOPS["H200"]
GUANACO_TRAIN_CONVERSATIONS = 9846
GIB = 2**30


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
        fp = flops_per_token(n_params, cfg["n_layers"], cfg["d_model"], t_proc)
        fr = flops_per_token(n_params, cfg["n_layers"], cfg["d_model"], t_real)
        tps = res["tokens_per_s"]
        res["mfu"] = {
            "processed": tps["processed"] * fp / PEAK,
            "non_pad": tps["non_pad"] * fr / PEAK,
            "supervised": tps["supervised"] * fr / PEAK,
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
def run_recipe(args, samples, shape: dict, device) -> dict:
    from transformers import MptConfig, MptForCausalLM

    hf_cfg = MptConfig(**{"expansion_ratio": 4, "no_bias": True, **shape})
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


def main(argv=None) -> int:
    if str(Path(__file__).resolve().parents[1]) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sft.argcheck import OneLineParser, float_in, int_in  # noqa: F401  one-line errors, checked ranges

    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("recipe_2023.json"))
    ap.add_argument("--quick", action="store_true", help="tiny shape on CPU: tests the script")
    ap.add_argument("--steps", type=int_in(1), default=10, help="timed steps")
    ap.add_argument("--warmup", type=int_in(0), default=3, help="untimed steps")
    ap.add_argument("--seq-len", type=int_in(2), default=2048)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        shape = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=50432)
        args.seq_len, args.steps, args.warmup, limit, device = 128, 1, 1, 40, torch.device("cpu")
    else:
        shape = dict(RANDOM_PRESETS["mpt-7b"][1])  # the MPT-7B shape, one definition
        limit, device = None, torch.device("cuda")
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.data_dir)
    samples = recipe_samples(load_conversations(args.data_dir, limit), tokenizer, args.seq_len)
    r = run_recipe(args, samples, shape, device)
    minutes = GUANACO_TRAIN_CONVERSATIONS * r["mean_tokens_per_sample"] / r["tokens_per_s"]["non_pad"] / 60
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": shape,
        "result": r,
        "epoch_minutes_first_exchanges": minutes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    t, m = r["tokens_per_s"], r["mfu"]
    print(
        f"2023 recipe: {t['non_pad']:.0f} non-pad tokens/s ({t['processed']:.0f} processed), MFU non-pad "
        f"{100 * m['non_pad']:.1f}%, peak {r['peak_alloc_gib']:.1f} GiB, worst batch {r['peak_worst_batch_gib']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
