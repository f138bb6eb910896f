"""The index of runs and the comparison of two runs (``audit.history``)."""

from __future__ import annotations

import copy
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_fixtures import HOSTILE, make_audit

from audit.history import (
    INDEX_FILE,
    compare_runs,
    list_runs,
    render_compare_text,
    update_index,
    write_compare_html,
)
from audit.report import REPORT_FILE, RESULTS_FILE, to_json_safe


class _Tags(HTMLParser):
    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]

    def plain_text(self) -> str:
        return " ".join(" ".join(self.text).split())


@pytest.fixture(scope="module")
def base_results():
    results, _ = make_audit(n_slices_hint=0, attributes=1, intersections=False)
    return results


def _run(root: Path, results: dict, day: int, **changes) -> Path:
    """A finished run folder for ``results`` started on December ``day``."""
    results = copy.deepcopy(results)
    run_id = f"202612{day:02d}-161500-mnist-test"
    results["run"].update(id=run_id, started_at=f"2026-12-{day:02d}T16:15:00+00:00")
    for key, value in changes.items():
        results[key] = value
    folder = root / run_id
    folder.mkdir(parents=True)
    text = json.dumps(to_json_safe(results), allow_nan=False)
    (folder / RESULTS_FILE).write_text(text)
    (folder / REPORT_FILE).write_text("<!DOCTYPE html><title>report</title>")
    return folder


def _with_overall_accuracy(results: dict, value: float) -> dict:
    overall = copy.deepcopy(results["overall"])
    overall["metrics"]["accuracy"]["value"] = value
    return overall


def _without_high_finding(results: dict) -> tuple[list, dict]:
    findings = [f for f in results["findings"] if f["severity"] != "high"]
    counts = {**results["counts"], "high": 0}
    return findings, counts


@pytest.fixture
def three_runs(tmp_path, base_results):
    findings, counts = _without_high_finding(base_results)
    _run(tmp_path, base_results, 1, overall=_with_overall_accuracy(base_results, 0.970))
    _run(tmp_path, base_results, 3, overall=_with_overall_accuracy(base_results, 0.972))
    _run(
        tmp_path,
        base_results,
        2,
        overall=_with_overall_accuracy(base_results, 0.975),
        verdict="warn",
        findings=findings,
        counts=counts,
    )
    return tmp_path


def test_list_runs_is_newest_first(three_runs):
    runs = list_runs(three_runs)

    assert [r.run_id[:8] for r in runs] == ["20261203", "20261202", "20261201"]
    assert {r.status for r in runs} == {"complete"}


def test_index_lists_runs_newest_first_with_verdict_counts_and_links(three_runs):
    path = update_index(three_runs)

    assert path == three_runs / INDEX_FILE
    page = _Tags(path.read_text())
    hrefs = [a["href"] for a in page.all("a")]
    assert hrefs == [
        "20261203-161500-mnist-test/report.html",
        "20261202-161500-mnist-test/report.html",
        "20261201-161500-mnist-test/report.html",
    ]
    text = page.plain_text()
    assert "fail" in text and "warn" in text
    assert "2026-12-02 16:15:00 UTC mnist-test" in text


def test_index_shows_the_change_since_the_previous_run(three_runs):
    text = _Tags(update_index(three_runs).read_text()).plain_text()

    assert "97.2% ▼ -0.3 pts" in text
    assert "97.5% ▲ +0.5 pts" in text
    assert "97.0%" in text


def test_index_has_a_trend_chart_per_key_metric(three_runs):
    page = _Tags(update_index(three_runs).read_text())

    charts = [i for i in page.all("img") if "over its last 3 runs" in i["alt"]]
    assert len(charts) == 5
    assert all(i["src"].startswith("data:image/svg+xml;base64,") for i in charts)
    assert any(
        "Accuracy of mnist-test" in i["alt"] and "97.2%" in i["alt"] for i in charts
    )


def test_index_lists_incomplete_and_unreadable_runs(three_runs):
    (three_runs / "20261204-running").mkdir()
    (three_runs / "broken").mkdir()
    (three_runs / "broken" / RESULTS_FILE).write_text("{not json")

    text = _Tags(update_index(three_runs).read_text()).plain_text()

    assert "20261204-running" in text and "incomplete: no results.json yet" in text
    assert "broken" in text and "unreadable:" in text


