"""FSDP2 scaling: MPT-7B shape, full-parameter, packed rows of 2,048 tokens, on 1 GPU and on 2 GPUs.

One device call on ``nvidia-h200-x2`` (target: under 8 minutes, FlexAttention compile included):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python benchmarks/fsdp_throughput.py --out=$OUT/fsdp_throughput.json

Launcher (run without torchrun): starts ``torchrun --standalone --nproc_per_node=W`` for each W of
``--gpus`` (default 1,2), with NVLink multicast kept off (the three variables above, set for the children
too), collects each launch's JSON, prints a table and the ratio tokens/s(W=2) / tokens/s(W=1).

Worker (under torchrun), the trainer's FSDP path (sft/distributed.py) on synthetic data:
- ``sft.mpt.MPTForCausalLM`` (FlexAttention, ALiBi, document mask), random init, built on the meta
  device and materialised on the GPU; bf16 weights; activation checkpointing on every block (``--ac``);
- ``LossModule`` root + ``fully_shard`` per block + root, MixedPrecisionPolicy(bf16 params, fp32 reduce);
  ``--optimizer`` (default ``adamw_bf16``: fused torch AdamW on the bf16 shards);
- each rank: ``--micro_batch`` packed rows of 2,048 tokens per step (the same per-GPU batch for every W),
  documents drawn from the token-length distribution of guanaco-1k rendered with the guanaco template
  and MPT's tokenizer (quantiles below; 83% of tokens supervised), packed by ``sft.packing.pack``;
- the step of sft/trainer.py: N all-reduced, ``W * CE / N`` backward, grad clipping, optimizer step;
- with W=1, ``--plain`` also times the same model without FSDP first (same process and compile).
Measured: median step time over ``--steps`` after ``--warmup``; tokens/s processed (all ranks),
per GPU; peak allocated / reserved memory per GPU (max over ranks); MFU with 6N + 12 L d T_attn.

    python benchmarks/fsdp_throughput.py --quick   # tiny shape, 2 CPU processes (gloo): checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# guanaco-1k.jsonl (994 train conversations after dropping 3 with an empty turn), guanaco template,
# gpt-neox-20b tokenizer: token-length quantiles 0, 5, ..., 100 %
LENGTH_QUANTILES = [18, 75, 108, 138, 176, 206, 232, 264, 297, 333, 367, 402, 430, 467, 506, 553, 614, 705, 836, 1108, 2013]  # fmt: skip
SUPERVISED_FRACTION = 0.83
PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2", help="world sizes to run, one torchrun launch each")
    p.add_argument("--micro_batch", type=int, default=4, help="packed rows per GPU per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--optimizer", default="adamw_bf16", choices=("adamw_bf16", "adamw_kahan", "adamw"))
    p.add_argument(
        "--ac", default=True, action=argparse.BooleanOptionalAction, help="activation checkpointing"
    )
    p.add_argument(
        "--plain", default=True, action=argparse.BooleanOptionalAction, help="W=1: time no-FSDP too"
    )
    p.add_argument("--quick", action="store_true", help="tiny shape on CPU, 2 processes")
    p.add_argument("--out", default=None, help="results JSON (launcher)")
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # worker's own JSON
    p.add_argument("--launch_timeout", type=int, default=270, help="seconds per torchrun launch")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- launcher


def launcher(args) -> int:
    import torch

    env = {**os.environ, **NO_MULTICAST, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    gpus = [1, 2] if args.quick else [int(g) for g in args.gpus.split(",")]
    rows, errors = [], {}
    out = Path(args.out) if args.out else None
    for w in gpus:
        res = Path(f"/tmp/fsdp_throughput_w{w}_{os.getpid()}.json")
        res.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w}"]
        cmd += [__file__, f"--result={res}"] + [a for a in sys.argv[1:] if not a.startswith("--out")]
        t0 = time.time()
        try:
            p = subprocess.run(
                cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.launch_timeout
            )
            tail = (p.stdout + p.stderr)[-4000:]
            rc = p.returncode
        except subprocess.TimeoutExpired as e:
            tail, rc = str(e)[-2000:], "timeout"
        sys.stderr.write(f"--- W={w}: rc={rc}, {time.time() - t0:.0f} s\n{tail[-1500:]}\n")
        if res.is_file():
            rows += json.loads(res.read_text())
        else:
            errors[f"W={w}"] = f"rc={rc}: {tail[-1500:]}"
    by = {r["setup"]: r for r in rows}
    summary = {}
    if "fsdp_x1" in by and "fsdp_x2" in by:
        summary["speedup_fsdp2_over_fsdp1"] = by["fsdp_x2"]["tokens_per_s"] / by["fsdp_x1"]["tokens_per_s"]
    if "plain_x1" in by and "fsdp_x2" in by:
        summary["speedup_fsdp2_over_plain1"] = by["fsdp_x2"]["tokens_per_s"] / by["plain_x1"]["tokens_per_s"]
    result = {
        "benchmark": "fsdp_throughput",
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "env": NO_MULTICAST,
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "rows": rows,
        "summary": summary,
        "errors": errors,
    }
    print(
        f"{'setup':<10} {'tok/s':>9} {'tok/s/GPU':>10} {'step s':>7} {'MFU':>6} {'alloc GiB':>10} {'resv GiB':>9}"
    )
    for r in rows:
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "     -"
        alloc = f"{r['peak_alloc_gib']:10.1f}" if r["peak_alloc_gib"] is not None else "         -"
        resv = f"{r['peak_reserved_gib']:9.1f}" if r["peak_reserved_gib"] is not None else "        -"
        print(
            f"{r['setup']:<10} {r['tokens_per_s']:9.0f} {r['tokens_per_s_per_gpu']:10.0f} "
            f"{r['step_s_median']:7.3f} {mfu} {alloc} {resv}"
        )
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if rows and not errors else 1


# ----------------------------------------------------------------------------- worker


def synthetic_rows(n_rows: int, T: int, seed: int, vocab: int):
    """``n_rows`` packed rows ``[n_rows, T]`` of documents with guanaco-like lengths (a Batch dict)."""
    import numpy as np

    from sft.packing import collate_rows, pack
    from sft.render import Sample
    from sft.schema import IGNORE_INDEX

    rng = np.random.default_rng(seed)
    q = np.array(LENGTH_QUANTILES, dtype=float) * T / 2048
    samples, total = [], 0
    while total < n_rows * T * 1.3:  # enough documents for n_rows full rows
        n = max(2, int(np.interp(rng.random(), np.linspace(0, 1, len(q)), q)))
        ids = rng.integers(0, vocab, n).tolist()
        k = int(round(n * (1 - SUPERVISED_FRACTION)))  # the prompt part: not supervised
        samples.append(Sample(ids, [IGNORE_INDEX] * k + ids[k:]))
        total += n
    rows = pack(samples, T, pad_id=0)
    rows.sort(key=lambda r: -int(r["attention_mask"].sum()))  # the fullest rows (packing leaves a tail)
    return collate_rows(rows[:n_rows])


def worker(args) -> None:
    import torch

    from sft import distributed
    from sft.loss import count_supervised
    from sft.mpt import MPTConfig, MPTForCausalLM
    from sft.optim import build_optimizer
    from sft.trainer import attention_flops_tokens

    dev_type = "cpu" if args.quick else "cuda"
    info = distributed.init(dev_type)
    device = torch.device("cuda", info.local_rank) if dev_type == "cuda" else torch.device("cpu")
    W = info.world
    if args.quick:
        cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=512, max_seq_len=256)
        T, dtype = 256, torch.float32
    else:
        cfg, T, dtype = MPTConfig(max_seq_len=args.seq), args.seq, torch.bfloat16
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MPTForCausalLM(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.init_weights()
    model.gradient_checkpointing = args.ac
    n_params = sum(p.numel() for p in model.parameters())
    peak = (
        next((v for k, v in PEAK.items() if k in torch.cuda.get_device_name(device)), None)
        if dev_type == "cuda"
        else None
    )
    batch = synthetic_rows(args.micro_batch, T, seed=1 + info.rank, vocab=cfg.vocab_size)
    batch = {k: v.to(device) for k, v in batch.items()}
    results = []

    def sync():
        if dev_type == "cuda":
            torch.cuda.synchronize(device)

    def run(setup: str, root, loss_fn, params, world: int):
        optimizer = build_optimizer(params, args.optimizer, lr=1e-5)
        if dev_type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            n_sup = (
                distributed.all_reduce_sum(count_supervised([batch]), info)
                if world > 1
                else count_supervised([batch])
            )
            ce = loss_fn(batch)
            ((ce * world) / max(n_sup, 1)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        processed = batch["input_ids"].numel() * world
        nonpad = int(batch["attention_mask"].sum()) * world  # approx.: each rank's rows are alike
        attn = attention_flops_tokens(batch["document_ids"].cpu()) * world
        alloc = resv = None
        if dev_type == "cuda":
            alloc = distributed.all_reduce_max(torch.cuda.max_memory_allocated(device) / 2**30, info)
            resv = distributed.all_reduce_max(torch.cuda.max_memory_reserved(device) / 2**30, info)
        flops = 6 * n_params * processed + 12 * cfg.n_layers * cfg.d_model * attn
        results.append(
            {
                "setup": setup,
                "world": world,
                "micro_batch_per_gpu": args.micro_batch,
                "seq": T,
                "optimizer": args.optimizer,
                "activation_checkpointing": args.ac,
                "n_params": n_params,
                "step_s_median": dt,
                "step_s_all": times,
                "tokens_per_s": processed / dt,
                "tokens_per_s_per_gpu": processed / dt / world,
                "nonpad_tokens_per_s": nonpad / dt,
                "mfu": flops / dt / (peak * world) if peak else None,
                "peak_alloc_gib": alloc,
                "peak_reserved_gib": resv,
            }
        )
        del optimizer

    if W == 1 and args.plain:
        from sft.loss import chunked_cross_entropy_sum

        def plain_loss(b):
            h = model.forward_hidden(b["input_ids"], b["document_ids"])
            return chunked_cross_entropy_sum(h, model.lm_head_weight, b["targets"])

        run("plain_x1", model, plain_loss, [p for p in model.parameters()], 1)
        for p in model.parameters():
            p.grad = None

    root = distributed.LossModule(model)
    distributed.shard_model(root, distributed.mixed_precision(device, "bf16"), device_type=dev_type)

    def fsdp_loss(b):
        return root(b["input_ids"], b["targets"], b["document_ids"], b["position_ids"])

    run(f"fsdp_x{W}", root, fsdp_loss, [p for p in root.parameters()], W)
    if info.is_main and args.result:
        Path(args.result).write_text(json.dumps(results, indent=2))
    distributed.destroy()


if __name__ == "__main__":
    a = parse()
    if os.environ.get("RANK") is not None and os.environ.get("LOCAL_RANK") is not None:
        worker(a)
    else:
        raise SystemExit(launcher(a))
