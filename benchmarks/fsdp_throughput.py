"""FSDP2 scaling of the trainer a user runs: the best single-GPU run (no FSDP) against the same recipe under
``torchrun --nproc_per_node W`` (FSDP2), at the same per-GPU batch. No training step here: every run is the
recipe's entry point, measured from its run folder (``benchmarks/train_throughput.py``'s ``summarize``).

For W in ``--gpus`` (default 1,2): W = 1 runs the recipe in one process without FSDP (the memory plan of
sft/training/memory.py decides its checkpointing); W > 1 runs it under torchrun with NVLink multicast kept off
(``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1``, set for the children).
The global batch grows with W (same micro-batch and accumulation per GPU); the table gives tokens/s of all
GPUs and the ratio to the single-GPU run, the figure to hold against the 0.92 W target.

    python benchmarks/fsdp_throughput.py --data-dir .devdata --out-dir bench --config mpt --gpus 1,2,4,8
    python benchmarks/fsdp_throughput.py --quick --out-dir /tmp/fsdp   # tiny shape, 2 CPU processes (gloo)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import command, summarize  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run_world(key: str, world: int, args, out_dir: Path) -> dict:
    """The recipe of config ``key`` on ``world`` processes (1: plain, no FSDP); its summary."""
    name = f"{key}_w{world}"
    cmd = command(key, args.data_dir, out_dir / "runs", args.steps, [*args.extra, f"--run_name={name}"])
    if world > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            *cmd[1:],
        ]
    run_dir = out_dir / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    with open(out_dir / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=args.timeout,
                env={**os.environ, **NO_MULTICAST},
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    res = {"name": name, "world": world, "command": " ".join(cmd[1:]), "wall_s": time.perf_counter() - t0}
    if rc != 0 or not (run_dir / "metrics.jsonl").is_file():
        return {**res, "error": f"exit {rc}; see {name}.log"}
    return {**res, **summarize(run_dir)}


def main(argv=None) -> int:
    if str(Path(__file__).resolve().parents[1]) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sft.argcheck import OneLineParser, float_in, int_in  # noqa: F401  one-line errors, checked ranges

    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--out-dir", type=Path, default=Path("bench_fsdp"))
    ap.add_argument("--config", default="mpt", help="a config of benchmarks/train_throughput.py")
    ap.add_argument("--gpus", default="1,2", help="world sizes; 1 = the single-GPU run without FSDP")
    ap.add_argument("--steps", type=int_in(1), default=8)
    ap.add_argument("--timeout", type=float_in(0, low_open=True), default=300)
    ap.add_argument("--quick", action="store_true", help="tiny shape, 1 and 2 CPU processes (gloo)")
    ap.add_argument("extra", nargs="*", help="more --field=value overrides for every run")
    args = ap.parse_args(argv)
    if args.quick:
        args.config, args.gpus, args.steps = "tiny_mpt", "1,2", 3
        args.extra = [*args.extra, "--precision=auto", "--optimizer=adamw"]
    args.data_dir = args.data_dir.resolve()
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [run_world(args.config, int(w), args, out_dir) for w in args.gpus.split(",")]
    base = next((r for r in results if r["world"] == 1 and "error" not in r), None)
    for r in results:
        if base and "error" not in r:
            r["speedup_vs_1gpu"] = r["tokens_per_s"]["processed"] / base["tokens_per_s"]["processed"]
    (out_dir / "fsdp_throughput.json").write_text(
        json.dumps({"command": " ".join(sys.argv), "runs": results}, indent=1)
    )
    print(f"{'run':<14} {'tok/s (all GPUs)':>16} {'per GPU':>9} {'x 1 GPU':>8} {'MFU':>6} {'peak GiB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:<14} ERROR {r['error']}")
            continue
        t, m = r["tokens_per_s"]["processed"], r["mfu"]["processed"]
        print(
            f"{r['name']:<14} {t:>16.0f} {t / r['world']:>9.0f} {r.get('speedup_vs_1gpu', float('nan')):>8.2f} "
            f"{'-' if m is None else f'{100 * m:.1f}%':>6} {r['peak_mem_gib']:>8.1f}"
        )
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