def test_index_is_self_contained_accessible_and_escaped(tmp_path, base_results):
    hostile = copy.deepcopy(base_results)
    hostile["dataset"]["name"] = HOSTILE
    hostile["model"]["tag"] = HOSTILE
    _run(tmp_path, hostile, 1)

    html = update_index(tmp_path).read_text()

    page = _Tags(html)
    assert HOSTILE not in html and "&lt;script&gt;" in html
    assert page.all("script") == []
    assert page.all("html") == [{"lang": "en"}]
    assert all(th.get("scope") in ("col", "row") for th in page.all("th"))
    assert all(img.get("alt") for img in page.all("img"))
    csp = [
        m for m in page.all("meta") if m.get("http-equiv") == "Content-Security-Policy"
    ]
    assert "default-src 'none'" in csp[0]["content"]


def test_index_of_an_empty_output_folder(tmp_path):
    text = _Tags(update_index(tmp_path / "runs").read_text()).plain_text()

    assert "No runs yet." in text


def test_index_links_quote_folder_names(tmp_path, base_results):
    folder = _run(tmp_path, base_results, 1)
    folder.rename(tmp_path / "run #1")

    page = _Tags(update_index(tmp_path).read_text())

    assert [a["href"] for a in page.all("a")] == ["run%20%231/report.html"]


def test_compare_reports_verdict_and_finding_changes(tmp_path, base_results):
    findings, counts = _without_high_finding(base_results)
    escalated = copy.deepcopy(findings)
    escalated[0]["severity"] = "high"
    new = {**copy.deepcopy(findings[0]), "slice": "writer=f0001", "severity": "low"}
    a = _run(tmp_path, base_results, 1)
    b = _run(
        tmp_path,
        base_results,
        2,
        verdict="fail",
        findings=[*escalated, new],
        counts=counts,
    )

    diff = compare_runs(a, b)

    assert diff["verdict"] == {"a": "fail", "b": "fail", "changed": False}
    assert [f["slice"] for f in diff["findings"]["appeared"]] == ["writer=f0001"]
    assert [f["severity"] for f in diff["findings"]["resolved"]] == ["high"]
    changed = diff["findings"]["changed"]
    assert [(c["slice"], c["a"]["severity"], c["b"]["severity"]) for c in changed] == [
        (escalated[0]["slice"], "medium", "high")
    ]
    assert diff["findings"]["unchanged"] == len(findings) - 1
    assert diff["counts"]["high"] == {"a": 1, "b": 0, "change": -1}


def test_compare_marks_metrics_whose_intervals_separate(tmp_path, base_results):
    moved = copy.deepcopy(base_results)
    students = moved["slices"][0]["metrics"]["accuracy"]
    students.update(value=0.990, ci=[0.985, 0.995])
    census = moved["slices"][1]["metrics"]["accuracy"]
    census.update(value=census["value"] + 0.001)
    moved["slices"][1]["metrics"]["accuracy"]["ci"] = [
        census["ci"][0] + 0.001,
        census["ci"][1] + 0.001,
    ]
    a = _run(tmp_path, base_results, 1)
    b = _run(tmp_path, moved, 2)

    diff = compare_runs(a, b)

    rows = {s["name"]: s for s in diff["slices"]}
    students_row = _metric(rows["writer_group=students"], "accuracy")
    census_row = _metric(rows["writer_group=census"], "accuracy")
    assert students_row["notable"] is True
    assert students_row["change"] == pytest.approx(0.990 - students_row["a"])
    assert census_row["notable"] is False


def test_compare_does_not_mark_slices_too_few_to_judge(tmp_path, base_results):
    moved = copy.deepcopy(base_results)
    small = next(s for s in moved["slices"] if s["status"] == "too_few")
    small["metrics"]["accuracy"]["value"] = 0.2
    a = _run(tmp_path, base_results, 1)
    b = _run(tmp_path, moved, 2)

    diff = compare_runs(a, b)

    row = next(s for s in diff["slices"] if s["name"] == small["name"])
    assert _metric(row, "accuracy")["notable"] is False
    assert _metric(row, "accuracy")["b"] == 0.2


def test_compare_lists_status_changes_and_slices_in_one_run_only(
    tmp_path, base_results
):
    moved = copy.deepcopy(base_results)
    grown = next(s for s in moved["slices"] if s["status"] == "too_few")
    grown.update(status="judged", n=80)
    moved["slices"] = [s for s in moved["slices"] if s["name"] != "thickness=q5"]
    moved["slices"].append({**copy.deepcopy(grown), "name": "writer=f9999"})
    a = _run(tmp_path, base_results, 1)
    b = _run(tmp_path, moved, 2)

    diff = compare_runs(a, b)

    row = next(s for s in diff["slices"] if s["name"] == grown["name"])
    assert row["status_changed"] and (row["status_a"], row["status_b"]) == (
        "too_few",
        "judged",
    )
    assert diff["slices_added"] == ["writer=f9999"]
    assert diff["slices_removed"] == ["thickness=q5"]
    text = render_compare_text(diff)
    assert f"{grown['name']}: too few to judge, n = " in text
    assert "judged, n = 80" in text
    assert "Slices only in A (1): thickness=q5" in text


