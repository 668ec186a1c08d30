"""hcmemory: a long-lived, compressed LLM memory built on HCAttention.

The public face: ``load_model`` gives a model and tokenizer (the embedded SmolLM2 by default),
``HCConfig`` says how the KV state is stored, ``HCCache`` is that state as a transformers cache,
``HCContext`` is one conversation's live memory, ``ContextStore`` / ``ContextPool`` keep many of
them on disk and in memory.
"""

import logging

from .cache import CacheStats, HCCache
from .config import HCConfig
from .context import ContextStats, HCContext
from .models import load_model, model_fingerprint, tokenizer_fingerprint
from .store import CheckpointError, CheckpointNotFoundError, ContextPool, ContextStore

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["CacheStats", "CheckpointError", "CheckpointNotFoundError", "ContextPool", "ContextStats", "ContextStore",
           "HCCache", "HCConfig", "HCContext", "load_model", "model_fingerprint", "tokenizer_fingerprint"]
