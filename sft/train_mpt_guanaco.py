"""Full-parameter fine-tune of MPT-7B on OpenAssistant Guanaco, sized for one 80 GB GPU.

    python sft/train_mpt_guanaco.py                          # mosaicml/mpt-7b, timdettmers/openassistant-guanaco
    python sft/train_mpt_guanaco.py --memory_limit_gib=76            # the 80 GB profile (H100 / A100 80 GB)
    python sft/train_mpt_guanaco.py --smoke                  # tiny random MPT on the bundled sample (CPU)
    torchrun --standalone --nproc_per_node 8 sft/train_mpt_guanaco.py --grad_accum=1   # FSDP2 on 8 GPUs

Defaults: bf16 weights with ``--optimizer=auto`` (the memory plan picks the most precise state that runs
without recomputing blocks: Kahan-compensated, stochastic-rounding or 8-bit AdamW; sft/training/optim.py), packed rows of 2,048 tokens with document-masked attention, our MPT
(``--mpt_impl=fast``: FlexAttention + ALiBi; ``--mpt_impl=hf`` for transformers' eager MPT), loss on the
assistant replies only, every conversation turn kept (Guanaco template). The engine's defaults
(sft/training/engine.py, sft/training/memory.py): blocks compiled one by one on CUDA, and the fewest checkpointed blocks that
fit the GPU's free memory or ``--memory_limit_gib``, chosen before step 0 (refused before the run folder
exists if nothing fits).
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # repository root instead of sft/

import dataclasses  # noqa: E402

from sft.config import TrainConfig  # noqa: E402
from sft.training.trainer import main  # noqa: E402

DEFAULTS = dataclasses.replace(
    TrainConfig(),
    model="mosaicml/mpt-7b",
    mpt_impl="fast",
    data="timdettmers/openassistant-guanaco",
    fmt="guanaco",
    bad_rows="drop",  # 3 of the real Guanaco rows have an empty turn: drop them (counted in the run's data stats)
    template="guanaco",
    max_len=2048,
    packing=True,
    micro_batch=4,
    grad_accum=4,
    epochs=3.0,
    lr=1e-5,
    min_lr_ratio=0.1,
    warmup_steps=20,
    decay="cosine",
    weight_decay=0.0,
    betas=(0.9, 0.95),
    grad_clip=1.0,
    precision="bf16",
    optimizer="auto",
    eval_size=200,
    eval_every=50,
    log_every=1,
    save_every=200,
    keep_last=1,
    num_samples=4,
    samples_max_new_tokens=128,
)

SMOKE = dict(
    model="tiny-mpt",
    data="bundled",
    fmt=None,
    template=None,
    limit=12,
    max_len=256,
    overlong="drop",
    eval_size=2,
    eval_every=0,
    max_steps=3,
    micro_batch=1,
    grad_accum=2,
    lr=1e-3,
    warmup_steps=0,
    precision="auto",
    optimizer="adamw",
    grad_checkpointing=False,
    save_every=0,
    num_samples=1,
    samples_max_new_tokens=4,
)

if __name__ == "__main__":
    raise SystemExit(main(DEFAULTS, smoke=SMOKE))
