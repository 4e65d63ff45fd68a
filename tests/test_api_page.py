"""The chat page in headless Chromium (Debian's package, never a downloaded browser): type a
sentence, see the sentiment badge, then the streamed reply; the reply's Markdown rendered without
letting its markup run; a page on another site unable to post to the daemon."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from serving_helpers import api_settings, free_port, serving_engine

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-extensions", "--no-first-run", "--disable-sync"]
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium not installed")


def test_type_see_badge_then_reply(tiny_gguf):
    playwright = pytest.importorskip("playwright.sync_api")
    settings = api_settings(chat={"max_tokens": 24})
    with serving_engine(tiny_gguf, settings) as live, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(live.url + "/")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
            page.fill("#input", "I really love this little box")
            page.press("#input", "Enter")
            badge = page.locator("#badge")
            page.wait_for_function("document.getElementById('badge')?.dataset.label !== undefined")
            assert badge.get_attribute("data-label") in ("positive", "negative")
            assert "%" in badge.inner_text()
            page.wait_for_function("document.querySelector('.reply')?.dataset.done !== undefined")
            assert page.locator(".reply").first.inner_text().strip()
            assert page.locator(".error").count() == 0
        finally:
            browser.close()


# -- the page's Markdown, against a stub that streams a chosen reply ------------------------------------
# The tiny model cannot be steered into writing markup, and the page is the unit under test: a stub
# app serves the real page and answers /v1/respond with a fixed NDJSON stream.
HOSTILE_REPLY = ("Hello **bold** and *italic*, `code <b>x</b>`\n- one\n- **two**\n1. first\n"
                 "<img src=x onerror=\"window.__pwned = 'img'\">\n<script>window.__pwned = 'script'</script>\n"
                 "```\n<svg onload=\"window.__pwned = 'svg'\">\n```\n"
                 "[link](javascript:window.__pwned='link') <a href=\"javascript:alert(1)\">a</a> &amp; done")
# the reply arrives in pieces that cut through markup, as a model's tokens do
PIECES = [HOSTILE_REPLY[i:i + 7] for i in range(0, len(HOSTILE_REPLY), 7)]


def _stub_app(pieces: list[str]):
    import json
    from importlib import resources

    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    page = resources.files("edge.api").joinpath("static/index.html").read_bytes()

    async def respond(request):
        async def events():
            yield json.dumps({"type": "sentiment", "sentiment": {"label": "positive", "display": "Positive",
                                                                 "probability": 0.9}}) + "\n"
            for piece in pieces:
                yield json.dumps({"type": "delta", "content": piece}) + "\n"
            yield json.dumps({"type": "done", "finish_reason": "stop", "usage": {}}) + "\n"
        return StreamingResponse(events(), media_type="application/x-ndjson")

    return Starlette(routes=[Route("/", lambda r: HTMLResponse(page)),
                             Route("/health", lambda r: JSONResponse({"status": "ready", "model": {}})),
                             Route("/v1/respond", respond, methods=["POST"])])


@contextlib.contextmanager
def _serve(app):
    import threading
    import time

    import uvicorn
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "stub server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextlib.contextmanager
def _browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def test_reply_markdown_is_rendered_and_markup_stays_text():
    with _serve(_stub_app(PIECES)) as url, _browser() as page:
        page.goto(url + "/")
        page.fill("#input", "show me markdown")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelector('.reply')?.dataset.done !== undefined")
        reply = page.locator(".reply").first
        assert page.evaluate("window.__pwned") is None
        for tag in ("img", "script", "svg", "a", "b", "iframe"):
            assert reply.locator(tag).count() == 0, tag
        text = reply.inner_text()
        assert "<img src=x onerror=\"window.__pwned = 'img'\">" in text
        assert "<script>window.__pwned = 'script'</script>" in text
        assert "[link](javascript:" in text and "&amp; done" in text
        assert reply.locator("strong").all_inner_texts() == ["bold", "two"]
        assert reply.locator("em").all_inner_texts() == ["italic"]
        assert reply.locator("code").first.inner_text() == "code <b>x</b>"
        assert reply.locator("ul > li").all_inner_texts() == ["one", "two"]
        assert reply.locator("ol > li").all_inner_texts() == ["first"]
        assert "<svg onload" in reply.locator("pre").inner_text()
        # only tags the renderer writes, none with an attribute
        tags = page.evaluate("[...document.querySelector('.reply').querySelectorAll('*')]"
                             ".map(e => [e.tagName.toLowerCase(), e.attributes.length])")
        assert {tag for tag, _ in tags} <= {"strong", "em", "code", "ul", "ol", "li", "br", "pre"}
        assert all(n == 0 for _, n in tags)
        # the sentiment badge comes first: before the reply, and labelled
        assert page.locator("#badge").get_attribute("data-label") == "positive"
        assert page.evaluate("!!(document.getElementById('badge').compareDocumentPosition("
                             "document.querySelector('.reply')) & Node.DOCUMENT_POSITION_FOLLOWING)")


def test_a_page_on_another_site_cannot_post_to_the_daemon(caplog):
    """The browser sends what a cross-site page can send without a preflight (text/plain); the
    daemon (still loading: no model needed) refuses it, while its own page's request gets through
    to the model endpoint (503: loading)."""
    import logging

    from edge.api import ServingState
    from serving_helpers import LiveServer
    caplog.set_level(logging.INFO, logger="edge.api.access")
    daemon = LiveServer(ServingState(api_settings())).start()
    target = f"{daemon.url}/api/generate"
    body = '{"model": "qwen-edge", "prompt": "hi"}'
    script = ("fetch(%r, {method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'text/plain'}, body: %r})"
              ".then(() => 'sent', e => 'failed: ' + e)") % (target, body)
    try:
        with _serve(_stub_app([])) as other_site, _browser() as page:
            page.goto(other_site + "/")
            assert page.evaluate(script) == "sent"        # no preflight: the request did go out
            page.goto(daemon.url + "/")                    # the daemon's own page, same request
            assert page.evaluate(script) == "sent"
            # a form posted from the other site: the browser shows the daemon's refusal
            page.goto(other_site + "/")
            page.evaluate("""target => { const f = document.createElement('form'); f.method = 'POST';
                f.action = target; f.enctype = 'text/plain'; const i = document.createElement('input');
                i.name = '{"model": "qwen-edge", "prompt": "hi", "x": "'; i.value = '"}'; f.append(i);
                document.body.append(f); f.submit(); }""", target)
            page.wait_for_url(target)
            assert "refused (cross-site)" in page.inner_text("body")
    finally:
        daemon.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "edge.api.access" and "/api/generate" in r.getMessage()]
    assert [line.split('" ')[1].split()[0] for line in lines] == ["403", "503", "403"], lines
