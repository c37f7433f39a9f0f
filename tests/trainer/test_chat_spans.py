"""Chat loss masks in linear time: ``chat_spans_linear`` (a constant number of renders per
conversation) gives the same input ids and labels as the per-prefix method it replaces
(kept below, verbatim, as the oracle) on the tests' templates and on ChatML, Llama-3,
Gemma, Mistral, Phi-3 and Qwen3-like ones, over many conversations of 1-40 turns; templates
outside its model fall back to the old method, errors included."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from orchestrator.trainer import data
from orchestrator.trainer.data import (
    IGNORE,
    ConfigError,
    DataError,
    chat_spans_linear,
    render_chat,
    tokenize,
)
from tests.trainer import helpers

pytestmark = pytest.mark.trainer

TEMPLATES = {
    "tests": helpers.CHAT_TEMPLATE,
    "hashes": ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
               "{% if add_generation_prompt %}### assistant: {% endif %}"),
    "chatml": (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    "llama3": (  # Meta-Llama-3-8B-Instruct's template
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"),
    "gemma": (  # Gemma-3's template, images left out
        "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
        "{%- set loop_messages = messages[1:] -%}{%- else -%}"
        "{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate "
        "user/assistant/user/assistant/...') }}"
        "{%- endif -%}{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
        "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
        "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"),
    "mistral": (  # no generation prompt: the answer follows [/INST] directly
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% else %}{{ message['content'] + '\\n' }}{% endif %}"
        "{% endfor %}"),
    "phi3_last_eos": (  # the last assistant turn alone gets EOS: prefixes are not prefixes
        "{% for message in messages %}{{'<|' + message['role'] + '|>\\n' + message['content'] + "
        "'<|end|>\\n'}}{% if loop.last and message['role'] == 'assistant' %}{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"),
    "qwen3_drops_reasoning": (  # earlier turns lose their reasoning
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\\n' + m['content'].split('</think>')[-1] + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}
# Templates inside the linear method's model (for plain conversations).
LINEAR = ("tests", "hashes", "chatml", "llama3", "gemma", "mistral", "qwen3_drops_reasoning")
WORDS = ["the", "cat", "is", "black", "user", "assistant", "sky", "<|end|>", "blue", "x\ny",
         "green", "?", "sea", "###", "model"]


def oracle(messages: list[dict[str, str]], tokenizer: Any) -> dict[str, list[int]]:
    """The per-prefix method as it was before the linear one (data.py before issue #13)."""
    full = render_chat(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], gen=True) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1])
        if full.startswith(before) and full.startswith(upto) and len(upto) > len(before):
            spans.append((len(before), len(upto)))
        else:
            start = full.find(m["content"], cursor)
            if start < 0:
                raise ConfigError("cannot locate assistant turns in the chat template's "
                                  "output; use format instruction")
            spans.append((start, start + len(m["content"])))
        cursor = spans[-1][1]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    si = 0
    for t, (a, _b) in enumerate(enc["offset_mapping"]):
        while si < len(spans) and a >= spans[si][1]:
            si += 1
        if si < len(spans) and spans[si][0] <= a < spans[si][1]:
            labels[t] = ids[t]
    return {"input_ids": ids, "labels": labels}


def conversation(rng: random.Random, turns: int, *, system: bool, tool: bool = False,
                 blanks: bool = False) -> list[dict[str, str]]:
    def text() -> str:
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        return f" {s}\n" if blanks and rng.random() < 0.3 else s

    msgs = [{"role": "system", "content": text()}] if system else []
    for t in range(turns):
        msgs.append({"role": "user", "content": text()})
        if tool and t % 3 == 1:
            msgs += [{"role": "assistant", "content": text()},
                     {"role": "tool", "content": text()}]
        msgs.append({"role": "assistant", "content": text()})
    return msgs


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _outcome(fn: Any) -> Any:
    try:
        return fn()
    except (ConfigError, DataError) as exc:
        return type(exc).__name__


