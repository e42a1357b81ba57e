"""The playground page (`python -m gptjax.serve`, off with --no-ui): a prompt box and the
sampling controls, the completion streamed through the server's own /v1/completions, each token
coloured by its probability with its top alternatives on hover. Plain HTML, CSS and JavaScript
in static/, shipped in the package: no build step, nothing fetched from elsewhere."""

from __future__ import annotations

from pathlib import Path

import fastapi
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException

UI_FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}


def routes(app: fastapi.FastAPI) -> None:
    """The playground: a page and its script and style, read from the package (no build step,
    nothing fetched from elsewhere). Public, as /health: the page asks for the key itself."""
    static = Path(__file__).parent / "static"

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    @app.get("/ui/{name}")
    async def asset(name: str) -> Response:
        if name not in UI_FILES:
            raise HTTPException(404, f"no such file: {name}")
        return Response((static / name).read_bytes(), media_type=UI_FILES[name])