def test_compare_warns_when_runs_are_not_comparable(tmp_path, base_results):
    other = copy.deepcopy(base_results)
    other["dataset"]["fingerprint"] = "sha256:other"
    other["method"]["window"] = [4, 4]
    a = _run(tmp_path, base_results, 1)
    b = _run(tmp_path, other, 2)

    warnings = compare_runs(a, b)["warnings"]

    assert any("dataset fingerprint differs" in w for w in warnings)
    assert any("occlusion settings differ" in w for w in warnings)
    assert compare_runs(a, a)["warnings"] == []


def test_compare_is_strict_json_and_accepts_results_paths(tmp_path, base_results):
    a = _run(tmp_path, base_results, 1)
    b = _run(tmp_path, base_results, 2)

    diff = compare_runs(a / RESULTS_FILE, b)

    json.dumps(diff, allow_nan=False)
    assert diff["a"]["id"] == "20261201-161500-mnist-test"
    assert diff["findings"]["appeared"] == diff["findings"]["resolved"] == []


def test_compare_of_a_folder_without_results_names_it(tmp_path, base_results):
    a = _run(tmp_path, base_results, 1)
    (tmp_path / "empty").mkdir()

    with pytest.raises(FileNotFoundError, match="empty has no results.json"):
        compare_runs(a, tmp_path / "empty")


def test_compare_text_puts_verdict_and_findings_first(tmp_path, base_results):
    findings, counts = _without_high_finding(base_results)
    a = _run(tmp_path, base_results, 1)
    b = _run(
        tmp_path, base_results, 2, verdict="warn", findings=findings, counts=counts
    )

    lines = render_compare_text(compare_runs(a, b)).splitlines()

    assert lines[0].startswith("A: 20261201-161500-mnist-test")
    assert "verdict FAIL" in lines[0] and "verdict WARN" in lines[1]
    assert lines[3] == "Verdict: fail -> warn (changed)"
    assert lines[4] == "Findings by severity: high 1 -> 0, medium 2 -> 2, low 0 -> 0"
    assert "Findings resolved (1):" in lines
    assert any(
        line.startswith("  - [high] writer_group=students accuracy") for line in lines
    )


def test_compare_html_is_written_escaped_and_accessible(tmp_path, base_results):
    hostile = copy.deepcopy(base_results)
    hostile["findings"][0]["slice"] = HOSTILE
    hostile["findings"][0]["statement"] = HOSTILE
    a = _run(tmp_path, base_results, 1)
    b = _run(tmp_path, hostile, 2)
    target = tmp_path / "out" / "compare.html"

    path = write_compare_html(compare_runs(a, b), target)

    html = path.read_text()
    page = _Tags(html)
    assert path == target
    assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert page.all("script") == []
    assert all(th.get("scope") in ("col", "row") for th in page.all("th"))
    assert "Appeared in B (1)" in page.plain_text()
    assert sorted(p.name for p in target.parent.iterdir()) == ["compare.html"]


def _metric(row: dict, key: str) -> dict:
    return next(m for m in row["metrics"] if m["metric"] == key)


def test_compare_ignores_settings_of_how_a_run_was_executed(tmp_path, base_results):
    resumed = copy.deepcopy(base_results)
    resumed["config"].update(
        run_id="resumed",
        output="/elsewhere",
        checkpoint_seconds=5.0,
        chunk_size=512,
        dask={"workers": 2},
    )
    resumed["method"]["forward_passes_total"] += 1234
    resumed["run"]["resumed"] = True
    a = _run(tmp_path, base_results, 1)
    b = _run(tmp_path, resumed, 2)

    assert compare_runs(a, b)["warnings"] == []


def test_compare_still_warns_when_settings_that_measure_differ(tmp_path, base_results):
    other = copy.deepcopy(base_results)
    other["config"]["seed"] = 7
    other["config"]["run_id"] = "other"
    a = _run(tmp_path, base_results, 1)
    b = _run(tmp_path, other, 2)

    assert compare_runs(a, b)["warnings"] == [
        "the configurations differ (rules, slices or statistics)"
    ]


def test_index_counts_runs_in_the_right_number(tmp_path, base_results):
    _run(tmp_path, base_results, 1)

    text = _Tags(update_index(tmp_path).read_text()).plain_text()

    assert "(1 run)" in text
    assert "1 run in" in text
    assert "1 runs" not in text
