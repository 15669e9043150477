"""`neuroprune export --onnx OUT.onnx MODEL`: write a (compacted) encoder as ONNX, checked against
PyTorch in onnxruntime."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a (compacted) encoder to ONNX, checked in onnxruntime",
        description=(
            "Export MODEL (a folder written by save_pretrained or `neuroprune compact`, or a run "
            "directory: its compact/ folder if present, else model/) to ONNX with dynamic batch and "
            "sequence axes, then run it in onnxruntime and compare with PyTorch."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="model folder or run directory")
    parser.add_argument("--onnx", required=True, metavar="FILE", help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted difference (default 1e-4)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neuroprune.integrations.export import export_onnx
    from neuroprune.model.index import load
    from neuroprune.run_folder import RunDir

    folder = RunDir(args.model).deployable_model_dir()
    result = export_onnx(load(folder), args.onnx, opset=args.opset, check=not args.no_check, atol=args.atol)
    diff = result.max_abs_diff
    check = "" if diff is None else f"; onnxruntime matches PyTorch within {diff:.1e}"
    print(f"wrote {result.path} ({result.output_name}) from {folder}{check}")
    return 0
