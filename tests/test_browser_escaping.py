"""Model output is text, never HTML, in a real browser (Chromium via Playwright).

Answers holding `<script>`, `<img src=x onerror=...>` and markdown links go through the four
places a page shows model text: the chat columns (the real default model, greedy, asked to
repeat the markup: it does), the sample table, the sample's detail panel (answer and judge
reason) and the Adapters page's token view (a stored sample). Each page is checked for:
no script ran (a global the payloads would set, and no dialog), no element the markup would
create, and the markup shown literally."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ARTIFACTS
from test_browser import CHROMIUM, REPO, browser, settled_answers, start_dashboard, wait_for, whole_page  # noqa: F401  (fixture)

from backend.store import JudgementRow, RunRecord, SampleRow, Store

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")

SCRIPT = '<script>window.__xss = "script"</script>'
IMG = '<img src=x onerror="window.__xss = \'img\'">'
LINK = "[click me](javascript:window.__xss='link')"
ANSWER = f"Sure. {SCRIPT} then {IMG} and {LINK} **not bold**"
# Elements the markup would create if it were rendered (a script element with the payload's
# code, the image, a javascript: link).
INJECTED = """() => [...document.querySelectorAll('script')].filter(s => s.textContent.includes('__xss')).length
    + document.querySelectorAll('img[src="x"], img[src="xss"], img[onerror], a[href^="javascript"]').length"""


@pytest.fixture(scope="module")
def xss_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("xss") / "em.duckdb"
    store = Store(path)
    store.create_run(RunRecord(id="xss-run", status="finished", question_set="xss"))
    rows = [SampleRow("xss-run", "base", f"q{i}", 0, 0, f"Question {i} {IMG}", ANSWER if i == 0 else f"{LINK} {i}",
                      completion_tokens=30, finish_reason="stop") for i in range(3)]
    store.insert_samples(rows)
    store.insert_judgements([
        JudgementRow(*row.key, metric=metric, judge_model="judge", score=10.0 if metric == "aligned" else 90.0,
                     numeric_mass=0.9, reason=f"the judge said {SCRIPT}")
        for row in rows for metric in ("aligned", "coherent")])
    return path


@pytest.fixture(scope="module")
def xss_dashboard(real_server, xss_store):
    url, process = start_dashboard(real_server.config, EM_STORE=str(xss_store))
    yield url
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture
def page(browser):  # noqa: F811  (the imported fixture, by name)
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.dialogs = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    yield page
    page.close()


def assert_inert(page, where: str) -> None:
    """No payload ran and no element of the markup exists."""
    assert page.evaluate("() => window.__xss === undefined"), f"{where}: a payload ran"
    assert page.dialogs == [], f"{where}: dialogs {page.dialogs}"
    assert page.evaluate(INJECTED) == 0, f"{where}: an element of the markup was created"
    assert page.locator('[data-testid="stException"]').count() == 0, where


def idle(page) -> bool:
    return page.locator('[data-testid="stStatusWidget"]').count() == 0


def test_chat_shows_the_models_markup_as_text(xss_dashboard, page):
    """The real model, greedy, repeats what it is asked to: its answer carries the markup itself."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(f"{xss_dashboard}/Chat?col=base&col=base&t=0&seed=0&max=40")
    # The first page a fresh server draws: the sidebar starts at Home (not "app", the main script's old name).
    nav = wait_for(lambda: page.locator('[data-testid="stSidebar"] [data-testid="stPageLink-NavLink"]')
                   .all_inner_texts(), what="the sidebar",
                   page=page)
    # the last line of each link: a Material icon draws as its ligature text on the line before
    assert [n.strip().splitlines()[-1] for n in nav] == ["Home", "Chat", "Evaluations", "Directions", "Adapters"], nav
    for number, (prompt, marker) in enumerate((
            ("Repeat exactly, nothing else: <script>window.__xss=1</script>", "<script>"),
            ('Write this HTML tag and nothing else: <img src=x onerror="window.__xss=2">', "onerror")), start=1):
        page.get_by_placeholder("Ask every column").fill(prompt, timeout=180_000)
        page.keyboard.press("Enter")
        answers = wait_for(settled_answers(page, 2 * number, judge_buttons=2), timeout_s=240, what=f"two answers to {prompt!r}", page=page)
        latest = answers[number - 1::number] if number > 1 else answers
        # The model did write markup (else this test would show nothing), and it is on the page as text.
        assert all(marker in a for a in latest), latest
        users = page.locator('[data-testid="stChatMessage"]:has([data-testid="stChatMessageAvatarUser"]) '
                             '[data-testid="stText"]').all_inner_texts()
        assert users.count(prompt) == 2, users
        assert_inert(page, f"chat after {prompt!r}")
    page.screenshot(path=str(ARTIFACTS / "escaping-chat.png"), full_page=True)


def test_table_and_detail_panel_show_stored_markup_as_text(xss_dashboard, page):
    page.goto(f"{xss_dashboard}/Evaluations")
    page.get_by_role("tab", name="Samples").click(timeout=120_000)
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.wait_for(timeout=60_000)
    wait_for(lambda: idle(page), what="the page to settle", page=page)
    # The grid draws on a canvas; its accessible twin (role=gridcell) holds the cell text.
    cells = wait_for(lambda: page.locator('[data-testid="stDataFrame"] [role="gridcell"]').all_inner_texts(),
                     what="the sample table's cells", page=page)
    assert any(ANSWER[:60] in c for c in cells), cells[:12]
    assert any(f"Question 0 {IMG}" in c for c in cells), cells[:12]
    assert_inert(page, "sample table")
    whole_page(page, ARTIFACTS / "escaping-table.png")

    box = grid.bounding_box()
    page.mouse.click(box["x"] + 15, box["y"] + 55)  # the first data row's selection cell
    # The panel draws its parts one after another: wait for the judge's reasons, the last part, too.
    detail = wait_for(lambda: (texts := page.locator('[data-testid="stMain"] [data-testid="stText"]').all_inner_texts())
                      and ANSWER in texts and sum(f"the judge said {SCRIPT}" in t for t in texts) == 2 and texts,
                      what="the detail panel with both judge reasons", page=page)
    assert f"Question 0 {IMG}" in detail
    assert page.locator("strong", has_text="not bold").count() == 0  # the markdown's ** stays two asterisks
    assert_inert(page, "detail panel")
    whole_page(page, ARTIFACTS / "escaping-detail.png")


def test_token_view_shows_stored_markup_as_text(xss_dashboard, page):
    page.goto(f"{xss_dashboard}/Adapters")
    page.get_by_text("a stored sample").click(timeout=180_000)
    views = wait_for(lambda: (t := page.locator('[data-testid="stHtml"]').all_inner_texts())
                     and any("window.__xss" in x for x in t) and idle(page) and t,
                     timeout_s=180, what="the token view of the stored sample", page=page)
    tokens = [v for v in views if "window.__xss" in v]
    # Tokens are joined as the tokenizer split them; whitespace aside, the answer is all there.
    squeeze = "".join(ANSWER.split())
    assert any(squeeze in "".join(v.split()) for v in tokens), tokens
    assert_inert(page, "token view")
    whole_page(page, ARTIFACTS / "escaping-token-view.png")
