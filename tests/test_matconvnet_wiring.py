"""The converter checks the wiring, not only the parameters: a file whose DAG differs from the original network's
(a ReLU bypassed, one layer more, a feature read from another block, ...) is refused with one error naming the file,
the layer and the variable, even though every shape is valid. Each rewired file is first run through the NumPy
MatConvNet reference (tests/mcn_reference.py): it computes (shapes valid) and gives other features than the original,
so converting it silently would give a network that computes something else."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from matconvnet import convert as conv
from matconvnet import dagnn as mn
from matconvnet.__main__ import main as convert_cli
from prepare.dictionary import GivenDictionary
from tests import matconvnet_fixtures as fx
from tests import mcn_reference as ref

MEAN = np.array([[[121.5, 113.25, 101.0]]])
VOCAB = 12
IMAGE = np.random.default_rng(3).integers(0, 256, (224, 224, 3), dtype=np.uint8)
CAPTION = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(scope="module")
def net():
    return fx.dual_path_net("flickr30k", vocab=VOCAB, classes=7, seed=0)


def _layer(layers: list[dict], name: str) -> dict:
    return next(x for x in layers if x["name"] == name)


def _reads(name: str, old: str, new: str):
    """Layer ``name`` reads variable ``new`` where the original reads ``old``."""
    def mutate(layers):
        inputs = _layer(layers, name)["inputs"]
        inputs[inputs.index(old)] = new
    return mutate


def _insert_relu_after(bn: str, consumer: str):
    """One layer more: a ReLU between ``bn`` and the layer that reads it (before that layer in file order)."""
    def mutate(layers):
        at = layers.index(_layer(layers, consumer))
        layers.insert(at, {"name": f"{bn}_extra", "type": "dagnn.ReLU", "inputs": fx.Cell([bn]),
                           "outputs": fx.Cell([f"{bn}_extra"]), "params": fx.Cell([]), "block": {"leak": 0.0}})
        inputs = layers[at + 1]["inputs"]
        inputs[inputs.index(bn)] = f"{bn}_extra"
    return mutate


def _drop_dropout2(layers):
    layers.remove(_layer(layers, "dropout2"))
    _layer(layers, "fc_txt")["inputs"] = fx.Cell(["fc5_2bnx"])


REWIRED = {  # case -> (mutation of the layer list, the path whose test feature changes, what the error must say)
    "ReLU bypassed in the backbone": (
        _reads("res3b_branch2b", "res3b_branch2ax", "bn3b_branch2a"), "image",
        "layer 'res3b_branch2b' reads variable 'bn3b_branch2a' (the output of layer 'bn3b_branch2a'), the original "
        "reads the output of layer 'res3b_branch2a_relu'"),
    "ReLU bypassed in the image head": (
        _reads("fc1_1", "fc1bnx", "fc1bn"), "image",
        "layer 'fc1_1' reads variable 'fc1bn' (the output of layer 'fc1bn'), the original reads the output of layer "
        "'fc1x'"),
    "one layer more before a sum": (
        _insert_relu_after("fc3_3_3bn", "fc3_3sum"), "text",
        "layer 'fc3_3sum' reads variable 'fc3_3_3bn_extra' (the output of layer 'fc3_3_3bn_extra'), the original "
        "reads the output of layer 'fc3_3_3bn'"),
    "a block's shortcut read from the block before": (
        _reads("fc3_3sum", "fc3_2sumx", "fc3_1sumx"), "text",
        "layer 'fc3_3sum' reads variable 'fc3_1sumx' (the output of layer 'fc2_4x'), the original reads the output of "
        "layer 'fc3_2x'"),
    "image feature read before pool5": (
        _reads("fc1", "pool5", "res5cx"), "image",
        "layer 'fc1' reads variable 'res5cx' (the output of layer 'res5c_relu'), the original reads the output of "
        "layer 'pool5'"),
    "a backbone block's shortcut read from the block before": (
        _reads("res4c", "res4bx", "res4ax"), "image",
        "layer 'res4c' reads variable 'res4ax' (the output of layer 'res4a_relu'), the original reads the output of "
        "layer 'res4b_relu'"),
}


def _refusal(net, layers: list[dict]) -> str:
    """The converter's error on the network ``net`` with ``layers`` instead of its own (it must refuse it)."""
    rewired = copy.copy(net)
    rewired.layers = layers
    dag = mn.parse_dagnn(Path("net-epoch-7.mat"), fx.plain(fx.net_struct(rewired, MEAN))[0])
    with pytest.raises(mn.ConvertError) as e:
        conv.model_checkpoint(dag, GivenDictionary([f"w{i}" for i in range(VOCAB)], None, {"path": "-"}))
    assert str(e.value).startswith("net-epoch-7.mat: "), str(e.value)
    return str(e.value)


