"""`neuroprune report RUN_DIR [RUN_DIR ...]`: the topology report of one run, or of several runs
compared (self-contained HTML page, PNG figures and stats.json)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="HTML report of a run's topology: sparsity patterns, neuron degrees, heads removed",
        description=(
            "Write report.html (figures embedded, opens offline), the figures as PNG files and "
            "stats.json with every statistic, for one training run or several runs compared. "
            "A run directory is the --output-dir of `neuroprune train` (its model/ folder is "
            "required; run_config.json, metrics.json are used when present)."
        ),
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to report on")
    parser.add_argument(
        "--output", "-o", metavar="DIR",
        help="folder for the report (default: RUN_DIR/report for one run, ./neuroprune-report for several)",
    )
    parser.add_argument(
        "--layer", metavar="NAME",
        help="attention block whose head-similarity graph to draw (full module name or a unique part "
        "of it, e.g. 'layer.3.'); default: the block that lost most heads",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neuroprune.analysis.report import build_report

    page = build_report(args.run_dirs, args.output, args.layer)
    print(f"report written to {page} (figures and stats.json beside it)")
    return 0
