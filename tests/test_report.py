"""The HTML report, results.json and maps.npz written by ``audit.report``."""

from __future__ import annotations

import base64
import copy
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from report_fixtures import HOSTILE, HOSTILE_CLASS, hostile_results, make_audit

from audit import figures
from audit.report import (
    MAPS_FILE,
    MAX_MAP_SLICES,
    REPORT_FILE,
    RESULTS_FILE,
    format_interval,
    format_p,
    format_time,
    render_html,
    to_json_safe,
    write_report,
)

SIZE_LIMIT = 5 * 1024 * 1024


class _Page(HTMLParser):
    """Tags, attributes and text of an HTML page, for structural checks."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]

    def ids(self) -> set[str]:
        return {attrs["id"] for _, attrs in self.tags if "id" in attrs}

    def plain_text(self) -> str:
        return " ".join(" ".join(self.text).split())


@pytest.fixture(scope="module")
def audit():
    """A realistic audit: 40 slices, 10 classes, 28x28 maps."""
    return make_audit()


@pytest.fixture(scope="module")
def small():
    """A 10-slice audit for tests that need no realistic size."""
    return make_audit(n_slices_hint=0, attributes=1, intersections=False)


@pytest.fixture(scope="module")
def html(audit):
    return render_html(*audit)


@pytest.fixture(scope="module")
def page(html):
    return _Page(html)


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_write_report_writes_results_maps_and_report(tmp_path, small):
    results, arrays = small

    path = write_report(tmp_path, results, arrays)

    assert path == tmp_path / REPORT_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [REPORT_FILE, RESULTS_FILE, MAPS_FILE]
    )
    written = _strict_json((tmp_path / RESULTS_FILE).read_text())
    assert written["verdict"] == "fail"
    assert [s["name"] for s in written["slices"]] == [
        s["name"] for s in results["slices"]
    ]
    with np.load(tmp_path / MAPS_FILE) as maps:
        assert maps["slice_maps"].shape == (10, 28, 28)
        assert maps["slice_class_maps"].shape == (10, 10, 28, 28)
        assert maps["example_images"].shape == (len(arrays["examples"]), 28, 28, 1)
        assert list(maps["slice_names"]) == [s["name"] for s in results["slices"]]
        np.testing.assert_allclose(maps["overall_map"], arrays["overall_map"])


def test_write_report_does_not_change_the_callers_results(tmp_path, small):
    results, arrays = small
    before = json.dumps(to_json_safe(results), sort_keys=True)

    write_report(tmp_path, results, arrays)

    assert "report" not in results
    assert json.dumps(to_json_safe(results), sort_keys=True) == before


def test_results_json_is_strict_with_null_for_nan(tmp_path):
    results, arrays = make_audit(n_slices_hint=0, attributes=1, intersections=False)
    results["slices"][0]["metrics"]["ece"]["value"] = float("nan")
    results["slices"][0]["metrics"]["ece"]["ci"] = [np.float32("nan"), math.inf]
    results["overall"]["metrics"]["accuracy"]["value"] = np.float64(0.97)

    write_report(tmp_path, results, arrays)

    text = (tmp_path / RESULTS_FILE).read_text()
    written = _strict_json(text)
    assert written["slices"][0]["metrics"]["ece"]["value"] is None
    assert written["slices"][0]["metrics"]["ece"]["ci"] == [None, None]
    assert written["overall"]["metrics"]["accuracy"]["value"] == 0.97


def test_results_json_holds_the_numbers_only_the_report_adds(tmp_path, small):
    results, arrays = small

    write_report(tmp_path, results, arrays)

    block = _strict_json((tmp_path / RESULTS_FILE).read_text())["report"]
    html = (tmp_path / REPORT_FILE).read_text()
    limit = block["colour_scale"]["max"]
    assert block["colour_scale"]["min"] == -limit
    assert f"±{limit:.3g}" in html
    assert len(block["examples"]) == len(arrays["examples"])
    for shown in block["examples"]:
        assert shown["id"] in html
        assert f"{shown['confidence'] * 100:.1f}%" in html
    assert block["maps_omitted"]["too_few"] == [
        "writer=f0000",
        "writer=f0001",
        "writer=f0002",
    ]


def test_invalid_arrays_raise_before_any_file_changes(tmp_path, small):
    results, arrays = small
    write_report(tmp_path, results, arrays)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = {**arrays, "slice_maps": arrays["slice_maps"][:-1]}

    with pytest.raises(ValueError, match=r"slice_maps.*\(9, 28, 28\).*10 slices"):
        write_report(tmp_path, results, broken)

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_example_without_a_field_is_refused_by_name(small):
    results, arrays = small
    example = {k: v for k, v in arrays["examples"][0].items() if k != "confidence"}

    with pytest.raises(ValueError, match=r"examples'\]\[0\] lacks \['confidence'\]"):
        render_html(results, {**arrays, "examples": [example]})


def test_rewriting_a_report_replaces_it_and_leaves_no_temporary_files(tmp_path, audit):
    results, arrays = audit
    write_report(tmp_path, results, arrays)
    changed = {**results, "verdict": "warn"}

    write_report(tmp_path, changed, arrays)

    assert _strict_json((tmp_path / RESULTS_FILE).read_text())["verdict"] == "warn"
    assert "Verdict: warn" in (tmp_path / REPORT_FILE).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [REPORT_FILE, RESULTS_FILE, MAPS_FILE]
    )


def test_report_loads_nothing_from_outside_the_file(page, html):
    csp = [
        m for m in page.all("meta") if m.get("http-equiv") == "Content-Security-Policy"
    ]

    assert len(csp) == 1
    assert "default-src 'none'" in csp[0]["content"]
    assert "img-src data:" in csp[0]["content"]
    assert page.all("script") == [] and page.all("link") == []
    assert page.all("img")
    assert all(img["src"].startswith("data:image/") for img in page.all("img"))
    assert all(a["href"].startswith("#") for a in page.all("a"))
    assert "url(" not in html and "@import" not in html


def test_report_is_accessible(page):
    assert page.all("html") == [{"lang": "en"}]
    assert all(img.get("alt", "").strip() for img in page.all("img"))
    headers = page.all("th")
    assert headers
    assert all(th.get("scope") in ("col", "row") for th in headers)


def test_verdict_and_counts_by_severity_come_first(page):
    sections = [s["id"] for s in page.all("section")]
    text = page.plain_text()

    assert sections[:3] == ["verdict", "findings", "writer-groups"]
    assert "Verdict: fail" in text
    for count in ("1 high", "2 medium", "2 low", "37 slices judged", "3 too few"):
        assert count in text


def test_every_finding_links_to_evidence_that_exists(page, audit):
    results, _ = audit
    links = {a["href"][1:] for a in page.all("a")}

    assert links <= page.ids()
    for finding in results["findings"]:
        index = [s["name"] for s in results["slices"]].index(finding["slice"])
        assert f"slice-{index}" in links
        assert f"maps-{index}" in links


def test_findings_show_statement_interval_and_corrected_p(page, audit):
    results, _ = audit
    text = page.plain_text()
    high = results["findings"][0]

    assert high["statement"] in text
    lo, hi = high["ci"]
    assert f"{lo * 100:+.1f} to {hi * 100:+.1f} pts" in text
    assert f"Corrected p {format_p(high['p_value'])}" in text


def test_slices_too_small_say_too_few_to_judge_with_their_n(page, audit):
    results, _ = audit
    text = page.plain_text()

    for s in results["slices"]:
        if s["status"] == "too_few":
            assert f"too few to judge (n = {s['n']})" in text
    assert "Not drawn: the 3 slices with too few images to judge" in text


def test_slice_table_has_every_metric_column(page):
    column_headers = [
        th for th in page.all("th") if th.get("scope") == "col" and th.get("title")
    ]
    titles = " ".join(th["title"] for th in column_headers)

    for words in (
        "classified correctly",
        "predicted class",
        "calibration",
        "fragility",
        "prediction changes",
        "strongest windows",
        "border region",
        "centre region",
    ):
        assert words in titles


def test_maps_share_one_colour_scale_with_a_colour_bar(page, audit):
    results, arrays = audit
    images = page.all("img")
    bars = [i for i in images if i["alt"].startswith("Colour scale shared")]
    n_judged = sum(s["status"] == "judged" for s in results["slices"])
    class_cells = [i for i in images if ", predicted class " in i["alt"]]
    overlays = [i for i in images if i["alt"].startswith("Attribution map over")]

    assert len(bars) == 1
    assert len([i for i in images if i["alt"].startswith("Difference map")]) == n_judged
    assert len(class_cells) == n_judged * 10
    assert len(overlays) == len(arrays["examples"])


def test_writer_group_section_only_when_writer_groups_exist(small):
    results, arrays = small
    keep = [
        i for i, s in enumerate(results["slices"]) if s["columns"] != ["writer_group"]
    ]
    without = {
        **results,
        "slices": [results["slices"][i] for i in keep],
        "findings": [
            f for f in results["findings"] if "writer_group=" not in f["slice"]
        ],
    }
    trimmed = {
        **arrays,
        "slice_maps": arrays["slice_maps"][keep],
        "rest_maps": arrays["rest_maps"][keep],
        "slice_class_maps": arrays["slice_class_maps"][keep],
    }

    page = _Page(render_html(without, trimmed))

    assert "writer-groups" not in page.ids()
    assert "Writer groups" in _Page(render_html(results, arrays)).plain_text()


def test_method_and_limitations_are_stated(page):
    text = page.plain_text()

    for fact in (
        "Window 6×6",
        "Stride 4×4",
        "Baseline constant 0",
        "Target predicted",
        "Output space probability",
        "Occlusion passes per image 50 (49 windows and the unoccluded image)",
        "Sensitivity, not cause.",
        "Resolution of one window.",
        "The baseline changes the maps.",
        "Correlated features.",
        "fewer than 50 images are not judged",
        "corrected for multiple comparisons (holm)",
    ):
        assert fact in text


def test_reproducibility_lists_model_data_config_seed_versions_and_time(page):
    text = page.plain_text()

    for fact in (
        "Tag mnist_cnn:q3n4yhbn7kxq2aav",
        "test_accuracy 0.9912",
        "Fingerprint sha256:5f1c0e4a9b7d2c3e",
        "Seed 0",
        "tensorflow 2.21.0",
        "Started 2026-12-03 16:15:00 UTC",
        "Duration 41.2 s",
        '"min_slice_size": 50',
    ):
        assert fact in text


def test_untrusted_text_is_escaped(small):
    results, arrays = hostile_results(*small)

    html = render_html(results, arrays)

    page = _Page(html)
    assert HOSTILE not in html and HOSTILE_CLASS not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert page.all("script") == []
    assert not any(k.startswith("on") for _, attrs in page.tags for k in attrs)
    assert HOSTILE in page.plain_text()


def test_realistic_audit_report_is_well_under_five_megabytes(html):
    size = len(html.encode("utf-8"))

    assert size < SIZE_LIMIT / 2, f"report is {size / 1e6:.2f} MB"


def test_large_images_and_many_slices_are_reduced_and_say_so():
    results, arrays = make_audit(
        n_slices_hint=65, shape=(72, 72), channels=3, writers_judged=True
    )

    html = render_html(results, arrays)

    text = _Page(html).plain_text()
    judged = sum(s["status"] == "judged" for s in results["slices"])
    assert len(html.encode("utf-8")) < SIZE_LIMIT
    assert f"{judged - MAX_MAP_SLICES} judged slices beyond the first" in text
    assert "block-averaged to 36×36 (2×2 blocks)" in text
    assert "block-averaged to 24×24" in text
    assert "further examples are in maps.npz only" in text


def test_rendering_is_deterministic(audit, html):
    assert render_html(*audit) == html


def test_report_without_findings_examples_or_judged_slices():
    results, arrays = make_audit(n_slices_hint=0, attributes=0, intersections=False)
    for s in results["slices"]:
        s["status"] = "too_few"
    results.update(findings=[], verdict="pass")
    results["counts"].update(high=0, medium=0, low=0)

    page = _Page(render_html(results, {**arrays, "examples": []}))

    text = page.plain_text()
    assert "Verdict: pass" in text
    assert "No finding" in text
    assert "nothing to chart" in text
    assert "No examples were recorded" in text


def test_colour_scale_is_symmetric_around_white_with_grey_for_nan():
    scale = figures.ColourScale(limit=2.0)

    rgb = scale.rgb(np.array([[-2.0, 0.0, 2.0, np.nan, 50.0]]))

    blue, white, red, grey, beyond = rgb[0]
    assert blue[2] > blue[0] and red[0] > red[2]
    assert white.min() > 240
    assert tuple(grey) == figures.NAN_RGB
    assert tuple(beyond) == tuple(red)


def test_colour_scale_limit_is_a_high_percentile_of_absolute_values():
    values = np.concatenate([np.linspace(-1, 1, 1001), [100.0]])

    scale = figures.ColourScale.from_maps([values[:500], values[500:]])

    assert 0.99 <= scale.limit < 1.5
    assert figures.ColourScale.from_maps([np.full(4, np.nan)]).limit == 1.0


def test_block_downsample_averages_blocks_by_hand():
    values = np.array(
        [
            [1.0, 3.0, 5.0],
            [5.0, 7.0, np.nan],
            [2.0, 2.0, 9.0],
        ]
    )

    small = figures.block_downsample(values, max_side=2)

    np.testing.assert_allclose(small, [[4.0, 5.0], [2.0, 9.0]])
    np.testing.assert_allclose(figures.block_downsample(values, 3), values)


def test_printed_numbers():
    assert format_p(0.00001) == "< 0.0001"
    assert format_p(0.01234) == "0.012"
    assert format_p(None) == "—"
    assert format_interval([0.961, 0.97], percent=True) == "96.1–97.0%"
    assert format_interval([-0.0123, 0.004], percent=False) == "-0.012 to 0.004"
    assert format_interval([float("nan"), 1.0], percent=False) == ""
    assert format_time("2026-12-03T17:15:00+01:00") == "2026-12-03 16:15:00 UTC"
    assert format_time("yesterday") == "yesterday"


def test_json_safe_turns_numpy_and_non_finite_values_plain():
    value = {
        "a": np.float32(0.5),
        "b": np.array([1, 2]),
        "c": (np.nan, -np.inf),
        1: Path("x"),
    }

    assert to_json_safe(value) == {"a": 0.5, "b": [1, 2], "c": [None, None], "1": "x"}


def test_inline_pictures_are_valid_png_and_svg(page):
    sources = [img["src"] for img in page.all("img")]
    png = [s for s in sources if s.startswith("data:image/png;base64,")]
    svg = [s for s in sources if s.startswith("data:image/svg+xml;base64,")]

    assert len(png) + len(svg) == len(sources)
    assert len(svg) == 3
    assert base64.b64decode(png[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = base64.b64decode(svg[0].split(",", 1)[1]).decode()
    assert "<svg" in decoded and not re.search(r"<script|href=\"http", decoded)


def test_minimal_results_render():
    arrays = {
        "overall_map": np.zeros((28, 28)),
        "slice_maps": np.zeros((0, 28, 28)),
        "rest_maps": np.zeros((0, 28, 28)),
        "slice_class_maps": np.zeros((0, 10, 28, 28)),
    }

    text = _Page(render_html({"slices": [], "findings": []}, arrays)).plain_text()

    assert "Verdict: unknown" in text
    assert "No finding" in text


def _judged_writer_slice(results: dict) -> dict:
    return next(
        s
        for s in results["slices"]
        if s["columns"] == ["writer_group"] and s["status"] == "judged"
    )


def test_min_slice_size_is_stated_when_the_config_has_default_slicing(small):
    results, arrays = small
    results = copy.deepcopy(results)
    results["config"]["slices"] = None
    del results["config"]["statistics"]["min_slice_size"]

    default = _Page(render_html(results, arrays)).plain_text()
    results["statistics"] = {"min_slice_size": 40}
    from_statistics = _Page(render_html(results, arrays)).plain_text()
    results["config"]["slices"] = {"min_slice_size": 25}
    from_config = _Page(render_html(results, arrays)).plain_text()

    assert "Slices with fewer than 30 images are not judged" in default
    assert "too few images to judge (fewer than 30)." in default
    assert "Slices with fewer than 40 images are not judged" in from_statistics
    assert "Slices with fewer than 25 images are not judged" in from_config
    for text in (default, from_statistics, from_config):
        assert "fewer than —" not in text


def test_report_states_the_family_size_and_marks_descriptive_p_values(small):
    results, arrays = small
    results = copy.deepcopy(results)
    results["statistics"] = {
        "correction": "holm",
        "family": "judged slices x metrics judged by a rule",
        "family_size": 120,
        "tested_metrics": ["accuracy", "map_distance"],
    }
    group = _judged_writer_slice(results)
    group["metrics"]["max_drop"]["p_adjusted"] = 0.62
    group["metrics"]["ece"]["p_adjusted"] = 1.0
    for s in results["slices"]:
        if s["columns"] == ["writer_group"]:
            s["metrics"]["accuracy"]["p_adjusted"] = 0.012
    before = json.dumps(to_json_safe(results), sort_keys=True)

    html = render_html(results, arrays)
    text = _Page(html).plain_text()
    start = html.index('id="writer-groups"')
    writer_section = _Page(html[start : html.index("</section>", start)])
    judged_groups = sum(
        s["columns"] == ["writer_group"] and s["status"] == "judged"
        for s in results["slices"]
    )

    assert json.dumps(to_json_safe(results), sort_keys=True) == before
    assert "120 tests were corrected for multiple comparisons (holm)" in text
    assert "the metrics a rule judges (Accuracy, Map distance)" in text
    assert "p-values, of metrics no rule judges, are descriptive" in text
    assert "p (descriptive) 0.62" in text
    assert "p (descriptive) 1" in text
    assert "p = 0.62" not in text
    assert "p = 0.012" in text
    assert writer_section.plain_text().count("p = ") == judged_groups
    assert writer_section.plain_text().count("p (descriptive)") == 3 * judged_groups


def test_finding_on_a_metric_outside_the_family_is_marked_descriptive(small):
    results, arrays = small
    results = copy.deepcopy(results)
    results["statistics"] = {"family_size": 12, "tested_metrics": ["ece"]}
    finding = results["findings"][0]

    text = _Page(render_html(results, arrays)).plain_text()

    assert finding["metric"] != "ece"
    assert f"Corrected p (descriptive) {format_p(finding['p_value'])}" in text


def test_forward_passes_are_broken_down_into_occlusion_and_curves(small):
    results, arrays = small
    results = copy.deepcopy(results)
    results["dataset"]["n_audited"] = 10_000
    results["method"].update(
        n_windows=49,
        forward_passes_per_image=50,
        faithfulness_steps=8,
        faithfulness_every=2,
        forward_passes_total=10_000 * 50 + 5_000 * 18,
    )

    text = _Page(render_html(results, arrays)).plain_text()

    assert "Occlusion passes per image 50 (49 windows and the unoccluded image)" in (
        text
    )
    assert (
        "Faithfulness passes per curve image 18 (deletion and insertion curves, "
        "9 points each, on one image in 2)"
    ) in text
    assert (
        "occlusion 500,000 (10,000 images × 50); "
        "faithfulness curves 90,000 (5,000 images × 18)"
    ) in text
    assert "Forward passes in all 590,000" in text
