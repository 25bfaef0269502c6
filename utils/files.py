"""Outputs written whole or not at all: a temporary sibling renamed into place only when complete, so a process killed
at any moment leaves the previous file (or directory) or the new one, never part of one. Standard library only.

    with atomic_write(path) as f:        # a binary (or mode="w" text) file object; renamed onto path at the end
        torch.save(state, f)
    write_json(obj, path)                # JSON (results, sidecars, search output) the same way
    with atomic_dir(out) as tmp:         # a directory filled in tmp, then swapped in for out
        ...
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` (parents are created); when the block ends without an error the file is
    flushed to disk and renamed onto ``path`` (replacing what was there), on any error it is removed and ``path`` is
    untouched. The file gets the permissions of any new file (``mkstemp`` alone would make it private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(obj: Any, path: str | Path) -> None:
    """``obj`` as indented UTF-8 JSON (numpy scalars as floats) plus a newline, written atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, default=float)
        f.write("\n")


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory ``OUT.tmp-XXXX``; when the block ends without an error it replaces ``out``
    (a directory or file that was there is removed), on any error it is removed, with the parents this call made."""
    out = Path(out).absolute()
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should be like any new directory
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # parents we created, innermost first
            try:
                p.rmdir()
            except OSError:
                break
        raise
