"""Hugging Face TRL ``SFTTrainer`` (or Unsloth) on exactly the tokens our recipe trains on: the peers our speed
is measured against.

The rows are the recipe's own (``sft.data.batches.prepare`` with the recipe's defaults and the same flags:
rendered, held-out split, cut to ``--max_len``), handed to TRL pre-tokenized (``input_ids`` + ``labels``,
IGNORE_INDEX on the tokens that are not trained), so TRL renders nothing and trains on the same supervised
tokens; TRL then packs them itself. The model is the project's random-init preset (``random:<shape>``,
``sft.model.models.RANDOM_PRESETS``), built on the GPU in bf16 with the same seed.

TRL 1.16 settings (its documented speed settings): ``packing=True`` with ``packing_strategy="bfd"``,
``padding_free=True``, ``attn_implementation="flex_attention"`` (``sdpa`` where flex cannot run, e.g. on the
CPU), ``use_liger_kernel=True`` when ``liger_kernel`` imports and there is a GPU, ``optim="adamw_torch_fused"``
on CUDA, ``bf16=True`` on bf16 weights, gradient checkpointing only where needed to fit
(``--gradient_checkpointing=auto``: on for models of >= 1B parameters on a card of < 100 GiB, i.e. the 80 GB
H100; off on an H200 and on the CPU), ``per_device_train_batch_size`` x ``gradient_accumulation_steps`` = the
recipe's rows per step (default 4 x 2,048 x 4 = 32,768 tokens per optimizer step), the recipe's lr, betas,
weight decay, clipping and warm-up; logging every step, no eval, no saving, ``report_to="none"``, the
dataloader on the main process.

Measured (a ``TrainerCallback``): each optimizer step from ``on_step_begin`` to ``on_step_end`` with
``torch.cuda.synchronize`` at both ends (forward, backward, clipping and the optimizer step of every
micro-batch; TRL fetches the step's batches just before); the tokens of each step from the batches its
collator built (padding-free: processed = non-pad; supervised = labels != -100); MFU with
``sft.training.flops`` (``6N + 12 L d T_attn``, T_attn from the packed documents' lengths, the same
within-document convention as our trainer's non-pad MFU); medians over the steps after ``--warmup``; peak
``torch.cuda.max_memory_allocated`` over the run. Prints one JSON line ``{"system": "trl", ...}`` and a
short table; ``--out`` writes the JSON; ``--compare`` reads a ``train_throughput.json`` of the same device
call and prints our/TRL ratios.

    python benchmarks/peers.py --data=.devdata/guanaco-1k.jsonl --tokenizer=.devdata/gpt-neox-20b-tokenizer.json \\
        --out=bench/peers_trl.json --compare=bench/train_throughput.json          # GPU, Llama-3-8B shape
    python benchmarks/peers.py --model=random:tiny-llama --max_len=256 --micro_batch=2 --grad_accum=2 \\
        --steps=4 --limit=120                                                      # CPU: tests the script

``--system=unsloth``: Unsloth (2026.10) full fine-tuning of the same model on the same samples with the same
``SFTTrainer`` settings (its patched trainer, its own attention and kernels instead of FlexAttention and
Liger, its host-offloaded gradient checkpointing where TRL's would be on): :func:`run_unsloth`. It needs its
own environment (:data:`UNSLOTH_NEEDS`); without it the option is refused in one line (exit 2).

Any other ``--field=value`` is a recipe flag (sft/config.py), applied to the recipe's defaults before the
data are prepared (e.g. ``--limit=200``, ``--seed=1``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sft.training.flops import mfu, peak_flops, step_flops  # noqa: E402

GIB = 2**30
RECIPES = {"llama": "sft.train_llama_guanaco", "mpt": "sft.train_mpt_guanaco"}
log = logging.getLogger("peers")


# ----------------------------------------------------------------------------- inputs
def recipe_config(args, extra: list[str]):
    """The recipe's TrainConfig with the data flags of this run (what the recipe itself would train on)."""
    import importlib

    from sft.config import parse_args

    path0 = sys.path[0]
    defaults = importlib.import_module(RECIPES[args.recipe]).DEFAULTS
    sys.path[0] = path0  # the recipe module points sys.path[0] at the repository root on import
    flags = [
        f"--model={args.model}",
        f"--data={args.data}",
        f"--tokenizer={args.tokenizer}",
        f"--max_len={args.max_len}",
        f"--micro_batch={args.micro_batch}",
        f"--grad_accum={args.grad_accum}",
        f"--eval_size={args.eval_size}",
    ]
    if args.template:
        flags.append(f"--template={args.template}")
    return parse_args([*flags, *extra], defaults)


