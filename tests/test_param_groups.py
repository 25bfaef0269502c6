"""Tests for models.param_groups: LR multipliers (spec 7.2, 7.3), stage freezing and BN momenta (decision 8),
and one real optimiser step per stage."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import models
from models import build_model, param_groups, set_stage, total_loss

V, N_CLASSES, MAX_LEN = 30, 6, 8


@pytest.fixture(scope="module")
def template() -> models.DualPath:
    torch.manual_seed(0)
    return build_model(num_classes=N_CLASSES, vocab_size=V, max_len=MAX_LEN, word2vec=torch.randn(V, 300),
                       arch="resnet18", pretrained="none", image_pool=4)


@pytest.fixture
def model(template: models.DualPath) -> models.DualPath:
    return copy.deepcopy(template)


def batch(b: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 112, 112, generator=g)  # resnet18: 4x4 map, pool 4 -> 1x1
    tokens = torch.randint(1, V + 1, (b, MAX_LEN), generator=g)
    tokens[0, 5:] = 0
    labels = torch.arange(b) % N_CLASSES
    return images, tokens, labels


def expected_mult(name: str, module: nn.Module) -> float:
    """Spec 7.2 / 7.3 written out by parameter name (Stage II values)."""
    if name == "classifier.weight":
        return 0.01
    if name == "classifier.bias":
        return 0.02
    if name in ("text.embed.weight", "text.embed_bias"):
        return 1e-3
    is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
    if name.startswith("image.backbone."):
        if name == "image.backbone.0.weight":  # conv1
            return 1e-4
        if is_bn:
            return 0.001 if name.endswith("weight") else 0.02
        assert isinstance(module, nn.Conv2d) and name.endswith("weight")
        return 0.02
    if is_bn:
        return 0.2 if name.endswith("weight") else 0.1
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)) and name.endswith("weight")
    return 0.1


def owner_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {f"{mn}.{pn}" if mn else pn: m for mn, m in model.named_modules() for pn, _ in
            m.named_parameters(recurse=False)}


@pytest.mark.parametrize("stage", [1, 2])
def test_lr_multipliers_per_parameter(model: models.DualPath, stage: int) -> None:
    groups = param_groups(model, stage)
    where: dict[int, list[dict]] = {}
    for g in groups:
        for p in g["params"]:
            where.setdefault(id(p), []).append(g)
    owners = owner_modules(model)
    n_checked = 0
    for name, p in model.named_parameters():
        in_backbone = name.startswith("image.backbone.")
        if stage == 1 and in_backbone:
            assert id(p) not in where, f"Stage I group holds backbone parameter {name}"
            continue
        assert len(where.get(id(p), [])) == 1, f"{name} is in {len(where.get(id(p), []))} groups"
        g = where[id(p)][0]
        mult = expected_mult(name, owners[name])
        assert g["lr_mult"] == pytest.approx(mult), name
        assert g["lr"] == pytest.approx(0.1 * mult), name
        assert g["weight_decay"] == pytest.approx(1e-4), name
        n_checked += 1
    n_all = sum(1 for _ in model.parameters())
    n_backbone = sum(1 for _ in model.image.backbone.parameters())
    assert n_checked == (n_all - n_backbone if stage == 1 else n_all)
    assert sum(len(g["params"]) for g in groups) == n_checked  # nothing else, nothing twice


def test_base_lr_scales_every_group(model: models.DualPath) -> None:
    g1 = param_groups(model, 2)
    g2 = param_groups(model, 2, base_lr=0.01, weight_decay=5e-4)
    assert [g["name"] for g in g1] == [g["name"] for g in g2]
    for a, b in zip(g1, g2):
        assert b["lr"] == pytest.approx(0.1 * a["lr"])
        assert b["weight_decay"] == 5e-4


def test_bn_eps_and_momenta_per_stage(model: models.DualPath) -> None:
    backbone_bns = [m for m in model.image.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    backbone_ids = {id(m) for m in backbone_bns}
    new_bns = [m for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in backbone_ids]
    assert len(backbone_bns) == 1 + 8 * 2 + 3  # resnet18: bn1, 2 per basic block, 3 downsample BNs
    assert len(new_bns) == 2 + 48  # image fc1_bn, fc1_1_bn; text embed + 42 block + 4 shortcut + fc
    param_groups(model, 1)
    assert all(m.momentum == 0.0 for m in backbone_bns)
    assert not any(p.requires_grad for p in model.image.backbone.parameters())
    assert all(m.eps == 1e-3 and m.momentum == 0.05 for m in new_bns)
    param_groups(model, 2)
    assert all(m.momentum == 0.001 for m in backbone_bns)
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.eps == 1e-3 and m.momentum == 0.05 for m in new_bns)
    with pytest.raises(ValueError):
        set_stage(model, 3)


def _sgd(model: models.DualPath, stage: int) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, stage), momentum=0.9, nesterov=True)


def test_stage1_step_freezes_backbone_but_uses_batch_stats(model: models.DualPath) -> None:
    opt = _sgd(model, 1)
    model.train()
    images, tokens, labels = batch(b=2)
    before_backbone = {k: v.clone() for k, v in model.image.backbone.state_dict().items()}
    before_head = model.image.fc1.weight.detach().clone()
    before_cls = model.classifier.weight.detach().clone()
    before_text = {n: p.detach().clone() for n, p in model.text.named_parameters()}
    seen: dict[str, torch.Tensor] = {}
    bn1 = model.image.backbone[1]
    hooks = [bn1.register_forward_hook(lambda m, i, o: seen.update(bn1_in=i[0].clone(), bn1_out=o.clone())),  # ReLU is in-place
             model.image.backbone.register_forward_hook(lambda m, i, o: seen.update(backbone=o.clone()))]
    out = model(images, tokens)
    for h in hooks:
        h.remove()
    j, _ = total_loss(out, labels, labels, lambda_rank=0.0, lambda_img=1.0, lambda_txt=1.0)
    opt.zero_grad()
    j.backward()
    text_grads = {n: p.grad.clone() for n, p in model.text.named_parameters() if p.grad is not None}
    opt.step()

    after = model.image.backbone.state_dict()
    for k, v in before_backbone.items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(after[k], v), f"backbone {k} moved in Stage I"
    assert all(p.grad is None for p in model.image.backbone.parameters())
    assert not torch.equal(model.image.fc1.weight, before_head)
    assert not torch.equal(model.classifier.weight, before_cls)
    moved = [n for n, p in model.text.named_parameters() if not torch.equal(p, before_text[n])]
    assert {"fc.weight", "embed.weight", "embed_bias", "blocks.0.branch.0.weight", "blocks.13.branch.3.conv.weight"
            } <= set(moved)
    for n, g in text_grads.items():
        if g.abs().sum() > 0:
            assert n in moved, n
    # the frozen backbone BN normalised with the BATCH statistics during that training forward ...
    x = seen["bn1_in"]
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, as BN normalises
    ref = (x - mean) / torch.sqrt(var + bn1.eps) * bn1.weight.view(1, -1, 1, 1) + bn1.bias.view(1, -1, 1, 1)
    assert torch.allclose(seen["bn1_out"], ref, atol=1e-4)
    # ... so its output differs from the eval-mode (running-stats) output of the same, unchanged weights
    with torch.no_grad():
        eval_out = model.image.backbone.eval()(images)
    assert not torch.allclose(eval_out, seen["backbone"], atol=1e-2)


def test_stage2_step_updates_backbone_and_bn_stats_with_momentum_0001(model: models.DualPath) -> None:
    bn1 = model.image.backbone[1]
    with torch.no_grad():  # non-trivial starting running statistics
        bn1.running_mean.copy_(torch.randn(bn1.num_features))
        bn1.running_var.copy_(torch.rand(bn1.num_features) + 0.5)
    opt = _sgd(model, 2)
    model.train()
    images, tokens, labels = batch(b=2, seed=1)
    old_mean, old_var = bn1.running_mean.clone(), bn1.running_var.clone()
    before = {n: p.detach().clone() for n, p in model.image.backbone.named_parameters()}
    seen: list[torch.Tensor] = []
    h = bn1.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach()))
    out = model(images, tokens)
    h.remove()
    j, _ = total_loss(out, labels, labels, lambda_rank=2.0, lambda_img=1.0, lambda_txt=0.1)
    opt.zero_grad()
    j.backward()
    opt.step()
    x = seen[0]
    n = x.numel() // x.shape[1]
    batch_mean = x.mean(dim=(0, 2, 3))
    batch_var = ((x - batch_mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / (n - 1)  # unbiased
    assert torch.allclose(bn1.running_mean, 0.999 * old_mean + 0.001 * batch_mean, atol=1e-6, rtol=1e-5)
    assert torch.allclose(bn1.running_var, 0.999 * old_var + 0.001 * batch_var, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(bn1.running_mean, old_mean, atol=1e-7)
    for name, p in model.image.backbone.named_parameters():
        assert not torch.equal(p, before[name]), f"backbone {name} did not move in Stage II"


def test_new_layer_initialisation(model: models.DualPath) -> None:
    """Spec 7.2: new convs Uniform(+-sqrt(3/fan_in)), fan_in = kernel width x C_in; new BN gamma 1, beta 0."""
    convs = [m for part in (model.image, model.text) for m in part.modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    backbone_ids = {id(m) for m in model.image.backbone.modules()}
    convs = [m for m in convs if id(m) not in backbone_ids]
    assert len(convs) == 2 + (14 * 3 + 4) + 1  # image fc1, fc1_1; text 3 per block + 4 shortcuts; text fc
    for m in convs:
        w = m.weight
        fan_in = w.shape[1] * (w.shape[2] if w.dim() == 3 else 1) * (w.shape[3] if w.dim() == 4 else 1)
        bound = (3.0 / fan_in) ** 0.5
        assert w.abs().max() <= bound * (1 + 1e-6)
        assert w.abs().max() > 0.9 * bound  # uniform over the whole range, not e.g. Kaiming normal
        assert abs(w.mean().item()) < 0.05 * bound
    backbone_bn = {id(m) for m in model.image.backbone.modules()}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in backbone_bn:
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_backbone_bn_update_option(model: models.DualPath) -> None:
    """Not the paper: for a random-init backbone, Stage I may estimate its BN statistics (weights stay frozen)."""
    groups = param_groups(model, 1, backbone_bn="update")
    backbone = {id(p) for p in model.image.backbone.parameters()}
    assert not any(id(p) in backbone for g in groups for p in g["params"])  # still frozen
    bn1 = model.image.backbone[1]
    assert bn1.momentum == 0.1
    before_w, before_mean = bn1.weight.detach().clone(), bn1.running_mean.clone()
    images, tokens, labels = batch()
    model.train()
    model(images, tokens)
    assert not torch.equal(bn1.running_mean, before_mean)  # statistics follow the data
    assert torch.equal(bn1.weight, before_w)
    with pytest.raises(ValueError, match="paper"):
        set_stage(model, 1, "sometimes")


def test_lr_mults_override_replaces_only_named_groups(model: models.DualPath) -> None:
    """``lr_mults`` (config key) replaces the paper's multiplier of the named groups and nothing else."""
    paper = {g["name"]: g["lr_mult"] for g in param_groups(copy.deepcopy(model), 2)}
    groups = {g["name"]: g for g in param_groups(model, 2, base_lr=0.5,
                                                 lr_mults={"backbone_conv": 0.7, "classifier_w": 0})}
    assert groups["backbone_conv"]["lr_mult"] == 0.7 and groups["backbone_conv"]["lr"] == pytest.approx(0.35)
    assert groups["classifier_w"]["lr"] == 0.0
    for name, mult in paper.items():
        if name not in ("backbone_conv", "classifier_w"):
            assert groups[name]["lr_mult"] == mult and groups[name]["lr"] == pytest.approx(0.5 * mult)


@pytest.mark.parametrize("mults, stage, match", [
    ({"backbone_cnv": 1.0}, 2, "unknown parameter group 'backbone_cnv'.*backbone_conv"),
    ({"new_conv": -0.1}, 2, "new_conv must be a number >= 0"),
    ({"new_conv": "fast"}, 1, "new_conv must be a number >= 0"),
    ({"backbone_conv": 1.0}, 1, "frozen in Stage I"),
    ({"backbone_w": 1.0}, 2, r"\['backbone_w'\] not a parameter group of this resnet18 model"),  # a VGG group
])
def test_lr_mults_rejects_bad_overrides(model: models.DualPath, mults: dict, stage: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        param_groups(model, stage, lr_mults=mults)
