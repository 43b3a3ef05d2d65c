"""The playground: `GET /`, a page that sends requests to the API and draws the answers.

Plain HTML, CSS and JavaScript shipped in `service/static/playground/`, read once at import and
served by the app itself: the page needs no outside network. Its Content-Security-Policy lets it
load and call nothing but this origin.
"""

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse
from starlette.responses import Response

STATIC = Path(__file__).resolve().parent.parent / "static" / "playground"

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with the service: revalidate rather than serve a stale page.
    "Cache-Control": "no-cache",
}

PAGE = (STATIC / "index.html").read_text(encoding="utf-8")
ASSETS: dict[str, tuple[bytes, str]] = {
    path.name: (path.read_bytes(), MEDIA_TYPES[path.suffix])
    for path in sorted(STATIC.iterdir())
    if path.is_file() and path.suffix in MEDIA_TYPES and path.name != "index.html"
}

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def playground() -> HTMLResponse:
    return HTMLResponse(PAGE, headers=HEADERS)


@router.get("/playground/{name}")
async def playground_asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"no playground asset {name!r}")
    content, media_type = ASSETS[name]
    return Response(content, media_type=media_type, headers=HEADERS)
