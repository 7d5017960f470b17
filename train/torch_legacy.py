"""Read a LEGACY (pre-zip, torch < 1.6) PyTorch .pth state dict with numpy alone: no torch.

The legacy format is five things back to back in one file:

1. pickle: the magic number 0x1950a86a20f9469cfc6c
2. pickle: the protocol version (1001)
3. pickle: sys-info ({"little_endian": True, "type_sizes": {...}, ...})
4. pickle: the state dict; each tensor is `torch._utils._rebuild_tensor_v2(storage, offset,
   size, stride, ...)` whose storage is a persistent id ("storage", StorageType, key,
   location, numel, view_metadata)
5. pickle: the list of storage keys; then, for each key in that order, an int64 element
   count followed by the storage's raw data (in the byte order sys-info names).

Unpickling runs with an allow-list of globals, so a crafted file cannot call anything else.

    from nebula.train.torch_legacy import load_state_dict
    weights = load_state_dict("model.pth")   # {name: np.ndarray}
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch storage class name -> numpy dtype of one element (bfloat16 is read as its raw 16 bits).
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchLegacyError(ValueError):
    """The file is missing, truncated, or not a legacy-format PyTorch state dict (one line, names the file)."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Storage:
    """A storage named in the pickle; its data is read after the pickle, from the file's tail."""

    def __init__(self, storage_type: _StorageType, key: str, numel: int):
        self.type = storage_type
        self.key = key
        self.numel = numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor whose storage data is not read yet: (storage, offset, size, stride) in elements."""

    def __init__(self, storage, offset, size, stride):
        if isinstance(storage, tuple):  # an old-style storage view: (storage, view offset)
            storage, view_offset = storage
            offset += view_offset
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("a tensor refers to something that is not a storage")
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.data
        if not self.size:
            return flat[self.offset].copy()
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n)
        if self.offset < 0 or (all(self.size) and last >= len(flat)):
            raise pickle.UnpicklingError(f"a tensor reaches past its storage {self.storage.key}")
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=tuple(s * item for s in self.stride), writeable=False
        )
        array = np.ascontiguousarray(view)
        if self.storage.type.name == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles the state dict: only allow-listed globals, storages collected by key."""

    def __init__(self, file, byteorder: str):
        super().__init__(file)
        self.byteorder = byteorder
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) == 6):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:60]}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("a storage of unknown type")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(storage_type, key, int(numel))
        if view_metadata is not None:  # (view key, offset, size): a view into `storage`
            _view_key, offset, _size = view_metadata
            return storage, int(offset)
        return storage


def _resolve(obj):
    """Replace every _TensorRef in a (nested) container by its numpy array."""
    if isinstance(obj, _TensorRef):
        return obj.to_numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v)) for k, v in obj.items()) if isinstance(obj, collections.OrderedDict) else {
            k: _resolve(v) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def _plain_load(stream):
    """A header pickle: plain data only, no globals at all."""

    class _NoGlobals(pickle.Unpickler):
        def find_class(self, module, name):
            raise pickle.UnpicklingError(f"global {module}.{name} in a header")

    return _NoGlobals(stream).load()


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{name: array} from a legacy-format .pth file; raises TorchLegacyError with one line on bad input."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise TorchLegacyError(f"{path}: cannot read ({err.strerror or err})") from None
    if raw[:4] == b"PK\x03\x04":
        raise TorchLegacyError(f"{path}: a zip-format PyTorch file (torch >= 1.6), not the legacy format")
    stream = io.BytesIO(raw)
    try:
        magic = _plain_load(stream)
        if magic != MAGIC_NUMBER:
            raise TorchLegacyError(f"{path}: not a legacy PyTorch file (wrong magic number)")
        protocol = _plain_load(stream)
        if protocol != PROTOCOL_VERSION:
            raise TorchLegacyError(f"{path}: unsupported legacy protocol version {protocol!r}")
        sys_info = _plain_load(stream)
        byteorder = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
        unpickler = _StateDictUnpickler(stream, byteorder)
        result = unpickler.load()
        keys = _plain_load(stream)
    except TorchLegacyError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        cause = "truncated" if isinstance(err, EOFError) else f"{type(err).__name__}: {err}"
        raise TorchLegacyError(f"{path}: not a readable legacy PyTorch state dict ({cause})") from None
    if not isinstance(keys, list) or set(map(str, keys)) != set(unpickler.storages):
        raise TorchLegacyError(f"{path}: the storage key list does not match the storages the state dict uses")

    offset = stream.tell()
    for key in keys:
        storage = unpickler.storages[key]
        dtype = storage.type.dtype.newbyteorder(byteorder)
        if offset + 8 > len(raw):
            raise TorchLegacyError(f"{path}: truncated (storage {key} is missing)")
        numel = int(np.frombuffer(raw, dtype=f"{byteorder}i8", count=1, offset=offset)[0])
        offset += 8
        if numel != storage.numel:
            raise TorchLegacyError(f"{path}: storage {key} has {numel} elements, the state dict says {storage.numel}")
        nbytes = numel * dtype.itemsize
        if offset + nbytes > len(raw):
            raise TorchLegacyError(f"{path}: truncated (storage {key} needs {nbytes} bytes, {len(raw) - offset} left)")
        storage.data = np.frombuffer(raw, dtype=dtype, count=numel, offset=offset).astype(dtype.newbyteorder("="))
        offset += nbytes
    try:
        state = _resolve(result)
    except pickle.UnpicklingError as err:
        raise TorchLegacyError(f"{path}: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a checkpoint that wraps it
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TorchLegacyError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)
