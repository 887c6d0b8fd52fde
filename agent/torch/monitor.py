"""`GradientMonitor` for PyTorch: plain training, DistributedDataParallel and FSDP.

    monitor = GradientMonitor(collector="host:8470", training_job="my-run")
    optimizer = monitor.wrap(optimizer, model)   # names come from model.named_parameters()
    ...                                          # loss.backward(); optimizer.step() as usual
    monitor.close()                              # also a context manager; closes at exit

Every parameter of every param group is reported at every ``optimizer.step()``, except
those frozen (``requires_grad`` False) when the first step runs, until they train.
Statistics are taken at the first of these in a step, so they are of the gradients
the backward pass produced: ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``
(norms *before* clipping), ``GradScaler.step`` (norms divided by the loss scale; a step
the scaler skips is reported as skipped), ``optimizer.step`` (given a closure: after
the closure's first call). Under DDP each rank's gradients are measured before the
all-reduce, by a communication hook. The training thread never waits for the device or
the network.

Identity: the task index is the process group's rank at the first step, else torchrun's
``RANK``; ``TORCHELASTIC_RUN_ID`` is the default job. Every setting is an argument or a
``GRADWATCH_*`` variable (`gradwatch.agent.core.settings.AgentSettings`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from gradwatch import __version__
from gradwatch.agent.core.diagnosis import Cause, Diagnosis
from gradwatch.agent.core.identity import torchrun
from gradwatch.agent.core.monitor import MonitorCore
from gradwatch.agent.core.session import Variable, variable_table
from gradwatch.agent.torch import ddp, patches
from gradwatch.agent.torch.diagnosis import STALE, Recorder, Retries, StepRecording, diagnose
from gradwatch.agent.torch.names import ddp_of, parameter_names, strategy_of
from gradwatch.agent.torch.session import TorchSession, local_tensor
from gradwatch.agent.torch.stats import measure

log = logging.getLogger(__name__)

#: How often (optimizer steps) all frozen parameters are checked for thawing (the first
#: and last are checked every step).
THAW_CHECK_STEPS = 100


class GradientMonitor(MonitorCore):
    """Watches the gradients of one training process (one rank) for a collector.

    Thread-safety: `wrap` and `close` are called from the training thread; the DDP
    hook runs on the autograd thread; network I/O and device-to-host copies are the
    background sender's.

    Args: see the TensorFlow `gradwatch.agent.GradientMonitor`: ``collector``,
    ``training_job``, ``task_type``, ``task_index``, ``buffer_steps``, ``statistics_every``,
    ``max_buffer_bytes``, ``flush_interval_s``, ``enabled``, ``tls``, ``tls_ca_file``,
    ``tls_cert_file``, ``tls_key_file``, ``token``, ``token_file``; each has a
    ``GRADWATCH_*`` variable. An invalid one disables the monitor with one log line.
    """

    launchers = (torchrun,)

    def __init__(self, collector: str | None = None, training_job: str | None = None,
                 **settings: Any) -> None:
        super().__init__(collector=collector, training_job=training_job, **settings)
        self._watched: dict[int, _Watched] = {}
        self._recorder = Recorder() if self.enabled and self.settings.diagnose else None
        if self._recorder is not None:
            self._recorder.on_no_graph = self._explain_no_graph
        self._explained: set[int] = set()  # parameters diagnosed (ids)
        self._stale: set[int] = set()  # parameters said to be stepped on old gradients
        self._stale_suspects: tuple[_Watched, list[torch.Tensor]] | None = None  # `step_ended`
        #: Watched optimizers garbage-collected since the training thread last looked.
        self._gone: list[_Watched] = []
        self._unexplained: set[int] = set()  # seen without gradient, no verdict yet (ids)
        self._retries = Retries()
        self._logged: set[str] = set()
        if self.enabled:
            patches.install(self)

    def wrap(self, optimizer: torch.optim.Optimizer,
             model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Watches every parameter of ``optimizer`` (patched in place, returned). ``model``
        (plain, DDP, FSDP or ``torch.compile``d) names the parameters; without it, the
        names the optimizer was given (``model.named_parameters()``), else
        ``group{i}.param{j}``. Under DDP, pass the DDP model: its communication hook
        measures each rank's gradients before the all-reduce (wrap before the first
        backward; a hook of your own registered while the monitor is open is measured
        before too)."""
        updating = _updating_optimizer(optimizer)
        if not self.enabled or self.watched(updating) is not None:
            return optimizer
        # Before forgetting the dropped optimizers: the one replaced may be one of them
        # (``optimizer = AdamW(...)`` dropped the one bound to that name before).
        replaced = self._replaced_by(updating)
        if replaced is not None:
            if self._watched.get(replaced.optimizer_id) is replaced:
                del self._watched[replaced.optimizer_id]
            replaced.retire()  # (its session and name go on in the new one's)
        self._forget_gone()  # (first: a new optimizer may have a dropped one's id and name)
        try:
            watched = _Watched(self, updating, model, replaced)
        except Exception:  # gradwatch must never break training
            log.exception("gradwatch: cannot watch %s", type(optimizer).__name__)
            return optimizer
        if replaced is not None:
            said = f"replaced {watched.name}"  # once: a loop makes one each epoch
            log.log(logging.DEBUG if said in self._logged else logging.INFO,
                    "gradwatch: a new %s over the same parameters replaces the one wrapped "
                    "before (an optimizer made each epoch): reported as %s, its step count "
                    "going on", type(updating).__name__, watched.name)
            self._logged.add(said)
        self._watched[id(updating)] = watched
        weakref.finalize(updating, self._gone.append, watched).atexit = False
        if self._recorder is not None:  # the first step is explained at its end
            self._recorder.start()
        ddp_model = ddp_of(model)
        if ddp_model is not None:
            self._hook_into(ddp_model)
        return optimizer

    def _forget_gone(self) -> None:
        """Stops watching the optimizers garbage-collected since (training thread: a
        finalizer, run wherever the garbage collector runs, only queues them): their
        sessions end at the collector, their parameters and models may go, their names
        are free. A sweep training model after model in one process keeps none."""
        while self._gone:
            watched = self._gone.pop()
            if watched.retired:
                continue  # replaced before (its successor goes on)
            named = self._watched.get(watched.optimizer_id) is watched
            if named:  # (else a newer optimizer took its id, and with it its name)
                del self._watched[watched.optimizer_id]
            ids = watched.param_ids | {id(p) for p in watched.params}
            ids -= set().union(*(w.param_ids for w in self._watched.values()))  # still ours
            self._explained -= ids
            self._unexplained -= ids
            self._stale -= ids
            if self._stale_suspects is not None and self._stale_suspects[0] is watched:
                self._stale_suspects = None
            self.release(watched.key, watched.optimizer_id if named else None)
            watched.forget()

    def _replaced_by(self, optimizer: torch.optim.Optimizer) -> _Watched | None:
        """The wrapped optimizer that ``optimizer`` replaces: one of its class over the
        same parameters (a loop that makes an optimizer each epoch). Watching both would
        keep every old one alive, and make a session and a name for each."""
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return next((w for w in self._watched.values() if not w.retired
                     and w.optimizer_type is type(optimizer) and w.param_ids == ids), None)

    def ddp_made(self, ddp_model: Any) -> None:
        """A DistributedDataParallel was just made: if it holds parameters of optimizers
        wrapped before (with its module, or none), it gets the measuring hook at its first
        forward (after any hook of the user's, registered meanwhile: DDP takes one), and
        their sessions say DDP distributes them."""
        try:
            ids = {id(p) for p in ddp_model.parameters()}
            found = [w for w in self._watched.values() if w.param_ids & ids]
            for watched in found:
                watched.strategy = "DistributedDataParallel"
            if not found:
                return

            def first_forward(module: Any, args: Any) -> None:
                handle.remove()
                if not self._closed:
                    self._hook_into(module)

            handle = ddp_model.register_forward_pre_hook(first_forward)
        except Exception:  # gradwatch must never break training
            log.exception("gradwatch: cannot watch a new DistributedDataParallel")

    def _hook_into(self, model: Any) -> None:
        """Registers the measuring communication hook on a DDP model, unless it has one."""
        hook = ddp.comm_hook_of(model)
        if hook is not None:
            if not ddp.measures(hook):
                log.warning("gradwatch: the DDP model has a communication hook of its own "
                            "(%s): gradients are measured after it, as the optimizer sees "
                            "them (after the all-reduce). To measure each rank's own, register "
                            "monitor.comm_hook(your_hook) in its place, before wrap().",
                            getattr(hook, "__name__", type(hook).__name__))
            return
        try:
            model.register_comm_hook(None, self.comm_hook())
        except Exception as error:  # e.g. after the first backward
            log.warning("gradwatch: cannot add a DDP communication hook (%s); gradients "
                        "are measured after the all-reduce", error)

    def comm_hook(self, hook=None):
        """A DDP communication hook that measures each bucket's gradients before calling
        ``hook`` (default: DDP's all-reduce), for ``ddp_model.register_comm_hook(state,
        monitor.comm_hook(hook))``."""
        return ddp.MeasuringHook(self, hook)

    def _on_fork_in_child(self) -> None:
        """A DataLoader worker forked while a step is recorded must not record its own
        calls (the hooks left behind see the monitor closed and do nothing)."""
        if self._recorder is not None:
            self._recorder.stop()

    def _on_close(self) -> None:
        if self._recorder is not None:
            self._recorder.stop()
        patches.uninstall(self)
        for watched in self._watched.values():
            watched.remove_hooks()
            watched.forget()
        # (the sessions still deliver what they hold; then the core forgets them too)
        self._watched, self._gone, self._stale_suspects = {}, [], None

    def identify_by_process_group(self) -> None:
        """Before the first session (under `session_lock`): in an initialized process
        group the task index is this process's rank, unless a setting names it. Launchers
        that set no ``RANK`` (``mp.spawn``, Lightning's) are covered: by the first step
        the group exists, even where the monitor was made before it."""
        if (self._sessions or self.settings.task_index is not None
                or not torch.distributed.is_available()
                or not torch.distributed.is_initialized()):
            return
        self.identity = dataclasses.replace(self.identity,
                                            task_index=torch.distributed.get_rank())

    # -- called by the patches and hooks ---------------------------------------------------

    def step_starting(self) -> None:
        """Before a step's update, once its gradients are computed (training thread)."""
        if self._recorder is not None:
            self._recorder.step_starting()

    def step_ended(self, watched: _Watched) -> None:
        """After a step: explain new missing gradients with the step's recording if there
        is one, else record the next step (training thread)."""
        self._forget_gone()
        session = watched.session()
        if self._recorder is None or session is None:
            return
        recording = self._recorder.take()
        if recording is not None:
            explained = self._explain(recording, watched)
            recording.release()
            self._retries.recorded(explained)
        suspects, self._stale_suspects = self._stale_suspects, None
        if len(self._watched) == 1 and len(session.missing) == len(session.params) and any(
                p.grad is not None for p in session.params):  # (with several optimizers,
            # another's backward may be the step's)
            missing = [session.params[i] for i in sorted(session.missing)]
            if recording is not None:
                self._explain_stale(watched, missing)
            else:  # what the recording of the next step finds first (zero_grad() after
                self._stale_suspects = watched, missing  # backward())
        if suspects is not None:
            self._explain_stale(*suspects)
        self._unexplained.update(id(session.params[i]) for i in session.missing)
        self._unexplained -= self._explained
        if self._retries.step_ended() and self._unexplained and not self._recorder.recording:
            self._recorder.start()

    def _explain_stale(self, watched: _Watched, missing: list[torch.Tensor]) -> None:
        """A step that found every gradient as the previous step (or ``zero_grad``) left
        it, ``missing`` its parameters: no backward pass reached a parameter in
        between (``step()`` called twice, a skipped ``backward()``), and the update reused
        old gradients. Said as such once the step's recording, or the next step's, found
        no other cause (``zero_grad()`` between backward and step leaves the same zeros); a
        healthy next step's recording has nothing to explain, so it does not wait for one
        that finds a cause, which replaces this verdict."""
        names = dict(zip(map(id, watched.params), watched.names, strict=True))
        for param in missing:
            if id(param) in self._explained or id(param) in self._stale \
                    or id(param) not in names:  # (no longer watched: a regroup)
                continue
            self._stale.add(id(param))
            self._give(param, Diagnosis(
                names[id(param)], Cause.UNKNOWN, reason=STALE, hint=(
                    "call backward() on a loss computed from the parameters once before each "
                    "optimizer step; write gradients with p.grad.copy_(...), not through "
                    ".data"), framework="PyTorch"))

    def _explain(self, recording: StepRecording, stepped: _Watched) -> int:
        """Diagnoses the parameters without gradient at this step that have no verdict yet
        with ``recording`` (this step's, which ended at ``stepped``'s step); returns how
        many."""
        explained = 0
        everything = list(self._watched.values())
        updated = set().union(*(w.param_ids for w in everything))
        for watched in everything:
            session = watched.session()
            if session is None:
                continue
            if watched is not stepped and not watched.param_ids & recording.parameters.keys():
                # Its model took no part in the recorded loss (a GAN's discriminator loss,
                # recorded to its step, and the generator): the recording ending at its own
                # step explains it.
                continue
            for i in sorted(session.missing):
                param = session.params[i]
                if id(param) in self._explained:
                    continue
                # (FSDP: the loss reads unsharded copies of the parameters, never the
                # optimizer's shards, so no read would count as of an updated parameter.)
                verdict = diagnose(recording, param, watched.names[i],
                                   () if watched.strategy.startswith("FSDP") else updated,
                                   stepped=watched is stepped)
                if verdict.cause is Cause.UNKNOWN and watched is not stepped:
                    continue  # another optimizer's loss: its own step's recording may tell
                self._explained.add(id(param))
                explained += 1
                self._give(param, verdict)
        return explained

    def _explain_no_graph(self, recording: StepRecording) -> None:
        """``backward()`` raised, its loss having no graph at all (a loss through
        ``argmax`` alone): no parameter of the recorded computation gets a gradient, and no
        step follows to explain it at, so it is said now, before PyTorch's error
        propagates (training thread). Never raises."""
        try:
            everything = list(self._watched.values())
            updated = set().union(*(w.param_ids for w in everything))
            for watched in everything:
                if not watched.param_ids & recording.parameters.keys():
                    continue  # its model took no part
                for param, name in zip(watched.params, watched.names, strict=True):
                    if id(param) in self._explained or not param.requires_grad:
                        continue
                    verdict = diagnose(recording, param, name, updated)
                    if verdict.cause is not Cause.UNKNOWN:
                        self._explained.add(id(param))
                        self._give(param, verdict)
        except Exception:  # gradwatch must never change how training fails
            log.debug("gradwatch: explaining a loss without graph failed", exc_info=True)

    def _give(self, param: torch.Tensor, verdict: Diagnosis) -> None:
        """Attaches ``verdict`` to ``param``'s session; logs each explanation once."""
        self.add_diagnosis(param, verdict.variable, verdict)
        if verdict.explanation() not in self._logged:
            self._logged.add(verdict.explanation())
            log.warning("gradwatch: %s", verdict.message())

    def watched(self, optimizer: Any) -> _Watched | None:
        """``optimizer``'s, if it is wrapped (not a dropped one's whose id it took)."""
        watched = self._watched.get(id(optimizer))
        return watched if watched is not None and watched.optimizer is optimizer else None

    def zeroed_with(self, model: torch.nn.Module) -> list[_Watched]:
        """The wrapped optimizers whose gradients ``model.zero_grad()`` zeroes: those wrapped
        with ``model``, or updating its parameters (wrapped without a model)."""
        found, ids = [], None
        for w in list(self._watched.values()):
            if w.optimizer is None:  # dropped, not yet forgotten
                continue
            if w.model is not model:
                if ids is None:
                    ids = {id(p) for p in model.parameters()}
                if not ids & w.param_ids:
                    continue
            found.append(w)
        return found

    def watching(self, params: Iterable[torch.Tensor]) -> list[_Watched]:
        """The wrapped optimizers that update any of ``params`` (not dropped ones, which
        `_forget_gone` has yet to forget: any thread, the DDP hook's too)."""
        ids = {id(p) for p in params}
        return [w for w in list(self._watched.values())
                if ids & w.param_ids and w.optimizer is not None]


