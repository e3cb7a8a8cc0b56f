"""The training wing: the trainer's phases, the one engine step, the memory plan, optimizers, FSDP2, run folders.

Imports sft.config, sft.data and sft.model; never the tools or recipes above it."""
