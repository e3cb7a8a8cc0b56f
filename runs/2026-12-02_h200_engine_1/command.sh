# nvidia-h200 (one H200), 2026-12-02 06:57-07:00 UTC, torch 2.11.0+cu130, transformers 5.17.0, commit b29286f's tree
# (uncommitted then); .devdata/ holds copies of ../shared/data/guanaco-1k.jsonl and gpt-neox-20b-tokenizer.json
set -o pipefail; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m pytest -q -x -m gpu tests/test_engine.py 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
python benchmarks/train_throughput.py --data-dir .devdata --out-dir $OUT/bench --configs mpt76,llama --steps 6 --timeout 190
