"""The ``gradwatch`` command: ``collector``, ``demo``, ``doctor``.

Subcommands import their side lazily, so ``gradwatch collector`` runs without
TensorFlow installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradwatch", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("GRADWATCH_LOG_LEVEL", "INFO"),
                        help="logging level (env GRADWATCH_LOG_LEVEL); default %(default)s")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from gradwatch import doctor_cli
    from gradwatch.collector import cli as collector_cli
    from gradwatch.demo import cli as demo_cli

    collector_cli.add_parser(subparsers)
    demo_cli.add_parser(subparsers)
    doctor_cli.add_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
