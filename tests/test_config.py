"""Recipes as data (engine/config.py, engine/train_cli.py): validation with helpful errors, per-stage sections,
command-line overrides, and every YAML under configs/ carrying the spec's values (spec 6.3, 7.1-7.5).

(Resuming with a changed recipe, and the resolved config in RUN_DIR/config.yaml and in checkpoints, are checked on
real runs in tests/test_training.py and tests/test_checkpoints.py.)
"""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import CHOICES, Config, ConfigError, config_from_dict, load_config, parse_overrides
from engine.train_cli import parse

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NOT_RECIPES = {"paper_results.yaml"}  # reported numbers, not a training recipe


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------- validation
def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "dropuot: 0.5\n"))
    msg = str(err.value)
    assert "'dropuot'" in msg and "Did you mean" in msg and "'dropout'" in msg
    assert "Valid keys" in msg and "lambda_rank" in msg and "num_candidates" in msg
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        load_config(None, {"lr": 0.1})


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "dropout: high\n"))
    assert "'dropout'" in str(err.value) and "float" in str(err.value) and "'high'" in str(err.value)
    for key, value, kind in (("batch_size", 32.5, "int"), ("batch_size", True, "int"), ("nesterov", "yes", "bool"),
                             ("lr_schedule", "240", "list")):
        with pytest.raises(ConfigError, match=f"'{key}' must be of type {kind}"):
            load_config(None, {key: value})
    assert load_config(None, {"base_lr": 1}).base_lr == 1.0 and isinstance(load_config(None, {"base_lr": 1}).base_lr,
                                                                             float)  # int -> float is fine


def test_bad_choice_lists_choices(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "arch: resnet34\n"))
    msg = str(err.value)
    assert "'arch'" in msg and "resnet34" in msg
    assert all(a in msg for a in CHOICES["arch"])
    with pytest.raises(ConfigError, match="'negatives' must be one of"):
        load_config(None, {"negatives": "semi-hard"})
    with pytest.raises(ConfigError, match="'stage' must be one of"):
        load_config(None, {"stage": 3})


def test_workers_is_auto_or_a_count_and_auto_follows_the_device():
    """``workers`` (a runtime key, default auto): 'auto' or an integer >= 0, nothing else. auto is 1 on CPU whatever
    the cores; on CUDA the cores per torchrun process minus 2, between 1 and 16 (a 2-worker default starved the
    GPU step: docs/training.md). A number is kept as given on either device."""
    import torch

    from engine.data import resolve_workers

    assert Config().workers == "auto" and load_config(None, {"workers": 0}).workers == 0
    assert load_config(None, {"workers": "auto"}).workers == "auto"
    for bad in (-1, "many", True, 1.5, None):
        with pytest.raises(ConfigError, match="'workers' must be 'auto' or an integer >= 0"):
            load_config(None, {"workers": bad})
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU
    assert [resolve_workers("auto", cpu, cores=c) for c in (1, 2, 64)] == [1, 1, 1]
    assert [resolve_workers("auto", cuda, cores=c, local_processes=1) for c in (1, 2, 3, 4, 16, 17, 18, 128)] == \
        [1, 1, 1, 2, 14, 15, 16, 16]
    assert [resolve_workers("auto", cuda, cores=64, local_processes=n) for n in (1, 4, 8, 64)] == [16, 14, 6, 1]
    assert resolve_workers(0, cuda, cores=16) == 0 and resolve_workers(3, cpu) == 3


@pytest.mark.parametrize("schedule", [[], [[40]], [[40, 1.0, 2]], [[0, 1.0]], [[-1, 1.0]], [[40, "fast"]],
                                      [40, 1.0], [[1.5, 1.0]]])
def test_malformed_lr_schedule_rejected(schedule):
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_config(None, {"lr_schedule": schedule})


