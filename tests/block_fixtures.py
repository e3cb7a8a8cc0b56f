"""Shared by the tests of what a training step keeps (recomputation, activations and optimizer state in host
memory): one packed batch, the tiny models with the real block structure, their loss and gradients, and a
tiny trainer run's arguments and per-step losses."""

from __future__ import annotations

import torch

from sft.data.packing import collate_rows, pack
from sft.data.render import Sample
from sft.model.loss import chunked_cross_entropy_sum
from sft.model.models import forward_hidden, tiny_model
from sft.model.mpt import MPTConfig, MPTForCausalLM

V = 97


def packed_batch(seed: int = 0) -> dict:
    """Rows of 64 tokens packing several documents each (and a padding tail)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in (23, 17, 30, 9, 12, 40):
        ids = torch.randint(4, V, (n,), generator=g).tolist()
        samples.append(Sample(ids, ids))
    return collate_rows(pack(samples, 64, 0))


def tiny_llama(dtype=torch.float32, layers: int = 2):
    """tiny-llama: 2 blocks, d 64, GQA (4 query heads, 2 KV heads), RoPE, SiLU-gated FFN of 128, SDPA; its
    first ``layers`` blocks."""
    model = tiny_model("tiny-llama", V, seed=0).to(dtype).train()
    model.model.layers = model.model.layers[:layers]
    return model


def our_mpt(dtype=torch.float32, layers: int = 3):
    """Our MPT (sft/model/mpt.py): d 64, 4 heads, ALiBi, GELU FFN, SDPA, seeded."""
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=layers, vocab_size=V, max_seq_len=128))
    model.init_weights()
    model.attn_impl = "sdpa"
    return model.to(dtype).train()


def loss_and_grads(model, batch):
    """Summed CE of ``batch`` through the model's own head, and every parameter's gradient (fresh)."""
    model.zero_grad(set_to_none=True)
    h, head = forward_hidden(model, batch)
    loss = chunked_cross_entropy_sum(h, head, batch["targets"], 32)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def tiny_run_args(out, *extra: str, steps: int = 4) -> list[str]:
    """A tiny Llama trainer run on the bundled sample, on the CPU, fp32, into ``out`` (``extra`` appended)."""
    return [
        "--model=tiny-llama", "--data=bundled", "--limit=12", "--max_len=256", "--overlong=drop",
        "--eval_size=2", f"--max_steps={steps}", "--micro_batch=1", "--grad_accum=2", "--lr=1e-3",
        "--warmup_steps=1", "--num_samples=0", "--no-save_final", "--no-progress", "--device=cpu",
        "--precision=fp32", f"--out_dir={out}", *extra,
    ]  # fmt: skip


def run_losses(run_dir) -> list[tuple[int, float]]:
    """``(step, loss)`` of every train line of the run's metrics.jsonl."""
    from sft.training import runs

    return [(r["step"], r["loss"]) for r in runs.read_metrics(run_dir) if "loss" in r]
