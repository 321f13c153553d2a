"""`edgeexit train`: train a reference multi-exit model and save it as a torch.export archive."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a reference multi-exit model (saves a .pt2 with a dynamic batch + a state_dict)",
        description="Train a reference early-exit model jointly over all exits (with self-distillation from the "
                    "final exit by default), print per-exit validation accuracy, save a torch.export archive.")
    p.add_argument("--arch", default="resnet-exits",
                   help="branchynet | resnet-exits | densenet-exits | camera-resnet | vit-exits (ViT-style: "
                        "4 exits on the class token; recipe: --epochs 6 --lr 2e-3)")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist | mnist-5k | digits | path.npz; NAME-N resizes to NxN (e.g. fashion-mnist-96)")
    p.add_argument("--epochs", type=float, default=4.0, help="epochs over the train split (fractions allowed)")
    p.add_argument("--phases", default=None, metavar="SIZE:EPOCHS,...",
                   help="progressive resizing, replaces --epochs: e.g. 48:3,96:1 trains 3 epochs on 48x48 images, "
                        "then 1 on 96x96 (needs a resized dataset such as fashion-mnist-96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output .pt2 (state_dict goes to <out>.state_dict.pt)")
    p.add_argument("--limit", type=int, default=None, help="train on the first N training samples only")
    p.add_argument("--no-distill", action="store_true", help="plain joint loss, no distillation from the final exit")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (one-cycle); default 4e-3")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgeexit import datasets
    from edgeexit.models import build
    from edgeexit.training import TrainOptions, train

    x, _ = datasets.load(args.dataset, "val", limit=1)  # fail fast (and clearly) on a missing dataset
    model = build(args.arch, num_classes=datasets.num_classes(args.dataset), in_channels=x.shape[1])
    options = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, limit=args.limit,
                           distill=not args.no_distill, threads=args.threads, progress=not args.quiet, out=args.out)
    if args.phases:
        options.phases = _parse_phases(args.phases)
    if args.lr is not None:
        options.lr = args.lr
    report = train(model, args.dataset, options=options)
    print(f"\n{args.arch} on {args.dataset}: {report.epochs:.2f} epochs over {report.train_samples} samples, "
          f"{report.seconds_per_epoch:.1f} s/epoch; per-exit accuracy on the val split ({report.val_samples}):")
    print(report.table())
    print(f"saved {report.out} and {report.out}.state_dict.pt")
    return 0


def _parse_phases(text: str) -> tuple[tuple[int, float], ...]:
    from edgeexit.errors import ConfigError

    try:
        return tuple((int(size), float(epochs)) for size, epochs in (part.split(":") for part in text.split(",")))
    except ValueError:
        raise ConfigError(f"--phases {text!r}: write SIZE:EPOCHS pairs separated by commas, e.g. 48:3,96:1") from None
