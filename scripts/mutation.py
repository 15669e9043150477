#!/usr/bin/env python
"""Mutation testing of neuroprune's core modules with mutmut (run by hand, not in CI).

    .venv/bin/pip install -e ".[mutation]"
    .venv/bin/python scripts/mutation.py              # fresh run, 2 workers, OMP_NUM_THREADS=1
    .venv/bin/python scripts/mutation.py --keep       # reuse .mutation/ (mutmut re-tests changed code only)
    .venv/bin/python scripts/mutation.py --only 'neuroprune.methods.heads.*'   # a subset of mutants (glob)
    .venv/bin/python scripts/mutation.py --report-only  # rewrite the results from .mutation/
    .venv/bin/python scripts/mutation.py --only 'neuroprune.model.units.*' \
        --merge 9cb518a:benchmarks/results/mutation.json   # add an earlier run's other modules

What it does: copies `src/`, `tests/` and `pyproject.toml` of a commit (HEAD unless `--rev` or
`--worktree`) into `.mutation/` (a snapshot: edits to the working tree do not leak in), adds a
`[tool.mutmut]` section built from the lists below to that copy, runs `mutmut run` there, and
writes the outcome of every mutant, the score and the diff of every survivor to
`benchmarks/results/mutation.{json,md}`.

mutmut 3 copies the sources to `.mutation/mutants/src` and puts that folder first on `sys.path`, so
the tests import the mutated copy, not the editable install (`/work/main/src` stays on the path, but
behind it). Two checks guard that: mutmut's own forced-fail run (every test must fail when the
trampolines are told to raise), and ours after the run, which plants an obvious bug by hand in the
copy and requires the test subset to fail on it (recorded as `planted_mutant_check`).

`--merge [REV:]PATH` folds an earlier results JSON into the report: every module of it that this run
did not score keeps its earlier verdicts, labelled per module with the run (commit, date) that
produced them and whether the module's source changed since (`changed_since`); a module this run
scored takes this run's verdicts. Every module also records whether its source differs at the HEAD
the report was written at (`changed_by_head`): the score is that of the scored commit. Modules
scored by no run are named as not scored.

Survivors argued equivalent live in `scripts/mutation.equivalents.json`, matched by function and
by the changed source lines (not by mutant number, which shifts when the code above changes); the
arguments themselves are in docs/testing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# --- the one place to change when the core modules move (paths relative to the repository root) ---
CORE_MODULES = [
    "src/neuroprune/methods/penalties.py",  # first: planted_mutant_check plants its bug here
    "src/neuroprune/methods/heads.py",
    "src/neuroprune/methods/steering.py",
    "src/neuroprune/methods/penalty.py",
    "src/neuroprune/methods/neuroprune.py",
    "src/neuroprune/model/units.py",
    "src/neuroprune/model/surgery.py",
    "src/neuroprune/model/index.py",
    "src/neuroprune/model/structure.py",
    "src/neuroprune/model/sparsity.py",
    "src/neuroprune/compaction.py",
]

# The fast, unit-level tests that exercise them (no Trainer / CLI / crash tests: too slow per mutant).
TESTS = [
    "tests/test_penalties.py",
    "tests/test_heads.py",
    "tests/test_compaction.py",
    "tests/test_controller.py",
    "tests/test_sparsity.py",
    "tests/test_properties.py",
    "tests/test_architectures.py",
    "tests/test_exactness.py",
    "tests/test_hand_computed.py",
    "tests/test_mutation_kills.py",
    "tests/test_mutation_kills_penalty.py",
    "tests/test_mutation_kills_neuroprune.py",
    "tests/test_baselines.py",
    "tests/test_checkpoint.py",
    "tests/test_flops.py",
    "tests/test_uniform.py",
    "tests/test_structural.py",
    "tests/test_structured.py",
    "tests/test_activation_scores.py",
]
# Left out of the subset: it re-imports neuroprune in a fresh interpreter, which loads the unmutated
# editable install (it can never kill a mutant) and costs ~4 s per mutant of compaction.py.
DESELECT = [
    "tests/test_compaction.py::test_reload_in_a_fresh_process_gives_the_same_outputs",
    # whole `neuroprune train` runs (seconds each): they reach nearly every function, so every
    # surviving mutant would pay for them; the unit tests of the same files stay selected
    "tests/test_baselines.py::test_cli_method_and_target_recorded",
    "tests/test_baselines.py::test_every_method_saves_its_own_config_and_its_run_loads_evaluates_compacts_reports",
    "tests/test_structural.py::test_train_run_and_cli_land_within_two_points",
    "tests/test_structural.py::test_head_removal_fires_on_pretrained_minilm_at_default_settings",
    "tests/test_structured.py::test_cli_run_lands_on_the_target_and_records_it",
    "tests/test_uniform.py::test_cli_uniform_saves_a_stock_folder",
]

# Lines (regular expressions; mutmut skips the whole statement starting there) left unmutated:
# `raise` statements, whose only mutable parts are the error messages' text (that an error is
# raised is still tested: the `if` conditions guarding each raise are mutated).
DO_NOT_MUTATE = [r"^\s*raise "]

WORK = ROOT / ".mutation"
RESULTS = ROOT / "benchmarks" / "results"
EQUIVALENTS = ROOT / "scripts" / "mutation.equivalents.json"
KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def check_modules() -> None:
    missing = [m for m in CORE_MODULES if not (WORK / m).exists()]
    if missing:
        raise SystemExit(f"core modules not found (update CORE_MODULES in {__file__}): {missing}")


def tests_present() -> list[str]:
    return [t for t in TESTS if (WORK / t).exists()]


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(keep: bool, rev: str | None, overlay: list[str]) -> None:
    """Snapshot src/, tests/ and pyproject.toml (of commit `rev`, or of the working tree when
    None) into WORK, put the working tree's `overlay` files over it, add the mutmut settings."""
    if WORK.exists() and not keep:
        shutil.rmtree(WORK)
    WORK.mkdir(exist_ok=True)
    for folder in ("src", "tests"):
        if (WORK / folder).exists():
            shutil.rmtree(WORK / folder)
    if rev is None:
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
        for folder in ("src", "tests"):
            shutil.copytree(ROOT / folder, WORK / folder, ignore=ignore)
        shutil.copy(ROOT / "pyproject.toml", WORK / "pyproject.toml")
    else:
        archive = subprocess.run(
            ["git", "archive", rev, "src", "tests", "pyproject.toml"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(WORK)], input=archive, check=True)
    for item in overlay:  # PATH (working tree) or REV:PATH
        rev_of, _, path = item.rpartition(":")
        (WORK / path).parent.mkdir(parents=True, exist_ok=True)
        if rev_of:
            shown = subprocess.run(["git", "show", item], cwd=ROOT, capture_output=True, check=True).stdout
            (WORK / path).write_bytes(shown)
        else:
            shutil.copy(ROOT / path, WORK / path)
    pyproject = (WORK / "pyproject.toml").read_text()
    pyproject = re.sub(r"(?ms)^\[tool\.mutmut\].*?(?=^\[|\Z)", "", pyproject)  # ours wins
    check_modules()
    for module in CORE_MODULES:
        path = WORK / module
        path.write_text(undecorate(path.read_text()))
    selection = tests_present() + [f"--deselect={d}" for d in DESELECT]
    pyproject += (
        "\n[tool.mutmut]\n"
        f"source_paths = {toml_list(sorted({str(Path(m).parts[0]) for m in CORE_MODULES}))}\n"
        f"only_mutate = {toml_list(CORE_MODULES)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(selection)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider"]\n'
        "use_git_change_detection = false\n"
        f"do_not_mutate_patterns = {toml_list(DO_NOT_MUTATE)}\n"
    )
    (WORK / "pyproject.toml").write_text(pyproject)


