"""The run report, built from a fake run directory: sections, embedded plots, the Markdown twin and a browser render."""

import base64
import html
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from common.privacy import NOISE_RNG_NOTE
from server.run_report import write_report

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["card", "loan", "mortgage"]
SITES = ["site-a", "site-b", "site-c"]
DECLINE = "site-b would reach ε=9.100 over its cap of 8 <policy>"
SECTIONS = [
    "Overview", "Global metrics per round", "Per-site metrics", "Fairness across sites", "Privacy budget (ε) per site",
    "What each ε bought", "Report of the final adapter", "Declined, rejected and failed sites",
    "Transparency for the privacy officer", "Empirical privacy audit", "Configuration",
]
PNG = b"\x89PNG\r\n\x1a\n"


def site_row(site, rnd, declined=False):
    score = 0.3 + 0.1 * rnd + 0.05 * SITES.index(site)
    trained = rnd - 1 if site == "site-b" and rnd == 3 else rnd  # site-b skips round 2: ε 2.0 per round trained
    row = {"site": site, "examples": 100, "epsilon": 2.0 * trained, "status": "trained",
           "accuracy": score + 0.1, "macro_f1": score, "eval_examples": 20}
    if declined:
        row.update(examples=0, epsilon=None, status="declined", reason=DECLINE)
    return row


def make_run(path, *, final=True, ledgers=True):
    """A finished 3-round, 3-site run in which site-b declines round 2."""
    path.mkdir(parents=True)
    config = {"run-name": path.name, "num-server-rounds": 3, "aggregation": "ffa-lora", "dp": True,
              "target-epsilon": 8.0, "delta": 1e-5, "accountant": "prv", "model": "tiny"}
    (path / "state.json").write_text(json.dumps({"last_round": 3, "config": config}))
    rows = []
    for rnd in (1, 2, 3):
        sites = [site_row(s, rnd, declined=(s == "site-b" and rnd == 2)) for s in SITES]
        rows.append({"round": rnd, "accuracy": 0.4 + 0.1 * rnd, "macro_f1": 0.3 + 0.1 * rnd,
                     "global_source": "server-test-split", "aggregated_sites": 2 if rnd == 2 else 3,
                     "sites": sites, "seconds": 12.5, "time": "2026-01-01T00:00:00+00:00"})
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (path / "final").mkdir()
    info = {"labels": LABELS, "model": "tiny", "model_sha256": "ab" * 32}
    (path / "final" / "privet.json").write_text(json.dumps(info))
    if final:
        scores = {"precision": 0.5, "recall": 0.6, "f1-score": 0.55}
        per_class = {name: {**scores, "support": 10} for name in LABELS}
        per_class.update({"accuracy": 0.7, "macro avg": {**scores, "support": 30}})
        (path / "final_evaluation.json").write_text(
            json.dumps({"accuracy": 0.7, "macro_f1": 0.55, "test_examples": 30, "per_class": per_class}))
    if ledgers:
        for site in SITES:
            rounds = [1, 3] if site == "site-b" else [1, 2, 3]
            ledger = {"format": "privet-ledger/1", "site": site, "accountant": "prv", "delta": 1e-5,
                      "history": [[1.1, 0.1, 10 * len(rounds)]], "epsilon": 2.0 * len(rounds), "non_private_rounds": 0,
                      "rounds": [{"run": path.name, "round": r, "epsilon": 2.0 * r} for r in rounds]}
            (path / "sites" / site).mkdir(parents=True)
            (path / "sites" / site / "ledger.json").write_text(json.dumps(ledger))
    return path


