# nvidia-h200 (one H200), 2026-12-02 07:38-07:44 UTC, torch 2.11.0+cu130, transformers 5.17.0, torchao 0.18.0
# (wheel carried in .whl/), the tree of commit "merge issue17"; .devdata/ holds copies of
# ../shared/data/guanaco-1k.jsonl and gpt-neox-20b-tokenizer.json.
# 1) loss parity: the same 411.6M Llama shape (random:llama-400m), same seed, 300 steps, bf16 vs --fp8=tensorwise
#    (the two runs share the GPU at the same time; their tokens/s mean nothing)
# 2) throughput: the recipes with and without --fp8, one after the other in the same call
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
P="--model=random:llama-400m --tokenizer=.devdata/gpt-neox-20b-tokenizer.json --data=.devdata/guanaco-1k.jsonl --template=chatml --max_len=1024 --micro_batch=2 --grad_accum=1 --max_steps=300 --lr=3e-4 --warmup_steps=30 --eval_every=50 --eval_size=100 --eval_prompts=0 --num_samples=0 --save_final=false --save_every=0 --progress=false --out_dir=/tmp/par"
python3 sft/train_llama_guanaco.py $P --run_name=bf16 >/tmp/par_bf16.log 2>&1 &
SFT_CACHE=/tmp/sftc2 python3 sft/train_llama_guanaco.py $P --run_name=fp8 --fp8=tensorwise >/tmp/par_fp8.log 2>&1; wait
python3 benchmarks/fp8_parity.py /tmp/par/bf16 /tmp/par/fp8 --png $OUT/fp8_parity.png
python3 benchmarks/train_throughput.py --data-dir .devdata --out-dir /tmp/bench --steps 6 --timeout 120 --configs llama,llama_fp8,mpt,mpt_fp8,llama_fp8row