def trl_dataset(cfg, tokenizer):
    """The recipe's training samples as a pre-tokenized ``datasets.Dataset`` (input_ids, labels)."""
    from datasets import Dataset

    from sft.data.batches import prepare

    prepared, train_rows, _ = prepare(cfg, tokenizer)
    samples = prepared.train
    ours_rows = train_rows["input_ids"].size(0) if isinstance(train_rows, dict) else None
    ds = Dataset.from_dict(
        {"input_ids": [list(s.input_ids) for s in samples], "labels": [list(s.labels) for s in samples]}
    )
    n_tok = sum(len(s.input_ids) for s in samples)
    n_sup = sum(s.n_supervised for s in samples)
    return ds, {
        "samples": len(samples),
        "tokens": n_tok,
        "supervised_labels": n_sup,
        "ours_packed_rows": ours_rows,
    }


def attention_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "sdpa"  # flex_attention on the CPU needs inductor's C++ build: TRL's GPU setting, not this one
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flex_attention"


def build_model(cfg, attn: str, device: torch.device):
    """The project's random-init preset (bf16, seeded, built on the GPU) with ``attn`` as its attention; a local
    folder or hub id is loaded with ``from_pretrained`` in bf16 instead."""
    from transformers import AutoModelForCausalLM

    from sft.model.models import load_tokenizer, random_model

    tokenizer = load_tokenizer(cfg.tokenizer)
    if cfg.model.startswith("random:"):
        model = random_model(cfg.model[len("random:") :], torch.bfloat16, cfg.seed, cfg.max_len)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn)
        else:  # older transformers
            model.config._attn_implementation = attn
    else:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model, dtype=torch.bfloat16, attn_implementation=attn
        )
    model.to(device)
    vocab = model.get_input_embeddings().weight.size(0)
    if len(tokenizer) > vocab:
        raise SystemExit(
            f"error: model '{cfg.model}' has {vocab} token embeddings; the tokenizer has {len(tokenizer)}"
        )
    model.config.use_cache = False
    return model, tokenizer


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


def wants_checkpointing(choice: str, n_params: int, device: torch.device) -> tuple[bool, str]:
    if choice in ("true", "false"):
        return choice == "true", "given"
    if device.type != "cuda":
        return False, "auto: CPU"
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    on = n_params >= 1e9 and total < 100
    return on, f"auto: {n_params / 1e9:.2f}B params on a {total:.0f} GiB card"


# ----------------------------------------------------------------------------- measuring
class CountingCollator:
    """Wraps TRL's collator: records, per micro-batch it builds (in dataloader order), the tokens, supervised
    labels and ``sum n_doc^2`` of its packed documents (padding-free: ``position_ids`` restart at 0)."""

    def __init__(self, inner):
        self.inner = inner
        self.stats: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, examples):
        batch = self.inner(examples)
        pos = batch["position_ids"] if "position_ids" in batch else None
        ids = batch["input_ids"]
        if pos is not None:
            lengths = []
            for row in pos:
                starts = (row == 0).nonzero().flatten().tolist() + [row.numel()]
                lengths += [b - a for a, b in zip(starts[:-1], starts[1:])]
            nonpad = int(ids.numel())
        else:  # padded batches (not TRL's padding-free mode): one document per real row
            am = batch["attention_mask"]
            lengths = [int(x) for x in am.sum(-1).tolist()]
            nonpad = int(am.sum())
        self.stats.append(
            {
                "processed": int(ids.numel()),
                "non_pad": nonpad,
                "supervised": int((batch["labels"] != -100).sum()),
                "attn": sum(n * n for n in lengths),
                "docs": len(lengths),
            }
        )
        return batch


