"""The retrieval browser (retrieval.browse*): its routes through Flask's test client, checked against brute-force
numpy references and against evaluate.py on the same checkpoint; security (ids only, limits, no stack traces); the
CLI's argument errors. Reuses the tiny prepared directory and checkpoint of test_visualize_search.py (3 test images,
6 test captions; a text matches an image when their ``person`` labels are equal)."""
from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from retrieval import browse
from retrieval.browse_app import create_app
from retrieval.browse_index import from_folder
from retrieval.browse_limits import MAX_K, MAX_QUERY_CHARS
from engine.encode import encode_split
from retrieval.index import encode_query
from tests.test_visualize_search import checkpoint, data, folder, model, prepared  # noqa: F401  (shared fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _args(checkpoint, prepared, **kw) -> Namespace:
    base = dict(checkpoint=Path(checkpoint), data=Path(prepared), split="test", images=None, host="127.0.0.1",
                port=0, top_k=3, no_cache=False, device="cpu", precision="auto", batch_size=64, fold=None)
    return Namespace(**{**base, **kw})


@pytest.fixture(scope="module")
def index(checkpoint, prepared):
    return browse.load_index(_args(checkpoint, prepared, no_cache=True))


@pytest.fixture(scope="module")
def client(index):
    return create_app(index).test_client()


@pytest.fixture(scope="module")
def ref(model, data):
    """Brute-force reference: the split's features (encoded as evaluate.py does), normalised, and all similarities."""
    f = encode_split(model, data, "test", torch.device("cpu"))
    img = f["images"] / np.linalg.norm(f["images"], axis=1, keepdims=True)
    txt = f["texts"] / np.linalg.norm(f["texts"], axis=1, keepdims=True)
    return {**f, "img": img, "txt": txt, "sim": img @ txt.T}  # sim (N, M)


def _rank(scores: np.ndarray, item: int) -> int:
    """1-based position of ``item`` in a full descending sort that puts it first among equal scores."""
    return 1 + int(np.sum(scores > scores[item]))


def _json(resp, status=200):
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    return resp.get_json()


