"""The kiosk page: static HTML, CSS and JavaScript from serve/static/, served at / next to the API.

Why static files and no build step: a kiosk is often offline and a robot's panel has no toolchain. The
page talks to this same server's /v1/chat/completions (server-sent events), so it is an ordinary
OpenAI client and everything it shows (answers, TTFT, tokens/s, errors) comes from the public API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

STATIC = Path(__file__).with_name("static")
FILES = {"kiosk.css": "text/css", "kiosk.js": "text/javascript"}


def mount_ui(app: FastAPI) -> None:
    # no-cache: a kiosk left running picks up a new page after a server upgrade
    headers = {"Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=headers)

    def route(name: str, media: str):  # a closure, not default arguments: those would be query parameters
        async def send() -> FileResponse:
            return FileResponse(STATIC / name, media_type=media, headers=headers)
        return send

    for name, media in FILES.items():
        app.add_api_route(f"/static/{name}", route(name, media), methods=["GET"], include_in_schema=False)
