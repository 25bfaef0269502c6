"""The paper's reported numbers (configs/paper_results.yaml) and a side-by-side table with our results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from utils.cli import InvalidValue

__all__ = ["DEFAULT_PATH", "load_paper_rows", "load_paper_splits", "available_rows", "compare_with_paper"]

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "configs" / "paper_results.yaml"
REQUIRED = ("id", "dataset", "split", "protocol", "description", "source", "confirmed")
DIRECTIONS = ("i2t", "t2i")
METRICS = ("R@1", "R@5", "R@10", "medr")
SOURCES = ("[paper-v1]", "[3rd-party table]", "[unconfirmed]")


def load_paper_rows(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Rows of the paper-results file keyed by id (e.g. ``flickr30k/resnet50/stage2``), in file order.

    Each row: id, dataset, split, protocol, description, source, confirmed, and "i2t"/"t2i" dicts of the metrics
    the paper gives (R@1/R@5/R@10 in percent, medr). Raises InvalidValue on a malformed file.
    """
    path = Path(path) if path is not None else DEFAULT_PATH
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise InvalidValue(f"{path}: expected a mapping with a 'rows' list")
    rows: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(data["rows"]):
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise InvalidValue(f"{path}: row {i} ({row.get('id', '?')}) lacks {missing}")
        if row["id"] in rows:
            raise InvalidValue(f"{path}: duplicate row id {row['id']!r}")
        if row["source"] not in SOURCES:
            raise InvalidValue(f"{path}: row {row['id']!r} has source {row['source']!r}; expected one of {SOURCES}")
        if not any(d in row for d in DIRECTIONS):
            raise InvalidValue(f"{path}: row {row['id']!r} has no i2t/t2i metrics")
        for d in DIRECTIONS:
            bad = set(row.get(d, {})) - set(METRICS)
            if bad:
                raise InvalidValue(f"{path}: row {row['id']!r} {d} has unknown metrics {sorted(bad)}")
        rows[row["id"]] = row
    return rows


def load_paper_splits(path: str | Path | None = None) -> dict[str, dict[str, str]]:
    """dataset -> {"split_mode", "description"}: the split each dataset's paper numbers come from."""
    path = Path(path) if path is not None else DEFAULT_PATH
    data = yaml.safe_load(path.read_text())
    splits = data.get("paper_splits", {}) if isinstance(data, dict) else {}
    for name, s in splits.items():
        if not isinstance(s, dict) or not {"split_mode", "description"} <= set(s):
            raise InvalidValue(f"{path}: paper_splits.{name} needs split_mode and description")
    return splits


def split_lines(results: dict[str, Any], dataset: str, path: str | Path | None = None) -> list[str]:
    """Which split produced our numbers (the manifest's split_mode) and the paper's, with a note when they differ."""
    paper = load_paper_splits(path).get(dataset)
    ours = results.get("split_mode")
    if paper is None:
        return []
    lines = [f"Split: ours {ours or 'unknown (not in the results)'}; the paper's {paper['split_mode']} "
             f"({paper['description']})."]
    if ours != paper["split_mode"]:
        lines.append("NOTE: our numbers come from another image split than the paper's: comparable in protocol "
                     "and size, not image for image.")
    return lines


def available_rows(path: str | Path | None = None) -> list[str]:
    """All row ids of the paper-results file."""
    return list(load_paper_rows(path))


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def compare_with_paper(results: dict[str, Any], row_id: str, path: str | Path | None = None) -> str:
    """Markdown table ``metric | paper | ours | difference (ours − paper)`` for every metric of paper row ``row_id``.

    ``results`` has our shape ({"i2t": {...}, "t2i": {...}, optional "protocol", "split"}). A header names the row,
    its source and whether it is confirmed; a WARNING line is added when ``results["protocol"]`` or
    ``results["split"]`` (when present) differs from the row's. Unknown ``row_id`` → InvalidValue listing valid ids.
    """
    rows = load_paper_rows(path)
    if row_id not in rows:
        raise InvalidValue(f"unknown paper row {row_id!r}; available rows: {list(rows)}")
    row = rows[row_id]
    lines = [f"**Paper row `{row_id}`**: {row['description']}",
             f"Source {row['source']}, {'confirmed' if row['confirmed'] else 'UNCONFIRMED (a target, not a fact)'}; "
             f"dataset {row['dataset']}, split {row['split']}, protocol {row['protocol']}."]
    for key in ("protocol", "split"):
        if key in results and results[key] != row[key]:
            lines.append(f"WARNING: our {key} is {results[key]!r} but the paper row's is {row[key]!r}: "
                         "the numbers are not comparable.")
    lines += split_lines(results, row["dataset"], path)
    lines += ["", "| metric | paper | ours | difference (ours − paper) |", "|---|---:|---:|---:|"]
    for d in DIRECTIONS:
        for m in METRICS:
            if m not in row.get(d, {}):
                continue
            paper = float(row[d][m])
            ours = results.get(d, {}).get(m)
            diff = None if ours is None else float(ours) - paper
            sign = "" if diff is None or diff < 0 else "+"
            lines.append(f"| {d} {m} | {_fmt(paper)} | {_fmt(ours)} | {sign}{_fmt(diff)} |")
    return "\n".join(lines) + "\n"
