"""sft: supervised fine-tuning of instruction-following LLMs.

Data flows one way:
source -> adapter -> Conversation -> render -> (input_ids, labels) -> packer -> model -> loss -> optimizer -> run folder.
"""
