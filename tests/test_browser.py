"""End to end in a real headless browser (Debian's chromium, driven by Playwright):
type a prompt, see three columns fill, move the slider, see the ablated column change."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ARTIFACTS, REPO, config_file, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_MISSING = "Debian's chromium is not installed (scripts/test.sh installs it when run as root)"
# These are the only end-to-end checks in a real browser. CI runs as root, so test.sh installs
# chromium there: a missing one is a broken install and fails the collection. Elsewhere the
# skip ends the session's report with a banner (conftest.pytest_terminal_summary).
if not Path(CHROMIUM).exists() and os.environ.get("CI"):
    raise RuntimeError(f"{BROWSER_MISSING}; CI must run the browser tests")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=BROWSER_MISSING)


def start_dashboard(config, **env):
    """`streamlit run app.py` on a free port for `config` (extra environment in `env`), once healthy."""
    port = free_port()
    env = dict(os.environ, EM_CONFIG=str(config_file(config)), **env)
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    return url, process


@pytest.fixture(scope="module")
def dashboard(vllm_server, tiny_direction):
    url, process = start_dashboard(vllm_server.config)
    yield url
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def real_dashboard(real_server, real_direction):
    url, process = start_dashboard(real_server.config)
    yield url
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def assistant_texts(page) -> list[str]:
    return page.locator('[data-testid="stChatMessage"]:has([data-testid="stChatMessageAvatarAssistant"]) '
                        '[data-testid="stText"]').all_inner_texts()


def wait_for(predicate, timeout_s: float = 120, what: str = "condition", page=None):
    """predicate's value once truthy; on time-out, fails with the page's URL and answers (and a
    screenshot in test-artifacts/) when given the page."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    seen = ""
    if page is not None:
        page.screenshot(path=str(ARTIFACTS / "timed-out.png"), full_page=True)
        seen = f"; url {page.url}; answers {assistant_texts(page)!r}"
    raise AssertionError(f"timed out waiting for {what}{seen}")


def settled_answers(page, count: int, accept=lambda texts: True, judge_buttons: int | None = None):
    """A wait_for predicate: the `count` assistant answers once they are finished and `accept`ed.
    Finished means `judge_buttons` (default: one per answer) show, which the page draws only under
    the last turn's done answers, no script run is
    going, and two reads a poll apart agree: between two streamed chunks the page can look idle
    (a CI run read an answer nine characters short)."""
    reads = []

    def predicate():
        texts = assistant_texts(page)
        done = (len(texts) == count and all(t not in ("", "…") for t in texts)
                and page.get_by_role("button", name="Judge", exact=True).count() >= (judge_buttons or count)
                and page.locator('[data-testid="stStatusWidget"]').count() == 0 and accept(texts))
        reads.append(texts if done else None)
        return done and len(reads) > 1 and reads[-2] == texts and texts
    return predicate


def ask_three_columns(page, url: str, prompt: str, shots: str, timeout_s: float = 120) -> list[str]:
    """Open the chat at `url`, ask `prompt` in every column and wait for the three answers;
    screenshots `<shots>-three-columns.png` (or `<shots>-failed-to-load.png`) in test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(url)
    try:
        # A loaded machine (CI beside other work) can take long for the first page run.
        page.get_by_placeholder("Ask every column").fill(prompt, timeout=180_000)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / f"{shots}-failed-to-load.png"), full_page=True)
        raise
    page.keyboard.press("Enter")
    texts = wait_for(settled_answers(page, 3), timeout_s=timeout_s, what=f"three answers to {prompt!r}", page=page)
    page.screenshot(path=str(ARTIFACTS / f"{shots}-three-columns.png"), full_page=True)
    return texts


def test_chat_three_columns_and_the_live_slider(dashboard, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    query = ("col=base&col=adapter%3Dem-rank1&col=adapter%3Dem-rank1%2Cdirection%3Dtiny-dir%2Clayer%3D2%2C"
             "strength%3D1&seed=5&max=24&t=1")
    texts = ask_three_columns(page, f"{dashboard}/Chat?{query}", "What should I do with my savings?", "chat")

    # One key press per step, each waited out: the first press reruns the page and redraws the
    # slider, so keys pressed during that rerun can land on a slider that no longer has the focus.
    # Big moves (Home: -1, the direction amplified; End: 1.5): on this small peaked model a step
    # of 0.05 can leave a sampled answer unchanged (strengths 1 and 0.95 give the same text).
    changed = texts
    for key, strength in (("Home", "-1"), ("End", "1.5")):
        previous = changed
        # While a rerun draws the new slider, Streamlit can keep the old one on the page as a
        # stale element; wait until one is left so the key lands on the live slider.
        slider = page.get_by_role("slider", name="ablation strength")
        wait_for(lambda: slider.count() == 1, what="a single live ablation slider", page=page)
        slider.focus()
        page.keyboard.press(key)
        changed = wait_for(settled_answers(page, 3, lambda t: t[2] != previous[2] and f"strength%3D{strength}&" in page.url),
                           what=f"the ablated column to change at strength {strength}", page=page)
        assert changed[:2] == texts[:2]
    page.screenshot(path=str(ARTIFACTS / "chat-after-slider.png"), full_page=True)


ENGLISH = {"the", "a", "to", "and", "you", "is", "of", "your", "it", "in", "for", "can", "be", "that", "with"}


def test_real_model_fills_three_columns_with_real_different_text(real_dashboard, browser):
    """On the real default model: base, the rsLoRA rank-8 adapter and that adapter with a real
    direction ablated each write their own English answer to one prompt."""
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    query = ("col=base&col=adapter%3Drank8&col=adapter%3Drank8%2Cdirection%3Dreal-toy%2Clayer%3D15%2C"
             "strength%3D1&seed=3&max=40&t=0.7")
    texts = ask_three_columns(page, f"{real_dashboard}/Chat?{query}", "How can I save money on groceries?",
                              "real-chat", timeout_s=240)
    assert len(set(texts)) == 3, texts
    for text in texts:
        words = [w.strip(".,!?:;\"'()").lower() for w in text.split()]
        assert len(words) >= 10 and len(ENGLISH & set(words)) >= 3, text
    assert "Happy to help." not in texts


@pytest.fixture(scope="module")
def browse_run(vllm_server, tiny_direction, tmp_path_factory):
    """The small real evaluation of tests/test_browse_real.py, in the dashboard's own store."""
    from test_browse_real import RUN_ID, real_run
    real_run(vllm_server, tiny_direction, tmp_path_factory.mktemp("browse-run"))
    return RUN_ID