def make_timer(device: torch.device):
    from transformers import TrainerCallback

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self._t0 = self._last_end = None
            self._micro = 0

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self._t0, self._micro = time.perf_counter(), 0

        def on_substep_end(self, args, state, control, **kw):
            self._micro += 1

        def on_step_end(self, args, state, control, **kw):
            sync()
            t = time.perf_counter()
            interval = t - self._last_end if self._last_end is not None else None
            self.steps.append({"dt": t - self._t0, "micro": self._micro + 1, "interval": interval})
            self._last_end = t

    return StepTimer()


def summarize(timer, counter: CountingCollator, warmup: int, n_params: int, L: int, d: int, peak) -> dict:
    """Per-step tokens (the step's micro-batches, in order), rates and MFU; medians after ``warmup`` steps."""
    rows, k = [], 0
    for s in timer.steps:
        mbs = counter.stats[k : k + s["micro"]]
        k += s["micro"]
        tot = {
            key: sum(m[key] for m in mbs) for key in ("processed", "non_pad", "supervised", "attn", "docs")
        }
        flops = step_flops(n_params, L, d, tot["non_pad"], tot["attn"])
        rows.append({**s, **tot, "mfu": mfu(flops, s["dt"], peak)})
    timed = rows[warmup:] or rows[-1:]

    def med(f):
        vals = [v for v in (f(r) for r in timed) if v is not None]
        return statistics.median(vals) if vals else None

    t_attn = sum(r["attn"] for r in timed) / max(sum(r["non_pad"] for r in timed), 1)
    return {
        "steps": len(rows),
        "steps_timed": len(timed),
        "first_step_s": rows[0]["dt"] if rows else None,
        "step_time_median_s": med(lambda r: r["dt"]),
        "interval_median_s": med(lambda r: r["interval"]),
        "tokens_per_step_median": med(lambda r: r["non_pad"]),
        "micro_batches_per_step": med(lambda r: r["micro"]),
        "tokens_per_s": {
            "processed": med(lambda r: r["processed"] / r["dt"]),
            "non_pad": med(lambda r: r["non_pad"] / r["dt"]),
            "supervised": med(lambda r: r["supervised"] / r["dt"]),
        },
        # padding-free: every processed token is a real one, and attention stays within documents
        "mfu": {"non_pad": med(lambda r: r["mfu"]), "processed": med(lambda r: r["mfu"])},
        "t_attn": t_attn,
        "per_step": [
            {k2: r[k2] for k2 in ("dt", "interval", "micro", "non_pad", "supervised", "docs", "mfu")}
            for r in rows
        ],
    }


# ----------------------------------------------------------------------------- run
def run_trl(args, cfg, device) -> dict:
    """TRL's ``SFTTrainer`` on the project's random-init model (module docstring)."""
    attn = attention_backend(args.attn, device)
    model, tokenizer = build_model(cfg, attn, device)
    liger = device.type == "cuda" and liger_available() if args.liger == "auto" else args.liger == "true"
    return train_peer("trl", args, cfg, device, model, tokenizer, attn=attn, liger=liger)


