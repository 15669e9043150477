"""A topology report of one or several training runs (`neuroprune report`): one self-contained HTML
page, the same figures as PNG files, and `stats.json` with every statistic behind them. The parts:
`report_runs` (reading and analysing runs), `report_stats`, `report_figures`, `report_html`."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from neuroprune.analysis.figures import render_figures
from neuroprune.analysis.html import render_html
from neuroprune.analysis.runs import DenseReference, analyse_run, run_names
from neuroprune.analysis.stats import plain, run_stats
from neuroprune.errors import ReportError
from neuroprune.files import write_bytes, write_json
from neuroprune.version import __version__


def build_report(run_dirs: list[str | Path], output: str | Path | None = None,
                 layer: str | None = None) -> Path:
    """Analyse the runs and write report.html, the PNGs and stats.json to `output` (default:
    RUN_DIR/report for one run, ./neuroprune-report for several). Returns the HTML path."""
    if not run_dirs:
        raise ReportError("give at least one run directory.")
    paths = [Path(p) for p in run_dirs]
    out = Path(output) if output is not None else (
        paths[0] / "report" if len(paths) == 1 else Path("neuroprune-report"))
    if out.exists() and not out.is_dir():
        raise ReportError(f"--output {out} exists and is not a folder.")
    cache: dict[str, DenseReference] = {}
    runs = [
        analyse_run(p, n, layer, cache)
        for p, n in tqdm(list(zip(paths, run_names(paths))), desc="analysing runs", unit="run")
    ]
    stats = [run_stats(r) for r in runs]
    figures = render_figures(runs)
    out.mkdir(parents=True, exist_ok=True)
    for fig in figures:
        write_bytes(out / fig.file, fig.png)
    payload = {"neuroprune_version": __version__, "runs": stats,
               "figures": {f.file: f.title for f in figures}}
    write_json(out / "stats.json", plain(payload), allow_nan=False, default=None)
    page = out / "report.html"
    write_bytes(page, render_html(runs, stats, figures).encode())
    return page
