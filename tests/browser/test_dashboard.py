"""The operator dashboard in headless Chromium: log in, see devices, watch an alert arrive
live, acknowledge it, and send a command that the platform runs to completion."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import Components

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (make setup installs it)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


def log_in(page: Page, platform: Components, user: str, password: str) -> None:
    page.goto(f"{platform.api_url}/")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("#login button[type=submit]")
    expect(page.locator("#board")).to_be_visible()


def send(platform: Components, key: str, reading: dict[str, object]) -> None:
    r = httpx.post(
        f"{platform.gateway_url}/api/v1/telemetry",
        json=reading,
        timeout=10,
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 202


def test_operator_sees_an_alert_live_acks_it_and_sends_a_command(
    platform: Components, tokens: dict[str, str], browser: Browser, site: str, device_key: str
) -> None:
    device = f"ui-{uuid.uuid4().hex[:8]}"
    base = {"device_id": device, "site_id": site, "device_type": "battery"}
    earlier = datetime.fromtimestamp(datetime.now(UTC).timestamp() - 60, UTC)
    send(platform, device_key, {**base, "ts": earlier.isoformat(), "soc_pct": 60})
    page = browser.new_page()
    s = platform.s
    log_in(page, platform, s.auth_operator_username, s.auth_operator_password)
    expect(page.locator("#devices")).to_contain_text(device, timeout=10_000)

    # a reading far below the default battery rule for 30 s opens an alert, pushed over SSE
    start = datetime.now(UTC).timestamp()
    for dt in (-40, -5, 0):
        ts = datetime.fromtimestamp(start + dt, UTC).isoformat()
        send(platform, device_key, {**base, "ts": ts, "soc_pct": 4})
    row = page.locator("#alerts tr", has_text=device)
    expect(row).to_contain_text("soc_pct 4 below 15", timeout=10_000)
    row.get_by_role("button", name="Acknowledge").click()
    expect(row).to_contain_text("active acknowledged", timeout=10_000)
    expect(page.locator("#notifications")).to_contain_text(device)

    page.fill("#command input[name=device_id]", device)
    page.select_option("#command select[name=command]", "charge")
    page.fill("#command input[name=params]", '{"power_kw": 5}')
    page.click("#command button[type=submit]")
    command_row = page.locator("#commands tr", has_text=device)
    expect(command_row).to_contain_text("queued → processing", timeout=10_000)
    page.screenshot(path=str(platform.log_dir / "dashboard.png"), full_page=True)
    page.close()


def test_viewer_sees_no_action_buttons(platform: Components, browser: Browser) -> None:
    page = browser.new_page()
    s = platform.s
    log_in(page, platform, s.auth_viewer_username, s.auth_viewer_password)
    expect(page.locator("#command")).to_be_hidden()
    expect(page.get_by_role("button", name="Acknowledge")).to_have_count(0)
    page.close()
