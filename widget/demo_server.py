"""The demo site: a pretend customer website (multi-page part + SPA part) embedding the widget script.

It runs on its own origin (its own port), like a real customer site, and talks to the API cross-origin.
`site-activity dev` starts it with `start_demo(settings, widget_id)`; tests reuse `ServerThread`.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from site_activity.settings import Settings, reachable_host
from widget.assets import snippet_html

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo"
PAGES = {"/": "index.html", "/pricing": "pricing.html", "/about": "about.html"}
STATIC = {"demo.css", "pricing.js", "app.js"}


def script_tag(api_origin: str, widget_id: str) -> str:
    """The embed code a customer pastes: the spec's pre-load snippet, then the async widget script."""
    src = html.escape(f"{api_origin.rstrip('/')}/widget.js")
    return f'{snippet_html()}<script src="{src}" data-widget-id="{html.escape(widget_id)}" async></script>'


def watch_command(postgres_dsn: str, widget_id: str) -> str:
    sql = (
        "select occurred_at, event_type, name, url, properties from visitor_events "
        f"where widget_id = '{widget_id}' order by occurred_at desc limit 20"
    )
    return f'psql "{postgres_dsn}" -c "{sql}"'


def create_demo_app(api_origin: str, widget_id: str, postgres_dsn: str | None = None) -> Starlette:
    """A Starlette app serving widget/demo/ with the embed code pointing at `{api_origin}/widget.js`."""
    head = script_tag(api_origin, widget_id)
    watch = html.escape(
        watch_command(postgres_dsn, widget_id)
        if postgres_dsn
        else f"select * from visitor_events where widget_id = '{widget_id}' order by occurred_at desc;"
    )

    def render(name: str) -> HTMLResponse:
        page = (DEMO_DIR / name).read_text(encoding="utf-8")
        return HTMLResponse(
            page.replace("{{HYDRA}}", head).replace("{{WATCH}}", watch), headers={"Cache-Control": "no-store"}
        )

    async def page(request: Request) -> Response:
        return render(PAGES[request.url.path])

    async def spa(_: Request) -> Response:
        return render("app.html")  # every /app/... path is the same document; the SPA routes client-side

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response(status_code=404)
        return FileResponse(DEMO_DIR / name, headers={"Cache-Control": "no-store"})

    async def healthz(_: Request) -> Response:
        return Response("ok")

    async def no_favicon(_: Request) -> Response:
        return Response(status_code=204)  # a 404 would print an error in the console newcomers are watching

    routes = [Route(path, page) for path in PAGES]
    routes += [
        Route("/app/{rest:path}", spa),
        Route("/app", spa),
        Route("/static/{name}", static),
        Route("/healthz", healthz),
        Route("/favicon.ico", no_favicon),
    ]
    return Starlette(routes=routes)


def _server(app: ASGIApp, host: str, port: int) -> uvicorn.Server:
    # log_config=None keeps the process's own (JSON) logging; uvicorn only installs signal handlers
    # on the main thread, so these servers leave Ctrl-C to their host process.
    return uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_config=None, log_level="warning", access_log=False, lifespan="off"
        )
    )


class ServerThread:
    """Runs an ASGI app with uvicorn in a daemon thread (the caller keeps its main thread and signals)."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        self.url = f"http://{reachable_host(host)}:{port}"
        self._server = _server(app, host, port)
        self._thread = threading.Thread(target=self._server.run, name=f"http-{port}", daemon=True)

    def start(self, timeout: float = 10.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def start_demo(settings: Settings, widget_id: str, api_origin: str | None = None) -> ServerThread:
    """Starts the demo site on settings.demo_port in a background thread; `.url` is its address, `.stop()` ends it."""
    app = create_demo_app(api_origin or settings.api_origin, widget_id, settings.postgres_dsn)
    server = ServerThread(app, settings.http_host, settings.demo_port).start()
    log.info("demo site started", extra={"url": server.url, "widget_id": widget_id})
    return server
