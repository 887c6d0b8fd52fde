"""Why did a parameter get no gradient? One recorded step of the user's code, walked.

`StepRecording` records every torch function call of one step on the training
thread (a ``TorchFunctionMode``): which tensors went in and came out, whether
gradients were being tracked, and the user's source line; the tensors ``backward()``
starts from are the losses. `diagnose` then follows each parameter
towards the loss:

- **not tracked** (``NOT_TRACKED``): ``requires_grad`` is False (e.g. set after the
  optimizer was built);
- **unused**: no recorded call read it (a module never called, a branch not taken), or
  only for bookkeeping that leads nowhere near the loss (``model.to()``, a ``state_dict``
  copy, an evaluation under ``torch.no_grad()``: untracked or detached reads);
- **left PyTorch** (``LEFT_TENSORFLOW``, the cause's wire name): a value computed from it
  went through ``.item()``, ``.tolist()``, ``.numpy()`` or ``float()`` and nothing
  else of it reaches the loss;
- **not on the loss path**: read, but nothing computed from it reaches the loss;
- **broken at an op** (``BROKEN_AT_OP``): every path to the loss crosses ``.detach()``
  or an op with an integer or boolean result (``argmax``, comparisons, casts);
- **outside gradient tracking** (``OUTSIDE_TAPE``): the path ran under
  ``torch.no_grad()`` or ``torch.inference_mode()`` (not the block of a reentrant
  ``torch.utils.checkpoint`` with an input that needs a gradient: backward runs it again
  with tracking on, so its calls count as tracked, and what breaks inside is named; nor
  the ``forward`` of a custom ``torch.autograd.Function``, whose ``apply`` stands for its
  calls, unless it reads a parameter it was not given);
- **cleared** (``CLEARED``): a differentiable path exists and ``backward()`` ran on the
  loss, so the gradient was computed, then cleared before the optimizer step
  (``zero_grad()`` between ``backward()`` and ``step()``, or ``.grad`` set to None);
- a custom Function of the user's on every path (``BROKEN_AT_OP``): its ``backward()``
  returns no gradient for the input on the path;
- **unknown**: a differentiable path exists, but the gradient was not asked for
  (``backward(inputs=...)`` or ``torch.autograd.grad`` without it), or
  ``torch.autograd.grad`` returned it and it was not stored in ``.grad``.

A recording's losses are what every ``backward()``, ``torch.autograd.backward`` or
``torch.autograd.grad`` without ``create_graph`` (with it, a gradient penalty or an inner
loop is part of the loss) on the training thread started from, up to the optimizer's
update (not a gradient clip: actor-critic programs backpropagate and clip one loss, then
compute the next); a step that has none drops its recording.

Recording costs time and keeps the step's tensors alive until the step ends (at most
`MAX_RECORDED_BYTES`); it runs for the first step (so a problem is explained at once,
before DDP's own error at the second step) and for the step after a parameter is first
seen without gradient, never otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from gradwatch.agent.core.diagnosis import Cause, Diagnosis, Source, caller_source

log = logging.getLogger(__name__)

#: Calls whose result is a Python value or a NumPy array: the value left PyTorch.
CONVERSIONS = frozenset({"item", "tolist", "numpy", "__float__", "__int__", "__bool__",
                         "__index__", "__array__"})
#: Calls whose output never carries a gradient, by design.
DETACHING = frozenset({"detach", "detach_", "data", "tensor", "new_tensor"})

HINTS = {
    Cause.NOT_TRACKED: "set requires_grad back to True, or leave the parameter out of the "
                       "optimizer if freezing it is intended.",
    Cause.UNUSED: "call the module in the forward pass, or leave its parameters out of the "
                  "optimizer if it is not meant to train.",
    Cause.NOT_ON_LOSS_PATH: "add its output to the loss, or leave the parameter out of the "
                            "optimizer.",
    Cause.LEFT_TENSORFLOW: "keep the computation in torch ops (no .item(), .tolist(), "
                           ".numpy() or float() on the way to the loss).",
    Cause.OUTSIDE_TAPE: "compute the loss outside torch.no_grad() / torch.inference_mode() "
                        "(with torch.utils.checkpoint, pass use_reentrant=False: the "
                        "reentrant variant tracks no gradient when no input needs one).",
    "detach": "remove .detach() from the path to the loss, or freeze the parameter on "
              "purpose (requires_grad_(False) and out of the optimizer).",
    "argmax": "use torch.softmax (a soft selection) instead of argmax in the loss.",
    "comparison": "comparisons have no gradient; use a smooth relaxation (e.g. "
                  "torch.sigmoid(k * (a - b))) instead of a boolean test.",
    "cast": "keep the value in a floating-point dtype on the path to the loss.",
    "round": "use a straight-through estimator, x + (torch.round(x) - x).detach().",
    "stand-in": "build the optimizer from the parameters of the model that computes the "
                "loss: a model created again, copied (deepcopy) or reloaded after the "
                "optimizer holds new parameters.",
    "not asked": "pass it in inputs=..., or leave it out of the optimizer.",
    "function input": "pass the parameter to the Function's apply() as an input and return "
                      "its gradient from backward(), or compute with it outside the Function.",
    "function": "return a gradient for every input that needs one from the Function's "
                "backward() (ctx.needs_input_grad tells which).",
    "non-differentiable": "compute the loss from the Function's differentiable outputs, or "
                          "stop marking that one non-differentiable.",
    "not stored": "set each parameter's .grad to the gradient torch.autograd.grad returns "
                  "for it before optimizer.step().",
    Cause.CLEARED: "call optimizer.zero_grad() before loss.backward() or after "
                   "optimizer.step(), never between them.",
}
#: The reason of a step that found every gradient as the last step left it.
STALE = ("its gradient is as the previous step (or zero_grad()) left it, as are all of its "
         "optimizer's: no backward() since reached them (step() called twice, a skipped "
         "backward()), and the update reused old gradients; a gradient written through "
         ".data is not seen either")
#: Why an unused parameter has a stand-in (see `_stand_in`).
STAND_IN = "the loss reads another parameter of its shape, which no optimizer updates"
#: Functions the recording sees as one call (they handle its mode themselves), some of
#: whose outputs do not depend on some of their inputs: nn.MultiheadAttention's attention
#: weights do not depend on its output projection.
PARTLY_DEPENDENT = frozenset({"multi_head_attention_forward"})
_COMPARISONS = frozenset({"eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__",
                          "__le__", "__gt__", "__ge__", "isclose", "greater", "less"})


#: Calls that are bookkeeping, not computation (attribute reads like ``.grad``).
_IGNORED = frozenset({"_set_grad_enabled", "grad", "grad_fn", "requires_grad", "is_leaf",
                      "_version", "_base"})


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name in ("__get__", "__set__"):  # a tensor attribute: .data, .T, .grad, ...
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


@dataclass
class Call:
    """One recorded torch function call."""

    order: int
    name: str
    inputs: list[int]
    outputs: list[int]
    output_dtypes: list[torch.dtype]
    grad_enabled: bool
    source: Source | None
    #: Of a custom ``torch.autograd.Function``'s ``apply`` (named by its class), the
    #: module of that class: the call stands for those its ``forward`` made, which run
    #: without gradient tracking.
    custom: str = ""
    #: Of those, the outputs it marked non-differentiable (``ctx.mark_non_differentiable``).
    nondifferentiable: frozenset[int] = frozenset()


#: Tensors a recording may keep alive (their storages; parameters, alive anyway, do not
#: count); beyond, it gives up.
MAX_RECORDED_BYTES = 256 * 2**20


class StepRecording(TorchFunctionMode):
    """The calls made on the thread that entered it, and the losses' ids once known.
    Keeps the step's tensors alive, so ids stay unique, up to `MAX_RECORDED_BYTES` of
    them besides parameters; beyond that it stops recording: it is `full` if a loss was
    reached by then (what came before stands), else `abandoned`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        #: The ids of the tensors whose gradients were taken: the losses of every
        #: backward pass recorded (a GAN's step has several).
        self.losses: frozenset[int] = frozenset()
        #: The first call that took the losses' gradients (``backward()``,
        #: ``autograd.backward``, ``autograd.grad``) and the ids of the calls' ``inputs=``
        #: (None: every leaf, for one call at least).
        self.loss_call: Call | None = None
        self.loss_inputs: set[int] | None = None
        self.abandoned = False
        self.full = False
        #: Trainable parameters the calls read: id -> shape.
        self.parameters: dict[int, torch.Size] = {}
        #: The calls (by order) of reentrant checkpoints' blocks that backward() runs
        #: again with gradient tracking (an input needs a gradient): see `Recorder`.
        self.recomputed: list[range] = []
        #: The calls (by order) that custom autograd Functions' ``forward`` made: their
        #: ``apply`` calls stand for them (see `applied`).
        self.inside_functions: list[range] = []
        #: Parameters a custom Function's ``forward`` read without being given them:
        #: id -> (the call that read one, the Function's name). Autograd never sees them.
        self.hidden_reads: dict[int, tuple[Call, str]] = {}
        self._as_backward_runs: list[Call] | None = None
        self._alive: dict[int, torch.Tensor] = {}
        self._storages: set[int] = set()
        self._bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = _name(func)
        if self.abandoned or self.full or name in _IGNORED:
            return result
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        if name.endswith("_") and not name.endswith("__") and inputs:
            # In place (x.add_(y), init.uniform_(w)): writes its first argument, reads
            # the rest; initializing a parameter is not reading it.
            outputs, inputs = [inputs[0]], inputs[1:]
        if outputs or (inputs and name in CONVERSIONS):  # not metadata (dim(), size())
            for tensor in inputs + outputs:
                self._keep(tensor)
            self.calls.append(Call(len(self.calls), name, [id(t) for t in inputs],
                                   [id(t) for t in outputs], [t.dtype for t in outputs],
                                   torch.is_grad_enabled(), caller_source()))
            if self._bytes > MAX_RECORDED_BYTES:
                if self.losses:
                    self.full = True
                else:
                    self.abandoned = True
                    self.calls, self._alive = [], {}
        return result

    def as_backward_runs(self) -> list[Call]:
        """The calls as backward() sees them: those of reentrant checkpoints' blocks (run
        without gradient tracking) marked as tracked, since backward() runs them again with
        tracking on (a ``torch.no_grad()`` of the user's inside such a block is taken for
        tracked too); those inside custom Functions left out, their ``apply`` in their
        place. Computed once."""
        if self._as_backward_runs is None:
            again = {order for block in self.recomputed for order in block}
            hidden = {order for inside in self.inside_functions for order in inside}
            self._as_backward_runs = [replace(c, grad_enabled=True)
                                      if not c.grad_enabled and c.order in again else c
                                      for c in self.calls if c.order not in hidden]
        return self._as_backward_runs

    def applied(self, function: type, first: int, args: Any, result: Any) -> None:
        """``function.apply(*args)`` returned ``result``; its ``forward`` made the calls
        from ``first`` on."""
        if self.abandoned or self.full:
            return
        inside = range(first, len(self.calls))
        inputs = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        tracked = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        call = Call(len(self.calls), function.__name__, [id(t) for t in inputs],
                    [id(t) for t in outputs], [t.dtype for t in outputs],
                    torch.is_grad_enabled(), caller_source(), custom=function.__module__ or "?",
                    nondifferentiable=frozenset(id(t) for t in outputs
                                                if tracked and not t.requires_grad))
        if _users_function(call):
            given = set(call.inputs)
            for inner in self.calls[first:]:
                for read in inner.inputs:
                    if read in self.parameters and read not in given:
                        self.hidden_reads.setdefault(read, (inner, function.__name__))
        self.inside_functions.append(inside)
        for tensor in inputs + outputs:
            self._keep(tensor)
        self.calls.append(call)

    def reached(self, call: Call, losses: list[int], inputs: set[int] | None) -> None:
        """A backward pass from ``losses`` (by ``call``) for ``inputs`` (None: all)."""
        first = self.loss_call is None
        self.losses |= frozenset(losses)
        if first:
            self.loss_call, self.loss_inputs = call, inputs
        elif self.loss_inputs is not None:
            self.loss_inputs = None if inputs is None else self.loss_inputs | inputs

    def _keep(self, tensor: torch.Tensor) -> None:
        if id(tensor) in self._alive:
            return
        self._alive[id(tensor)] = tensor
        if isinstance(tensor, torch.nn.Parameter):  # the model keeps it alive anyway
            # (a lazy module's parameter has no shape until its first forward fills it)
            if tensor.requires_grad and not torch.nn.parameter.is_lazy(tensor):
                self.parameters[id(tensor)] = tensor.shape
            return
        try:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._storages:
                self._storages.add(storage.data_ptr())
                self._bytes += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse, meta, functional tensors
            pass

    def parameter_tensors(self) -> dict[int, torch.Tensor]:
        """The trainable parameters the calls read, by id (while the tensors are kept)."""
        return {key: self._alive[key] for key in self.parameters if key in self._alive}

    def release(self) -> None:
        """Drops the tensors (keeps the calls)."""
        self._alive, self._storages = {}, set()


