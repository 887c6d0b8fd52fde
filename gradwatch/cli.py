"""The ``gradwatch`` command: ``collector``, ``demo``, ``doctor``.

Subcommands import their side lazily, so ``gradwatch collector`` runs without
TensorFlow installed.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Gradient-health monitoring for training jobs: the collector, a live "
                    "demo, and a doctor that explains missing gradients.")
    parser.add_argument("--log-level", default=os.environ.get("GRADWATCH_LOG_LEVEL", "INFO"),
                        metavar="LEVEL",
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (env GRADWATCH_LOG_LEVEL); "
                             "default %(default)s")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from gradwatch import doctor_cli
    from gradwatch.collector import cli as collector_cli
    from gradwatch.demo import cli as demo_cli

    collector_cli.add_parser(subparsers)
    demo_cli.add_parser(subparsers)
    doctor_cli.add_parser(subparsers)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand's parser, with its usage and the flag meant
        _unrecognized(subparsers.choices[args.command], unknown)
    if args.log_level.upper() not in LOG_LEVELS:
        parser.error(f"--log-level (or GRADWATCH_LOG_LEVEL): expected one of "
                     f"{', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


def _unrecognized(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """Exits (status 2) naming ``unknown`` and, for a misspelt flag, the one meant."""
    flags = [f for action in parser._actions for f in action.option_strings]
    meant = [close[0] for arg in unknown if arg.startswith("--")
             for close in [difflib.get_close_matches(arg.partition("=")[0], flags, n=1)]
             if close]
    parser.error(f"unrecognized arguments: {' '.join(unknown)}"
                 + (f" (did you mean {', '.join(meant)}?)" if meant else ""))


if __name__ == "__main__":
    sys.exit(main())
