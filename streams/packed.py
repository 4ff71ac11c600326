"""Client states held in few bytes while idle: replay's client mapping.

:func:`pack` and :func:`unpack` are for memory only, never stored (the field order is
the running code's; :mod:`detectors.state` is the stored form).

>>> from detectors.clients import ClientState
>>> from detectors.state import dumps
>>> s = ClientState(n_classes=3, n_features=4, size=8)
>>> s.window = np.full((2, 4), 1.5, dtype=np.float32)
>>> u = unpack(ClientState, pack(s))
>>> float(u.window[1, 3]), u.window.flags.writeable, len(pack(s)) < len(dumps(s))
(1.5, True, True)
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass

import msgspec
import numpy as np

from detectors.clients import ClientState, row_hashes

# A numpy number in a scalar field goes as Python's, as through dumps' JSON.
_packer = msgspec.msgpack.Encoder(enc_hook=lambda value: value.item())
_unpacker = msgspec.msgpack.Decoder()


def pack(state, preset: Preset | None = None) -> bytes:
    """A state in few bytes, for holding it in memory while it is idle.

    msgpack of the fields in order, each array as its dtype and shape, then all the
    arrays' bytes in one deflated stream. Column-major: a window's feature repeats
    its values down its column far more than along a row. ``preset``: what packing
    learned from the first states (:func:`preset`); :func:`unpack` needs the same.
    """
    values, chunks, window = [], [], None
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if isinstance(value, np.ndarray):
            code = _DTYPE_CODES.get(value.dtype.str, value.dtype.str)
            if f.name == _HASH and _hashes_of(window, value):
                described = [code]  # derived: unpack hashes the window's rows again
            elif f.name == _SUM and _predictable(value.dtype, value.shape, window):
                chunks.append(_residual(value, window))
                described = [code, value.shape]
            elif f.name == _WINDOW and preset is not None and (indices := preset.indices(value)) is not None:
                chunks.append(indices.tobytes("F"))
                described = [code, value.shape, 1]
            else:
                chunks.append(value.tobytes("F"))
                described = [code, value.shape]
            window = value if f.name == _WINDOW else window
            value = described
        values.append(value)
    if preset is not None:
        deflate = zlib.compressobj(1, zdict=preset.zdict)
        values.append(deflate.compress(b"".join(chunks)) + deflate.flush())
    else:
        values.append(zlib.compress(b"".join(chunks), 1))
    # A copy of exactly its length: the encoder's own bytes keep its growth slack (a
    # full window's 9.5 KB state held 14.4 KB).
    return bytes(memoryview(_packer.encode(values)))


def unpack(cls, blob: bytes, preset: Preset | None = None):
    """The state :func:`pack` gave (with the same ``preset``), with writable arrays of
    their own."""
    *values, deflated = _unpacker.decode(blob)
    if preset is not None:
        inflate = zlib.decompressobj(zdict=preset.zdict)
        data = inflate.decompress(deflated) + inflate.flush()
    else:
        data = zlib.decompress(deflated)
    offset, out = 0, {}
    for f, value in zip(dataclasses.fields(cls), values, strict=True):
        if isinstance(value, list):  # an array: a state's other fields are no lists
            if len(value) == 1:  # derived
                out[f.name] = row_hashes(out[_WINDOW])
                continue
            code, shape = value[0], tuple(value[1])
            dtype = np.dtype(_DTYPES[code] if isinstance(code, int) else code)
            count = math.prod(shape)
            if len(value) == 3:  # the preset's values, by their indices
                indices = np.frombuffer(data, np.uint8, count, offset).reshape(shape[::-1]).T
                value, offset = preset.values_at(indices), offset + count
            elif f.name == _SUM and _predictable(dtype, shape, out.get(_WINDOW)):
                value = _from_residual(data, offset, count, out[_WINDOW])
                offset += count * dtype.itemsize
            else:
                value = np.frombuffer(data, dtype, count, offset).reshape(shape[::-1]).T.copy()
                offset += count * dtype.itemsize
        out[f.name] = value
    return cls(**out)


# A light client's float64 feature sum (512 B with 64 features) does not deflate; its
# window's column sums agree with it in the sign, exponent and top mantissa bits while
# the window holds all its rows. Packed as its bits XOR theirs, bytes grouped by
# significance: ~0.3 instead of ~0.5 KB (digits). Exact: the same sums at both ends.
_SUM, _WINDOW, _HASH = "z_sum", "window", "window_hash"


def _predictable(dtype, shape, window) -> bool:
    return (dtype == np.float64 and isinstance(window, np.ndarray) and window.ndim == 2
            and tuple(shape) == (window.shape[1],))


def _column_sums(window: np.ndarray) -> np.ndarray:
    """Float64 sums down the window's columns, in one order whatever its memory layout."""
    return np.ascontiguousarray(window).sum(0, dtype=np.float64)


