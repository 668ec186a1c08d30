"""Models: loading (the embedded default or a local directory), the GGUF conversion behind the
default, and fingerprints that tie a stored state to the weights and tokenizer that made it."""

from .fingerprint import model_fingerprint, tokenizer_fingerprint
from .gguf import DEFAULT_MODEL_NAME, default_model_dir, ensure_default_model, is_converted
from .loading import SUPPORTED_MODEL_TYPES, check_model, check_tokenizer, load_model, shared_model

__all__ = ["DEFAULT_MODEL_NAME", "SUPPORTED_MODEL_TYPES", "check_model", "check_tokenizer", "default_model_dir",
           "ensure_default_model", "is_converted", "load_model", "model_fingerprint", "shared_model", "tokenizer_fingerprint"]
