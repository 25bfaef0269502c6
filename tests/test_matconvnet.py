"""The MatConvNet converter (python -m matconvnet): synthetic MatConvNet files (v5 and v7.3) -> PyTorch, checked
against a NumPy implementation of the MatConvNet operations (tests/mcn_reference.py), every refusal, and the
end-to-end path to evaluate.py. The wiring checks: tests/test_matconvnet_wiring.py."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from matconvnet import convert as conv
from matconvnet import dagnn as mn
from matconvnet.__main__ import main as convert_cli
from models import spec
from prepare import matfile as mio
from prepare.core import PrepareError, dictionary_sha256
from prepare.dictionary import GivenDictionary, read_given_dictionary
from tests import matconvnet_fixtures as fx
from tests import mcn_reference as ref

ROOT = Path(__file__).resolve().parents[1]
NET_MEAN = np.array([[[121.5, 113.25, 101.0]]])  # 1x1x3, as the training scripts store the dataset mean
IMAGENET_MEAN = np.random.default_rng(5).uniform(90, 130, (4, 4, 3))  # an HxWx3 mean image
KINDS = {"flickr30k": dict(vocab=12, classes=7), "coco": dict(vocab=9, classes=6), "cuhk": dict(vocab=10, classes=5)}


def words(n: int) -> list[str]:
    return [f"w{i}" for i in range(1, n + 1)]


def given(n: int) -> GivenDictionary:
    return GivenDictionary(words(n), None, {"path": "dict.txt"})


@pytest.fixture(scope="module")
def nets():
    return {kind: fx.dual_path_net(kind, stage=1 if kind == "coco" else 2, seed=i, **KINDS[kind])
            for i, kind in enumerate(KINDS)}


@pytest.fixture(scope="module")
def files(tmp_path_factory, nets):
    root = tmp_path_factory.mktemp("mcn")
    out = {}
    for kind, nb in nets.items():
        variables = {"net": fx.net_struct(nb, NET_MEAN)}
        if kind == "flickr30k":  # a real checkpoint also holds state (momentum buffers) and stats: never read
            variables["state"] = {"momentum": fx.Cell([np.ones((3, 1), np.float32)])}
            variables["stats"] = {"train": fx.StructArray([{"objective": 1.0}])}
        out[kind] = fx.save_v5(root / f"{kind}-net-epoch-60.mat", variables)
    out["flickr30k_v73"] = fx.save_v73(root / "net-epoch-60-v73.mat", {"net": fx.net_struct(nets["flickr30k"], NET_MEAN)})
    out["imagenet_nb"] = fx.resnet_net(seed=9)
    out["imagenet"] = fx.save_v5(root / "imagenet-resnet-50-dag.mat", fx.net_struct(out["imagenet_nb"], IMAGENET_MEAN))
    for kind in KINDS:
        subset = fx.dictionary_struct(words(KINDS[kind]["vocab"]), net=nets[kind])  # the net's own dictionary
        out[f"dict_{kind}"] = fx.save_v5(root / f"{kind}_dictionary.mat", {"subset": subset})
    return out


@pytest.fixture(scope="module")
def flickr_ckpt(files):
    return conv.model_checkpoint(conv.load_dagnn(files["flickr30k"]), given(12))


# ------------------------------------------------------------------------------------------------ readers
def test_header_sniffing_and_v73_reads_and_converts_like_v5(files):
    assert mio.mat_version(files["flickr30k"]) == "v5" and mio.mat_version(files["flickr30k_v73"]) == "v7.3"
    assert set(mio.variables(files["flickr30k"])) == {"net", "state", "stats"}
    raw_a, raw_b = (mio.one(mio.load(files[k], ["net"])["net"], k) for k in ("flickr30k", "flickr30k_v73"))
    assert [layer["name"] for layer in raw_a["layers"]] == [layer["name"] for layer in raw_b["layers"]]
    for la, lb in zip(raw_a["layers"], raw_b["layers"]):
        assert (la["type"], la["inputs"], la["outputs"], la["params"]) == \
               (lb["type"], lb["inputs"], lb["outputs"], lb["params"])
        assert sorted(la["block"][0]) == sorted(lb["block"][0])
    a = conv.model_checkpoint(mn.parse_dagnn(files["flickr30k"], raw_a), given(12))["model"]
    b = conv.model_checkpoint(mn.parse_dagnn(files["flickr30k_v73"], raw_b), given(12))["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_authors_dictionary_mat_and_word_list(files, nets, tmp_path):
    d = read_given_dictionary(files["dict_flickr30k"])
    assert d.words == words(12) and d.vectors.shape == (12, 300)
    want = fx.dictionary_struct(words(12), net=nets["flickr30k"])["features"].T
    np.testing.assert_array_equal(d.vectors, want)  # subset.features is 300 x V: column v = word v
    lst = tmp_path / "dictionary.txt"
    lst.write_bytes("".join(w + "\n" for w in d.words).encode())
    assert read_given_dictionary(lst).words == d.words
    assert dictionary_sha256(d.words) == __import__("hashlib").sha256(lst.read_bytes()).hexdigest()
    lst.write_text("w1\nw2\nw1\n")
    with pytest.raises(PrepareError, match="appears twice"):
        read_given_dictionary(lst)


# ------------------------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize("kind", list(KINDS))
def test_text_features_equal_numpy_matconvnet(kind, nets, files):
    from models.text_cnn import TextCNN
    nb = nets[kind]
    dag = conv.load_dagnn(files[kind])
    ckpt = conv.model_checkpoint(dag, read_given_dictionary(files[f"dict_{kind}"]))
    cfg, data = ckpt["config"], ckpt["data"]
    assert (data["vocab_size"], data["num_classes"], data["max_len"]) == \
           (KINDS[kind]["vocab"], KINDS[kind]["classes"], 56 if kind == "cuhk" else 32)
    assert cfg["classifier_bias"] == (kind != "coco") and cfg["text_width"] == 1 / 8 and cfg["feature_dim"] == 32
    assert cfg["dropout"] == {"flickr30k": 0.75, "coco": 0.5, "cuhk": 0.8}[kind]
    assert ckpt["stage"] == (1 if kind == "coco" else 2) and ckpt["epoch"] == 60
    text = TextCNN(data["vocab_size"], max_len=data["max_len"], feature_dim=cfg["feature_dim"],
                   width=cfg["text_width"], pool=cfg["text_pool"])
    text.load_state_dict({k[5:]: v for k, v in ckpt["model"].items() if k.startswith("text.")}, strict=True)
    text.eval()
    captions = [[3, 1, 4, 1, 5], list(range(1, data["vocab_size"] + 1)) * 2]  # 28 (52) and 9 (33) shifts
    tokens = torch.zeros(len(captions), data["max_len"], dtype=torch.long)
    for i, c in enumerate(captions):
        tokens[i, :len(c)] = torch.tensor(c)
    ours = text.test_feature(tokens, torch.tensor([len(c) for c in captions])).double().numpy()
    want = np.stack([ref.text_feature(nb.layers, nb.params, c, data["vocab_size"], data["max_len"])
                     for c in captions])
    np.testing.assert_allclose(ours, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_bn_rule_and_clamp_warning(nets, flickr_ckpt):
    """running_var = sigma^2 - eps of the module (1e-5 read from the backbone file, 1e-3 for the new BNs)."""
    model = flickr_ckpt["model"]
    p = nets["flickr30k"].params
    np.testing.assert_allclose(model["image.backbone.1.running_var"].numpy(),
                               p["bn_conv1_moments"][:, 1].astype(np.float64) ** 2 - 1e-5, rtol=1e-6)
    np.testing.assert_allclose(model["text.fc_bn.running_var"].numpy(),
                               p["fc5_2bn_m"][:, 1].astype(np.float64) ** 2 - 1e-3, rtol=1e-6)
    struct = fx.plain(fx.net_struct(nets["flickr30k"], NET_MEAN))[0]
    moments = next(x for x in struct["params"] if x["name"] == "fc1bn_m")
    moments["value"] = moments["value"].copy()
    moments["value"][:3, 1] = 0.0  # never-updated moments of a new BN: sigma 0 < sqrt(eps)
    ckpt = conv.model_checkpoint(mn.parse_dagnn(Path("net.mat"), struct), given(12))
    assert (ckpt["model"]["image.fc1_bn.running_var"][:3] == 0).all()
    assert any("fc1bn" in w and "3 of" in w and "clamped" in w for w in ckpt["provenance"]["warnings"])
    # a zero-variance channel as the importer stores it, sigma = float32(sqrt(eps)): rounding, no warning
    moments["value"][:3, 1] = np.float32(np.sqrt(1e-3))
    assert (moments["value"][:3, 1].astype(np.float64) ** 2 < 1e-3).all()  # a hair below eps, as the audit found
    ckpt = conv.model_checkpoint(mn.parse_dagnn(Path("net.mat"), struct), given(12))
    assert (ckpt["model"]["image.fc1_bn.running_var"][:3] == 0).all()
    assert not any("fc1bn" in w for w in ckpt["provenance"]["warnings"])


# ------------------------------------------------------------------------------------------------ refusals
def _mutated(nb, mutate) -> mn.DagNN:
    struct = copy.deepcopy(fx.plain(fx.net_struct(nb, NET_MEAN))[0])
    mutate(struct)
    return mn.parse_dagnn(Path("net-epoch-1.mat"), struct)


def _layer(struct, name):
    return next(x for x in struct["layers"] if x["name"] == name)


def _param(struct, name):
    return next(x for x in struct["params"] if x["name"] == name)


def _drop_param(s):
    s["params"] = [p for p in s["params"] if p["name"] != "fc3_3_2bn_m"]


def _rename_param(s):
    _param(s, "res4c_branch2b_filter")["name"] = "res4c_branch2b_weights"


def _extra_param(s):
    s["params"].append({"name": "fc9f", "value": np.ones((1, 1, 2, 2), np.float32)})


def _wrong_shape(s):
    _param(s, "fc2_4a_2f")["value"] = np.ones((1, 3, 64, 64), np.float32)


def _torchvision_stride(s):  # stride in the 3x3 conv (torchvision) instead of the first 1x1 (Caffe)
    _layer(s, "res3a_branch2a")["block"][0]["stride"] = np.array([[1.0, 1.0]])
    _layer(s, "res3a_branch2b")["block"][0]["stride"] = np.array([[2.0, 2.0]])


def _pool1_pad(s):
    _layer(s, "pool1")["block"][0]["pad"] = np.array([[1.0, 1.0, 1.0, 1.0]])


def _text_pad(s):
    _layer(s, "fc3_2_2")["block"][0]["pad"] = np.array([[0.0, 0.0, 0.0, 1.0]])


def _two_classifiers(s):
    _layer(s, "fc_txt")["params"] = ["fcsharef_txt", "fcshareb"]


def _text_pool(s):
    _layer(s, "fc5_1")["block"][0]["stride"] = np.array([[1.0, 2.0]])


def _text_classifier_without_bias(s):  # fc_txt's block says no bias while it names fcshareb
    _layer(s, "fc_txt")["block"][0]["hasBias"] = np.array([[False]])


def _text_classifier_dilated(s):
    _layer(s, "fc_txt")["block"][0]["dilate"] = np.array([[2.0, 2.0]])


def _mixed_eps(s):
    _layer(s, "bn3b_branch2b")["block"][0]["epsilon"] = np.array([[1e-4]])


REFUSALS = {  # mutation -> a fragment the error must contain (besides the file name)
    "missing param": (_drop_param, "missing ['fc3_3_2bn_m']"),
    "renamed param": (_rename_param, "unexpected ['res4c_branch2b_weights']"),
    "extra param": (_extra_param, "unexpected ['fc9f']"),
    "wrong shape": (_wrong_shape, "param 'fc2_4a_2f' has size [1, 3, 64, 64], expected [1, 2, 64, 64]"),
    "torchvision stride": (_torchvision_stride, "layer 'res3a_branch2a': stride [1, 1] pad [0, 0, 0, 0], expected "
                                                "stride [2, 2]"),
    "pool1 pad": (_pool1_pad, "layer 'pool1': expected max pooling [3, 3] stride [2, 2] pad [0, 1, 0, 1]"),
    "text pad": (_text_pad, "layer 'fc3_2_2'"),
    "two classifiers": (_two_classifiers, "must share one classifier W"),
    "text classifier hasBias": (_text_classifier_without_bias, "layer 'fc_txt': block.hasBias disagrees"),
    "text classifier dilate": (_text_classifier_dilated, "layer 'fc_txt': dilate [2, 2]"),
    "mixed BN eps": (_mixed_eps, "backbone BatchNorm layers use different epsilons [1e-05, 0.0001]"),
    "text pool": (_text_pool, "layer 'fc5_1': expected a max (or avg) pooling [1 L/4]"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_file_layer_and_rule(case, nets):
    mutate, fragment = REFUSALS[case]
    with pytest.raises(mn.ConvertError) as e:
        conv.model_checkpoint(_mutated(nets["flickr30k"], mutate), given(12))
    assert "net-epoch-1.mat" in str(e.value) and fragment in str(e.value), str(e.value)


def test_vector_orientation_and_single_precision_eps_are_accepted(nets, flickr_ckpt):
    def mutate(s):
        for layer in s["layers"]:
            if layer["type"] == "dagnn.BatchNorm" and layer["name"].startswith("bn"):
                layer["block"][0]["epsilon"] = np.array([[1e-5]], dtype=np.float32)  # 9.99999974738e-06
        _param(s, "fc2b")["value"] = _param(s, "fc2b")["value"].reshape(1, -1)  # 1 x 300 instead of 300 x 1
    ckpt = conv.model_checkpoint(_mutated(nets["flickr30k"], mutate), given(12))
    assert ckpt["config"]["backbone_bn_eps"] == 1e-5
    assert torch.equal(ckpt["model"]["text.embed_bias"], flickr_ckpt["model"]["text.embed_bias"])


def test_coco_inventory_is_415_and_flickr_416(nets):
    assert len(nets["coco"].params) == 415 and len(nets["flickr30k"].params) == 416
    assert len(fx.resnet_net(fc1000=False).params) == 213


def test_dictionary_must_match_the_word2vec_rows(files):
    """fc2f row v started as word v's vector: the network's own dictionary agrees (median cosine ~1); the same
    words and vectors in reversed order, a same-size dictionary that is not the network's, is refused; a word list
    (no vectors) converts with a warning that the order was not checked."""
    dag = conv.load_dagnn(files["flickr30k"])
    right = read_given_dictionary(files["dict_flickr30k"])
    assert conv.check_dictionary_rows(dag, right, 12) > 0.99
    wrong = GivenDictionary(right.words[::-1], right.vectors[::-1].copy(), right.info)
    with pytest.raises(mn.ConvertError, match="another order"):
        conv.model_checkpoint(dag, wrong)
    ckpt = conv.model_checkpoint(conv.load_dagnn(files["flickr30k"]), given(12))
    assert any("could not be checked" in w for w in ckpt["provenance"]["warnings"])


def test_vocabulary_mismatch_is_refused(files):
    with pytest.raises(mn.ConvertError, match="fc2f has 12 words but the dictionary dict.txt has 11"):
        conv.model_checkpoint(conv.load_dagnn(files["flickr30k"]), given(11))


def test_broken_files_are_refused_and_nothing_is_written(files, tmp_path, capsys):
    out = tmp_path / "out" / "model.pt"
    data = files["flickr30k"].read_bytes()
    truncated = tmp_path / "truncated.mat"
    truncated.write_bytes(data[:len(data) // 2])
    h5 = files["flickr30k_v73"].read_bytes()
    truncated73 = tmp_path / "truncated73.mat"
    truncated73.write_bytes(h5[:len(h5) // 2])
    text = tmp_path / "notes.mat"
    text.write_text("not a mat file\n")
    other = fx.save_v5(tmp_path / "other.mat", {"x": np.ones((2, 2))})
    simplenn = fx.save_v5(tmp_path / "imagenet-vgg-verydeep-19.mat", {
        "layers": fx.Cell([{"type": "conv", "name": "conv1_1", "weights": fx.Cell([np.ones((3, 3, 3, 4))])}]),
        "meta": {"normalization": {"averageImage": NET_MEAN}}})
    cases = {truncated: "truncated", truncated73: "truncated", text: "not a MATLAB", other: "not a MatConvNet network",
             simplenn: "SimpleNN"}
    for path, fragment in cases.items():
        rc = convert_cli(["model", str(path), "--dictionary", str(files["dict_flickr30k"]), "--out", str(out)])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0] \
            and fragment in lines[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_help_imports_neither_torch_nor_scipy():
    """``python -m matconvnet --help`` answers before the converter's heavy imports (docs/cli.md rule 1); the time it
    takes is bench/cli_speed.py's."""
    r = subprocess.run([sys.executable, "-c", "import sys; from matconvnet.__main__ import main\n"
                        "rc = 0\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n    rc = e.code\n"
                        "print('torch' in sys.modules, 'scipy' in sys.modules, rc)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "False False 0", r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------ image path
def _make_model(ckpt: dict):
    """The DualPath exactly as engine.model_io rebuilds a checkpoint (config -> make_model -> strict load)."""
    from types import SimpleNamespace

    from engine.config import config_from_dict
    from engine.model_io import make_model
    d = ckpt["data"]
    data = SimpleNamespace(num_classes=d["num_classes"], vocab_size=d["vocab_size"], max_len=d["max_len"])
    model, _ = make_model(config_from_dict(ckpt["config"]), data, init=ckpt)
    return model.eval()


def test_checkpoint_config_is_a_full_valid_config(flickr_ckpt):
    from engine.config import Config, config_from_dict
    from engine.model_io import MODEL_KEYS
    cfg = flickr_ckpt["config"]
    assert set(MODEL_KEYS) <= set(cfg)
    resolved = config_from_dict(cfg)
    assert {k: getattr(resolved, k) for k in cfg} == cfg and isinstance(resolved, Config)
    assert resolved.backbone_style == "caffe" and resolved.backbone_bn_eps == 1e-5 and resolved.backbone_width == 1 / 8


def test_image_features_equal_numpy_matconvnet(nets, flickr_ckpt):
    """Whole image (no crop), minus the stored mean, summed over positions, plus the flipped image."""
    model = _make_model(flickr_ckpt)
    assert model.image.pixel_mean.tolist() == pytest.approx(NET_MEAN.ravel().tolist())
    image = np.random.default_rng(3).integers(0, 256, (224, 264, 3), dtype=np.uint8)  # 1x2 positions after pool5
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    ours = model.image.test_feature(model.image.normalize(x))[0].double().numpy()
    want = ref.image_feature(nets["flickr30k"].layers, nets["flickr30k"].params, image, NET_MEAN)
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_backbone_file_and_sidecar_load_as_caffe_style(files, tmp_path):
    from models.image_cnn import ImageCNN
    out = tmp_path / "r50.pth"
    assert convert_cli(["backbone", str(files["imagenet"]), "--out", str(out)]) == 0
    side = json.loads(Path(str(out) + ".json").read_text())
    assert (side["format"], side["style"], side["arch"], side["bn_eps"], side["backbone_width"]) == \
           ("dualpath-backbone", "caffe", "resnet50", 1e-5, 1 / 8)
    assert side["pixel_mean"] == pytest.approx(IMAGENET_MEAN.reshape(-1, 3).mean(0).tolist())
    assert side["md5"] == __import__("hashlib").md5(files["imagenet"].read_bytes()).hexdigest()
    state = torch.load(out, weights_only=True)
    assert state["conv1.bias"].shape == (8,) and state["fc.weight"].shape == (10, 256)
    assert state["layer2.0.conv1.weight"].shape == (16, 32, 1, 1)  # the stride-2 1x1 of the Caffe ResNet
    img = ImageCNN("resnet50", pretrained=str(out), feature_dim=16, style="caffe", bn_eps=side["bn_eps"],
                   backbone_width=side["backbone_width"], pixel_mean=side["pixel_mean"]).eval()
    image = np.random.default_rng(4).integers(0, 256, (230, 224, 3), dtype=np.uint8)
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        ours = img.pool(img.backbone(img.normalize(x)))[0].permute(1, 2, 0).double().numpy()  # (h, w, C)
    nb = files["imagenet_nb"]
    want = ref.run(nb.layers, nb.params, {"data": (image - IMAGENET_MEAN.reshape(-1, 3).mean(0))[..., None]},
                   "pool5")[..., 0]
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    with pytest.raises(Exception, match="caffe"):
        ImageCNN("resnet50", pretrained=str(out), feature_dim=16, style="torchvision")  # never mixed silently
    assert convert_cli(["backbone", str(files["imagenet"]), "--out", str(out)]) == 2  # exists: --overwrite needed


def test_resnet152_block_names_map_to_the_right_layers():
    """ResNet-152's Caffe names res3b1..res3b7, res4b1..res4b35 land in layer2[1..7], layer3[1..35]."""
    from models.image_cnn import ImageCNN
    nb = fx.resnet_net(width=1 / 16, seed=2, blocks=spec.RESNET_BLOCKS["resnet152"], fc1000=False)
    mean = np.array([[[100.0, 110.0, 120.0]]])
    state, side = conv.backbone_state(mn.parse_dagnn(Path("imagenet-resnet-152-dag.mat"),
                                                     fx.plain(fx.net_struct(nb, mean))[0]))
    assert side["arch"] == "resnet152" and "layer3.35.conv3.weight" in state
    img = ImageCNN("resnet152", pretrained="none", feature_dim=8, style="caffe", bn_eps=side["bn_eps"],
                   backbone_width=side["backbone_width"], pixel_mean=side["pixel_mean"]).eval()
    img.backbone.load_state_dict({conv.backbone_key(k).removeprefix("image.backbone."): v
                                  for k, v in state.items()}, strict=True)
    image = np.random.default_rng(6).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        ours = img.pool(img.backbone(img.normalize(torch.from_numpy(image.transpose(2, 0, 1).copy())[None])))
    want = ref.run(nb.layers, nb.params, {"data": (image - mean.reshape(1, 1, 3))[..., None]}, "pool5")[..., 0]
    np.testing.assert_allclose(ours[0].permute(1, 2, 0).double().numpy(), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


# ------------------------------------------------------------------------------------------------ end to end
def test_convert_prepare_with_dictionary_evaluate_compare_paper(tmp_path, capsys):
    """convert -> prepare a tiny Flickr30k with the authors' dictionary -> evaluate.py --checkpoint -> paper table;
    the evaluated features equal the NumPy MatConvNet reference on the prepared files."""
    import evaluate
    from prepare import flickr30k
    from tests.fixtures import FLICKR_DICTIONARY, make_flickr
    raw = make_flickr(tmp_path / "raw")
    vocab = ["unused"] + FLICKR_DICTIONARY[::-1]
    nb = fx.dual_path_net("flickr30k", vocab=len(vocab), classes=5, seed=11)  # Karpathy split: 5 training images
    net = fx.save_v5(tmp_path / "net-epoch-60.mat", {"net": fx.net_struct(nb, NET_MEAN)})
    dic = fx.save_v5(tmp_path / "flickr30k_dictionary.mat", {"subset": fx.dictionary_struct(vocab, net=nb)})
    prep = tmp_path / "prep"
    assert flickr30k.main(["--images", str(raw.images), "--captions", str(raw.token), "--split-json",
                           str(raw.split_json), "--dictionary", str(dic), "--out", str(prep), "--workers", "1",
                           "--image-size", "224"]) == 0
    ckpt = tmp_path / "authors.pt"
    assert convert_cli(["model", str(net), "--dictionary", str(dic), "--data", str(prep), "--out", str(ckpt)]) == 0
    emb, res = tmp_path / "emb.npz", tmp_path / "results.json"
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(prep), "--split", "test", "--out", str(res),
                          "--save-embeddings", str(emb), "--compare-paper", "flickr30k/resnet50/stage2",
                          "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "flickr30k/resnet50/stage2" in printed and "R@1" in printed
    result = json.loads(res.read_text())
    assert result["stage"] == 2 and result["epoch"] == 60 and "matconvnet" in result["pretrained_source"]
    z = np.load(emb)
    from PIL import Image
    from engine.data import Prepared
    p = Prepared(prep)
    row = p.split_images("test")[0]
    with Image.open(p.image_path(row)) as im:
        image = np.asarray(im.convert("RGB"))
    want = ref.image_feature(nb.layers, nb.params, image, NET_MEAN)
    np.testing.assert_allclose(z["images"][0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    cap = p.split_captions("test")[0]
    ids = [int(t) for t in p.tokens[cap] if t]
    want = ref.text_feature(nb.layers, nb.params, ids, len(vocab), 32)
    np.testing.assert_allclose(z["texts"][0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # the same checkpoint on a directory prepared with OUR dictionary is refused by evaluate (hash + vocabulary)
    ours = tmp_path / "ours"
    assert flickr30k.main(["--images", str(raw.images), "--captions", str(raw.token), "--split-json",
                           str(raw.split_json), "--word2vec", str(raw.w2v.text), "--out", str(ours), "--workers", "1",
                           "--image-size", "32"]) == 0
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(ours), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "vocab_size 17 vs 16" in err[0] \
        and "dictionary_sha256" in err[0]
    assert convert_cli(["model", str(net), "--dictionary", str(dic), "--data", str(ours), "--out",
                      str(tmp_path / "x.pt")]) == 2
    assert "vocab_size 16 (prepared) vs 17" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_inspect_describes_without_writing(files, capsys):
    assert convert_cli(["inspect", str(files["cuhk"])]) == 0
    out = capsys.readouterr().out
    assert "MAT v5, variables ['net']" in out and "416 params" in out and "Stage 2, 5 classes, vocabulary 10, " \
        "max_len 56" in out
    assert convert_cli(["inspect", str(files["dict_cuhk"])]) == 2
    assert "not a MatConvNet network" in capsys.readouterr().err
