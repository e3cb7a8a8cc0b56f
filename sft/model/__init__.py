"""The model wing: loading, our MPT, the head and loss, LoRA, FP8, decoding. Imports sft.config and sft.data."""
