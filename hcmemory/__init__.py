"""hcmemory: a long-lived, compressed LLM memory built on HCAttention.

The public face: ``load_model`` gives a model and tokenizer (the embedded SmolLM2 by default),
``HCConfig`` says how the KV state is stored, ``HCCache`` is that state as a transformers cache,
``HCContext`` is one conversation's live memory, ``ContextStore`` / ``ContextPool`` keep many of
them on disk and in memory.
"""

import logging

from . import folders

folders.install()

from .cache import CacheStats, HCCache  # noqa: E402
from .checkpoint import CheckpointError  # noqa: E402
from .config import HCConfig  # noqa: E402
from .context import ContextStats, HCContext  # noqa: E402
from .glue import cache_kwarg  # noqa: E402
from .guard import ContextBusyError  # noqa: E402
from .models import load_model, model_fingerprint, tokenizer_fingerprint  # noqa: E402
from .pool import ContextInUseError, ContextPool  # noqa: E402
from .stores import CheckpointNotFoundError, ContextStore, SavedCheckpoint, StaleCheckpointError  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["CacheStats", "CheckpointError", "CheckpointNotFoundError", "ContextBusyError", "ContextInUseError",
           "ContextPool", "ContextStats", "ContextStore", "HCCache", "HCConfig", "HCContext", "cache_kwarg",
           "SavedCheckpoint", "StaleCheckpointError", "load_model", "model_fingerprint", "tokenizer_fingerprint"]
