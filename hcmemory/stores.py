"""Row storage: the growable, gatherable, compactable buffers behind every per-layer store.

Everything the cache keeps per token (key codes next to the model, exact keys and values on the
host, positions, attention mass) is a *row* of a buffer shaped ``(heads, capacity, *row)``.
Keeping one mechanism for all of them is what makes eviction a single ``keep(indices)`` call and
makes byte accounting come from real tensors.
"""

from __future__ import annotations

import copy

import torch

from .codecs import Codec


class RowBuffer:
    """A ``(heads, capacity, *row)`` tensor with ``len`` live rows at the front.

    Appends grow capacity geometrically (at least ``growth`` rows at a time), so a decode step
    costs one small copy instead of concatenating the whole cache; eviction compacts in place so
    freed rows are reused by later appends rather than reallocated.
    """

    def __init__(self, heads: int, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                 growth: int = 256) -> None:
        self.heads = heads
        self.row_shape = tuple(row_shape)
        self.growth = growth
        self.data = torch.empty((heads, 0, *self.row_shape), dtype=dtype, device=device)
        self.len = 0
        self._shared = False

    @property
    def capacity(self) -> int:
        return self.data.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def view(self) -> torch.Tensor:
        """The live rows, without copying."""
        return self.data[:, : self.len]

    def writable(self) -> torch.Tensor:
        """The live rows, for writing in place (takes a private copy first if shared by a fork)."""
        self._own()
        return self.view()

    def _own(self, extra: int = 0) -> None:
        """Copy-on-write: a buffer shared with a fork copies its live rows before any write."""
        if self._shared:
            private = torch.empty((self.heads, self.len + max(extra, self.growth), *self.row_shape),
                                  dtype=self.dtype, device=self.device)
            private[:, : self.len] = self.data[:, : self.len]
            self.data, self._shared = private, False

    def _reserve(self, rows: int) -> None:
        self._own(rows)
        need = self.len + rows
        if need <= self.capacity:
            return
        new_capacity = max(need, self.capacity + max(self.growth, self.capacity // 2))
        grown = torch.empty((self.heads, new_capacity, *self.row_shape), dtype=self.dtype, device=self.device)
        grown[:, : self.len] = self.data[:, : self.len]
        self.data = grown

    def append(self, rows: torch.Tensor) -> None:
        if rows.shape[0] != self.heads or tuple(rows.shape[2:]) != self.row_shape:
            raise ValueError(f"row shape {tuple(rows.shape)} does not fit buffer ({self.heads}, n, {self.row_shape})")
        n = rows.shape[1]
        self._reserve(n)
        self.data[:, self.len : self.len + n] = rows.to(device=self.device, dtype=self.dtype)
        self.len += n

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (``(heads, k)``, per-head indices) → ``(heads, k, *row)``.

        One ``index_select`` over the flattened buffer (whole contiguous rows) rather than a
        ``gather`` with an expanded index: an order of magnitude faster on the CPU.
        """
        index = index.to(self.device)
        heads, k = index.shape
        flat = self.data.view(heads * self.capacity, *self.row_shape)
        offsets = torch.arange(heads, device=self.device)[:, None] * self.capacity
        return flat.index_select(0, (index + offsets).view(-1)).view(heads, k, *self.row_shape)

    def keep(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (1-D, ascending, shared by all heads), compacting in place."""
        kept = self.data[:, index.to(self.device)]
        self._own()
        self.data[:, : kept.shape[1]] = kept
        self.len = kept.shape[1]

    def truncate(self, length: int) -> None:
        """Drop rows past ``length`` (used to roll back a failed or temporary append)."""
        self.len = min(self.len, length)

    def fork(self) -> "RowBuffer":
        """A copy that shares storage until either side writes (O(1) now, one copy per side later)."""
        twin = RowBuffer(self.heads, self.row_shape, self.dtype, self.device, self.growth)
        twin.data, twin.len = self.data, self.len
        twin._shared = self._shared = True
        return twin

    def nbytes(self) -> int:
        """Bytes of the live rows (what the state really holds, not the slack reserved for growth)."""
        return self.len * self.heads * int(torch.Size(self.row_shape).numel()) * self.data.element_size()

    def reserved_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class CodedRows:
    """A codec in front of a ``RowBuffer``: encode on append, decode on read.

    Used for key codes next to the model, exact keys kept on the host for re-scoring, and values
    (on the host or next to the model): one class, three placements.
    """

    def __init__(self, codec: Codec, device: torch.device | str, growth: int = 256) -> None:
        self.codec = codec
        self.device = torch.device(device)
        self.growth = growth
        self.rows: RowBuffer | None = None

    def __len__(self) -> int:
        return 0 if self.rows is None else self.rows.len

    def append(self, x: torch.Tensor) -> None:
        self.append_raw(self.codec.encode(x.to(self.device)))

    def append_raw(self, codes: torch.Tensor) -> None:
        """Append rows that are already encoded (restoring a checkpoint)."""
        if self.rows is None:
            self.rows = RowBuffer(codes.shape[0], tuple(codes.shape[2:]), codes.dtype, self.device, self.growth)
        self.rows.append(codes)

    def codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.rows.view()[:, start:stop]

    def decoded(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.codec.decode(self.codes(start, stop))

    def gather_decoded(self, index: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(self.rows.gather(index))

    def keep(self, index: torch.Tensor) -> None:
        if self.rows is not None:
            self.rows.keep(index)

    def fork(self) -> "CodedRows":
        """Shares rows copy-on-write; the codec is shared once fitted (it no longer changes then)."""
        codec = copy.deepcopy(self.codec) if self.codec.needs_fit else self.codec
        twin = CodedRows(codec, self.device, self.growth)
        twin.rows = None if self.rows is None else self.rows.fork()
        return twin

    def truncate(self, length: int) -> None:
        if self.rows is not None:
            self.rows.truncate(length)

    def nbytes(self) -> int:
        """Row bytes plus the codec's own tensors (codebooks), both measured from storage."""
        return (0 if self.rows is None else self.rows.nbytes()) + self.codec.nbytes()