def _residual(value: np.ndarray, window: np.ndarray) -> bytes:
    bits = np.ascontiguousarray(value).view(np.uint64) ^ _column_sums(window).view(np.uint64)
    return bits.view(np.uint8).reshape(-1, 8).T.tobytes()


def _from_residual(data: bytes, offset: int, count: int, window: np.ndarray) -> np.ndarray:
    planes = np.frombuffer(data, np.uint8, count * 8, offset).reshape(8, count)
    bits = np.ascontiguousarray(planes.T).view(np.uint64).reshape(count)
    return (bits ^ _column_sums(window).view(np.uint64)).view(np.float64)


#: An array is packed as [dtype, shape], its dtype as its index here (else its string):
#: descriptors with dtype strings and a "derived" flag were ~40 B more of a light
#: client's ~1.3 KB. A derived array (not in the deflated bytes: computed from the
#: fields before it) is [dtype] alone.
_DTYPES = ("<f4", "<f8", "<i2", "<i8", "|b1", "<u8")
_DTYPE_CODES = {name: i for i, name in enumerate(_DTYPES)}


def _hashes_of(window, hashes: np.ndarray) -> bool:
    """Whether ``hashes`` are the window rows' hashes, as they are while the window is
    the client's last queries (1 KB of a full window's state that does not deflate)."""
    return (isinstance(window, np.ndarray) and window.ndim == 2 and window.dtype == np.float32
            and hashes.dtype == np.uint64 and hashes.shape == (len(window),)
            and np.array_equal(row_hashes(window), hashes))


#: Deflate looks back this far: a preset dictionary longer than this is cut to its end.
ZDICT_BYTES = 32 << 10


@dataclass(frozen=True)
class Preset:
    """Each feature's distinct window values over the first states packed, fixed from
    then on (blobs need it). A light client's window holds a few values per feature
    that the model's other clients send too (the data's grid, scaled, as digits' 17
    grey levels). A window whose values are all here packs as one byte per value, its
    index among its feature's values: digits' light windows deflate to ~0.3 instead of
    ~0.7 KB. Other windows deflate with the values as deflate's preset dictionary
    (``zdict``): to about half (digits: 1.4 -> 0.7 KB; a full window 8.1 -> 6.8 KB)."""

    zdict: bytes
    keys: np.ndarray    # sorted: feature << 32 | the value's float32 bits
    starts: np.ndarray  # each feature's first place in keys

    def indices(self, window: np.ndarray) -> np.ndarray | None:
        """Each value's index among its feature's values (uint8), or None if one is not
        there (or the window is not float32 of the preset's width)."""
        if (window.dtype != np.float32 or window.ndim != 2 or window.shape[1] != len(self.starts)
                or not len(self.keys)):
            return None
        keys = _keys(window)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        if not np.array_equal(self.keys[at], keys):
            return None
        return (at - self.starts).astype(np.uint8)

    def values_at(self, indices: np.ndarray) -> np.ndarray:
        bits = (self.keys[self.starts + indices] & 0xFFFFFFFF).astype(np.uint32)
        return bits.view(np.float32)


