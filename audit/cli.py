"""``python -m audit``: run an audit, compare two runs, validate a config.

Exit codes (stable, for scheduled jobs):

* 0 - the audit ran and no finding reached ``--fail-on``
* 1 - the audit ran and found something at or above ``--fail-on``
* 2 - usage or configuration error (nothing was run)
* 3 - runtime failure (model, data or service problem; see the log)

The last line printed is a one-line summary (or the error).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_PASS, EXIT_FINDINGS, EXIT_USAGE, EXIT_RUNTIME = 0, 1, 2, 3

logger = logging.getLogger("audit")


class _Parser(argparse.ArgumentParser):
    """argparse that exits with the usage code 2 and says how to get help."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _pair(text: str) -> list[int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; give one integer (6) or two (6,4)"
        ) from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or two integers")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m audit",
        description="Occlusion-based bias audits of an image classifier.",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )

    run = commands.add_parser(
        "run",
        help="audit a model over the slices of a dataset and write the report",
        description="Audit a model over the slices of a dataset. Flags override "
        "the config file. Exit 0 pass, 1 findings at or above --fail-on, "
        "2 usage/config error, 3 runtime failure.",
    )
    run.add_argument("--config", type=Path, help="YAML config file")
    run.add_argument(
        "--model", help="store tag, .keras file (default mnist_cnn:latest)"
    )
    run.add_argument("--endpoint", help="URL of a running Bento to audit over HTTP")
    run.add_argument("--auth-env", help="env var holding the endpoint's bearer token")
    run.add_argument("--manifest", type=Path, help="CSV/Parquet manifest of images")
    run.add_argument("--image-root", type=Path, help="folder the manifest paths are in")
    run.add_argument("--limit", type=int, help="audit only the first N images")
    run.add_argument("--every", type=int, help="audit every k-th image only")
    run.add_argument("--slices", help="comma-separated attribute columns to slice by")
    run.add_argument("--window", type=_pair, help="occlusion window, e.g. 6 or 6,6")
    run.add_argument("--stride", type=_pair, help="occlusion stride, e.g. 4 or 4,4")
    run.add_argument("--output", type=Path, help="output root (default runs/)")
    run.add_argument("--run-id", help="run folder name; reuse it to resume a run")
    run.add_argument(
        "--fail-on",
        choices=["low", "medium", "high", "never"],
        help="lowest finding severity that makes the exit code 1 (default high)",
    )
    run.add_argument("--seed", type=int, help="seed for resampling tests")
    run.add_argument("--chunk-size", type=int, help="images per chunk")
    run.add_argument(
        "--checkpoint-seconds",
        type=float,
        help="least time between checkpoints (default 30; 0 after every chunk)",
    )
    run.add_argument("--dask", help="Dask scheduler address, or 'local'")
    _add_verbosity(run)

    compare = commands.add_parser(
        "compare",
        help="show what changed between two runs",
        description="Compare two run folders: verdict, findings, slice metrics.",
    )
    compare.add_argument("run_a", type=Path)
    compare.add_argument("run_b", type=Path)
    compare.add_argument("--html", type=Path, help="also write the comparison as HTML")
    _add_verbosity(compare)

    validate = commands.add_parser(
        "validate-config",
        help="check a config file and print it with all defaults filled in",
        description="Validate a YAML config; exit 0 if valid, 2 if not.",
    )
    validate.add_argument("config", type=Path)
    _add_verbosity(validate)
    return parser


def _add_verbosity(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quiet", "-q", action="store_true", help="warnings only")
    group.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _overrides(args) -> dict:
    """The nested config keys the flags set."""
    out: dict = {}

    def put(path, value):
        if value is None:
            return
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    put("model", args.model)
    put("endpoint.url", args.endpoint)
    put("endpoint.auth_env", args.auth_env)
    if args.manifest is not None or args.image_root is not None:
        put("dataset.kind", "manifest")
    put("dataset.manifest", args.manifest and str(args.manifest))
    put("dataset.image_root", args.image_root and str(args.image_root))
    put("dataset.limit", args.limit)
    put("dataset.every", args.every)
    if args.slices is not None:
        put("slices.columns", [c.strip() for c in args.slices.split(",") if c.strip()])
    put("occlusion.window", args.window)
    put("occlusion.stride", args.stride)
    put("output", args.output and str(args.output))
    put("run_id", args.run_id)
    put("fail_on", args.fail_on)
    put("statistics.seed", args.seed)
    put("dask", args.dask)
    put("chunk_size", args.chunk_size)
    put("checkpoint_seconds", args.checkpoint_seconds)
    return out


def _configure_logging(args) -> None:
    level = (
        logging.WARNING
        if args.quiet
        else logging.DEBUG
        if args.verbose
        else logging.INFO
    )
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        for noisy in ("bentoml", "httpx", "distributed", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(args) -> int:
    from .config import ConfigError, load_config

    try:
        config = load_config(args.config, _overrides(args))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE

    from .checkpoint import RunLockedError
    from .findings import exit_code
    from .runner import SetupError, run_audit

    try:
        outcome = run_audit(config, quiet=args.quiet)
    except (RunLockedError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - the job's log gets the traceback
        logger.debug("run failed", exc_info=True)
        print(f"audit failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_RUNTIME

    results = outcome.results
    code = exit_code(results["findings"], config.fail_on)
    counts = results["counts"]
    print(
        f"verdict {results['verdict'].upper()}: {counts.get('high', 0)} high, "
        f"{counts.get('medium', 0)} medium, {counts.get('low', 0)} low findings; "
        f"{results['dataset']['n_audited']} images audited, "
        f"{results['dataset']['n_skipped']} skipped, "
        f"{len(results['slices'])} slices, {outcome.elapsed_seconds:.1f} s; "
        f"report {outcome.report_path}"
    )
    return code


def _compare(args) -> int:
    from .history import compare_runs, render_compare_text, write_compare_html

    for folder in (args.run_a, args.run_b):
        if not (folder / "results.json").is_file():
            print(
                f"error: {folder} has no results.json; is it a run folder?",
                file=sys.stderr,
            )
            return EXIT_USAGE
    diff = compare_runs(args.run_a, args.run_b)
    print(render_compare_text(diff))
    if args.html:
        write_compare_html(diff, args.html)
        print(f"comparison written to {args.html}")
    return EXIT_PASS


def _validate(args) -> int:
    import yaml

    from .config import ConfigError, config_dict, load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(yaml.safe_dump(config_dict(config), sort_keys=False), end="")
    print(f"{args.config}: valid")
    return EXIT_PASS


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    handlers = {"run": _run, "compare": _compare, "validate-config": _validate}
    return handlers[args.command](args)
