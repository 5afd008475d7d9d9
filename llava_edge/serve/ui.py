"""The kiosk page: static HTML, CSS and JavaScript from serve/static/, served at / next to the API.

Why static files and no build step: a kiosk is often offline and a robot's panel has no toolchain. The
page talks to this same server's /v1/chat/completions (server-sent events), so it is an ordinary
OpenAI client and everything it shows (answers, TTFT, tokens/s, errors) comes from the public API.

The suggested questions are the one thing the server fills in: ``serve --suggest TEXT`` (repeatable), else
DEFAULT_SUGGESTIONS (questions the shipped demo model was trained on). They are written into index.html as
buttons, so the page needs no second request and shows them before its script runs.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Sequence

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse

STATIC = Path(__file__).with_name("static")
FILES = {"kiosk.css": "text/css", "kiosk.js": "text/javascript", "favicon.svg": "image/svg+xml"}
DEFAULT_SUGGESTIONS = ("What is in the image?", "What color is the shape?", "How many shapes are there?",
                       "Where is the shape?")
SLOT = "<!-- suggestions -->"  # in index.html, inside <div id="suggestions">


def suggestion_list(suggest: Sequence[str] = ()) -> tuple[str, ...]:
    """The questions the page offers: `suggest` with whitespace collapsed and blanks and repeats dropped,
    or the defaults when none is left."""
    out: list[str] = []
    for s in suggest:
        s = re.sub(r"\s+", " ", str(s)).strip()
        if s and s not in out:
            out.append(s)
    return tuple(out) or DEFAULT_SUGGESTIONS


def render_index(suggest: Sequence[str] = ()) -> str:
    buttons = "\n".join(f'      <button type="button" class="suggestion">{html.escape(s)}</button>'
                        for s in suggestion_list(suggest))
    return (STATIC / "index.html").read_text(encoding="utf-8").replace(SLOT, "\n" + buttons + "\n    ", 1)


def mount_ui(app: FastAPI, suggest: Sequence[str] = ()) -> None:
    # no-cache: a kiosk left running picks up a new page after a server upgrade
    headers = {"Cache-Control": "no-cache"}
    suggest = tuple(suggest)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(render_index(suggest), headers=headers)

    def route(name: str, media: str):  # a closure, not default arguments: those would be query parameters
        async def send() -> FileResponse:
            return FileResponse(STATIC / name, media_type=media, headers=headers)
        return send

    for name, media in FILES.items():
        app.add_api_route(f"/static/{name}", route(name, media), methods=["GET"], include_in_schema=False)
    # for clients that ask for /favicon.ico without reading the page's <link rel="icon">
    app.add_api_route("/favicon.ico", route("favicon.svg", FILES["favicon.svg"]), methods=["GET"],
                      include_in_schema=False)
