"""The widget script in a real headless Chromium, against the real API + sink + Postgres.

Every check reads what a customer would see: rows in `visitor_events`. Timers run on Playwright's fake
clock (`page.clock`), so "after 5 s" costs no real time; network and the pipeline are real.

The fake clock flows with real time, and every wait for rows moves it ahead as well (`Tab.wait_rows`):
a request the real API answers 503 in a slow broker moment is retried after a backoff on that clock, which
must never stand still while a test waits for the retry's rows. Only single-page tests that assert
"nothing was sent yet" pause it (`pause_clock`), so that holds however slow the machine is; their waits
move it. (A paused clock across page loads would give the next page the same milliseconds, and events of
two pages re-sent in one request could then be stored out of order.) Assertions that something was sent
*without* a timer read the requests made (`posts`, `Pages.relayed`), never rows, so moving the clock while
waiting for rows cannot make them pass.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, Playwright, Route, sync_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute

from dev_stack.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from site_activity.settings import Settings
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, Service, http_ok, make_settings
from widget.assets import snippet_csp_hash, snippet_html, widget_script
from widget.demo_server import ServerThread, start_demo

pytestmark = pytest.mark.browser

TRACK_PATH = "/api/widget/track"
FLUSH_MS = 5000
WAIT_S = 30  # upper bound of every wait on a condition: generous, a loaded machine must not fail a test

# Delivery order, then client order within a request. Not occurred_at alone: the fake clock jumps 5 s
# ahead of real time, and the server's skew correction (rightly) moves such requests back in time.
ROWS = """SELECT event_type, name, url, referrer, properties, user_id, visitor_id, event_id::text
          FROM visitor_events WHERE widget_id = %s AND event_type <> 'session_start'
          ORDER BY received_at, occurred_at, event_id"""

# Counts the widget's POSTs as they are made (synchronously, so exact even while the clock is frozen) and
# as they are answered, so a test can wait for the widget to have handled a response.
COUNT_POSTS = """
window.__posts = 0; window.__answered = 0; window.__sizes = []; window.__counts = []; window.__statuses = [];
window.__ids = [];
const realFetch = window.fetch;
window.fetch = function (url, init) {
  if (!String(url).endsWith('__TRACK_PATH__')) return realFetch.apply(this, arguments);
  window.__posts++;
  window.__sizes.push(new TextEncoder().encode(init.body).length);
  window.__counts.push(JSON.parse(init.body).events.length);
  window.__ids.push(...JSON.parse(init.body).events.map((e) => e.event_id));
  return realFetch.apply(this, arguments).then(
    (r) => { window.__statuses.push(r.status); return r; },
    (e) => { window.__statuses.push(String(e)); throw e; },
  ).finally(() => { window.__answered++; });
};
""".replace("__TRACK_PATH__", TRACK_PATH)


# --- the pipeline: one API + sink for the module, raw topic straight into Postgres -------------------
@pytest.fixture(scope="module")
def stack(
    kafka: EmbeddedBroker, postgres: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    log_dir = tmp_path_factory.mktemp("widget-stack")
    settings = make_settings(kafka, postgres, log_dir / "data", sink_from_enriched=False)
    api = _start(Service("api", settings, log_dir), settings.health_url("api"))
    sink = _start(Service("sink", settings, log_dir), settings.health_url("sink"))
    yield settings
    sink.stop()
    api.stop()


def _start(service: Service, health_url: str) -> Service:
    service.ready = http_ok(health_url)
    return service.start()


@pytest.fixture(scope="module")
def api_origin(stack: Settings) -> str:
    return f"http://127.0.0.1:{stack.http_port}"


@pytest.fixture
def widget_id(make_widget: Callable, api_origin: str) -> str:
    """A fresh enabled widget the API already knows (a 404 would make the widget drop the events).

    make_widget creates and enables in one transaction, so the API's cache never holds it disabled: the first
    204 here means known AND enabled (a disabled widget would also answer 204 but store nothing)."""
    wid = str(make_widget().id)
    body = {"widget_id": wid, "visitor_id": "warm-up", "sent_at": "2026-01-01T00:00:00Z", "events": []}
    deadline = time.monotonic() + WAIT_S
    while httpx.post(api_origin + TRACK_PATH, json=body).status_code != 204:
        assert time.monotonic() < deadline, "the API never learned about the new widget"
        time.sleep(0.1)
    return wid


# --- test pages: served per test from a real HTTP server on its own origin ------------------------------
@dataclass
class Pages:
    """HTML registered by the tests, served on http://127.0.0.1:PORT and http://localhost:PORT."""

    port: int
    api_origin: str
    content: dict[str, tuple[str, str, dict[str, str]]] = field(default_factory=dict)
    relayed: list[dict] = field(default_factory=list)  # events of every POST made through `relay_host`

    @property
    def relay_host(self) -> str:
        """A `data-api-host` that forwards to the real API and records what each POST carried, as the server
        received it: requests of a page that has gone are seen too (the browser reports none of them)."""
        return self.url("/relay")

    def wait_relayed(self, n: int) -> list[dict]:
        """The events relayed once at least `n` were (real time only: no page clock is moved)."""
        deadline = time.monotonic() + WAIT_S
        while len(self.relayed) < n:
            assert time.monotonic() < deadline, f"only {len(self.relayed)} events relayed, wanted {n}"
            time.sleep(0.05)
        return self.relayed

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add(self, path: str, body: str, media_type: str = "text/html", headers: dict[str, str] | None = None) -> str:
        self.content[path] = (body, media_type, headers or {})
        return self.url(path)

    def tag(self, widget_id: str, extra: str = "async") -> str:
        return f'<script src="{self.api_origin}/widget.js" data-widget-id="{widget_id}" {extra}></script>'

    def page(self, path: str, widget_id: str, body: str = "", *, head: str | None = None) -> str:
        """A page embedding the widget the way the README tells customers to: snippet, then async script."""
        if head is None:
            head = snippet_html() + self.tag(widget_id)
        return self.add(
            path, f"<!doctype html><html><head><meta charset='utf-8'>{head}</head><body>{body}</body></html>"
        )


