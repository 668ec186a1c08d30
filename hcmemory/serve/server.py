"""The server's state: settings, the model and tokenizer, the model thread and the tenants' pools."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from ..config import HCConfig
from ..models import shared_model
from .settings import ServeSettings
from .tenants import Tenants
from .worker import ModelWorker


@dataclass
class Server:
    settings: ServeSettings
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    config: HCConfig
    worker: ModelWorker
    tenants: Tenants
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def start(cls, settings: ServeSettings) -> "Server":
        """Load the model (once per process) and open the store directory; blocking, so call it in a thread."""
        model, tokenizer = shared_model(settings.model)
        config = HCConfig.from_spec(settings.preset)
        settings.store.mkdir(parents=True, exist_ok=True)
        tenants = Tenants(model, tokenizer, config, settings.store, settings.max_host_bytes, settings.max_open_tenants)
        return cls(settings, model, tokenizer, config, ModelWorker(settings.max_pending), tenants)

    @property
    def model_id(self) -> str:
        return self.settings.model_id

    @property
    def window(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """A conversation rendered by the tokenizer's own chat template, ready for the assistant's turn —
        the same rendering every time, which is what lets the next turn's prefix match this one's."""
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            raise ValueError(f"the model's chat template cannot render these messages: {exc}") from exc
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt_ids(self, prompt: str) -> list[int]:
        """A plain completion prompt, verbatim (no chat template), as OpenAI's completions endpoint reads it."""
        return self.tokenizer(prompt).input_ids
