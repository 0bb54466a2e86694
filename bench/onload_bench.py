"""How long a participant waits for a component: navigation -> jatos.onLoad on the example study's
first component, in headless Chromium against jatos-lite on loopback (median of 20 runs, each a
new browser context and so a new study run).

Printed as medians: from the navigation's start (the study link, its redirect and the
component's HTML included) and from the component HTML's arrival, each to jatos.onLoad.
`--latency MS` makes Chromium delay every request by MS (its network emulation), as a lab's
Wi-Fi would; on loopback the round trips cost little next to the two shared cores' noise."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import API_TOKEN, start_jatos_lite

import jatos_lite

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

# Notes when jatos.onLoad callbacks run: the study's own are registered while the page parses,
# this one at DOMContentLoaded, so both run in the same turn (or this one at once, if later).
ONLOAD_PROBE = """
document.addEventListener("DOMContentLoaded", function () {
  jatos.onLoad(function () {
    var html = performance.getEntriesByType("navigation")[0];
    window.onLoadTimes = { fromNavigation: performance.now(), fromHtml: performance.now() - html.responseEnd };
  });
});
"""


def example_link(root: Path) -> str:
    """Install the example study into a fresh data folder and return a General Multiple code."""
    config = jatos_lite.Config(studies=root / "studies", data=root / "data", api_token=API_TOKEN)
    store = jatos_lite.Store(config.db_path)
    try:
        jatos_lite.install_example_study(store, config)
        with store.tx() as db:
            study = db.one("SELECT * FROM studies WHERE uuid = ?", jatos_lite.EXAMPLE_STUDY["uuid"])
            return jatos_lite.study_links_for(db, jatos_lite.default_batch(db, study["id"]), "GeneralMultiple")[0]
    finally:
        store.close()


def measure(browser, base: str, code: str, latency: float) -> dict:
    context = browser.new_context()
    try:
        context.add_init_script(ONLOAD_PROBE)
        page = context.new_page()
        if latency:
            cdp = context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": latency,
                                                          "downloadThroughput": -1, "uploadThroughput": -1})
        page.goto(f"{base}/publix/{code}")
        page.wait_for_function("window.onLoadTimes !== undefined", timeout=30_000)
        return page.evaluate("window.onLoadTimes")
    finally:
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0, help="added to every request, in ms")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
        code = example_link(Path(folder))
        server, port = start_jatos_lite(Path(folder), 16)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            measure(browser, f"http://127.0.0.1:{port}", code, args.latency)  # warm-up, not counted
            times = [measure(browser, f"http://127.0.0.1:{port}", code, args.latency) for _ in range(args.runs)]
        finally:
            browser.close()
            server.terminate()
            server.wait()
    for key in ("fromNavigation", "fromHtml"):
        values = [t[key] for t in times]
        print(f"{key:15} median {statistics.median(values):6.1f} ms   "
              f"min {min(values):6.1f}   max {max(values):6.1f}   ({len(values)} runs)")


if __name__ == "__main__":
    main()
