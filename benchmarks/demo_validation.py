"""Choose the demo's NeuroPrune settings on its VALIDATION split (the test split is not even
written into these runs): one `train_run` per candidate on the demo's own movie-disjoint train /
validation files, FLOP target, penalties and learning rate as given; prints and writes
benchmarks/results/demo_validation.json (validation accuracy, FLOP fraction, compacted params)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from neuroprune.files import write_json
from neuroprune.training.demo import TRAINING, DemoSettings, settings_for, write_splits
from neuroprune.training.train import train_run

# name -> the TrainSettings values a candidate changes (on top of the demo's TRAINING; penalties
# and learning rate spelled out, so a later change of TRAINING does not change a candidate)
CANDIDATES: dict[str, dict] = {
    "dense": {"method": "dense"},
    "f50_a1e-3": {"target_flops": 0.5, "learning_rate": 2e-4, "alpha": 1e-3, "beta": 1e-3},
    "f50_a1e-3_lr1e-4": {"target_flops": 0.5, "learning_rate": 1e-4, "alpha": 1e-3, "beta": 1e-3},
    "f50_a1e-5": {"target_flops": 0.5, "learning_rate": 2e-4, "alpha": 1e-5, "beta": 1e-5},
    "f75_a1e-3": {"target_flops": 0.75, "learning_rate": 2e-4, "alpha": 1e-3, "beta": 1e-3},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="+", choices=sorted(CANDIDATES))
    parser.add_argument("--output-dir", default="runs/demo_validation")
    parser.add_argument("--out", default="benchmarks/results/demo_validation.json")
    args = parser.parse_args()
    d = DemoSettings(output_dir=args.output_dir)
    paths = {k: v for k, v in write_splits(d).items() if k != "test"}  # never the test split
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {}
    for name in args.names:
        values = dict(CANDIDATES[name])
        method = values.pop("method", "neuroprune")
        target = values.pop("target_flops", 1.0)
        d = DemoSettings(output_dir=f"{args.output_dir}/{name}", target_flops=target,
                         training={**TRAINING, **values})
        s = settings_for(d, method, paths)
        res = train_run(s, quiet=True)
        row = {"settings": {**TRAINING, **values, "method": method, "target_flops": s.target_flops},
               "validation_accuracy": res.metrics.get("eval_accuracy"),
               "flops_fraction": res.sparsity.get("flops_fraction"),
               "params_compacted": res.sparsity.get("params_compacted"),
               "heads_kept": res.sparsity.get("heads_kept"),
               "train_seconds": res.train_seconds, "load": os.getloadavg()}
        print(name, json.dumps(row), flush=True)
        done = json.loads(out.read_text()) if out.exists() else {}
        done[name] = row
        write_json(out, done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
