"""The dashboard in a real browser: headless Debian Chromium, driven through chromium-driver by
Selenium, against a live `loopservice run` fed by the simulator.

It checks that the SLA board lists cases with countdowns that tick, that an account link opens
the customer context page with its timeline, and that an alert can be acknowledged from the
board (the acknowledgement lands on the log and the API reports it). Screenshots of both pages
are saved under the test's tmp directory and copied to var/screenshots/; their paths are printed.
`infra/system-deps.sh` (run by `make test`) installs chromium and chromium-driver.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from factories import raw_event
from loopservice.simulator import generate
from loopservice.simulator_world import TENANTS, SimulationConfig

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TOKENS = {tenant: f"browser-token-{tenant}-every-scope" for tenant, _, _ in TENANTS}
TENANT = TENANTS[0][0]
TOKEN = TOKENS[TENANT]
REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver: run infra/system-deps.sh",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except Exception:  # the page may be mid-render: a stale element, a missing row
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "LOOP_TOKENS": json.dumps(
            [
                {"token": t, "tenant": tenant, "scopes": ["ingest", "read", "admin"]}
                for tenant, t in TOKENS.items()
            ]
        ),
        "LOOP_DATA_DIR": str(tmp_path),
    }
    cmd = [sys.executable, "-m", "loopservice", "run", "--port", str(port),
           "--db", str(tmp_path / "loop.db")]  # fmt: skip
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("loopservice run", lambda: httpx.get(f"{base}/healthz", timeout=1).is_success)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def feed_simulation(base: str) -> None:
    """Two simulated days up to now, then a case whose first response is long overdue."""
    now = datetime.now(UTC)
    config = SimulationConfig(accounts=80, days=3, seed=11, start=(now - timedelta(days=2)).date())
    cutoff = (now - timedelta(minutes=1)).isoformat()
    events = [e for e in generate(config) if e["occurred_at"] <= cutoff]
    mine = next(e for e in events if e["tenant_id"] == TENANT)
    fields = {"subject": "Down", "topic": "outage", "impact": "critical", "urgency": "critical"}
    overdue = raw_event("case.opened", 1, at=now - timedelta(days=3), case="e2e-overdue",
                        tenant_id=TENANT, account_id=mine["account_id"], **fields)  # fmt: skip
    events.append(overdue)
    for tenant, token in TOKENS.items():  # each platform posts with its tenant's token
        theirs = [e for e in events if e["tenant_id"] == tenant]
        headers = {"Authorization": f"Bearer {token}"}
        for i in range(0, len(theirs), 500):
            batch = theirs[i : i + 500]
            r = httpx.post(f"{base}/v1/events", json=batch, headers=headers, timeout=30)
            if r.status_code == 422:  # drop what the simulator planted as invalid
                bad = {e["index"] for e in r.json()["errors"]}
                batch = [e for n, e in enumerate(batch) if n not in bad]
                r = httpx.post(f"{base}/v1/events", json=batch, headers=headers, timeout=30)
            assert r.status_code == 202, r.text


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path))
    kept = REPO / "var" / "screenshots" / path.name
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, kept)
    print(f"screenshot: {path} (copy: {kept})")
    return kept


def test_board_customer_page_and_alert_ack_in_chromium(
    server: str, browser: Any, tmp_path: Path
) -> None:

    feed_simulation(server)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    wait_for(
        "an alert",
        lambda: httpx.get(f"{server}/v1/alerts", headers=headers, timeout=5).json()["alerts"],
        timeout=60,
    )

    # The pages re-render their tables (the board every 250 ms), so the test reads and clicks
    # through small scripts that run atomically in the page instead of holding elements.
    def texts(selector: str) -> list[str]:
        return browser.execute_script(  # type: ignore[no-any-return]
            "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)",
            selector,
        )

    browser.get(f"{server}/#token={TOKEN}")
    wait_for("board rows", lambda: len(texts("#board tr")) >= 3)
    countdown = re.compile(r"^−?(\d+h )?\d+m \d\ds$")
    lefts = texts("#board tr td:first-child")
    assert all(countdown.match(t) for t in lefts), lefts[:5]
    assert any(t.startswith("−") for t in lefts)  # the overdue case is on the board, breached
    assert any(not t.startswith("−") for t in lefts)  # and simulated cases still running
    # the countdowns tick in the page, between two polls of the API
    wait_for("a countdown to tick", lambda: texts("#board tr td:first-child") != lefts, 10)
    assert "clocks shown" in texts("#counts")[0]

    # acknowledge the first unacknowledged alert from the board
    alert_id = wait_for(
        "an acknowledge button to click",
        lambda: browser.execute_script(
            "const b = document.querySelector('#alerts button.ack');"
            "if (!b) return null; b.click(); return b.dataset.alert;"
        ),
    )
    wait_for(
        "the alert to show acknowledged",
        lambda: "acknowledged" in "".join(texts(f'#alerts tr[data-alert="{alert_id}"]')),
    )
    alerts = httpx.get(f"{server}/v1/alerts", headers=headers, timeout=5).json()["alerts"]
    assert [a["acknowledged"] for a in alerts if a["alert_id"] == alert_id] == [True]
    board_png = screenshot(browser, tmp_path, "dashboard-board")

    # open a customer from the board: its context page shows the timeline
    account, case = browser.execute_script(
        "const a = [...document.querySelectorAll('#board tr:not(.breached) a.account')][0];"
        "const row = a.closest('tr'); a.click(); return [a.textContent, row.dataset.case];"
    )
    wait_for("timeline entries", lambda: texts("#timeline tr.entry"))
    assert browser.current_url.startswith(f"{server}/customer#account=")
    assert account in texts("#account-name")[0]
    wait_for("the open case", lambda: any(case in t for t in texts("#open-cases tr.open-case")))
    assert any(case in t for t in texts("#timeline tr.entry"))
    customer_png = screenshot(browser, tmp_path, "dashboard-customer")
    assert board_png.stat().st_size > 10_000 and customer_png.stat().st_size > 10_000
