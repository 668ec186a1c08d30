"""Row buffers: the growable, gatherable, compactable storage behind every per-layer store.

Everything the cache keeps per token (key codes next to the model, exact keys and values, positions,
attention mass) is a *row* of a buffer shaped ``(heads, capacity, *row)``.  Keeping one mechanism
for all of them is what makes eviction a single ``keep(indices)`` call, rollback a ``truncate`` or
a ``replace``, and byte accounting come from real tensors.

Buffers are always ordinary tensors, even when filled inside ``torch.inference_mode()``: a tensor
allocated there could never be written again outside it, and the same cache must keep working
when a user continues it with ``model.generate`` (which runs under ``no_grad``).
"""

from __future__ import annotations

import torch

from .codecs import Codec


class RowBuffer:
    """A ``(heads, capacity, *row)`` tensor with ``len`` live rows at the front.

    Appends grow capacity geometrically (at least ``growth`` rows at a time), so a decode step
    costs one small copy instead of concatenating the whole cache; eviction compacts in place and
    gives back capacity that is no longer needed, so a bounded state stays bounded in memory too.
    """

    def __init__(self, heads: int, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                 growth: int = 256) -> None:
        self.heads = heads
        self.row_shape = tuple(row_shape)
        self.growth = growth
        self.data = self._empty(0, dtype, torch.device(device))
        self.len = 0
        self._shared = False

    def _empty(self, rows: int, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        with torch.inference_mode(False):
            return torch.empty((self.heads, rows, *self.row_shape), dtype=dtype or self.dtype,
                               device=device or self.device)

    @property
    def capacity(self) -> int:
        return self.data.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def view(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Live rows ``[start, stop)``, without copying."""
        stop = self.len if stop is None else min(stop, self.len)
        return self.data[:, start:stop]

    def writable(self) -> torch.Tensor:
        """The live rows, for writing in place (takes a private copy first if shared by a fork)."""
        self._own()
        return self.view()

    def _reallocate(self, capacity: int) -> None:
        fresh = self._empty(capacity)
        fresh[:, : self.len] = self.data[:, : self.len]
        self.data, self._shared = fresh, False

    def _own(self, extra: int = 0) -> None:
        """Copy-on-write: a buffer shared with a fork copies its live rows before any write."""
        if self._shared:
            self._reallocate(self.len + max(extra, self.growth))

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` more rows (the only step of an append that can fail)."""
        self._own(rows)
        need = self.len + rows
        if need > self.capacity:
            self._reallocate(max(need, self.capacity + max(self.growth, self.capacity // 2)))

    def append(self, rows: torch.Tensor) -> None:
        if rows.shape[0] != self.heads or tuple(rows.shape[2:]) != self.row_shape:
            raise ValueError(f"row shape {tuple(rows.shape)} does not fit buffer ({self.heads}, n, {self.row_shape})")
        n = rows.shape[1]
        self.reserve(n)
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

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """A copy of rows ``index`` (1-D, shared by all heads)."""
        return self.data[:, index.to(self.device)]

    def keep(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (1-D, ascending), compacting in place; capacity far beyond
        what is kept is given back."""
        kept = self.take(index)
        self._own()
        count = kept.shape[1]
        self.data[:, :count] = kept
        self.len = count
        if self.capacity > 2 * (count + self.growth):
            self._reallocate(count + self.growth)

    def replace(self, rows: torch.Tensor) -> None:
        """Make ``rows`` the whole content (rebuilding a state on rollback)."""
        self.len = 0
        self.append(rows)

    def truncate(self, length: int) -> None:
        """Drop rows past ``length`` (used to roll back a failed or temporary append)."""
        self.len = min(self.len, length)

    def fork(self) -> "RowBuffer":
        """A copy that shares storage until either side writes (O(1) now, one copy per side later)."""
        twin = RowBuffer.__new__(RowBuffer)
        twin.heads, twin.row_shape, twin.growth = self.heads, self.row_shape, self.growth
        twin.data, twin.len = self.data, self.len
        twin._shared = self._shared = True
        return twin

    def nbytes(self) -> int:
        """Bytes of the live rows (what the state holds)."""
        return self.len * self.heads * int(torch.Size(self.row_shape).numel()) * self.data.element_size()

    def reserved_bytes(self) -> int:
        """Bytes of the whole allocation, growth slack included (what the process holds)."""
        return self.data.numel() * self.data.element_size()

    def __len__(self) -> int:
        return self.len


class CodedRows:
    """A codec in front of a ``RowBuffer``: encode on append, decode on read.

    Used for key codes next to the model, exact keys kept for re-scoring, and values (on the host
    or next to the model): one class, three placements.  ``encode`` and ``append_codes`` are
    separate so a layer can encode all its stores before it writes any of them.
    """

    def __init__(self, codec: Codec, device: torch.device | str, growth: int = 256) -> None:
        self.codec = codec
        self.device = torch.device(device)
        self.growth = growth
        self.rows: RowBuffer | None = None

    def __len__(self) -> int:
        return 0 if self.rows is None else self.rows.len

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x``, computed where ``x`` is (on the GPU, rows bound for the host are encoded
        before they cross PCIe: fp16 or packed ints travel instead of the model's floats)."""
        return self.codec.encode(x)

    def _buffer(self, codes: torch.Tensor) -> RowBuffer:
        if self.rows is None:
            self.rows = RowBuffer(codes.shape[0], tuple(codes.shape[2:]), codes.dtype, self.device, self.growth)
        return self.rows

    def append_codes(self, codes: torch.Tensor) -> None:
        """Append rows that are already encoded."""
        self._buffer(codes).append(codes)

    def append(self, x: torch.Tensor) -> None:
        self.append_codes(self.encode(x))

    def reserve(self, codes: torch.Tensor) -> None:
        """Make room for ``codes`` (so that a later ``append_codes`` cannot fail)."""
        self._buffer(codes).reserve(codes.shape[1])

    def codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.rows.view(start, stop)

    def decoded(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.codec.decode(self.codes(start, stop))

    def gather_decoded(self, index: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(self.rows.gather(index))

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return self.rows.take(index)

    def keep(self, index: torch.Tensor) -> None:
        if self.rows is not None:
            self.rows.keep(index)

    def replace(self, codes: torch.Tensor) -> None:
        if self.rows is None:
            self.append_codes(codes)
        else:
            self.rows.replace(codes)

    def truncate(self, length: int) -> None:
        if self.rows is not None:
            self.rows.truncate(length)

    def fork(self) -> "CodedRows":
        """Shares rows copy-on-write and the codec (a fitted codec never changes afterwards)."""
        twin = CodedRows(self.codec, self.device, self.growth)
        twin.rows = None if self.rows is None else self.rows.fork()
        return twin

    def nbytes(self) -> int:
        """Row bytes plus the codec's own tensors (codebooks), both measured from storage."""
        return (0 if self.rows is None else self.rows.nbytes()) + self.codec.nbytes()

    def reserved_bytes(self) -> int:
        return (0 if self.rows is None else self.rows.reserved_bytes()) + self.codec.nbytes()
