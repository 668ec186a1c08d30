"""``vq``: the paper's key codec — sub-vectors replaced by the index of their nearest centroid.

A key of ``dim`` dimensions is cut into ``g = dim / subvector_dim`` sub-vectors; each becomes one
index into a codebook of ``centroids`` K-means centroids.  A row is ``g`` indices: 8-bit when the
codebook has at most 256 entries, 16-bit otherwise, so with 4-dim sub-vectors a key costs 25 % of
its fp16 bytes (12.5 % with 8-bit codes) plus the codebook.

Codebook sharing trades accuracy for bytes next to the model (REFERENCE §6): ``layer`` — one
``(c, s)`` codebook for every head and group of the layer (what the authors shipped); ``head`` —
one per KV head, shared by its groups; ``group`` — one per (head, group).  Codebooks are held in
fp16 (the bytes that count against the budget, and exactly what ``state_dict`` saves, so a codec
restored from disk encodes and scores bit-for-bit like the one that was fitted); every computation
casts them to float32 first, which costs ``c·s`` elements per codebook per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import CHOICES
from .base import Codec
from .kmeans import assign, augment, kmeans

SHARING = CHOICES["vq_codebook"]

FIT_POINTS_PER_CENTROID = 64
"""``fit`` subsamples each K-means problem to at most this many points per centroid; fitting time grows
linearly with it.  Held-out relative error (heavy-tailed keys, 4-dim sub-vectors, 4,096 centroids)
was 0.0356 / 0.0334 / 0.0324 at 16 / 32 / 64 points per centroid: still improving, so 64."""

_TABLE_MAX_QUERIES = 16
"""Up to this many queries per head, scores come from the lookup table; beyond, from decoded keys."""
_CHUNK_ELEMENTS = 1 << 22
"""Bound on the elements of one chunk's gathered table entries or decoded keys (16 MiB in float32)."""