@pytest.fixture(scope="module")
def page_server(api_origin: str) -> Iterator[Pages]:
    pages = Pages(free_port(), api_origin)

    async def relay(request: Request) -> Response:
        body = await request.body()
        pages.relayed.extend(json.loads(body).get("events", []))
        async with httpx.AsyncClient() as client:
            answer = await client.post(api_origin + TRACK_PATH, content=body, headers={"Content-Type": "text/plain"})
        return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))

    async def serve(request: Request) -> Response:
        found = pages.content.get(request.url.path)
        if found is None:  # favicon.ico included: no 404 noise in the console the tests read
            return Response(status_code=204 if request.url.path == "/favicon.ico" else 404)
        body, media_type, headers = found
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-store", **headers})

    app = Starlette(
        routes=[HttpRoute("/relay" + TRACK_PATH, relay, methods=["POST"]), HttpRoute("/{path:path}", serve)]
    )
    server = ServerThread(app, "127.0.0.1", pages.port).start()
    yield pages
    server.stop()


@pytest.fixture
def pages(page_server: Pages) -> Iterator[Pages]:
    yield page_server
    page_server.content.clear()
    page_server.relayed.clear()


# --- the browser ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does this)")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield b
    b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context()  # fresh storage per test: a first-time visitor
    yield ctx
    ctx.close()


@dataclass
class Tab:
    page: Page
    warnings: list[str]

    def posts(self) -> int:
        return self.page.evaluate("window.__posts")

    def statuses(self) -> list:
        """The answers to the current document's POSTs so far (HTTP status, or the network error)."""
        return self.page.evaluate("window.__statuses")

    def wait_rows(self, db: psycopg.Connection, widget_id: str, expected: int, timeout: float = WAIT_S) -> list[tuple]:
        """Waits until the widget has `expected` rows, moving the page's paused clock meanwhile (timers and
        retry backoffs fire), and returns them."""
        deadline = time.monotonic() + timeout
        while len(found := db.execute(ROWS, (widget_id,)).fetchall()) < expected:
            assert time.monotonic() < deadline, (
                f"expected {expected} rows, got {len(found)}: {found[:5]}; "
                f"answers: {self.statuses()}; warnings: {self.warnings}"
            )
            self.page.clock.run_for(1000)
            time.sleep(0.2)
        return found

    def wait_answered(self, n: int, timeout: float = WAIT_S) -> None:
        """Waits (in real time) until `n` POSTs of the current document have been answered."""
        deadline = time.monotonic() + timeout
        while self.page.evaluate("window.__answered") < n:
            assert time.monotonic() < deadline, f"only {self.page.evaluate('window.__answered')} answers, wanted {n}"
            time.sleep(0.05)

    def wait_loaded(self, timeout: float = WAIT_S) -> None:
        """Waits for widget.js itself (not just the snippet) on the current document."""
        deadline = time.monotonic() + timeout
        while not self.page.evaluate("!!(window.hydra && window.hydra._loaded)"):
            assert time.monotonic() < deadline, "widget.js never loaded"
            time.sleep(0.05)

    def flush_timer(self) -> None:
        """Lets the widget's 5 s flush timer fire."""
        self.page.clock.run_for(FLUSH_MS)


def open_tab(context: BrowserContext) -> Tab:
    """A page with the fake clock installed and the widget's POSTs counted."""
    page = context.new_page()
    tab = Tab(page, [])
    page.on("console", lambda m: _record_warning(m, tab.warnings))
    page.on("pageerror", lambda e: tab.warnings.append(f"pageerror: {e}"))
    page.add_init_script(COUNT_POSTS)
    page.clock.install()
    return tab


def pause_clock(tab: Tab) -> None:
    """From here on only the test moves the page's clock (call before the page loads)."""
    tab.page.clock.pause_at(datetime.now(UTC) + timedelta(seconds=1))


@pytest.fixture
def tab(context: BrowserContext) -> Tab:
    return open_tab(context)


# Chromium logs every failed request; a 503 from the real API in a slow broker moment is retried by the
# widget (the tests then check the rows), so it is no warning of the page's.
RETRIED_RESPONSE = "Failed to load resource: the server responded with a status of 503"


def _record_warning(message: ConsoleMessage, into: list[str]) -> None:
    if message.type in ("warning", "error") and not message.text.startswith(RETRIED_RESPONSE):
        into.append(message.text)