def undecorate(source: str) -> str:
    """mutmut 3 leaves every decorated function alone except @staticmethod / @classmethod, which
    would skip `row_degree`, `keep_groups`, `compact_mlp`, ... So the snapshot (never the
    repository) gets equivalent undecorated forms: `@torch.no_grad() def f(): body` becomes
    `def f(): with torch.no_grad(): body`, and `@property def p(self)` becomes
    `def prop_p(self)` followed by `p = property(prop_p)`."""
    import libcst as cst
    import libcst.matchers as m

    no_grad = m.Decorator(decorator=m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("no_grad"))))
    prop = m.Decorator(decorator=m.Name("property"))

    class Undecorate(cst.CSTTransformer):
        def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):  # noqa: N802
            if len(updated.decorators) != 1:
                return updated
            if m.matches(updated.decorators[0], no_grad):
                statements = list(updated.body.body)
                docstring = statements[:1] if updated.get_docstring() is not None else []
                inner = cst.IndentedBlock(body=statements[len(docstring):])
                guard = cst.With(items=[cst.WithItem(cst.parse_expression("torch.no_grad()"))], body=inner)
                return updated.with_changes(decorators=[], body=cst.IndentedBlock(body=[*docstring, guard]))
            if m.matches(updated.decorators[0], prop):
                name = updated.name.value
                getter = updated.with_changes(decorators=[], name=cst.Name(f"prop_{name}"))
                return cst.FlattenSentinel([getter, cst.parse_statement(f"{name} = property(prop_{name})\n")])
            return updated

    return cst.parse_module(source).visit(Undecorate()).code