def test_lr_schedule_epochs_and_factors():
    cfg = Config(lr_schedule=[[40, 1.0], [20, 0.1]])
    assert cfg.epochs == 60
    assert [cfg.lr_factor(e) for e in (0, 39, 40, 59)] == [1.0, 1.0, 0.1, 0.1]


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_inherit_and_circular_inherit(tmp_path):
    write(tmp_path, "dropout: 0.3\nbatch_size: 16\n", "base.yaml")
    cfg = load_config(write(tmp_path, "inherit: base.yaml\nbatch_size: 8\n"))
    assert (cfg.dropout, cfg.batch_size) == (0.3, 8)
    write(tmp_path, "inherit: b.yaml\n", "a.yaml")
    write(tmp_path, "inherit: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_checkpoint_config_round_trip():
    cfg = load_config(CONFIGS / "flickr30k_stage2.yaml", stage=2)
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({**cfg.to_dict(), "bogus": 1})


# ------------------------------------------------------------------------------------------------- stages
def test_demo_sections_differ_per_stage():
    s1 = load_config(CONFIGS / "demo.yaml", stage=1)
    s2 = load_config(CONFIGS / "demo.yaml", stage=2)
    assert (s1.stage, s2.stage) == (1, 2)
    assert s1.lr_schedule != s2.lr_schedule
    assert s1.lambda_rank == 0.0 and s2.lambda_rank == 2.0 and s2.lambda_txt == 0.1
    # the shared keys are the same
    for key in ("arch", "pretrained", "train_crop", "feature_dim", "text_width", "dataset", "batch_size"):
        assert getattr(s1, key) == getattr(s2, key), key


def test_single_stage_recipe_refuses_other_stage():
    with pytest.raises(ConfigError, match="Stage 1 recipe"):
        load_config(CONFIGS / "flickr30k_stage1.yaml", stage=2)
    with pytest.raises(ConfigError, match="Stage 2 recipe"):
        load_config(CONFIGS / "coco_stage2.yaml", stage=1)


def recipe_stages() -> list[tuple[str, int]]:
    out = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        if path.name in NOT_RECIPES:
            continue
        if "_stage1" in path.stem:
            out.append((path.name, 1))
        elif "_stage2" in path.stem:
            out.append((path.name, 2))
        else:  # demo.yaml, flickr8k.yaml: both stages in one file
            out += [(path.name, 1), (path.name, 2)]
    return out


def test_recipe_list_is_complete():
    names = {n for n, _ in recipe_stages()}
    assert {"demo.yaml", "flickr8k.yaml", "flickr30k_stage1.yaml", "flickr30k_stage2.yaml", "coco_stage1.yaml",
            "coco_stage2.yaml", "cuhk_pedes_stage1.yaml", "cuhk_pedes_stage2.yaml"} <= names


@pytest.mark.parametrize("name,stage", recipe_stages())
def test_every_recipe_loads_for_its_stage(name, stage):
    cfg = load_config(CONFIGS / name, stage=stage)
    assert cfg.stage == stage
    # the paper's optimiser everywhere (spec 7.1) and the Stage I / Stage II loss structure (spec 6.3)
    assert (cfg.momentum, cfg.nesterov, cfg.weight_decay) == (0.9, True, 1e-4)
    assert cfg.lambda_img == 1.0
    if stage == 1:
        assert cfg.lambda_rank == 0.0 and cfg.lambda_txt == 1.0
    else:
        assert cfg.lambda_rank == 2.0 and cfg.margin == 1.0
    if name != "demo.yaml":  # the paper's model; the demo is a documented CPU-sized variant
        assert (cfg.pretrained, cfg.train_crop, cfg.feature_dim, cfg.text_width) == ("imagenet", 224, 2048, 1.0)
        assert cfg.arch == "resnet50" or f"_{cfg.arch}_" in name  # each row's backbone: tests/test_recipes.py
        assert (cfg.batch_size, cfg.base_lr) == (32, 0.1)


SPEC_VALUES = {  # spec 6.1, 6.3, 7.4, 7.5
    ("flickr30k_stage1.yaml", 1): dict(lr_schedule=[[240, 1.0]], dropout=0.75, classifier_bias=True,
                                       lambda_img=1.0, lambda_txt=1.0, dataset="flickr30k"),
    ("flickr30k_stage2.yaml", 2): dict(lr_schedule=[[40, 1.0], [20, 0.1]], lambda_rank=2.0, lambda_img=1.0,
                                       lambda_txt=0.1, margin=1.0, negatives="hard", num_candidates=256,
                                       dropout=0.75, classifier_bias=True),
    ("coco_stage1.yaml", 1): dict(classifier_bias=False, dropout=0.5, lr_schedule=[[75, 1.0]], dataset="coco"),
    ("coco_stage2.yaml", 2): dict(classifier_bias=False, dropout=0.5, lr_schedule=[[15, 1.0], [5, 0.1]],
                                  lambda_rank=2.0, lambda_img=1.0, lambda_txt=0.1, negatives="hard",
                                  num_candidates=256),
    ("cuhk_pedes_stage1.yaml", 1): dict(dropout=0.8, classifier_bias=True, lr_schedule=[[150, 1.0]],
                                        dataset="cuhk_pedes"),
    ("cuhk_pedes_stage2.yaml", 2): dict(negatives="random", lambda_rank=2.0, lambda_img=1.0, lambda_txt=0.5,
                                        dropout=0.8, classifier_bias=True, lr_schedule=[[40, 1.0], [20, 0.1]]),
    ("flickr8k.yaml", 1): dict(dataset="flickr8k", dropout=0.75, lambda_rank=0.0),
    ("flickr8k.yaml", 2): dict(dataset="flickr8k", lambda_rank=2.0, lambda_img=1.0, lambda_txt=0.1,
                               negatives="hard", dropout=0.75),
}


@pytest.mark.parametrize("name,stage", sorted(SPEC_VALUES))
def test_recipe_carries_spec_values(name, stage):
    cfg = load_config(CONFIGS / name, stage=stage)
    got = {k: getattr(cfg, k) for k in SPEC_VALUES[name, stage]}
    assert got == SPEC_VALUES[name, stage]


# ------------------------------------------------------------------------------------------------- command line
def test_parse_overrides():
    assert parse_overrides(["--dropout", "0.5", "--lr_schedule", "[[2, 1.0]]", "--nesterov=false",
                            "--text-width", "0.25", "--arch", "resnet18"]) == {
        "dropout": 0.5, "lr_schedule": [[2, 1.0]], "nesterov": False, "text_width": 0.25, "arch": "resnet18"}
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--dropout"])
    with pytest.raises(ConfigError, match="--key value"):
        parse_overrides(["dropout", "0.5"])


def test_overrides_apply_after_file_and_section():
    cfg = load_config(CONFIGS / "demo.yaml", parse_overrides(["--dropout", "0.2", "--lr_schedule", "[[2, 1.0]]",
                                                             "--lambda_rank", "1"]), stage=2)
    assert (cfg.dropout, cfg.lr_schedule, cfg.lambda_rank) == (0.2, [[2, 1.0]], 1.0)
    assert cfg.num_candidates == 64  # from the stage2 section
    with pytest.raises(ConfigError, match="command line"):
        load_config(CONFIGS / "demo.yaml", {"dropout": "high"}, stage=1)


def test_cli_parse(tmp_path, capsys):
    args, overrides = parse(2, ["--config", "configs/demo.yaml", "--data", "d", "--out", "o", "--init", "i.pt",
                                "--dropout", "0.5", "--lr_schedule", "[[2, 1.0]]"])
    assert (args.config, args.data, args.out, args.init, args.resume) == ("configs/demo.yaml", "d", "o", "i.pt",
                                                                           "auto")
    assert overrides == {"dropout": 0.5, "lr_schedule": [[2, 1.0]]}
    with pytest.raises(SystemExit):
        parse(2, ["--config", "c", "--data", "d", "--out", "o"])  # Stage II needs --init
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse(1, ["--config", "c", "--data", "d", "--out", "o", "stray"])
    assert "overrides are --key value" in capsys.readouterr().err


def test_cli_reports_config_errors(tmp_path, capsys):
    from engine.train_cli import main

    rc = main(1, ["--config", str(CONFIGS / "demo.yaml"), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                  "--dropuot", "0.5"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown key 'dropuot'" in err and "dropout" in err


def test_lr_mults_from_file_and_command_line(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("stage2:\n  lr_mults: {backbone_conv: 0.5, backbone_conv1: 0.5}\n")
    assert load_config(cfg_file, stage=2).lr_mults == {"backbone_conv": 0.5, "backbone_conv1": 0.5}
    assert load_config(cfg_file, stage=1).lr_mults == {}  # the paper's multipliers
    over = parse_overrides(["--lr_mults", "{new_conv: 0.3}"])
    assert load_config(cfg_file, over, stage=2).lr_mults == {"new_conv": 0.3}


def test_lr_mults_errors_name_the_file_and_the_groups(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr_mults: {backbone_cov: 0.5}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown parameter group 'backbone_cov'.*backbone_conv"):
        load_config(cfg_file, stage=2)
    cfg_file.write_text("lr_mults: {backbone_conv: 0.5}\n")  # shared by both stages: Stage I freezes it
    with pytest.raises(ConfigError, match="frozen in Stage I"):
        load_config(cfg_file, stage=1)
    cfg_file.write_text("lr_mults: [1, 2]\n")
    with pytest.raises(ConfigError, match="'lr_mults' must be of type dict"):
        load_config(cfg_file, stage=2)


def test_config_choices_match_the_models_lists():
    """engine/config.py keeps its own choice lists (it must import before torch, for fast --help); they must stay
    equal to the lists the models define, or a valid config would fail late (or an invalid one pass)."""
    from engine.config import CHOICES
    from models.image_cnn import ARCHS, STYLES
    from models.losses import RANKING_LOSSES
    from models.spec import TEXT_STAGES
    assert set(CHOICES["arch"]) == set(ARCHS)
    assert set(CHOICES["text_depth"]) == set(TEXT_STAGES)
    assert CHOICES["ranking_loss"] == RANKING_LOSSES
    assert CHOICES["backbone_style"] == ("auto", *STYLES)
