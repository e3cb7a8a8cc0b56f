"""Render a ``Conversation`` through a chat template into ``Sample(input_ids, labels)``.

Contract of ``render`` (see CONTRACTS.md, "Sample"):

- ``input_ids`` are the tokens of ``tokenizer.apply_chat_template(conversation, tokenize=False)``
  (transformers' sandboxed jinja, for the tokenizer's own template and for ours alike), tokenized
  once with ``add_special_tokens=False``; a BOS is prepended only when the tokenizer adds one by
  default and the rendered text does not already start with it: exactly one BOS where the model uses one.
- ``labels[i] == input_ids[i]`` for the tokens of each assistant reply plus the end-of-turn marker that
  closes it (what teaches the model to stop); ``IGNORE_INDEX`` elsewhere. Labels never depend on the
  pad id, so a tokenizer whose pad equals its EOS still has its EOS labels supervised.

How the mask is derived (from the rendered structure, never by searching for marker token ids): for
assistant message ``i`` we render ``P = messages[:i]`` with the generation prompt and
``F = messages[:i+1]`` without; ``F`` must extend ``P`` and the whole conversation must extend ``F``
(a prefix-stable template). The characters ``F[len(P):]`` minus trailing whitespace are the reply and
its end-of-turn marker. Characters map to tokens with the fast tokenizer's offsets: token ``j`` covers
the characters from the end of token ``j-1`` to its own end (so leading spaces, which byte-level BPE
offsets trim, belong to the token that carries them); a token is supervised iff that range overlaps
a reply span.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from sft.data.schema import IGNORE_INDEX, ROLES, Conversation, DataError

# ChatML (SmolLM2, MPT-chat, Qwen...). Turn end: "<|im_end|>".
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# OpenAssistant Guanaco style, as in timdettmers/openassistant-guanaco, plus an EOS after each reply
# so that the model learns to stop (the raw data has none). The generation prompt ends with the colon:
# the space before the reply then belongs to the reply's first token, as in training.
GUANACO = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System: ' + message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '### Human: ' + message['content'] }}"
    "{% else %}{{ '### Assistant: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)
TEMPLATES: dict[str, str] = {"chatml": CHATML, "guanaco": GUANACO}

_PROBE_Q, _PROBE_A = "PROBE_QUESTION_7Q", "PROBE_ANSWER_7A"


@dataclass
class Sample:
    """One rendered conversation: ``input_ids`` and ``labels`` (same length; ``IGNORE_INDEX`` = not trained)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class TemplateError(ValueError):
    """The template cannot be used for masked training (no template, not prefix-stable, or jinja refused
    or failed to render it: syntax, undefined names, sandbox violations)."""


