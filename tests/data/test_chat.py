"""`dlm.data.chat`: conversations rendered by a real chat template, only assistant turns eligible; prompts rendered
as a user turn plus the generation prompt; one-line errors for a missing template or a malformed conversation."""

from __future__ import annotations

import copy

import pytest

from dlm.data.chat import ChatFormat, as_messages, chat_format_of, conversation_tokens
from dlm.data.sources import tokenize_rows
from dlm.settings import ConfigError, DataConfig

TEMPLATE = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")
"""ChatML's shape with the tiny tokenizer's EOS as the end-of-turn token."""


@pytest.fixture()
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def _flagged(tokenizer, ids: list[int], eligible: list[int], flag: int) -> str:
    return tokenizer.decode([i for i, e in zip(ids, eligible) if e == flag])


def test_only_assistant_turns_and_their_end_token_are_eligible(chat_tokenizer):
    chat = chat_format_of(chat_tokenizer, "Be brief.")
    messages = chat.messages("Tom has 3 cups.") + [{"role": "assistant", "content": "3 cups"}]
    ids, eligible = conversation_tokens(chat_tokenizer, chat, messages)
    eos = chat_tokenizer.eos_token
    assert _flagged(chat_tokenizer, ids, eligible, 1) == "3 cups" + eos
    assert _flagged(chat_tokenizer, ids, eligible, 0) == f"<system>Be brief.{eos}<user>Tom has 3 cups.{eos}<assistant>"
    assert chat_tokenizer.decode(ids) == chat.render(chat_tokenizer, messages)


def test_every_assistant_turn_of_a_conversation_is_eligible(chat_tokenizer):
    chat = chat_format_of(chat_tokenizer)
    turns = [("user", "1 + 1?"), ("assistant", "2"), ("user", "and 2 + 2?"), ("assistant", "4")]
    ids, eligible = conversation_tokens(chat_tokenizer, chat, [{"role": r, "content": c} for r, c in turns])
    eos = chat_tokenizer.eos_token
    assert _flagged(chat_tokenizer, ids, eligible, 1) == f"2{eos}4{eos}"


def test_prompt_rows_render_as_a_user_and_an_assistant_turn(chat_tokenizer):
    cfg = DataConfig(path="x.jsonl", prompt_field="q", response_field="a", chat_template=True, pad_to_block=True)
    out = tokenize_rows({"q": ["Tom has 3 cups."], "a": ["#### 3"]}, tokenizer=chat_tokenizer, cfg=cfg, block_size=4)
    ids, eligible = out["input_ids"][0], out["eligible"][0]
    assert len(ids) % 4 == 0 and ids.count(chat_tokenizer.eos_token_id) >= 2  # end of turns, then EOS padding
    text = chat_tokenizer.decode(ids)
    assert text.startswith("<user>Tom has 3 cups.") and "<assistant>#### 3" in text
    assert _flagged(chat_tokenizer, ids, eligible, 1).startswith("#### 3" + chat_tokenizer.eos_token)


def test_messages_field_reads_conversations(chat_tokenizer):
    cfg = DataConfig(path="x.jsonl", messages_field="messages")
    rows = {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]}
    out = tokenize_rows(rows, tokenizer=chat_tokenizer, cfg=cfg, block_size=4)
    assert _flagged(chat_tokenizer, out["input_ids"][0], out["eligible"][0], 1) == "hello" + chat_tokenizer.eos_token


def test_prompt_ends_where_the_assistant_turn_starts(chat_tokenizer):
    chat = ChatFormat(TEMPLATE, None)
    assert chat.prompt(chat_tokenizer, "hi") == f"<user>hi{chat_tokenizer.eos_token}<assistant>"


def test_tokenizer_without_a_template_fails_in_one_line(tokenizer):
    with pytest.raises(ConfigError, match=r"^data.chat_template=true: the tokenizer .* has no chat template"):
        chat_format_of(tokenizer)


@pytest.mark.parametrize("row", [[{"role": "user", "content": "hi"}], "hello", [{"content": "x"}]])
def test_a_row_that_is_no_conversation_fails_in_one_line(row):
    with pytest.raises(ConfigError, match=r"^data.messages_field='m': rows must be lists of \{role, content\}"):
        as_messages(row, key="data.messages_field='m'")
