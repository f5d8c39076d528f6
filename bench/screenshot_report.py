"""Render a run's ``report.html`` in headless Chromium and save a PNG screenshot of it.

Usage: ``python bench/screenshot_report.py RUN_DIR OUT.png``. Writes the report first if the run
directory has none; Chromium runs with a fresh profile and its background networking off.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def screenshot(run_dir: Path, out: Path, width: int = 1200, height: int = 4000, timeout: float = 120) -> Path:
    """Save a `width`×`height` screenshot of the run's report to `out`; RuntimeError if Chromium fails."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("chromium is not on PATH (Debian: apt-get install chromium)")
    report = Path(run_dir).resolve() / "report.html"
    if not report.exists():
        from server.run_report import write_report

        write_report(report.parent)
    out = Path(out).resolve()
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="privet-chromium-") as profile:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out}",
                 f"--window-size={width},{height}"]
        done = subprocess.run([chromium, *flags, report.as_uri()], capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run directory, runs/<run-name>")
    parser.add_argument("out", type=Path, help="the PNG file to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args(argv)
    try:
        print(screenshot(args.run_dir, args.out, args.width, args.height))
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"screenshot_report: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
