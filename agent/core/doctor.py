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
    """Diagnoses of one run, the latest per variable, in the order they were found, by
    name; a second variable of a name (two models' ``proj.weight``: a GAN's generator and
    critic) as ``name (2)``."""

    diagnoses: dict[str, Diagnosis] = field(default_factory=dict)
    error: str = ""  # how the watched code failed, if it did
    #: Gradient computations the front end saw (optimizer steps, gradient calls).
    seen: int = 0
    _keys: dict[int, str] = field(default_factory=dict, repr=False)  # variable id -> key
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, variable: Any, diagnosis: Diagnosis) -> None:
        """``variable``: the framework's object (None: the diagnosis's name is the key)."""
        with self._lock:
            key = None if variable is None else self._keys.get(id(variable))
            if key is None:
                key, n = diagnosis.variable, 1
                while variable is not None and key in self._keys.values():
                    n += 1
                    key = f"{diagnosis.variable} ({n})"
                if variable is not None:
                    self._keys[id(variable)] = key
            self.diagnoses.pop(key, None)
            self.diagnoses[key] = diagnosis

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
            for key, d in self.diagnoses.items():
                groups.setdefault(d.explanation(), []).append(key)
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


def _first_line(error: BaseException) -> str:
    text = error.msg if isinstance(error, SyntaxError) else str(error)  # (no "(file, line)")
    return (str(text).strip().splitlines() or [""])[0]


def _where(error: BaseException) -> Source:
    """Where the script failed: the line of a syntax error, else the innermost user frame."""
    if isinstance(error, SyntaxError) and error.filename:
        return Source(error.filename, error.lineno or 0)
    frames = traceback.extract_tb(error.__traceback__)
    return user_source(frames) or Source(frames[-1].filename, frames[-1].lineno)


def _print_traceback(error: BaseException, script: str) -> None:
    """The traceback Python would print, from the script's frames on (not gradwatch's)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != script:
        tb = tb.tb_next
    if tb is None and not isinstance(error, SyntaxError):  # (a syntax error's is its line)
        tb = error.__traceback__
    traceback.print_exception(type(error), error, tb, file=sys.stderr)


#: A front end's ``diagnose_missing_gradients``: a context manager yielding a `Report`.
Watch = Callable[[], contextlib.AbstractContextManager[Report]]


def run_script(path: str, args: list[str], watch: Watch) -> Report:
    """Runs ``path`` as ``__main__`` with ``args`` under ``watch()`` (a front end's
    ``diagnose_missing_gradients``).
    Monitors the script creates are disabled (nothing is sent anywhere); an exception
    or ``sys.exit`` ends the run and is noted in the report, never raised."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    saved_disabled = os.environ.get("GRADWATCH_DISABLED")
    script = os.path.abspath(path)  # (``__file__``, as Python gives it)
    sys.argv = [path, *args]
    sys.path[0:1] = [os.path.dirname(script)]  # where the script is, in place of gradwatch's
    os.environ["GRADWATCH_DISABLED"] = "1"
    try:
        with watch() as report:
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as stop:
                if isinstance(stop.code, str):  # (Python prints it)
                    print(stop.code, file=sys.stderr)
                if stop.code not in (None, 0):
                    report.error = f"the script exited with {stop.code}"
            except KeyboardInterrupt:
                report.error = "interrupted (what was found until then is above)"
            except Exception as error:  # the classic: "No gradients provided for any variable"
                _print_traceback(error, script)
                report.error = f"{type(error).__name__}: {_first_line(error)} (at {_where(error)})"
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        if saved_disabled is None:
            os.environ.pop("GRADWATCH_DISABLED", None)
        else:
            os.environ["GRADWATCH_DISABLED"] = saved_disabled
    return report
