"""Read MATLAB .mat files into plain Python values: the authors' dictionary (``prepare.dictionary``, for
``--dictionary``) and the MatConvNet networks (the converter, ``matconvnet/``, which imports it from here).

The 128-byte header decides the reader: ``MATLAB 5.0 MAT-file`` (Level 5, MATLAB's ``-v6``/``-v7``, possibly
compressed) is read with ``scipy.io.loadmat``; ``MATLAB 7.3 MAT-file`` (HDF5 with a 512-byte user block) with h5py.
Only the requested variables are read (a released MSCOCO checkpoint is over 1 GB and also holds ``state``).

Both readers return the same plain values:

* numeric / logical array -> ``np.ndarray`` in MATLAB's shape and axis order (a Fortran-ordered view, no copy);
* char array -> ``str``;
* cell array -> ``list`` (column-major order; a 1-element cell is a 1-element list);
* struct (any size, including 1x1) -> ``list[dict]`` (use ``one()`` for a scalar struct);
* empty array ``[]`` -> an empty ndarray (shape with a 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from prepare.core import PrepareError

V5, V73 = "v5", "v7.3"


class MatError(PrepareError):
    """A .mat file that cannot be read, or does not hold what the caller expects."""


def mat_version(path: str | Path) -> str:
    """'v5' (Level 5 / -v7) or 'v7.3' (HDF5) from the 128-byte header; MatError for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(128)
    except OSError as e:
        raise MatError(f"{path}: cannot read ({e.strerror or e})") from None
    if head.startswith(b"MATLAB 7.3 MAT-file"):
        return V73
    if head.startswith(b"MATLAB 5.0 MAT-file"):
        if len(head) < 128:
            raise MatError(f"{path}: truncated MAT file ({len(head)} bytes, shorter than the 128-byte header)")
        return V5
    raise MatError(f"{path}: not a MATLAB v5/v7/v7.3 MAT-file (header starts {head[:24]!r}; "
                   f"expected 'MATLAB 5.0 MAT-file' or 'MATLAB 7.3 MAT-file')")


def variables(path: str | Path) -> list[str]:
    """Names of the top-level variables, without reading their data."""
    path = Path(path)
    try:
        if mat_version(path) == V73:
            import h5py
            with h5py.File(path, "r") as f:
                return [k for k in f.keys() if k != "#refs#" and not k.startswith("#")]
        from scipy.io import whosmat
        return [name for name, _, _ in whosmat(str(path))]
    except MatError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a broken file; re-raised naming it
        raise MatError(f"{path}: cannot list the variables ({type(e).__name__}: {e}); truncated or corrupt file?"
                       ) from None


def load(path: str | Path, names: Sequence[str]) -> dict[str, Any]:
    """{name: plain value} of the requested top-level variables (each must exist)."""
    path = Path(path)
    present = variables(path)
    missing = [n for n in names if n not in present]
    if missing:
        raise MatError(f"{path}: no variable {missing[0]!r} (variables in the file: {present})")
    try:
        if mat_version(path) == V73:
            return _load_h5(path, names)
        from scipy.io import loadmat
        raw = loadmat(str(path), variable_names=list(names), squeeze_me=False, struct_as_record=True,
                      chars_as_strings=True, mat_dtype=False, verify_compressed_data_integrity=True)
        out = {n: _from_scipy(raw.pop(n)) for n in names}
        del raw
        return out
    except MatError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MatError(f"{path}: cannot read variables {list(names)} ({type(e).__name__}: {e}); "
                       f"truncated or corrupt file?") from None


def one(value: Any, where: str) -> dict[str, Any]:
    """The single element of a 1x1 struct (a list of one dict)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        return value[0]
    raise MatError(f"{where}: expected a 1x1 struct, got {describe(value)}")


def describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of size {list(value.shape)}"
    if isinstance(value, list):
        return f"a list (cell or struct array) of {len(value)} elements"
    return type(value).__name__


# ------------------------------------------------------------------------------------------------ scipy (v5/v7)
def _from_scipy(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        if x.dtype.names is not None:  # struct array
            return [{f: _from_scipy(el[f]) for f in x.dtype.names} for el in x.ravel(order="F")]
        if x.dtype == object:  # cell array
            return [_from_scipy(el) for el in x.ravel(order="F")]
        if x.dtype.kind == "U":  # char array (rows joined)
            return "".join(str(s) for s in x.ravel(order="F"))
        return x
    if isinstance(x, str):
        return x
    return x


# ------------------------------------------------------------------------------------------------ h5py (v7.3)
def _attr(obj: Any, name: str) -> str | None:
    value = obj.attrs.get(name)
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _load_h5(path: Path, names: Sequence[str]) -> dict[str, Any]:
    import h5py
    with h5py.File(path, "r") as f:
        return {n: _from_h5(f, f[n]) for n in names}


def _from_h5(f: Any, obj: Any) -> Any:
    import h5py
    cls = _attr(obj, "MATLAB_class")
    if isinstance(obj, h5py.Group):
        if cls not in (None, "struct"):
            raise MatError(f"{obj.name}: unsupported MATLAB class {cls!r} (MATLAB objects cannot be read; "
                           f"expected a struct)")
        fields = list(obj.keys())
        datasets = {k: obj[k] for k in fields}
        # A struct ARRAY stores every field as a dataset of object references (one per element) without a
        # MATLAB_class; a 1x1 struct stores the values themselves.
        is_array = fields and all(isinstance(d, h5py.Dataset) and d.dtype == h5py.ref_dtype
                                  and _attr(d, "MATLAB_class") is None for d in datasets.values())
        if not is_array:
            return [{k: _from_h5(f, d) for k, d in datasets.items()}]
        refs = {k: np.asarray(d[()]).T.ravel(order="F") for k, d in datasets.items()}  # MATLAB order
        count = len(next(iter(refs.values())))
        return [{k: _from_h5(f, f[refs[k][i]]) for k in fields} for i in range(count)]
    # An empty array is stored as its dimensions (uint64) with MATLAB_empty = 1; only then read that attribute.
    empty = obj.attrs.get("MATLAB_empty") if obj.dtype == np.uint64 and obj.ndim == 1 else None
    if empty is not None and int(np.asarray(empty).ravel()[0]):
        if cls == "char":
            return ""
        if cls in ("cell", "struct"):
            return []
        dims = tuple(int(d) for d in np.asarray(obj[()]).ravel())
        return np.zeros(dims if len(dims) >= 2 else (0, 0), dtype=_H5_DTYPES.get(cls or "double", np.float64))
    if cls == "cell":
        refs = np.asarray(obj[()]).T  # MATLAB shape
        return [_from_h5(f, f[r]) for r in refs.ravel(order="F")]
    data = np.transpose(obj[()])  # h5py reverses MATLAB's axes; the transpose is a (Fortran-ordered) view
    if cls == "char":
        return "".join(chr(c) for c in np.asarray(data).ravel(order="F"))
    if cls == "logical":
        return data.astype(bool)
    if cls not in _H5_DTYPES:
        raise MatError(f"{obj.name}: unsupported MATLAB class {cls!r}")
    return data


_H5_DTYPES = {"double": np.float64, "single": np.float32, "int8": np.int8, "uint8": np.uint8, "int16": np.int16,
              "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64,
              "logical": np.uint8}