def _keys(window: np.ndarray) -> np.ndarray:
    columns = np.arange(window.shape[1], dtype=np.uint64) << np.uint64(32)
    return columns | np.ascontiguousarray(window).view(np.uint32).astype(np.uint64)


def preset(states, rows: int = 4096) -> Preset:
    """The :class:`Preset` of these states (up to ``rows`` rows of the states of the first
    one's width). A feature with more than 256 values keeps none: its windows are not
    of a grid, and pack as floats."""
    states = list(states)
    width = states[0].window.shape[1]
    windows = [s.window for s in states if s.window.shape[1] == width][:rows]
    stacked = np.concatenate(windows)[:rows]
    zdict = b"".join(np.unique(column).tobytes() for column in stacked.T)[-ZDICT_BYTES:]
    distinct = [np.unique(column) for column in _keys(stacked.astype(np.float32)).T]
    keys = np.concatenate([np.zeros(0, np.uint64)]
                          + [found for found in distinct if len(found) <= 256])
    starts = np.searchsorted(keys, np.arange(width, dtype=np.uint64) << np.uint64(32))
    return Preset(zdict, keys, starts)


#: Arrays of the client states replay keeps unpacked (PackedStates): a few hundred
#: clients with full windows, a few thousand light ones.
HOT_BYTES = 8 << 20


class PackedStates(MutableMapping):
    """Client states of replay: the most recently written as objects, up to ``hot_bytes``
    of their arrays (clients of the last batch always), the rest packed
    (:func:`pack`).

    Most tracked clients are idle at any time, and an object of a dozen small arrays
    costs several times its numbers in headers and allocator slack; packing and
    unpacking cost tens of microseconds, so clients that come back soon stay objects.
    Reading a packed key unpacks a copy: write it back to keep a change.
    """

    def __init__(self, hot_bytes: int = HOT_BYTES):
        self.hot_bytes = hot_bytes
        self.packed: dict[str, bytes] = {}
        self.live: OrderedDict[str, tuple[ClientState, int]] = OrderedDict()  # oldest write first
        self.live_bytes = 0
        self.written: set[str] = set()  # in this batch: never packed before it ends
        self.preset: Preset | None = None  # from the first states packed, then fixed

    def __getitem__(self, key: str) -> ClientState:
        found = self.live.get(key)
        return found[0] if found is not None else unpack(ClientState, self.packed[key], self.preset)

    def __setitem__(self, key: str, state: ClientState) -> None:
        self._drop_live(key)
        size = _state_cost(state)
        self.live[key] = (state, size)
        self.live_bytes += size
        self.written.add(key)
        self.packed.pop(key, None)

    def __delitem__(self, key: str) -> None:
        if not self._drop_live(key):
            del self.packed[key]
        self.written.discard(key)

    def _drop_live(self, key: str) -> bool:
        found = self.live.pop(key, None)
        if found is not None:
            self.live_bytes -= found[1]
        return found is not None

    def __contains__(self, key) -> bool:
        return key in self.live or key in self.packed

    def __iter__(self) -> Iterator[str]:
        yield from self.live
        yield from self.packed

    def __len__(self) -> int:
        return len(self.live) + len(self.packed)

    def settle(self) -> None:
        """A batch is done: pack the least recently written states past ``hot_bytes``,
        but none the batch wrote (replay's large batches hold most clients each)."""
        going, over = [], self.live_bytes - self.hot_bytes
        for key, (_, size) in self.live.items():  # oldest write first
            if over <= 0 or key in self.written:  # written in write order: the rest are the batch's
                break
            going.append(key)
            over -= size
        if going and self.preset is None:
            self.preset = preset(self.live[key][0] for key in going)
        for key in going:
            state, size = self.live.pop(key)
            self.live_bytes -= size
            self.packed[key] = pack(state, self.preset)
        self.written.clear()


def _state_cost(state: ClientState) -> int:
    return state.window.nbytes + 4096  # the other arrays and the object's overhead, roughly
