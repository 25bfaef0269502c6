"""The figures the docs can derive are checked against what they derive from, so they cannot drift:

- the entry points: ``docs/cli.md``'s table lists every one that ``tests/test_cli.py`` discovers, every "N entry
  points" in the docs is that number, and the latest ``--help`` timings (BENCHMARKS.md section 7) time every one;
- ``docs/fidelity.md``: every test it names exists in the file it names, and every pin of ``tests/test_pins.py`` and
  ``tests/test_recipes.py`` is named there (a new pin cannot leave a row saying "none");
- the MatConvNet converter's memory figures in ``docs/matconvnet.md`` are those of the latest run of
  ``bench/convert_memory.py`` (BENCHMARKS.md section 9).
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:
    sys.path.append(str(ROOT / "bench"))  # bench/ scripts import their neighbours by name
import cli_speed  # noqa: E402  (bench/cli_speed.py: the entry-point discovery test_cli.py uses)

ENTRY_POINTS = [" ".join(ep) for ep in cli_speed.entry_points()]


def read(page: str) -> str:
    return (ROOT / page).read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a markdown heading line) up to the next heading of the same level."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n") + len(heading)
    nxt = re.search(rf"^{level} ", text[start:], re.M)
    return text[start:start + nxt.start()] if nxt else text[start:]


def latest_run(benchmarks_section: str) -> str:
    """The last ``### date — title`` block of a BENCHMARKS.md section."""
    return benchmarks_section[benchmarks_section.rindex("\n### "):]


# ------------------------------------------------------------------------------------------------ entry points
def cli_table_entry_points() -> set[str]:
    """The first table of docs/cli.md, first column: ``python -m prepare.coco`` / ``flickr8k`` (a bare name continues
    the module's package), ``evaluate.py``, ``bench/*.py``; returned as the discovery writes them (-m M, PATH.py)."""
    rows = re.search(r"^\| entry point .*?\n\n", read("docs/cli.md"), re.M | re.S).group(0).splitlines()[2:]
    found, package = set(), ""
    for row in rows:
        for span in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            if span.startswith("python -m "):
                module = span[len("python -m "):]
                package = module.rpartition(".")[0]
                found.add(f"-m {module}")
            elif span.endswith(".py"):
                found.add(span)
            else:
                found.add(f"-m {package}.{span}")
    return found


def test_cli_md_lists_every_entry_point():
    listed = cli_table_entry_points()
    bench = {ep for ep in ENTRY_POINTS if ep.startswith("bench/")}
    assert "bench/*.py" in listed and bench
    assert listed - {"bench/*.py"} == set(ENTRY_POINTS) - bench


def test_every_count_of_entry_points_is_the_number_discovered():
    for page in ("README.md", "BENCHMARKS.md", "docs/cli.md", "docs/testing.md"):
        for m in re.finditer(r"(\d+) entry points", read(page)):
            assert int(m.group(1)) == len(ENTRY_POINTS), (page, m.group(0), len(ENTRY_POINTS))


def test_latest_help_timings_cover_every_entry_point():
    run = latest_run(section(read("BENCHMARKS.md"), "## 7. Command lines: --help and evaluate.py --embeddings"))
    timed = set(re.findall(r"^\| `python (.+) --help` \|", run, re.M))
    assert timed == set(ENTRY_POINTS), (sorted(set(ENTRY_POINTS) - timed), sorted(timed - set(ENTRY_POINTS)))


# ------------------------------------------------------------------------------------------------ fidelity
def fidelity_citations() -> set[tuple[str, str]]:
    """(test file, test function) named in the test column of docs/fidelity.md's tables; a function belongs to the
    last file named before it in its cell."""
    cited = set()
    for line in read("docs/fidelity.md").splitlines():
        if not line.startswith("| ") or line.startswith(("| spec ", "|---")):
            continue
        current = None
        for span in re.findall(r"`([^`]+)`", line.rstrip(" |").rsplit(" | ", 1)[-1]):
            if re.fullmatch(r"(tests/)?test_\w+\.py", span):
                current = Path(span).name
            elif re.fullmatch(r"test_\w+", span):
                assert current, f"docs/fidelity.md names {span} without its file: {line[:80]}"
                cited.add((current, span))
    return cited


def functions_of(file: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / file).read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_fidelity_names_tests_that_exist():
    cited = fidelity_citations()
    assert len(cited) > 50
    missing = sorted(f"{file}::{fn}" for file, fn in cited if fn not in functions_of(file))
    assert missing == [], missing


def test_every_pin_is_named_in_the_fidelity_table():
    cited = fidelity_citations()
    unnamed = sorted(f"{file}::{fn}" for file in ("test_pins.py", "test_recipes.py") for fn in functions_of(file)
                     if (file, fn) not in cited)
    assert unnamed == [], unnamed


# ------------------------------------------------------------------------------------------------ converter memory
def test_converter_memory_figures_come_from_the_benchmark():
    doc = section(read("docs/matconvnet.md"), "## Memory")
    run = latest_run(section(read("BENCHMARKS.md"), "## 9. MatConvNet converter: memory"))
    assert "python -m matconvnet model" in run and "--small" not in run  # a full-size run, not the smoke test
    measured = set(re.findall(r"\d[\d.,]*\d|\d", run))  # every number of the run's notes and table
    quoted = re.findall(r"(\d[\d.,]*) (?:MB|s\b|M parameters)", doc) + re.findall(r"(\d+\.\d+)×", doc)
    assert len(quoted) >= 6 and all(q in measured for q in quoted), (quoted, sorted(measured))


def test_demo_range_is_the_measured_one_everywhere():
    """The range scripts/demo.sh prints is the one README's range table shows and the min-max of docs/demo.md's
    per-seed table (the measured runs), for each stage."""
    printed = re.search(r"test rsum (\d+\.\d)–(\d+\.\d) after Stage I and (\d+\.\d)–(\d+\.\d) after Stage II",
                        read("scripts/demo.sh"))
    assert printed, "scripts/demo.sh no longer prints the measured range"
    ranges = {"Stage I": printed.group(1, 2), "Stage II": printed.group(3, 4)}
    readme = read("README.md")
    per_seed = re.findall(r"^\| (\d) \| [^|]+ \| [^|]+ \| ([\d.]+) \| [^|]+ \| [^|]+ \| ([\d.]+) \| \d+ \|$",
                          read("docs/demo.md"), re.M)
    assert sorted(int(s) for s, _, _ in per_seed) == [0, 1, 2, 3, 4]
    for col, (stage, (lo, hi)) in enumerate(ranges.items(), start=1):
        assert re.search(rf"^\| {stage} \|.*\| {lo}–{hi} \|$", readme, re.M), (stage, lo, hi)
        values = [float(row[col]) for row in per_seed]
        assert (f"{min(values):.1f}", f"{max(values):.1f}") == (lo, hi), (stage, values)
