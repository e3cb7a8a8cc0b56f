"""The chat command renders every turn exactly as training did, and answers."""

import io

import pytest
import torch

from sft.chat import ChatSession, main
from sft.data.render import render_prompt, stop_token_ids
from sft.model.generate import GenerateOutput


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only contend on the shared 2-core box
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def final_dir(tmp_path_factory):
    """A run-like final/ folder: tiny Llama + byte tokenizer carrying the guanaco training template."""
    from sft.data.render import attach_template
    from sft.model.models import byte_tokenizer, tiny_model

    tok = byte_tokenizer()
    attach_template(tok, "guanaco")
    model = tiny_model("tiny-llama", len(tok), seed=0, max_len=256)
    out = tmp_path_factory.mktemp("run") / "final"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_once_prints_the_answer_rendered_like_render_prompt(final_dir):
    out = io.StringIO()
    s = main([str(final_dir), "--once", "Hi there", "--max_new_tokens=6", "--device=cpu"], stdout=out)
    conv = [{"role": "user", "content": "Hi there"}]
    assert s.last_prompt_ids == render_prompt(conv, s.tokenizer, None)
    # The saved (training) template, not the tokenizer's ChatML default: byte ids of the exact text.
    assert s.tokenizer.decode(s.last_prompt_ids) == "### Human: Hi there### Assistant:"
    assert out.getvalue() == s.messages[-1]["content"] + "\n"
    assert [m["role"] for m in s.messages] == ["user", "assistant"]


def test_template_flag_overrides_the_saved_one(final_dir):
    s = main(
        [str(final_dir), "--once", "Hi", "--max_new_tokens=2", "--template=chatml"], stdout=io.StringIO()
    )
    assert s.tokenizer.decode(s.last_prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert s.last_prompt_ids == render_prompt([{"role": "user", "content": "Hi"}], s.tokenizer, "chatml")


def test_repl_keeps_the_conversation_and_resets(final_dir):
    stdin = io.StringIO("first question\n\nsecond one\n/reset\nthird\n/quit\nnever read\n")
    out = io.StringIO()
    s = main([str(final_dir), "--max_new_tokens=3", "--system=Be brief."], stdin=stdin, stdout=out)
    assert len(out.getvalue().splitlines()) == 3  # three answers, the blank line ignored
    # After /reset: system + third question + its answer.
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant"]
    assert s.messages[1]["content"] == "third"
    assert s.last_prompt_ids == render_prompt(s.messages[:2], s.tokenizer, None)


def test_second_turn_prompt_contains_the_first_exchange(final_dir):
    s = main([str(final_dir), "--once", "one", "--max_new_tokens=3"], stdout=io.StringIO())
    s.reply("two")
    assert s.last_prompt_ids == render_prompt(s.messages[:3], s.tokenizer, None)
    assert s.messages[0]["content"] == "one" and s.messages[2]["content"] == "two"


def test_reply_stops_at_end_of_turn_and_strips_it(final_dir, monkeypatch):
    from sft.model.models import byte_tokenizer, tiny_model

    tok = byte_tokenizer()
    model = tiny_model("tiny-llama", len(tok), seed=0, max_len=256).eval()
    s = ChatSession(model, tok, "chatml", max_new_tokens=16)
    assert (
        s.stop_ids == stop_token_ids(tok, "chatml") and tok.convert_tokens_to_ids("<|im_end|>") in s.stop_ids
    )
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    canned = tok(" Paris.", add_special_tokens=False)["input_ids"] + [eot]
    seen = {}

    def fake_generate(prompts, max_new_tokens, sampling, stop_ids):
        seen.update(prompts=prompts, stop_ids=list(stop_ids), max_new_tokens=max_new_tokens)
        return GenerateOutput([canned], ["stop"])

    monkeypatch.setattr(s.generator, "generate", fake_generate)
    assert s.reply("Capital of France?") == "Paris."
    assert seen["stop_ids"] == s.stop_ids and seen["prompts"] == [s.last_prompt_ids]
    assert s.messages[-1] == {"role": "assistant", "content": "Paris."}


def test_too_long_conversation_is_refused(final_dir):
    s = main([str(final_dir), "--once", "x", "--max_new_tokens=1", "--max_seq_len=40"], stdout=io.StringIO())
    with pytest.raises(ValueError, match="/reset"):
        s.reply("y" * 60)