class Page(HTMLParser):
    """Collects headings, image sources and table cells, and fails on mismatched tags."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.headings, self.images, self.cells, self._text = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)
        if tag in {"h2", "td", "th"}:
            self._text = ""

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"mismatched </{tag}>"
        if tag == "h2":
            self.headings.append(self._text)
        elif tag in {"td", "th"}:
            self.cells.append(self._text)

    def handle_data(self, data):
        if self._text is not None:
            self._text += data


def parse(html_path):
    page = Page()
    page.feed(html_path.read_text(encoding="utf-8"))
    page.close()
    assert page.stack == []
    return page


@pytest.fixture()
def report(tmp_path):
    run = make_run(tmp_path / "runs" / "demo")
    html_path, md_path = write_report(run)
    return run, html_path, md_path


def test_html_has_every_section_and_four_embedded_png_plots(report):
    run, html_path, _ = report
    assert html_path == run / "report.html"
    page = parse(html_path)
    assert page.headings == SECTIONS
    assert len(page.images) == 4
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix):], validate=True).startswith(PNG)
    text = html_path.read_text(encoding="utf-8")
    assert not re.search(r"<(script|link)\b|src=\"(?!data:)|https?://", text), "the report must fetch nothing"


def test_tables_show_each_site_the_decline_and_the_final_report(report):
    _, html_path, _ = report
    page = parse(html_path)
    for site in SITES:
        assert page.cells.count(site) >= 3  # per-site table, ε table, guarantee table
    assert DECLINE in page.cells  # the reason, escaped in the HTML and intact once parsed
    assert "&lt;policy&gt;" in html_path.read_text(encoding="utf-8")
    assert "declined" in page.cells
    assert all(name in page.cells for name in [*LABELS, "macro avg"])
    assert "ab" * 32 in html_path.read_text(encoding="utf-8")
    assert "ffa-lora" in page.cells  # configuration table


def test_a_round_with_fewer_than_three_sites_is_said_to_be_without_robustness(report):
    _, html_path, md_path = report
    for text in (html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")):
        assert "Fewer than 3 sites contributed in round(s) 2" in text
        assert "robustness needs an honest majority of at least 3" in text


def test_transparency_states_what_left_and_what_is_not_covered(report):
    _, html_path, md_path = report
    for text in (html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")):
        section = text[text.index("Transparency for the privacy officer"):]
        assert NOISE_RNG_NOTE in html.unescape(section)
        assert "per person" in section and "several records" in section
        assert "LoRA A is frozen" in section  # ffa-lora: only B and the head leave the site
        assert "prv" in section and "1e-05" in section


def test_markdown_has_every_section_and_references_existing_pngs(report):
    run, _, md_path = report
    text = md_path.read_text(encoding="utf-8")
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == SECTIONS
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 4
    for name in images:
        assert (run / name).read_bytes().startswith(PNG)
    # A backslash keeps "<" from opening raw HTML; an entity would show literally in a Markdown viewer's code spans.
    assert DECLINE.replace("<", "\\<") in text and "&lt;" not in text


def test_works_without_final_evaluation_or_ledgers(tmp_path):
    run = make_run(tmp_path / "runs" / "bare", final=False, ledgers=False)
    html_path, md_path = write_report(run)
    page = parse(html_path)
    assert page.headings == SECTIONS
    assert len(page.images) == 4
    text = html_path.read_text(encoding="utf-8")
    assert "final_evaluation.json is absent" in text
    assert "reported by the site" in text
    # Without a ledger the last ε a site reported stands, with the run config's accountant and δ marked as such.
    row = "| site-b | 4.000 | prv (run config) | 1e-05 (run config) | reported by the site"
    assert row in md_path.read_text(encoding="utf-8")


def test_central_dp_is_reported_when_the_server_added_noise(tmp_path):
    run = make_run(tmp_path / "runs" / "central")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["central_dp"] = {"epsilon": 3.25, "delta": 0.001, "releases": 3}
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = write_report(run)[1].read_text(encoding="utf-8")
    assert "site-level (ε, δ) = (3.250, 0.001) after 3 release(s)" in text


def test_rounds_past_the_last_confirmed_one_are_left_out(tmp_path):
    run = make_run(tmp_path / "runs" / "crashed")
    state = json.loads((run / "state.json").read_text())
    (run / "state.json").write_text(json.dumps({**state, "last_round": 2}))
    text = write_report(run)[1].read_text(encoding="utf-8")
    assert "2 of 3 planned rounds trained" in text


def test_rounds_in_which_no_site_trained_are_not_called_completed(tmp_path):
    """Nodes that all declined (e.g. SuperNodes without a site policy) leave a run that trained nothing."""
    run = make_run(tmp_path / "runs" / "declined")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["sites"] = [site_row(site, row["round"], declined=True) for site in SITES]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = write_report(run)[1].read_text(encoding="utf-8")
    assert "NO SITE TRAINED in any of the 3 round(s)" in text and "completed" not in text.split("##")[2]


def test_regenerating_overwrites_cleanly(report):
    run, html_path, _ = report
    first = html_path.read_bytes()
    assert write_report(run)[0].read_bytes() == first
    assert not list(run.glob(".*.tmp"))


def test_screenshot_script_renders_the_report(report, tmp_path):
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium); the browser render is not checked")
    run, _, _ = report
    out = tmp_path / "shot.png"
    subprocess.run([sys.executable, str(ROOT / "bench" / "screenshot_report.py"), str(run), str(out)],
                   check=True, timeout=180, capture_output=True)
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 50_000


def test_the_report_shows_the_utility_curve_and_an_audit_found_in_the_run(tmp_path):
    run = make_run(tmp_path / "runs" / "audited")
    (run / "audit.json").write_text(json.dumps({
        "format": "privet-audit/1", "site": "site-a", "canaries": 1000, "canaries_included": 497, "guesses": 100,
        "right": 52, "confidence": 0.95, "delta": 1e-5, "epsilon_lower_bound": 0.0, "epsilon_ceiling": 3.465,
        "claimed_epsilon": 7.84, "verdict": "inconclusive at this size", "explanation": "no violation seen",
        "wall_seconds": 508.0}))
    _, md_path = write_report(run)
    text = md_path.read_text(encoding="utf-8")
    audit = text[text.index("## Empirical privacy audit"):]
    assert "INCONCLUSIVE AT THIS SIZE" in audit and "3.465" in audit and "7.840" in audit
    utility = text[text.index("## What each ε bought"):text.index("## Report of the final adapter")]
    # Round 3: the highest ε any site had spent is 6.0 (site-c), and the global macro-F1 was 0.6.
    assert "| 3 | 6.000 | 0.600 |" in utility
