"""``gradwatch doctor SCRIPT [ARGS...]``: why do variables get no gradient?

Imports the script's framework (TensorFlow or PyTorch) only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor", help="run a training script and explain every missing gradient",
        description="Run SCRIPT (with ARGS) in diagnose-only mode: no collector is needed; "
                    "each variable that gets no gradient is reported with the cause, the op "
                    "and the source line, and a fix. Exit status: 0 when every variable got "
                    "a gradient, 1 when some did not, 2 when the script failed before any "
                    "gradient was seen.")
    parser.add_argument("--framework", choices=("auto", "tensorflow", "torch"), default="auto",
                        help="what the script trains with; auto: from its imports")
    parser.add_argument("script", help="a Python training script")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    parser.set_defaults(func=run)


def detect_framework(source: str) -> str:
    """``torch`` if the script imports torch and not TensorFlow or Keras, else
    ``tensorflow``."""
    def imports(name: str) -> bool:
        return re.search(rf"^\s*(import|from)\s+{name}\b", source, re.MULTILINE) is not None

    if imports("torch") and not (imports("tensorflow") or imports("keras")):
        return "torch"
    return "tensorflow"


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.script):
        print(f"gradwatch doctor: no such file: {args.script}", file=sys.stderr)
        return 2
    framework = args.framework
    if framework == "auto":
        framework = detect_framework(Path(args.script).read_text(errors="replace"))
    print(f"gradwatch doctor: running {args.script} ({framework}) in diagnose-only mode ...",
          flush=True)
    from gradwatch.agent.core.doctor import run_script

    if framework == "torch":
        from gradwatch.agent.torch.doctor import diagnose_missing_gradients
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from gradwatch.agent.tensorflow.doctor import diagnose_missing_gradients
    report = run_script(args.script, list(args.args), diagnose_missing_gradients)
    print("\n" + str(report), flush=True)
    if report:
        return 1
    return 2 if report.error else 0
