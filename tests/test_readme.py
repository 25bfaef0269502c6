"""Every command in the README's (and the docs pages') fenced bash blocks is run by a test or by the demo, or parses;
every relative link of those pages resolves.

A python command (``python X.py ...`` / ``python -m M ...``) is executed in-process as ``__main__`` with argparse's
``parse_known_args`` wrapped: the entry point's own parser parses the documented arguments (required flags, types,
choices, unknown flags) and the wrapper then stops the entry point before it does any work. Training scripts take
config overrides as extra ``--key value`` pairs: each key must be a field of ``engine.config.Config``.
A ``bash SCRIPT`` command names a script that exists, is valid bash, reads the environment variables the command sets,
and is either run by a named test or by CI / the demo (``RUN_BY``); every python command inside it parses the same way
(its ``$VARIABLES`` replaced by a placeholder) and every config and paper row it names exists.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from engine.config import Config

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/install.md", "docs/data.md", "docs/training.md", "docs/evaluation.md", "docs/demo.md",
         "docs/fidelity.md", "docs/testing.md", "docs/matconvnet.md", "docs/browser.md", "docs/cli.md",
         "docs/recipes.md"]
TRAIN_SCRIPTS = {"train_stage1.py", "train_stage2.py"}
# scripts a documented command runs -> what runs them (a test as FILE::FUNCTION, or CI / the demo); None = nothing
# runs them (they need the real datasets): only their inner commands are checked
RUN_BY = {
    "scripts/demo.sh": "the demo itself (bash scripts/demo.sh; never run by the tests: ~12 minutes)",
    "scripts/test.sh": ".ci/run",
    "scripts/flickr8k.sh": "tests/test_scripts.py::test_flickr8k_script_runs_every_stage_then_skips",
    "scripts/flickr30k.sh": None,
    "scripts/coco.sh": None,
    "scripts/cuhk_pedes.sh": None,
    "bench/run_all.sh": None,
}
PLACEHOLDER = "1"  # stands for a shell variable: a valid path, int or float for argparse


def fenced_bash_commands(page: str) -> list[str]:
    """The commands of a markdown page's ```bash blocks: continuation lines joined, blank lines dropped."""
    text = (ROOT / page).read_text(encoding="utf-8")
    cmds: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if shlex.split(line, comments=True):
                cmds.append(line.strip())
    return cmds


def documented_commands() -> list[tuple[str, str]]:
    return [(page, cmd) for page in PAGES for cmd in fenced_bash_commands(page)]


def script_python_commands(script: str) -> list[str]:
    """``python ...`` commands inside a shell script (after ``||`` / ``&&`` too); ``python -c`` is skipped."""
    text = (ROOT / script).read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        for part in re.split(r"\|\||&&|;", line):
            part = part.strip()
            if part.startswith("python ") and not part.startswith("python -c"):
                out.append(part)
    return out


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, extras: list[str]):
        super().__init__()
        self.parser, self.namespace, self.extras = parser, namespace, extras


def parse_only(argv: list[str], monkeypatch: pytest.MonkeyPatch, cwd: Path) -> _Parsed:
    """Run ``python ARGV`` in-process as __main__ until its argparse parser has parsed the arguments; nothing more."""
    original = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        namespace, extras = original(self, args, namespace)
        raise _Parsed(self, namespace, extras)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
    monkeypatch.chdir(cwd)  # were an entry point to run after all, it would write under a temporary directory
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" for imported modules
            if argv[0] == "-m":
                monkeypatch.setattr(sys, "argv", [argv[1], *argv[2:]])
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                monkeypatch.setattr(sys, "argv", [str(ROOT / argv[0]), *argv[1:]])
                monkeypatch.syspath_prepend(str((ROOT / argv[0]).parent))  # as `python X.py` does
                runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    except _Parsed as parsed:
        return parsed
    except SystemExit as e:
        raise AssertionError(f"python {shlex.join(argv)}: exit {e.code} while parsing: {err.getvalue().strip()}")
    finally:
        monkeypatch.undo()
    raise AssertionError(f"python {shlex.join(argv)}: returned without parsing arguments with argparse")


def check_python(argv: list[str], monkeypatch: pytest.MonkeyPatch, cwd: Path) -> None:
    parsed = parse_only(argv, monkeypatch, cwd)
    options = set(parsed.parser._option_string_actions)
    for tok in argv:  # spelled out in full: argparse would also take an abbreviation such as --split-list
        if tok.startswith("--") and tok not in parsed.extras:
            assert tok.split("=")[0] in options, f"python {shlex.join(argv)}: {tok} is not spelled as {sorted(options)}"
    if argv[0] in TRAIN_SCRIPTS:  # extras are config overrides: --key value
        keys = {f.name for f in dataclasses.fields(Config)}
        for tok in parsed.extras:
            if tok.startswith("--"):
                assert tok[2:].split("=")[0] in keys, f"{shlex.join(argv)}: {tok} is no config key"
    else:
        assert not parsed.extras, f"python {shlex.join(argv)}: unrecognized arguments {parsed.extras}"


