# nvidia-h100-x1 (one H100 80GB HBM3), 2026-12-07, torch 2.11.0+cu130, transformers 5.17.0, trl 1.16.0, liger-kernel 0.8.5
# (wheels in .whl, data in .devdata: ../shared/data/guanaco-1k.jsonl and the GPT-NeoX tokenizer); carry [".devdata", ".whl"]
# 22:52-22:58 UTC, the tree of 5d1656e plus the script's h100a/h100b parts as committed in 3f4fb98:
bash benchmarks/device_80gb.sh h100a   # log_h100a.txt: llama, llama_fp8, mpt (train_throughput.json), TRL (peers_trl.json), optim_step.json
# 22:59-23:03 UTC, same warm machine:
bash benchmarks/device_80gb.sh h100b   # log_h100b.txt: the new GPU tests (5 failed, killed at 150 s), qwen14b (out of memory at step 2: runs/qwen14b_oom), llama76_full
# 23:33-23:38 UTC, a fresh H100 (asked for nvidia-h200, given nvidia-h100-x1), the tree of 7010870 (staging slots given back after each step):
TESTS_S=180 QWEN=qwen14b76 QWEN_S=150 bash benchmarks/device_80gb.sh h100e   # log_h100e.txt, gpu_tests_h100e.txt (4 failed, 14 passed), runs/qwen14b76
