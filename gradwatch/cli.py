"""The ``gradwatch`` command: ``collector``, ``demo``, ``doctor``.

Subcommands import their side lazily, so ``gradwatch collector`` runs without
TensorFlow installed, and ``gradwatch doctor`` with the agent alone (no collector's
dependencies): a subcommand whose dependencies are missing says which extra to install.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Each subcommand: the module that defines it (``add_parser``), its line in ``--help``,
#: and the extras that install what it imports.
COMMANDS = (
    ("collector", "gradwatch.collector.cli",
     "run the collector (gRPC ingest, /metrics, alerts)", "collector"),
    ("demo", "gradwatch.demo.cli",
     "run a collector and a broken training job; show the alert", "collector,agent-cpu"),
    ("doctor", "gradwatch.doctor_cli",
     "run a training script and explain every missing gradient", "agent-cpu or agent-torch"),
)


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

    for name, module, summary, extras in COMMANDS:
        try:
            importlib.import_module(module).add_parser(subparsers, summary)
        except ModuleNotFoundError as error:
            if (error.name or "gradwatch").partition(".")[0] == "gradwatch":
                raise  # (not a dependency: gradwatch itself is broken)
            _unavailable(subparsers, name, summary, extras, error)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "unavailable", False):
        # said by the subcommand's parser, with its usage and the flag meant
        _unrecognized(subparsers.choices[args.command], unknown)
    if args.log_level.upper() not in LOG_LEVELS:
        parser.error(f"--log-level (or GRADWATCH_LOG_LEVEL): expected one of "
                     f"{', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if args.command == "doctor":  # the script's own logging stays the script's to set up
        logger = logging.getLogger("gradwatch")
        logger.addHandler(handler)
        logger.setLevel(args.log_level.upper())
        logger.propagate = False
    else:
        logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    return args.func(args)


def _unavailable(subparsers: argparse._SubParsersAction, name: str, summary: str,
                 extras: str, error: ModuleNotFoundError) -> None:
    """Registers ``name`` as a command that says, in one line, what to install."""
    parser = subparsers.add_parser(name, help=summary, add_help=False)
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    missing = (error.name or "").partition(".")[0]

    def run(args: argparse.Namespace) -> int:
        print(f"gradwatch {name}: needs {missing}, which is not installed: "
              f"pip install 'gradwatch[{extras}]'", file=sys.stderr)
        return 2

    parser.set_defaults(func=run, unavailable=True)


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
