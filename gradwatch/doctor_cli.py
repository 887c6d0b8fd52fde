"""``gradwatch doctor SCRIPT [ARGS...]``: why do variables get no gradient?

Imports TensorFlow only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor", help="run a training script and explain every missing gradient",
        description="Run SCRIPT (with ARGS) in diagnose-only mode: no collector is needed; "
                    "each variable that gets no gradient is reported with the cause, the op "
                    "and the source line, and a fix. Exit status: 0 when every variable got "
                    "a gradient, 1 when some did not, 2 when the script failed before any "
                    "gradient was seen.")
    parser.add_argument("script", help="a Python training script")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.script):
        print(f"gradwatch doctor: no such file: {args.script}", file=sys.stderr)
        return 2
    print(f"gradwatch doctor: running {args.script} in diagnose-only mode ...", flush=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from gradwatch.agent.tensorflow.doctor import run_script

    report = run_script(args.script, list(args.args))
    print("\n" + str(report), flush=True)
    if report:
        return 1
    return 2 if report.error else 0
