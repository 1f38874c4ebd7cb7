"""The integration dashboard (SPEC 15) in a real headless Chromium (Debian's chromium and
chromium-driver, installed by `make system-deps`), against real servers.

The test makes an open gap, a BLOCKED event and a rejection, loads /dashboard with JavaScript
turned off (the page must work without it), finds each listed, follows the gap's entity link to
the drill-down, and saves screenshots under the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from common.auth import SecuritySettings
from tests.http_support import Http, block_an_event, event_json, start_http

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1800",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    # No JavaScript at all: the page is server-rendered and must not need it.
    options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Http]:
    http = await start_http(database_url, block_after=2)
    yield http
    await http.session.close()
    await http.system.stop()


async def wait_state(api: Http, transaction_id: str, state: str) -> None:
    for _ in range(300):
        _, _, read = await api.request("GET", f"/v1/transactions/{transaction_id}")
        if read["status"]["state"] == state:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{transaction_id} never {state}: {read}")


def section_text(driver: webdriver.Chrome, section: str) -> str:
    """The text of the table (or empty-note) right after the heading with this id."""
    element = driver.find_element(By.XPATH, f"//h2[@id='{section}']/following-sibling::*[1]")
    return str(element.text)


async def test_the_dashboard_lists_a_gap_a_blocked_event_and_a_rejection(
    api: Http, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    # An open gap: MSI 2 without MSI 1.
    status, _, parked = await api.request(
        "POST", "/v1/events", body=event_json("SHP-DASH-GAP", 2, "shipment_picked"), Idempotency_Key="d-gap-2"
    )
    assert status == 202 and parked["state"] == "EVENT_STATE_PARKED"
    # A rejection: a shipment cannot start shipped.
    status, _, rejected = await api.request(
        "POST",
        "/v1/events",
        body=event_json("SHP-DASH-REJ", 1, "shipment_shipped"),
        Idempotency_Key="d-rej-1",
        Prefer="wait=20",
    )
    assert status == 200 and rejected["state"] == "EVENT_STATE_REJECTED", rejected
    # A BLOCKED event (SPEC 11): the ledger holds another MSI 1 of this SKU.
    blocked = await block_an_event(api, "SKU-DASH-BLK")

    html = await api.session.get(f"{api.base}/dashboard")
    text = await html.text()
    assert html.status == 200 and html.content_type == "text/html"
    assert "<script" not in text and "http://" not in text and "https://" not in text, "no scripts, no external assets"

    await asyncio.to_thread(check_in_browser, browser, api.base, tmp_path, parked, rejected, blocked)


def check_in_browser(
    browser: webdriver.Chrome,
    base: str,
    tmp_path: Path,
    parked: dict[str, Any],
    rejected: dict[str, Any],
    blocked: dict[str, Any],
) -> None:
    """The browser's part (blocking WebDriver calls: run in a thread, so the servers on the test's
    event loop keep serving the pages it asks for)."""
    browser.get(f"{base}/dashboard")
    assert browser.title == "Integration dashboard"
    gaps = section_text(browser, "gaps")
    assert "shipment SHP-DASH-GAP" in gaps and "alerting" not in gaps.split("SHP-DASH-GAP")[0]
    row = browser.find_element(
        By.XPATH, "//h2[@id='gaps']/following-sibling::table[1]//tr[td//text()[contains(., 'SHP-DASH-GAP')]]"
    )
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == "1" and cells[2] == "1", cells  # awaiting MSI 1, one parked
    assert cells[4].endswith(" s") or "min" in cells[4], cells  # the gap's age
    blocked_text = section_text(browser, "blocked")
    assert "inventory-item SKU-DASH-BLK" in blocked_text and "SEQUENCE_CONFLICT" in blocked_text
    assert blocked["transactionId"] in blocked_text
    rejections = section_text(browser, "rejections")
    assert "shipment SHP-DASH-REJ" in rejections and rejected["transactionId"] in rejections
    assert browser.find_element(By.ID, "card-open-gaps").text.endswith("1")
    assert browser.find_element(By.ID, "card-blocked-events").text.endswith("1")
    assert "applied" in section_text(browser, "throughput")
    browser.save_screenshot(str(tmp_path / "dashboard.png"))

    browser.find_element(By.LINK_TEXT, "shipment SHP-DASH-GAP").click()
    assert browser.title == "Entity shipment SHP-DASH-GAP"
    assert browser.find_element(By.ID, "fact-0").text == "0"  # watermark
    assert browser.find_element(By.ID, "fact-1").text == "1"  # parked
    assert browser.find_element(By.ID, "fact-2").text == "1"  # awaiting MSI
    assert parked["transactionId"] in section_text(browser, "parked")
    assert "nothing for this entity yet" in section_text(browser, "history")
    browser.save_screenshot(str(tmp_path / "entity.png"))

    browser.get(f"{base}/dashboard/entity?type=shipment&id=SHP-DASH-REJ")
    history = section_text(browser, "history")
    assert "shipment_shipped" in history and "REJECTED" in history
    for shot in ("dashboard.png", "entity.png"):
        assert (tmp_path / shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_the_dashboard_needs_an_admin_token_as_basic_password_or_bearer(
    database_url: str, tmp_path: Path, browser: webdriver.Chrome
) -> None:
    ids = [
        {"caller": "ops", "roles": ["admin"], "token_sha256": hashlib.sha256(b"ops-token").hexdigest()},
        {"caller": "wms", "roles": ["submitter"], "token_sha256": hashlib.sha256(b"wms-token").hexdigest()},
    ]
    (tmp_path / "ids.json").write_text(json.dumps({"identities": ids}))
    api = await start_http(database_url, security=SecuritySettings(identities_file=str(tmp_path / "ids.json")))

    async def get(path: str, **headers: Any) -> tuple[int, str, Any]:
        async with api.session.get(api.base + path, headers=headers) as answer:
            return answer.status, await answer.text(), answer.headers

    def basic(password: str) -> str:
        return "Basic " + base64.b64encode(f"anyone:{password}".encode()).decode()

    try:
        status, _, headers = await get("/dashboard")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        status, _, headers = await get("/dashboard", Authorization=basic("wrong"))
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        status, page, _ = await get("/dashboard", Authorization=basic("wms-token"))
        assert status == 403 and "PERMISSION_DENIED" in page
        status, page, _ = await get("/dashboard", Authorization=basic("ops-token"))
        assert status == 200 and "Open gaps" in page
        status, page, _ = await get("/dashboard", Authorization="Bearer ops-token")
        assert status == 200 and "Blocked events" in page
        status, page, _ = await get("/dashboard/entity?type=pallet&id=X", Authorization="Bearer ops-token")
        assert status == 400 and "MALFORMED_REQUEST" in page
        # A browser: HTTP Basic, the admin token as the password (here in the URL, as a person
        # would type it into the browser's prompt).
        port = api.base.rsplit(":", 1)[1]

        def look() -> tuple[str, str]:
            browser.get(f"http://anyone:ops-token@127.0.0.1:{port}/dashboard")
            return str(browser.title), str(browser.find_element(By.TAG_NAME, "body").text)

        title, text = await asyncio.to_thread(look)
        assert title == "Integration dashboard" and "Open gaps" in text and "UNAUTHENTICATED" not in text
    finally:
        await api.session.close()
        await api.system.stop()
