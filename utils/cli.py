"""The command-line convention of every entry point (``prepare.*``, train_stage*.py, evaluate.py, ``retrieval.search``,
bench/*.py), in one place. See docs/cli.md.

- Arguments are parsed before torch, torchvision or the models are imported, so ``--help`` and usage errors answer
  at once.
- A mistake in the user's input (a bad path, option, config key, YAML file, checkpoint, prepared directory, ...) is
  ONE line on stderr, ``error: <what was given, naming the file or option, and what was expected>``, exit status 2,
  no traceback. argparse's usage errors follow it too (``ArgumentParser``). Only ``UserError`` (raised by our code
  where it checks the user's input) and ``OSError`` (a file the OS cannot open, read or write: the message names
  the path) count as such.
- Anything else is a bug in this code: it keeps its traceback (exit status 1). A ``ValueError`` raised inside numpy,
  torch or our own arithmetic is one; a value the user gave that our code refuses is ``InvalidValue``.
- Ctrl-C: one line on stderr, exit status 130.

This module is in ``utils/``, the leaf package every layer may import (the models raise ``InvalidValue`` too); it
imports nothing but the standard library at import time (``resolve_device``, the one ``--device`` rule, imports torch
when it is called).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

ERROR_EXIT = 2
INTERRUPT_EXIT = 130


class UserError(Exception):
    """Base of the errors a user's input causes (PrepareError, PreparedDataError, CheckpointError, SearchError, ...).

    The message names the file (and line, key or option) and what was expected."""


class InvalidValue(UserError, ValueError):
    """A value the user gave (a flag, a config key, a file's content) that our code refuses; also a ValueError, for
    the callers that validate values (ConfigError, CheckpointMismatch, the models' checks of their settings)."""


# What ``run_guarded`` turns into one ``error:`` line: our own UserErrors and the OS's (missing file, permissions,
# full disk: the message names the path). Not ValueError: one raised inside numpy or torch is a bug (a traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)


def one_line(message: object) -> str:
    """The message with every run of whitespace (newlines of a YAML error, say) collapsed to one space."""
    return " ".join(str(message).split())


def fail(message: object) -> int:
    """Print ``error: MESSAGE`` as one line on stderr; return the exit status 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return ERROR_EXIT


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line usage errors: ``error: MESSAGE (see PROG --help)``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ERROR_EXIT, f"error: {one_line(message)} (see {self.prog} --help)\n")


def run_guarded(body: Callable[[], int | None], errors: tuple[type[BaseException], ...] = USER_ERRORS,
                interrupted: str = "interrupted") -> int:
    """Run ``body()`` (everything after argument parsing); its exit status, 0 when it returns None. An exception of
    ``errors`` becomes one ``error:`` line and status 2, Ctrl-C the line ``interrupted`` and status 130."""
    try:
        rc = body()
    except errors as e:
        return fail(e)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return INTERRUPT_EXIT
    return 0 if rc is None else rc


def resolve_device(name: str):
    """A ``--device`` value -> ``torch.device``: auto = the GPU when there is one, else the CPU; cpu, cuda or cuda:N as
    given, when this machine has it. Raises InvalidValue otherwise. (torch is imported here, after parsing.)"""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise InvalidValue(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if name != "cpu" and not torch.cuda.is_available():
        raise InvalidValue(f"--device {name}: CUDA is not available here (use --device cpu or auto)")
    return torch.device(name)


def check_model_inputs(checkpoint, data) -> None:
    """The two paths every command that loads a trained model takes (``retrieval.search``, ``retrieval.browse``), checked
    before torch is imported: the checkpoint file and the prepared directory. Raises UserError."""
    from pathlib import Path

    if not Path(checkpoint).is_file():
        raise UserError(f"--checkpoint {checkpoint}: checkpoint not found (expected a .pt file written by "
                        f"train_stage1.py / train_stage2.py, e.g. RUN_DIR/checkpoint_best.pt)")
    if not (Path(data) / "manifest.json").is_file():
        raise UserError(f"--data {data}: not a prepared directory (no manifest.json; run "
                        f"python -m prepare.<dataset> first)")
