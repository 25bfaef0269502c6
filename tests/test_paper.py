"""configs/paper_results.yaml read back through engine.paper, and the comparison table."""
from __future__ import annotations

import pytest

from engine.paper import available_rows, compare_with_paper, load_paper_rows


def test_rows_match_the_spec_for_hand_checked_rows():
    rows = load_paper_rows()
    r = rows["flickr30k/resnet50/stage2"]  # spec 9.1, Ours (ResNet-50) Stage II
    assert r["i2t"] == {"R@1": 53.9, "R@5": 80.9, "R@10": 89.9, "medr": 1}
    assert r["t2i"] == {"R@1": 39.2, "R@5": 69.8, "R@10": 80.8, "medr": 2}
    assert (r["dataset"], r["split"], r["protocol"], r["source"], r["confirmed"]) == \
        ("flickr30k", "test", "flickr30k-1k-test", "[paper-v1]", True)
    c = rows["cuhk-pedes/resnet50/stage2"]  # spec 9.4, Ours (ResNet-50) Stage II, text->image only
    assert c["t2i"] == {"R@1": 44.40, "R@5": 66.26, "R@10": 75.07, "medr": 2} and "i2t" not in c
    assert c["protocol"] == "cuhk-pedes-test"


def test_row_inventory_and_flags():
    rows = load_paper_rows()
    assert sum(r["dataset"] == "flickr30k" and r["split"] == "test" for r in rows.values()) == 6
    val = [r for r in rows.values() if r["split"] == "val"]
    assert len(val) == 9 and all(set(r["i2t"]) == {"R@1", "R@10"} == set(r["t2i"]) for r in val)
    assert rows["coco/resnet50/stage2/1k"]["confirmed"] is False
    assert rows["coco/resnet50/stage2/1k"]["source"] == "[unconfirmed]"
    assert rows["coco/resnet50/stage2/5k"]["i2t"]["R@1"] == 41.2 and "medr" not in rows["coco/resnet50/stage2/5k"]["i2t"]
    assert [k for k in rows if k.startswith("cuhk-pedes/")] == [
        "cuhk-pedes/vgg16/stage1", "cuhk-pedes/vgg16/stage2", "cuhk-pedes/resnet50/stage1", "cuhk-pedes/resnet50/stage2"]
    assert available_rows() == list(rows)


def test_compare_table_arithmetic():
    ours = {"i2t": {"R@1": 50.0, "R@5": 81.4, "R@10": 89.9, "medr": 2.0, "meanr": 5.0},
            "t2i": {"R@1": 40.25, "R@5": 69.8, "R@10": 80.0, "medr": 2.0, "meanr": 9.0}, "rsum": 411.35,
            "protocol": "flickr30k-1k-test", "split": "test"}
    md = compare_with_paper(ours, "flickr30k/resnet50/stage2")
    assert "flickr30k/resnet50/stage2" in md and "[paper-v1]" in md and "confirmed" in md
    assert "WARNING" not in md
    assert "| i2t R@1 | 53.90 | 50.00 | -3.90 |" in md
    assert "| i2t R@5 | 80.90 | 81.40 | +0.50 |" in md
    assert "| i2t medr | 1.00 | 2.00 | +1.00 |" in md
    assert "| t2i R@1 | 39.20 | 40.25 | +1.05 |" in md
    assert "| t2i R@10 | 80.80 | 80.00 | -0.80 |" in md
    assert "meanr" not in md  # only the paper row's metrics
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + 8  # header + 8 metrics


def test_compare_missing_values_and_unconfirmed():
    md = compare_with_paper({"t2i": {"R@1": 44.4}}, "cuhk-pedes/resnet50/stage2")
    assert "| t2i R@1 | 44.40 | 44.40 | +0.00 |" in md and "| t2i R@5 | 66.26 | — | — |" in md
    assert "i2t" not in md.split("| metric")[1]
    assert "UNCONFIRMED" in compare_with_paper({}, "coco/resnet50/stage2/1k")


def test_protocol_and_split_mismatch_warn():
    md = compare_with_paper({"i2t": {"R@1": 60.0}, "protocol": "coco-5k", "split": "test"}, "coco/resnet50/stage2/1k")
    assert "WARNING: our protocol is 'coco-5k'" in md and "'coco-1k'" in md
    md = compare_with_paper({"i2t": {"R@1": 60.0}, "split": "test"}, "flickr30k-val/table2/full/stage2")
    assert "WARNING: our split is 'test'" in md


def test_unknown_row_lists_choices():
    with pytest.raises(ValueError) as err:
        compare_with_paper({}, "flickr30k/resnet51/stage2")
    msg = str(err.value)
    assert "flickr30k/resnet51/stage2" in msg and "flickr30k/resnet50/stage2" in msg and "cuhk-pedes/vgg16/stage1" in msg


def test_malformed_file_is_rejected(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("rows:\n  - id: x\n    dataset: d\n")
    with pytest.raises(ValueError, match="lacks"):
        load_paper_rows(bad)


def test_compare_states_which_split_produced_the_numbers():
    ours = {"i2t": {"R@1": 50.0}, "split": "test", "protocol": "flickr30k-1k-test"}
    md = compare_with_paper({**ours, "split_mode": "flickr8k_lists"}, "flickr30k/resnet50/stage2")
    assert "Split: ours flickr8k_lists; the paper's flickr8k_lists" in md and "NOTE" not in md
    md = compare_with_paper({**ours, "split_mode": "karpathy_json"}, "flickr30k/resnet50/stage2")
    assert "Split: ours karpathy_json; the paper's flickr8k_lists" in md and "another image split" in md
    md = compare_with_paper({"i2t": {"R@1": 40.0}, "split_mode": "karpathy_json"}, "coco/resnet50/stage2/5k")
    assert "matlab_random" in md and "cannot be rebuilt" in md and "another image split" in md
    md = compare_with_paper({"t2i": {"R@1": 40.0}, "split_mode": "official"}, "cuhk-pedes/vgg16/stage2")
    assert "Split: ours official; the paper's official" in md and "NOTE" not in md
    assert "ours unknown" in compare_with_paper({}, "flickr30k/vgg19/stage1")
