"""Shared fixtures: tiny random models of each supported family, and the embedded default model."""

from __future__ import annotations

import glob
import os

# Triton picks interpreter or compiler when it is first imported, and importing the model code imports
# it: without a GPU the kernel tests run under the interpreter, so choose it before anything else loads.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig, Phi3Config,
                          Qwen2Config, Qwen3Config)

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)
GEMMA3 = dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"])
"""Gemma 3's layout in small: sliding layers around a global one, a window of 16 that tests pass many times."""


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    """A randomly initialised model of ``family`` small enough to run many steps in a test."""
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config,
           "phi3": Phi3Config, "gemma": GemmaConfig, "gemma3": Gemma3TextConfig}[family]
    extra = {"sliding_window": None} if family == "mistral" else {"pad_token_id": 0, "eos_token_id": 1}
    if family == "gemma3":
        extra |= GEMMA3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**{**TINY, **extra, **overrides}), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (downloaded and converted once, cached under HCMEMORY_HOME), the same
    objects the integrations' engines use."""
    from hcmemory.models import shared_model

    model, tokenizer = shared_model()
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the whole run (``postgres_server.py``).  One that cannot start fails the
    test with the reason and the server's log: a database test that silently skipped would prove nothing."""
    from .postgres_server import PostgresServer

    server = PostgresServer()
    try:
        server.start()
    except Exception as exc:  # initdb/pg_ctl missing or failing: the message carries their output
        server.remove()
        pytest.fail(f"the test PostgreSQL server could not start: {exc}", pytrace=False)
    yield server
    server.remove()
