"""Make ``import torchvision`` work next to a CPU build of torch.

PyPI's torchvision 0.28.0 wheel is a CUDA build. Next to the CPU torch its C++ extension ``_C.so`` cannot
load, and ``import torchvision`` then dies in ``_meta_registrations.py`` with
``RuntimeError: operator torchvision::nms does not exist`` because it registers fake kernels for ops that were
never defined. We need only the pure-Python parts (``torchvision.models``), so:

1. try to load the real extension exactly as torchvision would (on a GPU host this succeeds and we stop);
2. only if that fails, *define* the schemas of the ops that torchvision registers fakes for unconditionally
   (``torchvision::nms`` and ``torchvision::qnms``) with ``torch.library``, without any implementation.

Calling those ops would still fail (there is no kernel), which is right: nothing in this project uses them.
Import this module before anything imports torchvision (``models/__init__.py`` and ``tests/conftest.py`` do).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the torch.library.Library alive for the process lifetime
extension_loaded: bool | None = None


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def _try_load_extension() -> bool:
    """Load torchvision's ``_C`` library without importing torchvision (which would fail first)."""
    if "torchvision" in sys.modules:  # already imported successfully: nothing to guard
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    pkg_dir = list(spec.submodule_search_locations)[0]
    for fname in os.listdir(pkg_dir):
        if fname.startswith("_C") and fname.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(pkg_dir, fname))
                return True
            except (OSError, RuntimeError):
                return False
    return False


def install() -> bool:
    """Idempotent. Returns True when the real extension is loaded, False when stub schemas were defined."""
    global _library, extension_loaded
    if extension_loaded is not None:
        return extension_loaded
    extension_loaded = _try_load_extension()
    missing = [name for name in _SCHEMAS if not _op_exists(name)]
    if missing:
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _library.define(_SCHEMAS[name])
    return extension_loaded


install()
