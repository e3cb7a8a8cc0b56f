"""Training throughput and memory of the trainer a user runs: each config is a recipe with ``--field=value``
overrides (a ``TrainConfig``), run by the recipe's own entry point in a fresh process, and measured from the
run folder it writes. Every figure printed is one the trainer reaches; there is no training step here.

Configs (random init at the real shapes, ``--model=random:<shape>``; real Guanaco rows from ``--data-dir``,
rendered and packed by the trainer; ``--max_steps`` steps, no samples, no final/):

| key | recipe and overrides |
| --- | --- |
| ``mpt`` | ``sft/train_mpt_guanaco.py`` defaults (4 rows x 4 micro-batches, ``adamw_kahan``), the GPU's whole memory |
| ``mpt76`` | the same in the 80 GB profile, ``--memory_limit_gib=76`` |
| ``mpt76_mb2`` | the 80 GB profile with 2 rows x 8 micro-batches (same rows per step) |
| ``mpt_mb2`` | 2 rows x 8 micro-batches, the GPU's whole memory |
| ``llama`` | ``sft/train_llama_guanaco.py`` defaults, Llama-3-8B shape (4 rows of 2,048 x 4 micro-batches) |
| ``llama76`` | the Llama recipe in the 80 GB profile, ``--memory_limit_gib=76`` |
| ``mpt_8bit`` | ``mpt`` with ``--optimizer=adamw_8bit`` (on an 80 GB card: 4 rows x 4, nothing recomputed, instead of ``adamw_kahan``'s 1 x 16) |
| ``llama_8bit`` | ``llama`` with ``--optimizer=adamw_8bit`` (on an 80 GB card: 2 rows x 8 instead of ``adamw_sr``'s 1 x 16) |
| ``llama76_full`` / ``llama76_sel`` / ``llama76_off4`` | 80 GB profile, 4 x 4 rows kept (``--plan_split=off``), ``adamw_sr``: blocks recomputed whole / selectively (``--recompute``) / whole with 4 blocks' activations on the host (``--offload_blocks=4``: refused on CUDA since 2026-12-08, see sft/training/memory.py) |
| ``qwen14b`` / ``qwen14b76`` | the Llama recipe on the Qwen3-14B shape (``random:qwen3-14b``), whole card / 80 GB profile |
| ``llama8k`` | 1 row of 8,192 x 4 micro-batches |
| ``llama32k`` | 1 row of 32,768 x 1 (long context; the plan checkpoints what it must) |
| ``mpt_fp8`` / ``mpt_fp8row`` | ``mpt`` with ``--fp8=tensorwise`` / ``--fp8=rowwise`` (the block linears in FP8, sft/model/fp8.py) |
| ``llama_fp8`` / ``llama_fp8row`` | ``llama`` with ``--fp8=tensorwise`` / ``--fp8=rowwise`` |
| ``mpt_hf`` | the MPT recipe through transformers' MPT (``--mpt_impl=hf``, eager attention): the reference path |
| ``tiny_llama`` / ``tiny_mpt`` | tiny shapes (``--quick``: on the CPU, to test this script) |

Per config (medians over the steps after the first two, which hold compilation and warm-up): tokens/s
processed, non-pad and supervised; MFU on processed and on non-pad tokens (``sft.training.flops``); peak
allocated memory (max over steps); the first step's time (compilation included); the resolved engine
settings (attention, compile, checkpointed blocks, in-backward step) from the run's config.json. The 2023
recipe, the baseline these are compared with, is ``benchmarks/recipe_2023.py`` (its own step: it is not ours).

    python benchmarks/train_throughput.py --data-dir .devdata --out-dir bench --configs mpt76,mpt,llama
    python benchmarks/train_throughput.py --quick --out-dir /tmp/bench     # CPU, tiny shapes
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMON = [
    "--num_samples=0",
    "--eval_prompts=0",
    "--save_final=false",
    "--save_every=0",
    "--progress=false",
    "--eval_batches=1",
    # the recipes warm up over 20 steps; a benchmark of a few steps measures speed, which the learning rate
    # does not change, and the trainer refuses a warm-up longer than the run
    "--warmup_steps=0",
]
LLAMA76_KEPT = [
    "--model=random:llama-3-8b",
    "--template=chatml",
    "--memory_limit_gib=76",
    "--plan_split=off",
    "--optimizer=adamw_sr",
]
CONFIGS = {
    "mpt": ("train_mpt_guanaco.py", ["--model=random:mpt-7b"]),
    "mpt76": ("train_mpt_guanaco.py", ["--model=random:mpt-7b", "--memory_limit_gib=76"]),
    "mpt76_mb2": (
        "train_mpt_guanaco.py",
        ["--model=random:mpt-7b", "--memory_limit_gib=76", "--micro_batch=2", "--grad_accum=8"],
    ),
    "mpt_mb2": ("train_mpt_guanaco.py", ["--model=random:mpt-7b", "--micro_batch=2", "--grad_accum=8"]),
    "mpt_8bit": ("train_mpt_guanaco.py", ["--model=random:mpt-7b", "--optimizer=adamw_8bit"]),
    "mpt_hf": ("train_mpt_guanaco.py", ["--model=random:mpt-7b", "--mpt_impl=hf"]),
    "mpt_fp8": ("train_mpt_guanaco.py", ["--model=random:mpt-7b", "--fp8=tensorwise"]),
    "mpt_fp8row": ("train_mpt_guanaco.py", ["--model=random:mpt-7b", "--fp8=rowwise"]),
    "llama": ("train_llama_guanaco.py", ["--model=random:llama-3-8b", "--template=chatml"]),
    "llama76": (
        "train_llama_guanaco.py",
        ["--model=random:llama-3-8b", "--template=chatml", "--memory_limit_gib=76"],
    ),
    "llama_8bit": (
        "train_llama_guanaco.py",
        ["--model=random:llama-3-8b", "--template=chatml", "--optimizer=adamw_8bit"],
    ),
    # 4 x 4 rows kept at 80 GB (adamw_sr): blocks recomputed whole, selectively, or whole with 4 blocks'
    # activations on the host (the plan picks the counts)
    **{
        f"llama76_{key}": ("train_llama_guanaco.py", [*LLAMA76_KEPT, flag])
        for key, flag in (
            ("full", "--recompute=full"),
            ("sel", "--recompute=selective"),
            ("off4", "--offload_blocks=4"),
        )
    },
    "qwen14b": ("train_llama_guanaco.py", ["--model=random:qwen3-14b", "--template=chatml"]),
    "qwen14b76": (
        "train_llama_guanaco.py",
        ["--model=random:qwen3-14b", "--template=chatml", "--memory_limit_gib=76"],
    ),
    "llama_fp8": (
        "train_llama_guanaco.py",
        ["--model=random:llama-3-8b", "--template=chatml", "--fp8=tensorwise"],
    ),
    "llama_fp8row": (
        "train_llama_guanaco.py",
        ["--model=random:llama-3-8b", "--template=chatml", "--fp8=rowwise"],
    ),
    "llama8k": (
        "train_llama_guanaco.py",
        [
            "--model=random:llama-3-8b",
            "--template=chatml",
            "--max_len=8192",
            "--micro_batch=1",
            "--grad_accum=4",
        ],
    ),
    "llama32k": (
        "train_llama_guanaco.py",
        [
            "--model=random:llama-3-8b",
            "--template=chatml",
            "--max_len=32768",
            "--micro_batch=1",
            "--grad_accum=1",
        ],
    ),
    "tiny_llama": (
        "train_llama_guanaco.py",
        [
            "--model=random:tiny-llama",
            "--template=chatml",
            "--max_len=256",
            "--micro_batch=2",
            "--grad_accum=2",
        ],
    ),
    "tiny_mpt": (
        "train_mpt_guanaco.py",
        ["--model=tiny-mpt", "--tokenizer=", "--max_len=256", "--micro_batch=2", "--grad_accum=2"],
    ),
}


def command(key: str, data_dir: Path, out_dir: Path, steps: int, extra: list[str]) -> list[str]:
    """The recipe command of config ``key`` (what a user would type, plus the benchmark's limits)."""
    recipe, overrides = CONFIGS[key]
    data = [
        f"--data={data_dir / 'guanaco-1k.jsonl'}",
        f"--tokenizer={data_dir / 'gpt-neox-20b-tokenizer.json'}",
    ]
    data += ["--eval_size=20", f"--max_steps={steps}", f"--out_dir={out_dir}", f"--run_name={key}"]
    return [sys.executable, str(REPO / "sft" / recipe), *data, *COMMON, *overrides, *extra]


def summarize(run_dir: Path) -> dict:
    """Medians over the steps after the first two; first step time; peak; resolved engine settings."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "loss" in r]
    timed = train[2:] or train[-1:]

    def med(f):
        vals = [f(r) for r in timed]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    cfg = json.loads((run_dir / "config.json").read_text())
    return {
        "steps": len(train),
        "steps_timed": len(timed),
        "first_step_s": train[0]["step_time_s"],
        "step_time_median_s": med(lambda r: r["step_time_s"]),
        "tokens_per_s": {
            "processed": med(lambda r: r["step_tokens_processed"] / r["step_time_s"]),
            "non_pad": med(lambda r: r["step_tokens_nonpad"] / r["step_time_s"]),
            "supervised": med(lambda r: r["step_tokens_supervised"] / r["step_time_s"]),
        },
        "mfu": {"processed": med(lambda r: r.get("mfu")), "non_pad": med(lambda r: r.get("mfu_nonpad"))},
        "peak_mem_gib": max((r.get("peak_mem_gib") or 0) for r in train),
        "final_loss": train[-1]["loss"],
        "resolved": cfg["config"].get("resolved"),
        "rows_per_step": cfg["config"]["micro_batch"] * cfg["config"]["grad_accum"],
        "max_len": cfg["config"]["max_len"],
        "device": cfg.get("device"),
    }


def run_config(key, args, out_dir: Path) -> dict:
    cmd = command(key, args.data_dir, out_dir / "runs", args.steps, args.extra)
    run_dir = out_dir / "runs" / key
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun into the same folder
    t0 = time.perf_counter()
    log_path = out_dir / f"{key}.log"
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout, cwd=REPO)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    res = {"name": key, "command": " ".join(Path(c).name if c == sys.executable else c for c in cmd[1:])}
    res["wall_s"] = time.perf_counter() - t0
    if rc != 0 or not (run_dir / "metrics.jsonl").is_file():
        tail = log_path.read_text().strip().splitlines()[-3:]
        return {**res, "error": f"exit {rc}: {' | '.join(tail)[-400:]}"}
    res.update(summarize(run_dir))
    for junk in ("tb", "checkpoints", "final"):
        shutil.rmtree(run_dir / junk, ignore_errors=True)
    return res


def print_table(results: list[dict]) -> None:
    head = (
        f"{'config':<11} {'rows x len':>11} {'attn':>5} {'ckpt':>4} {'1st s':>6} {'step s':>7} "
        f"{'tok/s proc':>10} {'non-pad':>8} {'superv':>8} {'MFU proc':>8} {'MFU np':>7} {'peak GiB':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if r.get("error"):
            print(f"{r['name']:<11} ERROR {r['error'][:150]}")
            continue
        t, m, z = r["tokens_per_s"], r["mfu"], r["resolved"] or {}

        def pct(v):
            return f"{100 * v:.1f}%" if v is not None else "-"

        shape = f"{r['rows_per_step']}x{r['max_len']}"
        print(
            f"{r['name']:<11} {shape:>11} {z.get('attention', '?'):>5} {z.get('checkpoint_blocks', '?'):>4} "
            f"{r['first_step_s']:>6.1f} {r['step_time_median_s']:>7.3f} {t['processed']:>10.0f} "
            f"{t['non_pad']:>8.0f} {t['supervised']:>8.0f} {pct(m['processed']):>8} {pct(m['non_pad']):>7} "
            f"{r['peak_mem_gib']:>8.1f}"
        )


def main(argv=None) -> int:
    if str(Path(__file__).resolve().parents[1]) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sft.argcheck import OneLineParser, float_in, int_in  # noqa: F401  one-line errors, checked ranges

    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out-dir", type=Path, default=Path("bench"))
    ap.add_argument("--configs", default="mpt76,mpt,llama", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument(
        "--steps", type=int_in(3), default=8, help="optimizer steps per config (the first 2 untimed)"
    )
    ap.add_argument("--timeout", type=float_in(0, low_open=True), default=240, help="seconds per config")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: tests the script")
    ap.add_argument("extra", nargs="*", help="more --field=value overrides for every config")
    args = ap.parse_args(argv)
    if args.quick:
        args.configs, args.steps = "tiny_llama,tiny_mpt", 3
    args.data_dir = args.data_dir.resolve()
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    results = []
    for key in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if key not in CONFIGS:
            raise SystemExit(f"error: unknown config {key!r} (have: {', '.join(CONFIGS)})")
        results.append(run_config(key, args, out_dir))
        print(json.dumps(results[-1]), flush=True)
    out = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "configs": results,
    }
    (out_dir / "train_throughput.json").write_text(json.dumps(out, indent=1))
    print()
    print_table(results)
    return 0 if all(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