def _updating_optimizer(optimizer: Any) -> Any:
    """The optimizer that updates the parameters, behind wrappers that hold it (as
    ``.optimizer``, ``.base_optimizer`` or any other attribute) and are either not set up
    as torch optimizers themselves (no step hooks: Hugging Face Accelerate's
    ``AcceleratedOptimizer``, which steps it only when accumulated gradients are due) or
    share its ``param_groups`` and step it themselves (SAM, whose users call ``first_step``
    and ``second_step`` and never its own ``step``; Lookahead, timm's as
    ``._base_optimizer``). Anything else is returned as is."""
    while True:
        held = getattr(optimizer, "__dict__", {})
        for inner in (getattr(optimizer, "optimizer", None),
                      getattr(optimizer, "base_optimizer", None), *held.values()):
            if (isinstance(inner, torch.optim.Optimizer) and inner is not optimizer
                    and (not hasattr(optimizer, "_optimizer_step_pre_hooks")
                         or getattr(optimizer, "param_groups", None) is inner.param_groups)):
                optimizer = inner
                break
        else:
            return optimizer


def _initialising_state() -> bool:
    """Whether the step being taken is torch.distributed.checkpoint's, not training's:
    ``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` (TorchTitan's resume)
    give a stateless optimizer zero gradients and a zero learning rate, and step it once
    to create the state a checkpoint is loaded into (``_init_optim_state``). Looked for
    only while the optimizer has no state; where torch calls it otherwise, such a step
    is reported as any other."""
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state":
            return True
        frame = frame.f_back
    return False


