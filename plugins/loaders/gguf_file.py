"""A small, fast GGUF reader: metadata, tensor table, and tensors dequantized to numpy float32.

gguf-py's GGUFReader builds a Python object per array element (seconds for a 49k-token
vocabulary); this reader decodes the header with `struct` in one pass and memory-maps the data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
_SCALARS = {  # GGUF value type -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_PLAIN_TYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}
BF16 = 30


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    shape: tuple[int, ...]  # in PyTorch order (outermost first), i.e. GGUF's dims reversed
    ggml_type: int
    offset: int  # absolute byte offset in the file

    @property
    def is_quantized(self) -> bool:
        return self.ggml_type not in _PLAIN_TYPES and self.ggml_type != BF16


class GgufFile:
    """The parsed header of a GGUF file plus a read-only memory map of its data."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            # mmap slices are bytes (fast to decode); numpy views of it serve the tensors.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self._map, dtype=np.uint8)
        buf = self._map
        if buf[:4] != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        self.version, num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
        if self.version < 2:
            raise ValueError(f"{path}: GGUF version {self.version} is too old (need >= 2)")
        self._pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = self._read_string()
            (value_type,) = self._unpack("<I")
            self.metadata[key] = self._read_value(value_type)
        infos = []
        for _ in range(num_tensors):
            name = self._read_string()
            (num_dims,) = self._unpack("<I")
            dims = struct.unpack_from(f"<{num_dims}Q", buf, self._pos)
            self._pos += 8 * num_dims
            ggml_type, offset = self._unpack("<IQ")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = {name: GgufTensorInfo(name, shape, t, data_start + off) for name, shape, t, off in infos}

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _read_string(self) -> str:
        (length,) = struct.unpack_from("<Q", self._map, self._pos)
        start = self._pos + 8
        self._pos = start + length
        return self._map[start : self._pos].decode("utf-8", errors="replace")

    def _read_value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self._read_string()
        if value_type == _ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type in _NUMPY:  # numeric arrays in one go
                dtype = np.dtype(_NUMPY[item_type])
                values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self._pos)
                self._pos += dtype.itemsize * count
                return values.tolist()
            return [self._read_value(item_type) for _ in range(count)]
        if value_type not in _SCALARS:
            raise ValueError(f"{self.path}: unknown GGUF value type {value_type}")
        (value,) = self._unpack(_SCALARS[value_type])
        return value

    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """The value of `<architecture>.<key>` (e.g. "block_count")."""
        return self.metadata.get(f"{self.architecture()}.{key}", default)

    def load_tensor(self, info: GgufTensorInfo) -> np.ndarray:
        """The tensor as a numpy array of info.shape: plain types as stored, bf16 as float32,
        quantized types dequantized to float32."""
        num_elements = int(np.prod(info.shape)) if info.shape else 1
        if info.ggml_type in _PLAIN_TYPES:
            dtype = np.dtype(_PLAIN_TYPES[info.ggml_type])
            return np.frombuffer(self.data, dtype=dtype, count=num_elements, offset=info.offset).reshape(info.shape)
        if info.ggml_type == BF16:
            raw = np.frombuffer(self.data, dtype=np.uint16, count=num_elements, offset=info.offset)
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
        if info.ggml_type in _FAST_DEQUANT:
            type_size = _FAST_BLOCK_BYTES[info.ggml_type]
            raw = np.frombuffer(self.data, dtype=np.uint8, count=num_elements // 32 * type_size, offset=info.offset)
            return _FAST_DEQUANT[info.ggml_type](raw.reshape(-1, type_size)).reshape(info.shape)
        # gguf-py only for the other types: importing it costs ~26 MB (it pulls in mistral-common,
        # pydantic, requests, ...), which a serving process then keeps
        import gguf

        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        num_blocks = num_elements // block_size
        raw = np.frombuffer(self.data, dtype=np.uint8, count=num_blocks * type_size, offset=info.offset)
        return gguf.quants.dequantize(raw.reshape(num_blocks, type_size), qtype).reshape(info.shape)


    def load_groups(self, info: GgufTensorInfo, max_bits: int = 8) -> tuple[np.ndarray, np.ndarray] | None:
        """For Q4_0 / Q4_1 (and, with max_bits 8, Q8_0) matrices: (N, K) uint8 codes q and
        (N, K / 32, 2) float32 (scale, zero) with w = (q - 8) * scale + zero per group of 32; None
        for other types."""
        if info.ggml_type not in _GROUPS or _GROUP_BITS[info.ggml_type] > max_bits or len(info.shape) != 2:
            return None
        num_rows, num_cols = info.shape
        num_blocks = num_rows * num_cols // 32
        type_size = _FAST_BLOCK_BYTES[info.ggml_type]
        raw = np.frombuffer(self.data, dtype=np.uint8, count=num_blocks * type_size, offset=info.offset)
        q, scale_zero = _GROUPS[info.ggml_type](raw.reshape(num_blocks, type_size))
        return q.reshape(num_rows, num_cols), scale_zero.reshape(num_rows, num_cols // 32, 2)


def _scales(blocks: np.ndarray, start: int) -> np.ndarray:  # (num_blocks, 1) float32 from an f16 field
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:  # (num_blocks, 16) bytes -> (num_blocks, 32) float32
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    return _scales(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8)


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    return _scales(blocks, 0) * _nibbles(blocks[:, 4:]) + _scales(blocks, 2)


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    return _scales(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _int4_q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = _scales(blocks, 0)  # (num_blocks, 1)
    q = np.concatenate([blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4], axis=1)  # (num_blocks, 32)
    return q, np.concatenate([d, np.zeros_like(d)], axis=1)


def _int4_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, m = _scales(blocks, 0), _scales(blocks, 2)  # (num_blocks, 1) each
    q = np.concatenate([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4], axis=1)  # (num_blocks, 32)
    return q, np.concatenate([d, m + 8 * d], axis=1)  # q*d + m == (q-8)*d + (m+8d)


def _groups_q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = _scales(blocks, 0)  # (num_blocks, 1)
    q = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # (num_blocks, 32)
    return q, np.concatenate([d, -120 * d], axis=1)  # (q-8)*d - 120d == (q-128)*d


Q4_0, Q4_1, Q8_0 = 2, 3, 8
_GROUPS = {Q4_0: _int4_q4_0, Q4_1: _int4_q4_1, Q8_0: _groups_q8_0}
_GROUP_BITS = {Q4_0: 4, Q4_1: 4, Q8_0: 8}
# Block-wise numpy for the common simple types (gguf-py loops over row groups in Python); each
# block holds 32 values in this many bytes (f16 scale [, f16 min], then the values).
_FAST_DEQUANT = {Q4_0: _dequant_q4_0, Q4_1: _dequant_q4_1, Q8_0: _dequant_q8_0}
_FAST_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
