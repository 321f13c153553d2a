"""`edgeexit info BUNDLE`: what a bundle holds (segments, split points, exits, formats, calibration, profiles,
digest), as aligned text or, with ``--json``, as stable JSON (``edgeexit.bundle_info.INFO_SCHEMA``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show what a bundle holds (text, or --json)", description=__doc__)
    p.add_argument("bundle", help="path to NAME.edgeexit")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the files' sha256 check (faster on large bundles; the manifest is still checked)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from edgeexit.bundle_info import bundle_info, format_info

    info = bundle_info(args.bundle, verify=not args.no_verify)
    print(json.dumps(info, indent=2, allow_nan=False) if args.json else format_info(info))
    return 0
