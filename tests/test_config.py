"""Config files, flag overrides and the validate-config command."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit.cli import EXIT_PASS, EXIT_USAGE, main
from audit.config import AuditConfig, ConfigError, load_config
from audit.findings import default_rules

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nightly.yaml"


def test_example_config_is_valid_and_matches_the_defaults():
    config = load_config(EXAMPLE)
    defaults = AuditConfig()
    assert config.occlusion == defaults.occlusion
    assert config.statistics == defaults.statistics
    assert config.rules == default_rules()
    assert config.slices.columns == ["writer_group"]


def test_a_single_number_means_a_square_window(tmp_path):
    path = tmp_path / "square.yaml"
    path.write_text("occlusion:\n  window: 5\n  stride: 3\n")
    config = load_config(path)
    assert config.occlusion.window == (5, 5)
    assert config.occlusion.stride == (3, 3)


def test_flags_override_the_file(tmp_path):
    config = load_config(
        EXAMPLE, {"occlusion": {"window": [4, 4]}, "fail_on": "medium"}
    )
    assert config.occlusion.window == (4, 4)
    assert config.occlusion.stride == (4, 4)
    assert config.fail_on == "medium"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("occlusion:\n  windw: [3, 3]\n", "occlusion.windw"),
        ("occlusion:\n  window: [0, 3]\n", "occlusion.window.0"),
        ("fail_on: sometimes\n", "fail_on"),
        ("dataset:\n  kind: manifest\n", "dataset"),
        ("endpoint:\n  url: ftp://x\n", "ftp://x"),
        ("statistics:\n  correction: bonferroni\n", "statistics.correction"),
        ("run_id: ../../etc\n", "run_id"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("occlusion: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_key_and_value(tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert named in str(error.value)


def test_validate_config_command(tmp_path, capsys):
    assert main(["validate-config", str(EXAMPLE)]) == EXIT_PASS
    out = capsys.readouterr().out
    assert "window:" in out and out.rstrip().endswith("valid")

    bad = tmp_path / "bad.yaml"
    bad.write_text("seeed: 3\n")
    assert main(["validate-config", str(bad)]) == EXIT_USAGE
    assert "seeed" in capsys.readouterr().err

    assert main(["validate-config", str(tmp_path / "missing.yaml")]) == EXIT_USAGE


def test_every_subcommand_has_help(capsys):
    for command in ("run", "compare", "validate-config"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert "usage:" in capsys.readouterr().out
