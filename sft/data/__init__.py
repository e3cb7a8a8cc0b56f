"""The data wing: source -> conversation -> rendered sample -> packed micro-batches. Imports only sft.config."""
