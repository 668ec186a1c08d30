"""How documents, questions and turns are framed in the model's chat format.

A small model answers from a document only when the document sits inside the user's turn, right
before the question (it ignores raw text that precedes a fresh turn).  So appended documents open
a user turn and stay in it; a question then only has to close that turn and open the assistant's,
which keeps the per-question overlay to a few tokens.  The pieces are cut out of the tokenizer's
own template around marker strings, so any chat template works without special cases.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

_M1, _M2, _M3 = "\x00hc-user-1\x00", "\x00hc-assistant\x00", "\x00hc-user-2\x00"


@dataclass(frozen=True)
class ChatFormat:
    """Template pieces: ``first_open`` (system prompt and the first user opening), ``next_open``
    (what follows a finished answer to open another user turn) and ``close`` (end of a user turn
    and opening of the assistant's)."""

    first_open: str
    next_open: str
    close: str

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "ChatFormat":
        if not tokenizer.chat_template:
            return cls(first_open="", next_open="\n\n", close="\nAnswer:")
        one = tokenizer.apply_chat_template([{"role": "user", "content": _M1}], tokenize=False,
                                            add_generation_prompt=True)
        two = tokenizer.apply_chat_template(
            [{"role": "user", "content": _M1}, {"role": "assistant", "content": _M2},
             {"role": "user", "content": _M3}], tokenize=False, add_generation_prompt=True)
        first_open, close = one.split(_M1)
        next_open = two[two.index(_M2) + len(_M2): two.index(_M3)]
        return cls(first_open=first_open, next_open=next_open, close=close)

    def open_turn(self, empty: bool, after_eos: str | None = None) -> str:
        """Text that opens a user turn: the first one of a context, or one after an answer that
        already ended with ``after_eos`` (which is then not repeated)."""
        if empty:
            return self.first_open
        if after_eos and self.next_open.startswith(after_eos):
            return self.next_open[len(after_eos):]
        return self.next_open
