"""A PyTorch session: one optimizer's parameters, recorded once per optimizer step.

Training thread: `TorchSession.measure` computes the step's record on the
gradients' device (at the first of: gradient clipping, ``GradScaler.step``,
``optimizer.step``), from the parts measured earlier in the step (by the DDP
communication hook, before the all-reduce) and the remaining fresh gradients;
`finish` writes it to the host ring and remembers which gradients it saw.

Which gradients are *present*: a parameter's ``.grad`` that is not None and that
changed since the previous optimizer step (a new tensor, or the same one written in
place: its version counter moved). So a gradient left from an earlier step — after
``zero_grad(set_to_none=False)``, whose zeroing is remembered too — does not count.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import torch

from gradwatch.agent.core.identity import Identity
from gradwatch.agent.core.session import Session, Variable, ring_capacity
from gradwatch.agent.torch import stats
from gradwatch.agent.torch.recorder import HostRing, row_bytes


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2, tensor parallel), else the tensor."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _replicated_elsewhere(param: torch.Tensor) -> bool:
    """A DTensor (tensor parallel, HSDP) replicated along a mesh dimension on which this
    rank is not the first: that first rank's copy stands for it."""
    placements, mesh = getattr(param, "placements", None), getattr(param, "device_mesh", None)
    coordinate = mesh.get_coordinate() if mesh is not None else None
    return placements is not None and coordinate is not None and any(
        placement.is_replicate() and c != 0
        for placement, c in zip(placements, coordinate, strict=False))


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


