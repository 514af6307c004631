"""The web console's pages: static files served by the API process. They hold no data; the
page calls the same OpenAI-compatible API with the key the user enters, so a tenant sees only
its own models and its feedback lands in its own store."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from tuneloop.serve.errors import ApiError

FOLDER = Path(__file__).parent / "console"
FILES = {"console.js": "text/javascript", "pages.js": "text/javascript", "console.css": "text/css"}

routes = APIRouter()


@routes.get("/", include_in_schema=False)
def index():
    return FileResponse(FOLDER / "index.html", media_type="text/html")


@routes.get("/console/{name}", include_in_schema=False)
def asset(name: str):
    if name not in FILES:
        raise ApiError(404, f"No console file '{name}'", code="unknown_url")
    return FileResponse(FOLDER / name, media_type=FILES[name])