def shell_words(cmd: str) -> tuple[dict[str, str], list[str]]:
    """(environment assignments, words) of one documented command; a ``$VAR`` word becomes a placeholder."""
    words = shlex.split(cmd, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    out = []
    for w in words:
        if w in ("$@", "${@}") or re.fullmatch(r"\$\{\w+\[@\]\}", w):
            continue  # an array expansion: extra arguments, none in the documented form
        out.append(PLACEHOLDER if "$" in w else w)
    return env, out


def python_argv(words: list[str]) -> list[str]:
    assert words[0] == "python", words
    return words[1:]


def names_in(text: str) -> tuple[set[str], set[str]]:
    """Config files and paper rows a command line or script mentions."""
    configs = set(re.findall(r"configs/[\w.-]+\.yaml", text))
    rows = set(re.findall(r"--compare-paper\s+([\w./-]+)", text))
    return configs, rows


PAPER_ROWS = {r["id"] for r in yaml.safe_load((ROOT / "configs/paper_results.yaml").read_text())["rows"]}


def check_names(text: str, where: str) -> None:
    configs, rows = names_in(text)
    for c in configs:
        assert (ROOT / c).is_file(), f"{where}: {c} does not exist"
    for r in rows:
        assert r in PAPER_ROWS, f"{where}: --compare-paper {r} is not a row of configs/paper_results.yaml"


def check_bash(env: dict[str, str], words: list[str], monkeypatch: pytest.MonkeyPatch, cwd: Path) -> None:
    script = words[1]
    assert (ROOT / script).is_file(), f"{script} does not exist"
    assert script in RUN_BY, f"{script}: say in RUN_BY what runs it (a test, CI, the demo) or None"
    how = RUN_BY[script]
    if how and "::" in how:
        test_file, func = how.split("::")
        assert f"def {func}(" in (ROOT / test_file).read_text(), f"{script}: {how} does not exist"
    elif how == ".ci/run":
        assert script in (ROOT / ".ci/run").read_text()
    syntax = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert syntax.returncode == 0, f"{script}: {syntax.stderr}"
    text = (ROOT / script).read_text(encoding="utf-8")
    for var in env:
        assert re.search(rf"\${{?{var}\b", text), f"{script} does not read the variable {var}"
    check_names(text, script)
    for inner in script_python_commands(script):
        argv = python_argv(shell_words(inner)[1])
        if argv:  # not a helper's `python "$@"`
            check_python(argv, monkeypatch, cwd)
    if script == "bench/run_all.sh":  # its arguments go to every benchmark script it runs
        for bench in sorted(set(re.findall(r"bench/\w+\.py", text))):
            check_python([bench, *words[2:]], monkeypatch, cwd)


def test_pages_have_commands() -> None:
    readme = fenced_bash_commands("README.md")
    assert "bash scripts/demo.sh" in " ".join(readme) and "bash scripts/test.sh" in " ".join(readme)
    assert len(documented_commands()) >= 20


@pytest.mark.parametrize("page,cmd", [pytest.param(p, c, id=f"{p}:{c[:40]}") for p, c in documented_commands()])
def test_documented_command_is_run_or_parses(page: str, cmd: str, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    env, words = shell_words(cmd)
    check_names(cmd, page)
    if words[0] == "bash":
        check_bash(env, words, monkeypatch, tmp_path)
    elif words[0] == "python":
        check_python(python_argv(words), monkeypatch, tmp_path)
    elif words[0] == "tensorboard":
        assert (Path(sys.executable).parent / "tensorboard").is_file() and words[1] == "--logdir"
    else:
        pytest.fail(f"{page}: {cmd!r}: no rule says how this command is checked")


def test_parse_only_rejects_what_the_parser_rejects(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The check is not a rubber stamp: a bad choice, an unknown flag, a missing required flag and a bad config key
    all fail, and nothing is written."""
    bad = [["evaluate.py", "--embeddings", "f.npz", "--split", "tset"],
           ["-m", "prepare.flickr30k", "--images", "i", "--captions", "c", "--split-json", "s", "--word2vec", "w",
            "--out", "o", "--no-such-flag"],
           ["-m", "prepare.cuhk_pedes", "--root", "r", "--word2vec", "w"],
           ["train_stage1.py", "--config", "c.yaml", "--data", "d", "--out", "o", "--dropuot", "0.5"],
           ["-m", "prepare.flickr8k", "--images", "i", "--captions", "c", "--split-list", "s", "--word2vec", "w",
            "--out", "o"]]
    for argv in bad:
        with pytest.raises(AssertionError):
            check_python(argv, monkeypatch, tmp_path)
    assert not any(tmp_path.iterdir())


# Pages that colleagues write on their own branches; README links them already. Remove a name once its page is merged.
PENDING_PAGES: set[str] = set()  # pages linked before they exist (none now)


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / page).parent / path if path else ROOT / page
        rel = file.resolve().relative_to(ROOT).as_posix()
        if rel in PENDING_PAGES:
            continue
        assert file.is_file(), f"{page}: link {target} -> {rel} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", file.read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{page}: no heading for #{anchor} in {rel}"


def test_install_page_names_every_pinned_package() -> None:
    """docs/install.md says what requirements.txt installs: every pinned package is named there."""
    page = (ROOT / "docs" / "install.md").read_text(encoding="utf-8").lower()
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==", (ROOT / "requirements.txt").read_text(), flags=re.M)
    assert len(pins) > 10
    missing = [p for p in pins if not re.search(rf"\b{re.escape(p.lower())}\b", page)]
    assert not missing, f"docs/install.md does not name {missing}"
