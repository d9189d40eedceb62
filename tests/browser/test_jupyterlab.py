"""Real-browser tier: JupyterLab in headless Chromium, driven by Playwright.

For each explorer notebook: start JupyterLab on 127.0.0.1 with a temporary root and temporary
config/data/runtime dirs (announcements extension disabled, ``INSTSEG_SMOKE=1`` so the kernel runs
the notebook's smoke sizes), open the ``.ipynb``, *Run All Cells*, wait for the explorer's plotly
figure, press ArrowRight on one of its sliders and check that the data the browser plots changed.
Screenshots go to the test's temporary dir; with ``INSTSEG_SAVE_SCREENSHOTS=1`` one per explorer is
also copied to ``docs/img/`` for the README.

Skipped when Chromium or Playwright is missing, unless ``INSTSEG_REQUIRE_BROWSER=1`` (CI), where a
missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CHROMIUM = os.environ.get("INSTSEG_CHROMIUM", "/usr/bin/chromium")
REQUIRE = os.environ.get("INSTSEG_REQUIRE_BROWSER") == "1"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass(frozen=True)
class ExplorerCase:
    notebook: str  # file name in notebooks/
    selector: str  # CSS selector of the explorer's ipywidgets container (one compound selector)
    screenshot: str  # name under docs/img/
    required: bool = True  # False: skipped while that notebook does not exist yet


CASES = [
    ExplorerCase("02_anchors.ipynb", ".instseg-anchor-explorer", "anchor_explorer.png"),
    ExplorerCase(
        "03_assignment_and_box_coding.ipynb", ".instseg-assigner-explorer", "assigner_explorer.png"
    ),
    # The RoIExplorer's container has no class of its own: the output holding sliders and a plot.
    ExplorerCase(
        "05_roipool_vs_roialign.ipynb",
        ".jp-OutputArea-output:has(.widget-slider):has(.js-plotly-plot)",
        "roi_explorer.png",
        required=False,
    ),
]


def _missing(reason: str):
    if REQUIRE:
        pytest.fail(f"INSTSEG_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def playwright_api():
    if not Path(CHROMIUM).exists():
        _missing(f"Chromium not found at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install '.[browser]')")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free local port serving a temporary copy of the notebooks."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    # Only the .ipynb twins: the lab opens exactly what a learner downloads.
    for nb in sorted(NOTEBOOKS.glob("[0-9]*.ipynb")):
        shutil.copy(nb, root / nb.name)
    env = dict(os.environ)
    for name in ("config", "data", "runtime", "home", "ipython"):
        (base / name).mkdir()
    env.update(
        JUPYTER_CONFIG_DIR=str(base / "config"),
        JUPYTER_DATA_DIR=str(base / "data"),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        HOME=str(base / "home"),
        IPYTHONDIR=str(base / "ipython"),
        INSTSEG_SMOKE="1",
        MPLBACKEND="Agg",
        OMP_NUM_THREADS="1",
    )
    env.pop("JUPYTER_PATH", None)
    # Same effect as `jupyter labextension disable @jupyterlab/apputils-extension:announcements`
    # run against this config dir: no "news" notification popping over the notebook.
    labconfig = base / "config" / "labconfig"
    labconfig.mkdir()
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    port, token = _free_port(), secrets.token_hex(16)
    log = open(base / "lab.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--allow-root",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--ServerApp.token={token}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.port_retries=0",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.close()
            pytest.fail("JupyterLab did not start:\n" + (base / "lab.log").read_text()[-3000:])
        time.sleep(0.5)
    yield {"url": url, "token": token, "root": root, "base": base}
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def page(playwright_api, lab, tmp_path):
    context = playwright_api.chromium.launch_persistent_context(
        str(tmp_path / "profile"),
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 1000},
    )
    context.set_default_timeout(60_000)
    page = context.pages[0] if context.pages else context.new_page()
    yield page
    context.close()


def _plot_data(page, selector: str) -> str:
    """The traces the browser's plotly.js is drawing in the explorer's first figure, as JSON."""
    return page.evaluate(
        """(sel) => {
            const div = document.querySelector(sel + ' .js-plotly-plot');
            if (!div || !div.data) return null;
            return JSON.stringify(div.data.map(t => [t.type, t.x, t.y, t.marker && t.marker.color,
                                                       t.text, t.name]));
        }""",
        selector,
    )


def run_all_cells(page) -> None:
    """Run > Run All Cells through the menu bar, as a learner would."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def open_notebook(page, lab, name: str) -> None:
    # ?reset: a fresh workspace, so tabs of the notebooks opened before are not restored.
    page.goto(f"{lab['url']}/lab/tree/{name}?reset&token={lab['token']}")
    page.locator(".jp-NotebookPanel:visible .jp-Cell").first.wait_for()
    # A notebook without kernelspec metadata asks which kernel to start: take the default.
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    try:
        dialog.wait_for(timeout=3_000)
        dialog.locator("button", has_text="Select").click()
    except Exception:  # no dialog: the notebook names its kernel
        pass
    # The status bar reads "Python 3 (ipykernel) | Idle" once the kernel is up.
    page.locator(".jp-StatusBar-Widget", has_text="Idle").first.wait_for(timeout=120_000)


def explore(page, lab, case: ExplorerCase, tmp_path: Path) -> None:
    open_notebook(page, lab, case.notebook)
    run_all_cells(page)
    plot = page.locator(f"{case.selector} .js-plotly-plot").first
    plot.wait_for(state="visible", timeout=180_000)
    page.wait_for_function(
        """(sel) => { const d = document.querySelector(sel + ' .js-plotly-plot');
                      return d && d.data && d.data.length > 0; }""",
        arg=case.selector,
        timeout=60_000,
    )
    container = page.locator(case.selector).first
    container.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    before = _plot_data(page, case.selector)
    container.screenshot(path=str(tmp_path / f"before_{case.screenshot}"))

    # Keyboard: focus the first slider handle of the explorer and press ArrowRight.
    handle = page.locator(f"{case.selector} .widget-slider .noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")
    page.wait_for_function(
        """([sel, before]) => {
            const d = document.querySelector(sel + ' .js-plotly-plot');
            if (!d || !d.data) return false;
            const now = JSON.stringify(d.data.map(t => [t.type, t.x, t.y,
                t.marker && t.marker.color, t.text, t.name]));
            return now !== before;
        }""",
        arg=[case.selector, before],
        timeout=60_000,
    )
    after = _plot_data(page, case.selector)
    assert after is not None and after != before
    page.wait_for_timeout(500)
    shot = tmp_path / case.screenshot
    container.screenshot(path=str(shot))
    # What the learner sees changed too, not only the data behind it.
    assert shot.read_bytes() != (tmp_path / f"before_{case.screenshot}").read_bytes()
    if os.environ.get("INSTSEG_SAVE_SCREENSHOTS") == "1":
        out = ROOT / "docs" / "img"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / case.screenshot)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.notebook.split("_")[0])
def test_explorer_in_jupyterlab(page, lab, case, tmp_path):
    if not case.required and not (lab["root"] / case.notebook).exists():
        pytest.skip(f"{case.notebook} is not written yet")
    try:
        explore(page, lab, case, tmp_path)
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        raise
