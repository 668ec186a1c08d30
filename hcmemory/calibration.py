"""VQ codebooks: fitted once per model on a shipped calibration text, cached on disk.

The codebooks are K-means centroids of the post-RoPE keys the model itself produces, so they
depend on the weights, the config and the codebook shape; the cache file is keyed by all three
(plus the calibration text) and written atomically, so a later process loads it in
milliseconds and a killed calibration never leaves a file that loads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from .models import cache_root, model_fingerprint

if TYPE_CHECKING:
    from .cache import HCCache

log = logging.getLogger(__name__)
CALIBRATION_TOKENS = 2048


def calibration_text() -> str:
    return resources.files("hcmemory.data").joinpath("calibration.txt").read_text(encoding="utf-8")


def codebook_path(model: torch.nn.Module, cache: "HCCache") -> Path:
    c = cache.config
    shape = f"s{c.vq_subvector_dim}-c{c.vq_centroids}-{c.vq_codebook}-i{c.kmeans_iters}"
    text = hashlib.sha256(calibration_text().encode()).hexdigest()[:12]
    key = hashlib.sha256(f"{model_fingerprint(model)}|{shape}|{text}".encode()).hexdigest()[:24]
    return cache_root() / "codebooks" / f"{key}-{shape}.safetensors"


def _tokenizer_for(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    if tokenizer is not None:
        return tokenizer
    try:
        return AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            "VQ calibration on the shipped text needs the model's tokenizer and none was found next to the model "
            f"({model.name_or_path!r}); pass tokenizer=... or use HCConfig(calibration='context')"
        ) from err


@torch.inference_mode()
def calibration_keys(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, tokens: int = CALIBRATION_TOKENS
                     ) -> list[torch.Tensor]:
    """Post-RoPE keys ``(kv_heads, n, dim)`` per layer, from one plain forward over the calibration text."""
    ids = tokenizer(calibration_text(), return_tensors="pt").input_ids[:, :tokens]
    ids = ids.to(next(model.parameters()).device)
    dynamic = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=dynamic, use_cache=True, logits_to_keep=1)
    return [layer.keys[0].float() for layer in dynamic.layers]


def load_or_fit_codebooks(model: torch.nn.Module, cache: "HCCache",
                          tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Give every layer's VQ codec its codebook: from the disk cache, or fitted and then cached."""
    path = codebook_path(model, cache)
    codecs = [layer.key_codes.codec for layer in cache.layers]
    if path.exists():
        state = load_file(str(path))
        for i, codec in enumerate(codecs):
            codec.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{i}.")})
        log.debug("loaded codebooks from %s", path)
        return
    log.info("calibrating VQ codebooks for this model (once; cached at %s)", path)
    keys = calibration_keys(model, _tokenizer_for(model, tokenizer))
    for codec, layer_keys in tqdm(list(zip(codecs, keys)), desc="calibrating codebooks", unit="layer"):
        codec.fit(layer_keys)
    state = {f"{i}.{k}": v.contiguous() for i, codec in enumerate(codecs) for k, v in codec.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
