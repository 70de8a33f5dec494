"""The chat page at `/` and the Ollama probe on the same path.

A browser (`Accept: text/html`) gets the page; anything else that asks for `/` (curl, Ollama
clients checking that a server runs) gets Ollama's answer, `Ollama is running`, and `HEAD /` a 200.
The page and its files under /ui/ are public (the API key is typed into the page, which sends it as
a Bearer token to /v1); they are a fixed set of files from the package, served with a strict
Content-Security-Policy: scripts and styles from this server only, no inline code, requests only
back to this server. `sugam serve --no-webui` leaves only the probe.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

if TYPE_CHECKING:
    from .app import Server

FILES = Path(__file__).with_name("webui")
# The only files served, with their types: nothing else under /ui/ (so no path reaches further).
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
PROBE_TEXT = "Ollama is running"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def wants_page(request: Request) -> bool:
    """Whether `GET /` comes from a browser: it lists text/html among the types it accepts."""
    return "text/html" in request.headers.get("accept", "").lower()


def router(server: Server) -> APIRouter:
    routes = APIRouter()
    enabled = server.config.webui

    @routes.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root(request: Request) -> Response:
        if enabled and request.method == "GET" and wants_page(request):
            return Response((FILES / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                            headers={**SECURITY_HEADERS, "Vary": "Accept"})
        return PlainTextResponse(PROBE_TEXT, headers={"Vary": "Accept"} if enabled else None)

    if enabled:
        @routes.get("/ui/{name}", include_in_schema=False)
        async def asset(name: str) -> Response:
            media_type = ASSETS.get(name)
            if media_type is None:
                return PlainTextResponse("not found", status_code=404)
            return Response((FILES / name).read_bytes(), media_type=media_type, headers=SECURITY_HEADERS)

    return routes
