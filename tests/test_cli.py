"""The command-line convention (utils/cli.py, docs/cli.md) on every entry point, as a user meets it: a process.

- ``--help`` and usage errors never import torch, torchvision or the models (``python -X importtime``);
- a usage error, and every mistake in a user's input tried here (bad path, config key, YAML, checkpoint, prepared
  directory, npz arrays, paper row, ...), is ONE line on stderr starting with ``error:`` and naming the file or option,
  exit status 2, no traceback;
- ``evaluate.py --embeddings`` never imports torchvision or the models.

Entry points are discovered (every root/prepare/matconvnet/engine/retrieval/bench ``*.py`` with a ``__main__`` block), so a new
one is checked without editing this file.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from utils.cli import ArgumentParser, InvalidValue, UserError, run_guarded
from tests.test_visualize_search import checkpoint, data, model, prepared  # noqa: F401  (shared fixtures)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:
    sys.path.append(str(ROOT / "bench"))  # bench/ scripts import their neighbours by name, as when run as scripts
import cli_speed  # noqa: E402  (bench/cli_speed.py: entry-point discovery and the -X importtime reader)

ENTRY_POINTS = cli_speed.entry_points()


def run(*cmd: str, importtime: bool = False) -> tuple[subprocess.CompletedProcess, list[str]]:
    """(process, heavy packages it imported); the process's stderr without the ``-X importtime`` report."""
    flags = ["-X", "importtime"] if importtime else []
    proc = subprocess.run([sys.executable, *flags, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=600)
    heavy = cli_speed.heavy_imports(proc.stderr)
    proc.stderr = "".join(line for line in proc.stderr.splitlines(keepends=True)
                          if not line.startswith("import time:"))
    return proc, heavy


def assert_user_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 2 and one stderr line ``error: ...`` that names every one of ``names``; returns that line."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def ep_id(ep: list[str]) -> str:
    return " ".join(ep)


# ------------------------------------------------------------------------------------------------ the helper itself
def test_argument_parser_error_is_one_line(capsys):
    p = ArgumentParser(prog="tool.py")
    p.add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "x"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: argument --n: invalid int value: 'x' (see tool.py --help)\n"


def test_run_guarded_user_errors_bugs_and_interrupts(capsys):
    def raise_(e: BaseException):
        def body():
            raise e
        return body

    assert run_guarded(raise_(UserError("data/x.yaml: line 3:\n  expected a mapping"))) == 2
    assert capsys.readouterr().err == "error: data/x.yaml: line 3: expected a mapping\n"
    assert run_guarded(raise_(FileNotFoundError(2, "No such file or directory", "a.npz"))) == 2
    assert "a.npz" in capsys.readouterr().err
    assert run_guarded(raise_(KeyboardInterrupt()), interrupted="interrupted: nothing written") == 130
    assert capsys.readouterr().err == "interrupted: nothing written\n"
    with pytest.raises(KeyError):  # a bug is not a user error: it keeps its traceback
        run_guarded(raise_(KeyError("x")))
    with pytest.raises(ValueError, match="cannot reshape"):  # nor is a ValueError, e.g. one raised inside numpy
        run_guarded(lambda: np.zeros(3).reshape(2, 2))
    assert run_guarded(raise_(InvalidValue("--n 3: expected an even number"))) == 2  # a value the user gave
    assert capsys.readouterr().err == "error: --n 3: expected an even number\n"
    assert run_guarded(lambda: None) == 0 and run_guarded(lambda: 3) == 3


def test_every_entry_point_is_discovered():
    found = {ep_id(ep) for ep in ENTRY_POINTS}
    assert {"train_stage1.py", "train_stage2.py", "evaluate.py", "-m retrieval.search", "-m prepare.flickr30k",
            "-m prepare.flickr8k", "-m prepare.coco", "-m prepare.cuhk_pedes", "-m prepare.synthetic",
            "-m prepare.synthetic_backbone", "-m matconvnet", "-m retrieval.browse", "bench/eval_speed.py",
            "bench/cli_speed.py"} <= found


# ------------------------------------------------------------------------------------------------ every entry point
@pytest.mark.parametrize("ep", ENTRY_POINTS, ids=ep_id)
def test_help_imports_no_torch(ep):
    proc, heavy = run(*ep, "--help", importtime=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-3000:]
    assert heavy == [], f"python {ep_id(ep)} --help imported {heavy}"
    check_help_examples(ep, proc.stdout)


def check_help_examples(ep: list[str], text: str) -> None:
    """What a --help text names exists as it says: every configs/*.yaml is a file, and for train_stageN.py a recipe
    of Stage N; every results file given to ``evaluate.py --table`` is one the staged scripts and the demo write
    (scripts/_pipeline.sh names it)."""
    from engine.config import load_config
    for config in re.findall(r"configs/[\w.-]+\.yaml", text):
        assert (ROOT / config).is_file(), f"{ep_id(ep)} --help names {config}, which does not exist"
        stage = re.fullmatch(r"train_stage(\d)\.py", ep[0])
        if stage:
            load_config(ROOT / config, stage=int(stage.group(1)))  # a Stage I file in Stage II's help raises
    pipeline = (ROOT / "scripts" / "_pipeline.sh").read_text()
    for table in re.findall(r"--table((?:\s+\S+\.json)+)", text):
        for name in table.split():
            assert Path(name).name in pipeline, f"{ep_id(ep)} --help: {name} is not a file the pipeline writes"


@pytest.mark.parametrize("ep", ENTRY_POINTS, ids=ep_id)
def test_usage_error_is_one_line_without_torch(ep):
    proc, heavy = run(*ep, "--no-such-option", importtime=True)
    assert_user_error(proc, "--help")  # argparse names the first problem it meets; the line points to --help
    assert heavy == [], f"python {ep_id(ep)} with a usage error imported {heavy}"


# ------------------------------------------------------------------------------------------------ training
def test_train_config_errors_name_the_file_before_torch(tmp_path):
    bad_yaml, bad_key = tmp_path / "bad.yaml", tmp_path / "key.yaml"
    bad_yaml.write_text("dropout: [0.5\n")
    bad_key.write_text("dropout: 0.5\ndropuot: 0.5\n")
    common = ["--data", str(tmp_path), "--out", str(tmp_path / "run")]
    for stage, config, names in ((1, tmp_path / "none.yaml", ["none.yaml", "not found"]),
                                 (1, bad_yaml, [bad_yaml, "YAML", "line"]),
                                 (2, bad_key, [bad_key, "dropuot", "dropout"])):
        extra = ["--init", str(tmp_path / "x.pt")] if stage == 2 else []
        proc, heavy = run(f"train_stage{stage}.py", "--config", str(config), *common, *extra, importtime=True)
        assert_user_error(proc, *names)
        assert heavy == [], heavy
    assert not (tmp_path / "run").exists()


def test_train_data_and_checkpoint_errors(tmp_path, prepared):  # noqa: F811
    demo = str(ROOT / "configs" / "demo.yaml")
    proc, _ = run("train_stage1.py", "--config", demo, "--data", str(tmp_path), "--out", str(tmp_path / "r1"))
    assert_user_error(proc, str(tmp_path), "manifest.json")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    proc, _ = run("train_stage2.py", "--config", demo, "--data", str(prepared), "--out", str(tmp_path / "r2"),
                  "--init", str(garbage), "--batch_size", "2", "--num_candidates", "2", "--pretrained", "none")
    assert_user_error(proc, garbage)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()  # a refused run leaves no directory


def test_train_mixed_up_weight_files_are_one_line_errors(tmp_path, prepared):  # noqa: F811
    """Issue 19: --pretrained with a file that is not a state dict, and --init with a plain state dict (the demo's
    backbone_resnet18.pth is an easy mix-up) are one error line each, and the refused run writes nothing."""
    import torch
    demo = str(ROOT / "configs" / "demo.yaml")
    small = ["--batch_size", "2", "--num_candidates", "2", "--train_crop", "32"]
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    for bad, words in ((garbage, ["--pretrained", "state dict"]), (tensor, ["--pretrained", "Tensor"])):
        proc, _ = run("train_stage1.py", "--config", demo, "--data", str(prepared), "--out", str(tmp_path / "r1"),
                      "--pretrained", str(bad), *small)
        assert_user_error(proc, bad, *words)
    backbone = tmp_path / "backbone_resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(65)}, backbone)
    proc, _ = run("train_stage2.py", "--config", demo, "--data", str(prepared), "--out", str(tmp_path / "r2"),
                  "--init", str(backbone), "--pretrained", "none", *small)
    line = assert_user_error(proc, backbone, "--init", "checkpoint_last.pt")
    assert "--pretrained" in line  # says where such a file belongs
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


# ------------------------------------------------------------------------------------------------ evaluate.py
def small_npz(path: Path, **replace: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"images": rng.standard_normal((4, 8)).astype(np.float32),
              "texts": rng.standard_normal((8, 8)).astype(np.float32),
              "image_labels": np.arange(4), "text_labels": np.repeat(np.arange(4), 2)}
    arrays.update(replace)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_evaluate_embeddings_imports_neither_torchvision_nor_models(tmp_path):
    npz = small_npz(tmp_path / "f.npz")
    proc, heavy = run("evaluate.py", "--embeddings", str(npz), "--out", str(tmp_path / "r.json"), importtime=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert heavy == ["torch"], heavy
    assert json.loads((tmp_path / "r.json").read_text())["num_texts"] == 8


def test_evaluate_input_errors(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK not a zip")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    cases = [
        (["--embeddings", str(tmp_path / "none.npz")], [tmp_path / "none.npz", "no such file"]),
        (["--embeddings", str(garbage)], [garbage]),
        (["--embeddings", str(single)], [single, "single array"]),
        (["--embeddings", str(small_npz(tmp_path / "m.npz", text_labels=None))], ["m.npz", "text_labels"]),
        (["--embeddings", str(small_npz(tmp_path / "d.npz", texts=np.zeros((8, 5), np.float32)))], ["d.npz", "(8, 5)"]),
        (["--embeddings", str(small_npz(tmp_path / "l.npz", image_labels=np.arange(3)))], ["l.npz", "(3,)"]),
        (["--embeddings", str(small_npz(tmp_path / "t.npz", text_labels=np.zeros(8, np.float32)))],
         ["t.npz", "text_labels", "integer labels"]),
        (["--embeddings", str(small_npz(tmp_path / "ok.npz")), "--compare-paper", "no/such/row"],
         ["no/such/row", "paper_results.yaml", "flickr30k/"]),
        (["--table", str(tmp_path / "none.json")], [tmp_path / "none.json"]),
        (["--table", str(garbage)], [garbage, "results JSON"]),
        (["--embeddings", str(tmp_path / "ok.npz"), "--visualize", "3"], ["--visualize", "--checkpoint"]),
        (["--embeddings", str(tmp_path / "ok.npz"), "--out", str(single / "r.json")], ["--out", single]),
        (["--embeddings", str(small_npz(tmp_path / "u.npz", text_labels=np.repeat(np.arange(4), 2) + 7))],
         ["u.npz", "no correct item"]),
        (["--embeddings", str(tmp_path / "ok.npz"), "--coco-1k"], ["ok.npz", "folds"]),
    ]
    for args, names in cases:
        proc, heavy = run("evaluate.py", *args, importtime=True)
        assert_user_error(proc, *names)
        assert "torchvision" not in heavy and "models" not in heavy, (args, heavy)


def test_a_bug_keeps_its_traceback_a_users_mistake_is_one_line(tmp_path):
    """The same scoring step of evaluate.py: labels without a match in the user's file are one ``error:`` line (exit
    2); a ValueError raised inside numpy (a bug, injected here) is not turned into one: traceback, exit status 1."""
    unmatched = small_npz(tmp_path / "u.npz", text_labels=np.repeat(np.arange(4), 2) + 7)
    assert_user_error(run("evaluate.py", "--embeddings", str(unmatched))[0], "u.npz", "no correct item")
    bug = ("import sys, numpy as np, engine.metrics as m, evaluate\n"
           "m.recall_metrics = lambda *a, **k: np.zeros(3).reshape(2, 2)  # a bug inside numpy\n"
           f"sys.exit(evaluate.main(['--embeddings', {str(small_npz(tmp_path / 'ok.npz'))!r}]))")
    proc, _ = run("-c", bug)
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1] == "ValueError: cannot reshape array of size 3 into shape (2,2)"
    assert "error:" not in proc.stderr


def test_evaluate_checkpoint_errors(tmp_path, prepared, checkpoint):  # noqa: F811
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    proc, _ = run("evaluate.py", "--checkpoint", str(garbage), "--data", str(prepared))
    assert_user_error(proc, garbage, "not a readable checkpoint")
    proc, _ = run("evaluate.py", "--checkpoint", str(checkpoint), "--data", str(tmp_path))
    assert_user_error(proc, tmp_path, "manifest.json")


# ------------------------------------------------------------------------------------------------ retrieval.search
def test_search_checkpoint_error(tmp_path, prepared):  # noqa: F811
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    img = tmp_path / "q.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(img)
    proc, _ = run("-m", "retrieval.search", "--checkpoint", str(garbage), "--data", str(prepared), "--image", str(img))
    assert_user_error(proc, garbage)
    proc, heavy = run("-m", "retrieval.search", "--checkpoint", str(garbage), "--data", str(prepared), "--query", "a",
                      importtime=True)
    assert_user_error(proc, "--images")
    assert heavy == [], heavy


def test_search_python_api_is_still_there():
    import retrieval.search as search
    import retrieval.index as index
    for name in search.API:
        assert getattr(search, name) is getattr(index, name)
    with pytest.raises(AttributeError):
        search.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------------------------ prepare.*
def test_prepare_input_errors(tmp_path):
    none = tmp_path / "none"
    w2v = ["--word2vec", "train"]
    cases = [
        (["-m", "prepare.flickr30k", "--images", str(none), "--captions", str(none / "c.token"), "--split-json",
          str(none / "s.json"), "--out", str(tmp_path / "o"), *w2v], [none]),
        (["-m", "prepare.flickr8k", "--images", str(none), "--captions", str(none / "c.token"), "--split-json",
          str(none / "s.json"), "--out", str(tmp_path / "o"), *w2v], [none]),
        (["-m", "prepare.coco", "--images", str(none), "--split-json", str(none / "s.json"), "--out",
          str(tmp_path / "o"), *w2v], [none]),
        (["-m", "prepare.cuhk_pedes", "--root", str(none), "--out", str(tmp_path / "o"), *w2v], [none]),
        (["-m", "prepare.synthetic_backbone", "--out", str(tmp_path / "b.pth"), "--exclude", str(none / "s.json")],
         [none / "s.json"]),
    ]
    for args, names in cases:
        proc, _ = run(*args)
        assert_user_error(proc, *names)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    proc, _ = run("-m", "prepare.synthetic", "--out", str(tmp_path / "full"), "--images", "10")
    assert_user_error(proc, tmp_path / "full", "--overwrite")
    (tmp_path / "file").write_text("x")
    proc, _ = run("-m", "prepare.synthetic", "--out", str(tmp_path / "file" / "sub"), "--images", "10")
    assert_user_error(proc, tmp_path / "file")
    assert not any(p.name.startswith(".") or "tmp" in p.name for p in tmp_path.iterdir())


def test_synthetic_backbone_archs_exist_in_models():
    from models.image_cnn import ARCHS
    from prepare import synthetic_backbone
    assert set(synthetic_backbone.ARCHS) <= set(ARCHS)
