# nvidia-h200 (one H200, the same machine as ..._1, one call later), 2026-12-02 07:01-07:06 UTC, torch 2.11.0+cu130,
# transformers 5.17.0; the tree of commit b29286f
set -o pipefail; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python benchmarks/train_throughput.py --data-dir .devdata --out-dir $OUT/bench --configs mpt76_mb2,mpt,mpt_mb2,llama8k,llama32k --steps 6 --timeout 150
python benchmarks/recipe_2023.py --data-dir .devdata --out $OUT/recipe_2023.json --steps 8 --warmup 2
