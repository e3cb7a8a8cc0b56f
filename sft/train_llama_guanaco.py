"""Full-parameter fine-tune of a Llama-family model at 8B scale on OpenAssistant Guanaco, on one GPU.

    python sft/train_llama_guanaco.py                                  # meta-llama/Llama-3.1-8B (gated on the hub)
    python sft/train_llama_guanaco.py --model=Qwen/Qwen2.5-7B          # any Llama-family id or local folder
    python sft/train_llama_guanaco.py --model=Qwen/Qwen3-14B           # on an 80 GB card: 8-bit state kept in host memory
    python sft/train_llama_guanaco.py --memory_limit_gib=76            # the 80 GB profile (H100 / A100 80 GB)
    python sft/train_llama_guanaco.py --max_len=8192 --micro_batch=1 --grad_accum=16   # long rows
    python sft/train_llama_guanaco.py --smoke                          # tiny random Llama, bundled sample (CPU)
    torchrun --standalone --nproc_per_node 8 sft/train_llama_guanaco.py --grad_accum=1   # FSDP2 on 8 GPUs

Defaults: bf16 weights with ``--optimizer=auto`` (the memory plan picks the most precise state that runs
without recomputing blocks: Kahan-compensated, stochastic-rounding or 8-bit AdamW, sft/training/optim.py;
where none fits on the GPU, the state in host memory, ``--offload_optimizer``), packed rows of 2,048 tokens, the model's
own chat template (ChatML if it has none) with loss on the assistant replies and their end-of-turn token,
every turn kept. The engine's defaults (sft/training/engine.py, sft/training/memory.py): FlexAttention with a causal +
same-document BlockMask on CUDA (``--attention``), decoder layers compiled one by one (``--compile``), and
the fewest checkpointed layers that fit the GPU's free memory or ``--memory_limit_gib``
(``--checkpoint_blocks``), all chosen before step 0.
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # repository root instead of sft/

import dataclasses  # noqa: E402

from sft.config import TrainConfig  # noqa: E402
from sft.training.trainer import main  # noqa: E402

DEFAULTS = dataclasses.replace(
    TrainConfig(),
    model="meta-llama/Llama-3.1-8B",
    data="timdettmers/openassistant-guanaco",
    fmt="guanaco",
    bad_rows="drop",  # 3 of the real Guanaco rows have an empty turn: dropped, counted in the run's data stats
    template=None,
    max_len=2048,
    packing=True,
    micro_batch=4,
    grad_accum=4,
    epochs=3.0,
    lr=1e-5,
    min_lr_ratio=0.1,
    warmup_steps=20,
    decay="cosine",
    betas=(0.9, 0.95),
    grad_clip=1.0,
    precision="bf16",
    optimizer="auto",
    eval_size=200,
    eval_every=50,
    save_every=200,
    keep_last=1,
    num_samples=4,
    samples_max_new_tokens=128,
)

SMOKE = dict(
    model="tiny-llama",
    data="bundled",
    fmt=None,
    limit=12,
    max_len=256,
    overlong="drop",
    eval_size=2,
    eval_every=0,
    max_steps=3,
    micro_batch=2,
    grad_accum=2,
    lr=1e-3,
    warmup_steps=0,
    precision="auto",
    optimizer="adamw",
    save_every=0,
    num_samples=1,
    samples_max_new_tokens=4,
)

if __name__ == "__main__":
    raise SystemExit(main(DEFAULTS, smoke=SMOKE))
