"""hcmemory.kernels.dispatch: the choice between the kernels of the method's hot steps and the torch code.

The pure-torch implementations (``codecs``' ``score``, ``selection.top_p_select``) are the reference
and the fallback.  ``triton_kernels`` holds the GPU versions of three hot steps (lookup-table scoring
of VQ codes, top-p row selection, dequantise-and-score of packed int rows); ``cpu_kernels`` the C++
versions of the first two, a fused attention over selected host rows and the VQ codec's nearest-centroid
assignment, compiled on first use.
``backend`` (``HCConfig.kernel``) picks: ``auto`` runs Triton on CUDA tensors (when triton is
installed; top-p keeps torch's there, see ``top_p_impl``), the C++ kernels on CPU tensors (when they
build) and torch elsewhere; ``torch``, ``triton`` and ``cpp`` force one (``triton`` on the CPU needs
``TRITON_INTERPRET=1``: slow, for correctness tests).

``kernels/`` has no ``__init__.py`` on purpose: it ships as ``hcmemory.kernels`` (setuptools
``package-dir``), and a folder without one never wins over an installed package of the same name when a
checkout's root is on ``sys.path`` (``python -c``, ``python -m pytest``, a REPL): Hugging Face's kernel
hub, which transformers imports, is called ``kernels`` too.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from hcmemory.codecs import Codec

BACKENDS = ("auto", "torch", "triton", "cpp")
_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def choose(tensor: "torch.Tensor", backend: str) -> str:
    """Which implementation runs for tensors like ``tensor``: ``triton``, ``cpp`` or ``torch``."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "triton" and not _HAVE_TRITON:
        raise RuntimeError("HCConfig.kernel='triton' but triton is not installed: pip install 'hcmemory[triton]'")
    if backend == "cpp":
        from . import cpu_kernels

        if cpu_kernels.module() is None:
            raise RuntimeError(f"HCConfig.kernel='cpp' but the CPU kernels did not build ({cpu_kernels.failure()}); "
                               "install a C++ compiler and ninja, or use kernel='auto'")
    if backend != "auto":
        return backend
    if tensor.is_cuda:
        return "triton" if _HAVE_TRITON else "torch"
    if tensor.device.type == "cpu":
        from . import cpu_kernels

        return "cpp" if cpu_kernels.module() is not None else "torch"
    return "torch"


def approx_scores(codec: Codec, queries: torch.Tensor, codes: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``queries (heads, m, dim)`` against coded keys ``(heads, n, width)`` -> ``(heads, m, n)``."""
    from hcmemory.codecs import UniformCodec, VQCodec

    chosen = choose(codes, backend)
    if chosen == "triton":
        from . import triton_kernels

        if isinstance(codec, VQCodec):
            return triton_kernels.lut_scores(codec.lookup_table(queries), codes)
        if isinstance(codec, UniformCodec) and not (codec.rotated or codec.symmetric):
            shift, scale = codec.channel_stats(codes.device) if codec.axis == "channel" else (None, None)
            return triton_kernels.uniform_scores(queries, codes, codec.bits, codec.group_size, shift, scale)
    if chosen == "cpp" and isinstance(codec, VQCodec) and codec.table_pays(queries.shape[1]):
        from . import cpu_kernels

        return cpu_kernels.lut_scores(queries, codec.groupwise_books(), codes)
    return codec.score(queries, codes)


def top_p_impl(tensor: torch.Tensor, backend: str = "auto") -> Callable[..., torch.Tensor] | None:
    """The top-p row selection to use for tensors like ``tensor`` (called as ``(mass, top_p, hint,
    min_rows)``): a kernel, or None for the reference ``selection.top_p_select``.

    On a GPU ``auto`` keeps the reference: the Triton top-p walks each head's rows in one program, so
    all but ``heads`` of the GPU's multiprocessors idle, while torch's segmented sort and top-k use all
    of them (an H200, 8 heads of 1M rows: 40 ms against 2.7 ms; ``benchmarks/results/gpu.json``);
    ``triton`` forces the kernel."""
    chosen = choose(tensor, backend)
    if backend == "triton":
        from . import triton_kernels

        return lambda mass, top_p, hint=0, min_rows=0: triton_kernels.top_p_rows(mass, top_p, min_rows)
    if chosen == "cpp":
        from . import cpu_kernels

        return lambda mass, top_p, hint=0, min_rows=0: cpu_kernels.top_p_rows(mass, top_p, min_rows)
    return None


def nearest_impl(tensor: torch.Tensor, backend: str = "auto") -> Callable[..., torch.Tensor] | None:
    """The VQ codec's nearest-centroid assignment for points like ``tensor`` (called as ``(points,
    centroids)``): the C++ kernel on the CPU, or None for the torch reference (``codecs.kmeans.assign``)."""
    if choose(tensor, backend) != "cpp":
        return None
    from . import cpu_kernels

    return cpu_kernels.nearest_centroids


def gather_attention_impl(tensor: torch.Tensor, backend: str = "auto") -> Callable[..., torch.Tensor] | None:
    """Attention over selected rows read in place from row buffers like ``tensor`` (called as ``(queries,
    keys, values, index, scale)``): the C++ kernel for host rows, or None for the torch path (gather and
    convert keys and values, then SDPA)."""
    if choose(tensor, backend) != "cpp":
        return None
    from . import cpu_kernels

    return cpu_kernels.gather_attention
