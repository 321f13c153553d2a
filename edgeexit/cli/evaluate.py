"""`edgeexit evaluate`: accuracy and compute of a bundle's exits, of its calibrated policy, and policy sweeps.

Without --no-policy it runs the bundle's calibrated policy for real (early-exit runner with regrouping) and
the full model on the same data, and prints per exit: exit rate, accuracy of the rows answered there and
cumulative compute; then overall accuracy vs the final exit alone, relative FLOPs and measured time relative
to the full model. --sweep also writes accuracy vs relative compute for every policy (PNG + JSON + Markdown).
A bundle whose model takes token ids (input_ids, attention_mask) runs on a text set (--data stdlib-docstrings),
tokenised to --seq-len tokens (default: the bundle's example length, else 128).
"""

from __future__ import annotations

import argparse

from edgeexit.cli.common import add_backend_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="accuracy vs compute of exits and exit policies", description=__doc__)
    p.add_argument("bundle", help="path to NAME.edgeexit")
    p.add_argument("--data", default="fashion-mnist",
                   help="dataset name or .npz path (default fashion-mnist); stdlib-docstrings for a text model")
    p.add_argument("--seq-len", type=int,
                   help="text sets: tokens per row (default: the bundle's example length or 128, at most its max)")
    p.add_argument("--split", default="test", help="split to evaluate on (default test)")
    p.add_argument("--policy", help="require the bundle's calibrated policy to be of this kind")
    p.add_argument("--no-policy", action="store_true", help="only every exit's own accuracy and compute")
    p.add_argument("--sweep", action="store_true", help="sweep every policy's thresholds (needs --out)")
    p.add_argument("--out", help="directory for sweep.png, sweep.json, sweep.md and evaluate.json")
    add_backend_args(p)
    p.add_argument("--limit", type=int, help="use only the first N samples of the split")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from edgeexit.bundle import Bundle
    from edgeexit.errors import ConfigError
    from edgeexit.evaluation import (
        SWEEP_KINDS,
        EvalOptions,
        data_seq_len,
        evaluate_policy,
        exits_table,
        load_for_bundle,
        per_exit_rows,
        summary,
        sweep_policy,
        time_full_model,
        warm_up,
        write_sweep,
    )
    from edgeexit.policies import policy_from_manifest
    from edgeexit.reports import write_json
    from edgeexit.runtime.runner import SegmentRunner

    if args.sweep and not args.out:
        raise ConfigError("--sweep writes files: add --out DIR")
    if args.no_policy and args.policy:
        raise ConfigError("--policy and --no-policy contradict each other; give one")
    bundle = Bundle.load(args.bundle)
    policy = None if args.no_policy else policy_from_manifest(bundle.manifest, args.policy)
    x, y = load_for_bundle(bundle.manifest, args.data, args.split, args.limit, args.seq_len)
    seq_len = data_seq_len(bundle.manifest, args.data, x, args.seq_len)
    opts = EvalOptions(args.data, args.split, args.limit, args.batch_size, args.backend,
                       progress=not args.no_progress, seq_len=seq_len)
    runner = SegmentRunner(bundle, args.backend, fmt=args.fmt)
    warm_up(runner, x)
    logits, full_s = time_full_model(runner, x, args.batch_size, opts.progress)
    tokens = f" at {seq_len} tokens per row" if seq_len is not None else ""
    print(f"{bundle.name} on {args.data}/{args.split}: {len(y)} samples{tokens}, backend {args.backend}")
    rows = per_exit_rows(bundle.manifest, logits, y)
    print("\nEvery exit on every sample (no early exit):")
    print(exits_table(rows))
    report: dict = {"bundle": str(bundle.root), "data": args.data, "split": args.split, "n": len(y),
                    "exits": [asdict(r) for r in rows]}
    if seq_len is not None:
        report["seq_len"] = seq_len
    if policy is not None:
        if policy.kind == "never":
            print("\nthe bundle has no calibrated policy: every sample runs to the final exit "
                  "(run `edgeexit calibrate` first)")
        ev = evaluate_policy(runner, policy, x, y, opts, full=(logits, full_s))
        note = (bundle.manifest.policy or {}).get("note")
        print(f"\nPolicy {policy.kind} thresholds {[round(t, 6) for t in policy.thresholds]}"
              + (f"\n({note})" if note else ""))
        print(exits_table(ev.rows))
        print(summary(ev))
        report["policy"] = asdict(ev)
    if args.sweep:
        sweeps = {k: sweep_policy(k, bundle.manifest, logits, y) for k in SWEEP_KINDS}
        final_acc = float((logits[-1].argmax(1) == y).mean())
        points = [] if policy is None or policy.kind == "never" else [
            (f"calibrated {policy.kind}", report["policy"]["relative_flops"], 100 * report["policy"]["accuracy"])]
        files = write_sweep(Path(args.out), bundle.name, sweeps, final_acc, points)
        report["sweeps"] = sweeps
        print("\n" + "\n".join(f"wrote {p}" for p in files.values()))
    if args.out:
        print(f"wrote {write_json(Path(args.out) / 'evaluate.json', report)}")
    return 0
