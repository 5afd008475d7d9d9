"""The kiosk page in a real headless Chromium (Debian's package) driven by playwright, against a real server.

Skips when Chromium or playwright is missing (`.ci/run` installs both). The page's answers must equal
the API's greedy answers for the same image bytes and question: the page is only an OpenAI client.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from .conftest import API_KEY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1024, "height": 600}, permissions=["camera"])
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(server.url + "/")
    yield pg
    ctx.close()


def _scene_png(tmp_path: Path) -> Path:
    from llava_edge.synthetic.data import generate_sample

    path = tmp_path / "scene.png"
    generate_sample(7, 11).image.save(path)
    return path


def _api_answer(client, data_url: str, question: str, history: list[tuple[str, str]] = ()) -> str:
    msgs = []
    turns = [*history, (question, None)]
    for i, (q, a) in enumerate(turns):
        content = ([{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": q}]
                   if i == 0 else q)
        msgs.append({"role": "user", "content": content})
        if a is not None:
            msgs.append({"role": "assistant", "content": a})
    r = client.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=128)
    return r.choices[0].message.content


def _wait_done(page) -> str:
    page.wait_for_selector("#stats[data-state=done], #stats[data-state=error]")
    assert page.get_attribute("#stats", "data-state") == "done", page.text_content("#error")
    return page.text_content("#answer")


def test_upload_ask_follow_up(page, client, server, tmp_path):
    png = _scene_png(tmp_path)
    page.set_input_files("#file", str(png))
    page.wait_for_selector("#frame:not([hidden])")
    # the server wants a key: the first question is refused in plain words and the key form appears
    page.fill("#question", "what color is the shape?")
    page.click("#ask")
    page.wait_for_selector("#error:not([hidden])")
    assert "needs an API key" in page.text_content("#error")
    # the question stays in the log, held, and is sent by itself once the key is saved: no second bubble
    assert page.locator(".q.held").count() == 1 and page.locator(".a").count() == 0
    page.fill("#key", API_KEY)
    page.click("#key-form button")
    page.wait_for_selector(".q:not(.held)")  # sent again (and #stats no longer shows the 401's error state)
    answer = _wait_done(page)
    assert page.locator(".q").count() == 1 and page.locator(".q.held").count() == 0
    assert page.text_content(".q") == "what color is the shape?"
    data_url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    expected = _api_answer(client, data_url, "what color is the shape?")
    assert answer and answer == expected
    stats = page.text_content("#stats")
    assert "First token" in stats and "tokens" in stats
    # a follow-up about the same frame, with the first turn as history: the frame is not encoded again
    before = server.metrics()
    page.click("text=How many shapes are there?")
    page.wait_for_function("document.querySelectorAll('.a').length == 2 && "
                           "document.querySelector('#stats').dataset.state != 'running'")
    follow = _wait_done(page)
    after = server.metrics()
    assert after["llava_edge_image_cache_misses_total"] == before["llava_edge_image_cache_misses_total"]
    assert after["llava_edge_prefix_cache_hits_total"] == before["llava_edge_prefix_cache_hits_total"] + 1
    assert follow == _api_answer(client, data_url, "How many shapes are there?", [("what color is the shape?", answer)])
    # reset clears the conversation and the frame
    page.click("#reset")
    assert page.locator(".a").count() == 0 and page.is_hidden("#frame")
    page.fill("#question", "what is this?")
    page.click("#ask")
    assert "upload an image" in page.text_content("#error")


def test_fake_camera_snapshot(page, client):
    page.evaluate(f"localStorage.setItem('llava-edge-key', '{API_KEY}')")
    page.reload()
    page.click("#camera")
    page.wait_for_function("document.querySelector('#video').videoWidth > 0")
    page.fill("#question", "what is in the image?")
    page.click("#snap")
    answer = _wait_done(page)
    frame = page.get_attribute("#frame", "src")
    assert frame.startswith("data:image/jpeg;base64,")
    assert answer == _api_answer(client, frame, "what is in the image?")
    assert not page.is_hidden("#frame")
    page.click("#camera")  # back to the live view: a new conversation
    assert page.locator(".a").count() == 0 and not page.is_hidden("#video")


def test_no_ui(served_package, tmp_path_factory):
    import httpx

    from .conftest import Server

    srv = Server(served_package, "--no-ui", log=tmp_path_factory.mktemp("noui") / "server.log")
    try:
        assert httpx.get(srv.url + "/", timeout=5).status_code == 404
        assert httpx.get(srv.url + "/static/kiosk.js", timeout=5).status_code == 404
    finally:
        srv.close()


def test_page_is_self_contained(server):
    """No CDN: every script and stylesheet the page names is served by this server."""
    import re

    import httpx

    html = httpx.get(server.url + "/", timeout=5).text
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith("/") for r in refs)
    for r in refs:
        assert httpx.get(server.url + r, timeout=5).status_code == 200


def _inside(box, width, height=None) -> bool:
    return (box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= width
            and (height is None or box["y"] + box["height"] <= height))


def test_suggestions_all_visible(page):
    """Issue 25: the suggestions wrap; none is hidden in a sideways scroller, at 1024x600 or on a phone."""
    names = page.locator(".suggestion").all_text_contents()
    assert len(names) == 4 and "How many shapes are there?" in names
    for sel in (".suggestion", "#question", "#ask", "#reset"):
        for el in page.locator(sel).all():
            assert _inside(el.bounding_box(), 1024, 600), (sel, el.bounding_box())
    page.set_viewport_size({"width": 360, "height": 740})
    assert page.evaluate("(() => { const s = document.querySelector('#suggestions');"
                         " return s.scrollWidth <= s.clientWidth; })()")
    for el in page.locator(".suggestion").all():
        assert _inside(el.bounding_box(), 360), el.bounding_box()


def test_suggest_option(browser, served_package, tmp_path_factory, tmp_path):
    """`serve --suggest TEXT` (repeatable) replaces the built-in questions; a tap asks exactly that text."""
    from .conftest import Server

    wanted = ["Is the square red?", "Count the <b>circles</b> & squares"]
    args = [a for w in wanted for a in ("--suggest", w)]
    srv = Server(served_package, *args, log=tmp_path_factory.mktemp("suggest") / "server.log")
    ctx = browser.new_context(viewport={"width": 1024, "height": 600})
    try:
        pg = ctx.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(srv.url + "/")
        assert pg.locator(".suggestion").all_text_contents() == wanted
        pg.set_input_files("#file", str(_scene_png(tmp_path)))
        pg.wait_for_selector("#frame:not([hidden])")
        pg.click(".suggestion >> nth=1")
        _wait_done(pg)
        assert pg.locator(".q").all_text_contents() == [wanted[1]]
    finally:
        ctx.close()
        srv.close()


def test_tiny_answer_shows_no_rate(page, tmp_path):
    """Two tokens in one burst are no measure of speed: the line shows TTFT and the count, no tok/s."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": "red"}, "token_ids": [7]}]},
              {"choices": [{"index": 0, "delta": {}, "token_ids": [2], "finish_reason": "stop"}]}]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    replies = [(429, "application/json", json.dumps({"error": {"message": "busy", "code": "queue_full"}})),
               (200, "text/event-stream", sse)]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=replies[0][0], content_type=replies[0][1], body=replies.pop(0)[2]))
    page.set_input_files("#file", str(_scene_png(tmp_path)))
    page.wait_for_selector("#frame:not([hidden])")
    question = page.text_content(".suggestion >> nth=0")
    page.click(".suggestion >> nth=0")
    # refused (not for a key): the question leaves the log and waits in the box
    page.wait_for_selector("#error:not([hidden])")
    assert "busy" in page.text_content("#error")
    assert page.locator(".q").count() == 0 and page.input_value("#question") == question
    page.click("#ask")
    assert _wait_done(page) == "red"
    assert page.locator(".q").all_text_contents() == [question]
    stats = page.text_content("#stats")
    assert "First token" in stats and "2 tokens" in stats and "tok/s" not in stats
    # the rule itself: at least 4 tokens over at least 0.2 s
    assert "20.0 tok/s" in page.evaluate("statsLine(0, 100, 1100, 21)")
    assert "tok/s" not in page.evaluate("statsLine(0, 100, 150, 21)")
    assert "tok/s" not in page.evaluate("statsLine(0, 100, 1100, 3)")