def settled_rows(db: psycopg.Connection, tab: Tab, widget_id: str, expected: int) -> list[tuple]:
    """Exactly the rows of this widget once `expected` arrived plus a marker sent after everything else
    (so an unwanted extra event, e.g. a duplicate pageview, sent before the marker fails the count)."""
    tab.wait_loaded()  # else the marker waits in the snippet's queue and the timer is armed after we ran it
    tab.page.evaluate("hydra.track('__end__')")
    deadline = time.monotonic() + WAIT_S
    while not db.execute(
        "SELECT 1 FROM visitor_events WHERE widget_id = %s AND name = '__end__'", (widget_id,)
    ).fetchone():
        assert time.monotonic() < deadline, (
            f"the end marker was never stored; answers: {tab.statuses()}; warnings: {tab.warnings}"
        )
        tab.flush_timer()  # the marker's timer, and the backoff of any retry (a 503 in a slow broker moment)
        time.sleep(0.2)
    found = tab.wait_rows(db, widget_id, expected + 1)
    assert len(found) == expected + 1, found
    return [r for r in found if r[1] != "__end__"]


def stored_queue(tab: Tab, widget_id: str) -> list[dict]:
    """The unsent events in the page origin's localStorage: every page's queue key of the widget."""
    return tab.page.evaluate(
        """prefix => Object.keys(localStorage).filter((k) => k.startsWith(prefix)).sort()
        .flatMap((k) => JSON.parse(localStorage.getItem(k)))""",
        f"hydra_q_{widget_id}:",
    )


def pageviews(found: list[tuple]) -> list[tuple[str, str | None]]:
    return [(r[2], r[3]) for r in found if r[0] == "pageview"]


# --- the tests -----------------------------------------------------------------------------------------
def test_widget_placeholder_ids_are_the_apis() -> None:
    """The widget drops identify calls with the same placeholder ids the API refuses (one list, two copies)."""
    from producer_api.validation import PLACEHOLDER_USER_IDS
    from widget.assets import SOURCE

    match = re.search(r"var PLACEHOLDER_IDS = \[(.*?)\];", SOURCE.read_text(encoding="utf-8"), re.S)
    assert match, "PLACEHOLDER_IDS not found in hydra.js"
    js = re.findall(r"'((?:[^'\\]|\\.)*)'", match.group(1))
    assert "" in js  # the API refuses an empty/blank id by its strip() check
    assert sorted(set(js) - {""}) == sorted(PLACEHOLDER_USER_IDS) and len(js) == len(set(js))
    assert widget_script().gzipped_size <= 4096


def test_size_budget(api_origin: str) -> None:
    script = widget_script()
    assert script.gzipped_size <= 4096, f"widget.js is {script.gzipped_size} bytes gzipped"
    served = httpx.get(api_origin + "/widget.js", headers={"Accept-Encoding": "gzip"})
    assert served.headers["content-encoding"] == "gzip" and served.num_bytes_downloaded <= 4096
    assert served.content == script.body and script.version in served.text.splitlines()[0]


def test_pageviews_on_load_push_replace_and_popstate_without_duplicates(db, pages, tab, widget_id) -> None:
    a = pages.page("/spa/a", widget_id)
    b, c = pages.url("/spa/b"), pages.url("/spa/c")
    tab.page.goto(a)
    tab.page.evaluate("""() => {
        history.pushState({}, '', '/spa/b');
        history.replaceState({}, '', '/spa/b');      // same URL: no pageview
        history.pushState({}, '', '/spa/b');         // same URL again: none either
        history.replaceState({}, '', '/spa/c');      // a new URL, even by replaceState, is a route change
        history.pushState({}, '', '/spa/c#details'); // an in-page anchor is not a new page
    }""")
    for _ in range(3):  # back to /spa/c (hash only), then /spa/b, then /spa/a
        tab.page.go_back()
    found = settled_rows(db, tab, widget_id, 5)
    assert pageviews(found) == [(a, None), (b, a), (c, b), (b, c), (a, b)]
    assert not tab.warnings


def test_snippet_queue_drains_in_order(db, pages, tab, widget_id) -> None:
    calls = """<script>
        hydra.track('first', {i: 1});
        hydra.identify('u_1', {plan: 'growth'});
        hydra.track('second', {i: 2});
        hydra.track('third');
    </script>"""
    head = snippet_html() + calls + pages.tag(widget_id)  # calls run before the async script even starts
    url = pages.page("/queued", widget_id, head=head)
    tab.page.goto(url)
    found = settled_rows(db, tab, widget_id, 5)
    assert [(r[0], r[1], r[4], r[5]) for r in found] == [
        ("pageview", None, {}, None),
        ("custom", "first", {"i": 1}, None),
        ("identify", None, {"plan": "growth"}, "u_1"),
        ("custom", "second", {"i": 2}, None),
        ("custom", "third", {}, None),
    ]
    assert {r[2] for r in found} == {url}


def test_sync_script_without_snippet(db, pages, tab, widget_id) -> None:
    head = pages.tag(widget_id, extra="") + "<script>hydra.track('right_after', {sync: true})</script>"
    tab.page.goto(pages.page("/sync", widget_id, head=head))
    found = settled_rows(db, tab, widget_id, 2)
    assert [(r[0], r[1], r[4]) for r in found] == [("pageview", None, {}), ("custom", "right_after", {"sync": True})]
    assert not tab.warnings