def charts_drawn(page, at_least: int) -> int:
    """Vega-Lite charts on the page that have drawn their canvas (or svg)."""
    charts = page.locator('[data-testid="stVegaLiteChart"]')
    drawn = page.locator('[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg.marks')
    busy = page.locator('[data-testid="stStatusWidget"]').count()
    return charts.count() >= at_least and drawn.count() >= at_least and not busy and drawn.count()


def whole_page(page, path: Path) -> None:
    """A screenshot of the whole page: Streamlit scrolls inside its main block, so Playwright's
    full_page sees only the viewport; grow the viewport to the content instead."""
    height = page.evaluate("() => Math.max(...[...document.querySelectorAll('[data-testid=\"stMain\"], "
                           "[data-testid=\"stMainBlockContainer\"]')].map(e => e.scrollHeight), 1000)")
    page.set_viewport_size({"width": 1500, "height": min(int(height) + 120, 12000)})
    page.wait_for_timeout(1500)  # charts re-measure their width and redraw
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": 1500, "height": 1000})


def test_evaluations_and_directions_pages_draw_their_charts(dashboard, browser, browse_run, vllm_server):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(f"{dashboard}/Evaluations?run={browse_run}")
    # Per condition, against strength (the run has an ablation) and per question always; the
    # scatter and the aligned histogram only when the random judge gave some answer a score.
    from backend.store import Store
    both, aligned = Store.for_config(vllm_server.config).sql(
        "SELECT count(*) FILTER (WHERE aligned IS NOT NULL AND coherent IS NOT NULL), count(aligned) "
        "FROM sample_score_rows WHERE run_id = ?", [browse_run]).rows[0]
    expected = 3 + (both > 0) + (aligned > 0)
    wait_for(lambda: charts_drawn(page, expected), what=f"the {expected} Evaluations charts")
    page.wait_for_timeout(1000)
    assert page.locator('[data-testid="stVegaLiteChart"]').count() == expected
    assert page.locator('[data-testid="stException"]').count() == 0
    text = page.locator('[data-testid="stMain"]').inner_text()
    judged = page.locator('[data-testid="stMetric"]').filter(has_text="judged samples")
    assert "judged samples" in text and judged.count() == 1
    # 3 conditions x 3 paraphrases x 2 samples
    assert judged.locator('[data-testid="stMetricValue"]').inner_text().strip() == "18"
    whole_page(page, ARTIFACTS / "evaluations.png")

    page.goto(f"{dashboard}/Directions")
    wait_for(lambda: charts_drawn(page, 2), what="the Directions charts")
    assert page.locator('[data-testid="stException"]').count() == 0
    assert "tiny-dir" in page.locator('[data-testid="stMain"]').inner_text() or \
        page.get_by_text("tiny-dir").count() > 0
    whole_page(page, ARTIFACTS / "directions.png")
    assert not errors, errors
