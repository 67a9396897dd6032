"""Check a model file a user brings before anything reads its tensors.

A truncated download or copy of a ``.gguf`` or ``.safetensors`` file otherwise fails deep
inside a reader (e.g. numpy's ``cannot reshape array of size ... into shape ...``). Both
formats declare every tensor's dtype, shape and byte range in a header, so the size the
file must have is known from the header alone: :func:`check_gguf` and
:func:`check_safetensors` read only the header and raise :class:`IncompleteModelFileError`
naming the file, what is wrong and what to do.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from rope_leak.backends.errors import IncompleteModelFileError

_FIX = ("Fix: download or copy the file again (compare its size and sha256 with the source), "
        "or pass another model.")

# GGUF metadata value types: struct format of the fixed-size ones (little-endian).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Reader:
    def __init__(self, handle, size: int) -> None:
        self.handle, self.size = handle, size

    def read(self, n: int) -> bytes:
        data = self.handle.read(n)
        if len(data) < n:
            raise _Truncated
        return data

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def skip(self, n: int) -> None:
        if self.handle.tell() + n > self.size:
            raise _Truncated
        self.handle.seek(n, 1)

    def string(self) -> bytes:
        n = self.unpack("<Q")
        if n > self.size:
            raise _Truncated
        return self.read(n)

    def value(self, kind: int):
        if kind in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return self.string()
        if kind == _GGUF_ARRAY:
            inner, count = self.unpack("<I"), self.unpack("<Q")
            if inner in _GGUF_SCALARS:
                self.skip(count * struct.calcsize(_GGUF_SCALARS[inner]))
            else:
                for _ in range(count):
                    self.value(inner)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")


def _incomplete(path: Path, what: str) -> IncompleteModelFileError:
    return IncompleteModelFileError(f"model file {path} is incomplete or corrupt: {what}. {_FIX}")


def check_gguf(path: str | Path) -> None:
    """Raise :class:`IncompleteModelFileError` unless ``path`` is a whole GGUF file: its
    header parses and the file holds every tensor's bytes (offset + size, per the
    quantisation type's block size) after the aligned data start."""
    # deferred: gguf (~70 ms to import) is needed for .gguf files only
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            r = _Reader(handle, size)
            if r.read(4) != b"GGUF":
                raise _incomplete(path, "it does not start with the GGUF magic bytes")
            version, n_tensors, n_kv = r.unpack("<I"), r.unpack("<Q"), r.unpack("<Q")
            if version < 2 or n_tensors > size or n_kv > size:
                raise _incomplete(path, f"implausible header (version {version}, {n_tensors} tensors)")
            alignment = 32
            for _ in range(n_kv):
                key = r.string()
                kind = r.unpack("<I")
                value = r.value(kind)
                if key == b"general.alignment" and isinstance(value, int):
                    alignment = value
            end = 0
            for _ in range(n_tensors):
                name = r.string().decode("utf-8", "replace")
                dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
                kind, offset = r.unpack("<I"), r.unpack("<Q")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                except (ValueError, KeyError):
                    raise _incomplete(path, f"tensor {name!r} has an unknown type {kind}") from None
                n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
                if n_elements % block:
                    raise _incomplete(path, f"tensor {name!r} of shape {dims} does not fill whole blocks")
                end = max(end, offset + n_elements // block * type_size)
            start = -(-handle.tell() // alignment) * alignment
    except _Truncated:
        raise _incomplete(path, f"its header ends early (the file has {size} bytes)") from None
    except (ValueError, UnicodeDecodeError, struct.error) as err:
        if isinstance(err, IncompleteModelFileError):
            raise
        raise _incomplete(path, f"its header cannot be read ({err})") from None
    if start + end > size:
        raise _incomplete(path, f"its header declares {start + end} bytes of tensors but the file has "
                                f"{size} ({100 * size / (start + end):.0f}%): it was truncated")


_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                         "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path: str | Path) -> None:
    """Raise :class:`IncompleteModelFileError` unless ``path`` is a whole safetensors file:
    an 8-byte header length, a JSON header, and every tensor's ``data_offsets`` inside the
    file and matching its dtype and shape."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise _incomplete(path, f"it has {size} bytes, fewer than the 8-byte header length")
        n = struct.unpack("<Q", raw)[0]
        if 8 + n > size:
            raise _incomplete(path, f"its header declares {n} bytes but the file has {size}: it was truncated")
        try:
            header = json.loads(handle.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _incomplete(path, f"its JSON header cannot be read ({err})") from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            expected = int(np.prod(info["shape"], dtype=np.int64)) * _SAFETENSORS_ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise _incomplete(path, f"tensor {name!r} has a malformed header entry") from None
        if stop - begin != expected:
            raise _incomplete(path, f"tensor {name!r} ({info['dtype']} {info['shape']}) spans {stop - begin} "
                                    f"bytes instead of {expected}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise _incomplete(path, f"its header declares {8 + n + end} bytes but the file has {size} "
                                f"({100 * size / (8 + n + end):.0f}%): it was truncated")


def check_model_files(kind: str, path: str | Path) -> None:
    """Check what :func:`rope_leak.backends.load_model` is about to read: a ``.gguf`` file, or
    every ``*.safetensors`` file of a Hugging Face folder."""
    path = Path(path)
    if kind == "gguf":
        check_gguf(path)
    elif kind == "hf_folder":
        for file in sorted(path.glob("*.safetensors")):
            check_safetensors(file)