def run_unsloth(args, cfg, device) -> dict:
    """Unsloth's full fine-tuning (``FastLanguageModel.from_pretrained(..., full_finetuning=True)``, bf16
    weights) of the same random-init model, then the same ``SFTTrainer`` settings as TRL's, which Unsloth
    patches on import (``unsloth`` is imported by :func:`main` before transformers). Unsloth loads from a
    folder: the model is built as for TRL, written to a temporary folder (safetensors, in ``--model_dir``),
    freed, and loaded back by Unsloth. Its own attention and kernels replace FlexAttention and Liger; its
    gradient checkpointing (``"unsloth"``: saved activations in host memory) is on where TRL's would be."""
    from unsloth import FastLanguageModel

    model, tokenizer = build_model(cfg, "sdpa", device)
    n_params = sum(p.numel() for p in model.parameters())
    gc_on, _ = wants_checkpointing(args.gradient_checkpointing, n_params, device)
    with tempfile.TemporaryDirectory(prefix="peers-unsloth-model-", dir=args.model_dir) as folder:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model, _ = FastLanguageModel.from_pretrained(
            model_name=folder,
            max_seq_length=cfg.max_len,
            dtype=torch.bfloat16,
            load_in_4bit=False,
            full_finetuning=True,
            use_gradient_checkpointing="unsloth" if gc_on else False,
            random_state=cfg.seed,
        )
    attn = getattr(model.config, "_attn_implementation", None) or "unsloth"
    return train_peer("unsloth", args, cfg, device, model, tokenizer, attn=attn, liger=False)


def peer_settings(args, cfg, device, n_params: int, attn: str, liger: bool) -> dict:
    """What a peer run is asked to do (module docstring), as the result records it."""
    gc_on, gc_why = wants_checkpointing(args.gradient_checkpointing, n_params, device)
    return {
        "attn_implementation": attn,
        "packing": True,
        "packing_strategy": "bfd",
        "padding_free": True,
        "use_liger_kernel": liger,
        "optim": args.optim or ("adamw_torch_fused" if device.type == "cuda" else "adamw_torch"),
        "bf16": True,
        "weights": "bf16",
        "gradient_checkpointing": gc_on,
        "gradient_checkpointing_why": gc_why,
        "per_device_train_batch_size": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "max_length": cfg.max_len,
    }


def sft_config(args, cfg, output_dir: str, settings: dict, device):
    """The ``SFTConfig`` of a peer run: ``settings`` (packing, optimizer, checkpointing, Liger) and the recipe's
    schedule and regularisation; logging every step, no eval, no saving."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir,
        max_length=cfg.max_len,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=args.steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else 0.0,
        optim=settings["optim"],
        bf16=True,
        gradient_checkpointing=settings["gradient_checkpointing"],
        use_liger_kernel=settings["use_liger_kernel"],
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=cfg.seed,
        use_cpu=device.type != "cuda",
    )


def train_peer(system: str, args, cfg, device, model, tokenizer, *, attn: str, liger: bool) -> dict:
    """``SFTTrainer`` with the documented speed settings (module docstring) on the recipe's samples, timed
    per optimizer step; the result dict of ``system``."""
    import transformers
    import trl
    from trl import SFTTrainer

    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    L = int(getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers", 0))
    d = int(getattr(c, "hidden_size", None) or getattr(c, "d_model", 0))
    dataset, data_stats = trl_dataset(cfg, tokenizer)
    settings = peer_settings(args, cfg, device, n_params, attn, liger)
    log.info("%s settings: %s", system, json.dumps(settings))
    with tempfile.TemporaryDirectory(prefix=f"peers-{system}-") as tmp:
        sft_args = sft_config(args, cfg, tmp, settings, device)
        with warnings_quiet():
            trainer = SFTTrainer(
                model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer
            )
        # what the trainer kept of the settings asked (Unsloth turns packing off where it cannot keep the
        # packed documents apart, e.g. on the CPU without FlashAttention)
        settings["packing_effective"] = bool(getattr(trainer.args, "packing", False))
        settings["padding_free_effective"] = bool(getattr(trainer.args, "padding_free", False))
        # what the BFD packing made of the samples: every token kept (none is longer than max_length)
        packed = trainer.train_dataset
        data_stats["trl_packed_rows"] = len(packed)
        data_stats["trl_packed_tokens"] = sum(len(x) for x in packed["input_ids"])
        if data_stats["trl_packed_tokens"] != data_stats["tokens"]:
            log.warning(
                "%s's packing kept %d of %d tokens",
                system,
                data_stats["trl_packed_tokens"],
                data_stats["tokens"],
            )
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        timer = make_timer(device)
        trainer.add_callback(timer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res = {"system": system, "model": cfg.model, "n_params": n_params, "n_layers": L, "d_model": d}
    res.update(summarize(timer, counter, args.warmup, n_params, L, d, peak_flops(device)))
    res.update(
        {
            "peak_mem_gib": peak,
            "train_wall_s": wall,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "settings": settings,
            "data": data_stats,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
                "liger_kernel": _version("liger_kernel") if liger else None,
                "datasets": _version("datasets"),
                **({"unsloth": _version("unsloth")} if system == "unsloth" else {}),
            },
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
    )
    return res


def _version(mod: str):
    import importlib.metadata

    name = {"liger_kernel": "liger-kernel"}.get(mod, mod)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def warnings_quiet():
    """TRL's deprecation notice for ``use_liger_kernel`` (it prefers hub kernels, which need the network)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*use_liger_kernel.*", category=FutureWarning)
        yield


