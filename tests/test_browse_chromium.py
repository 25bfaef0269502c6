"""The retrieval browser in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by
Selenium loads the page served from the tiny checkpoint of test_visualize_search.py on a free loopback port, types a
query, sees the result images, opens an image view and reads its captions, follows permalinks and the back button,
exports a PNG and checks the evaluation view's numbers.

A screenshot of each view is written to the test's tmp dir; with ``DUALPATH_SCREENSHOTS=DIR`` also to DIR, with the
query view's exported PNG
(``DUALPATH_SCREENSHOTS=docs/img python -m pytest tests/test_browse_chromium.py`` refreshes the docs' pictures).
Skipped only when chromium or chromedriver is not installed (``.ci/run`` installs both).
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import threading
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval import browse
from tests.test_visualize_search import checkpoint, data, model, prepared  # noqa: F401  (shared fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; .ci/run "
           f"installs them): chromium {'found' if CHROMIUM else 'missing'}, "
           f"chromedriver {'found' if CHROMEDRIVER else 'missing'}")
TIMEOUT = 60


def serving(index):
    """Serve ``index`` on a free loopback port in a background thread: yields (base URL, index), then stops."""
    srv = browse.make_server(index, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.port}", index
    srv.shutdown()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(checkpoint, prepared):
    args = Namespace(checkpoint=Path(checkpoint), data=Path(prepared), split="test", images=None, top_k=3,
                     no_cache=False, device="cpu", precision="auto", batch_size=64, fold=None)
    yield from serving(browse.load_index(args))


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,760", "--no-first-run", "--disable-extensions", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(TIMEOUT)
    yield drv
    drv.quit()


def _state(drv) -> str:
    return drv.execute_script("return document.body.dataset.state")


def _wait(drv, state: str = "ready", url_part: str | None = None) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, TIMEOUT).until(lambda d: (url_part is None or url_part in d.current_url)
                                      and _state(d) == state)


def _shot(drv, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"browse_{name}.png"
    drv.save_screenshot(str(path))
    with Image.open(path) as im:
        assert im.size[0] >= 800 and np.asarray(im.convert("L")).std() > 5  # a real, non-blank picture
    extra = os.environ.get("DUALPATH_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:  # small PNGs for the docs: 256 colours
            im.convert("RGB").quantize(256).save(Path(extra) / path.name, optimize=True)
    return path


def _green_pixels(png: bytes) -> int:
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((arr[..., 1] > 140) & (arr[..., 0] < 40) & (arr[..., 2] < 40)).sum())


def _red_pixels(png: bytes) -> int:
    """Pixels of the "wrong" frame colour (#d73c3c)."""
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((abs(arr[..., 0] - 215) < 12) & (abs(arr[..., 1] - 60) < 12) & (abs(arr[..., 2] - 60) < 12)).sum())


def _outline_colours(drv) -> list[str]:
    return drv.execute_script(
        "return [...document.querySelectorAll('#results .tile img')].map(i => getComputedStyle(i).outlineColor)")


RED_CSS = "rgb(215, 60, 60)"


def _no_verdicts(drv) -> None:
    """A view without ground truth: every tile is neither right nor wrong, on the page and in the exported PNG."""
    from selenium.webdriver.common.by import By

    tiles = drv.find_elements(By.CSS_SELECTOR, "#results .tile")
    assert tiles and all(t.get_attribute("data-correct") == "none" for t in tiles)
    assert RED_CSS not in _outline_colours(drv) and "✓" not in drv.find_element(By.ID, "results").text
    png = base64.b64decode(drv.execute_script("return window.dualpathBrowse.figureDataURL()").split(",", 1)[1])
    assert _red_pixels(png) == 0 and _green_pixels(png) == 0


