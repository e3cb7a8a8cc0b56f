# nvidia-h200 (one H200), 2026-12-02 08:09-08:14 UTC, torch 2.11.0+cu130, transformers 5.17.0, the tree of commit
# "test: the benchmark driver's resolved settings include fp8"; .devdata/ holds copies of ../shared/data files.
# The two recipe runs were cut by the timeouts below before their final evaluation (the device time of the session
# was nearly spent): llama_recipe after step 9, mpt_recipe after step 10. Their metrics up to there are complete.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
R="--tokenizer=.devdata/gpt-neox-20b-tokenizer.json --data=.devdata/guanaco-1k.jsonl --eval_size=50 --max_steps=10 --eval_every=5 --num_samples=2 --samples_max_new_tokens=32 --eval_prompts=2 --save_final=false --progress=false --out_dir=$OUT/runs"
timeout -s KILL 120 python3 sft/train_llama_guanaco.py --model=random:llama-3-8b --template=chatml --run_name=llama_recipe $R
timeout -s KILL 95 python3 sft/train_mpt_guanaco.py --model=random:mpt-7b --run_name=mpt_recipe $R
python3 benchmarks/train_throughput.py --data-dir .devdata --out-dir /tmp/b32 --steps 4 --timeout 95 --configs llama32k
