"""Key codecs fitted once per model on a shipped calibration text, cached on disk.

VQ codebooks and per-channel int statistics describe the post-RoPE keys the model itself
produces, so they depend on the weights, the config and the codec's shape; the cache file is keyed
by all of them (plus the calibration text) and written atomically, so a later process loads it in
milliseconds and a killed calibration never leaves a file that loads.  ``HCCache.for_model`` is
the one caller; nothing here knows about caches.
"""

from __future__ import annotations

import hashlib
import logging
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from .codecs import LayerCodecs, codecs_for
from .config import HCConfig
from .files import atomic_path, cache_root
from .glue import cache_kwarg
from .models import check_tokenizer, layer_configs, model_fingerprint

log = logging.getLogger(__name__)
CALIBRATION_TOKENS = 2048
_FITTED = ("keys", "exact_keys")

CodecStates = list[dict[str, dict[str, torch.Tensor]]]
"""Per layer, per fitted codec (``keys``, ``exact_keys``): the codec's ``state_dict``."""


def calibration_text() -> str:
    return resources.files("hcmemory.data").joinpath("calibration.txt").read_text(encoding="utf-8")


def _layer_codecs(model: torch.nn.Module, config: HCConfig) -> list[LayerCodecs]:
    """Each layer's codecs as ``HCCache`` builds them: sliding-window layers keep exact keys, so only
    the global layers' codecs need fitting."""
    mc = model.config
    dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    host = torch.device("cpu")
    return [codecs_for(layer_config, mc.num_key_value_heads, dim, torch.float32, host, host)
            for layer_config in layer_configs(mc, config)]


def _shape_name(config: HCConfig) -> str:
    """What the fitted tensors depend on besides the model: the key codec and the exact-key codec."""
    c = config
    keys = f"{c.key_codec}-s{c.vq_subvector_dim}-c{c.vq_centroids}-{c.vq_codebook}-i{c.kmeans_iters}" \
        if c.key_codec == "vq" else c.key_codec
    exact = (c.rescore_keys + ("-residual" if c.rescore_residual else "")) if c.rescore else "none"
    return f"{keys}-x{exact}" + ("-rot" if c.quant_rotation else "")  # rotating int codecs store their signs


def codebook_path(model: torch.nn.Module, config: HCConfig) -> Path:
    shape = _shape_name(config)
    text = hashlib.sha256(calibration_text().encode()).hexdigest()[:12]
    key = hashlib.sha256(f"{model_fingerprint(model)}|{shape}|{text}".encode()).hexdigest()[:24]
    return cache_root() / "codebooks" / f"{key}-{shape}.safetensors"


def _tokenizer_for(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    if tokenizer is not None:
        check_tokenizer(tokenizer)
        return tokenizer
    try:
        return AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            "calibrating key codecs on the shipped text needs the model's tokenizer and none was found next to the "
            f"model ({model.name_or_path!r}); pass tokenizer=... or use HCConfig(calibration='context')"
        ) from err


@torch.no_grad()
def calibration_keys(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, tokens: int = CALIBRATION_TOKENS
                     ) -> list[torch.Tensor]:
    """Post-RoPE keys ``(kv_heads, n, dim)`` per layer, from one plain forward over the calibration text."""
    ids = tokenizer(calibration_text(), return_tensors="pt").input_ids[:, :tokens]
    ids = ids.to(next(model.parameters()).device)
    dynamic = DynamicCache(config=model.config)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwarg(model, dynamic))
    return [layer.keys[0].float().cpu() for layer in dynamic.layers]


def shipped_codec_states(model: torch.nn.Module, config: HCConfig,
                         tokenizer: PreTrainedTokenizerBase | None = None) -> CodecStates | None:
    """Fitted states of every layer's key codecs for ``config`` (None when none needs fitting):
    from the disk cache, or fitted on the calibration text and then cached."""
    layers = _layer_codecs(model, config)
    if not any(codec is not None and codec.needs_fit for lc in layers for codec in (lc.keys, lc.exact_keys)):
        return None
    path = codebook_path(model, config)
    if path.exists():
        flat = load_file(str(path))
        log.debug("loaded key codecs from %s", path)
    else:
        log.info("calibrating key codecs for this model (once; cached at %s)", path)
        keys = calibration_keys(model, _tokenizer_for(model, tokenizer))
        for codecs, layer_keys in tqdm(list(zip(layers, keys)), desc="calibrating key codecs", unit="layer"):
            codecs.fit(layer_keys)
        flat = {f"{i}.{name}.{k}": v.contiguous() for i, codecs in enumerate(layers) for name in _FITTED
                if getattr(codecs, name) is not None for k, v in getattr(codecs, name).state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(flat, str(tmp))
    states: CodecStates = [{name: {} for name in _FITTED} for _ in layers]
    for key, value in flat.items():
        index, name, tensor = key.split(".", 2)
        states[int(index)][name][tensor] = value
    return states