def test_query_image_view_permalinks_and_export(server, driver, data, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, index = server
    driver.get(base + "/")
    _wait(driver)
    box = driver.find_element(By.ID, "query")
    box.send_keys("a yellow square", Keys.ENTER)  # exactly a test caption: the yellow image is correct
    _wait(driver, url_part="?q=a+yellow+square")
    tiles = driver.find_elements(By.CSS_SELECTOR, "#results .tile")
    assert len(tiles) == 3
    loaded = driver.execute_script(
        "return [...document.querySelectorAll('#results img')].map(i => i.complete && i.naturalWidth)")
    assert loaded == [80, 80, 80]  # the test images are 80x64
    correct = [t.text for t in tiles if t.get_attribute("data-correct") == "true"]
    assert len(correct) == 1 and "yellow.jpg" in correct[0] and "✓" in correct[0]
    assert _outline_colours(driver).count(RED_CSS) == 2  # a caption has ground truth: the other two are wrong
    assert "yellow.jpg at rank" in driver.find_element(By.CLASS_NAME, "truth").text
    _shot(driver, tmp_path, "query")

    png = base64.b64decode(driver.execute_script("return window.dualpathBrowse.figureDataURL()").split(",", 1)[1])
    with Image.open(io.BytesIO(png)) as fig:
        assert fig.format == "PNG" and fig.size[0] == 900 and fig.size[1] > 150
    assert _green_pixels(png) > 500  # the correct image's green frame was drawn
    if os.environ.get("DUALPATH_SCREENSHOTS"):
        (Path(os.environ["DUALPATH_SCREENSHOTS"]) / "browse_export_query.png").write_bytes(png)

    first = tiles[0].get_attribute("data-id")
    tiles[0].click()
    _wait(driver, url_part=f"?image={first}")
    test_caps = set(data.captions["raw"].to_numpy()[data.split_captions("test")])
    texts = [li.find_element(By.CSS_SELECTOR, "a.nav").text
             for li in driver.find_elements(By.CSS_SELECTOR, "#captions li")]
    assert len(texts) == 3 and set(texts) <= test_caps
    truth = driver.find_elements(By.CSS_SELECTOR, "#truth li")
    api = index.image(int(first), 3)
    assert [li.text.split()[1] for li in truth] == [str(g["rank"]) for g in api["truth"]]
    assert all(li.get_attribute("data-correct") == "true" for li in truth)
    assert driver.execute_script("return document.getElementById('image').naturalWidth") == 80
    _shot(driver, tmp_path, "image")

    driver.back()  # history: back to the query view, from the URL alone
    _wait(driver, url_part="?q=a+yellow+square")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#results .tile")) == 3
    assert driver.find_element(By.ID, "query").get_attribute("value") == "a yellow square"

    driver.get(f"{base}/?image={first}&k=2")  # a permalink opened in a fresh page load
    _wait(driver)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#captions li")) == 2

    driver.get(f"{base}/?q=a+yellow+circle")  # no caption of the split: no ground truth
    _wait(driver)
    _no_verdicts(driver)
    driver.get(f"{base}/?q=a+Yellow+circle")  # "Yellow" is not in the dictionary, "yellow" is
    _wait(driver)
    words = driver.find_element(By.CLASS_NAME, "words").text
    assert "did you mean yellow?" in words, words  # the case hint is on the page, not only a hover tooltip

    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(base + "/") for r in resources)  # nothing from elsewhere


def test_evaluation_view_and_errors(server, driver, tmp_path):
    from selenium.webdriver.common.by import By

    base, index = server
    driver.get(f"{base}/?view=eval&direction=t2i")
    _wait(driver)
    rows = {tr.get_attribute("data-direction"): [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, "#metrics tr[data-direction]")}
    for d in ("i2t", "t2i"):
        m = index.evaluation[d]
        assert rows[d] == [d, f"{m['R@1']:.1f}", f"{m['R@5']:.1f}", f"{m['R@10']:.1f}", f"{m['medr']:g}",
                           f"{m['meanr']:.1f}"]
    worst = driver.find_elements(By.CSS_SELECTOR, "#worst li")
    assert len(worst) == 6
    ranks = [int(li.text.split()[1]) for li in worst]
    assert ranks == sorted(ranks, reverse=True) == sorted(index.ranks["t2i"].tolist(), reverse=True)
    _shot(driver, tmp_path, "eval")
    worst[0].find_element(By.CSS_SELECTOR, "a.nav").click()  # the worst query opens its caption view
    _wait(driver, url_part="?caption=")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#results .tile")) == 3

    driver.get(f"{base}/?image=99")
    _wait(driver, state="error")
    assert "image ids are 0..2" in driver.find_element(By.CSS_SELECTOR, "#view .error").text


@pytest.fixture(scope="module")
def folder_server(model, data, tmp_path_factory):
    from retrieval.browse_index import from_folder
    from tests.test_visualize_search import COLOURS, _solid

    photos = tmp_path_factory.mktemp("photos")
    for name in ("red", "blue", "green"):
        _solid(photos / f"{name}.jpg", COLOURS[name], (120, 90))
    import torch
    yield from serving(from_folder(model, data, "test", photos, torch.device("cpu"), top_k=2))


def test_own_image_folder(folder_server, driver, data):
    """--images FOLDER: the home page shows the folder, an image opens its captions, nothing is marked, no
    evaluation view."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, index = folder_server
    driver.get(base + "/")
    _wait(driver)
    assert not driver.find_element(By.ID, "eval-link").is_displayed()
    assert "no ground truth" in driver.find_element(By.ID, "meta").text
    home = driver.find_elements(By.CSS_SELECTOR, "#view a.nav img")
    assert len(home) == 3 and index.image_names == ["blue.jpg", "green.jpg", "red.jpg"]
    home[2].click()
    _wait(driver, url_part="?image=2")
    assert driver.find_element(By.TAG_NAME, "h2").text == "Image 2: red.jpg"
    texts = [li.find_element(By.CSS_SELECTOR, "a.nav").text
             for li in driver.find_elements(By.CSS_SELECTOR, "#captions li")]
    assert len(texts) == 2 and set(texts) <= set(data.captions["raw"].to_numpy()[data.split_captions("test")])
    assert not driver.find_elements(By.CSS_SELECTOR, "#truth li")
    driver.find_element(By.ID, "query").send_keys("a big red circle", Keys.ENTER)
    _wait(driver, url_part="?q=")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#results .tile")) == 2
    _no_verdicts(driver)  # own images have no ground truth: no red "wrong" frames
    driver.get(base + "/?view=eval")
    _wait(driver, state="error")
    assert "no evaluation view" in driver.find_element(By.CSS_SELECTOR, "#view .error").text
