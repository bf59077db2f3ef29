"""The dashboard, end to end in real headless Chromium against a live grid (``scaleq up --grid`` in a subprocess).

Needs Debian's ``chromium`` (``scripts/browser.sh`` installs it) and Playwright's Python package (a dev dependency),
which drives that browser by its path and never downloads one. Screenshots of the main pages are taken on every run
into the test's temp dir; with ``SCALEQ_DOCS_SCREENSHOTS=1`` they also replace ``docs/img/dashboard-*.png``, the
ones ``docs/operations.md`` shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.acceptance.support import Grid, cli

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
GRID_FILE = """
name = "dashboard-test"

[[groups]]
name = "cpu"
queue = "default"
provider = "local"
min_workers = 0
max_workers = 2
slots = 1
runtimes = ["process"]
idle_timeout = 2
scale_down_window = 2
"""
HELLO = 'echo hello-dashboard; echo 42 > "$SCALEQ_OUTPUTS/answer.txt"; sleep 1'

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    root = tmp_path_factory.mktemp("dashboard")
    (root / "grid.toml").write_text(GRID_FILE)
    g = Grid(root / "data", grid_file=root / "grid.toml")
    try:
        g.start()
        yield g
    finally:
        g.stop()  # the server, then every worker pid recorded under <data-dir>/workers/** and any straggler


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/browser.sh (it installs Debian's chromium)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright's Python package is missing: run scripts/setup (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 640}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    pg.on(
        "console",
        lambda msg: (
            errors.append(f"console: {msg.text}")
            if msg.type == "error" and "Failed to load resource" not in msg.text  # a refused token's 401, on purpose
            else None
        ),
    )
    try:
        yield pg
        assert errors == [], f"the dashboard logged errors: {errors}"
    finally:
        context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("screenshots")
    yield directory
    if os.environ.get("SCALEQ_DOCS_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        for png in directory.glob("dashboard-*.png"):
            shutil.copyfile(png, DOCS_IMG / png.name)


def screenshot(page: Any, shots: Path, name: str) -> None:
    path = shots / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000, f"{path} looks empty"


def submit(grid: Grid, *command: str) -> str:
    """Through the CLI, as a user would (``--data-dir`` finds the server and the admin token)."""
    r = cli("submit", "default", "--data-dir", str(grid.data_dir), "--", *command)
    assert r.returncode == 0, f"scaleq submit: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout.split()[0]


def log_in(page: Any, grid: Grid, token: str | None = None) -> None:
    page.goto(grid.url + "/")
    page.get_by_label("API token").fill(token or grid.admin_token)
    page.get_by_role("button", name="Log in").click()


def test_the_server_serves_the_dashboard(grid: Grid) -> None:
    root = httpx.get(grid.url + "/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/dashboard/"
    index = httpx.get(grid.url + "/dashboard/")
    assert index.status_code == 200 and "<title>scaleq dashboard</title>" in index.text
    assert "default-src 'none'" in index.headers["content-security-policy"]
    js = httpx.get(grid.url + "/dashboard/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert httpx.get(grid.url + "/dashboard/__init__.py").status_code == 404, "only the front end's own files"
    assert "http://" not in index.text and "https://" not in index.text, "nothing from outside the server"


def test_a_wrong_token_shows_the_login_error(grid: Grid, page: Any) -> None:
    from playwright.sync_api import expect

    log_in(page, grid, "sq_00000000_not-a-real-token")
    expect(page.locator("#login-error")).to_be_visible()
    expect(page.locator("#login-error")).to_contain_text("refused")
    expect(page.locator("#nav")).to_be_hidden()

    # a token revoked while logged in: the next request's 401 brings the login page back, with the reason
    log_in(page, grid)
    expect(page.get_by_role("heading", name="Queues")).to_be_visible()
    page.evaluate("sessionStorage.setItem('scaleq.token', 'sq_00000000_revoked')")
    page.goto(grid.url + "/dashboard/#/workers")
    expect(page.locator("#login-error")).to_contain_text("log in again")


def test_health_says_so_when_the_server_has_no_checks(grid: Grid, page: Any) -> None:
    """An older server without GET /api/v1/health/checks: the Health view says so instead of failing."""
    from playwright.sync_api import expect

    page.route("**/api/v1/health/checks", lambda route: route.fulfill(status=404, json={"detail": "Not Found"}))
    log_in(page, grid)
    expect(page.get_by_role("heading", name="Queues")).to_be_visible()
    page.get_by_role("link", name="Health").click()
    expect(page.get_by_text("Health checks not available")).to_be_visible()
    expect(page.locator("table.health")).to_be_hidden()


def test_arrays_show_their_progress_and_cost(grid: Grid, page: Any, shots: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    sweep = tmp_path / "sweep.jsonl"
    lines = [json.dumps({"command": ["sh", "-c", "exit $(( SCALEQ_ARRAY_INDEX == 2 ))"]}) for _ in range(4)]
    sweep.write_text("\n".join(lines) + "\n")
    r = cli("submit-many", "default", str(sweep), "--name", "dash-sweep", "--data-dir", str(grid.data_dir))
    assert r.returncode == 0, r.stderr
    array_id = json.loads(cli("arrays", "--output", "json", "--data-dir", str(grid.data_dir)).stdout)[0]["id"]
    log_in(page, grid)
    expect(page.get_by_role("heading", name="Queues")).to_be_visible()
    page.get_by_role("link", name="Arrays").click()
    expect(page.get_by_role("heading", name="Arrays")).to_be_visible()
    row = page.locator(f'tr[data-array-id="{array_id}"]')
    expect(row).to_contain_text("dash-sweep")
    # the four jobs run (the same line each: index 2 fails) and the bar fills, without a reload
    expect(row.locator("progress")).to_have_attribute("value", "4", timeout=60_000)
    expect(row.locator("td").nth(1)).to_contain_text("100%")
    expect(row.locator("td").nth(2)).to_have_text("3")  # succeeded
    expect(row.locator("td").nth(3)).to_have_text("1")  # unsuccessful: index 2
    screenshot(page, shots, "arrays")


def test_a_job_and_a_scaling_decision_in_the_dashboard(grid: Grid, page: Any, shots: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    log_in(page, grid)
    expect(page.get_by_role("heading", name="Queues")).to_be_visible()
    page.get_by_role("link", name="Jobs").click()
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    page.evaluate("window.__sameDocument = true")  # gone if anything reloads the page

    # a job submitted through the CLI appears, and finishes, in the open Jobs view
    job_id = submit(grid, "sh", "-c", HELLO)
    failing = submit(grid, "sh", "-c", "echo 'input.csv: no such file' >&2; exit 3")
    submit(grid, "sh", "-c", "for i in 1 2 3; do echo step $i; sleep 1; done")
    gate = tmp_path / "gate"  # the long job holds until the test has seen its worker busy
    long_job = submit(grid, "sh", "-c", f"echo working; while [ ! -e {gate} ]; do sleep 0.05; done")
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    expect(row).to_be_visible()
    expect(row.locator(".badge")).to_have_attribute("data-state", "success", timeout=30_000)
    expect(row.locator(".badge")).to_contain_text("success")
    expect(page.locator(f'tr[data-job-id="{failing}"] .badge')).to_have_attribute("data-state", "failed")
    assert page.evaluate("window.__sameDocument") is True, "the Jobs view updated by reloading the page"
    expect(page.locator(f'tr[data-job-id="{long_job}"]')).to_be_visible()
    screenshot(page, shots, "jobs")

    # its page: definition, attempts, the log line, the output (downloaded with the token)
    row.click()
    expect(page.locator("#page h1")).to_contain_text(job_id[:12])
    expect(page.locator("#log")).to_contain_text("hello-dashboard")
    expect(page.locator(".log-status")).to_contain_text("end of log")
    expect(page.locator("dl.facts").first).to_contain_text("success")
    expect(page.get_by_text("answer.txt", exact=True)).to_be_visible()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download").click()
    assert Path(download.value.path()).read_text() == "42\n"
    assert download.value.suggested_filename == "answer.txt"
    expect(page.locator("#why-chain li").last).to_have_text("• finished: succeeded")
    screenshot(page, shots, "job")

    # the failed job's page shows its stderr, and why it ended
    page.goto(f"{grid.url}/dashboard/#/jobs/{failing}")
    expect(page.locator("#log .stderr")).to_contain_text("input.csv: no such file")
    expect(page.locator("#why-chain")).to_contain_text("finished: failed with exit code 3; it retries no failures")

    # a job on a queue nothing serves says so, as `scaleq why` does
    waiting = grid.api_submit("true", queue="nobody-serves-this", wait=False)
    page.goto(f"{grid.url}/dashboard/#/jobs/{waiting}")
    expect(page.locator('#why-chain li[data-kind="unserved"]')).to_contain_text("nothing serves queue nobody-serves")
    expect(page.locator('#why-chain li[data-kind="position"]')).to_have_attribute("title", re.compile(r"ahead: 0"))
    expect(page.locator("#why-estimate")).to_have_text(
        "Estimated start: not known — nothing can run it: no group and no worker serves its queue"
    )

    # workers: the long job keeps one busy
    page.get_by_role("link", name="Workers").click()
    expect(page.locator('tr[data-worker-id] .badge:has-text("busy")').first).to_be_visible(timeout=15_000)
    screenshot(page, shots, "workers")

    page.get_by_role("link", name="Queues").click()
    expect(page.locator('tr[data-queue="default"]')).to_be_visible()
    screenshot(page, shots, "queues")

    # groups: the decision to scale up, with its reason, in the list and on the chart; then the scale-down
    page.get_by_role("link", name="Groups").click()
    card = page.locator('article[data-group="cpu"]')
    expect(card).to_be_visible()
    events = grid.api("GET", "/events", params={"group": "cpu"}).raise_for_status().json()
    up = next(e for e in events if e["kind"] == "scale_up")
    assert up["reason"], up
    expect(card.locator(f'tr[data-event-id="{up["id"]}"] td.reason')).to_have_text(up["reason"])
    expect(card.locator(f'tr[data-event-id="{up["id"]}"]')).to_contain_text("scale up")
    marker = card.locator(f'.marker[data-event-id="{up["id"]}"]')
    expect(marker.locator("title")).to_contain_text(up["reason"])
    gate.touch()
    grid.wait_state(long_job, "finished", 30)
    expect(card.locator('tr[data-kind="scale_down"]').first).to_be_visible(timeout=30_000)
    expect(card.locator(".fig-current .v")).to_have_text("0", timeout=30_000)
    time.sleep(2.5)  # one more poll, so the chart's line reaches zero
    card.locator(f'.marker[data-event-id="{up["id"]}"]').focus()  # by keyboard, as by mouse
    expect(card.locator(".tip")).to_contain_text(up["reason"])
    card.locator(f'.marker[data-event-id="{up["id"]}"]').press("Enter")  # picks its row in the list
    expect(card.locator(f'tr[data-event-id="{up["id"]}"]')).to_have_class(re.compile(r"\bpicked\b"))
    card.locator(f'.marker[data-event-id="{up["id"]}"]').hover()
    expect(card.locator(".tip")).to_contain_text(up["reason"])
    screenshot(page, shots, "groups")

    # health: doctor's checks, or word that this server has none
    page.get_by_role("link", name="Health").click()
    expect(page.locator(".server-health")).to_contain_text("ok")
    expect(page.locator("table.health tbody tr, .notice").first).to_be_visible()
    screenshot(page, shots, "health")

    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('scaleq.token')") is None


def test_the_job_list_pages_by_cursor(grid: Grid, page: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"command": ["echo", str(n)]}) + "\n" for n in range(105)))
    # a queue no group serves: the jobs stay queued, 105 of them, one page of 100 and one of 5
    r = cli("submit-many", "paging-queue", str(many), "--data-dir", str(grid.data_dir))
    assert r.returncode == 0, r.stderr
    log_in(page, grid)
    expect(page.get_by_role("heading", name="Queues")).to_be_visible()
    page.goto(f"{grid.url}/dashboard/#/jobs?queue=paging-queue")
    rows = page.locator("tr.job")
    expect(rows).to_have_count(100)
    first_page = set(rows.evaluate_all("rs => rs.map(r => r.dataset.jobId)"))
    page.get_by_role("link", name="Older →").click()
    expect(rows).to_have_count(5)
    second_page = set(rows.evaluate_all("rs => rs.map(r => r.dataset.jobId)"))
    assert not first_page & second_page
    expect(page.get_by_role("link", name="Older →")).to_have_count(0)  # the last page
    page.get_by_role("link", name="← Newest").click()
    expect(rows).to_have_count(100)


# Markup where a user can put it: in a command, an env value, its stdout and stderr, an output
# file's name. Every view renders text nodes only (and the CSP allows scripts from 'self' alone): none of it may run.
MARKUP = """<img src=x onerror="window.__ran=1"><script>window.__ran=1</script><b>bold</b>"""
FILENAME = "<img src=x onerror=window.__ran=1>.txt"  # no "/" in a file name


def test_markup_in_every_field_shows_as_text_and_runs_nothing(grid: Grid, page: Any) -> None:
    from playwright.sync_api import expect

    script = f"echo '{MARKUP}'; echo '{MARKUP}' >&2; echo x > \"$SCALEQ_OUTPUTS/{FILENAME}\""
    ran = grid.api_submit("sh", "-c", script, env={"NOTE": MARKUP})
    assert grid.api_job(ran)["reason"] == "success"
    waiting = grid.api_submit("echo", MARKUP, wait=False, requirements={"gpus": 1}, env={"NOTE": MARKUP})
    log_in(page, grid)
    expect(page.get_by_role("heading", name="Queues")).to_be_visible()
    page.goto(f"{grid.url}/dashboard/#/jobs/{ran}")
    expect(page.locator("#log")).to_contain_text(MARKUP)  # the markup, as text
    expect(page.locator("#log .stderr").first).to_contain_text(MARKUP)
    expect(page.get_by_text(FILENAME, exact=True)).to_be_visible()
    expect(page.locator("#page")).to_contain_text(f"NOTE={MARKUP}")  # the definition's env, and the command
    expect(page.locator("#page")).to_contain_text("onerror=window.__ran=1>.txt")
    page.goto(f"{grid.url}/dashboard/#/jobs/{waiting}")
    expect(page.locator("#why-chain")).to_contain_text("the job needs 1")
    expect(page.locator("#page")).to_contain_text(MARKUP)
    for view in ("Jobs", "Workers", "Queues", "Groups", "Arrays", "Health"):
        page.get_by_role("navigation", name="Views").get_by_role("link", name=view).click()
        expect(page.get_by_role("heading", name=view)).to_be_visible()
    assert page.evaluate("window.__ran") is None, "markup from a job's fields ran as script"
    assert page.locator("#page img, #page script, #page b").count() == 0, "markup became elements"
