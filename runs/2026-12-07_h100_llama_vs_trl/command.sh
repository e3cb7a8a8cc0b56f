# nvidia-h100-x1 (one H100 80GB HBM3), 2026-12-07 19:37-19:41 UTC, torch 2.11.0+cu130, transformers 5.17.0, trl 1.16.0,
# liger-kernel 0.8.5 (wheels in .whl, data in .devdata: ../shared/data/guanaco-1k.jsonl and the GPT-NeoX tokenizer);
# the tree of commit 8c352a9
set -o pipefail; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 benchmarks/train_throughput.py --data-dir .devdata --out-dir $OUT/bench --configs llama --steps 6 --timeout 118
python3 benchmarks/peers.py --data=.devdata/guanaco-1k.jsonl --tokenizer=.devdata/gpt-neox-20b-tokenizer.json --steps=6 \
    --warmup_steps=0 --out=$OUT/peers_trl.json --compare=$OUT/bench/train_throughput.json --compare_config=llama
# then, on the same warm machine:
python3 -m pytest -q -x -m gpu tests/test_optim.py                      # 7 passed
PYTHONPATH=/tmp/site python3 -m pytest -q -m gpu tests/test_generate.py::test_trainer_sampling_returns_cuda_memory_to_its_level \
    tests/test_lora.py::test_qlora_nf4_on_cuda_bf16                   # 2 passed
