"""The verdict on why a variable got no gradient, and where in the user's code to look.

Front ends produce `Diagnosis` objects (TensorFlow from the traced forward graph);
they travel as ``gradwatch.v1.Diagnosis`` (`Diagnosis.to_proto`). `user_source`
and `caller_source` find the innermost frame of the user's own code, skipping the
standard library, gradwatch and the ML frameworks.
"""

from __future__ import annotations

import enum
import functools
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gradwatch.proto.v1 import gradwatch_pb2 as pb

#: Packages and modules whose frames a user cannot act on (when imported): the frameworks,
#: and decorators' wrappers (``typing_extensions.deprecated``, which torch's deprecated
#: functions go through).
LIBRARIES = ("tensorflow", "keras", "tf_keras", "absl", "numpy", "tree", "optree", "torch",
             "typing_extensions", "wrapt", "decorator", "deprecated")


@dataclass(frozen=True)
class Source:
    """Where user code created an op."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def _library_roots() -> tuple[str, ...]:
    import gradwatch.agent

    folders = [os.path.dirname(gradwatch.agent.__file__), os.path.dirname(os.__file__)]
    files = []
    for name in LIBRARIES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            if hasattr(module, "__path__"):  # a package: its folder
                folders.append(os.path.dirname(module.__file__))
            else:  # a module of one file, beside others' in site-packages
                files.append(os.path.realpath(module.__file__))
    return tuple(os.path.join(os.path.realpath(f), "") for f in folders) + tuple(files)


_LIBRARY_ROOTS: tuple[str, ...] = ()


@functools.lru_cache(maxsize=8192)
def is_user_file(filename: str) -> bool:
    """False for the frameworks, the standard library, gradwatch's agent and generated
    code: the frames a user cannot act on."""
    global _LIBRARY_ROOTS
    if not _LIBRARY_ROOTS:
        _LIBRARY_ROOTS = _library_roots()
    if filename.startswith("<") or "__autograph_generated_file" in filename:
        return False
    return not os.path.realpath(filename).startswith(_LIBRARY_ROOTS)


#: Framework training loops (``fit``, ``train_step``): a user frame outside one only
#: started training (``model.fit(...)``), it is not where the op was written.
TRAINING_LOOPS = tuple(os.path.join(*parts) for parts in (
    ("keras", "src", "trainers", ""), ("keras", "src", "backend", "tensorflow", "trainer.py"),
    ("keras", "src", "engine", "training.py"), ("tf_keras", "src", "engine", "training.py"),
))


def _in_training_loop(filename: str, function: str) -> bool:
    """(A model's ``__call__`` is no loop: tf-keras defines it in its training.py too.)"""
    return function != "__call__" and any(
        loop in filename if loop.endswith(os.sep) else filename.endswith(loop)
        for loop in TRAINING_LOOPS)


def _innermost_user(frames: Iterable[tuple[str, int, str]], stop_at_training_loop: bool = True
                    ) -> Source | None:
    """The first user frame of ``frames`` (file, line, function; innermost first), unless
    a training loop comes before it (and ``stop_at_training_loop``)."""
    for filename, line, function in frames:
        if is_user_file(filename):
            return Source(filename, line)
        if stop_at_training_loop and _in_training_loop(filename, function):
            return None
    return None


def user_source(frames: Iterable[Any]) -> Source | None:
    """The innermost user frame of ``frames`` (outermost first, like a traceback) that
    is inside the computation, not the line that called ``model.fit``."""
    return _innermost_user((f.filename, f.lineno, getattr(f, "name", ""))
                           for f in reversed(list(frames)))


def caller_source(stop_at_training_loop: bool = True) -> Source | None:
    """The same for the current Python stack. Where a value leaves the framework, the
    line that called ``model.predict`` is the answer: pass ``stop_at_training_loop=False``."""
    def stack(frame: Any) -> Iterable[tuple[str, int, str]]:
        while frame is not None:
            yield frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name
            frame = frame.f_back

    return _innermost_user(stack(sys._getframe(1)), stop_at_training_loop)


class Cause(enum.Enum):
    UNUSED = "unused"
    NOT_ON_LOSS_PATH = "not_on_loss_path"
    BROKEN_AT_OP = "broken_at_op"
    LEFT_TENSORFLOW = "left_tensorflow"
    OUTSIDE_TAPE = "outside_tape"
    UNKNOWN = "unknown"
    NOT_TRACKED = "not_tracked"
    CLEARED = "cleared"


@dataclass(frozen=True)
class Diagnosis:
    """The verdict for one variable. ``op_*`` and ``source`` name the op to look at
    (absent for ``unused``); ``reason`` says what that op does wrong; ``framework``
    words the explanation."""

    variable: str
    cause: Cause
    op_name: str = ""
    op_type: str = ""
    source: Source | None = None
    reason: str = ""
    hint: str = ""
    framework: str = "TensorFlow"

    def message(self) -> str:
        """Plain sentences for logs and the doctor report."""
        return f"{self.variable} gets no gradient: {self.explanation()}"

    def explanation(self) -> str:
        """The cause and the fix, without the variable's name (variables sharing a
        cause are listed together in alerts)."""
        where = f" at {self.source}" if self.source else ""
        torch = self.framework == "PyTorch"
        because = f"; {self.reason}" if self.reason else ""
        op = (f"{self.op_name}(){where}" if torch
              else f"{self.op_type} op '{self.op_name}'{where}")
        text = {
            Cause.UNUSED: "it is never read by the computation of the loss" + because,
            Cause.NOT_ON_LOSS_PATH: f"it is read by {op}, but nothing computed from it "
                                    "reaches the loss" + because,
            Cause.LEFT_TENSORFLOW: (f"a value computed from it left {self.framework} at "
                                    f"{op} ({self.reason}) and nothing else of it reaches "
                                    "the loss") if torch else
                                   (f"the output of {op} left TensorFlow ({self.reason}) and "
                                    "came back as a constant"),
            Cause.BROKEN_AT_OP: f"the path to the loss crosses {op}, which {self.reason}",
            Cause.OUTSIDE_TAPE: (f"the path to the loss crosses {op}, which " + (
                self.reason or "ran with gradient tracking off (torch.no_grad() or "
                               "inference_mode)")) if torch
                                else f"{op} {self.reason or 'ran outside the GradientTape'}",
            Cause.UNKNOWN: (f"a differentiable path to the loss exists, but {op} "
                            f"{self.reason}") if self.reason and self.op_name else
                           self.reason or ("gradwatch found a differentiable path to the "
                                           "loss; the gradient was lost elsewhere"),
            Cause.CLEARED: f"its gradient was computed by {op}, then cleared before the "
                           f"optimizer step ({self.reason})",
            Cause.NOT_TRACKED: f"{self.framework} does not track its gradient "
                               f"({self.reason})" + (f"; it is read by {op}"
                                                     if self.op_name and not torch else ""),
        }[self.cause]
        return f"{text[0].upper()}{text[1:]}." + (f" Fix: {self.hint}" if self.hint else "")

    def to_proto(self, variable_id: int) -> pb.Diagnosis:
        """The wire form, for the variable at ``variable_id`` of a session's table."""
        return pb.Diagnosis(
            variable_id=variable_id,
            cause=pb.Diagnosis.Cause.Value(self.cause.name),
            op_name=self.op_name,
            op_type=self.op_type,
            source_file=self.source.file if self.source else "",
            source_line=self.source.line if self.source else 0,
            reason=self.reason,
            hint=self.hint,
            message=self.explanation(),
        )
