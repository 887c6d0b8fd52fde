"""Diagnose-only mode, whatever the framework: a report of why variables got no gradient,
and running a user's script under a front end's watch (``gradwatch doctor``)."""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gradwatch.agent.core.diagnosis import Diagnosis, Source, user_source


@dataclass
class Report:
    """Diagnoses of one run, the latest per variable, in the order they were found."""

    diagnoses: dict[str, Diagnosis] = field(default_factory=dict)
    error: str = ""  # how the watched code failed, if it did
    #: Gradient computations the front end saw (optimizer steps, gradient calls).
    seen: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, variable: Any, diagnosis: Diagnosis) -> None:
        with self._lock:
            self.diagnoses.pop(diagnosis.variable, None)
            self.diagnoses[diagnosis.variable] = diagnosis

    def __bool__(self) -> bool:
        return bool(self.diagnoses)

    def __str__(self) -> str:
        if not self.diagnoses and not self.seen:
            text = ("gradwatch doctor: no gradient was computed (no optimizer step or "
                    "gradient call ran), so nothing was checked.")
        elif not self.diagnoses:
            text = "gradwatch doctor: every watched variable got a gradient."
        else:
            groups: dict[str, list[str]] = {}
            for d in self.diagnoses.values():
                groups.setdefault(d.explanation(), []).append(d.variable)
            causes = "1 cause" if len(groups) == 1 else f"{len(groups)} causes"
            count = len(self.diagnoses)
            lines = [f"gradwatch doctor: {count} variable{'s get' if count > 1 else ' gets'} "
                     f"no gradient ({causes})."]
            for n, (explanation, variables) in enumerate(groups.items(), 1):
                lines.append(f"\n{n}. {', '.join(variables)}")
                lines.append(f"   {explanation}")
            text = "\n".join(lines)
        return text + (f"\n\nThe run failed: {self.error}" if self.error else "")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython
        printer.text(str(self))


#: A front end's ``diagnose_missing_gradients``: a context manager yielding a `Report`.
Watch = Callable[[], contextlib.AbstractContextManager[Report]]


def run_script(path: str, args: list[str], watch: Watch) -> Report:
    """Runs ``path`` as ``__main__`` with ``args`` under ``watch()`` (a front end's
    ``diagnose_missing_gradients``).
    Monitors the script creates are disabled (nothing is sent anywhere); an exception
    or ``sys.exit`` ends the run and is noted in the report, never raised."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    saved_disabled = os.environ.get("GRADWATCH_DISABLED")
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    os.environ["GRADWATCH_DISABLED"] = "1"
    try:
        with watch() as report:
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as stop:
                if stop.code not in (None, 0):
                    report.error = f"the script exited with {stop.code}"
            except Exception as error:  # the classic: "No gradients provided for any variable"
                frames = traceback.extract_tb(error.__traceback__)
                where = user_source(frames) or Source(frames[-1].filename, frames[-1].lineno)
                first_line = (str(error).strip().splitlines() or [""])[0]
                report.error = f"{type(error).__name__}: {first_line} (at {where})"
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        if saved_disabled is None:
            os.environ.pop("GRADWATCH_DISABLED", None)
        else:
            os.environ["GRADWATCH_DISABLED"] = saved_disabled
    return report
