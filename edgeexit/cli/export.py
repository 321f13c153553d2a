"""`edgeexit export MODEL --out NAME.edgeexit`: trace once, cut into segments, write and validate a bundle."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeexit.bundle import Bundle


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a multi-exit PyTorch model to a bundle of per-segment ONNX (and TFLite) files",
        description="Trace the model once with torch.export (dynamic batch), cut it at split points that no skip "
                    "connection crosses, write one ONNX file per segment (plus TFLite with --formats), and "
                    "validate every exit against torch in onnxruntime at batch 1 and 5. forward(x) must return "
                    "a tuple or list of exit logits, shallowest first.",
    )
    p.add_argument("model", nargs="?", help="a .pt2 (torch.export), a TorchScript archive, or a torch.save'd "
                                            "module (needs --trust-pickle); omit with --model/--weights")
    p.add_argument("--out", required=True, help="bundle directory to write, e.g. model.edgeexit")
    p.add_argument("--input-shape", help="e.g. 1,1,28,28 (required unless MODEL is a .pt2)")
    p.add_argument("--split-points", default="auto", choices=["auto", "exits"],
                   help="auto: exit branch points + stage boundaries; exits: one cut per early exit (auto)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18)")
    p.add_argument("--formats", default="onnx", help="comma list: onnx[,tflite] (onnx)")
    p.add_argument("--quantize", default="", help="TFLite variants besides fp32: fp16,int8-dynamic,int8-static")
    p.add_argument("--calibration-data", help="dataset name (e.g. fashion-mnist) or .npz with array x: raw [0,1] "
                                              "inputs for int8 boundary parameters and validation")
    p.add_argument("--calibration-samples", type=int, default=1000, help="samples used for calibration (1000)")
    p.add_argument("--model", dest="factory", metavar="PKG.MOD:FACTORY",
                   help="build the model by calling this factory (with --weights)")
    p.add_argument("--weights", help="state_dict for --model, loaded with weights_only=True and strict=True")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow MODEL to be a pickled whole module (unpickling runs code from the file)")
    p.add_argument("--normalize", help="MEAN,..:STD,.. applied by the runtime to raw [0,1] inputs")
    p.add_argument("--name", help="model name in the manifest (default: --out without .edgeexit)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--verbose", action="store_true",
                   help="also show what torch, litert and the converters print (FutureWarnings, op counts ...)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgeexit.errors import ConfigError
    from edgeexit.logs import native_output_hidden

    if not args.model and not args.factory:
        raise ConfigError("give a MODEL file, or --model pkg.mod:factory --weights state_dict.pt")
    # Third-party noise (torch/litert FutureWarnings, converter op counts, delegate banners) only with --verbose.
    with native_output_hidden(not args.verbose):
        bundle = _export(args)
    m = bundle.manifest
    print(f"{bundle.root}: {len(m.segments)} segments, {len(m.exits)} exits, formats {bundle.formats}")
    for seg in m.segments:
        print(f"  segment {seg.index}: exits {seg.exits}, {seg.flops / 1e6:.2f} MFLOPs, {seg.param_bytes} param bytes")
    return 0


def _export(args: argparse.Namespace) -> Bundle:
    from edgeexit.exporters.options import ExportOptions, parse_list, parse_normalize, parse_shape

    opts = ExportOptions(
        input_shape=parse_shape(args.input_shape) if args.input_shape else None,
        split_points=args.split_points, opset=args.opset, formats=parse_list(args.formats),
        quantize=parse_list(args.quantize), calibration_data=args.calibration_data,
        calibration_samples=args.calibration_samples, factory=args.factory, weights=args.weights,
        trust_pickle=args.trust_pickle, normalize=parse_normalize(args.normalize) if args.normalize else None,
        name=args.name, force=args.force, progress=not args.quiet,
    )
    opts.check()
    from edgeexit.exporters import export_model

    return export_model(args.model, args.out, options=opts)
