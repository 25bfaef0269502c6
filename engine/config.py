"""The training recipe as data: one YAML per dataset and stage under ``configs/``, overridable from the command line.

``load_config(path, overrides)`` reads a YAML file (which may ``inherit`` another file of the same folder), applies
``--key value`` overrides, checks every key against ``Config`` (unknown keys and wrong types are rejected with the
valid choices) and returns a ``Config``. The resolved config is saved in the run directory and in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils.cli import InvalidValue

CHOICES: dict[str, tuple] = {
    "arch": ("resnet18", "resnet50", "resnet152", "vgg16", "vgg19"),
    "text_depth": ("res50", "res152"),
    "text_pool": ("max", "avg"),
    "negatives": ("hard", "random"),
    "ranking_loss": ("paper", "max_violation", "sum_hinge"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "stage": (1, 2),
    "backbone_bn": ("paper", "update"),
    "backbone_style": ("auto", "torchvision", "caffe"),
    "compile": ("auto", "off", "cuda_graph", "inductor"),
    "last_batch": ("keep", "drop"),
    "text_init": ("word2vec", "random"),
}


@dataclass
class Config:
    """Every key of a recipe. Defaults = the paper's Flickr30k ResNet-50 values (spec 6.3, 7.1-7.5)."""
    dataset: str = "flickr30k"  # informational; the data facts come from the prepared manifest
    stage: int = 1
    # model (spec sections 4-5)
    arch: str = "resnet50"
    pretrained: str = "imagenet"  # "imagenet" (torchvision cache), a state-dict path, or "none" (random init)
    train_crop: int = 224  # training crop side; the image pool window is ceil(train_crop / 32) (7 at 224)
    text_depth: str = "res50"
    text_pool: str = "max"
    feature_dim: int = 2048  # the embedding size; smaller only for CPU demos/tests (not the paper)
    text_width: float = 1.0  # scales the text CNN's stage widths; < 1 only for CPU demos/tests (not the paper)
    dropout: float = 0.75  # drop probability (decision 13): Flickr30k 0.75, MSCOCO 0.5, CUHK-PEDES 0.8
    classifier_bias: bool = True  # shared W bias: yes for Flickr30k-ResNet-50 and CUHK, no for MSCOCO (spec 6.1)
    position_shift: bool = True  # False = left alignment (Table 4 ablation)
    # Stage I's word2vec layer: "word2vec" (spec 3) or "random" (Table 3 ablation: U(+-sqrt(3/V)), the V->300 conv's
    # rule; its multipliers unchanged); Stage II takes the layer from the Stage I checkpoint
    text_init: str = "word2vec"
    backbone_bn: str = "paper"  # "update": backbone BN statistics move at 0.1 in both stages (random init only)
    # "caffe" = the original MatConvNet backbone (python -m matconvnet backbone), input 0-255 minus the training images'
    # RGB mean; "torchvision" = torchvision's weights with ImageNet mean/std; "auto" = caffe when --pretrained FILE
    # has a caffe sidecar FILE.json, else torchvision. Checkpoints store the resolved value (models/image_cnn.py).
    backbone_style: str = "auto"
    backbone_bn_eps: float = 1e-5  # the backbone's BN epsilon (a converted file's block.epsilon)
    backbone_width: float = 1.0  # caffe-style ResNet width factor; < 1 only for the converter's test files
    # optimisation (spec 7.1-7.4)
    batch_size: int = 32  # the global batch (split across DDP ranks)
    # an epoch's leftover images (Flickr30k: 29,783 = 930 x 32 + 23): "keep" = a last, smaller batch, in Stage II
    # reduced to an even size (the original's cnn_train_dag*.m; spec 7.4: 931 iterations per epoch); "drop" = skipped
    last_batch: str = "keep"
    base_lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    lr_mults: dict = field(default_factory=dict)  # {group: multiplier} replacing the paper's (models/param_groups.py)
    lr_schedule: list = field(default_factory=lambda: [[240, 1.0]])  # [[epochs, factor], ...]
    # losses (spec 6.3): Stage I uses lambda_rank = 0; > 0 in Stage I (Table 2's "only ranking loss" ablation) builds
    # Stage II's batches (anchors, negatives, mining) with the backbone still frozen
    lambda_rank: float = 0.0
    lambda_img: float = 1.0
    lambda_txt: float = 1.0
    margin: float = 1.0
    negatives: str = "hard"  # Stage II: "hard" (Flickr30k, MSCOCO) or "random" (CUHK-PEDES), spec 7.5
    ranking_loss: str = "paper"  # "paper" (one negative per anchor); ablations: "max_violation", "sum_hinge" (VSE++)
    num_candidates: int = 256  # hard-negative candidate pool
    # validation and checkpoints (val split only; the test split is never touched during training)
    val_every: int = 1  # epochs
    checkpoint_every_steps: int = 0  # 0 = only at the end of each epoch
    # runtime
    seed: int = 0
    workers: int | str = "auto"  # DataLoader processes: auto = 1 on CPU; on CUDA the cores per process minus 2, at
    # most 16 (a GPU step outruns a few workers' decoding: docs/training.md); the batches are the same for any count
    prefetch_factor: int = 4
    precision: str = "fp32"  # the paper's (TF32 matmuls on GPUs that have them); bf16 = autocast, a speed option whose
    # effect on the paper's numbers is unmeasured; auto = bf16 on CUDA, fp32 on CPU; fp16 (+ loss scaler) pre-Ampere
    channels_last: bool = True  # CUDA only
    # the training step (engine/step.py): "cuda_graph" captures it once and replays it (one launch per step);
    # "auto" = cuda_graph on one CUDA process outside fp16, else "off" (eager); "inductor" (opt-in, fp32) = cuda_graph
    # with the image CNN and the text CNN's blocks compiled by torch.compile (not identical to eager); may change on
    # resume
    compile: str = "auto"
    # the image and the text path side by side on two CUDA streams (training forward and backward, the mining's two
    # forwards): the same kernels, run concurrently; one CUDA process only; opt-in until measured (engine/step.py)
    branch_streams: bool = False
    eval_batch_size: int = 64
    log_every: int = 10  # steps between TensorBoard scalar writes

    @property
    def ranking_batches(self) -> bool:
        """Batches of anchors and negatives (spec 7.5): Stage II, or Stage I with a ranking loss (an ablation)."""
        return self.stage == 2 or self.lambda_rank > 0

    @property
    def epochs(self) -> int:
        return sum(int(n) for n, _ in self.lr_schedule)

    def lr_factor(self, epoch: int) -> float:
        """Base-LR factor of a 0-based epoch (e.g. 1.0 for 40 epochs, then 0.1 for 20)."""
        for n, factor in self.lr_schedule:
            if epoch < n:
                return float(factor)
            epoch -= n
        return float(self.lr_schedule[-1][1])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(InvalidValue):
    pass


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _check(key: str, value: Any, where: str) -> Any:
    fields = _fields()
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(f"{where}: unknown key {key!r}.{hint} Valid keys: {sorted(fields)}")
    if key == "workers":
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ConfigError(f"{where}: key 'workers' must be 'auto' or an integer >= 0, got {value!r}")
    default = getattr(Config(), key)
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: key {key!r} must be of type {kind.__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: key {key!r} must be one of {list(CHOICES[key])}, got {value!r}")
    if key == "lr_schedule" and not (value and all(isinstance(s, list) and len(s) == 2 and isinstance(s[0], int)
                                                    and s[0] > 0 and isinstance(s[1], (int, float)) for s in value)):
        raise ConfigError(f"{where}: lr_schedule must be a list of [epochs, factor] pairs, got {value!r}")
    return value


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'inherit'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    base = _read_yaml(path.parent / parent, seen + (path.resolve(),))
    base.update(data)
    return base


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--lr_schedule", "[[2, 1.0]]", "--dropout=0.5"]`` -> {"lr_schedule": [[2, 1.0]], "dropout": 0.5}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides are --key value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        out[key.replace("-", "_")] = yaml.safe_load(raw)
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None, stage: int | None = None
                ) -> Config:
    """A file may hold one stage (``stage: 1``) or both, with the shared keys at the top and per-stage keys under
    ``stage1:`` / ``stage2:`` (e.g. configs/demo.yaml); ``stage`` picks the section."""
    values = _read_yaml(Path(path)) if path else {}
    where = str(path) if path else "config"
    sections = {n: values.pop(f"stage{n}", None) for n in (1, 2)}
    if stage is not None:
        if values.get("stage") is not None and values["stage"] != stage:
            raise ConfigError(f"{where}: stage: {values['stage']} is a Stage {values['stage']} recipe, "
                              f"not Stage {stage}")
        section = sections[stage] or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: stage{stage} must be a mapping of key: value")
        values.update(section)
        values["stage"] = stage
    checked = {k: _check(k, v, where) for k, v in values.items()}
    checked.update({k: _check(k, v, "command line") for k, v in (overrides or {}).items()})
    cfg = Config(**checked)
    from models.param_groups import check_lr_mults  # here: CLIs import this module before torch

    try:
        check_lr_mults(cfg.lr_mults, cfg.stage)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


LEGACY_DEFAULTS = {"last_batch": "drop"}  # keys added since: what checkpoints written before them did


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a checkpoint (validated like a file); a key it predates gets the behaviour it was
    trained with (``LEGACY_DEFAULTS``), not today's default."""
    values = {**LEGACY_DEFAULTS, **values}
    return Config(**{k: _check(k, v, "checkpoint config") for k, v in values.items()})
