"""`edgeexit calibrate`: choose exit thresholds with a guarantee (Learn-then-Test, fixed-sequence testing).

With probability >= 1 - delta over the calibration sample, the early-exit answer disagrees with the final
exit on at most epsilon of inputs (--mode consistency), or loses at most epsilon accuracy against it
(--mode accuracy). The result (policy, thresholds, per-exit statistics, every candidate setting) is written
into the bundle's manifest. A named dataset calibrates on its val split (never train or test); a user's .npz
file is used whole unless --split val asks for its fixed 10% carve. The output says how many rows were used.
A bundle whose model takes token ids (input_ids, attention_mask) calibrates on a text set
(--data stdlib-docstrings), tokenised to --seq-len tokens (default: the bundle's example length, else 128).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="calibrate exit thresholds with a risk guarantee", description=__doc__)
    p.add_argument("bundle", help="path to NAME.edgeexit")
    p.add_argument("--data", default="fashion-mnist",
                   help="dataset name or .npz path (default fashion-mnist); stdlib-docstrings for a text model")
    p.add_argument("--seq-len", type=int,
                   help="text sets: tokens per row (default: the bundle's example length or 128, at most its max)")
    p.add_argument("--split", choices=["val", "all", "train", "test"],
                   help="named datasets: val (the default; train and test are refused). A .npz file is used whole "
                        "(all, its default); --split val takes its fixed 10%% carve instead (the rows "
                        "`edgeexit train` keeps out of training when it trains on that file)")
    p.add_argument("--policy", default="confidence",
                   choices=["confidence", "entropy", "margin", "patience", "ensemble"])
    p.add_argument("--epsilon", type=float, default=0.01, help="risk level (default 0.01)")
    p.add_argument("--delta", type=float, default=0.05, help="allowed failure probability (default 0.05)")
    p.add_argument("--mode", default="consistency", choices=["consistency", "accuracy"])
    p.add_argument("--scheme", default="pareto", choices=["pareto", "shared"],
                   help="pareto (default): per-exit thresholds from the Pareto front of a learn part of the split, "
                        "tested on the rest; shared: one threshold for every exit, tested on the whole split")
    p.add_argument("--k", type=int, default=2, help="patience: how many consecutive exits must agree")
    p.add_argument("--limit", type=int, help="use only the first N samples of the split")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "litert"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    from dataclasses import replace

    from edgeexit import datasets
    from edgeexit.bundle import Bundle
    from edgeexit.calibration import MAX_PARETO_EXITS, CalibrationOptions, calibrate, check_split
    from edgeexit.early_exit import collect_logits
    from edgeexit.evaluation import data_seq_len, load_for_bundle
    from edgeexit.logs import ProgressBar
    from edgeexit.reports import markdown_table
    from edgeexit.runtime.runner import SegmentRunner

    user_file = datasets.is_user_file(args.data)
    split = args.split or (datasets.WHOLE if user_file else "val")
    check_split(split)  # before any work: a wrong split is a mistake, not a warning
    params = {"k": args.k} if args.policy == "patience" else {}
    options = CalibrationOptions(args.policy, args.epsilon, args.delta, args.mode, params, args.scheme)
    options.check()
    bundle = Bundle.load(args.bundle)
    x, y = load_for_bundle(bundle.manifest, args.data, split, args.limit, args.seq_len)
    seq_len = data_seq_len(bundle.manifest, args.data, x, args.seq_len)
    tokens = f" at {seq_len} tokens per row" if seq_len is not None else ""
    print(f"calibrating on {len(x)} rows: {_source(args.data, split, args.limit, user_file)}{tokens}")
    # calibrate() uses the shared scheme beyond MAX_PARETO_EXITS early exits: the note counts for that scheme
    used = options if len(bundle.manifest.exits) - 1 <= MAX_PARETO_EXITS else replace(options, scheme="shared")
    if len(x) < used.rows_needed():
        print(f"note: epsilon {options.epsilon} and delta {options.delta} need at least {used.rows_needed()} rows "
              f"({used.scheme} scheme) for any early exit to pass; with {len(x)} expect 'never exit early'")
    runner = SegmentRunner(bundle, args.backend)
    with ProgressBar(len(x), not args.no_progress, "exit logits") as bar:
        logits = collect_logits(runner, x, args.batch_size, progress=bar.update)
    result = calibrate(logits, bundle.manifest, options, labels=y)
    bundle.manifest.policy = result.to_manifest(split, args.data, seq_len)
    bundle.save()
    if not result.calibrated:
        logging.getLogger("edgeexit.calibrate").warning(result.message)
    print(result.message)
    print(markdown_table(
        ["exit", "exit rate", "accuracy of exited", "disagreement", "cumulative MFLOPs"],
        [[str(s["exit"]), f"{100 * s['exit_rate']:.1f}%",
          "-" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%",
          "-" if s["disagreement"] is None else f"{100 * s['disagreement']:.2f}%",
          f"{s['cumulative_flops'] / 1e6:.3f}"] for s in result.exit_stats]))
    print(f"wrote policy {bundle.manifest.policy['kind']!r} with thresholds "
          f"{bundle.manifest.policy['thresholds']} into {bundle.root / 'manifest.json'}")
    return 0


def _source(data: str, split: str, limit: int | None, user_file: bool) -> str:
    """Where the calibration rows came from, in words."""
    from edgeexit.datasets import WHOLE

    if split == WHOLE:
        what = f"all of {data}"
    elif user_file:
        what = f"the {split!r} carve of {data} (a fixed 10%; omit --split to use the whole file)"
    else:
        what = f"the {split!r} split of {data}"
    return f"the first {limit} of {what}" if limit is not None else what
