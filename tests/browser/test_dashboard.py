"""The operator dashboard in headless Chromium (Debian's, no browser download): each role's
view, alerts arriving live on the overview and the device page, acknowledgement, a command's
lifecycle on screen, the live chart, reconnecting after the API restarts, an alert storm, and
axe-core's accessibility check. Each main screen is saved under artifacts/dashboard/."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from litestar.security.jwt import Token
from playwright.sync_api import Browser, Page, Request, ViewportSize, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from runtime.settings import PROJECT_ROOT
from tests.conftest import Components, wait_for
from tests.e2e.test_control import answer, fetch_next

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
AXE = PROJECT_ROOT / "ui" / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = PROJECT_ROOT / "artifacts" / "dashboard"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (make setup installs it)")
LAPTOP: ViewportSize = {"width": 1366, "height": 900}
TABLET: ViewportSize = {"width": 820, "height": 1180}
LOW_SOC_RULE = "Battery state of charge low"  # a default rule: soc_pct below 15 for 30 s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
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


def credentials(platform: Components, role: str) -> tuple[str, str]:
    s = platform.s
    return {
        "admin": (s.auth_admin_username, s.auth_admin_password),
        "operator": (s.auth_operator_username, s.auth_operator_password),
        "viewer": (s.auth_viewer_username, s.auth_viewer_password),
    }[role]


def open_as(browser: Browser, platform: Components, role: str, path: str = "#/") -> Page:
    page = browser.new_page(viewport=LAPTOP)
    page.goto(f"{platform.api_url}/{path}")
    user, password = credentials(platform, role)
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("#login button[type=submit]")
    expect(page.locator("#role")).to_have_text(role)
    expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=15_000)
    expect(page.locator("body")).to_have_attribute("data-view", re.compile("."))  # loaded
    return page


def send(platform: Components, key: str, reading: dict[str, Any]) -> None:
    r = httpx.post(
        f"{platform.gateway_url}/api/v1/telemetry",
        json=reading,
        timeout=10,
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 202, r.text


def battery(device: str, site: str, seconds_ago: float = 0, **metrics: float) -> dict[str, Any]:
    ts = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return {
        "device_id": device,
        "site_id": site,
        "device_type": "battery",
        "ts": ts.isoformat(),
        **metrics,
    }


def low_battery(platform: Components, key: str, device: str, site: str) -> None:
    """Readings far below the default battery rule for more than its 30 s: an alert opens."""
    for ago in (40, 5, 0):
        send(platform, key, battery(device, site, ago, soc_pct=4))


def reported(db: psycopg.Connection, device: str) -> None:
    wait_for(
        lambda: db.execute("SELECT 1 FROM devices WHERE device_id = %s", (device,)).fetchone(),
        15,
        f"{device} in the devices table",
    )


def axe_violations(page: Page) -> list[dict[str, Any]]:
    """Serious and critical violations axe-core finds on what the page shows now."""
    page.add_script_tag(path=str(AXE))
    found = page.evaluate("async () => (await axe.run(document)).violations")
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
        for v in found
        if v["impact"] in ("serious", "critical")
    ]


def fits(page: Page, what: str) -> None:
    """The page does not scroll sideways (charts follow the width within a few frames)."""
    try:
        page.wait_for_function(
            "() => document.documentElement.scrollWidth <= window.innerWidth + 1", timeout=5_000
        )
    except PlaywrightTimeout:
        wide = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        raise AssertionError(f"{what} scrolls sideways by {wide} px") from None


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.mark.parametrize("role", ["admin", "operator", "viewer"])
def test_each_role_sees_its_role_and_only_what_it_may_do(
    platform: Components,
    browser: Browser,
    db: psycopg.Connection,
    site: str,
    device_key: str,
    role: str,
) -> None:
    device = f"ui-{uuid.uuid4().hex[:8]}"
    low_battery(platform, device_key, device, site)
    wait_for(
        lambda: db.execute(
            "SELECT 1 FROM alerts WHERE device_id = %s AND status = 'active_unacknowledged'",
            (device,),
        ).fetchone(),
        20,
        "an alert to act on",
    )
    page = open_as(browser, platform, role, f"#/devices/{device}")
    expect(page.locator("#device-alerts")).to_contain_text("soc_pct 4 below 15")
    may_act = role != "viewer"
    expect(page.locator("#control")).to_be_visible() if may_act else expect(
        page.locator("#control")
    ).to_be_hidden()
    buttons = page.locator("#device-alerts").get_by_role("button", name="Acknowledge")
    expect(buttons).to_have_count(1 if may_act else 0)
    page.goto(f"{platform.api_url}/#/alerts")
    group = page.locator(".group", has_text=LOW_SOC_RULE).filter(has_text=site)
    expect(group).to_be_visible()
    expect(group.get_by_role("button", name=re.compile("Acknowledge all"))).to_have_count(
        1 if may_act else 0
    )
    page.close()


def test_an_alert_appears_live_and_an_operator_acks_it(
    platform: Components, browser: Browser, db: psycopg.Connection, site: str, device_key: str
) -> None:
    device = f"ui-{uuid.uuid4().hex[:8]}"
    send(platform, device_key, battery(device, site, 60, soc_pct=60))
    reported(db, device)
    overview = open_as(browser, platform, "operator")
    overview.select_option("#site-scope", site)
    row = overview.locator(f"#devices tr[data-device='{device}']")
    expect(row).to_contain_text("online")
    device_page = open_as(browser, platform, "operator", f"#/devices/{device}")
    viewer = open_as(browser, platform, "viewer", f"#/devices/{device}")

    low_battery(platform, device_key, device, site)
    group = overview.locator("#overview-alerts .group", has_text=LOW_SOC_RULE).filter(has_text=site)
    expect(group).to_contain_text("1 alert", timeout=15_000)
    expect(row).to_contain_text("alerting")
    alert = device_page.locator("#device-alerts tr", has_text="soc_pct 4 below 15")
    expect(alert).to_contain_text("active unacknowledged", timeout=15_000)
    expect(viewer.locator("#device-alerts")).to_contain_text("soc_pct 4 below 15")
    expect(viewer.get_by_role("button", name="Acknowledge")).to_have_count(0)

    alert.get_by_role("button", name="Acknowledge").click()
    operator = credentials(platform, "operator")[0]
    expect(alert).to_contain_text(f"active acknowledged by {operator}", timeout=15_000)
    expect(viewer.locator("#device-alerts")).to_contain_text(f"acknowledged by {operator}")
    expect(group).to_contain_text("0 unacknowledged")
    for page in (overview, device_page, viewer):
        page.close()


def test_a_command_goes_from_queued_to_a_terminal_state_on_screen(
    platform: Components, browser: Browser, db: psycopg.Connection, site: str, device_key: str
) -> None:
    device = f"ui-{uuid.uuid4().hex[:8]}"
    send(platform, device_key, battery(device, site, soc_pct=60))
    reported(db, device)
    page = open_as(browser, platform, "operator", f"#/devices/{device}")
    form = page.locator("#control")
    expect(form.locator("select[name=command] option")).to_have_text(
        ["charge", "discharge", "reboot"]
    )
    page.select_option("#control select[name=command]", "charge")
    power = form.get_by_label(re.compile("power_kw"))
    expect(power).to_have_attribute("min", "0.1")
    # out of range: the browser refuses it before anything is sent
    sent: list[Request] = []

    def record(r: Request) -> None:
        if r.method == "POST" and "/control/commands" in r.url:
            sent.append(r)

    page.on("request", record)
    power.fill("0")
    form.get_by_role("button", name="Send command").click()
    assert page.evaluate("() => document.querySelector('#control').checkValidity()") is False
    assert sent == []
    power.fill("5")
    # a double click sends one command: both requests carry the same Idempotency-Key
    form.get_by_role("button", name="Send command").dblclick()
    row = page.locator("#device-commands tr", has_text="charge power_kw=5")
    expect(row.locator(".lifecycle")).to_have_text(re.compile("queued|processing"))
    keys = {r.headers.get("idempotency-key") for r in sent}
    assert len(keys) == 1 and None not in keys, keys

    taken = fetch_next(platform, device_key, device, wait=10)
    assert taken.status_code == 200, taken.text
    expect(row.locator(".lifecycle")).to_have_text("processing", timeout=10_000)
    assert answer(
        platform, device_key, taken.json()["id"], "failed", "breaker open"
    ).status_code in (
        200,
        202,
    )
    expect(row.locator(".lifecycle")).to_have_text("failed: breaker open", timeout=10_000)
    expect(page.locator("#device-commands tr")).to_have_count(1)
    page.close()


def test_the_live_chart_gains_a_point_when_a_reading_arrives(
    platform: Components, browser: Browser, db: psycopg.Connection, site: str, device_key: str
) -> None:
    device = f"ui-{uuid.uuid4().hex[:8]}"
    for ago in (90, 60, 30):
        send(platform, device_key, battery(device, site, ago, power_kw=2.0, soc_pct=55))
    wait_for(
        lambda: (
            db.execute(
                "SELECT count(*) FROM telemetry_readings WHERE device_id = %s", (device,)
            ).fetchone()
            == (3,)
        ),
        15,
        "the three readings stored",
    )
    page = open_as(browser, platform, "viewer", f"#/devices/{device}")
    chart = page.locator("#live-chart")
    expect(chart).to_have_attribute("data-points", "3", timeout=10_000)
    expect(page.locator("#history-chart")).not_to_have_attribute("data-points", "0")
    send(platform, device_key, battery(device, site, power_kw=3.5, soc_pct=56))
    expect(chart).to_have_attribute("data-points", "4", timeout=10_000)
    expect(page.locator("#device-latest")).to_contain_text("3.50")
    for label in ("24 h", "7 d", "30 d"):
        page.get_by_label(label).check()
        expect(page.locator("#history-note")).to_contain_text("buckets of")
    page.close()


def test_reconnect_shows_and_the_page_catches_up_after_the_api_restarts(
    platform: Components, browser: Browser, db: psycopg.Connection, site: str, device_key: str
) -> None:
    device = f"ui-{uuid.uuid4().hex[:8]}"
    send(platform, device_key, battery(device, site, 60, soc_pct=60))
    reported(db, device)
    page = open_as(browser, platform, "operator", "#/alerts")
    live = page.locator("#live")
    platform.stop("api")
    try:
        expect(live).to_have_attribute("data-state", "reconnecting", timeout=15_000)
        expect(live).to_have_text("Reconnecting…")
        # raised while the API is away: the projection publishes it to the live stream
        low_battery(platform, device_key, device, site)
        wait_for(
            lambda: db.execute("SELECT 1 FROM alerts WHERE device_id = %s", (device,)).fetchone(),
            20,
            "the alert stored while the API was away",
        )
    finally:
        platform.start("api")
    expect(live).to_have_attribute("data-state", "live", timeout=30_000)
    group = page.locator(".group", has_text=LOW_SOC_RULE).filter(has_text=site)
    expect(group).to_contain_text("1 alert", timeout=15_000)
    page.close()


def _storm(platform: Components, key: str, site: str, devices: list[str]) -> None:
    """One reading above the storm rule from each device, 50 requests at a time."""

    async def run() -> None:
        limit = asyncio.Semaphore(50)
        async with httpx.AsyncClient(
            base_url=platform.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as client:

            async def one(device: str) -> None:
                reading = {**battery(device, site), "temperature_c": 95.0}
                async with limit:
                    r = await client.post("/api/v1/telemetry", json=reading)
                assert r.status_code == 202, r.text

            await asyncio.gather(*(one(d) for d in devices))

    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(run())
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=target)  # the sync Playwright API owns this thread's loop
    thread.start()
    thread.join(120)
    assert not errors, errors


def test_an_alert_storm_stays_grouped_and_costs_few_requests(
    platform: Components,
    browser: Browser,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    name = f"Storm {uuid.uuid4().hex[:6]}"
    r = httpx.post(
        f"{platform.api_url}/api/v1/alert-rules",
        json={
            "name": name,
            "kind": "threshold",
            "metric": "temperature_c",
            "op": "gt",
            "threshold": 90,
            "for_s": 0,
            "severity": "minor",
            "scope": {"site_id": site},
        },
        headers={"Authorization": f"Bearer {tokens['admin']}"},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    rule_id = r.json()["id"]
    try:
        _storm_on_screen(platform, browser, db, site, device_key, name, rule_id)
    finally:  # its alerts stay, but it raises no more
        httpx.delete(
            f"{platform.api_url}/api/v1/alert-rules/{rule_id}",
            headers={"Authorization": f"Bearer {tokens['admin']}"},
            timeout=10,
        )


def _storm_on_screen(
    platform: Components,
    browser: Browser,
    db: psycopg.Connection,
    site: str,
    device_key: str,
    name: str,
    rule_id: str,
) -> None:
    # a first device proves the alerter has the rule (it travels through its topic)
    probe = f"ui-{uuid.uuid4().hex[:8]}"

    def rule_applies() -> bool:
        send(platform, device_key, {**battery(probe, site), "temperature_c": 95.0})
        found = db.execute("SELECT 1 FROM alerts WHERE rule_id = %s", (rule_id,)).fetchone()
        return found is not None

    wait_for(rule_applies, 30, "the storm rule at the alerter")
    page = open_as(browser, platform, "operator", "#/alerts")
    group = page.locator(".group", has_text=name)
    expect(group).to_contain_text("1 alert")
    requests: list[str] = []

    def count(req: Request) -> None:
        if "/api/" in req.url and "/api/v1/stream" not in req.url:
            requests.append(req.url)

    page.on("request", count)
    devices = [f"storm-{uuid.uuid4().hex[:10]}" for _ in range(1000)]
    _storm(platform, device_key, site, devices)
    expect(group).to_contain_text("1001 alerts", timeout=60_000)
    assert page.locator(".group", has_text=name).count() == 1  # one block per rule and site
    height = page.evaluate("() => document.documentElement.scrollHeight")
    assert height < 3000, f"the alert list is {height} px tall"
    group.locator("button.expand").click()
    expect(group.locator("tbody tr")).to_have_count(200, timeout=10_000)
    expect(group.get_by_role("button", name="Show more")).to_be_visible()
    shot(page, "alerts-storm")
    assert len(requests) <= 5, json.dumps(requests, indent=1)
    page.close()


def test_main_screens_pass_axe_and_fit_a_laptop_and_a_tablet(
    platform: Components, browser: Browser, db: psycopg.Connection, site: str, device_key: str
) -> None:
    device = f"ui-{uuid.uuid4().hex[:8]}"
    for ago in range(300, 59, -20):
        soc = 60 - ago / 10
        send(platform, device_key, battery(device, site, ago, soc_pct=soc, power_kw=soc / 10))
    low_battery(platform, device_key, device, site)
    reported(db, device)
    login = browser.new_page(viewport=LAPTOP)
    login.goto(f"{platform.api_url}/")
    expect(login.locator("#login")).to_be_visible()
    assert axe_violations(login) == []
    login.close()
    page = open_as(browser, platform, "operator")
    page.select_option("#site-scope", site)
    expect(page.locator(f"#devices tr[data-device='{device}']")).to_be_visible()
    screens = {
        "overview": "#/",
        "device": f"#/devices/{device}",
        "alerts": "#/alerts",
        "notifications": "#/notifications",
    }
    for name, path in screens.items():
        page.goto(f"{platform.api_url}/{path}")
        view = page.locator(f"section#{name}")
        expect(view).to_be_visible()
        if name == "device":
            expect(page.locator("#live-chart canvas")).to_be_visible()
            expect(page.locator("#history-chart canvas")).to_be_visible()
        if name == "alerts":
            group = page.locator("#alert-groups .group", has_text=LOW_SOC_RULE).filter(
                has_text=site
            )
            expect(group).to_be_visible()
            group.locator("button.expand").click()
            expect(page.locator(".group-body tbody tr").first).to_be_visible()
        assert axe_violations(page) == [], name
        shot(page, name)
        for size, viewport in (("tablet", TABLET), ("laptop", LAPTOP)):
            page.set_viewport_size(viewport)
            fits(page, f"{name} on a {size}")
        if name in ("overview", "device"):
            page.set_viewport_size(TABLET)
            shot(page, f"{name}-tablet")
            page.set_viewport_size(LAPTOP)
    # keyboard: the views are reachable by Tab and Enter
    page.goto(f"{platform.api_url}/#/")
    page.locator("#nav a", has_text="Alerts").focus()
    page.keyboard.press("Enter")
    expect(page.locator("section#alerts")).to_be_visible()
    page.close()


def test_an_expired_session_leads_back_to_login(platform: Components, browser: Browser) -> None:
    s = platform.s
    token = Token(
        sub=s.auth_viewer_username,
        exp=datetime.now(UTC) + timedelta(seconds=5),
        extras={"role": "viewer"},
    ).encode(s.auth_token_secret, "HS256")
    page = browser.new_page(viewport=LAPTOP)
    page.goto(f"{platform.api_url}/")
    page.evaluate(
        "([token, user]) => { sessionStorage.setItem('token', token);"
        " sessionStorage.setItem('role', 'viewer'); sessionStorage.setItem('user', user); }",
        [token, s.auth_viewer_username],
    )
    page.reload()
    expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=10_000)
    # the stream says session.expired when the token runs out: back to the login form
    expect(page.locator("#live")).to_have_attribute("data-state", "expired", timeout=20_000)
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-error")).to_contain_text("Session expired")
    page.close()
