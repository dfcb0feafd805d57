"""Chat-template rendering: training rows as conversations,
and decode-time prompts in the same form.

An instruct model was tuned on text its tokenizer's chat template wrote
(`<|im_start|>user ... <|im_end|>`); converting it on raw `prompt + response` text teaches it a
format it never saw. Training renders each row as a conversation and marks only the assistant turns
(with their end token) eligible for noise and loss; decoding renders a prompt as one user turn
followed by the generation prompt, so the model continues where an assistant turn starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from dlm.settings import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]


@dataclass(frozen=True)
class ChatFormat:
    """A chat template (Jinja text) and the system turn to render with it
    (None: the template's default)."""

    template: str
    system_prompt: str | None = None

    def messages(self, user: str) -> list[Message]:
        system = ([] if self.system_prompt is None
                  else [{"role": "system", "content": self.system_prompt}])
        return system + [{"role": "user", "content": user}]

    def prompt(self, tokenizer: PreTrainedTokenizerBase, user: str) -> str:
        """`user` as one user turn, then the template's generation prompt
        (where the assistant's turn starts)."""
        return self.render(tokenizer, self.messages(user), generation_prompt=True)

    def render(self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *,
               generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(list(messages), chat_template=self.template,
                                             tokenize=False,
                                             add_generation_prompt=generation_prompt)


def chat_format_of(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None, *,
                   key: str = "data.chat_template") -> ChatFormat:
    """The tokenizer's own template; one line naming `key` when it has none."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise ConfigError(f"{key}=true: the tokenizer ({type(tokenizer).__name__}, "
                          f"{getattr(tokenizer, 'name_or_path', '')!r}) has no chat template; "
                          "allowed: false")
    return ChatFormat(template, system_prompt)


def conversation_tokens(tokenizer: PreTrainedTokenizerBase, chat: ChatFormat,
                        messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """`(ids, eligible)` of a whole conversation; eligible = 1 on every assistant turn's tokens (its
    content and the template's end-of-turn text), 0 on system and user turns and on the generation
    prompt.

    The text is cut where each assistant turn starts and ends (the render of the conversation up
    to it, with and without the generation prompt), and each piece is tokenized alone, so the flags
    are exact.
    """
    pieces: list[tuple[str, int]] = []
    done = ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = chat.render(tokenizer, messages[:i], generation_prompt=True)
        end = chat.render(tokenizer, messages[: i + 1])
        if not (start.startswith(done) and end.startswith(start)):
            raise ConfigError("data.chat_template=true: this template does not render a "
                              "conversation as a prefix of its continuation, so assistant turns "
                              "cannot be located; allowed: false")
        pieces += [(start[len(done):], 0), (end[len(start):], 1)]
        done = end
    whole = chat.render(tokenizer, messages)
    pieces.append((whole[len(done):] if whole.startswith(done) else "", 0))
    ids: list[int] = []
    eligible: list[int] = []
    for text, flag in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        eligible += [flag] * len(piece)
    return ids, eligible


def as_messages(row: Any, *, key: str) -> list[Message]:
    """A `[{role, content}, ...]` cell checked:
    one line naming `key` when a row is not a conversation."""
    ok = isinstance(row, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                       for m in row)
    if not ok or not any(m["role"] == "assistant" for m in row):
        raise ConfigError(f"{key}: rows must be lists of {{role, content}} with at least one "
                          f"assistant turn; got {str(row)[:80]!r}")
    return [{"role": m["role"], "content": m["content"]} for m in row]
