"""The CLI end to end on a small real MNIST sample with a small trained model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audit.cli import EXIT_RUNTIME, EXIT_USAGE, main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("id", "started_at", "finished_at", "duration_seconds", "resumed")


@pytest.fixture(scope="module")
def model_file(small_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "small.keras"
    small_model.save(path)
    return path


def _run_args(model_file, output, run_id, *extra):
    return [
        "run",
        "--model",
        str(model_file),
        "--every",
        "25",
        "--output",
        str(output),
        "--run-id",
        run_id,
        "--fail-on",
        "never",
        "--chunk-size",
        "50",
        "--checkpoint-seconds",
        "0",
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(model_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    code = main(_run_args(model_file, output, "first"))
    return code, output / "first"


def test_run_writes_report_and_results(finished_run):
    code, run_dir = finished_run
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["schema_version"] == 1
    assert results["verdict"] in ("pass", "warn", "fail")
    assert results["dataset"]["n_images"] == 400
    assert results["dataset"]["n_audited"] == 400
    assert results["method"]["n_windows"] == 49
    assert results["method"]["forward_passes_per_image"] == 50
    by_name = {s["name"]: s for s in results["slices"]}
    students, census = by_name["writer_group=students"], by_name["writer_group=census"]
    assert students["n"] == census["n"] == 200
    accuracy = students["metrics"]["accuracy"]
    low, high = accuracy["ci"]
    assert 0.0 <= low <= accuracy["value"] <= high <= 1.0

    html = (run_dir / "report.html").read_text()
    assert "writer_group=students" in html and "writer_group=census" in html
    assert "data:image/png;base64," in html
    assert "http://" not in html.replace("http://www.w3.org", "")
    assert not (run_dir / "checkpoint").exists()
    assert (run_dir.parent / "index.html").is_file()


def test_usage_and_config_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as bad_flag:
        main(["run", "--window", "six"])
    assert bad_flag.value.code == EXIT_USAGE

    config = tmp_path / "bad.yaml"
    config.write_text("occlusion:\n  windw: [3, 3]\n")
    assert main(["run", "--config", str(config)]) == EXIT_USAGE
    assert "occlusion.windw" in capsys.readouterr().err


def test_missing_model_is_a_runtime_failure(tmp_path, capsys):
    code = main(
        ["run", "--model", str(tmp_path / "nope.keras"), "--output", str(tmp_path)]
    )
    assert code == EXIT_RUNTIME
    assert "nope.keras" in capsys.readouterr().err


def _strip_timing(results):
    results = dict(results)
    results["run"] = {k: v for k, v in results["run"].items() if k not in TIMING_KEYS}
    results["config"] = {
        k: v for k, v in results["config"].items() if k not in ("run_id", "output")
    }
    return results


def test_killed_run_resumes_to_the_same_results(model_file, finished_run, tmp_path):
    _, reference_dir = finished_run
    command = [
        sys.executable,
        "-m",
        "audit",
        *_run_args(model_file, tmp_path, "resumable"),
    ]
    env = dict(os.environ)
    progress = tmp_path / "resumable" / "checkpoint" / "progress.json"
    first = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text())["done"]) >= 2:
            break
        time.sleep(0.02)
    assert first.poll() is None, "the run finished before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    done_before = len(json.loads(progress.read_text())["done"])
    assert 2 <= done_before < 8

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    resumed = json.loads((tmp_path / "resumable" / "results.json").read_text())
    assert resumed["run"]["resumed"] is True
    reference = json.loads((reference_dir / "results.json").read_text())
    assert _strip_timing(resumed) == _strip_timing(reference)


def test_compare_two_runs_in_the_terminal_and_as_html(finished_run, capsys, tmp_path):
    _, run_dir = finished_run
    html = tmp_path / "compare.html"
    assert main(["compare", str(run_dir), str(run_dir), "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert run_dir.name in out
    assert html.read_text().startswith("<!DOCTYPE html>")

    assert main(["compare", str(run_dir), str(tmp_path)]) == EXIT_USAGE
    assert "no results.json" in capsys.readouterr().err


def test_a_second_job_on_the_same_run_folder_is_refused(model_file, tmp_path, capsys):
    from audit.checkpoint import run_lock

    with run_lock(tmp_path / "busy"):
        code = main(_run_args(model_file, tmp_path, "busy"))
    assert code == EXIT_USAGE
    assert "being written by another audit job" in capsys.readouterr().err


def test_manifest_run_counts_skipped_images(model_file, mnist_test_dataset, tmp_path):
    import numpy as np
    import pandas as pd
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    loaded = mnist_test_dataset.load(np.arange(60))
    rows = []
    for i, image in zip(loaded.rows, loaded.images, strict=True):
        name = f"{i}.png"
        Image.fromarray((image[..., 0] * 255).round().astype("uint8")).save(root / name)
        site = "north" if i % 2 else "south"
        rows.append(
            {"path": name, "label": int(mnist_test_dataset.labels[i]), "site": site}
        )
    rows.append({"path": "gone.png", "label": 3, "site": "north"})
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rows.append({"path": "broken.png", "label": 4, "site": "south"})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)

    code = main(
        [
            "run",
            "--model",
            str(model_file),
            "--manifest",
            str(manifest),
            "--image-root",
            str(root),
            "--slices",
            "site",
            "--output",
            str(tmp_path / "runs"),
            "--run-id",
            "manifest",
            "--fail-on",
            "never",
            "--quiet",
        ]
    )
    assert code == 0
    run_dir = tmp_path / "runs" / "manifest"
    results = json.loads((run_dir / "results.json").read_text())
    dataset = results["dataset"]
    assert (dataset["n_images"], dataset["n_audited"], dataset["n_skipped"]) == (
        62,
        60,
        2,
    )
    reasons = {s["id"]: s["reason"] for s in dataset["skips"]}
    assert "missing" in reasons["gone.png"] and "unreadable" in reasons["broken.png"]
    assert {s["name"]: s["n"] for s in results["slices"]} == {
        "site=north": 30,
        "site=south": 30,
    }
    html = (run_dir / "report.html").read_text()
    assert "gone.png" in html


def test_named_region_masks_from_the_config(model_file, tmp_path):
    import numpy as np

    mask = np.zeros((28, 28), bool)
    mask[:14, :14] = True
    np.save(tmp_path / "upper_left.npy", mask)
    config = tmp_path / "audit.yaml"
    config.write_text(
        f"regions:\n  upper_left: {tmp_path / 'upper_left.npy'}\n"
        "rules:\n  - {name: tl, metric: region_share.upper_left, min_gap: 0.5}\n"
    )
    args = _run_args(model_file, tmp_path, "regions", "--config", str(config))
    assert main([*args, "--limit", "4"]) == 0
    results = json.loads((tmp_path / "regions" / "results.json").read_text())
    share = results["overall"]["metrics"]["region_share.upper_left"]["value"]
    quadrant = results["overall"]["metrics"]["region_share.top_left"]
    assert 0.0 <= share <= 1.0
    assert share == pytest.approx(quadrant["value"], abs=1e-9)


@pytest.mark.parametrize("output", ["log_probability", "logit"])
def test_other_output_spaces_run_end_to_end(model_file, tmp_path, output):
    config = tmp_path / "audit.yaml"
    config.write_text(f"occlusion:\n  output: {output}\n  baseline: blur\n")
    args = _run_args(model_file, tmp_path, output, "--config", str(config))
    assert main([*args, "--limit", "40"]) == 0
    results = json.loads((tmp_path / output / "results.json").read_text())
    assert results["method"]["output"] == output
    assert results["method"]["baseline"] == "blur"
    assert results["dataset"]["n_audited"] == 40


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--window", "40"], "no larger than the image"),
        (["--slices", "nosuch"], "nosuch"),
    ],
)
def test_unusable_settings_exit_2_and_leave_no_run_folder(
    model_file, tmp_path, capsys, extra, words
):
    assert main([*_run_args(model_file, tmp_path, "bad"), *extra]) == EXIT_USAGE
    assert words in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_finished_run_is_not_overwritten(finished_run, model_file, capsys):
    _, run_dir = finished_run
    before = (run_dir / "results.json").read_bytes()
    args = _run_args(model_file, run_dir.parent, run_dir.name)
    assert main([*args, "--limit", "10"]) == EXIT_USAGE
    assert "holds a finished run" in capsys.readouterr().err
    assert (run_dir / "results.json").read_bytes() == before


def test_dataset_mean_baseline(model_file, tmp_path):
    config = tmp_path / "audit.yaml"
    config.write_text("occlusion:\n  baseline: dataset_mean\n")
    args = _run_args(model_file, tmp_path, "mean", "--config", str(config))
    assert main([*args, "--limit", "40"]) == 0
    results = json.loads((tmp_path / "mean" / "results.json").read_text())
    assert results["method"]["baseline"] == "dataset_mean"
    assert results["dataset"]["n_audited"] == 40


def test_mean_image_is_the_average_of_loadable_images():
    import numpy as np

    from audit.datasets import array_dataset
    from audit.runner import mean_image

    images = np.stack([np.full((2, 3, 1), v, np.float32) for v in (0.2, 0.4, np.nan)])
    dataset = array_dataset("tiny", images, [0, 1, 0], ["a", "b"])
    np.testing.assert_allclose(mean_image(dataset), np.full((2, 3, 1), 0.3), rtol=1e-6)


def test_execution_settings_do_not_block_a_resume(mnist_test_dataset):
    from types import SimpleNamespace

    from audit.config import load_config
    from audit.runner import run_fingerprint

    backend = SimpleNamespace(description={"tag": "m:1"})
    base = load_config(overrides={"checkpoint_seconds": 30, "output": "a"})
    other = load_config(overrides={"checkpoint_seconds": 0, "output": "b"})
    changed = load_config(overrides={"chunk_size": 100})
    fingerprint = run_fingerprint(base, mnist_test_dataset, backend)
    assert run_fingerprint(other, mnist_test_dataset, backend) == fingerprint
    assert run_fingerprint(changed, mnist_test_dataset, backend) != fingerprint