def resolve_template(tokenizer, template: str | None) -> str:
    """Jinja source: ``None`` -> the tokenizer's own (error if it has none); a name -> ``TEMPLATES``; else jinja."""
    if template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one is the chat template
            own = own.get("default")
        if not own:
            raise TemplateError(f"the tokenizer has no chat template; name one of {sorted(TEMPLATES)}")
        return own
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{{" in template or "{%" in template:
        return template
    raise TemplateError(
        f"unknown template {template!r}; expected one of {sorted(TEMPLATES)} or a jinja string"
    )


def attach_template(tokenizer, template: str | None) -> None:
    """Set ``tokenizer.chat_template`` to the training template, so ``save_pretrained`` carries it."""
    tokenizer.chat_template = resolve_template(tokenizer, template)


def _apply(tokenizer, convs: Sequence[Conversation], tmpl: str, gen: bool) -> list[str]:
    if not convs:
        return []
    import jinja2

    try:
        # transformers renders in jinja's ImmutableSandboxedEnvironment: a template cannot reach Python
        # internals ('' .__class__, list.append ...); such an attempt raises SecurityError, reported here
        out = tokenizer.apply_chat_template(
            [list(c) for c in convs], chat_template=tmpl, tokenize=False, add_generation_prompt=gen
        )
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template refused or failed ({type(e).__name__}: {e})") from None
    return list(out)


def bos_to_add(tokenizer) -> int | None:
    """The BOS id the tokenizer adds by default (the model expects one), else ``None``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if with_special and with_special[0] == bos else None


def _spans(
    convs: Sequence[Conversation], tokenizer, tmpl: str
) -> tuple[list[str], list[list[tuple[int, int, int]]]]:
    """Full texts and, per conversation, ``(start, end, turn_end)`` char spans of each assistant reply.

    ``end`` excludes trailing whitespace after the end-of-turn marker; ``turn_end = len(F)`` is where a
    conversation may be cut after that reply.
    """
    fulls = _apply(tokenizer, convs, tmpl, gen=False)
    jobs = [(k, i) for k, c in enumerate(convs) for i, m in enumerate(c) if m["role"] == "assistant"]
    prompts = _apply(tokenizer, [convs[k][:i] for k, i in jobs], tmpl, gen=True)
    # the conversation closed after its last message is the full text: render only the earlier ones
    inner = [j for j, (k, i) in enumerate(jobs) if i + 1 < len(convs[k])]
    closed_inner = _apply(tokenizer, [convs[jobs[j][0]][: jobs[j][1] + 1] for j in inner], tmpl, gen=False)
    closed = [fulls[k] for k, _ in jobs]
    for j, f in zip(inner, closed_inner):
        closed[j] = f
    spans: list[list[tuple[int, int, int]]] = [[] for _ in convs]
    for (k, i), p, f in zip(jobs, prompts, closed):
        if not (f.startswith(p) and fulls[k].startswith(f)):
            raise TemplateError(
                f"template is not prefix-stable at message {i}: rendering a prefix of the conversation does not "
                "give a prefix of the rendered text, so reply spans cannot be located"
            )
        start = len(p)
        end = start + len(f[start:].rstrip())
        spans[k].append((start, end, len(f)))
    return fulls, spans


def _labels_from_offsets(ids: list[int], offsets, spans) -> tuple[list[int], list[int]]:
    """Labels for ``ids`` given char ``spans``; also the token count up to each span's ``turn_end``."""
    n = len(ids)
    ends = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * n)[1::2]
    starts = np.empty_like(ends)
    if n:
        starts[0] = 0
        starts[1:] = ends[:-1]
    sup = np.zeros(n, dtype=bool)
    cuts = []
    for a, b, t in spans:
        sup |= (starts < b) & (ends > a)
        # tokens that end at or before the turn end: the sample cut after this reply
        cuts.append(int(np.searchsorted(ends, t, side="right")))
    ids_arr = np.asarray(ids, dtype=np.int64)
    labels = np.where(sup, ids_arr, IGNORE_INDEX).tolist()
    return labels, cuts


def _encode(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and char offsets of ``texts`` without special tokens, from the Rust tokenizer directly
    (the transformers wrapper's per-encoding conversion costs more than the tokenization itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TemplateError("masking needs a fast tokenizer (character offsets); got a slow one")
    return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]


# With ``max_len``, a text of more than this many characters per token of ``max_len`` is tokenized by
# prefixes first (:func:`_encode_bounded`): a normal row never is (about 4 characters per token).
PROBE_CHARS_PER_TOKEN = 8
# Tokens ending within this many characters of a probe's cut are not trusted: tokenizers are local (a
# token depends on its own pre-token piece), but the piece that the cut splits may tokenize differently.
PROBE_MARGIN = 1024


def _cut_point(text: str, n: int) -> int:
    """A position at most ``n`` where ``text[:pos]`` ends before a run of white space (so the last piece
    is whole for whitespace-splitting pre-tokenizers); ``n`` when there is none in ``text[n // 2 : n]``."""
    j = max(text.rfind(" ", n // 2, n), text.rfind("\n", n // 2, n))
    if j <= 0:
        return n
    while j > n // 2 and text[j - 1].isspace():
        j -= 1
    return j


def _encode_bounded(
    tokenizer, texts: list[str], max_len: int | None
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """:func:`_encode`, except that a text that certainly has more than ``max_len`` tokens is not tokenized
    whole: only a prefix of it, enough to show that (so one 50 MB row costs what a normal row costs).

    A text of at most ``PROBE_CHARS_PER_TOKEN * max_len`` characters is tokenized whole (batched). A longer
    one is tokenized by growing prefixes (cut before white space, x4 each time): as soon as the tokens that
    end more than ``PROBE_MARGIN`` characters before a prefix's cut are more than ``max_len``, those tokens
    alone are returned (exact: the same ids and offsets as the whole text's first tokens); if no prefix
    shows it, the whole text is tokenized. ``max_len=None``: every text whole.
    """
    if max_len is None:
        return _encode(tokenizer, texts)
    limit = PROBE_CHARS_PER_TOKEN * max_len
    small = [i for i, t in enumerate(texts) if len(t) <= limit]
    out: list = [None] * len(texts)
    for i, enc in zip(small, _encode(tokenizer, [texts[i] for i in small])):
        out[i] = enc
    for i, text in enumerate(texts):
        if out[i] is not None:
            continue
        n = limit
        while n < len(text):
            cut = _cut_point(text, n)
            ids, offsets = _encode(tokenizer, [text[:cut]])[0]
            ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=len(offsets))
            late = np.flatnonzero(ends > cut - PROBE_MARGIN)
            trusted = int(late[0]) if len(late) else len(ids)
            if trusted > max_len:
                out[i] = (list(ids[:trusted]), list(offsets[:trusted]))
                break
            n *= 4
        else:
            out[i] = _encode(tokenizer, [text])[0]
    return out


def check_messages(conv, index: int | None = None) -> None:
    """Raise ``DataError`` unless ``conv`` is a list of ``{"role": one of ROLES, "content": str}`` whose
    texts UTF-8 can encode: what the templates and the tokenizer need. (The full canonical rules, such as
    a final assistant turn, are ``sft.data.formats.validate_conversation``'s; render only needs the shape.)"""
    where = "" if index is None else f"conversation {index}: "
    if not isinstance(conv, list | tuple):
        raise DataError(f"{where}expected a list of messages, got {type(conv).__name__}")
    for i, m in enumerate(conv):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}expected an object, got {type(m).__name__}", field=f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{where}role must be one of {ROLES}, got {role!r}", field=f"messages[{i}].role")
        if not isinstance(content, str):
            got = "missing" if "content" not in m else type(content).__name__
            raise DataError(f"{where}expected a string, got {got}", field=f"messages[{i}].content")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                f"{where}text is not valid Unicode (lone surrogate)", field=f"messages[{i}].content"
            ) from None


def render_batch(
    conversations: Sequence[Conversation],
    tokenizer,
    template: str | None = None,
    *,
    max_len: int | None = None,
) -> tuple[list[Sample], list[list[int]]]:
    """``render`` for many conversations at once (batched jinja and tokenization: fast).

    Also returns, per sample, the token counts at which it can be cut after each assistant reply
    (including a prepended BOS), ascending; used to cut over-long conversations at a turn boundary.
    Raises ``DataError`` for a conversation that is not a list of role/content messages
    (:func:`check_messages`), ``TemplateError`` for a template that cannot be masked.

    ``max_len`` (data preparation): a conversation that certainly renders to more than ``max_len`` tokens
    is not tokenized whole (:func:`_encode_bounded`). Its sample then holds only its first tokens (more
    than ``max_len`` of them, labelled as usual) and its cut counts past those are reported as the
    sample's length: the caller's ``len(sample) > max_len`` and ``cut <= max_len`` tests give the same
    answers as for the whole sample, so it is cut or dropped exactly as before, at a fraction of the cost.
    """
    for k, conv in enumerate(conversations):
        check_messages(conv, k if len(conversations) > 1 else None)
    tmpl = resolve_template(tokenizer, template)
    fulls, spans = _spans(conversations, tokenizer, tmpl)
    if not fulls:
        return [], []
    bos = bos_to_add(tokenizer)
    samples, cuts_all = [], []
    for (ids, offsets), sp in zip(_encode_bounded(tokenizer, fulls, max_len), spans):
        labels, cuts = _labels_from_offsets(ids, offsets, sp)
        if bos is not None and (not ids or ids[0] != bos):
            ids, labels, cuts = [bos, *ids], [IGNORE_INDEX, *labels], [c + 1 for c in cuts]
        samples.append(Sample(list(ids), labels))
        cuts_all.append(cuts)
    return samples, cuts_all


def render(conversation: Conversation, tokenizer, template: str | None = None) -> Sample:
    """One conversation -> ``Sample`` (see the module docstring for the exact contract)."""
    return render_batch([conversation], tokenizer, template)[0][0]


def render_prompt(conversation: Conversation, tokenizer, template: str | None = None) -> list[int]:
    """Conversation ending in a user turn -> ids ending with the generation prompt (inference).

    Same template, same BOS rule and same tokenization as training, so the ids equal the training
    ids of that conversation up to where the reply starts.
    """
    tmpl = resolve_template(tokenizer, template)
    text = _apply(tokenizer, [conversation], tmpl, gen=True)[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = bos_to_add(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return list(ids)


def end_of_turn_text(tokenizer, template: str | None = None) -> str:
    """The text the template puts after an assistant reply (whitespace-stripped), e.g. ``<|im_end|>``."""
    tmpl = resolve_template(tokenizer, template)
    conv = [{"role": "user", "content": _PROBE_Q}, {"role": "assistant", "content": _PROBE_A}]
    _, spans = _spans([conv], tokenizer, tmpl)
    full = _apply(tokenizer, [conv], tmpl, gen=False)[0]
    start, end, _ = spans[0][0]
    seg = full[start:end]
    return seg[seg.rfind(_PROBE_A) + len(_PROBE_A) :].strip()


def stop_token_ids(tokenizer, template: str | None = None) -> list[int]:
    """EOS and the template's end-of-turn token, when that marker is a single token of this tokenizer.

    A marker that this tokenizer splits into several tokens (ChatML on GPT-NeoX) has no stop id; decode
    with ``end_of_turn_text`` as a stop string then, or use a template whose turns end with EOS.
    """
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    marker = end_of_turn_text(tokenizer, template)
    if marker:
        marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(marker_ids) == 1 and marker_ids[0] not in ids:
            ids.append(marker_ids[0])
    return ids
