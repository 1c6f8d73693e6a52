"""The ``loraga-ray`` command. Each subcommand lives beside the code it drives and provides
``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "init": ("loraga_ray.distributed", "estimate the LoRA-GA init (distributed gradient estimate + SVD) and write the artifact"),
    "train": ("loraga_ray.train", "fine-tune with LoRA-GA, LoRA, PiSSA or full fine-tuning on Ray Train"),
    "tune": ("loraga_ray.tune", "search rank / alpha / gamma / lr on Ray Tune from one shared gradient estimate"),
    "demo": ("loraga_ray.demo", "the end-to-end demo: LoRA-GA vs LoRA on the offline demo model and data"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraga-ray", description="LoRA-GA initialisation and fine-tuning on Ray.")
    parser.add_argument("--version", action="version", version="loraga-ray 0.1.0")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # a subcommand not built yet, or a missing optional dependency
            p.set_defaults(_unavailable=str(e))
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"loraga-ray {args.command}: unavailable: {args._unavailable}", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"loraga-ray {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
