"""The CPU kernels (``cpu_kernels.cpp``), compiled by torch's C++ extension loader on first use.

* ``lut_scores`` — lookup-table scoring of VQ codes: the table ``T = q_split · Cᵀ`` built in a buffer
  that stays in cache, then each row's score summed straight from its codes.  The torch path's
  ``embedding_bag`` materialises an index per code and its einsum pays per-call overheads: measured at
  7.5K rows (hc-12.5's codes, 3 KV heads, 3 queries each, one thread) 2.4 ms against 1.2 ms here.
* ``top_p_rows`` — ``selection.top_p_select``'s choice without sorting the mass: a quickselect finds each
  head's row count, a partial selection its rows.
* ``nearest_centroids`` — the VQ codec's assignment of new keys to codebook entries, eight centroids per
  vector step, where torch builds the whole distance matrix and runs a min-with-index over it (measured
  at 7.5K tokens, hc-12.5, two threads: 8 s of a 47 s prefill).
* ``gather_attention`` — a decode step's attention over the selected rows, straight from the host row
  buffers: each row is gathered, converted from fp16 and weighed once, in blocks merged as in
  flash-decoding, where the torch path gathers and converts keys and values into new tensors first.

The build needs a C++ compiler and ninja, takes about a minute once, and is cached by torch (in
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a name that hashes everything
the binary depends on (``build_name``), so checkouts and environments never overwrite each other's
build.  It starts at the first call that needs a kernel, never on import or for a configuration that
runs none.  Where it cannot build, ``module()`` returns None once and logs why, and ``auto`` uses the
torch path: same answers, slower.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import sysconfig
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_lock = threading.Lock()
_module = None
_failure: str | None = None


def module():
    """The compiled extension, built or loaded at the first call, or None where it cannot be built
    (``failure()`` says why)."""
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            try:
                from torch.utils.cpp_extension import load

                cflags, ldflags = ["-O3", "-fopenmp", *_isa_flags()], ["-fopenmp"]
                name = build_name(cflags, ldflags)
                log.info("loading hcmemory's CPU kernels %s (compiled once, then cached by torch)", name)
                _module = load(name, [str(SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags)
            except Exception as error:  # no compiler, no ninja, a read-only cache: the torch path works
                _failure = f"{type(error).__name__}: {error}".splitlines()[0]
                log.warning("hcmemory's CPU kernels did not build (%s); using the slower torch path", _failure)
    return _module


def build_name(cflags: list[str], ldflags: list[str]) -> str:
    """The extension's name: a hash of what the binary depends on — the source, the flags, torch's and
    Python's include folders (which differ between environments even at one torch version) and the
    versions.  torch rebuilds a name whose inputs changed in place, so two checkouts or environments
    sharing one name would rebuild over each other at every switch."""
    from torch.utils.cpp_extension import include_paths

    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (*cflags, "|", *ldflags, "|", *include_paths(), sysconfig.get_paths()["include"], torch.__version__,
                 sys.version):
        digest.update(part.encode() + b"\0")
    return f"hcmemory_cpu_kernels_{digest.hexdigest()[:16]}"


def _isa_flags() -> list[str]:
    """AVX2, FMA and F16C where the processor reports all three (fp16 rows convert 8 at a time), named
    one by one: ``-march=native`` dies with an illegal instruction on some VMs that misreport."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= flags else []


def failure() -> str | None:
    return _failure


def lut_scores(queries: torch.Tensor, book: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``queries (heads, m, dim)``, codebooks per (head, group) ``book (heads, g, c, s)`` (expanded views
    welcome) and codes ``(heads, n, g)`` -> scores ``(heads, m, n)`` float32."""
    codes = codes if codes.stride(2) == 1 else codes.contiguous()
    return module().lut_scores(queries.float().contiguous(), book.float(), codes)


def top_p_rows(mass: torch.Tensor, top_p: float, min_rows: int = 0) -> torch.Tensor:
    """Row indices ``(heads, k)``, ascending per head, reaching ``top_p`` of each head's mass; ``k`` is the
    largest count any head needs (at least ``min_rows``) and every head keeps its ``k`` heaviest rows."""
    heads, n = mass.shape
    if top_p >= 1.0 or n <= min_rows:
        return torch.arange(n).expand(heads, n)
    return module().top_p_rows(mass.float().contiguous(), float(top_p), int(min_rows))


def nearest_centroids(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``points (b, n, s)``, ``centroids (b, c, s)`` -> index of each point's nearest centroid ``(b, n)`` int64."""
    return module().nearest_centroids(points.float().contiguous(), centroids.float().contiguous())


def gather_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``softmax(q·K[index]ᵀ·scale)·V[index]`` per head: ``queries (heads, m, dim)``, row buffers ``keys`` and
    ``values`` ``(heads, capacity, dim)`` (float32/16, bfloat16, same layout), ``index (heads, k)`` rows every
    query sees -> ``(heads, m, dim)`` float32."""
    return module().gather_attention(queries.float().contiguous(), keys, values, index.contiguous(), float(scale))
