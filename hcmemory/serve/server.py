"""The server's state: settings, the model and tokenizer, the model thread and the tenants' pools."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from ..config import HCConfig
from ..models import shared_model
from ..checkpoint import ContextState
from ..pool import ContextPool
from .checkpoints import Checkpointer
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
    replica_id: str | None = None
    """This replica's id under Ray Serve (sent back as ``x-replica-id``); None for the single server."""
    checkpointer: Checkpointer | None = None
    """Saves pinned conversations after each turn (``settings.checkpoint_each_turn``)."""
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def start(cls, settings: ServeSettings, replica_id: str | None = None) -> "Server":
        """Load the model (once per process) and set up the tenants; blocking, so call it in a thread."""
        model, tokenizer = shared_model(settings.model)
        config = HCConfig.from_spec(settings.preset)
        tenants = Tenants(model, tokenizer, config, settings.store, settings.max_host_bytes, settings.max_open_tenants)
        server = cls(settings, model, tokenizer, config, ModelWorker(settings.max_pending), tenants, replica_id)
        if settings.checkpoint_each_turn:
            server.checkpointer = Checkpointer(server._snapshot, server.worker.background)
        return server

    async def close(self) -> None:
        """End the checkpoint writer, let queued model calls finish, then save every live context."""
        if self.checkpointer is not None:
            await asyncio.to_thread(self.checkpointer.close)
        await self.worker.close(self.tenants.close)

    def _snapshot(self, tenant: str, context_id: str) -> tuple[ContextPool, ContextState, int] | None:
        """On the model thread: a copy of a live context's state, and the version it continues, for the
        checkpoint writer."""
        pool = self.tenants.live_pool(tenant)
        if pool is None or pool.store is None or context_id not in pool.live_ids:
            return None  # spilled (and saved by the spill), deleted, or its tenant closed (saving it)
        return pool, pool.get(context_id).to_state(), pool.version(context_id)

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