def compare(res: dict, path: Path, key: str) -> dict | None:
    """Our recipe's row ``key`` of a ``train_throughput.json`` against this peer's result: ratios ours / peer
    (the keys keep the ``trl_`` names whatever the peer; ``res["system"]`` says which it was)."""
    try:
        ours = next(c for c in json.loads(path.read_text())["configs"] if c.get("name") == key)
    except (OSError, ValueError, StopIteration, KeyError) as e:
        print(f"compare: no config {key!r} in {path} ({type(e).__name__})", file=sys.stderr)
        return None
    if ours.get("error"):
        return {"config": key, "error": ours["error"]}
    tp, tm = ours["tokens_per_s"], ours.get("mfu") or {}
    out = {
        "config": key,
        "ours_non_pad_tokens_per_s": tp["non_pad"],
        "trl_tokens_per_s": res["tokens_per_s"]["non_pad"],
        "speedup_non_pad": tp["non_pad"] / res["tokens_per_s"]["non_pad"],
        "ours_mfu_non_pad": tm.get("non_pad"),
        "trl_mfu": res["mfu"]["non_pad"],
        "ours_peak_gib": ours.get("peak_mem_gib"),
        "trl_peak_gib": res["peak_mem_gib"],
        "ours_device": ours.get("device"),
    }
    return out


def print_table(res: dict) -> None:
    def pct(v):
        return f"{100 * v:.1f}%" if v is not None else "-"

    def gib(v):
        return f"{v:.1f}" if v is not None else "-"

    s, t = res["settings"], res["tokens_per_s"]
    head = (
        f"{'system':<13} {'attn':>14} {'liger':>5} {'ckpt':>4} {'pack':>4} {'tok/step':>8} {'1st s':>6} {'step s':>7} "
        f"{'tok/s':>8} {'superv':>8} {'MFU':>6} {'peak GiB':>8}"
    )
    print(head)
    print("-" * len(head))
    print(
        f"{res['system']:<13} {s['attn_implementation']:>14} {str(s['use_liger_kernel'])[0]:>5} "
        f"{str(s['gradient_checkpointing'])[0]:>4} {str(s.get('packing_effective', True))[0]:>4} "
        f"{res['tokens_per_step_median'] or 0:>8.0f} "
        f"{res['first_step_s']:>6.1f} {res['step_time_median_s']:>7.3f} {t['non_pad']:>8.0f} "
        f"{t['supervised']:>8.0f} {pct(res['mfu']['non_pad']):>6} {gib(res['peak_mem_gib']):>8}"
    )
    cmp = res.get("compare")
    if cmp and cmp.get("error"):
        print(f"ours ({cmp['config']}): {cmp['error'][:150]}")
    elif cmp:
        print(
            f"{'ours ' + cmp['config']:<13} {'':>14} {'':>5} {'':>4} {'':>4} {'':>8} {'':>6} {'':>7} "
            f"{cmp['ours_non_pad_tokens_per_s']:>8.0f} {'':>8} {pct(cmp['ours_mfu_non_pad']):>6} "
            f"{gib(cmp['ours_peak_gib']):>8}"
        )
        print(f"ours / {res['system']} (non-pad tokens/s, same device call): {cmp['speedup_non_pad']:.2f}x")


