"""The console (server/static) end to end: headless Chromium against a real Shoal server
and a real moto table.

`test_console_end_to_end` signs in, creates an integration and a collection through the
forms, watches the bulk load and READY, queries, writes an item with boto3 and reruns the
query until the row shows, then provokes a syntax error. Screenshots of every stage go to
tests/artifacts/console/ (ignored by git). The page must log no JavaScript error other than
the two HTTP refusals the test provokes on purpose, and load nothing from another host.

Chromium is Debian's (`./scripts/test` installs it with apt-get); Playwright only drives
it and never downloads a browser. Without Chromium these tests fail, they do not skip.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import tomllib
import uuid
from pathlib import Path

import pytest

from support import Dynamo, ShoalProcess

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "server" / "static"
ARTIFACTS = Path(__file__).parent / "artifacts" / "console"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
N_ITEMS = 2000
SECRET = f"console-secret-{uuid.uuid4().hex}"
# Rendered as text it is harmless; parsed as HTML it would set window.injected.
HOSTILE_NOTE = '<img src=x onerror="window.injected=1"> & "quotes" <b>bold</b>'


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.fail(
            "Chromium is not installed, so the console cannot be tested. ./scripts/test installs "
            "Debian's package with apt-get; install it yourself with `apt-get install chromium`.",
            pytrace=False,
        )
    return path


@pytest.fixture
async def browser():
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the Python package `playwright` is missing: pip install -e '.[test]'", pytrace=False)
    executable = chromium_path()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


class PageWatch:
    """What the page logged as errors and which hosts it asked for anything."""

    def __init__(self, page, origin: str) -> None:
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.refused: list[str] = []
        page.on("response", lambda r: self.refused.append(f"{r.status} {r.request.method} {r.url} {r.request.post_data}") if r.status >= 400 else None)
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("request", lambda r: None if r.url.startswith((origin, "data:", "blob:")) else self.foreign.append(r.url))

    def unexpected(self, provoked_statuses: list[int]) -> list[str]:
        """Errors other than one 'Failed to load resource' per HTTP refusal the test provoked."""
        left = list(provoked_statuses)
        unexpected = []
        for text in self.errors:
            refused = re.match(r"Failed to load resource: the server responded with a status of (\d+)", text)
            if refused and int(refused.group(1)) in left:
                left.remove(int(refused.group(1)))
            else:
                unexpected.append(text)
        return unexpected


def items(count: int) -> list[dict]:
    cities = ["Oslo", "Lima", "Pune", "Kyiv", "Turin", "Osaka"]
    statuses = ["placed", "shipped", "delivered", "returned"]
    return [
        {
            "pk": {"S": f"order-{i:05d}"},
            "status": {"S": statuses[i % len(statuses)]},
            # Always fractional: a zero-row SELECT * over a field mixing int and float fails in
            # sql/engine.py (empty_table of a union type), which is not what this test is about.
            "amount": {"N": f"{5 + i % 400}.{i % 9 + 1}"},
            "address": {"M": {"city": {"S": cities[i % len(cities)]}, "zip": {"S": f"{10000 + i}"}}},
            "tags": {"SS": ["new", f"batch-{i % 3}"]},
        }
        for i in range(count)
    ]


async def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.evaluate("window.scrollTo(0, 0)")  # sticky parts sit where a reader sees them
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def nav(page, name: str) -> None:
    await page.get_by_role("navigation").get_by_role("link", name=name).click()


async def run_query(page, sql: str) -> None:
    editor = page.locator("textarea.editor-input")
    await editor.fill(sql)
    await editor.press("Control+Enter")  # the editor's shortcut, not a button click


async def test_console_end_to_end(browser, shoal: ShoalProcess, ddb: Dynamo, table_name: str) -> None:
    ddb.create_table(table_name)
    ddb.batch_write(table_name, items(N_ITEMS))
    collection = f"console_{uuid.uuid4().hex[:6]}"
    context = await browser.new_context(viewport={"width": 1360, "height": 860})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    watch = PageWatch(page, shoal.url)
    provoked: list[int] = []

    # Sign in: a wrong key is refused on the form, the right one opens the console.
    await page.goto(shoal.url + "/")
    await page.get_by_label("API key").fill("not-the-key")
    provoked.append(401)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_text("That key was not accepted").wait_for()
    await shot(page, "01-sign-in-refused")
    await page.get_by_label("API key").fill(shoal.key)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_text("No collections yet").wait_for()
    assert await page.evaluate("sessionStorage.getItem('shoal.apiKey')") == shoal.key

    # An integration through the form; its secret is sent once and never shown again.
    await nav(page, "Integrations")
    await page.get_by_role("link", name="New integration").first.click()
    await page.get_by_label("Name", exact=True).fill("local")
    await page.get_by_label("Access key ID").fill("testing")
    await page.get_by_label("Secret access key").fill(SECRET)
    await page.get_by_label("DynamoDB endpoint URL").fill(ddb.endpoint_url)
    await page.get_by_role("button", name="Create integration").click()
    row = page.locator("tr[data-integration='local']")
    await row.get_by_text("secret stored, never shown").wait_for()
    assert SECRET not in await page.content()
    await shot(page, "02-integrations")

    # Deleting one: the dialog asks first.
    await shoal.create_integration("spare", ddb.endpoint_url)
    await page.reload()
    await page.locator("tr[data-integration='spare']").get_by_role("button", name="Delete").click()
    await page.get_by_role("button", name="Delete integration").click()
    await page.locator("tr[data-integration='spare']").wait_for(state="detached")
    assert (await shoal.api("GET", "/v1/orgs/self/integrations/spare"))[0] == 404

    # A collection through the form, read budget 5 RCU/s so the bulk load takes a few seconds.
    await nav(page, "Collections")
    await page.get_by_role("link", name="New collection").first.click()
    await page.get_by_label("Name", exact=True).fill(collection)
    await page.get_by_label("DynamoDB table").fill(table_name)
    await page.get_by_label("AWS region").fill("us-east-1")
    await page.get_by_label("Read budget (RCU per second)").fill("5")
    await page.get_by_label("Poll every (seconds)").fill("0.1")
    preview = await page.locator(".code-preview").inner_text()
    assert f'"table_name": "{table_name}"' in preview and '"rcu": 5' in preview, preview
    await shot(page, "03-new-collection")
    await page.get_by_role("button", name="Create collection").click()
    await page.wait_for_url(f"**/#/collections/commons/{collection}")

    progress = page.get_by_test_id("bulk-progress")
    await progress.wait_for(timeout=15_000)
    await page.wait_for_function(
        "() => Number(document.querySelector('[role=progressbar]')?.getAttribute('aria-valuenow')) > 0", timeout=15_000)
    await shot(page, "04-bulk-load")
    await page.locator(".page-header .badge", has_text="Ready").wait_for(timeout=60_000)
    assert not await progress.is_visible()
    await page.locator(".stat", has_text="Documents").get_by_text(f"{N_ITEMS:,}").wait_for()

    # A write after READY must reach a query through the stream.
    new_id = f"order-new-{uuid.uuid4().hex[:8]}"
    ddb.client.put_item(TableName=table_name, Item={
        "pk": {"S": new_id}, "note": {"S": HOSTILE_NOTE},
        "address": {"M": {"city": {"S": "Reykjavik"}, "lines": {"L": [{"S": "Laugavegur 1"}, {"N": "101"}]}}},
    })
    await page.wait_for_timeout(2500)  # a few more samples for the charts
    await shot(page, "05-collection-ready")

    await nav(page, "SQL editor")
    await page.locator("textarea.editor-input").fill(f"SELECT *\nFROM commons.{collection}\nWHERE _id = :id")
    await page.locator("[data-param='id'] .param-value").fill(new_id)  # the row appeared on typing :id
    cell = page.locator(".results-table td", has_text="quotes")
    for _attempt in range(60):
        await page.locator("textarea.editor-input").press("Control+Enter")
        await page.locator("[data-testid=results-summary]").wait_for()
        if await cell.count():
            break
        await page.wait_for_timeout(250)
    assert await cell.inner_text() == HOSTILE_NOTE, "the row written after READY never showed"
    assert await page.evaluate("window.injected") is None
    assert await page.locator(".results-table img, .results-table td b").count() == 0
    await page.locator(".results-table .json-inline", has_text="Reykjavik").click()
    await page.locator(".json-tree", has_text="Laugavegur 1").wait_for()
    await shot(page, "06-query-new-row")

    # Long results are paginated.
    await run_query(page, f"SELECT _id, status, amount, address, tags\nFROM commons.{collection}\nORDER BY _id\nLIMIT 120")
    await page.get_by_text("1–50 of 120").wait_for()
    await page.get_by_role("button", name="Next page").click()
    await page.get_by_text("51–100 of 120").wait_for()
    assert await page.locator(".results-table tbody tr").first.locator(".rownum").inner_text() == "51"
    await shot(page, "07-query-results")

    # A syntax error is located: message with line and column, the line marked in the editor.
    provoked.append(400)
    await run_query(page, f"SELECT _id,\n  FROM commons.{collection} WHERE")
    await page.get_by_text(re.compile(r"Error at line 2, column \d+")).wait_for()
    assert await page.locator(".gutter-error").inner_text() == "2"
    assert await page.locator(".tok-error").inner_text() == "WHERE"
    await shot(page, "08-query-error")

    # History and sign-in survive a reload (same tab: sessionStorage).
    await page.reload()
    await page.locator(".history-item").first.wait_for()
    assert await page.locator(".history-item").count() >= 3

    # A source that fails says why, on its page and in the list.
    await shoal.create_collection("broken", "local", "no_such_table")
    await page.goto(f"{shoal.url}/#/collections/commons/broken")
    await page.get_by_role("alert").filter(has_text="Ingest is failing").filter(has_text="no_such_table").wait_for()
    await shot(page, "09-collection-error")
    await nav(page, "Collections")
    await page.locator("tr[data-collection='commons.broken'] .badge", has_text="Error").wait_for()
    row = page.locator(f"tr[data-collection='commons.{collection}']")
    await row.locator(".badge", has_text="Ready").wait_for()
    await row.get_by_text(f"{N_ITEMS + 1:,}").wait_for()
    await shot(page, "10-collections")

    await row.click()
    await page.get_by_role("button", name="Delete").click()
    await page.get_by_role("button", name="Delete collection").click()
    await page.wait_for_url("**/#/collections")
    await row.wait_for(state="detached")

    await context.close()
    assert watch.unexpected(provoked) == [], f"JavaScript errors in the console: {watch.errors}; refused requests: {watch.refused}"
    assert watch.foreign == [], f"the page loaded something from another host: {watch.foreign}"


async def test_console_is_served_without_api_key(shoal_module: ShoalProcess) -> None:
    page = await shoal_module.request("GET", "/", key=None)
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html"), page
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    script = await shoal_module.request("GET", "/static/app.js", key=None)
    assert script.status == 200 and "javascript" in script.headers["Content-Type"], script
    # Always revalidated, cheaply: an upgraded server never mixes old and new modules.
    assert page.headers["Cache-Control"] == script.headers["Cache-Control"] == "no-cache"
    etag = {k.lower(): v for k, v in script.headers.items()}["etag"]
    again = await shoal_module.request("GET", "/static/app.js", key=None, headers={"If-None-Match": etag})
    assert again.status == 304, again
    assert (await shoal_module.request("GET", "/static/missing.js", key=None)).status == 404
    assert (await shoal_module.request("GET", "/static/../routes.py", key=None)).status in (403, 404)
    assert (await shoal_module.request("GET", "/v1/orgs/self/collections", key=None)).status == 401


def test_every_console_file_ships_in_the_package() -> None:
    """pyproject's package-data must cover each file under server/static, or an installed
    (non-editable) server would serve a console with missing pieces."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["shoal.server"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert files, "server/static is empty"
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pattern) and f.count("/") == pattern.count("/") for pattern in patterns)]
    assert missing == [], f"add these to [tool.setuptools.package-data] in pyproject.toml: {missing}"
