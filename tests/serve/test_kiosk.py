"""The kiosk page in a real headless Chromium (Debian's package) driven by playwright, against a real server.

Skips when Chromium or playwright is missing (`.ci/run` installs both). The page's answers must equal
the API's greedy answers for the same image bytes and question: the page is only an OpenAI client.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
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
    page.fill("#key", API_KEY)
    page.click("#key-form button")
    page.fill("#question", "what color is the shape?")
    page.click("#ask")
    answer = _wait_done(page)
    data_url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    expected = _api_answer(client, data_url, "what color is the shape?")
    assert answer and answer == expected
    stats = page.text_content("#stats")
    assert "First token" in stats and "tok/s" in stats
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
