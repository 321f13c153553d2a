"""`edgeexit bottleneck`: insert a learned bottleneck at a split point and train it by distillation."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bottleneck", help="add a learned bottleneck (small encoder on the device, decoder in the cloud) at a split",
        description="Insert an encoder (3x3 conv to --channels, optional --stride 2, batch norm, hardtanh) and a "
                    "decoder back to the original shape at split point --split of a reference multi-exit model "
                    "(numbered as `edgeexit export --split-points auto` numbers them: split k is the output of "
                    "stage k-1), and train them by distillation from the frozen original (MSE to its boundary "
                    "tensor + KL to its exits after the split). Exits before the split are unchanged. Prints the "
                    "accuracy per exit before/after and saves a .pt2 with the same contract; `edgeexit export` "
                    "then cuts at the encoder's output and marks that split point as a bottleneck.")
    p.add_argument("model", type=Path, help="a .pt2 from `edgeexit train` (its <model>.state_dict.pt next to it)")
    p.add_argument("--split", type=int, required=True, help="split point S (1..stages-1)")
    p.add_argument("--channels", type=int, required=True, help="channels C of the code sent on the wire")
    p.add_argument("--stride", type=int, default=1, choices=(1, 2), help="2 halves the code's height and width")
    p.add_argument("--data", default="fashion-mnist", help="data set the model was trained on (e.g. fashion-mnist-96)")
    p.add_argument("--out", type=Path, required=True, help="output .pt2 (state_dict goes to <out>.state_dict.pt)")
    p.add_argument("--arch", default=None, help="reference architecture of MODEL (default: the one its weights fit)")
    p.add_argument("--epochs", type=float, default=2.0, help="epochs over the training samples (fractions allowed)")
    p.add_argument("--limit", type=int, default=None, help="train on the first N training samples only")
    p.add_argument("--val-limit", type=int, default=2000, help="val samples for the accuracy table")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    p.add_argument("--kl-from", type=float, default=0.3,
                   help="share of the steps trained on MSE alone (cheap) before KL to the exits joins")
    p.add_argument("--train-tail", action="store_true", help="also fine-tune the stages and exits after the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgeexit import datasets
    from edgeexit.bottleneck import BottleneckOptions, check_options, load_multi_exit, train_bottleneck
    from edgeexit.errors import ConfigError

    if not args.model.is_file():
        raise ConfigError(f"{args.model} does not exist: pass a .pt2 saved by `edgeexit train`")
    x, _ = datasets.load(args.data, "val", limit=1)  # fail fast (and clearly) on a missing data set
    model = load_multi_exit(args.model, args.arch, datasets.num_classes(args.data), x.shape[1])
    opts = BottleneckOptions(
        split=args.split, channels=args.channels, stride=args.stride, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, limit=args.limit, val_limit=args.val_limit, train_tail=args.train_tail, kl_from=args.kl_from,
        seed=args.seed,
        threads=args.threads, progress=not args.quiet, out=args.out)
    check_options(model, opts)  # before any training data is loaded
    _, report = train_bottleneck(model, args.data, opts)
    shape = "x".join(map(str, report.boundary_shape))
    print(f"\nbottleneck at split {args.split}: {'x'.join(map(str, report.original_shape))} -> {shape} per sample, "
          f"encoder {report.encoder_param_bytes} parameter bytes; {report.seconds:.1f} s over "
          f"{report.train_samples} samples; per-exit accuracy on the val split ({report.val_samples}):")
    print(report.table())
    print(f"saved {report.out} and {report.out}.state_dict.pt; next: edgeexit export {report.out} "
          "--calibration-data DATA (the bottleneck's code becomes split point "
          f"{args.split} with --split-points auto)")
    return 0