def env() -> dict[str, str]:
    e = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        e[var] = "1"
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e.setdefault("HF_HUB_OFFLINE", "1")
    return e


def mutmut(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mutmut", *args]
    return subprocess.run(cmd, cwd=WORK, env=env(), check=check, text=True, capture_output=capture)


def planted_mutant_check() -> str:
    """Plant an obvious bug (the group penalty returns 0) by hand in the mutated copy (every
    variant of the function) and require the test subset, importing that copy the way mutmut's
    workers do, to fail on it: a score means nothing if the tests import the unmutated package."""
    src = WORK / "mutants" / CORE_MODULES[0]
    text = src.read_text()
    marker = "return torch.sqrt(group_l1 + tiny).sum()"
    if marker not in text:
        raise SystemExit(f"cannot find the line to plant a bug in ({marker!r} in {src}); update the check")
    src.write_text(text.replace(marker, "return 0.0 * torch.sqrt(group_l1 + tiny).sum()"))
    code = (
        "import sys, pytest; from pathlib import Path;"
        "sys.path.insert(0, str(Path('mutants/src').absolute()));"
        "sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path('src').resolve()];"
        "import neuroprune.methods.penalties as m; print('imported', m.__file__);"
        "assert '/mutants/' in m.__file__;"
        "sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', *sys.argv[1:]]))"
    )
    try:
        run = subprocess.run(
            [sys.executable, "-c", code, *tests_present(), *[f"--deselect={d}" for d in DESELECT]],
            cwd=WORK, env=env(), text=True, capture_output=True,
        )
    finally:
        src.write_text(text)
    print("\n".join(run.stdout.splitlines()[-3:]))
    if run.returncode != 1:
        raise SystemExit(f"planted mutant NOT killed (pytest exit code {run.returncode}): the score is void")
    print("planted mutant killed: the tests import the mutated copy")
    return f"killed ({marker!r} -> 0.0 * ..., in {CORE_MODULES[0]})"


def load_results() -> dict[str, dict]:
    from mutmut.stats import status_by_exit_code

    out = {}
    for meta in sorted((WORK / "mutants").rglob("*.meta")):
        data = json.loads(meta.read_text())
        for name, code in data["exit_code_by_key"].items():
            out[name] = {
                "status": status_by_exit_code[code],
                "exit_code": code,
                "duration_s": round(data["durations_by_key"].get(name, 0.0), 3),
            }
    return out


def mutant_diff(name: str) -> str:
    shown = mutmut("show", name, capture=True, check=False).stdout
    return "\n".join(line for line in shown.splitlines() if not line.startswith("# ")).strip()


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    old = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    new = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return old, new


def function_of(name: str) -> str:
    """`neuroprune.methods.heads.x_find_dominating__mutmut_7` -> `...heads.find_dominating`;
    methods: `model.units.xǁAttentionUnitǁkeep_groups__mutmut_3` -> `..AttentionUnit.keep_groups`."""
    module, _, mangled = name.rpartition(".")
    mangled = re.sub(r"__mutmut_\d+$", "", mangled)
    mangled = mangled[2:] if mangled.startswith("x_") else mangled
    if mangled.startswith("xǁ"):
        mangled = ".".join(p for p in mangled[2:].split("ǁ") if p)
    return f"{module}.{mangled}"


def equivalence(name: str, diff: str, known: list[dict]) -> dict | None:
    old, new = changed_lines(diff)
    for entry in known:
        if entry["function"] == function_of(name) and entry["old"] == old and entry["new"] == new:
            return entry
    return None


def git_commit(rev: str) -> str:
    run = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, text=True, capture_output=True)
    return run.stdout.strip()


