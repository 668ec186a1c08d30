"""Models: loading (an embedded model or a local directory), the GGUF conversion behind the
embedded ones, which layers attend globally and which over a sliding window, and fingerprints that
tie a stored state to the weights and tokenizer that made it."""

from .fingerprint import model_fingerprint, tokenizer_fingerprint
from .gguf import (DEFAULT_MODEL_NAME, EMBEDDED_MODELS, default_model_dir, embedded_model, ensure_default_model,
                   ensure_model, is_converted, model_dir)
from .kinds import GLOBAL, LAYER_KINDS, SLIDING, check_layer_kinds, layer_configs, layer_kinds
from .loading import SUPPORTED_MODEL_TYPES, check_model, check_tokenizer, load_model, shared_model

__all__ = ["DEFAULT_MODEL_NAME", "EMBEDDED_MODELS", "GLOBAL", "LAYER_KINDS", "SLIDING", "SUPPORTED_MODEL_TYPES",
           "check_layer_kinds", "check_model", "check_tokenizer", "default_model_dir", "embedded_model",
           "ensure_default_model", "ensure_model", "is_converted", "layer_configs", "layer_kinds", "load_model",
           "model_dir", "model_fingerprint", "shared_model", "tokenizer_fingerprint"]
