"""The ``loraga-ray`` command: argparse only. Each subcommand is one small module here with
``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; the work is in :mod:`loraga_ray.jobs`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ("plan", "init", "train", "tune", "demo")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="loraga-ray", description="LoRA-GA initialisation and fine-tuning on Ray.")
    parser.add_argument("--version", action="version", version=f"loraga-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        mod = importlib.import_module(f"{__name__}.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..redact import RedactingFilter, redact

    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose:
            raise
        from ..jobs.cluster import error_message

        print(f"loraga-ray {args.command}: error: {redact(error_message(e))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
