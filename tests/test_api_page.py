"""The chat page in headless Chromium (Debian's package, never a downloaded browser): type a
sentence, see the sentiment badge, then the streamed reply."""
from __future__ import annotations

from pathlib import Path

import pytest

from serving_helpers import api_settings, serving_engine

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium not installed")


def test_type_see_badge_then_reply(tiny_gguf):
    playwright = pytest.importorskip("playwright.sync_api")
    settings = api_settings(chat={"max_tokens": 24})
    with serving_engine(tiny_gguf, settings) as live, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                           "--disable-background-networking", "--disable-extensions",
                                           "--no-first-run", "--disable-sync"])
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