def test_25_events_flush_at_once_and_fewer_after_5_seconds(db, pages, tab, widget_id) -> None:
    pause_clock(tab)
    tab.page.goto(pages.page("/burst", widget_id))
    tab.page.evaluate("for (let i = 1; i <= 23; i++) hydra.track('burst', {i})")
    assert tab.posts() == 0  # pageview + 23 = 24 queued: still waiting
    tab.page.evaluate("hydra.track('burst', {i: 24})")
    assert tab.posts() == 1  # the 25th event flushed at once, no timer involved
    assert len(tab.wait_rows(db, widget_id, 25)) == 25  # (a 503 would be retried here)

    tab.wait_answered(tab.posts())
    assert stored_queue(tab, widget_id) == []  # nothing left to retry
    before = tab.posts()
    tab.page.evaluate("for (let i = 25; i <= 27; i++) hydra.track('burst', {i})")
    tab.page.clock.run_for(FLUSH_MS - 100)
    assert tab.posts() == before  # three events wait for the 5 s timer
    tab.page.clock.run_for(100)
    assert tab.posts() == before + 1
    found = tab.wait_rows(db, widget_id, 28)
    assert [r[4]["i"] for r in found if r[0] == "custom"] == list(range(1, 28))


def test_leaving_the_page_flushes_the_queue(db, pages, tab, widget_id) -> None:
    relayed = snippet_html() + pages.tag(widget_id, extra=f'data-api-host="{pages.relay_host}" async')
    second = pages.page("/leave/2", widget_id, head=relayed)
    first = pages.page("/leave/1", widget_id, f'<a id="next" href="{second}">next</a>', head=relayed)
    tab.page.goto(first)
    tab.page.evaluate("hydra.track('before_leaving', {n: 1}); hydra.track('before_leaving', {n: 2})")
    tab.page.click("#next")  # pagehide: no timer fires, the clock stands still
    tab.page.wait_for_url(second)
    tab.wait_loaded()
    # Sent by the first page as it went, before the second page's 5 s timer could send anything.
    assert [(e["type"], e.get("name"), e["url"]) for e in pages.wait_relayed(3)[:3]] == [
        ("pageview", None, first),
        ("custom", "before_leaving", first),
        ("custom", "before_leaving", first),
    ]
    found = settled_rows(db, tab, widget_id, 4)
    assert [(r[0], r[1], r[2]) for r in found[:3]] == [
        ("pageview", None, first),
        ("custom", "before_leaving", first),
        ("custom", "before_leaving", first),
    ]
    assert pageviews(found)[-1] == (second, first)  # the full-page navigation's referrer


