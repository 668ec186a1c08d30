"""hcmemory: a long-lived, compressed LLM memory built on HCAttention.

The public face: ``load_model`` gives a model and tokenizer (the embedded SmolLM2 by default),
``HCConfig`` says how the KV state is stored, ``HCCache`` is that state as a transformers cache,
``HCContext`` is one conversation's live memory, ``ContextStore`` / ``ContextPool`` keep many of
them on disk and in memory.
"""

import logging

from .cache import CacheStats, HCCache
from .checkpoint import CheckpointError
from .config import HCConfig
from .context import ContextStats, HCContext
from .glue import cache_kwarg
from .guard import ContextBusyError
from .models import load_model, model_fingerprint, tokenizer_fingerprint
from .pool import ContextPool
from .store import CheckpointNotFoundError, ContextStore

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["CacheStats", "CheckpointError", "CheckpointNotFoundError", "ContextBusyError", "ContextPool",
           "ContextStats", "ContextStore", "HCCache", "HCConfig", "HCContext", "cache_kwarg", "load_model",
           "model_fingerprint", "tokenizer_fingerprint"]
