"""Open mpsearch reports in headless Chromium and check them as a reader would see them.

    python tools/check_report.py OUT/report.html [...] [--screenshots DIR] [--width 1400]

For each report: fails on a console error or uncaught exception, on any network request (the
report must be one offline file: only its own file:// URL and data:/blob: URLs may load), on a
plot that rendered nothing (a Plotly figure with no point, bar or heatmap cell drawn), on a Pareto
hover that does not show its trial and speed-up, and on a trials table that does not sort. With
--screenshots, saves DIR/<name>.png of the whole page at --width pixels (name: the report's
directory name, or --names). Prints one line per check; exit status 1 on any failure, 2 when no
browser is found (Debian's `chromium`, or set MPSEARCH_CHROMIUM).
Uses Playwright's Python API with the system browser (no browser download).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# what each plot drew: Plotly's scatter points, bars and heatmap images (SVG nodes it renders)
_DRAWN = """(id) => {
  const gd = document.getElementById(id);
  if (!gd || !gd.querySelector('.main-svg')) return {rendered: false, marks: 0, traces: 0};
  const marks = gd.querySelectorAll('.scatterlayer .point, .barlayer .point path, .heatmaplayer image').length;
  return {rendered: true, marks: marks, traces: (gd.data || []).length};
}"""


def find_browser() -> str | None:
    env = os.environ.get("MPSEARCH_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def check(page, report: Path, screenshot: Path | None) -> list[str]:
    """The failures of one report (empty: it passed)."""
    failures: list[str] = []
    own = report.resolve().as_uri()

    def on_request(request) -> None:
        if request.url != own and not request.url.startswith(("data:", "blob:")):
            failures.append(f"network request: {request.url}")

    def route(r) -> None:
        if r.request.url == own or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            r.abort()

    page.on("request", on_request)
    page.on("console", lambda m: failures.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: failures.append(f"uncaught exception: {e}"))
    page.route("**/*", route)
    page.goto(own, wait_until="load")
    ids = page.eval_on_selector_all(".plotly-graph-div", "els => els.map(e => e.id)")
    if not ids:
        failures.append("no plot in the page")
    page.wait_for_function("() => [...document.querySelectorAll('.plotly-graph-div')]"
                           ".every(g => g.querySelector('.main-svg'))", timeout=30_000)
    for plot_id in ids:
        drawn = page.evaluate(_DRAWN, plot_id)
        print(f"  {plot_id}: {drawn['traces']} traces, {drawn['marks']} marks drawn")
        if not drawn["rendered"] or drawn["marks"] == 0:
            failures.append(f"{plot_id} rendered empty ({drawn})")
    if "plot-pareto" in ids:  # the front's hover: its trial, latency and speed-up over FP32
        k = page.evaluate("() => document.getElementById('plot-pareto').data.filter(t => (t.xaxis || 'x') === 'x')"
                          ".findIndex(t => t.name === 'Pareto front')")
        point = page.locator(f"#plot-pareto .subplot.xy .scatterlayer .trace:nth-child({k + 1}) .point").first
        try:
            point.scroll_into_view_if_needed()
            box = point.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.wait_for_selector("#plot-pareto .hoverlayer .hovertext", timeout=5_000)
            text = page.eval_on_selector(
                "#plot-pareto .hoverlayer",
                "e => [...e.querySelectorAll('tspan.line')].map(t => t.textContent).join(' | ') || e.textContent")
        except Exception as e:  # noqa: BLE001 - a missing hover is what is reported
            text = f"(no hover: {type(e).__name__}: {str(e).splitlines()[0]})"
        print(f"  pareto hover: {text}")
        if "trial" not in text or "over FP32" not in text:
            failures.append(f"the Pareto front's hover lacks its trial or speed-up: {text!r}")
    col = page.eval_on_selector_all("#trials th", "ths => ths.map(t => t.textContent).indexOf('trial')")
    if col >= 0:  # sorting by trial, descending after two clicks
        page.click("#trials th >> nth=0")
        page.click("#trials th >> nth=0")
        nums = page.eval_on_selector_all("#trials tbody tr", "rs => rs.map(r => parseFloat(r.cells[0].textContent))")
        print(f"  trials table: {len(nums)} rows, sorted by trial: {nums[:5]}...")
        if nums != sorted(nums, reverse=True):
            failures.append(f"the trials table did not sort by trial: {nums}")
        page.click("#trials th >> nth=0")  # back to ascending for the screenshot
    else:
        failures.append("no trials table")
    if screenshot is not None:
        page.mouse.move(0, 0)
        page.wait_for_timeout(300)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        print(f"  screenshot: {screenshot}")
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--screenshots", type=Path, help="save DIR/<name>.png of each report")
    ap.add_argument("--names", help="comma-separated screenshot names, one per report")
    ap.add_argument("--width", type=int, default=1400)
    args = ap.parse_args(argv)
    browser_path = find_browser()
    if browser_path is None:
        print("check_report: no Chromium or Chrome found (apt install chromium, or set MPSEARCH_CHROMIUM)",
              file=sys.stderr)
        return 2
    names = args.names.split(",") if args.names else [r.resolve().parent.name for r in args.reports]
    if len(names) != len(args.reports):
        print("check_report: --names needs one name per report", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    failed = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            for report, name in zip(args.reports, names, strict=True):
                print(f"{report}:")
                page = browser.new_page(viewport={"width": args.width, "height": 900})
                shot = args.screenshots / f"{name}.png" if args.screenshots else None
                failures = check(page, report, shot)
                page.close()
                for f in failures:
                    print(f"  FAIL {f}")
                print(f"  {'FAILED' if failures else 'ok'}")
                failed += bool(failures)
        finally:
            browser.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