def module_of(name: str) -> str:
    """`neuroprune.model.units.xǁAttentionUnitǁkeep_groups__mutmut_3` -> `neuroprune.model.units`."""
    return name.split(".x")[0]


def module_path(module: str) -> str:
    return "src/" + module.replace(".", "/") + ".py"


def load_merged(item: str) -> dict:
    """An earlier results JSON: a file, or `REV:PATH` read from git (the committed results)."""
    if Path(item).exists():
        return json.loads(Path(item).read_text())
    shown = subprocess.run(["git", "show", item], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"--merge {item}: neither a file nor a committed REV:PATH ({shown.stderr.strip()})")
    return json.loads(shown.stdout)


def source_changed(module: str, old_commit: str, new_commit: str) -> bool:
    """Whether the module's source differs between the commit an earlier run mutated and this one."""
    run = subprocess.run(
        ["git", "diff", "--quiet", old_commit, new_commit, "--", module_path(module)], cwd=ROOT
    )
    return run.returncode != 0


def merge_earlier(
    results: dict[str, dict], merge: list[str], this_run: dict
) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict]]:
    """Add the outcomes of earlier runs' modules that this run did not score. Returns the combined
    outcomes, the stored diffs of the merged survivors (their mutants are not in .mutation/), and
    the provenance of every module (which run, commit and date scored it)."""
    provenance = {m: dict(this_run) for m in sorted({module_of(n) for n in results})}
    combined = dict(results)
    diffs: dict[str, dict] = {}
    for item in merge:
        earlier = load_merged(item)
        earlier_prov = earlier.get("provenance", {})
        new_modules = sorted({module_of(n) for n in earlier["outcomes"]} - set(provenance))
        for module in new_modules:
            prov = earlier_prov.get(module) or {
                "run": earlier.get("source", f"commit {earlier['git_commit']}"),
                "git_commit": earlier["git_commit"],
                "date": earlier["date"],
                "wall_s": earlier.get("wall_s"),
            }
            prov = {**prov, "merged_from": item}
            prov["changed_since"] = source_changed(module, prov["git_commit"], this_run["git_commit"])
            provenance[module] = prov
        for name, outcome in earlier["outcomes"].items():
            if module_of(name) in new_modules:
                combined[name] = {k: v for k, v in outcome.items() if k != "equivalent"}
        for sv in earlier.get("survivors", []):
            if module_of(sv["name"]) in new_modules:
                diffs[sv["name"]] = sv
    head = git_commit("HEAD")  # the score describes the scored commit's source, not later edits
    for module, prov in provenance.items():
        prov["changed_by_head"] = source_changed(module, prov["git_commit"], head)
    return combined, diffs, provenance