@pytest.mark.parametrize("case", list(REWIRED))
def test_rewired_files_compute_something_else_and_are_refused(case, net):
    mutate, path, fragment = REWIRED[case]
    layers = copy.deepcopy(net.layers)
    mutate(layers)
    if path == "image":
        before, after = (ref.image_feature(x, net.params, IMAGE, MEAN) for x in (net.layers, layers))
    else:
        before, after = (ref.text_feature(x, net.params, CAPTION, VOCAB, 32) for x in (net.layers, layers))
    assert before.shape == after.shape and not np.allclose(before, after, rtol=1e-3)  # every shape valid, other output
    message = _refusal(net, layers)
    assert fragment in message, message


def _block(layers, name):
    return _layer(layers, name)["block"]


OTHER = {  # differences the reference above does not model (names read by the original code, types, dilate, leak)
    "text feature written under another name": (
        lambda layers: (_layer(layers, "fc5_2bn")["outputs"].__setitem__(0, "fc5_2bn_out"),
                        _layer(layers, "fc5_2x")["inputs"].__setitem__(0, "fc5_2bn_out")),
        "layer 'fc5_2bn' writes ['fc5_2bn_out'], the original writes 'fc5_2bn'"),
    "a variable with two writers": (
        lambda layers: layers.insert(len(layers) - 1, {
            "name": "copy", "type": "dagnn.ReLU", "inputs": fx.Cell(["fc2bn"]), "outputs": fx.Cell(["fc2_1sumx"]),
            "params": fx.Cell([]), "block": {}}),
        "variable 'fc2_1sumx' is written by layers 'fc2_1x' and 'copy'"),
    "a missing layer (dropout2)": (_drop_dropout2, "layer 'dropout2' (dagnn.DropOut) of the original network is "
                                                   "missing"),
    "the text classifier on the image path": (
        _reads("fc_txt", "fc5_2bnxd", "fc1_1bnxd"),
        "layer 'fc_txt' reads variable 'fc1_1bnxd' (the output of layer 'dropout'), the original reads the output of "
        "layer 'dropout2'"),
    "another layer type": (lambda layers: _layer(layers, "fc4_3_2x").__setitem__("type", "dagnn.Sigmoid"),
                           "layer 'fc4_3_2x' is a dagnn.Sigmoid, the original's is a dagnn.ReLU"),
    "a dilated convolution": (lambda layers: _block(layers, "res2b_branch2b").__setitem__("dilate",
                                                                                          np.array([[2.0, 2.0]])),
                              "layer 'res2b_branch2b': dilate [2, 2], the original network's convolutions have "
                              "dilate [1, 1]"),
    "a leaky ReLU": (lambda layers: _block(layers, "fc1x").__setitem__("leak", 0.1),
                     "layer 'fc1x': leak 0.1, the original's ReLU has leak 0"),
}


@pytest.mark.parametrize("case", list(OTHER))
def test_other_differences_are_refused(case, net):
    mutate, fragment = OTHER[case]
    layers = copy.deepcopy(net.layers)
    mutate(layers)
    message = _refusal(net, layers)
    assert fragment in message, message


def test_backbone_wiring_is_checked_and_the_cli_writes_nothing(tmp_path, capsys):
    """`backbone` on an ImageNet file whose fc1000 reads the map before pool5: one error line naming the file, the
    layer and the variable; nothing written."""
    nb = fx.resnet_net(seed=9)
    _reads("fc1000", "pool5", "res5cx")(nb.layers)
    path = fx.save_v5(tmp_path / "imagenet-resnet-50-dag.mat", fx.net_struct(nb, MEAN))
    out = tmp_path / "out" / "r50.pth"
    assert convert_cli(["backbone", str(path), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (
        f"error: {path}: layer 'fc1000' reads variable 'res5cx' (the output of layer 'res5c_relu'), the original reads "
        f"the output of layer 'pool5'"), lines
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