def test_small_image_fills_preview(page, tmp_path):
    """A small image (80x40) is scaled up to the picture area, its aspect ratio kept (object-fit: contain)."""
    png = tmp_path / "wide.png"
    from PIL import Image

    Image.new("RGB", (80, 40), (200, 30, 30)).save(png)
    page.set_input_files("#file", str(png))
    page.wait_for_selector("#frame:not([hidden])")
    page.wait_for_function("document.querySelector('#frame').naturalWidth > 0")
    box = page.locator("#frame").bounding_box()
    stage = page.locator("#stage").bounding_box()
    fit = page.evaluate("getComputedStyle(document.querySelector('#frame')).objectFit")
    scale = min(box["width"] / 80, box["height"] / 40)
    assert fit == "contain" and scale > 4, (box, fit)
    # the element covers the area inside the stage's 3 px border; contain draws the image as large as fits
    assert stage["width"] - 8 <= box["width"] <= stage["width"]
    assert stage["height"] - 8 <= box["height"] <= stage["height"]


def test_favicon_no_404(browser, server):
    """The page names an icon that is served (and /favicon.ico answers): no 404 in the console."""
    import httpx

    ctx = browser.new_context(viewport={"width": 1024, "height": 600})
    try:
        pg = ctx.new_page()
        bad, errors = [], []
        pg.on("response", lambda r: r.status >= 400 and bad.append((r.status, r.url)))
        pg.on("console", lambda m: m.type == "error" and errors.append(m.text))
        with pg.expect_response(lambda r: "favicon" in r.url, timeout=15_000) as icon:
            pg.goto(server.url + "/")
        assert icon.value.status == 200 and icon.value.headers["content-type"].startswith("image/svg+xml")
        pg.wait_for_load_state("networkidle")
        assert not bad and not errors, (bad, errors)
    finally:
        ctx.close()
    r = httpx.get(server.url + "/favicon.ico", timeout=5)
    assert r.status_code == 200 and r.content.lstrip().startswith(b"<svg")
