"""Loss parity of two runs (issue 17: bf16 against ``--fp8``): final training loss and held-out loss, one plot.

Reads each run folder's ``metrics.jsonl`` (and the ``fp8`` recipe from its ``config.json``) and prints, per
run: the final training loss (mean of the last ``--last`` steps' losses: one step's loss is the mean CE of
its own rows, too noisy alone), the last held-out loss (the evaluation after the final step) and the
relative difference of the second run from the first (``(b - a) / a``), with whether it is within
``--tol``. Draws both training curves (thin) and both held-out curves (markers) in one PNG, written into
each run folder as ``fp8_parity.png`` (and to ``--png`` if given). Also writes ``fp8_parity.json`` there.

    python benchmarks/fp8_parity.py runs/parity/bf16 runs/parity/fp8 [--png assets/fp8_parity.png]
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sft.training.runs import read_metrics  # noqa: E402


def summary(run_dir: Path, last: int) -> dict:
    """``{"name", "fp8", "steps", "final_train_loss", "held_out_loss", "train", "evals"}`` of one run."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train or not evals:
        raise SystemExit(f"error: {run_dir}/metrics.jsonl: no training or held-out losses")
    cfg_path = run_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())["config"] if cfg_path.is_file() else {}
    return {
        "name": run_dir.name,
        "fp8": cfg.get("fp8", "none"),
        "steps": train[-1][0],
        "final_train_loss": statistics.fmean(v for _, v in train[-last:]),
        "held_out_loss": evals[-1][1],
        "train": train,
        "evals": evals,
    }


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(runs):
        label = f"{r['name']} (fp8={r['fp8']})"
        ax.plot(*zip(*r["train"], strict=True), lw=0.8, color=f"C{i}", alpha=0.8, label=f"{label} train")
        ax.plot(*zip(*r["evals"], strict=True), "o--", color=f"C{i}", label=f"{label} held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / supervised token)")
    ax.set_title("loss parity: " + " vs ".join(r["name"] for r in runs), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    if str(Path(__file__).resolve().parents[1]) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sft.argcheck import OneLineParser, float_in, int_in  # noqa: F401  one-line errors, checked ranges

    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("reference", type=Path, help="the bf16 run folder")
    ap.add_argument("other", type=Path, help="the FP8 run folder")
    ap.add_argument(
        "--last", type=int, default=20, help="training steps averaged for the final training loss"
    )
    ap.add_argument(
        "--tol", type=float_in(0, low_open=True), default=0.01, help="relative difference called parity"
    )
    ap.add_argument("--png", type=Path, default=None, help="one more copy of the plot")
    args = ap.parse_args(argv)
    a, b = (summary(p, args.last) for p in (args.reference, args.other))
    result = {"last": args.last, "tol": args.tol, "runs": []}
    head = f"train (last {args.last})"
    print(f"{'run':<16} {'fp8':<10} {'steps':>5} {head:>16} {'held-out':>9}")
    for r in (a, b):
        print(
            f"{r['name']:<16} {r['fp8']:<10} {r['steps']:>5} {r['final_train_loss']:>16.4f} {r['held_out_loss']:>9.4f}"
        )
        result["runs"].append(
            {k: r[k] for k in ("name", "fp8", "steps", "final_train_loss", "held_out_loss")}
        )
    for key in ("final_train_loss", "held_out_loss"):
        rel = (b[key] - a[key]) / a[key]
        result[f"rel_diff_{key}"] = rel
        ok = "within" if abs(rel) <= args.tol else "NOT within"
        print(f"{key}: {b['name']} vs {a['name']}: {100 * rel:+.2f}% ({ok} {100 * args.tol:g}%)")
    for run_dir in (args.reference, args.other):
        plot([a, b], run_dir / "fp8_parity.png")
        (run_dir / "fp8_parity.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.other / "fp8_parity.png", args.png)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
