#!/bin/bash
# One H100 80GB through the device tool, 2026-12-08 (UTC), commit e16a6c8's tree (the device's git log shows an
# older HEAD; the files are the working tree's). Carry: .devdata (guanaco-1k.jsonl, gpt-neox-20b-tokenizer.json from
# ../shared/data) and .whl (torchao 0.18.0, trl 1.16.0, liger-kernel 0.8.5, datasets 5.2.0, dill, multiprocess).
bash benchmarks/device_80gb.sh h100f   # 01:10-01:16: llama, llama_8bit, mpt, mpt_8bit; TRL 1.16 bf16 on the same tokens
TESTS_S=220 QWEN=qwen14b QWEN_S=165 bash benchmarks/device_80gb.sh h100e   # 01:20-01:24: the new modes' GPU tests, Qwen3-14B defaults