class TorchSession(Session):
    """``params`` in the optimizer's order, ``names`` alike."""

    def __init__(self, identity: Identity, optimizer: str, params: Sequence[torch.Tensor],
                 names: Sequence[str], capacity: int | None, *, strategy: str = "",
                 versions: Mapping[str, str] | None = None, loss_scaled: bool = False,
                 sharded: bool = False, every: int = 1, first_step: int = 0) -> None:
        """``sharded``: each rank holds a shard of every parameter (FSDP); a DTensor's
        local shard is what is measured. ``every``: statistics at every Nth step only
        (see `measures`). ``first_step``: the number of its first step (a session that
        continues another continues its count)."""
        self.params = list(params)
        device = local_tensor(self.params[0]).device
        # (parameters left on the meta device, a model moved off it by to_empty() holding
        # new ones, never get a gradient: their records are kept on the CPU)
        self.device = torch.device("cpu") if device.type == "meta" else device
        width = stats.width(self.device)
        ring = HostRing(len(self.params), ring_capacity(row_bytes(len(self.params), width),
                                                         capacity), self.device, width)
        super().__init__(identity, optimizer, [
            Variable(name, tuple(p.shape), _dtype(p), id(p))
            for name, p in zip(names, self.params, strict=True)], ring, strategy=strategy,
            versions=versions, loss_scaled=loss_scaled, sharded=sharded)
        self._ring = ring
        self._build = stats.RecordBuilder(len(self.params), self.device)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._sharded = sharded
        #: Sharded: the parameters of which this rank holds no element (FSDP1 leaves their
        #: .grad None), and the replicated ones another rank reports (see `_local_parts`).
        self._none_here = [i for i, p in enumerate(self.params)
                           if sharded and local_tensor(p).numel() == 0]
        self._reported_elsewhere = [i for i, p in enumerate(self.params)
                                    if sharded and _replicated_elsewhere(p)]
        self._nothing = torch.zeros(0, device=self.device)
        self._all = list(range(len(self.params)))
        #: The gradients of the previous step (weakly, with their versions), or None when
        #: every gradient was None after it (``zero_grad`` with ``set_to_none``, the default).
        self._seen: list[tuple[weakref.ref, int] | None] | None = None
        self._record: torch.Tensor | None = None
        #: What `_record` was built from: (parts, absent ids, loss scale divided by).
        self._built: tuple[list, frozenset[int], torch.Tensor | None] | None = None
        #: After a clip of a measured step (`clipped`): a few gradients as it left them,
        #: and the parameters then without a fresh gradient with what they had (index,
        #: `_snapshot` entry). A backward pass since changes the first or the second.
        self._clipped: tuple[list[tuple[int, tuple[weakref.ref, int] | None]],
                             list[tuple[int, tuple[weakref.ref, int] | None]]] | None = None
        self._sentinels = sorted({0, len(self.params) // 3, 2 * len(self.params) // 3,
                                  len(self.params) - 1} - {-1})
        self._every = every
        self._skipped = False  # this step is not recorded (see `measures`)
        self.steps = first_step
        #: Variable ids without a gradient at the latest measured step.
        self.missing: set[int] = set()

    def ids_of(self, params: Sequence[torch.Tensor]) -> list[int] | None:
        """The variable ids of ``params``, or None if some are not this session's."""
        ids = [self._index.get(id(p)) for p in params]
        return None if None in ids else ids

    def _gradients(self) -> list[torch.Tensor | None]:
        """Each parameter's gradient if it is new since the previous step, else None."""
        grads = [p.grad for p in self.params]
        if self._seen is None:
            return grads
        return [None if g is None or _same(g, s) else g
                for g, s in zip(grads, self._seen, strict=True)]

    def _local_parts(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """What this rank adds to each parameter's combined statistics (the collector adds
        the ranks' squares and counts, `sharded`): nothing, yet present, for a parameter
        none of whose elements are here, and for a replicated one another rank reports
        (each rank holds all of it: counted once per rank its norm read √ranks too large)."""
        for i in self._none_here:
            grads[i] = self._nothing
        for i in self._reported_elsewhere:
            if grads[i] is not None:
                grads[i] = self._nothing
        return grads

    def _snapshot(self) -> list[tuple[weakref.ref, int] | None]:
        """The parameters' gradients now: which tensors, at which in-place version."""
        return [_seen(p.grad) for p in self.params]

    def measures(self) -> bool:
        """Whether the current step's statistics are due: every ``every``-th step (the
        first included). `measure` also records a step whose set of missing gradients
        differs from the last recorded one, so presence is reported when it changes."""
        return self.steps % self._every == 0

    def measure(self, parts: list[tuple[list[int], torch.Tensor]],
                scale: torch.Tensor | None = None, after_clip: bool = False,
                parts_scale: torch.Tensor | None = None) -> None:
        """Computes this step's record unless done already (training thread). ``parts``:
        (variable ids, their `stats.measure`) taken earlier in the step; ``scale``: the loss
        scale the gradients still carry (their norms are divided by it); ``after_clip``:
        called at a clip, after an earlier one (`_since_clip`); ``parts_scale``: the loss
        scale only ``parts`` carry (the DDP hook measured them before
        ``GradScaler.unscale_`` unscaled the gradients themselves)."""
        covered = {i for ids, _ in parts for i in ids}  # measured by the DDP hook
        if sum(len(ids) for ids, _ in parts) > len(covered):
            # It measured a parameter twice: gradients accumulated without ``no_sync()``
            # are all-reduced at each micro-batch, so later buckets mix the ranks' average
            # with the rank's own. What the step applies is measured.
            parts, covered = [], set()
        if self._clipped is not None:
            self._since_clip(parts, after_clip)
        if self._record is not None or self._skipped:
            return
        grads = self._local_parts(self._gradients())
        if not self.measures() and not parts and self.missing == {
                i for i, g in enumerate(grads) if g is None}:
            self._skipped = True
            return
        # (`is`, not `in` or `count`: comparing a tensor with None costs microseconds)
        if parts or any(g is None for g in grads):
            # Measured before the all-reduce, but present only if the rank's .grad is
            # fresh: DDP leaves a gradient no rank produced as None.
            absent = frozenset(i for i in covered if grads[i] is None)
            ids = [i for i, g in enumerate(grads) if g is not None and i not in covered]
            tensors = [grads[i] for i in ids]
            self.missing = absent | {i for i, g in enumerate(grads)
                                     if g is None and i not in covered}
        else:  # the common step: every gradient fresh, none measured earlier
            absent, ids, tensors, self.missing = frozenset(), self._all, grads, set()
        parts = [(i, _divide_norms(m, parts_scale)) for i, m in parts] \
            if parts_scale is not None else list(parts)
        if ids:
            if self._sharded:
                tensors = [local_tensor(t) for t in tensors]
            parts.append((ids, stats.measure(tensors, self.device)))
        self._set_record(parts, absent, scale)

    def _set_record(self, parts: list, absent: frozenset[int],
                    scale: torch.Tensor | None) -> None:
        self._built = (parts, absent, scale)
        record = self._build(parts, absent)
        self._record = record if scale is None else _divide_norms(record, scale)

    def _since_clip(self, parts: list, at_clip: bool) -> None:
        """Brings a record measured at a clip up to date with a backward pass since:
        parameters then without a gradient that have one now (losses backpropagated and
        clipped one by one, as actor-critic programs do) are measured and added, before
        clipping, at the next clip or the step; gradients the clip saw that changed since
        are measured again at the next clip (a clip after every micro-batch: the step
        applies the sum), not at the step, where an in-place write (a pruning mask, noise
        for differential privacy) would make the norms those after clipping."""
        sentinels, without = self._clipped
        # (changed since the clip, not since the previous step: the clip itself writes a
        # gradient zeroed in place and left stale, which is still missing)
        appeared = [i for i, seen in without if not _same(self.params[i].grad, seen)]
        grown = at_clip and not all(_same(self.params[i].grad, seen)
                                    for i, seen in sentinels)
        if not appeared and not grown:
            return
        self._clipped = None
        if grown or self._built is None or parts or self._sharded:
            self._forget_measure()  # measured again, whole
            return
        built, absent, scale = self._built
        added = (appeared, stats.measure([self.params[i].grad for i in appeared], self.device))
        self._set_record([*built, added], absent - set(appeared), scale)
        self.missing -= set(appeared)

    def clipped(self) -> None:
        """After a clip of a measured step: a few gradients as it left them, and the
        parameters without a gradient (`_since_clip`; a micro-batch's backward pass
        reaches nearly every parameter, and a handful cost microseconds where all of a
        large model's would cost tens)."""
        if self._record is not None or self._skipped:
            self._clipped = ([(i, _seen(g)) for i in self._sentinels
                              if (g := self.params[i].grad) is not None],
                             [(i, _seen(self.params[i].grad)) for i in sorted(self.missing)])

    def _forget_measure(self) -> None:
        self._record, self._built, self._skipped, self._clipped = None, None, False, None

    def finish(self) -> None:
        """Ends the step: writes its record and remembers the gradients seen (training
        thread; call after `measure` and the optimizer's update, or its skipping)."""
        if not self._skipped:
            self._ring.write(self._record, self.steps)
        self._forget_measure()
        self.steps += 1
        self._remember()

    def take_over(self, previous: TorchSession) -> None:
        """Continues ``previous`` (another table of the same optimizer) before a step: the
        gradients it had seen count as seen, for the parameters both watch."""
        if previous._seen is not None:
            seen = dict(zip((id(p) for p in previous.params), previous._seen, strict=True))
            self._seen = [seen.get(id(p)) for p in self.params]

    def close(self) -> None:
        """Its optimizer is gone: the parameters go too (the ring keeps what it recorded)."""
        super().close()
        self.params = []
        self._forget_measure()

    def gradients_zeroed(self, between_steps: bool = True, ids: set[int] | None = None
                         ) -> None:
        """After ``zero_grad`` of the parameters ``ids`` (None: all; a submodule's
        ``zero_grad`` zeroes some): remembers the gradients zeroed in place, if any. Between
        steps (not in a step's closure), a step measured and not taken (skipped after
        clipping found its norm not finite) is dropped: its gradients are gone, and the
        next step measures its own."""
        if between_steps:
            self._forget_measure()
        self._remember(None if ids is None else
                       [i for i, p in enumerate(self.params) if id(p) in ids])

    def _remember(self, indices: list[int] | None = None) -> None:
        """Takes the gradients of the parameters ``indices`` (None: all) as already seen."""
        if indices is None:
            seen = self._snapshot()
        else:
            seen = list(self._seen) if self._seen is not None else [None] * len(self.params)
            for i in indices:
                seen[i] = _seen(self.params[i].grad)
        self._seen = seen if any(s is not None for s in seen) else None


def _seen(grad: torch.Tensor | None) -> tuple[weakref.ref, int] | None:
    """``grad`` as `_same` compares it later: which tensor, at which in-place version."""
    return None if grad is None else (weakref.ref(grad), grad._version)


def _same(grad: torch.Tensor | None, seen: tuple[weakref.ref, int] | None) -> bool:
    """Whether ``grad`` is the tensor of ``seen`` (a `TorchSession._snapshot` entry), not
    written to since."""
    if grad is None or seen is None:
        return grad is None and seen is None
    return seen[0]() is grad and seen[1] == grad._version


def _divide_norms(measures: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``measures`` (``[width, N]``) with its norms row divided by ``scale`` (an absent
    variable's negative marker kept)."""
    norms = measures[:1]
    return torch.cat([torch.where(norms >= 0, norms / scale.to(norms.device), norms),
                      measures[1:]])