class Recorder:
    """Records steps on the training thread, one from `start` to the start of the next
    optimizer step (`step_starting`), through every ``backward()`` before it (each
    tensor a loss; the backward passes themselves are not recorded), which `take` then
    hands out once. A step whose closure computes the loss (LBFGS) starts, for this
    purpose, once the closure has returned."""

    def __init__(self) -> None:
        self._recording: StepRecording | None = None
        self._completed: StepRecording | None = None
        self._thread: int | None = None
        #: (owner, attribute, original, patch) of what recording patches (`_patch`): the
        #: backward passes and ``torch.autograd.Function.apply``; empty when not recording.
        self._patched: list[tuple[Any, str, Any, Any]] = []
        self._eager = False  # holds `_EAGER`
        self._paused = False  # off the mode stack while a backward pass runs
        self.abandoned = False  # a step was too large to record: no more tries
        #: Called with the recording when a backward pass raises because its loss has no
        #: graph ("does not require grad"): no step follows to explain it at.
        self.on_no_graph: Callable[[StepRecording], None] | None = None

    @property
    def recording(self) -> bool:
        return self._recording is not None

    def start(self) -> None:
        if self._recording is not None or self.abandoned:
            return
        self._recording = StepRecording()
        self._thread = threading.get_ident()
        self._eager = _EAGER.hold()
        self._recording.__enter__()
        method, function, original_grad = (torch.Tensor.backward, torch.autograd.backward,
                                           torch.autograd.grad)
        recorder = self

        def backward(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            with recorder._reached_loss("backward", tensor, kwargs.get(
                    "inputs", args[3] if len(args) > 3 else None)):
                return method(tensor, *args, **kwargs)

        def autograd_backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            with recorder._reached_loss("autograd.backward", tensors, kwargs.get(
                    "inputs", args[4] if len(args) > 4 else None)):
                return function(tensors, *args, **kwargs)

        def grad(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            # Not a gradient penalty's or a meta-learning inner loop's (create_graph: part
            # of the computation of the loss, not its gradient).
            if kwargs.get("create_graph", args[2] if len(args) > 2 else False):
                return original_grad(outputs, inputs, *args, **kwargs)
            if isinstance(inputs, Iterator):  # (model.parameters(): read once, here)
                inputs = tuple(inputs)
            with recorder._reached_loss("autograd.grad", outputs, inputs):
                return original_grad(outputs, inputs, *args, **kwargs)

        self._patch(torch.Tensor, "backward", backward)
        self._patch(torch.autograd, "backward", autograd_backward)
        self._patch(torch.autograd, "grad", grad)
        self._patch_functions()

    def _patch(self, owner: Any, attribute: str, patch: Any) -> None:
        self._patched.append((owner, attribute, vars(owner)[attribute], patch))
        setattr(owner, attribute, patch)

    def _patch_functions(self) -> None:
        """Notes what custom ``torch.autograd.Function``s do (their ``forward`` runs without
        gradient tracking), through ``Function.apply``:

        - a reentrant checkpoint's (`_recomputes`: PyTorch's ``CheckpointFunction``, and
          DeepSpeed's, Megatron's, fairscale's alike): backward() runs its block again with
          tracking if an input needs a gradient, so its calls count as tracked (`recomputed`);
        - the user's, and PyTorch's that wrap a user's computation (`WRAPPING_FUNCTIONS`):
          one call stands for those of its ``forward`` (a gradient reversal's ``view_as``, a
          full backward hook's identity; `StepRecording.applied`);
        - the others (FSDP's and DTensor's machinery): recorded call by call."""
        original = vars(torch.autograd.Function).get("apply")
        if not isinstance(original, classmethod):
            return
        recorder = self

        def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
            recording = recorder._recording
            recomputes = _recomputes(cls)
            if (recording is None or recorder._paused or threading.get_ident() != recorder._thread
                    or not (recomputes or _standing_in(cls))):
                return original.__func__(cls, *args, **kwargs)
            first = len(recording.calls)
            result = original.__func__(cls, *args, **kwargs)
            if recording is not recorder._recording:
                return result
            if not recomputes:
                recording.applied(cls, first, (args, kwargs), result)
            elif any(isinstance(a, torch.Tensor) and a.requires_grad
                     for a in tree_flatten((args, kwargs))[0]):
                recording.recomputed.append(range(first, len(recording.calls)))
            return result

        self._patch(torch.autograd.Function, "apply", classmethod(apply))

    @contextlib.contextmanager
    def _reached_loss(self, how: str, losses: Any, inputs: Any) -> Iterator[None]:
        """Around a backward pass: ``backward()``, ``torch.autograd.backward`` or
        ``torch.autograd.grad`` (``how``) called on ``losses`` (a tensor or several), for
        ``inputs`` (None: every leaf). Recording pauses while it runs (its ops are not the
        step's computation) and ends there inside a step (a closure's loss)."""
        recording = self._recording
        if recording is None or self._paused or threading.get_ident() != self._thread:
            yield  # (paused: ``Tensor.backward`` calling ``torch.autograd.backward``)
            return
        ids = [id(t) for t in tree_flatten(losses)[0] if isinstance(t, torch.Tensor)]
        recording.reached(Call(len(recording.calls), how, ids, [], [],
                               torch.is_grad_enabled(), caller_source()), ids,
                          None if inputs is None else {id(t) for t in tree_flatten(inputs)[0]})
        if recording.abandoned:
            self._complete()
            yield
            return
        recording.__exit__(None, None, None)
        self._paused = True
        try:
            yield
        except RuntimeError as error:
            if "does not require grad" in str(error) and self.on_no_graph is not None:
                self.on_no_graph(recording)
            raise
        finally:
            self._paused = False
            if self._recording is recording:  # not ended meanwhile (a step inside backward)
                recording.__enter__()

    def step_starting(self) -> None:
        """Before an optimizer step's update (training thread): ends a recording that
        reached a loss."""
        if (self._recording is not None and self._recording.losses
                and threading.get_ident() == self._thread):
            self._complete()

    def _complete(self) -> None:
        recording = self._recording
        self.stop()
        if recording is None:
            return
        if recording.abandoned:
            self.abandoned = True
            log.warning("gradwatch: a step keeps more than %d MiB of tensors; missing "
                        "gradients will not be explained", MAX_RECORDED_BYTES >> 20)
        else:
            self._completed = recording

    def take(self) -> StepRecording | None:
        """The recording completed at this step's start, once (after a step). A recording
        still going ends here: it is handed out if it reached a loss, else dropped (a whole
        step without ``backward()`` on this thread); recording never outlasts a step. Only
        the recording's thread takes it (another thread's step, where several train, is
        not the step recorded)."""
        if self._thread is not None and threading.get_ident() != self._thread:
            return None
        if self._completed is None and self._recording is not None:
            if self._recording.losses:
                self._complete()
            else:
                self.stop()
        completed, self._completed = self._completed, None
        return completed

    def stop(self) -> None:
        """Ends recording. The mode is left on the thread that entered it (a mode stack is
        per thread): from another thread (a monitor closed there) it only stops recording."""
        if self._recording is not None:
            if threading.get_ident() == self._thread:
                if not self._paused:
                    self._recording.__exit__(None, None, None)
            else:
                self._recording.abandoned = True  # records nothing more, keeps nothing
                self._recording.calls = []
                self._recording.release()
            self._recording = None
        for owner, attribute, original, patch in reversed(self._patched):
            if vars(owner).get(attribute) is patch:
                while id(original) in _STOPPED_BELOW:  # (theirs stopped first: past them)
                    original = _STOPPED_BELOW.pop(id(original))[1]
                setattr(owner, attribute, original)
            else:  # another recorder (a second monitor's) patched above and records on
                _STOPPED_BELOW[id(patch)] = (patch, original)
        self._patched = []
        if self._eager:
            self._eager = False
            _EAGER.release()


#: Patches of recorders that stopped while another recorder's patch was above theirs (it
#: calls theirs, which passes calls through): id -> (patch, what it replaced), skipped when
#: the one above puts back what it replaced. Training thread.
_STOPPED_BELOW: dict[int, tuple[Any, Any]] = {}


class _EagerWhileRecording:
    """Makes ``torch.compile``d code run eagerly while any recorder records (torch ≥ 2.6's
    ``set_stance("force_eager")``, process-wide, so held by count: the first holder sets it,
    the last restores the stance before). A recorded step then sees every op, and Dynamo
    neither traces the recording mode (a graph break at nearly every op: 31 frames and 6
    graphs where the plain model compiles 1) nor compiles the model again without it.
    Not set where it cannot be: older torch, or inside a compiled region.

    Recorders hold it from the training thread; no lock, so that a forked child (whose
    recorder stops in the fork handler) never waits for one."""

    def __init__(self) -> None:
        self._holders = 0
        self._restore: Any = None

    def hold(self) -> bool:
        """Returns whether the caller holds it (and must `release` it)."""
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is None:
            return False
        if self._holders == 0:
            try:
                self._restore = set_stance("force_eager")
            except RuntimeError:  # "attempted to set_stance in a torch.compile region"
                return False
        self._holders += 1
        return True

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._restore.__exit__(None, None, None)
            self._restore = None


_EAGER = _EagerWhileRecording()


#: A missing gradient that recorded steps do not explain (present in each of them: a head
#: used every other step, an expert routed away now and then) is looked for in bursts of
#: `BURST_STEPS` consecutive recorded steps; after each burst that explained nothing the
#: recorder rests `FIRST_REST_STEPS` steps, twice as long each time, `MAX_REST_STEPS` at most.
BURST_STEPS = 3
FIRST_REST_STEPS = 10
MAX_REST_STEPS = 10_000


class Retries:
    """When to record again while some missing gradient is unexplained (training thread):
    recording slows the steps it records, so fruitless recordings back off."""

    def __init__(self) -> None:
        self._step = 0
        self._fruitless = 0  # recordings in a row that explained nothing
        self._rests = 0
        self._resume_at = 0

    def recorded(self, explained: int) -> None:
        """A recording ended, explaining ``explained`` new parameters."""
        if explained:
            self._fruitless = self._rests = 0
            return
        self._fruitless += 1
        if self._fruitless % BURST_STEPS == 0:
            self._resume_at = self._step + min(FIRST_REST_STEPS << self._rests, MAX_REST_STEPS)
            self._rests += 1

    def step_ended(self) -> bool:
        """Counts a step; whether the next one may be recorded."""
        self._step += 1
        return self._step > self._resume_at


def _flow(calls: Sequence[Call], start: set[int], passes: Callable[[Call], bool],
          differentiable: bool = True) -> tuple[set[int], list[Call]]:
    """Tensors reached from ``start`` through calls that ``passes``, and the calls that
    read a reached tensor but did not pass it on (in call order). ``differentiable``: a
    call passes on only its outputs that can carry a gradient (`_carried`: ``max``'s
    values, not its indices); one that holds back some is among the stopped too."""
    reached, stopped = set(start), []
    for call in calls:
        if reached.intersection(call.inputs):
            if not passes(call):
                stopped.append(call)
                continue
            carried = _carried(call) if differentiable else call.outputs
            reached.update(carried)
            if len(carried) < len(call.outputs):
                stopped.append(call)
    return reached, stopped


def _carried(call: Call) -> list[int]:
    """The outputs of ``call`` that can carry a gradient: floating-point or complex, and
    not marked non-differentiable."""
    return [out for out, dtype in zip(call.outputs, call.output_dtypes, strict=True)
            if (dtype.is_floating_point or dtype.is_complex)
            and out not in call.nondifferentiable]


def _ancestors(calls: Sequence[Call], targets: frozenset[int]) -> set[int]:
    """Tensors the targets were computed from (through any call)."""
    needed = set(targets)
    for call in reversed(calls):
        if needed.intersection(call.outputs):
            needed.update(call.inputs)
    return needed


def _carries_gradient(call: Call) -> bool:
    return any(d.is_floating_point or d.is_complex for d in call.output_dtypes)


def _tracked(call: Call) -> bool:
    return call.grad_enabled and call.name not in DETACHING and \
        call.name not in CONVERSIONS and _carries_gradient(call)


#: Modules of PyTorch's own autograd Functions that wrap a user's computation and pass
#: its gradient on (a full backward hook's, SyncBatchNorm's; DDP's, DataParallel's): as
#: the user's, they are recorded as one call. The others (FSDP's and DTensor's machinery)
#: are recorded call by call.
WRAPPING_FUNCTIONS = ("torch.nn.modules._functions", "torch.nn.parallel.",
                      "torch.distributed.nn.")


def _standing_in(function: type) -> bool:
    """Whether ``function.apply`` is recorded as one call in place of its ``forward``'s."""
    module = function.__module__ or ""
    return module.split(".")[0] != "torch" or module.startswith(WRAPPING_FUNCTIONS)


def _recomputes(function: type) -> bool:
    """A reentrant activation checkpoint's Function: PyTorch's ``CheckpointFunction``, and
    those of DeepSpeed, Megatron and fairscale, named alike: its ``forward`` runs the block
    without gradient tracking, and its ``backward`` runs it again with tracking."""
    return "checkpoint" in function.__name__.lower()


def _users_function(call: Call) -> bool:
    """A custom autograd Function not of PyTorch's own."""
    return bool(call.custom) and call.custom.split(".")[0] != "torch"


def _why(call: Call, held: set[int]) -> tuple[Cause, str, str]:
    """Why ``call`` passes no gradient to its outputs ``held``: cause, reason, hint."""
    if call.name in DETACHING:
        return Cause.BROKEN_AT_OP, "detaches its result from the graph", HINTS["detach"]
    if not call.grad_enabled:
        return Cause.OUTSIDE_TAPE, "", HINTS[Cause.OUTSIDE_TAPE]
    if any(out in call.nondifferentiable and (dtype.is_floating_point or dtype.is_complex)
           for out, dtype in zip(call.outputs, call.output_dtypes, strict=True) if out in held):
        return (Cause.BROKEN_AT_OP, "marks the output the loss reads non-differentiable "
                "(ctx.mark_non_differentiable)", HINTS["non-differentiable"])
    dtypes = ", ".join(sorted({str(d).removeprefix("torch.") for out, d in
                               zip(call.outputs, call.output_dtypes, strict=True)
                               if out in held or not held}))
    reason = f"outputs {dtypes}, which carries no gradient"
    if call.name in ("argmax", "argmin", "argsort", "topk", "max", "min", "sort"):
        return Cause.BROKEN_AT_OP, reason, HINTS["argmax"]
    if call.name in _COMPARISONS or "bool" in dtypes:
        return Cause.BROKEN_AT_OP, reason, HINTS["comparison"]
    if call.name in ("round", "floor", "ceil", "trunc"):
        return Cause.BROKEN_AT_OP, reason, HINTS["round"]
    return Cause.BROKEN_AT_OP, reason, HINTS["cast"]


def _stand_in(recording: StepRecording, param: torch.Tensor, updated: Collection[int],
              upstream: set[int]) -> bool:
    """Whether the loss was computed from parameters none of which an optimizer updates
    (in ``updated``), one of them trainable and shaped like ``param``: the model that
    trains is another instance than the optimizer's (created again, copied or reloaded
    after the optimizer). A loss that also reads updated parameters (a model trained in
    part, the rest left out of the optimizer) is not that."""
    read = [(other, shape) for other, shape in recording.parameters.items()
            if other in upstream]
    return (bool(updated) and not any(other in updated for other, _ in read)
            and any(shape == param.shape for _, shape in read))


def diagnose(recording: StepRecording, param: torch.Tensor, name: str,
             updated: Collection[int] = (), stepped: bool = True) -> Diagnosis:
    """The verdict for ``param`` (called ``name``), which got no gradient. ``updated``:
    the ids of the parameters the optimizers known update (this one's included);
    ``stepped``: the optimizer of ``param`` is the one whose step ended the recorded step
    and found no gradient (else a gradient computed at its ``backward()`` may have been
    zeroed on purpose before another loss: a GAN's generator, after the critic's step)."""
    def verdict(cause: Cause, call: Call | None = None, reason: str = "",
                hint: str = "") -> Diagnosis:
        return Diagnosis(name, cause, call.name if call else "", call.name if call else "",
                         call.source if call else None, reason, hint or HINTS.get(cause, ""),
                         framework="PyTorch")

    if not param.requires_grad:
        return verdict(Cause.NOT_TRACKED, reason="requires_grad is False")
    calls, start = recording.as_backward_runs(), {id(param)}
    readers = [c for c in calls if id(param) in c.inputs]
    losses = recording.losses
    upstream = _ancestors(calls, losses)
    stand_in = ({"reason": STAND_IN, "hint": HINTS["stand-in"]}
                if _stand_in(recording, param, updated, upstream) else {})
    if not readers:
        if id(param) in recording.hidden_reads:
            call, function = recording.hidden_reads[id(param)]
            return verdict(Cause.OUTSIDE_TAPE, call,
                           f"is in the forward() of the custom autograd.Function {function}, "
                           "which runs without gradient tracking, and the parameter is not "
                           "one of its inputs", HINTS["function input"])
        return verdict(Cause.UNUSED, **stand_in)
    if not losses:
        return verdict(Cause.UNKNOWN)
    everything, _ = _flow(calls, start, lambda call: call.name not in CONVERSIONS,
                          differentiable=False)
    if not losses & everything:
        if not stand_in and not any(c.grad_enabled and c.name not in DETACHING
                                    for c in readers):
            # Read for bookkeeping alone (untracked or detached, as model.to(), a
            # state_dict copy or an evaluation under no_grad read it): not computed with.
            # (A copy that trains instead is a stand-in: its reader says where.)
            return verdict(Cause.UNUSED)
        conversions = [c for c in calls if c.name in CONVERSIONS
                       and everything.intersection(c.inputs)]
        if conversions:
            call = conversions[0]
            return verdict(Cause.LEFT_TENSORFLOW, call, f"via {call.name}")
        # Name a read that computed something (not model.to() or a copy before the step).
        named = [c for c in readers if c.grad_enabled and c.name not in DETACHING] or readers
        first = next((c for c in named if c.source is not None), named[0])
        return verdict(Cause.NOT_ON_LOSS_PATH, first, **stand_in)
    reached, stopped = _flow(calls, start, _tracked)
    if losses & reached:
        call = recording.loss_call
        if call is None:
            return verdict(Cause.UNKNOWN)
        if recording.loss_inputs is not None and id(param) not in recording.loss_inputs:
            return verdict(Cause.UNKNOWN, call, "was not asked for it (inputs=...)",
                           HINTS["not asked"])
        if call.name == "autograd.grad":
            return verdict(Cause.UNKNOWN, call, "returned its gradient, which was not in "
                           ".grad at the optimizer step", HINTS["not stored"])
        # Through a function whose insides were not seen, of whose outputs the loss reads
        # some (the attention weights of nn.MultiheadAttention): those need not depend on
        # the parameter, and as it got no gradient, they do not.
        partly = {c.order: c for c in calls if c.name in PARTLY_DEPENDENT
                  and not upstream.issuperset(c.outputs)}
        around, _ = _flow(calls, start, lambda c: _tracked(c) and c.order not in partly)
        if not losses & around:
            call = next(c for c in partly.values() if reached.intersection(c.inputs))
            read = [str(k + 1) for k, out in enumerate(call.outputs) if out in upstream]
            return verdict(Cause.NOT_ON_LOSS_PATH, call,
                           f"of its {len(call.outputs)} outputs the loss reads only output "
                           f"{', '.join(read)}, which does not depend on it")
        around, blocked = _flow(calls, start,
                                lambda c: _tracked(c) and not _users_function(c))
        if not losses & around:  # only through the user's Functions: one gives none
            function = next(c for c in blocked if _users_function(c))
            return verdict(Cause.BROKEN_AT_OP, function, "is a custom autograd.Function "
                           "whose backward() returns no gradient (None) for it",
                           HINTS["function"])
        if not stepped:
            return verdict(Cause.UNKNOWN)
        return verdict(Cause.CLEARED, call,
                       "zero_grad() between backward() and step(), or .grad set to None")
    # (of a call that passed on some outputs, those it held back)
    on_path = [c for c in stopped if upstream.intersection(set(c.outputs) - reached)]
    call = (on_path or stopped)[0]
    cause, reason, hint = _why(call, set(call.outputs) - reached)
    return verdict(cause, call, reason, hint)

