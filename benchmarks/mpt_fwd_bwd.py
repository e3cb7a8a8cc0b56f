"""Forward+backward time of sft.model.mpt (FlexAttention, compiled blocks) vs transformers' MptForCausalLM.

MPT-7B shape by default (d_model 4096, 32 heads, 32 layers, vocab 50432), random init, bf16 weights,
one row of T=2048 tokens, loss = mean cross-entropy over all next-token targets (logits upcast to fp32),
``loss.backward()``; no optimizer step (weights never change, so every step is the same work).
Both models run in the same process on the same weights (transformers' gets a copy of ours), one after
the other so that only one is in memory with its gradients. Timing: CUDA events around each step,
median over ``--iters`` steps after ``--warmup`` steps (the warm-up includes torch.compile).

Rows: ``sft_mpt_causal`` (one document), ``sft_mpt_packed`` (``--docs`` equal documents in the row,
block mask causal & same document), ``hf_mpt_eager`` (transformers, causal). MFU uses
``6 N + 12 L d T_attn`` FLOPs per token (T_attn = attended length: T, or T/docs when packed) against
989e12 bf16 FLOP/s (H100/H200 dense), as in ../shared/GUIDE.md section 4.

GPU (one device call, < 4 min):   python benchmarks/mpt_fwd_bwd.py --out "$OUT/mpt_fwd_bwd.json"
CPU smoke test of the script:     python benchmarks/mpt_fwd_bwd.py --tiny --device cpu --attn sdpa --no-compile
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import transformers  # noqa: E402

from sft.model.mpt import MPTConfig, MPTForCausalLM, hf_config  # noqa: E402
from sft.training.flops import peak_flops  # noqa: E402

log = logging.getLogger("mpt_fwd_bwd")


def time_steps(step, n_warmup: int, n_iters: int, device: torch.device) -> tuple[list[float], float]:
    """Run ``step()`` n_warmup + n_iters times; return per-step ms of the last n_iters and the last loss."""
    times, loss = [], float("nan")
    for i in range(n_warmup + n_iters):
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            loss = step()
            ms = (time.perf_counter() - t0) * 1e3
        log.info("  step %d: %.1f ms%s", i, ms, " (warm-up)" if i < n_warmup else "")
        if i >= n_warmup:
            times.append(ms)
    return times, loss


def make_step(forward, params, ids, targets):
    def step():
        logits = forward(ids)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        loss.backward()
        for p in params:
            p.grad = None
        return loss.item()

    return step


def main(argv=None) -> dict:
    if str(Path(__file__).resolve().parents[1]) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sft.argcheck import OneLineParser, float_in, int_in  # noqa: F401  one-line errors, checked ranges

    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int_in(1), default=32)
    ap.add_argument("--seq", type=int_in(2), default=2048)
    ap.add_argument("--batch", type=int_in(1), default=1)
    ap.add_argument(
        "--docs", type=int_in(0), default=4, help="documents per row for the packed run (0: skip)"
    )
    ap.add_argument("--warmup", type=int_in(0), default=3)
    ap.add_argument("--iters", type=int_in(1), default=5)
    ap.add_argument("--attn", default="flex", choices=["flex", "sdpa", "flex_eager"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="d_model 64, 4 heads, vocab 512 (smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/mpt_fwd_bwd.json or ./)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device(args.device)
    dtype = torch.bfloat16
    if args.tiny:
        cfg = MPTConfig(d_model=64, n_heads=4, n_layers=args.layers, max_seq_len=args.seq, vocab_size=512)
    else:
        cfg = MPTConfig(
            d_model=4096, n_heads=32, n_layers=args.layers, max_seq_len=args.seq, vocab_size=50432
        )
    B, T = args.batch, args.seq
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen).to(device)
    ids, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    with torch.device("meta"):
        ours = MPTForCausalLM(cfg, attn_impl=args.attn)
    ours = ours.to(dtype).to_empty(device=device)
    ours.init_weights(std=0.02)
    ours.train()
    n_params = sum(p.numel() for p in ours.parameters())  # tied head counted once
    if not args.no_compile:
        ours.compile_blocks()
    peak = peak_flops(device)

    def record(name, times, loss, t_attn):
        med = statistics.median(times)
        tok_s = B * T / (med / 1e3)
        flops_tok = 6 * n_params + 12 * cfg.n_layers * cfg.d_model * t_attn
        row = {
            "name": name,
            "ms_median": round(med, 2),
            "ms_all": [round(t, 2) for t in times],
            "tokens_per_s": round(tok_s, 1),
            "tflops_per_s": round(tok_s * flops_tok / 1e12, 1),
            "mfu": None if peak is None else round(tok_s * flops_tok / peak, 4),
            "loss": round(loss, 5),
            "peak_mem_gib": (
                round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
            ),
        }
        log.info("%s", row)
        return row

    rows = []
    params = list(ours.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log.info("sft.model.mpt causal (%s, compiled=%s)", args.attn, not args.no_compile)
    times, loss = time_steps(make_step(ours, params, ids, targets), args.warmup, args.iters, device)
    rows.append(record("sft_mpt_causal", times, loss, T))

    if args.docs > 1:
        doc_ids = (torch.arange(T, device=device) * args.docs // T).to(torch.int32).expand(B, T).contiguous()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        log.info("sft.model.mpt packed, %d documents per row", args.docs)
        step = make_step(lambda x: ours(x, doc_ids), params, ids, targets)
        times, loss_packed = time_steps(step, args.warmup, args.iters, device)
        rows.append(record("sft_mpt_packed", times, loss_packed, T // args.docs))

    if not args.skip_hf:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                hf = transformers.MptForCausalLM(hf_config(cfg))
        finally:
            torch.set_default_dtype(default)
        with torch.no_grad():
            missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr(), "head not tied"
        del ours, params
        hf.train()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        log.info("transformers MptForCausalLM (eager attention)")
        step = make_step(lambda x: hf(x).logits, list(hf.parameters()), ids, targets)
        times, loss_hf = time_steps(step, args.warmup, args.iters, device)
        rows.append(record("hf_mpt_eager", times, loss_hf, T))

    by = {r["name"]: r for r in rows}
    speedup = (
        round(by["hf_mpt_eager"]["ms_median"] / by["sft_mpt_causal"]["ms_median"], 3)
        if "hf_mpt_eager" in by
        else None
    )
    result = {
        "what": "MPT forward+backward, random init, bf16 weights, loss = mean CE (fp32 logits), no optimizer",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": {**cfg.__dict__, "batch": B, "seq": T, "docs": args.docs, "attn_impl": args.attn},
        "n_params": n_params,
        "compiled_blocks": not args.no_compile,
        "results": rows,
        "speedup_causal_vs_hf": speedup,
    }
    print(f"\n{'run':<16} {'ms/step':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'loss':>9}")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        print(
            f"{r['name']:<16} {r['ms_median']:>9.1f} {r['tokens_per_s']:>9.0f} {r['tflops_per_s']:>8.1f} "
            f"{mfu:>6} {mem:>9} {r['loss']:>9.4f}"
        )
    if speedup is not None:
        print(f"speed-up of sft.model.mpt (causal) over transformers: {speedup:.2f}x")
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "mpt_fwd_bwd.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
