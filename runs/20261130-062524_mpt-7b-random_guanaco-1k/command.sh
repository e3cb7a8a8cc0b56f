#!/bin/bash
# The command of this run, as run on the device (nvidia-h200), from the repository root, with .devdata/
# holding copies of ../shared/data/guanaco-1k.jsonl and gpt-neox-20b-tokenizer.json: MPT-7B shape, random
# init, through the real recipe. (The tokenizer folder below predates the trainer fix for bare tokenizer.json.)
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python - <<'PY'
import time, torch
from transformers import MptConfig, MptForCausalLM
t = time.perf_counter()
cfg = MptConfig(d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, max_seq_len=2048,
                vocab_size=50432, no_bias=True)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    m = MptForCausalLM(cfg)
m.save_pretrained("/tmp/mpt-7b-random")
from transformers import PreTrainedTokenizerFast
tok = PreTrainedTokenizerFast(tokenizer_file=".devdata/gpt-neox-20b-tokenizer.json", eos_token="<|endoftext|>",
                              bos_token="<|endoftext|>", unk_token="<|endoftext|>")
tok.save_pretrained("/tmp/mpt-7b-random")
print(f"random-init MPT-7B saved in {time.perf_counter() - t:.0f}s", flush=True)
PY
mkdir -p $OUT/runs
python sft/train_mpt_guanaco.py --model=/tmp/mpt-7b-random \
  --data=.devdata/guanaco-1k.jsonl --eval_size=50 --epochs=2 --micro_batch=4 --grad_accum=4 \
  --grad_checkpointing=false --lr=1e-4 --warmup_steps=4 --eval_every=6 --save_every=0 --save_final=false \
  --num_samples=0 --progress=false --out_dir=$OUT/runs \
  2>&1 | grep -v -i "warn" | tee $OUT/train.log
echo "rc=$?"
rm -rf $OUT/runs/*/tb $OUT/runs/*/checkpoints
ls -la $OUT/runs/*
