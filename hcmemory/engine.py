"""Engine: one model and one ``ContextPool`` behind stateless callers (the LangChain, LlamaIndex and
LangGraph integrations).

Frameworks send whole prompts every call; the engine turns them into token ids the same way every
time (the tokenizer's chat template for messages, one user turn for a plain prompt) so that the
pool's prefix matching finds what a live context already holds, and only the new suffix is
prefilled.  Engines are shared per (model, config, store, memory cap): every framework object in
the process that names the same ones talks to the same memory, and weights load once per model
(``models.shared_model``), lazily, on the first call.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

from .config import HCConfig, coerce_config
from .decoding import Generation
from .models import shared_model
from .pool import ContextPool
from .stores import ContextStore

DEFAULT_PRESET = "hc-12.5"
DEFAULT_MAX_HOST_BYTES = 8 * 2**30


class Engine:
    def __init__(self, model: str | None = None, config: HCConfig | str | dict | None = DEFAULT_PRESET,
                 store: str | os.PathLike[str] | None = None, max_host_bytes: int = DEFAULT_MAX_HOST_BYTES) -> None:
        self.model_path = model
        self.model, self.tokenizer = shared_model(model)
        self.store = None if store is None else ContextStore(store)
        self.pool = ContextPool(self.model, self.tokenizer, self.store, max_host_bytes, config)

    @property
    def window(self) -> int | None:
        """The model's context window (``max_position_embeddings``)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt_ids(self, prompt: str, chat_template: bool = True) -> list[int]:
        """A plain prompt as one user turn of the chat template (or verbatim without it)."""
        if not isinstance(prompt, str):
            raise TypeError(f"the prompt must be a string, not {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if chat_template and self.tokenizer.chat_template:
            return self.message_ids([{"role": "user", "content": prompt}])
        return self.text_ids(prompt)

    def message_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """A conversation rendered with the tokenizer's own chat template, ready for the assistant's turn."""
        if not messages:
            raise ValueError("there are no messages to answer")
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return self.text_ids(text)

    def generate(self, token_ids: Sequence[int], context_id: str | None = None, **sampling: Any) -> Generation:
        """See ``ContextPool.generate``."""
        return self.pool.generate(token_ids, context_id, **sampling)


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def shared_engine(model: str | None = None, config: HCConfig | str | dict | None = DEFAULT_PRESET,
                  store: str | os.PathLike[str] | None = None,
                  max_host_bytes: int = DEFAULT_MAX_HOST_BYTES) -> Engine:
    """The process's engine for these settings, created on first use."""
    key = json.dumps([model, coerce_config(config).to_dict(), None if store is None else os.path.abspath(store),
                      max_host_bytes], sort_keys=True, default=str)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = Engine(model, config, store, max_host_bytes)
        return _engines[key]