def write_results(
    results: dict[str, dict],
    wall_s: float,
    args: argparse.Namespace,
    planted: str,
    merged_diffs: dict[str, dict] | None = None,
    provenance: dict[str, dict] | None = None,
) -> dict:
    known = json.loads(EQUIVALENTS.read_text()) if EQUIVALENTS.exists() else []
    merged_diffs = merged_diffs or {}
    survivors = []
    for name, r in results.items():
        if r["status"] in KILLED:
            continue
        diff = merged_diffs[name]["diff"] if name in merged_diffs else mutant_diff(name)
        eq = equivalence(name, diff, known)
        r["equivalent"] = eq is not None
        survivors.append(
            {
                "name": name,
                "function": function_of(name),
                "status": r["status"],
                "equivalent": eq is not None,
                "reason": eq["reason"] if eq else None,
                "diff": diff,
            }
        )
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    equivalent = sum(s["equivalent"] for s in survivors)
    killed = sum(counts.get(s, 0) for s in KILLED)
    non_equivalent = len(results) - equivalent
    per_module: dict[str, dict[str, int]] = {}
    for name, r in results.items():
        mod = per_module.setdefault(module_of(name), {"mutants": 0, "killed": 0, "equivalent": 0})
        mod["mutants"] += 1
        mod["killed"] += r["status"] in KILLED
        mod["equivalent"] += bool(r.get("equivalent"))
    summary = {
        "tool": f"mutmut {mutmut_version()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(args.rev),
        "source": "working tree" if args.worktree else f"commit {git_commit(args.rev)}"
        + (f" + {', '.join(args.overlay)}" if args.overlay else ""),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "settings": {
            "modules": CORE_MODULES,
            "tests": tests_present(),
            "deselected": DESELECT,
            "not_mutated": DO_NOT_MUTATE,
            "max_children": args.max_children,
            "only": args.only,
            "merged": args.merge,
            "modules_not_run": args.not_run,
            "threads": "OMP_NUM_THREADS=MKL_NUM_THREADS=OPENBLAS_NUM_THREADS=1",
        },
        "note": args.note,
        "planted_mutant_check": planted,
        "wall_s": round(wall_s, 1),
        "mutants": len(results),
        "counts": counts,
        "killed": killed,
        "equivalent": equivalent,
        "survived_non_equivalent": non_equivalent - killed,
        "score_non_equivalent": round(killed / non_equivalent, 4) if non_equivalent else None,
        "score_raw": round(killed / len(results), 4) if results else None,
        "per_module": per_module,
        "provenance": provenance or {},
        "survivors": survivors,
        "outcomes": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mutation.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    (RESULTS / "mutation.md").write_text(markdown(summary))
    return summary


def markdown(s: dict) -> str:
    lines = [
        "# Mutation testing of the core modules",
        "",
        f"{s['tool']}, {s['date']}, {s['source']}, {s['machine']['platform']}, "
        f"Python {s['machine']['python']}, {s['machine']['cpus']} CPUs; "
        f"{s['settings']['max_children']} workers, {s['settings']['threads']}; "
        f"wall time {s['wall_s']:.0f} s.",
        "",
        f"Modules: {', '.join('`' + m + '`' for m in s['settings']['modules'])}.",
        f"Tests: {', '.join('`' + t + '`' for t in s['settings']['tests'])} "
        f"(deselected: {', '.join('`' + d + '`' for d in s['settings']['deselected'])}).",
        only_line(s["settings"]["only"]),
        f"Note: {s['note']}" if s.get("note") else "",
        f"**Modules whose mutants were not run: {', '.join(s['settings']['modules_not_run'])}** (not scored)."
        if s["settings"]["modules_not_run"] else "",
        "",
        f"**{s['mutants']} mutants: {s['killed']} killed (timeouts included), {s['equivalent']} equivalent, "
        f"{s['survived_non_equivalent']} non-equivalent not killed. Score over non-equivalent mutants: "
        f"{s['score_non_equivalent']:.1%}** (raw killed / all: {s['score_raw']:.1%}).",
        "",
        "| outcome | mutants |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(s["counts"].items())],
        "",
        "| module | mutants | killed | equivalent | scored by |",
        "|---|---|---|---|---|",
        *[
            f"| {m} | {v['mutants']} | {v['killed']} | {v['equivalent']} | {scored_by(s, m)} |"
            for m, v in sorted(s["per_module"].items())
        ],
        "",
        "## Not killed",
        "",
    ]
    for sv in s["survivors"]:
        verdict = f"equivalent: {sv['reason']}" if sv["equivalent"] else "**NOT KILLED**"
        lines += [f"### `{sv['name']}` ({sv['status']})", "", verdict, "", "```diff", sv["diff"], "```", ""]
    return "\n".join(lines) + "\n"


def only_line(only: list[str] | None) -> str:
    if not only:
        return "All their mutants."
    if len(only) > 12:  # a re-run of named survivors: the names are in the JSON
        return f"Mutants run (last call): {len(only)} named mutants (listed in `settings.only` of the JSON)."
    return f"Mutants run (last call): `{only}`."


def scored_by(s: dict, module: str) -> str:
    prov = s.get("provenance", {}).get(module)
    if not prov:
        return "this run"
    text = f"commit {prov['git_commit'][:7]}, {prov['date'][:16]}"
    if "merged_from" in prov:
        text += f" (merged from `{prov['merged_from']}`"
        text += "; **source changed since**)" if prov.get("changed_since") else "; source unchanged since)"
    if prov.get("changed_by_head"):
        text += "; **source changed by today's HEAD**"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-children", type=int, default=2, help="mutmut worker processes (default 2)")
    parser.add_argument("--rev", default="HEAD", help="commit whose src/, tests/ are used (HEAD)")
    parser.add_argument("--worktree", action="store_true", help="test the working tree instead of --rev")
    parser.add_argument(
        "--overlay", action="append", default=[], metavar="[REV:]PATH",
        help="file (of the working tree, or of commit REV) put over the snapshot, e.g. a new test file",
    )
    parser.add_argument("--keep", action="store_true", help="reuse .mutation/ and its earlier results")
    parser.add_argument(
        "--only", action="append", help="glob over mutant names, e.g. 'neuroprune.methods.heads.*'"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from .mutation/")
    parser.add_argument("--note", default="", help="free text kept with the results (e.g. earlier passes)")
    parser.add_argument(
        "--merge", action="append", default=[], metavar="[REV:]PATH",
        help="earlier results JSON whose modules this run did not score are added (labelled per module)",
    )
    args = parser.parse_args()
    start = time.monotonic()
    snapshot = WORK / "snapshot.json"  # what the last run mutated, for --report-only
    if not args.report_only:
        args.rev = git_commit(args.rev)  # the commit snapshotted now (HEAD may move while it runs)
        prepare(args.keep, None if args.worktree else args.rev, args.overlay)
        mutmut("run", f"--max-children={args.max_children}", *(args.only or []))
        wall = time.monotonic() - start
        last = {k: getattr(args, k) for k in ("rev", "worktree", "overlay", "only", "max_children")}
        snapshot.write_text(json.dumps({**last, "wall_s": round(wall, 1)}, indent=1) + "\n")
    elif snapshot.exists():  # report on the run that filled .mutation/, not on today's HEAD
        last = json.loads(snapshot.read_text())
        for key in ("rev", "worktree", "overlay", "max_children"):
            setattr(args, key, last[key])
        args.only = args.only or last["only"]
        wall = last["wall_s"]
    else:
        wall = 0.0
    planted = planted_mutant_check()
    results = load_results()
    # mutants never run (outside `--only` in this and every kept earlier run) are not scored
    unchecked = {n for n, r in results.items() if r["status"] == "not checked"}
    results = {n: r for n, r in results.items() if n not in unchecked}
    this_run = {
        "run": "this run" + (f" (--only {' '.join(args.only)})" if args.only and len(args.only) <= 12
                             else f" (--only: {len(args.only)} named mutants)" if args.only else ""),
        "git_commit": git_commit(args.rev),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(wall, 1),
    }
    results, merged_diffs, provenance = merge_earlier(results, args.merge, this_run)
    args.not_run = sorted({module_of(n) for n in unchecked} - {module_of(n) for n in results})
    s = write_results(results, wall, args, planted, merged_diffs, provenance)
    print(
        f"{s['mutants']} mutants: {s['killed']} killed, {s['equivalent']} equivalent, "
        f"{s['survived_non_equivalent']} not killed; score {s['score_non_equivalent']:.1%} "
        f"-> {RESULTS / 'mutation.md'}"
    )


if __name__ == "__main__":
    main()