def _new(msgs: list[dict[str, str]], tok: Any) -> Any:
    return tokenize([msgs], "chat", tok, "d.jsonl", [1])[0]


def _old(msgs: list[dict[str, str]], tok: Any) -> Any:
    try:
        return oracle(msgs, tok)
    except ConfigError:
        raise
    except Exception as exc:  # as _tokenize_chat wraps template errors
        raise DataError(str(exc), file="d.jsonl") from None


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_same_ids_and_labels_as_the_per_prefix_method(tok: Any, name: str) -> None:
    tok.chat_template = TEMPLATES[name]
    rng = random.Random(name)
    cases = []
    for turns in (1, 2, 3, 5, 8, 17, 40):
        for system in (False, True):
            cases.append(conversation(rng, turns, system=system))
            cases.append(conversation(rng, turns, system=system, tool=True))
            cases.append(conversation(rng, turns, system=system, blanks=True))
    cases.append([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"},
                  {"role": "assistant", "content": "a"}, {"role": "user", "content": "y"},
                  {"role": "assistant", "content": ""}, {"role": "user", "content": "z"},
                  {"role": "assistant", "content": "b"}])
    cases.append([*conversation(rng, 6, system=False), {"role": "user", "content": "end"}])
    linear = 0
    for msgs in cases:
        got = _outcome(lambda msgs=msgs: _new(msgs, tok))
        want = _outcome(lambda msgs=msgs: _old(msgs, tok))
        assert got == want, (name, msgs)
        if isinstance(want, dict):
            assert any(lab != IGNORE for lab in got["labels"])
            try:
                full = render_chat(tok, msgs)
            except Exception:
                continue
            linear += chat_spans_linear(msgs, tok, full) is not None
    if name in LINEAR:
        assert linear >= len(cases) // 3, linear  # the fast path, not just the fallback
    else:  # outside the model: a long conversation takes the old method (content search)
        msgs = conversation(rng, 12, system=False)
        assert chat_spans_linear(msgs, tok, render_chat(tok, msgs)) is None


def test_template_rewriting_history_keeps_its_error(tok: Any) -> None:
    tok.chat_template = TEMPLATES["qwen3_drops_reasoning"]
    msgs = []
    for t in range(4):
        msgs += [{"role": "user", "content": f"q{t}"},
                 {"role": "assistant", "content": f"<think>hmm {t}</think>a{t}"}]
    with pytest.raises(ConfigError, match="cannot locate assistant turns"):
        _new(msgs, tok)
    with pytest.raises(ConfigError, match="cannot locate assistant turns"):
        oracle(msgs, tok)


def test_a_rejected_conversation_names_the_record(tok: Any) -> None:
    tok.chat_template = TEMPLATES["gemma"]
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
            *conversation(random.Random(0), 4, system=False)]
    with pytest.raises(DataError, match="line 1: the chat template rejected the messages: "
                                        "Conversation roles must alternate"):
        _new(msgs, tok)


@pytest.mark.parametrize("name", LINEAR)
def test_renders_per_conversation_do_not_grow_with_turns(tok: Any, name: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear time, counted rather than timed: the renders per conversation stay constant
    (each is linear in the conversation) while the old method's grow with the turns."""
    tok.chat_template = TEMPLATES[name]
    calls: list[int] = []
    real = data.render_chat

    def counting(tokenizer: Any, messages: list[dict[str, str]], gen: bool = False) -> str:
        calls.append(len(messages))
        return real(tokenizer, messages, gen)

    monkeypatch.setattr(data, "render_chat", counting)
    for turns in (4, 16, 64):
        calls.clear()
        msgs = conversation(random.Random(turns), turns, system=True)
        _new(msgs, tok)
        assert len(calls) <= 8, (turns, calls)
        assert sum(calls) <= 8 * len(msgs)
