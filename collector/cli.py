"""``gradwatch collector``: run the collector service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from gradwatch.collector import config
from gradwatch.collector.server import serve


def add_parser(subparsers: argparse._SubParsersAction, summary: str) -> None:
    """Adds the subcommand, with ``summary`` as its line in ``gradwatch --help``."""
    parser = subparsers.add_parser(
        "collector", help=summary,
        description="Receive gradient statistics from agents, export them to Prometheus and "
                    "alert when gradients go missing.")
    config.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        settings = config.load(args)
    except config.ConfigError as error:
        count = len(error.errors)
        print(f"gradwatch collector: invalid configuration ({count} "
              f"{'error' if count == 1 else 'errors'}):", file=sys.stderr)
        for line in error.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings))
    except ValueError as error:  # a security file that broke between the check and the start
        print(f"gradwatch collector: invalid configuration: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. an address already in use
        print(f"gradwatch collector: cannot start: {error}", file=sys.stderr)
        return 1
    return 0