# ------------------------------------------------------------------------------------------------ views
def test_evaluation_view_equals_evaluate_py(client, checkpoint, prepared, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert evaluate.main(["--checkpoint", str(checkpoint), "--data", str(prepared), "--split", "test",
                          "--out", str(out)]) == 0
    want = json.loads(out.read_text())
    got = _json(client.get("/api/eval?direction=i2t"))["metrics"]
    for d in ("i2t", "t2i"):
        assert got[d] == want[d]  # the same floats, not approximately
    assert got["rsum"] == want["rsum"]
    assert "rsum" in capsys.readouterr().out


def test_a_fold_is_the_images_and_captions_evaluate_py_scores_as_that_fold(checkpoint, prepared, ref, tmp_path):
    """--fold I/K shows the split's fold I of K, exactly as evaluate.py --folds K cuts and scores it."""
    out = tmp_path / "folds.json"
    assert evaluate.main(["--checkpoint", str(checkpoint), "--data", str(prepared), "--folds", "3",
                          "--out", str(out)]) == 0
    want = json.loads(out.read_text())["folds"]
    for i in range(3):
        idx = browse.load_index(_args(checkpoint, prepared, no_cache=True, fold=(i, 3)))
        assert list(idx.image_rows) == [ref["image_rows"][i]]  # the i-th image of the split, in stored order
        mine = ref["text_labels"] == ref["image_labels"][i]
        assert list(idx.caption_rows) == list(ref["caption_rows"][mine]) and mine.sum() == 2  # its own captions
        for d in ("i2t", "t2i"):
            assert idx.evaluation[d] == want[i][d]
    # a fold view of the cached whole split: the cache written without --fold serves the fold too
    cached = browse.load_index(_args(checkpoint, prepared, fold=(2, 3)))
    assert list(cached.image_rows) == [ref["image_rows"][2]]


def test_worst_queries_paged_against_brute_force(client, ref):
    n, m = ref["sim"].shape
    own = ref["text_labels"][None, :] == ref["image_labels"][:, None]  # (N, M) correct pairs
    i2t = [min(_rank(ref["sim"][i], c) for c in np.flatnonzero(own[i])) for i in range(n)]
    t2i = [min(_rank(ref["sim"][:, c], i) for i in np.flatnonzero(own[:, c])) for c in range(m)]
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        want = sorted(range(len(ranks)), key=lambda q: (-ranks[q], q))
        seen = []
        for page in range(3):  # pages of 2: i2t has 2 pages (3 images), t2i 3 (6 captions)
            resp = client.get(f"/api/eval?direction={direction}&page={page}&per_page=2")
            if page * 2 >= len(ranks):
                assert resp.status_code == 404 and "does not exist" in resp.get_json()["error"]
                continue
            d = _json(resp)
            assert d["pages"] == -(-len(ranks) // 2) and d["queries"] == len(ranks)
            seen += [(it["id"], it["rank"]) for it in d["items"]]
        assert seen == [(q, ranks[q]) for q in want]
    items = _json(client.get("/api/eval?direction=t2i&per_page=6"))["items"]
    assert all(it["kind"] == "caption" and it["image"] == int(np.flatnonzero(
        ref["image_labels"] == ref["text_labels"][it["id"]])[0]) for it in items)


def test_search_view_against_brute_force(client, model, data, ref, index):
    text = "a yellow square"  # exactly a test caption: its image is the ground truth
    d = _json(client.get("/api/search", query_string={"q": text, "k": 3}))
    feat, _ = encode_query(model, data, text)
    scores = ref["img"] @ (feat / np.linalg.norm(feat))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:3]
    assert [r["id"] for r in d["results"]] == order
    assert [r["score"] for r in d["results"]] == pytest.approx([float(scores[i]) for i in order], abs=1e-5)
    yellow = index.image_names.index("yellow.jpg")
    assert [r["id"] for r in d["results"] if r["correct"]] == [yellow]
    assert d["truth"] == [{"id": yellow, "name": "yellow.jpg", "rank": _rank(scores, yellow)}]
    assert d["words"] == ["a", "yellow", "square"] and d["ignored"] == []
    # out-of-dictionary words are reported with a case hint; a sentence that is no caption marks nothing
    d = _json(client.get("/api/search", query_string={"q": "a Red zebra square"}))
    assert d["ignored"] == ["Red", "zebra"] and d["hints"] == {"Red": "red"} and d["truth"] == []
    assert len(d["results"]) == 3 and not any(r["correct"] for r in d["results"])


def test_image_view_ground_truth_ranks(client, ref, index, data):
    raw = data.captions["raw"].to_numpy()
    for i in range(len(ref["images"])):
        d = _json(client.get(f"/api/image/{i}?k=4"))
        s = ref["sim"][i]
        order = sorted(range(len(s)), key=lambda c: (-s[c], c))[:4]
        assert [c["id"] for c in d["results"]] == order
        assert [c["text"] for c in d["results"]] == [str(raw[ref["caption_rows"][c]]) for c in order]
        truth = np.flatnonzero(ref["text_labels"] == ref["image_labels"][i])
        assert sorted(g["id"] for g in d["truth"]) == sorted(truth.tolist()) and len(truth) == 2
        for g in d["truth"]:
            assert g["rank"] == _rank(s, g["id"]) and g["correct"]
        assert [c["correct"] for c in d["results"]] == [c in truth for c in order]
        # the best ground-truth rank is this image's rank in the evaluation (engine.metrics)
        assert min(g["rank"] for g in d["truth"]) == int(index.ranks["i2t"][i])
        assert all(c["image"] == index.caption_image[c["id"]] for c in d["results"])


def test_caption_view_uses_the_evaluated_feature(client, ref, index):
    for c in range(len(ref["texts"])):
        d = _json(client.get(f"/api/caption/{c}?k=3"))
        s = ref["sim"][:, c]
        assert [r["id"] for r in d["results"]] == sorted(range(len(s)), key=lambda i: (-s[i], i))
        assert [t["rank"] for t in d["truth"]] == [int(index.ranks["t2i"][c])]


def test_page_info_and_static_files(client):
    d = _json(client.get("/api/info"))
    assert d["mode"] == "split" and d["images"] == 3 and d["captions"] == 6 and d["has_truth"]
    assert d["directions"] == ["i2t", "t2i"] and d["limits"]["query_chars"] == MAX_QUERY_CHARS
    page = client.get("/?q=a+red+square")  # a permalink is the page itself; the script reads the URL
    assert page.status_code == 200 and b'<script src="/static/browse.js">' in page.data
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
    for name in ("browse.js", "browse.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert b"http" not in client.get("/static/browse.js").data.replace(b"HTTP", b"")  # nothing fetched elsewhere


def test_thumbnails_and_full_images_by_id(client, index):
    resp = client.get("/image/0")
    assert resp.status_code == 200 and resp.mimetype == "image/jpeg"
    thumb = Image.open(__import__("io").BytesIO(resp.data))
    with Image.open(index.image_paths[0]) as im:
        assert thumb.size == im.size  # 80x64 is below the thumbnail size: unchanged
        px = np.asarray(im.convert("RGB"))[32, 40]
    assert np.abs(np.asarray(thumb)[32, 40].astype(int) - px).max() < 12
    full = client.get("/image/0/full")
    assert full.status_code == 200 and full.data == index.image_paths[0].read_bytes()


# ------------------------------------------------------------------------------------------------ bad requests
@pytest.mark.parametrize("url, status, words", [
    ("/api/image/3", 404, "image ids are 0..2"),
    ("/api/image/-1", 404, "addressed by id"),
    ("/api/image/abc", 404, "addressed by id"),
    ("/api/caption/6", 404, "caption ids are 0..5"),
    ("/image/99", 404, "image ids are 0..2"),
    ("/api/search?q=a+red+square&k=0", 400, f"from 1 to {MAX_K}"),
    ("/api/search?q=a+red+square&k=abc", 400, "expected an integer"),
    ("/api/search?q=a+red+square&k=101", 400, f"from 1 to {MAX_K}"),
    ("/api/search?q=", 400, "empty query"),
    ("/api/search?q=zebra+giraffe", 400, "none of its words is in the dictionary"),
    ("/api/eval?direction=sideways", 400, "expected one of ['i2t', 't2i']"),
    ("/api/eval?page=-1", 400, "expected an integer"),
    ("/api/eval?per_page=1000", 400, "expected an integer from 1 to 100"),
])
def test_bad_requests_get_a_clear_4xx(client, url, status, words):
    d = _json(client.get(url), status)
    assert d["status"] == status and words in d["error"]


@pytest.mark.parametrize("k", ["0", "101", "1000000", "-5"])
def test_k_outside_the_limit_names_the_limit(client, index, k):
    """Issue 19: the message names the real limit (1 to 100), for a search, a caption and an image alike."""
    for url in (f"/api/search?q=a+red+square&k={k}", f"/api/caption/0?k={k}", f"/api/image/0?k={k}"):
        d = _json(client.get(url), 400)
        assert d["error"] == f"k={k}: expected an integer from 1 to {MAX_K}", (url, d["error"])


def test_over_long_query(client):
    d = _json(client.get("/api/search", query_string={"q": "red " * 200}), 400)
    assert f"the limit is {MAX_QUERY_CHARS}" in d["error"] and "800 characters" in d["error"]


def test_huge_request_line_gets_the_json_error_too(index):
    """Issue 19: a 100 KB query never reaches Flask (the HTTP server refuses request lines over 64 KiB); its answer
    is the same JSON error as every other bad request, not werkzeug's HTML page."""
    import threading
    import urllib.error
    import urllib.request

    srv = browse.make_server(index, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/api/search?q={'red+' * 25_000}", timeout=30)
        assert e.value.code == 414 and e.value.headers.get_content_type() == "application/json"
        d = json.loads(e.value.read())
        assert d["status"] == 414 and f"{MAX_QUERY_CHARS} characters" in d["error"], d
    finally:
        srv.shutdown()
        thread.join(timeout=10)


@pytest.mark.parametrize("path", [
    "/image/../manifest.json", "/image/..%2fmanifest.json", "/image/%2e%2e/%2e%2e/etc/passwd",
    "/static/../browse_index.py", "/static/..%2fbrowse_index.py", "/static/%2e%2e/browse_app.py",
    "/image/0/../../../dictionary.txt", "/images/red.jpg", "/api/image/red.jpg", "//etc/passwd",
])
def test_paths_outside_the_index_are_not_served(client, prepared, path):
    resp = client.get(path)
    body = resp.get_data(as_text=True)
    assert resp.status_code == 404, (path, resp.status_code)
    assert "Traceback" not in body and "import " not in body and "red\ngreen" not in body
    assert (prepared / "dictionary.txt").read_text()[:20] not in body


def test_unexpected_errors_hide_the_stack_trace(index, monkeypatch):
    app = create_app(index)

    def boom(*a, **k):
        raise RuntimeError("secret internal detail")
    monkeypatch.setattr(index, "search", boom)
    resp = app.test_client().get("/api/search?q=a+red+square")
    d = _json(resp, 500)
    assert "internal error" in d["error"] and "secret" not in resp.get_data(as_text=True)
    assert app.test_client().post("/api/info").status_code == 405


def test_split_features_cached_for_the_next_start(checkpoint, prepared, index, monkeypatch):
    from retrieval import browse_index

    cache = browse_index.default_split_cache(checkpoint, index.data, "test")
    cache.unlink(missing_ok=True)
    calls = []
    real = browse_index.encode_split
    monkeypatch.setattr(browse_index, "encode_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = browse.load_index(_args(checkpoint, prepared))
    assert calls == [1] and cache.is_file() and cache.parent == Path(checkpoint).parent
    second = browse.load_index(_args(checkpoint, prepared))  # from the cache: no encoding, same everything
    assert calls == [1]
    assert torch.equal(second.image_feats, first.image_feats) and torch.equal(second.caption_feats, first.caption_feats)
    assert second.evaluation == first.evaluation == index.evaluation
    browse.load_index(_args(checkpoint, prepared, no_cache=True))  # --no-cache: encoded again
    assert calls == [1, 1]
    data = index.data  # another checkpoint or precision: another key, the cache is not trusted
    key = browse_index.split_cache_key(browse_index.checkpoint_key(checkpoint), data, "test", "auto", 2048)
    assert browse_index._cached_split(cache, key, data, "test") is not None
    assert browse_index._cached_split(cache, key.replace("|auto|", "|bf16|"), data, "test") is None
    cache.unlink()


def test_typed_query_without_ground_truth_marks_nothing_wrong(client, index):
    """Issue 19: only a view with ground truth says right or wrong; a typed sentence that is no caption of the
    split has none, so its results are neither (correct: null), while a caption's wrong results are false."""
    d = _json(client.get("/api/search?q=red+green+blue"))
    assert d["truth"] == [] and d["results"] and all(r["correct"] is None for r in d["results"])
    exact = index.caption_texts[0]
    d = _json(client.get("/api/search", query_string={"q": exact}))
    assert [r["correct"] for r in d["results"]].count(True) == 1 and False in [r["correct"] for r in d["results"]]
    d = _json(client.get("/api/caption/0"))
    assert {r["correct"] for r in d["results"]} == {True, False}


def test_full_image_and_thumbnail_with_relative_paths(checkpoint, prepared, model, data, folder, monkeypatch):
    """Issue 19: --data (as in the README's command) and --images given relative to the working directory serve
    the files."""
    monkeypatch.chdir(prepared.parent)
    idx = browse.load_index(_args(checkpoint, Path(prepared.name), no_cache=True))
    client = create_app(idx).test_client()
    for i in range(3):
        full = client.get(f"/image/{i}/full")
        assert full.status_code == 200, full.get_data(as_text=True)
        assert full.data == (prepared / "images" / idx.image_names[i]).read_bytes()
        assert client.get(f"/image/{i}").status_code == 200
    monkeypatch.chdir(folder.parent)
    idx = from_folder(model, data, "test", Path(folder.name), torch.device("cpu"))
    client = create_app(idx).test_client()
    red = idx.image_names.index("red.jpg")
    full = client.get(f"/image/{red}/full")
    assert full.status_code == 200 and full.data == (folder / "red.jpg").read_bytes()


# ------------------------------------------------------------------------------------------------ own images
def test_folder_gallery(model, data, folder, tmp_path):
    idx = from_folder(model, data, "test", folder, torch.device("cpu"), top_k=2, image_cache=tmp_path / "c.npz",
                      cache_key="ck")
    client = create_app(idx).test_client()
    info = _json(client.get("/api/info"))
    assert info["mode"] == "folder" and info["images"] == 5 and not info["has_truth"] and not info["evaluation"]
    d = _json(client.get("/api/search?q=a+red+square"))
    names = {"blue.png", "red.jpg", "sub/deeper/cyan.jpg", "sub/green.JPEG", "yellow.jpg"}
    assert len(d["results"]) == 2 and {r["name"] for r in d["results"]} <= names
    assert all(r["correct"] is None for r in d["results"]) and d["truth"] == []  # no ground truth: not "wrong"
    red = idx.image_names.index("red.jpg")
    d = _json(client.get(f"/api/image/{red}"))
    assert len(d["results"]) == 2 and d["truth"] == [] and all(c["image"] is None for c in d["results"])
    assert all(c["correct"] is None for c in d["results"])
    assert _json(client.get(f"/api/caption/0"))["truth"] == []
    assert "no evaluation view" in _json(client.get("/api/eval"), 404)["error"]
    resp = client.get(f"/image/{red}/full")
    assert resp.status_code == 200 and resp.data == (folder / "red.jpg").read_bytes()
    big = client.get(f"/image/{idx.image_names.index('yellow.jpg')}")  # 160x128 -> at most 320: unchanged size
    assert Image.open(__import__("io").BytesIO(big.data)).size == (160, 128)
    assert (tmp_path / "c.npz").is_file()


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_help_is_fast_and_imports_no_torch():
    code = ("import sys, contextlib, io\nfrom retrieval import browse\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    try: browse.main(['--help'])\n    except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint(buf.getvalue())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for flag in ("--checkpoint", "--data", "--split", "--images", "--host", "--port", "--top-k"):
        assert flag in r.stdout


def test_cli_errors_are_one_line(checkpoint, prepared, tmp_path, capsys):
    cases = [(["--checkpoint", tmp_path / "none.pt", "--data", prepared], "checkpoint not found"),
             (["--checkpoint", checkpoint, "--data", tmp_path], "not a prepared directory"),
             (["--checkpoint", checkpoint, "--data", prepared, "--images", tmp_path / "nope"], "no such folder"),
             (["--checkpoint", checkpoint, "--data", prepared, "--top-k", "0"], "--top-k 0: expected 1 to 100"),
             (["--checkpoint", checkpoint, "--data", prepared, "--port", "70000"], "--port 70000"),
             (["--checkpoint", checkpoint, "--data", prepared, "--fold", "1/2"],
              "--fold 1/2: the test split of"),  # 3 images do not cut into 2 folds
             (["--checkpoint", checkpoint, "--data", prepared, "--fold", "1/3", "--images", tmp_path],
              "cannot be combined with --images"),
             ]
    for argv, expected in cases:
        assert browse.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    for fold, expected in (("4/3", "expected K >= 2 folds and I from 1 to K"), ("one", "expected I/K")):
        with pytest.raises(SystemExit) as stop:  # argparse's own check, before anything loads
            browse.main(["--checkpoint", str(checkpoint), "--data", str(prepared), "--fold", fold])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: argument --fold: ") and expected in err
        assert err.count("\n") == 1


def test_cli_serves_and_says_where(checkpoint, prepared):
    """The real command: starts, prints the loopback address, answers /api/info, stops on SIGINT."""
    import signal
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "retrieval.browse", "--checkpoint", str(checkpoint), "--data",
                             str(prepared), "--port", "0", "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("split gallery: 3 images, 6 test captions; rsum "), lines
        assert lines[1].startswith("listening on http://127.0.0.1:") and "this machine only" in lines[1]
        url = lines[1].split()[2]
        with urllib.request.urlopen(url + "api/info", timeout=30) as r:
            assert json.loads(r.read())["images"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0
    assert "encoding test images" in proc.stderr.read()  # the start-up progress bar
