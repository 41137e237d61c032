"""Snakemake's HTML report of a finished tiny study, opened in headless Chromium: do the tables really render?

The report is a single-page app, so reading the HTML file is not enough: the test opens the Tables and Claims
categories like a person would, reads the rendered table cells and compares them with results/report/*.md.
Screenshots go to $LCNN_ARTIFACTS (default tests/artifacts/) for a human to look at.

Needs chromium + chromium-driver (Debian) and selenium. When they are missing the test installs them with apt-get
if it runs as root; otherwise it skips, except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import local_env

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CHROME_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--window-size=1400,1000",
)
WAIT_S = 30


def _unavailable(reason: str) -> None:
    """Skip locally; under CI a missing browser must not turn into a silently green run."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def _find_browser() -> tuple[str | None, str | None]:
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture(scope="session")
def browser_paths() -> tuple[str, str]:
    """chromium and chromedriver, installed from Debian's archive when missing and we are root."""
    browser, driver = _find_browser()
    if not (browser and driver) and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        apt = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "chromium-driver"]
        for cmd in (["apt-get", "update", "-qq"], apt):
            subprocess.run(cmd, env=env, capture_output=True, timeout=900, check=False)
        browser, driver = _find_browser()
    if not (browser and driver):
        _unavailable("chromium/chromedriver are not installed (apt-get install chromium chromium-driver, as root)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _unavailable("selenium is not installed (pip install selenium)")
    return browser, driver


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = Path(os.environ.get("LCNN_ARTIFACTS") or REPO / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _snakemake() -> list[str]:
    exe = Path(sys.executable).with_name("snakemake")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]


def _tiny_study_args(request: pytest.FixtureRequest) -> list[str]:
    """The snakemake options the tiny study ran with (its --configfile overlays), so --report sees the same DAG.

    Taken from a `tiny_study_args` fixture when there is one, else from tests/conftest.py's TINY_ARGS.
    """
    try:
        return [str(a) for a in request.getfixturevalue("tiny_study_args")]
    except pytest.FixtureLookupError:
        pass
    conftest = sys.modules.get("conftest")
    return [str(a) for a in getattr(conftest, "TINY_ARGS", [])]


@pytest.fixture(scope="session")
def report_html(request: pytest.FixtureRequest, tiny_study: Path, artifacts: Path) -> Path:
    """`snakemake report --report <artifacts>/report.html <the tiny study's options>` in the finished tiny study."""
    extra = _tiny_study_args(request)
    html = artifacts / "report.html"
    html.unlink(missing_ok=True)
    cmd = [*_snakemake(), "report", "--report", str(html), *extra]  # extra last: its options may take lists
    out = subprocess.run(cmd, cwd=tiny_study, env=local_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert html.stat().st_size > 100_000, "the report should be one self-contained page of a few MB"
    return html


@pytest.fixture()
def page(browser_paths: tuple[str, str], report_html: Path):
    """A fresh headless Chromium (own throw-away profile) showing the report's start page."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    with tempfile.TemporaryDirectory(prefix="lcnn-chromium-") as profile:
        for arg in (*CHROME_ARGS, f"--user-data-dir={profile}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
        try:
            driver.get(report_html.resolve().as_uri())
            yield driver
        finally:
            driver.quit()


def _click_text(driver, text: str) -> None:
    """Click the visible element whose own text is exactly ``text`` (menu entries are <li>, <span> or <a>)."""
    from selenium.webdriver.common.by import By

    def visible(d):
        hits = [e for e in d.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']") if e.is_displayed()]
        return hits[0] if hits else False

    _click(driver, visible, f"no visible '{text}' in the report")


def _click(driver, find, message: str) -> None:
    """Click what ``find(driver)`` returns once a real click lands on it, retrying until WAIT_S.

    The report is a single-page app that lays its lists out in steps (and animates them, `transition-all`): on a
    loaded machine the element can be found while another row still covers it (ElementClickInterceptedException)
    or be re-rendered between finding and clicking (StaleElementReferenceException). Both mean "not yet", so the
    click is retried on a freshly found element instead of failing at the first try or clicking blind with JS.
    """
    from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def clicked(d):
        element = find(d)
        if not element:
            return False
        try:
            d.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
            element.click()
        except (ElementClickInterceptedException, StaleElementReferenceException):
            return False
        return True

    WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(clicked, message)


def _eye(label: str):
    """A finder for the 'show' (eye) button of the result labelled ``label``, once it is displayed and enabled."""
    from selenium.webdriver.common.by import By

    xpath = f"//tr[td[normalize-space()='{label}']]//a[@iconname='eye']"

    def find(d):
        hits = [e for e in d.find_elements(By.XPATH, xpath) if e.is_displayed() and e.is_enabled()]
        return hits[0] if hits else False

    return find


def _open_table(driver, category: str, label: str) -> list[list[str]]:
    """Open ``category``, show the result labelled ``label`` and return the rendered table's header + first row."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    if not driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{category}']"):
        _click_text(driver, "Results")
    _click_text(driver, category)
    _click(driver, _eye(label), f"no clickable '{label}' entry in {category}")
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(ec.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe")), f"{label} was not shown")
    try:
        wait.until(ec.visibility_of_element_located((By.TAG_NAME, "table")), f"{label} shows no table")
        header = [th.text.strip() for th in driver.find_elements(By.CSS_SELECTOR, "table thead th")]
        first = [td.text.strip() for td in driver.find_elements(By.CSS_SELECTOR, "table tbody tr:first-child td")]
    finally:
        driver.switch_to.default_content()
    return [header, first]


def _expected(tiny_study: Path, name: str) -> tuple[list[str], list[str]]:
    """Header and first row of results/report/<name>.md: the same cells, written independently of the HTML."""
    lines = (tiny_study / "results" / "report" / f"{name}.md").read_text().splitlines()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    assert len(rows) >= 3, f"{name}.md has no data rows"
    return rows[0], rows[2]  # rows[1] is the |---| separator


def test_tables_category_renders_accuracy(page, tiny_study: Path, artifacts: Path) -> None:
    _click_text(page, "Results")  # the start page has loaded (its description is report/workflow.rst)
    page.save_screenshot(str(artifacts / "report_start.png"))
    assert "lcnn" in page.find_element("tag name", "body").text
    header, first = _open_table(page, "Tables", "accuracy")
    page.save_screenshot(str(artifacts / "report_tables_accuracy.png"))
    exp_header, exp_first = _expected(tiny_study, "accuracy")
    assert header == exp_header
    assert first == exp_first, "the rendered accuracy table differs from results/report/accuracy.md"
    assert "top1_mean" in header and first[0]  # a model name, not an empty shell


def test_claims_category_renders(page, tiny_study: Path, artifacts: Path) -> None:
    header, first = _open_table(page, "Claims", "claims")
    page.save_screenshot(str(artifacts / "report_claims.png"))
    exp_header, exp_first = _expected(tiny_study, "claims")
    assert header == exp_header and first == exp_first
    holds = first[header.index("holds")]
    assert holds in {"yes", "no", "inconclusive", "n/a"} or holds.startswith(("not comparable (", "unclear ("))


def test_figures_category_shows_pareto(page, artifacts: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _click_text(page, "Figures")
    _click(page, _eye("pareto"), "no clickable 'pareto' entry in Figures")

    def decoded_png(d):
        imgs = d.find_elements(By.CSS_SELECTOR, "img[src^='data:image/png']")
        return [i for i in imgs if d.execute_script("return arguments[0].naturalWidth", i) > 100]

    assert WebDriverWait(page, WAIT_S).until(decoded_png, "pareto.png was not displayed as an image")
    page.save_screenshot(str(artifacts / "report_figures_pareto.png"))