class VQCodec(Codec):
    """Keys as codebook indices ``(heads, n, g)``; scores via the paper's lookup table ``T = q·Cᵀ``."""

    name = "vq"
    exact = False

    def __init__(self, heads: int, dim: int, subvector_dim: int = 4, centroids: int = 4096,
                 sharing: str = "layer", kmeans_iters: int = 12, device: torch.device | str | None = None,
                 nearest: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(heads, dim, device)
        if not isinstance(subvector_dim, int) or subvector_dim < 1 or dim % subvector_dim:
            raise ValueError(f"VQCodec: subvector_dim={subvector_dim!r} must be a positive int dividing dim={dim}")
        if not isinstance(centroids, int) or not 2 <= centroids <= 65536:
            raise ValueError(f"VQCodec: centroids={centroids!r} must be an int in [2, 65536] "
                             "(indices are 8 or 16 bits)")
        if sharing not in SHARING:
            raise ValueError(f"VQCodec: sharing={sharing!r} is not valid; "
                             f"allowed values: {', '.join(map(repr, SHARING))}")
        if not isinstance(kmeans_iters, int) or kmeans_iters < 1:
            raise ValueError(f"VQCodec: kmeans_iters={kmeans_iters!r} must be an int >= 1")
        self.subvector_dim = subvector_dim
        self.groups = dim // subvector_dim
        self.centroids = centroids
        self.sharing = sharing
        self.kmeans_iters = kmeans_iters
        self.nearest = nearest
        """Assigns new keys' sub-vectors to centroids, as ``(points, centroids) -> labels``: a kernel
        (``hcmemory.kernels.nearest_impl``), or None for the torch reference ``kmeans.assign``."""
        self.code_dtype = torch.uint8 if centroids <= 256 else torch.int16
        # Codebooks along the (head, group) axes: (1, 1) for layer, (heads, 1) for head, (heads, g) for group.
        self._books_shape = (heads if sharing != "layer" else 1, self.groups if sharing == "group" else 1)
        self._codebook: torch.Tensor | None = None  # (books, c, s) float16
        self._book32: torch.Tensor | None = None
        self._augmented: tuple[torch.Tensor, torch.Tensor] | None = None  # (book32, augment(book32))

    @property
    def needs_fit(self) -> bool:
        return self._codebook is None

    @property
    def books(self) -> int:
        """Number of codebooks: 1, ``heads`` or ``heads · g``."""
        return self._books_shape[0] * self._books_shape[1]

    # --- fitting -----------------------------------------------------------------------------
    def _problems(self, rows: torch.Tensor) -> torch.Tensor:
        """``(heads, n, dim)`` → ``(books, points, s)``: the sub-vectors each codebook quantizes.

        Sub-vectors are laid out ``(head, group, token)`` so that one reshape serves all three
        sharings: whatever axes a codebook spans become its points.
        """
        heads, n, _ = rows.shape
        sub = rows.float().reshape(heads, n, self.groups, self.subvector_dim).transpose(1, 2)
        return sub.reshape(self.books, -1, self.subvector_dim)

    def fit(self, rows: torch.Tensor) -> None:
        """K-means on the sub-vectors of ``rows (heads, n, dim)``, pooled as the sharing says.

        Each problem is subsampled (seeded, so fits are reproducible) to at most
        ``FIT_POINTS_PER_CENTROID · centroids`` points.
        """
        self._check_rows(rows)
        points = self._problems(rows)
        cap = FIT_POINTS_PER_CENTROID * self.centroids
        if points.shape[1] > cap:
            gen = torch.Generator(device="cpu").manual_seed(0)
            keep = torch.randperm(points.shape[1], generator=gen)[:cap].to(points.device)
            points = points[:, keep]
        self._codebook, self._book32 = kmeans(points, self.centroids, self.kmeans_iters).half().to(self.device), None

    # --- codes -------------------------------------------------------------------------------
    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """``(heads, n, dim)`` → indices ``(heads, n, g)``: uint8 for ≤ 256 centroids, else int16.

        Indices of 32,768 and up are stored as their 16-bit two's complement (``i − 65536``), so
        int16 holds all 65,536 codes; ``_indices`` reads them back with ``& 0xFFFF``.
        """
        self._check_rows(rows)
        book = self._book()
        heads, n, _ = rows.shape
        points = self._problems(rows)
        if self.nearest is not None:
            labels = self.nearest(points, book)
        else:
            if self._augmented is None or self._augmented[0] is not book:  # a decode step encodes one row
                self._augmented = (book, augment(book))
            labels = assign(points, augmented=self._augmented[1])
        labels = labels.view(heads, self.groups, n).transpose(1, 2)
        if self.code_dtype == torch.int16:
            labels = torch.where(labels >= 32768, labels - 65536, labels)
        return labels.to(self.code_dtype).contiguous()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        heads, n, _ = codes.shape
        table = self._book().reshape(-1, self.subvector_dim)
        offsets = self._book_offsets(codes.device)
        out = torch.empty(heads, n, self.dim, device=codes.device)
        for start, stop in self._chunks(n, self.dim):
            index = self._indices(codes[:, start:stop]) + offsets
            out[:, start:stop] = table.index_select(0, index.view(-1)).view(heads, stop - start, self.dim)
        return out

    def score(self, queries: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``queries (heads, m, dim)`` · decoded keys ``(heads, n, dim)``ᵀ → ``(heads, m, n)``.

        Few queries per head (decoding steps: one per query head of a KV group) use the paper's
        lookup table: ``T[h, j, k, :] = q_j · C_{h,j,k}`` costs ``heads · g · c · s · m`` whatever
        ``n`` is, and a key's score is ``Σ_j T[h, j, P[key, j]]`` — exactly a sum-mode
        ``embedding_bag`` over the flat table, one fused call for every head and key.  Measured
        (3 heads, 4,000 keys, 3 queries, g=32, c=256, 2-core CPU): 0.64 ms vs 1.0 ms for decoding
        the keys and multiplying.  Many queries (a prefill chunk) go through keys decoded chunk by
        chunk instead, where one matmul serves every query.
        """
        heads, m, _ = queries.shape
        if not self.table_pays(m):
            return self._score_decoded(queries.float(), codes)
        n = codes.shape[1]
        g, c = self.groups, self.centroids
        table = self.lookup_table(queries).reshape(heads * g * c, m)
        offsets = torch.arange(heads * g, dtype=torch.int32, device=codes.device).view(heads, 1, g) * c
        out = torch.empty(heads, n, m, device=codes.device)
        for start, stop in self._chunks(n, g):
            bags = (self._indices(codes[:, start:stop]) + offsets).view(-1, g)
            out[:, start:stop] = F.embedding_bag(bags, table, mode="sum").view(heads, stop - start, m)
        return out.transpose(1, 2)

    def lookup_table(self, queries: torch.Tensor) -> torch.Tensor:
        """The paper's table ``T[h, j, k, :] = q_j · C_{h,j,k}``: ``(heads, g, c, m)`` float32 for
        ``queries (heads, m, dim)`` — small, whatever the number of keys (the GPU kernel reads it too)."""
        heads, m, _ = queries.shape
        q = queries.float().view(heads, m, self.groups, self.subvector_dim)
        return torch.einsum("hmgs,hgcs->hgcm", q, self.groupwise_books()).contiguous()

    def groupwise_books(self) -> torch.Tensor:
        """The float32 codebook of every (head, group): ``(heads, g, c, s)``, an expanded view where
        codebooks are shared (no copy)."""
        h_books, g_books = self._books_shape
        book = self._book().view(h_books, g_books, self.centroids, self.subvector_dim)
        return book.expand(self.heads if h_books == 1 else -1, self.groups if g_books == 1 else -1, -1, -1)

    @staticmethod
    def table_pays(queries: int) -> bool:
        """Whether ``queries`` per head are scored through the lookup table (few, as in decoding) rather
        than through decoded keys (a prefill chunk's many, where one matmul serves them all)."""
        return queries <= _TABLE_MAX_QUERIES

    def _score_decoded(self, queries: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Scores against keys decoded chunk by chunk, so no more than a chunk of keys is ever materialized."""
        heads, m, _ = queries.shape
        n = codes.shape[1]
        out = torch.empty(heads, m, n, device=codes.device)
        for start, stop in self._chunks(n, self.dim):
            out[:, :, start:stop] = queries @ self.decode(codes[:, start:stop]).transpose(1, 2)
        return out

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"codebook": (books, c, s) float16}``; empty before ``fit``."""
        return {} if self._codebook is None else {"codebook": self._codebook}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        book = state.get("codebook")
        expected = (self.books, self.centroids, self.subvector_dim)
        if book is None or tuple(book.shape) != expected:
            got = None if book is None else tuple(book.shape)
            raise ValueError(f"VQCodec: state 'codebook' has shape {got}, expected {expected} "
                             f"(sharing={self.sharing!r}, centroids={self.centroids}, "
                             f"subvector_dim={self.subvector_dim})")
        self._codebook, self._book32 = book.detach().half().contiguous().to(self.device), None

    # --- helpers -----------------------------------------------------------------------------
    def _check_rows(self, rows: torch.Tensor) -> None:
        if rows.dim() != 3 or rows.shape[0] != self.heads or rows.shape[2] != self.dim:
            raise ValueError(f"VQCodec: rows must be (heads={self.heads}, n, dim={self.dim}), "
                             f"got {tuple(rows.shape)}")

    def _book(self) -> torch.Tensor:
        """The codebooks in float32, ``(books, c, s)``; raises if the codec was never fitted.

        The float32 copy is kept (a few KB) because every decoding step needs it."""
        if self._codebook is None:
            raise ValueError("VQCodec: no codebook yet; call fit(rows) or load_state_dict(state) "
                             "before encode/decode/score")
        if self._book32 is None or self._book32.device != self._codebook.device:
            self._book32 = self._codebook.float()
        return self._book32

    def _book_offsets(self, device: torch.device) -> torch.Tensor:
        """``(heads, 1, g)`` int32: where each (head, group)'s codebook starts in the flat ``(books·c, s)`` table."""
        h_books, g_books = self._books_shape
        heads = torch.arange(self.heads, device=device).view(-1, 1) % h_books
        groups = torch.arange(self.groups, device=device).view(1, -1) % g_books
        return ((heads * g_books + groups) * self.centroids).int().unsqueeze(1)

    @staticmethod
    def _indices(codes: torch.Tensor) -> torch.Tensor:
        """Codes of either width as int32 in ``[0, c)`` (undoing the two's complement of 16-bit codes)."""
        return codes.int() if codes.dtype == torch.uint8 else codes.int() & 0xFFFF

    def _chunks(self, n: int, per_row: int) -> list[tuple[int, int]]:
        """``[start, stop)`` ranges over ``n`` rows, each holding about ``_CHUNK_ELEMENTS`` elements
        when a row takes ``per_row`` elements per head."""
        step = max(1, _CHUNK_ELEMENTS // (self.heads * per_row))
        return [(start, min(n, start + step)) for start in range(0, n, step)]
