"""One optimizer step over the Llama-3-8B parameter shapes (bf16 weights): time, bytes, bandwidth, state.

Parameters: vocab 128,256 x d 4,096 embedding and untied head, 32 layers of q/k/v/o (32 heads, 8 KV heads),
gate/up/down (FFN 14,336) and two norms, a final norm: 8.03 B parameters, bf16, with random bf16 gradients.
For each optimizer (torch fused AdamW on the bf16 weights; ours, `sft/training/optim.py`, on their default
kernel on CUDA: one Triton launch per tensor, `sft/training/fused_adamw.py`; torchao's AdamW8bit if it imports)
the step is timed with CUDA events: median of 10 steps after 3 warm-up steps (the first allocates the state
and compiles the kernels). Per optimizer it prints ms/step, the bytes a step must move per parameter (read
weight, gradient and state once, write weight and state once), the bandwidth that achieves, and the ratio of
the time to the bandwidth bound: those bytes at the copy bandwidth measured in the same run (a large
device-to-device copy). A mode whose weights + gradients + state do not fit the free memory is timed on the
first layers that fit (never fewer than 1): the table gives the parameters timed and ms per 8.03 B by
linear extrapolation (the step is memory-bound, cost per byte is constant). State memory is measured
(allocated after the first step minus before it).

    python benchmarks/optim_step.py                       # the whole 8.03 B (H100: < 3 minutes)
    python benchmarks/optim_step.py --scale 0.1           # 3 layers, a tenth of the vocabulary: a quick look
    python benchmarks/optim_step.py --check               # Triton kernels vs the torch reference on CUDA
    python benchmarks/optim_step.py --modes adamw_8bit,adamw_sr --compiled   # also the torch.compile kernel
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sft.training import fused_adamw, optim  # noqa: E402
from sft.training.optim import build_optimizer, state_bytes_per_param  # noqa: E402

LLAMA3_8B = dict(vocab=128_256, d=4_096, layers=32, ffn=14_336, heads=32, kv_heads=8)
FULL_PARAMS = 8_030_261_248  # the shapes below at scale 1
# bytes per bf16 parameter a step must read + write once: weight 2+2, gradient 2, state read + written
BYTES_MOVED = {
    "torch_fused_adamw": 2 + 2 + 2 + 2 * 4,
    "adamw_kahan": 2 + 2 + 2 + 2 * 6,
    "adamw_sr": 2 + 2 + 2 + 2 * 4,
    "adamw_8bit": 2 + 2 + 2 + 2 * (2 + 8 / 256),
    "torchao_adamw8bit": 2 + 2 + 2 + 2 * (2 + 8 / 256),
}
STATE_BYTES = {
    "torch_fused_adamw": 4.0,
    "torchao_adamw8bit": 2 + 8 / 256,
    **{m: state_bytes_per_param(m) for m in ("adamw_kahan", "adamw_sr", "adamw_8bit")},
}


def shapes(scale: float = 1.0, layers: int | None = None) -> list[tuple[int, ...]]:
    """Parameter shapes of the Llama-3-8B layout; `scale` shrinks the layer count and the vocabulary."""
    c = LLAMA3_8B
    d, hd = c["d"], c["d"] // c["heads"]
    vocab = max(256, int(c["vocab"] * scale))
    n_layers = layers if layers is not None else max(1, round(c["layers"] * scale))
    out: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(n_layers):
        out += [(d, d), (c["kv_heads"] * hd, d), (c["kv_heads"] * hd, d), (d, d)]
        out += [(c["ffn"], d), (c["ffn"], d), (d, c["ffn"]), (d,), (d,)]
    out += [(d,), (vocab, d)]
    return out


def numel(shape_list) -> int:
    n = 0
    for s in shape_list:
        k = 1
        for x in s:
            k *= x
        n += k
    return n


def copy_bandwidth(gib: float = 4.0) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), median of 10 copies."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    times = []
    for i in range(13):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        if i >= 3:
            times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 / statistics.median(times)


def make_optimizer(mode: str, params: list[torch.Tensor]):
    if mode == "torch_fused_adamw":
        return torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    if mode == "torchao_adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            from torchao.prototype.low_bit_optim import AdamW8bit
        return AdamW8bit(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, bf16_stochastic_round=True)
    name, _, kernel = mode.partition(":")
    return build_optimizer(
        params, name, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, kernel=kernel or None, seed=0
    )


def fit_layers(mode: str, scale: float, free_bytes: int) -> int:
    """The most layers (<= the scaled count) whose weights + grads + state fit 92% of the free memory."""
    base = mode.partition(":")[0]
    per_param = 4 + STATE_BYTES[base]
    full = max(1, round(LLAMA3_8B["layers"] * scale))
    for n_layers in range(full, 0, -1):
        if numel(shapes(scale, n_layers)) * per_param <= 0.92 * free_bytes:
            return n_layers
    return 1


def time_mode(mode: str, scale: float, warmup: int = 3, iters: int = 10) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    n_layers = fit_layers(mode, scale, free)
    shp = shapes(scale, n_layers)
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for s in shp:
        p = (torch.randn(s, device="cuda", generator=gen) * 0.02).bfloat16().requires_grad_()
        p.grad = (torch.randn(s, device="cuda", generator=gen) * 1e-3).bfloat16()
        params.append(p)
    n = numel(shp)
    opt = make_optimizer(mode, params)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        opt.step()
        e.record()
        e.synchronize()
        if i == 0:
            state_bytes = torch.cuda.memory_allocated() - before
            step_peak = torch.cuda.max_memory_allocated() - before
        if i >= warmup:
            times.append(s.elapsed_time(e))
    kernel = getattr(opt, "kernel", "fused" if mode == "torch_fused_adamw" else "torchao")
    del opt, params
    gc.collect()
    torch.cuda.empty_cache()
    ms = statistics.median(times)
    return dict(
        mode=mode,
        kernel=kernel,
        layers=n_layers,
        params=n,
        ms=ms,
        ms_full=ms * FULL_PARAMS / n if scale == 1.0 else ms,
        state_gib=state_bytes / 2**30,
        state_bytes_per_param=state_bytes / n,
        transient_gib=(step_peak - state_bytes) / 2**30,
    )


def run_check(device: str) -> int:
    """Kernels vs the torch reference on a few MB, against optim.kernel_bound."""
    numels = (1, 300, 4096, 1_000_003, 3 * 2**20)
    stats = optim.check_kernels(device, numels)
    bad = 0
    print(f"Triton kernels vs torch reference on {device}, element counts {numels}, one step:")
    for mode, st in stats.items():
        for key, val in st.items():
            bound = optim.kernel_bound(key)
            ok = val <= bound
            bad += not ok
            print(f"  {mode:12s} {key:28s} {val:10.3g}  (bound {bound:g}) {'ok' if ok else 'FAIL'}")
    print("check:", "all within bounds" if not bad else f"{bad} FAILED")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--scale", type=float, default=1.0, help="fraction of the layers and vocabulary (1 = 8.03 B)"
    )
    ap.add_argument(
        "--modes",
        default="torch_fused_adamw,adamw_8bit,adamw_sr,adamw_kahan,torchao_adamw8bit",
        help="comma-separated; ours take ':kernel' (e.g. adamw_sr:compile); torchao is skipped if absent",
    )
    ap.add_argument(
        "--compiled", action="store_true", help="also time adamw_sr/adamw_kahan with kernel=compile"
    )
    ap.add_argument("--check", action="store_true", help="only compare the kernels with the torch reference")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--philox-rounds", type=int, default=fused_adamw.PHILOX_ROUNDS, help="rounds of the rounding bits"
    )
    args = ap.parse_args(argv)
    fused_adamw.PHILOX_ROUNDS = args.philox_rounds
    if args.check:
        if torch.cuda.is_available():
            return run_check("cuda")
        import os

        if os.environ.get("TRITON_INTERPRET") == "1" and fused_adamw.triton_available():
            return run_check("cpu")
        print("--check needs CUDA (or TRITON_INTERPRET=1 and triton on CPU)")
        return 1
    if not torch.cuda.is_available():
        print("optim_step.py times the step on CUDA: no GPU here")
        return 1
    modes = [m for m in args.modes.split(",") if m]
    if args.compiled:
        modes += [m + ":compile" for m in ("adamw_sr", "adamw_kahan") if m in modes]
    if "torchao_adamw8bit" in modes:
        try:
            import torchao  # noqa: F401
        except ImportError:
            print("torchao not importable: skipping torchao_adamw8bit")
            modes.remove("torchao_adamw8bit")
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    print(
        f"{dev}: copy bandwidth {bw / 1e9:,.0f} GB/s; scale {args.scale} ({numel(shapes(args.scale)) / 1e9:.2f} B params)"
    )
    rows = []
    for mode in modes:
        try:
            r = time_mode(mode, args.scale)
        except Exception as exc:  # one failing mode does not hide the others
            print(f"{mode}: failed: {type(exc).__name__}: {exc}")
            gc.collect()
            torch.cuda.empty_cache()
            continue
        moved = BYTES_MOVED[mode.partition(":")[0]]
        r["bytes_moved_per_param"] = moved
        r["gb_per_s"] = moved * r["params"] / (r["ms"] / 1e3) / 1e9
        r["x_bound"] = (r["ms"] / 1e3) / (moved * r["params"] / bw)
        rows.append(r)
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(dict(device=dev, copy_gb_per_s=bw / 1e9, rows=rows), indent=1))
    full = "ms @8.03B" if args.scale == 1.0 else "ms (scaled)"
    print(f"\n{'mode':24s} {'kernel':8s} {'params':>7s} {'ms/step':>8s} {full:>11s} {'B/param':>8s} {'GB/s':>6s} "
          f"{'x bound':>7s} {'state GiB':>9s} {'state B/p':>9s}")  # fmt: skip
    for r in rows:
        print(
            f"{r['mode']:24s} {r['kernel']:8s} {r['params'] / 1e9:6.2f}B {r['ms']:8.1f} {r['ms_full']:11.1f} "
            f"{r['bytes_moved_per_param']:8.2f} {r['gb_per_s']:6.0f} {r['x_bound']:7.2f} {r['state_gib']:9.2f} "
            f"{r['state_bytes_per_param']:9.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
