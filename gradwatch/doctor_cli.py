"""``gradwatch doctor SCRIPT [ARGS...]``: why do variables get no gradient?

Imports the script's framework (TensorFlow or PyTorch) only when the command runs.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from gradwatch.agent.core.doctor import Report


def add_parser(subparsers: argparse._SubParsersAction, summary: str) -> None:
    """Adds the subcommand, with ``summary`` as its line in ``gradwatch --help``."""
    parser = subparsers.add_parser(
        "doctor", help=summary,
        description="Run SCRIPT (with ARGS) in diagnose-only mode: no collector is needed; "
                    "each variable that gets no gradient is reported with the cause, the op "
                    "and the source line, and a fix. Exit status: 0 when every variable got "
                    "a gradient, 1 when some did not (whether or not the script then failed), "
                    "2 when the script failed or computed no gradient otherwise.")
    parser.add_argument("--framework", choices=("auto", "tensorflow", "torch", "both"),
                        default="auto",
                        help="what the script trains with; auto: from its imports (and its "
                             "own modules'), both where they name both or neither")
    parser.add_argument("script", help="a Python training script")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    parser.set_defaults(func=run)


#: Top-level modules that tell the framework a script trains with.
TORCH = frozenset({"torch", "torchvision", "torchaudio", "lightning", "pytorch_lightning",
                   "accelerate", "timm"})
TENSORFLOW = frozenset({"tensorflow", "keras", "tf_keras"})


def imported_modules(path: Path, folder: Path | None = None, seen: set[Path] | None = None
                     ) -> set[str]:
    """Top-level names the script imports, and those its own modules (files next to it
    that it imports) import, at any depth. Unreadable or invalid files import nothing."""
    folder = folder or path.parent
    seen = seen if seen is not None else set()
    if path in seen or len(seen) > 100:
        return set()
    seen.add(path)
    try:
        tree = ast.parse(path.read_text(errors="replace"))
    except (OSError, SyntaxError, ValueError):
        return set()
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    for name in list(names):
        for local in (folder / f"{name}.py", folder / name / "__init__.py"):
            if local.is_file():
                names |= imported_modules(local, folder, seen)
    return names


def detect_framework(path: Path) -> str:
    """``torch`` or ``tensorflow`` where the script's imports (its own modules' included)
    name only one; ``both`` where they name both, or neither."""
    names = imported_modules(path)
    torch, tensorflow = bool(names & TORCH), bool(names & TENSORFLOW)
    return "both" if torch == tensorflow else "torch" if torch else "tensorflow"


@contextlib.contextmanager
def _both() -> Iterator[Report]:
    """Both front ends' watches, one report."""
    from gradwatch.agent.tensorflow.doctor import diagnose_missing_gradients as tensorflow
    from gradwatch.agent.torch.doctor import diagnose_missing_gradients as torch

    report, parts = Report(), []
    with contextlib.ExitStack() as stack:
        parts = [stack.enter_context(watch()) for watch in (tensorflow, torch)]
        try:
            yield report
        finally:
            stack.close()  # the front ends finish their reports first
            for part in parts:
                report.seen += part.seen
                for diagnosis in part.diagnoses.values():
                    report.add(None, diagnosis)


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.script):
        print(f"gradwatch doctor: no such file: {args.script}", file=sys.stderr)
        return 2
    framework = args.framework
    if framework == "auto":
        framework = detect_framework(Path(args.script))
    print(f"gradwatch doctor: running {args.script} ({framework}) in diagnose-only mode ...",
          flush=True)
    from gradwatch.agent.core.doctor import run_script

    if framework != "torch":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if framework == "torch":
        from gradwatch.agent.torch.doctor import diagnose_missing_gradients
    elif framework == "tensorflow":
        from gradwatch.agent.tensorflow.doctor import diagnose_missing_gradients
    else:
        diagnose_missing_gradients = _both
    report = run_script(args.script, list(args.args), diagnose_missing_gradients)
    print("\n" + str(report), flush=True)
    if report:
        return 1
    return 2 if report.error or not report.seen else 0