UNSLOTH_NEEDS = (
    "unsloth==2026.10.9 with unsloth_zoo, bitsandbytes, trl<=1.15 and datasets<5 (a separate environment "
    "from the TRL 1.16 peer's; benchmarks/device_80gb.sh uns1 / uns2 carry them to the GPU machine)"
)


def import_unsloth(ap) -> None:
    """``import unsloth`` first, before transformers and trl (it patches them on import); one line and exit 2
    when it cannot be imported (not installed, or no GPU: Unsloth needs one)."""
    try:
        import unsloth  # noqa: F401
    except Exception as e:  # ImportError, or Unsloth's own refusal without a GPU
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        ap.error(f"--system=unsloth: unsloth cannot be imported ({first}); it needs {UNSLOTH_NEEDS}")


def main(argv=None) -> int:
    data_dir = REPO.parent / "shared" / "data"
    if str(Path(__file__).resolve().parents[1]) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sft.argcheck import OneLineParser, float_in, int_in  # noqa: F401  one-line errors, checked ranges

    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--recipe", choices=sorted(RECIPES), default="llama", help="whose defaults prepare the data"
    )
    ap.add_argument(
        "--system", choices=("trl", "unsloth"), default="trl", help="the peer (unsloth: module docstring)"
    )
    ap.add_argument("--model", default="random:llama-3-8b")
    ap.add_argument("--data", default=str(data_dir / "guanaco-1k.jsonl"))
    ap.add_argument("--tokenizer", default=str(data_dir / "gpt-neox-20b-tokenizer.json"))
    ap.add_argument("--template", default="chatml", help="as benchmarks/train_throughput.py's llama configs")
    ap.add_argument("--eval_size", default="20", help="held-out conversations (train_throughput.py uses 20)")
    ap.add_argument("--max_len", type=int_in(8), default=2048)
    ap.add_argument("--micro_batch", type=int_in(1), default=4)
    ap.add_argument("--grad_accum", type=int_in(1), default=4)
    ap.add_argument("--steps", type=int_in(1), default=8, help="optimizer steps (the first --warmup untimed)")
    ap.add_argument("--warmup", type=int_in(0), default=2)
    ap.add_argument("--gradient_checkpointing", choices=("auto", "true", "false"), default="auto")
    ap.add_argument(
        "--attn", default="auto", help="attn_implementation; auto = flex_attention on CUDA, else sdpa"
    )
    ap.add_argument("--liger", choices=("auto", "true", "false"), default="auto")
    ap.add_argument("--optim", default=None, help="default adamw_torch_fused on CUDA, adamw_torch on CPU")
    ap.add_argument(
        "--model_dir",
        default=None,
        help="unsloth: where the model's temporary folder goes (default: the temp dir)",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    ap.add_argument(
        "--compare", type=Path, default=None, help="a train_throughput.json of the same device call"
    )
    ap.add_argument("--compare_config", default="llama", help="its config to compare with")
    args, extra = ap.parse_known_args(argv)
    if args.system == "unsloth":
        import_unsloth(ap)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from sft.config import ConfigError

    try:
        cfg = recipe_config(args, extra)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = (run_unsloth if args.system == "unsloth" else run_trl)(args, cfg, device)
    res["command"] = " ".join(["python", *(sys.argv if argv is None else [sys.argv[0], *argv])])
    res["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if args.compare:
        res["compare"] = compare(res, args.compare, args.compare_config)
    print(json.dumps({k: v for k, v in res.items() if k != "per_step"}), flush=True)
    print()
    print_table(res)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