def _parameters(optimizer: Any) -> list[torch.Tensor]:
    """The optimizer's parameters in group order, each once: torch accepts a parameter
    listed twice (with a warning), as a tied weight is when both modules' parameters are
    given, and it is still one parameter with one gradient."""
    return list({id(p): p for group in optimizer.param_groups
                 for p in group["params"]}.values())


class _Watched:
    """One wrapped optimizer: its patched methods and its session (created at the first
    step, when it is known whether a GradScaler drives it and which parameters are
    frozen; succeeded by another when the parameters it trains change)."""

    def __init__(self, monitor: GradientMonitor, optimizer: torch.optim.Optimizer,
                 model: torch.nn.Module | None, replaced: _Watched | None = None) -> None:
        """``replaced``: the watched optimizer this one replaces (`GradientMonitor.wrap`):
        its name, and its sessions' key and step count, go on here."""
        self.monitor = monitor
        # Both held weakly: a model and optimizer the user drops must go (`_forget_gone`).
        self._optimizer = weakref.ref(optimizer)
        self.optimizer_id, self.optimizer_type = id(optimizer), type(optimizer)
        #: Its ``zero_grad`` counts as the optimizer's (`patches` sees it called); it names
        #: the parameters.
        self._model = None if model is None else weakref.ref(model)
        #: The key of its sessions (`MonitorCore.adopt`), and the number of its first step.
        self.key, self._first_step = id(self), 0
        #: The session of the optimizer it replaces, which its own continues if it watches
        #: the same table (`_create`); dropped then, so that no chain of them is kept.
        self._continues: TorchSession | None = None
        if replaced is None:
            self.name = monitor.optimizer_name(optimizer)
        else:
            self.name = monitor.pass_name(replaced.optimizer_id, id(optimizer))
            self.key = replaced.key
            # (one replaced before its first step passes on what it would have continued)
            self._continues = replaced._session or replaced._continues
            replaced._continues = None
            if self._continues is not None:
                self._first_step = self._continues.steps
        #: The optimizer's parameters; from the first step, the watched ones (see `_create`).
        self.params = _parameters(optimizer)
        if not self.params:
            raise ValueError("the optimizer has no parameters")
        #: Every parameter of the optimizer, watched or not (clipping them measures).
        self.param_ids = {id(p) for p in self.params}
        #: `_layout` at the latest look (see `_regrouped`).
        self._layout_seen = self._layout()
        self.names = self._names(self.params)
        self.device = local_tensor(self.params[0]).device
        self.strategy = strategy_of(model)
        self._session: TorchSession | None = None
        self.retired = False  # replaced by a successor (`retire`)
        #: The optimizer's parameters not watched because frozen, until one trains.
        self._frozen: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._failed = False
        #: A GradScaler drives this optimizer (its skipped steps are not alarming).
        self.scaled = False
        #: This step's update ran (GradScaler.step skips it when gradients overflowed).
        self.stepped = False
        #: Not a training step: it only creates the optimizer's state
        #: (`_initialising_state`), or a joined rank shadows the others' (`ddp.shadowing`).
        self._initialising = False
        #: Inside ``optimizer.step`` (a closure's ``zero_grad`` is part of the step).
        self._stepping = False
        #: The step's closure returned once: what it computed is the step's measure.
        self._measured = False
        #: Measures taken earlier in the step (DDP hook, autograd thread): (params, measures).
        self._parts: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        # The hooks run eagerly where the step is compiled (PyTorch's "compiling the
        # optimizer" recipe): Dynamo would trace their bookkeeping, recompile at every step
        # for the ring's index, and break the optimizer's graph inside them. Disabled here,
        # not at import: importing Dynamo takes 1.5 s, which making the optimizer has paid.
        self.before_step = torch.compiler.disable(self.before_step)
        self.after_step = torch.compiler.disable(self.after_step)
        self._hooks = [
            optimizer.register_step_pre_hook(torch.compiler.disable(self._pre_step)),
            optimizer.register_step_post_hook(lambda *_: self.after_step())]
        self._patch_zero_grad(optimizer)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer()

    @property
    def model(self) -> torch.nn.Module | None:
        return None if self._model is None else self._model()

    def _names(self, params: list[torch.Tensor]) -> list[str]:
        """``params``' names in the model, else those the optimizer was given (torch ≥ 2.6
        keeps ``model.named_parameters()``'s as ``param_names``), else ``group{i}.param{j}``
        (their place in the optimizer)."""
        names = parameter_names(self.model) if self.model is not None else {}
        places = {}
        for g, group in enumerate(self.optimizer.param_groups):
            given = group.get("param_names") or ()
            for j, p in enumerate(group["params"]):
                places.setdefault(id(p), given[j] if j < len(given) else f"group{g}.param{j}")
        return [names.get(id(p)) or places[id(p)] for p in params]

    def session(self) -> TorchSession | None:
        """The session, created at the first step (training thread)."""
        if self._session is None and not self._failed:
            with self._lock:
                if self._session is None:
                    self._create()
        return self._session

    def measures(self) -> bool:
        """Whether this step's gradients are measured (any thread; see
        `TorchSession.measures`): not once watching failed."""
        session = self._session
        return not self._failed and (session is None or session.measures())

    def measure_part(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Measures some parameters' gradients early in this step, for its record (any
        thread: the DDP hook's, on the autograd thread). A failure is logged once, and
        the optimizer is no longer watched."""
        self.guarded(self._add_part, params, grads)

    def _add_part(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        measures = measure(grads, self.device)
        with self._lock:
            self._parts.append((params, measures))

    def _create(self) -> None:
        monitor = self.monitor
        # Parameters frozen when training starts (requires_grad False: fine-tuning freezes a
        # backbone while the optimizer holds every parameter) get no gradient on purpose;
        # like Keras's non-trainable variables they are not watched, until they train.
        trainable = [p.requires_grad for p in self.params]
        if any(trainable) and not all(trainable):
            self._frozen = [p for p, t in zip(self.params, trainable, strict=True) if not t]
            log.info("gradwatch: %s: %d of %d parameters are frozen (requires_grad=False) "
                     "and not watched until they train", self.name, len(self._frozen),
                     len(self.params))
            self.params = [p for p, t in zip(self.params, trainable, strict=True) if t]
            self.names = [n for n, t in zip(self.names, trainable, strict=True) if t]
        with monitor.session_lock:
            monitor.identify_by_process_group()
        continued, self._continues = self._continues, None
        if continued is not None and self._same_table(continued):
            # An optimizer made again over the same parameters (each epoch, at an LR
            # restart): its session goes on, with no new ring buffer or registration.
            self._session = continued
            return
        self._session = self._start(self.params, self.names, self._first_step)
        self._failed = self._session is None

    def _same_table(self, session: TorchSession) -> bool:
        """Whether ``session`` (the replaced optimizer's) is still this key's and would be
        registered as this optimizer's: the same parameters, in order, under the same
        names, shapes and dtypes, strategy and loss scaling."""
        with self.monitor.session_lock:
            if self.monitor.session_of(self.key) is not session or session.closed:
                return False
        if len(session.params) != len(self.params) or any(
                p is not q for p, q in zip(session.params, self.params, strict=True)):
            return False
        registration = session.registration()
        return (registration.strategy == self.strategy
                and registration.loss_scaled == self.scaled
                and list(registration.variables) == variable_table([
                    Variable(name, tuple(p.shape), str(p.dtype).removeprefix("torch."))
                    for name, p in zip(self.names, self.params, strict=True)]))

    def _start(self, params: list[torch.Tensor], names: list[str],
               first_step: int = 0) -> TorchSession | None:
        """A session for ``params``, shipped from now on; None if it cannot be made."""
        monitor = self.monitor
        try:
            session = TorchSession(
                monitor.identity, self.name, params, names, monitor.settings.buffer_steps,
                strategy=self.strategy, loss_scaled=self.scaled,
                every=monitor.settings.statistics_every, first_step=first_step,
                sharded=self.strategy.startswith("FSDP")
                or any(local_tensor(p) is not p for p in params),
                versions={"gradwatch": __version__, "torch": torch.__version__})
        except Exception:  # gradwatch must never break training
            log.exception("gradwatch: cannot watch %s", self.name)
            return None
        with monitor.session_lock:
            monitor.adopt(self.key, session)
        return session

    def _layout(self) -> tuple[int, int]:
        """The optimizer's param groups and parameters, counted (cheap, each step)."""
        groups = self.optimizer.param_groups
        return len(groups), sum(len(group["params"]) for group in groups)

    def _regrouped(self, session: TorchSession) -> bool:
        """Whether the param groups hold other parameters than at the latest look: counted
        every step (``add_param_group``, parameters appended to or removed from a group's
        list), compared one by one every `THAW_CHECK_STEPS` (one swapped for another)."""
        return self._layout() != self._layout_seen or (
            session.steps % THAW_CHECK_STEPS == 0
            and {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            != self.param_ids)

    def _regroup(self) -> None:
        """Watches, from this step on, the parameters the optimizer holds and trains now:
        frozen ones that thawed (fastai's ``unfreeze``) and those added (with
        ``add_param_group``, gradual unfreezing, or to a group's list) join; those taken
        out of every group leave. A successor session with the new table takes this step
        and continues the step count; the collector gets it once the current session's
        steps are in (one not registered yet is replaced instead: `Buffer.add`, `drain`)
        (training thread, before the step's statistics are taken)."""
        optimizer = self.optimizer
        self._layout_seen = self._layout()
        everything = _parameters(optimizer)
        self.param_ids = {id(p) for p in everything}
        kept = [k for k, p in enumerate(self.params) if id(p) in self.param_ids]
        watched = {id(p) for p in self.params}
        unwatched = [p for p in everything if id(p) not in watched]
        self._frozen = [p for p in unwatched if not p.requires_grad]
        added = [p for p in unwatched if p.requires_grad]
        removed = len(self.params) - len(kept)
        if (not added and not removed) or len(kept) + len(added) == 0:
            return
        params = [self.params[k] for k in kept] + added
        names = [self.names[k] for k in kept] + self._names(added)
        previous = self._session
        session = self._start(params, names, first_step=previous.steps)
        if session is None:  # the current session goes on
            return
        session.take_over(previous)
        self.params, self.names, self._session = params, names, session
        changes = ([f"{len(added)} more parameters train"] if added else []) + (
            [f"{removed} left the optimizer"] if removed else [])
        log.info("gradwatch: %s: %s; watched from step %d on: %d in all", self.name,
                 " and ".join(changes), session.steps, len(params))

    def _patch_zero_grad(self, optimizer: Any) -> None:
        """After ``optimizer.zero_grad``, gradients zeroed in place (``set_to_none=False``)
        are not gradients of the next step. The optimizer's own method is patched: it
        pickles and copies without it (its ``__getstate__``); a model's is seen through
        ``torch.nn.Module.zero_grad`` instead (`patches`), so that the model still pickles
        (``torch.save(model)``) and a deep copy zeroes its own gradients."""
        original = vars(optimizer).get("zero_grad")  # patched before, else the class's
        if original is None:  # called through a weak reference: the optimizer can go
            method, owner = type(optimizer).zero_grad, weakref.ref(optimizer)

            def original(*args: Any, **kwargs: Any) -> Any:
                return method(owner(), *args, **kwargs)

            functools.update_wrapper(original, method)

        @functools.wraps(original)
        def zero_grad(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            self.gradients_zeroed()
            return result

        optimizer.zero_grad = zero_grad

    def gradients_zeroed(self, ids: set[int] | None = None) -> None:
        """After a ``zero_grad`` of the optimizer's, or of a model's holding the parameters
        ``ids`` (None: all of them; a submodule's holds some)."""
        if not self._stepping:  # a backward pass not stepped on (a batch dropped): its
            with self._lock:    # measures go with its gradients
                self._parts = [(params, measures) for params, measures in self._parts
                               if ids is not None and ids.isdisjoint(map(id, params))]
        if self._session is not None:
            self.guarded(self._session.gradients_zeroed, not self._stepping, ids)

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()

    def forget(self) -> None:
        """Lets its parameters go (its optimizer is gone; it is in reference cycles, which
        only the garbage collector's rarer full passes would free)."""
        self.params, self._frozen, self._parts, self._session = [], [], [], None
        self._failed = True

    def retire(self) -> None:
        """Stops watching: another optimizer replaced this one (its steps, if it takes any
        more, are not reported)."""
        self.remove_hooks()
        self._failed = self.retired = True

    def _pre_step(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple | None:
        """Before ``optimizer.step``: measures now, or, when the step is given a closure
        (which computes the gradients inside the step: LBFGS, ``step(closure)``), after
        the closure's first call. Returns the arguments with the closure wrapped
        (``args`` starts with the optimizer itself)."""
        if ddp.shadowing.active or (not optimizer.state and _initialising_state()):
            self._initialising = True
            return None
        self._stepping = True
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if not callable(closure):
            self.before_step()
            return None

        @functools.wraps(closure)
        def measured(*closure_args: Any, **closure_kwargs: Any) -> Any:
            result = closure(*closure_args, **closure_kwargs)
            self.before_step()
            self._measured = True  # later calls (line searches), and their clips, change nothing
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": measured}
        return (args[0], measured, *args[2:]), kwargs

    def before_step(self, scale: torch.Tensor | None = None, after_clip: bool = False,
                    parts_scale: torch.Tensor | None = None) -> None:
        """Measures the step's gradients unless done already this step (``scale``: the
        loss scale they still carry; ``after_clip``, ``parts_scale``: see
        `TorchSession.measure`)."""
        if self._measured:
            return
        session = self.session()
        if session is None or self.monitor._closed or self.optimizer is None:
            return
        if not after_clip:  # another loss may be backpropagated after a clip (actor-critic)
            self.monitor.step_starting()
        if self._regrouped(session) or self._thawed(session):
            self.guarded(self._regroup)
            session = self._session
        with self._lock:
            taken, self._parts = self._parts, []
        parts = [(ids, measures) for ids, measures in
                 ((session.ids_of(params), measures) for params, measures in taken)
                 if ids is not None]
        self.guarded(session.measure, parts, scale, after_clip, parts_scale)

    def clipped(self) -> None:
        """After a clip that `before_step` measured for."""
        session = self._session
        if session is not None and not self.monitor._closed and self.optimizer is not None:
            self.guarded(session.clipped)

    def after_step(self) -> None:
        self._stepping = False
        closure_measured, self._measured = self._measured, False
        if self._initialising:  # not a training step
            self._initialising = False
            return
        self.stepped = True
        session = self._session
        if session is not None and not self.monitor._closed:
            if not closure_measured:  # (measured before the update, unless a closure went
                self.before_step()    # uncalled)
            # Diagnoses first: they then leave with this step's record or before it, so the
            # first alert on a missing gradient already says why.
            self.guarded(self.monitor.step_ended, self)
            self.guarded(session.finish)

    def _thawed(self, session: TorchSession) -> bool:
        """Whether a frozen parameter trains now: the first and last frozen ones are looked
        at every step (a whole model unfrozen, or its top layers first), all of them every
        `THAW_CHECK_STEPS`."""
        frozen = self._frozen
        return bool(frozen) and (frozen[0].requires_grad or frozen[-1].requires_grad or (
            session.steps % THAW_CHECK_STEPS == 0 and any(p.requires_grad for p in frozen)))

    def guarded(self, action, *args: Any) -> None:
        """Runs ``action(*args)``. A failure of gradwatch is logged once and never reaches
        the training loop; the optimizer is no longer watched."""
        if self._failed:
            return
        try:
            action(*args)
        except Exception:
            self._failed = True
            log.exception("gradwatch: watching %s failed; it is no longer watched (training "
                          "continues)", self.name)
