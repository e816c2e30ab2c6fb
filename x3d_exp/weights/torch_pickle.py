"""Read PyTorch checkpoints (`torch.save` files) into numpy arrays, without torch and without running their code.

A `.pyth`/`.pth` file is a pickle, and unpickling runs whatever callables the file names. The unpickler here
resolves names only from a small allow-list, each to a function of ours that builds plain data: tensors come
back as numpy arrays, containers as dicts and lists. Any other name (`os.system`, a model class, ...) stops the
load before anything from the file is called.

Both layouts `torch.save` has written are read:
- zip (torch >= 1.6): `<prefix>/data.pkl` plus one raw record `<prefix>/data/<key>` per storage;
- legacy: five pickles in a row (magic number, protocol version, system info, the object, the storage keys),
  then each storage as an int64 element count and its raw little-endian bytes.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np

from x3d_exp.errors import CheckpointError, UnsafeCheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Sealed:
    """A reader object a pickle may pass around but never modify: pickle's BUILD would otherwise overwrite
    fields this module has checked (a tensor's size and stride bound what as_strided reads)."""

    def __setstate__(self, state):
        raise UnsafeCheckpointError("the checkpoint tries to overwrite the state of a tensor or storage")


@dataclass(frozen=True)
class _StorageType(_Sealed):
    name: str
    dtype: np.dtype


# bfloat16 has no numpy dtype: read as uint16 and widened to float32 when the tensor is built.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Storage(_Sealed):
    """One storage record; its bytes are read on first use."""

    def __init__(self, storage_type: _StorageType, numel: int, read: Optional[Callable[[], bytes]] = None,
                 swap_bytes: bool = False):
        self.type = storage_type
        self.numel = numel
        self._read = read
        self._swap = swap_bytes
        self._array: Optional[np.ndarray] = None

    def fill(self, read: Callable[[], bytes]) -> None:
        self._read = read

    def array(self) -> np.ndarray:
        if self._array is None:
            if self._read is None:
                raise CheckpointError(f"storage of {self.type.name} has no data record")
            data = self._read()
            itemsize = np.dtype(self.type.dtype).itemsize
            if len(data) < self.numel * itemsize:
                raise CheckpointError(f"storage record holds {len(data)} bytes, {self.numel * itemsize} expected")
            array = np.frombuffer(data, dtype=self.type.dtype, count=self.numel)
            self._array = array.byteswap() if self._swap else array
        return self._array


class _StorageView(_Sealed):
    """A legacy-format storage that starts `offset` elements into another one."""

    def __init__(self, base: _Storage, offset: int, numel: int):
        self.type = base.type
        self._base, self._offset, self.numel = base, offset, numel

    def array(self) -> np.ndarray:
        base = self._base.array()
        if self._offset + self.numel > base.size:
            raise CheckpointError("storage view reaches past its storage")
        return base[self._offset:self._offset + self.numel]


class _TensorRef(_Sealed):
    """A tensor to build once its storage can be read (legacy files store the bytes after the pickle)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def build(self) -> np.ndarray:
        # Checked here, at the one place they are used: as_strided reads whatever memory they point it at.
        if not isinstance(self.storage, (_Storage, _StorageView)):
            raise CheckpointError(f"tensor rebuilt from {type(self.storage).__name__}, not a storage")
        size, stride = self.size, self.stride
        if (not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride)
                or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in (self.offset, *size, *stride))):
            raise CheckpointError(f"tensor with offset {self.offset!r}, size {size!r}, stride {stride!r}")
        flat = self.storage.array()
        if 0 in size:
            out = np.zeros(size, dtype=flat.dtype)
        else:
            last = self.offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= flat.size:
                raise CheckpointError(f"tensor of size {size} reaches element {last} of a storage of {flat.size}")
            view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=size,
                                                   strides=[s * flat.itemsize for s in stride], writeable=False)
            out = np.array(view)
        if self.storage.type.name == "BFloat16Storage":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    # metadata carries conj/neg bits, which never appear on saved weights.
    if metadata:
        raise CheckpointError(f"tensor with metadata {metadata!r} is not supported")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles spell `bytes` as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return text.encode("latin1")


def _numpy_dtype(spec, align=False, copy=False):
    # Checkpoints written by training frameworks hold numpy scalars in their metadata (e.g. a best score).
    dtype = np.dtype(spec)
    if dtype.hasobject:
        raise UnsafeCheckpointError("numpy object dtypes are not allowed")
    return dtype


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or dtype.fields or not isinstance(data, bytes):
        raise UnsafeCheckpointError(f"numpy scalar of dtype {dtype!r} is not allowed (plain numbers only)")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _allowed_globals() -> Dict[tuple, Any]:
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy", "dtype"): _numpy_dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        for module in ("torch", "torch.cuda"):
            allowed[(module, name)] = _StorageType(name, np.dtype(dtype))
    return allowed


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load: Callable[[tuple], Any]):
        super().__init__(file, encoding="utf-8")
        self._persistent_load = persistent_load

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {module}.{name}: a checkpoint may only hold tensors and plain containers "
                "(the file may try to run code; re-save just the state dict if you trust it)") from None

    def persistent_load(self, pid):
        return self._persistent_load(pid)


def _storage_type(pid: tuple) -> _StorageType:
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" or not isinstance(pid[1], _StorageType):
        raise CheckpointError(f"unsupported persistent id {pid!r:.80}")
    return pid[1]


def _resolve(obj):
    """Replace every tensor reference by its array, keeping container types."""
    if isinstance(obj, _TensorRef):
        return obj.build()
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _resolve(value)
        return out
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    return obj


def _load_zip(archive: zipfile.ZipFile) -> Any:
    pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError("zip file without exactly one data.pkl: not a torch.save checkpoint")
    prefix = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    swap = False
    if f"{prefix}byteorder" in names:
        order = archive.read(f"{prefix}byteorder").decode("ascii", "replace")
        if order not in ("little", "big"):
            raise CheckpointError(f"unknown byte order {order!r}")
        swap = order == "big"
    storages: Dict[str, _Storage] = {}

    def persistent_load(pid):
        storage_type = _storage_type(pid)
        key, numel = pid[2], pid[4]
        record = f"{prefix}data/{key}"
        if not isinstance(key, str) or record not in names:
            raise CheckpointError(f"storage record {record!r} is missing")
        if key not in storages:
            storages[key] = _Storage(storage_type, numel, lambda: archive.read(record), swap)
        return storages[key]

    return _resolve(_RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), persistent_load).load())


def _load_legacy(stream) -> Any:
    def no_storage(pid):
        raise CheckpointError("storage reference outside the checkpoint's object")

    try:
        magic = _RestrictedUnpickler(stream, no_storage).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"not a PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if magic != LEGACY_MAGIC:
        raise CheckpointError("not a PyTorch checkpoint (no zip archive and no legacy magic number)")
    _RestrictedUnpickler(stream, no_storage).load()  # protocol version
    sys_info = _RestrictedUnpickler(stream, no_storage).load()
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise CheckpointError("legacy checkpoints from big-endian machines are not supported")
    storages: Dict[str, _Storage] = {}

    def persistent_load(pid):
        storage_type = _storage_type(pid)
        key, numel = pid[2], pid[4]
        view = pid[5] if len(pid) > 5 else None
        if key not in storages:
            storages[key] = _Storage(storage_type, numel)
        if view is None:
            return storages[key]
        _view_key, offset, view_numel = view
        return _StorageView(storages[key], offset, view_numel)

    obj = _RestrictedUnpickler(stream, persistent_load).load()
    keys = _RestrictedUnpickler(stream, no_storage).load()
    for key in keys:
        if key not in storages:
            raise CheckpointError(f"storage {key!r} listed but never used")
        storage = storages[key]
        (count,) = struct.unpack("<q", stream.read(8))
        itemsize = storage.type.dtype.itemsize
        if count != storage.numel:
            raise CheckpointError(f"storage {key!r} holds {count} elements, {storage.numel} expected")
        data = stream.read(count * itemsize)
        storage.fill(lambda data=data: data)
    return _resolve(obj)


def load_torch_checkpoint(path: str) -> Any:
    """The object `torch.save` wrote to `path`, tensors as numpy arrays. Never executes code from the file."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return _load_zip(archive)
        with open(path, "rb") as stream:
            return _load_legacy(stream)
    except CheckpointError:
        raise
    # Whatever a truncated or hand-edited file makes the parser trip over.
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, TypeError, ValueError, KeyError,
            IndexError) as err:
        raise CheckpointError(f"damaged or unsupported checkpoint ({type(err).__name__}: {err})") from None