def test_a_hidden_tab_flushes_the_queue(db, pages, tab, widget_id) -> None:
    """Mobile browsers often kill hidden tabs without a pagehide. (Headless Chromium never hides a page,
    so the browser's signal is simulated.)"""
    tab.page.goto(pages.page("/hide", widget_id))
    tab.page.evaluate("hydra.track('before_hiding')")
    tab.page.evaluate("""() => {
        Object.defineProperty(document, 'visibilityState', {value: 'hidden', configurable: true});
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    assert tab.posts() == 1  # at once, no timer
    assert [r[1] for r in tab.wait_rows(db, widget_id, 2)] == [None, "before_hiding"]


def test_503_is_retried_with_the_same_event_ids_and_lands_once(db, pages, tab, widget_id) -> None:
    bodies: list[dict] = []

    def first_fails(route: Route) -> None:
        bodies.append(json.loads(route.request.post_data or "{}"))
        if len(bodies) == 1:
            route.fulfill(status=503, headers={"Access-Control-Allow-Origin": "*", "Retry-After": "1"})
        else:
            route.continue_()

    tab.page.route(f"**{TRACK_PATH}", first_fails)
    pause_clock(tab)
    tab.page.goto(pages.page("/retry", widget_id))
    tab.page.evaluate("hydra.track('kept', {n: 1}); hydra.track('kept', {n: 2})")
    tab.flush_timer()
    tab.wait_answered(1)
    tab.page.clock.run_for(499)  # the first backoff is 0.5-1 s (jittered)
    assert tab.posts() == 1
    tab.page.clock.run_for(501)
    tab.wait_answered(2)
    assert tab.statuses()[0] == 503  # the real API may answer the retry 503 too
    assert len(bodies) == 2
    ids = [e["event_id"] for e in bodies[0]["events"]]
    assert [e["event_id"] for e in bodies[1]["events"]] == ids
    # Sync Playwright runs route handlers only inside Playwright calls, not while we poll Postgres.
    tab.page.unroute(f"**{TRACK_PATH}")
    found = settled_rows(db, tab, widget_id, 3)
    assert sorted(r[7] for r in found) == sorted(ids)


def test_unsent_events_survive_a_navigation(db, pages, tab, widget_id) -> None:
    tab.page.route(f"**{TRACK_PATH}", lambda route: route.abort("connectionrefused"))
    first = pages.page("/offline/1", widget_id)
    second = pages.page("/offline/2", widget_id)
    tab.page.goto(first)
    tab.page.evaluate("hydra.track('while_offline')")
    tab.flush_timer()
    tab.wait_answered(1)
    tab.page.goto(second)  # the pagehide flush fails too
    stored = stored_queue(tab, widget_id)
    assert [e.get("name") for e in stored] == [None, "while_offline", None]  # pageview 1, track, pageview 2
    tab.page.unroute(f"**{TRACK_PATH}")
    found = settled_rows(db, tab, widget_id, 3)
    assert [(r[0], r[2]) for r in found] == [("pageview", first), ("custom", first), ("pageview", second)]
    assert stored_queue(tab, widget_id) == []


def test_a_4xx_is_not_retried(db, pages, tab, widget_id) -> None:
    """The server refuses a NUL in a name (Postgres cannot store it) with a 400 and keeps the rest."""
    tab.page.goto(pages.page("/nul", widget_id))
    tab.page.evaluate("hydra.track('bad\\u0000name'); hydra.track('good')")
    tab.flush_timer()
    deadline = time.monotonic() + WAIT_S
    while 400 not in tab.statuses():  # a 503 (slow broker) is retried meanwhile
        assert time.monotonic() < deadline, tab.statuses()
        tab.page.clock.run_for(1000)
        time.sleep(0.1)
    tab.page.clock.run_for(120_000)  # far beyond any backoff
    statuses = tab.statuses()
    assert statuses[-1] == 400 and set(statuses[:-1]) <= {503} and tab.posts() == len(statuses), statuses
    assert stored_queue(tab, widget_id) == []
    found = settled_rows(db, tab, widget_id, 2)
    assert [r[1] for r in found] == [None, "good"]


def test_a_backlog_drains_in_chunks_under_the_keepalive_limit(db, pages, tab, widget_id) -> None:
    """Offline (the API host is a closed port), 520 events pile up; storage keeps the newest 500. The next
    page load sends them in requests of at most 100 events and 60 KB (browsers allow 64 KB of keepalive)."""
    dead_api = f"http://127.0.0.1:{free_port()}"
    offline_tag = pages.tag(widget_id, extra=f'data-api-host="{dead_api}" async')
    first = pages.page("/backlog/1", widget_id, head=snippet_html() + offline_tag)
    second = pages.page("/backlog/2", widget_id)
    tab.page.goto(first)
    tab.page.evaluate("for (let i = 1; i <= 519; i++) hydra.track('offline', {i, pad: 'x'.repeat(200)})")
    assert tab.posts() >= 1 and all(size <= 60_000 for size in tab.page.evaluate("window.__sizes"))
    assert len(stored_queue(tab, widget_id)) == 500
    tab.page.goto(second)
    found = settled_rows(db, tab, widget_id, 500)
    # pageview 1 and i=1..19 were dropped offline; this page's own pageview pushed out i=20
    assert sorted(r[4]["i"] for r in found if r[0] == "custom") == list(range(21, 520))  # chunks run in parallel
    assert pageviews(found) == [(second, None)]
    sizes, counts = tab.page.evaluate("window.__sizes"), tab.page.evaluate("window.__counts")
    ids = tab.page.evaluate("window.__ids")  # a chunk answered 503 is sent again: count each event once
    assert len(set(ids)) == 501 and max(counts) <= 100 and max(sizes) <= 60_000, (sizes, counts)
    # The first two requests went out together: 100 events, then only as many as fit in the 60 KB budget.
    assert counts[0] == 100 and counts[1] < 100 and 55_000 < sizes[0] + sizes[1] <= 60_000, (sizes, counts)


def test_back_forward_cache_restore_counts_a_pageview(db, pages, playwright, widget_id) -> None:
    """Back to a page kept in the bfcache is a new view without a new load (Playwright turns the bfcache
    off by default, so this test has its own browser)."""
    second = pages.page("/bf/2", widget_id)
    first = pages.page("/bf/1", widget_id, f'<a id="next" href="{second}">next</a>')
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM, args=CHROMIUM_ARGS, ignore_default_args=["--disable-back-forward-cache"]
    )
    try:
        page = browser.new_page()
        page.clock.install()
        page.goto(first)
        page.evaluate("window.__first_visit = true")
        page.click("#next")
        page.wait_for_url(second)
        page.go_back(wait_until="commit")  # a restore from the bfcache fires no load event
        page.wait_for_function("document.readyState === 'complete'")
        found = Tab(page, []).wait_rows(db, widget_id, 3)
        restored = page.evaluate("window.__first_visit === true")
    finally:
        browser.close()
    assert pageviews(found) == [(first, None), (second, first), (first, None)]
    assert restored  # the very document of the first visit: it really came from the bfcache


def test_visitor_id_persists_across_reloads_and_is_per_origin(db, pages, tab, widget_id) -> None:
    url = pages.page("/who", widget_id)
    tab.page.goto(url)
    tab.wait_rows(db, widget_id, 1)  # each page's pageview lands before the next: a 503 can be retried
    tab.page.reload()
    tab.wait_rows(db, widget_id, 2)
    tab.page.goto(pages.url("/who", host="localhost"))
    found = settled_rows(db, tab, widget_id, 3)
    by_host = [(r[2].split("/")[2].split(":")[0], r[6]) for r in found]
    assert [host for host, _ in by_host] == ["127.0.0.1", "127.0.0.1", "localhost"]
    (_, first), (_, reloaded), (_, other_origin) = by_host
    assert first == reloaded
    assert other_origin != first
    uuid.UUID(first)
    uuid.UUID(other_origin)
    assert tab.page.context.cookies() == []  # localStorage only


def test_invalid_track_calls_are_dropped_with_a_warning(db, pages, tab, widget_id) -> None:
    tab.page.goto(pages.page("/invalid", widget_id))
    tab.page.evaluate("""() => {
        hydra.track('x'.repeat(101));                          // 101 characters
        hydra.track('too_big', {s: 'é'.repeat(2045)});         // 4098 UTF-8 bytes as JSON, only 2053 characters
        hydra.track('not_plain', [1, 2]);
        hydra.track('');
        hydra.track('getter_throws', {get boom() { throw new Error('boom'); }});
        hydra.track('😀'.repeat(100));                          // 100 code points (200 UTF-16 units): valid
        hydra.track('just_fits', {s: 'a'.repeat(4088)});       // exactly 4096 bytes as JSON: valid
    }""")
    found = settled_rows(db, tab, widget_id, 3)
    assert [(r[0], r[1]) for r in found] == [("pageview", None), ("custom", "😀" * 100), ("custom", "just_fits")]
    assert len(found[2][4]["s"]) == 4088
    hydra_warnings = [w for w in tab.warnings if w.startswith("[hydra]")]
    assert len(hydra_warnings) == 5 and len(tab.warnings) == 5, tab.warnings  # and no page error
    assert "100 characters" in hydra_warnings[0] and "4096 bytes" in hydra_warnings[1]


def test_identify_reaches_the_server_with_traits(db, pages, tab, widget_id) -> None:
    tab.page.goto(pages.page("/login", widget_id))
    traits = {"email": "paul@arrakis.example", "name": "Paul Atreides", "plan": "growth"}
    tab.page.evaluate("traits => hydra.identify('u_88291', traits)", traits)
    found = settled_rows(db, tab, widget_id, 2)
    assert (found[1][0], found[1][5], found[1][4]) == ("identify", "u_88291", traits)


def test_tracks_when_storage_is_blocked(db, pages, tab, widget_id) -> None:
    tab.page.add_init_script("""Object.defineProperty(window, 'localStorage', {
        get() { throw new DOMException('The operation is insecure.', 'SecurityError'); }
    });""")
    tab.page.goto(pages.page("/private", widget_id))
    tab.page.evaluate("hydra.track('still_counted')")
    found = settled_rows(db, tab, widget_id, 2)
    assert [r[1] for r in found] == [None, "still_counted"]
    assert found[0][6] == found[1][6]  # one in-memory visitor id for the page's life
    uuid.UUID(found[0][6])
    assert not tab.warnings


@pytest.mark.parametrize("snippet", ["external file", "inline with hash"])
def test_works_under_a_strict_csp(db, pages, tab, widget_id, api_origin, snippet) -> None:
    """The README's CSP: script-src + connect-src for the API host; the snippet either moved to a file of
    the site or kept inline and allowed by its hash. No other inline script runs."""
    pages.add("/csp/snippet.js", snippet_html().replace("<script>", "").replace("</script>", ""), "text/javascript")
    pages.add("/csp/calls.js", "hydra.track('under_csp', {ok: true})", "text/javascript")
    if snippet == "external file":
        script_src, head = f"'self' {api_origin}", '<script src="/csp/snippet.js"></script>'
    else:
        script_src, head = f"'self' {api_origin} {snippet_csp_hash()}", snippet_html()
    csp = f"default-src 'self'; script-src {script_src}; connect-src {api_origin}"
    head += (
        '<script src="/csp/calls.js"></script>'
        + pages.tag(widget_id)
        + "<script>document.title = 'inline ran'</script>"
    )  # proves the policy is enforced
    url = pages.add(
        "/csp/page",
        f"<!doctype html><html><head>{head}</head><body>csp</body></html>",
        headers={"Content-Security-Policy": csp},
    )
    tab.page.goto(url)
    tab.wait_loaded()
    assert tab.page.title() != "inline ran"
    found = tab.wait_rows(db, widget_id, 2)
    assert [(r[0], r[1], r[4]) for r in found] == [("pageview", None, {}), ("custom", "under_csp", {"ok": True})]
    assert len(tab.warnings) == 1 and "inline" in tab.warnings[0], tab.warnings  # only the deliberate one


def test_demo_site(db, tab, widget_id, stack) -> None:
    """What `site-activity dev` serves: click through both parts of the demo, every click becomes a row."""
    demo = start_demo(stack, widget_id)
    try:
        page = tab.page
        page.goto(demo.url + "/")
        page.click("text=Pricing")
        page.click("text=Choose Growth")
        page.click("text=The app (SPA)")
        page.click("a[data-route][href='/app/projects']")
        page.click("#upgrade")
        page.click("#login button[type=submit]")
        found = settled_rows(db, tab, widget_id, 7)
    finally:
        demo.stop()
    assert pageviews(found) == [
        (demo.url + "/", None),
        (demo.url + "/pricing", demo.url + "/"),
        (demo.url + "/app/", demo.url + "/pricing"),
        (demo.url + "/app/projects", demo.url + "/app/"),
    ]
    assert [(r[1], r[4]) for r in found if r[0] == "custom"] == [
        ("clicked_upgrade", {"plan": "growth", "source": "pricing_page"}),
        ("clicked_upgrade", {"plan": "growth", "source": "app"}),
    ]
    assert [(r[5], r[4]["email"]) for r in found if r[0] == "identify"] == [("u_88291", "paul@arrakis.example")]
    assert not tab.warnings


# --- issue 8: field reports ----------------------------------------------------------------------------
def test_tabs_of_an_origin_never_erase_each_others_unsent_events(db, pages, context, widget_id) -> None:
    """Offline tabs /a and /b each keep their unsent events; a later page sends them all. A tab still open
    keeps tracking while another page delivers what it adopted, and loses nothing either."""
    dead_api = f"http://127.0.0.1:{free_port()}"
    offline = snippet_html() + pages.tag(widget_id, extra=f'data-api-host="{dead_api}" async')
    url_a, url_b, url_d = (pages.page(path, widget_id, head=offline) for path in ("/a", "/b", "/d"))
    url_c, url_e = pages.page("/c", widget_id), pages.page("/e", widget_id)

    a, b = open_tab(context), open_tab(context)
    a.page.goto(url_a)
    a.wait_loaded()
    b.page.goto(url_b)
    b.wait_loaded()
    b.page.evaluate("hydra.track('b_click')")
    a.page.evaluate("hydra.track('a_click')")  # at once: tabs run in separate processes
    a.page.close()
    b.page.close()

    # D is still open (offline) while C, online, delivers what is stored; D tracks while C's request is out.
    d = open_tab(context)
    d.page.goto(url_d)
    d.wait_loaded()
    assert sorted((e["type"], e.get("name") or "", e["url"]) for e in stored_queue(d, widget_id)) == sorted(
        [
            ("pageview", "", url_a),
            ("pageview", "", url_b),
            ("custom", "b_click", url_b),
            ("custom", "a_click", url_a),
            ("pageview", "", url_d),
        ]
    )
    c = open_tab(context)
    held: list[Route] = []
    c.page.route(f"**{TRACK_PATH}", lambda route: held.append(route))
    c.page.goto(url_c)
    c.wait_loaded()
    c.flush_timer()
    deadline = time.monotonic() + WAIT_S
    while not held:
        assert time.monotonic() < deadline, "tab C never sent"
        c.page.evaluate("0")  # sync Playwright runs route handlers inside its calls only
    d.page.evaluate("hydra.track('d_late')")
    held[0].continue_()
    c.wait_answered(1)
    c.page.unroute(f"**{TRACK_PATH}")
    assert "d_late" in [e.get("name") for e in stored_queue(c, widget_id)]
    d.page.close()

    e = open_tab(context)
    e.page.goto(url_e)
    found = settled_rows(db, e, widget_id, 8)
    assert sorted((r[0], r[1] or "", r[2]) for r in found) == sorted(
        [
            ("pageview", "", url_a),
            ("pageview", "", url_b),
            ("custom", "b_click", url_b),
            ("custom", "a_click", url_a),
            ("pageview", "", url_d),
            ("pageview", "", url_c),
            ("custom", "d_late", url_d),
            ("pageview", "", url_e),
        ]
    )
    assert stored_queue(e, widget_id) == []


def test_events_left_by_the_previous_widget_version_are_sent(db, pages, tab, widget_id) -> None:
    """Before one queue key per page, all pages shared `hydra_q_<widget>`: what a visitor has there goes out."""
    blank = pages.add("/blank", "<!doctype html><p>no widget here</p>")
    left = {
        "type": "custom",
        "name": "left_by_v1",
        "event_id": str(uuid.uuid4()),
        "url": blank,
        "occurred_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "properties": {},
    }
    tab.page.goto(blank)
    tab.page.evaluate(
        "([key, value]) => localStorage.setItem(key, value)", [f"hydra_q_{widget_id}", json.dumps([left])]
    )
    tab.page.goto(pages.page("/v2", widget_id))
    found = settled_rows(db, tab, widget_id, 2)
    assert sorted((r[0], r[1] or "") for r in found) == [("custom", "left_by_v1"), ("pageview", "")]
    assert [r[7] for r in found if r[0] == "custom"] == [left["event_id"]]
    assert tab.page.evaluate(f"localStorage.getItem('hydra_q_{widget_id}')") is None


def test_a_full_storage_keeps_the_visitor_id(db, pages, tab, widget_id) -> None:
    """localStorage over its quota still reads: the stored visitor id stays, only writes fail."""
    first, second = pages.page("/p1", widget_id), pages.page("/p2", widget_id)
    tab.page.goto(first)
    tab.wait_rows(db, widget_id, 1)
    tab.wait_answered(tab.posts())
    stored_id = tab.page.evaluate("localStorage.getItem('hydra_vid')")
    full = tab.page.evaluate("""() => {
        let size = 1 << 20, n = 0;
        while (size >= 1) {
            try { localStorage.setItem('fill_' + n++, 'x'.repeat(size)); } catch (e) { size = Math.floor(size / 2); }
        }
        try { localStorage.setItem('one_more', 'x'); return false; } catch (e) { return true; }
    }""")
    assert full
    tab.page.goto(second)
    tab.page.evaluate("hydra.track('on_a_full_storage')")
    found = settled_rows(db, tab, widget_id, 3)
    assert [(r[0], r[2]) for r in found] == [("pageview", first), ("pageview", second), ("custom", second)]
    assert {r[6] for r in found} == {stored_id}
    assert not tab.warnings


def test_events_tracked_while_the_page_is_hidden_go_out_at_once(db, pages, context, tab, widget_id) -> None:
    """The page's own visibilitychange handler runs after the widget's flush; what it tracks must not wait
    for a timer that a discarded tab never runs. Likewise after pagehide."""
    relayed = snippet_html() + pages.tag(widget_id, extra=f'data-api-host="{pages.relay_host}" async')
    tab.page.goto(pages.page("/hidden", widget_id, head=relayed))
    tab.wait_loaded()
    tab.page.evaluate("""() => {
        document.addEventListener('visibilitychange', () => {
            if (document.visibilityState === 'hidden') hydra.track('time_on_page', {seconds: 42});
        }, {once: true});  // closing the tab hides it again
        addEventListener('pagehide', () => hydra.track('after_pagehide'));
        Object.defineProperty(document, 'visibilityState', {value: 'hidden', configurable: true});
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    assert tab.posts() == 2  # the widget's own flush, then time_on_page at once: no timer ran
    tab.page.close()  # the tab is discarded: no timer of this page ever runs again
    assert [e.get("name") for e in pages.wait_relayed(3)] == [None, "time_on_page", "after_pagehide"]
    # The next visit re-sends whatever a slow-broker 503 left unanswered (the rows are one per event id).
    later = open_tab(context)
    later.page.goto(pages.page("/later", widget_id))
    found = settled_rows(db, later, widget_id, 4)
    assert [(r[0], r[1]) for r in found] == [
        ("pageview", None),
        ("custom", "time_on_page"),
        ("custom", "after_pagehide"),
        ("pageview", None),
    ]


def test_url_fragments_are_never_stored(db, pages, tab, widget_id) -> None:
    """Fragments carry secrets (OAuth implicit flow: #access_token=…): no url or referrer keeps one."""
    callback = pages.page("/auth/callback", widget_id)
    account, settings = pages.url("/account"), pages.url("/settings")
    tab.page.goto(callback + "#access_token=tok_FAKE&refresh_token=rt_FAKE")
    tab.wait_loaded()
    tab.page.evaluate("""() => {
        hydra.track('signed_in');                                  // url still has the hash
        history.pushState({}, '', '/account#tab=keys&key=sk_FAKE'); // referrer had the hash, url has one
        history.replaceState({}, '', '/account');                   // the app clears it
        history.pushState({}, '', '/settings');
    }""")
    found = settled_rows(db, tab, widget_id, 4)
    assert [(r[0], r[2], r[3]) for r in found] == [
        ("pageview", callback, None),
        ("custom", callback, None),
        ("pageview", account, callback),
        ("pageview", settings, account),
    ]
    every = db.execute("SELECT url, referrer FROM visitor_events WHERE widget_id = %s", (widget_id,)).fetchall()
    assert not [r for r in every if "#" in (r[0] or "") + (r[1] or "") or "FAKE" in (r[0] or "") + (r[1] or "")]


def test_url_tidying_by_replace_state_is_not_a_pageview(db, pages, tab, widget_id) -> None:
    """replaceState keeping the path (utm_* stripped, a search box's ?q=) tidies the URL of the same page;
    pushState and popstate to another URL are new pages, even on the same path."""
    landing = pages.page("/landing", widget_id) + "?utm_source=newsletter&utm_campaign=fall"
    tab.page.goto(landing)
    tab.wait_loaded()
    tab.page.evaluate("""() => {
        history.replaceState({}, '', '/landing');
        for (const q of ['s', 'sh', 'sho']) history.replaceState({}, '', '/landing?q=' + q);
        hydra.track('searched');
        history.pushState({}, '', '/landing?q=sho&page=2');
    }""")
    tab.page.go_back()  # popstate to /landing?q=sho
    found = settled_rows(db, tab, widget_id, 4)
    tidied, page2 = pages.url("/landing?q=sho"), pages.url("/landing?q=sho&page=2")
    assert [(r[0], r[2], r[3]) for r in found] == [
        ("pageview", landing, None),
        ("custom", tidied, None),
        ("pageview", page2, tidied),
        ("pageview", tidied, page2),
    ]


def test_identify_refuses_placeholder_user_ids(db, pages, tab, widget_id) -> None:
    """Ids that are a bug in the caller's code ("undefined", "[object Object]", …) would merge strangers
    into one contact: refused with a warning, never sent. The API refuses the same list."""
    placeholders = [
        "undefined",
        "UNDEFINED",
        "null",
        " Null ",
        "None",
        "nil",
        "NaN",
        "0",
        "-1",
        "true",
        "False",
        "[object Object]",
        "anonymous",
        "Guest",
        "",
        "   ",
        "\t\n",
    ]
    tab.page.goto(pages.page("/placeholders", widget_id))
    tab.page.evaluate("ids => { for (const id of ids) hydra.identify(id, {plan: 'x'}); }", placeholders)
    tab.page.evaluate("hydra.identify(0); hydra.identify(-1); hydra.identify(String({})); hydra.identify('u_0')")
    found = settled_rows(db, tab, widget_id, 2)
    assert [(r[0], r[5]) for r in found] == [("pageview", None), ("identify", "u_0")]
    assert len(tab.warnings) == len(placeholders) + 3, tab.warnings
    assert all(w.startswith("[hydra] identify:") for w in tab.warnings), tab.warnings
