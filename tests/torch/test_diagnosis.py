"""Why a PyTorch parameter gets no gradient, on patterns from public bug reports.

Each case trains two steps of a small model in diagnose-only mode and checks the cause,
the op and the source line (the line marked ``# <- here``). The patterns come from
PyTorch forum and GitHub reports: DDP's "parameters that were not used in producing
loss", "element 0 of tensors does not require grad" worked around with
``torch.tensor(loss.item(), requires_grad=True)``, accuracy (argmax, comparisons) used
as a loss, reentrant checkpointing of a block whose input needs no gradient (and of one
whose input does, with the break inside: the block then runs twice), a model
rebuilt after its optimizer, freezing the wrong layer.
"""

from __future__ import annotations

import copy
import inspect
import weakref

import pytest
import torch

from gradwatch.agent.core.diagnosis import Cause
from gradwatch.agent.torch.diagnosis import STAND_IN
from gradwatch.agent.torch.doctor import diagnose_missing_gradients

X = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
Y = torch.randn(16, 1, generator=torch.Generator().manual_seed(1))


class Base(torch.nn.Module):
    """A trunk and head that always train, plus ``broken``, whose use each case spoils."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 1)
        self.broken = torch.nn.Linear(8, 1)

    def healthy(self, x):
        h = torch.relu(self.trunk(x))
        return h, self.head(h)


def unused_layer(m, x):
    return m.healthy(x)[1]


def branch_not_taken(m, x, mode="mean"):
    h, out = m.healthy(x)
    if mode == "attention":
        out = out + m.broken(h)
    return out


def output_left_out(m, x):
    h, out = m.healthy(x)
    m.last_side = m.broken(h)  # <- here
    return out


def detach(m, x):
    h, out = m.healthy(x)
    return out + m.broken(h).detach()  # <- here


def tensor_copy(m, x):
    """``torch.tensor(t)`` copies a value out of the graph (PyTorch warns, once): it was
    said to be "computed by backward(), then cleared before the step"."""
    h, out = m.healthy(x)
    return out + torch.tensor(m.broken(h))  # <- here


def data_attribute(m, x):
    h, out = m.healthy(x)
    return out + m.broken(h).data  # <- here


def no_grad(m, x):
    h, out = m.healthy(x)
    with torch.no_grad():
        side = m.broken(h)  # <- here
    return out + side


def set_grad_enabled(m, x):
    h, out = m.healthy(x)
    with torch.set_grad_enabled(False):
        side = m.broken(h)  # <- here
    return out + side


def item_round_trip(m, x):
    h, out = m.healthy(x)
    return out + m.broken(h).mean().item()  # <- here


def tolist_round_trip(m, x):
    h, out = m.healthy(x)
    return out + torch.tensor(m.broken(h).tolist())  # <- here


def numpy_round_trip(m, x):
    h, out = m.healthy(x)
    side = torch.from_numpy(m.broken(h).detach().numpy())  # <- here
    return out + side


def argmax(m, x):
    h, out = m.healthy(x)
    scores = torch.cat([m.broken(h), out], 1)
    return out + scores.argmax(1, keepdim=True)  # <- here


def comparison(m, x):
    h, out = m.healthy(x)
    return out + (m.broken(h) > 0).float()  # <- here


def integer_cast(m, x):
    h, out = m.healthy(x)
    return out + m.broken(h).long()  # <- here


def reentrant_checkpoint(m, x):
    from torch.utils.checkpoint import checkpoint

    h, out = m.healthy(x)
    side = checkpoint(m.broken, h.detach(), use_reentrant=True)  # <- here
    return out + side


def detach_in_reentrant_checkpoint(m, x):
    """The block runs without gradient tracking first, and again with it in backward():
    what breaks is the detach(), not the checkpoint."""
    from torch.utils.checkpoint import checkpoint

    h, out = m.healthy(x)

    def block(t):
        return m.broken(t).detach() + t.mean(1, keepdim=True)  # <- here

    return out + checkpoint(block, h, use_reentrant=True)


def argmax_in_reentrant_checkpoint(m, x):
    from torch.utils.checkpoint import checkpoint

    h, out = m.healthy(x)

    def block(t):
        scores = torch.cat([m.broken(t), t[:, :1]], 1)
        return scores.argmax(1, keepdim=True).float() + t.mean(1, keepdim=True)  # <- here

    return out + checkpoint(block, h, use_reentrant=True)


def no_grad_before_reentrant_checkpoint(m, x):
    """Only the block runs again in backward(): what was computed untracked before it
    stays untracked (it was taken for tracked, and blamed on a zero_grad())."""
    from torch.utils.checkpoint import checkpoint

    h, out = m.healthy(x)
    with torch.no_grad():
        side = m.broken(h)  # <- here

    def block(t, s):
        return t.mean(1, keepdim=True) + s

    return out + checkpoint(block, h, side, use_reentrant=True)


class GradientReversal(torch.autograd.Function):
    """A domain-adversarial network's layer: identity forward, negated gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class NoGradientBack(torch.autograd.Function):
    """A straight-through round whose backward forgets to return the gradient."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return None


class ScaledByBroken(torch.autograd.Function):
    """Reads a module's weight inside forward() without taking it as an input."""

    @staticmethod
    def forward(ctx, x, module):
        return x * module.weight.sum()  # <- here

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def detach_after_a_custom_function(m, x):
    """The Function's forward ran untracked (view_as): it was blamed, not the detach."""
    h, out = m.healthy(x)
    return out + GradientReversal.apply(m.broken(h)).detach()  # <- here


def detach_after_a_full_backward_hook(m, x):
    """A full backward hook wraps the module's output in PyTorch's own Function."""
    m.broken.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    h, out = m.healthy(x)
    return out + m.broken(h).detach()  # <- here


def custom_function_without_gradient(m, x):
    h, out = m.healthy(x)
    return out + NoGradientBack.apply(m.broken(h))  # <- here


def parameter_read_inside_a_custom_function(m, x):
    out = m.healthy(x)[1]
    return ScaledByBroken.apply(out, m.broken)


CASES = [
    (unused_layer, Cause.UNUSED, ""),
    (branch_not_taken, Cause.UNUSED, ""),
    (output_left_out, Cause.NOT_ON_LOSS_PATH, "linear"),
    (detach, Cause.BROKEN_AT_OP, "detach"),
    (tensor_copy, Cause.BROKEN_AT_OP, "tensor"),
    (data_attribute, Cause.BROKEN_AT_OP, "data"),
    (no_grad, Cause.OUTSIDE_TAPE, "linear"),
    (set_grad_enabled, Cause.OUTSIDE_TAPE, "linear"),
    (item_round_trip, Cause.LEFT_TENSORFLOW, "item"),
    (tolist_round_trip, Cause.LEFT_TENSORFLOW, "tolist"),
    (numpy_round_trip, Cause.LEFT_TENSORFLOW, "numpy"),
    (argmax, Cause.BROKEN_AT_OP, "argmax"),
    (comparison, Cause.BROKEN_AT_OP, "gt"),
    (integer_cast, Cause.BROKEN_AT_OP, "long"),
    (detach_in_reentrant_checkpoint, Cause.BROKEN_AT_OP, "detach"),
    (argmax_in_reentrant_checkpoint, Cause.BROKEN_AT_OP, "argmax"),
    (no_grad_before_reentrant_checkpoint, Cause.OUTSIDE_TAPE, "linear"),
    (detach_after_a_custom_function, Cause.BROKEN_AT_OP, "detach"),
    (detach_after_a_full_backward_hook, Cause.BROKEN_AT_OP, "detach"),
    (custom_function_without_gradient, Cause.BROKEN_AT_OP, "NoGradientBack"),
]


def marked_line(function) -> int | None:
    lines, first = inspect.getsourcelines(function)
    return next((first + i for i, line in enumerate(lines) if "# <- here" in line), None)


def train(model, forward, steps: int = 2, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), 1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(forward(model, X), Y).backward()
        optimizer.step()


@pytest.mark.parametrize("forward, cause, op", CASES, ids=[c[0].__name__ for c in CASES])
def test_cause_op_and_line(forward, cause, op):
    with diagnose_missing_gradients() as report:
        train(Base(), forward)
    assert set(report.diagnoses) == {"broken.weight", "broken.bias"}, str(report)
    verdict = report.diagnoses["broken.weight"]
    assert verdict.cause is cause, verdict.message()
    assert verdict.op_name == op, verdict.message()
    line = marked_line(forward)
    if line is not None:
        assert verdict.source is not None and verdict.source.line == line, verdict.message()
        assert verdict.source.file == __file__
    assert verdict.hint


def test_a_parameter_read_inside_a_custom_function_without_being_its_input():
    """Autograd never sees what a Function's forward() reads besides its inputs."""
    with diagnose_missing_gradients() as report:
        train(Base(), parameter_read_inside_a_custom_function)
    verdict = report.diagnoses["broken.weight"]
    assert (verdict.cause, verdict.op_name) == (Cause.OUTSIDE_TAPE, "sum"), verdict.message()
    assert "which is in the forward() of the custom autograd.Function ScaledByBroken" in \
        verdict.message() and "apply()" in verdict.hint
    assert verdict.source.line == marked_line(ScaledByBroken.forward)
    assert report.diagnoses["broken.bias"].cause is Cause.UNUSED


def test_a_deprecated_torch_function_is_located_in_the_users_code():
    """``torch.nn.utils.weight_norm`` (deprecated: ``typing_extensions.deprecated`` wraps it)
    applied after the optimizer was made replaces the weight it reads: the verdict's line
    was in typing_extensions.py."""
    import warnings

    model = Base()
    optimizer = torch.optim.SGD(model.parameters(), 1e-2)
    with diagnose_missing_gradients() as report:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            line = inspect.currentframe().f_lineno + 1
            torch.nn.utils.weight_norm(model.broken)
        train(model, lambda m, x: m.healthy(x)[1] + m.broken(m.healthy(x)[0]),
              optimizer=optimizer)
    (verdict,) = report.diagnoses.values()  # (the weight it replaced, named by position)
    assert verdict.cause is Cause.NOT_ON_LOSS_PATH, verdict.message()
    assert (verdict.source.file, verdict.source.line) == (__file__, line), verdict.message()


def test_a_loss_that_reads_only_the_attention_weights_of_multihead_attention():
    """A pointer network's loss reads nn.MultiheadAttention's weights alone: its output
    projection gets no gradient. F.multi_head_attention_forward handles the recording mode
    itself, so every input seemed to reach every output: "computed, then cleared"."""
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    query, key = torch.randn(4, 3, 8), torch.randn(4, 5, 8)
    target = torch.randint(0, 5, (4, 3))
    with diagnose_missing_gradients() as report:
        optimizer = torch.optim.Adam(attention.parameters(), 1e-3)
        for _ in range(2):
            optimizer.zero_grad()
            line = inspect.currentframe().f_lineno + 1
            _, weights = attention(query, key, key)
            torch.nn.functional.nll_loss(weights.clamp_min(1e-9).log().transpose(1, 2),
                                         target).backward()
            optimizer.step()
    assert set(report.diagnoses) == {"out_proj.weight", "out_proj.bias"}, str(report)
    verdict = report.diagnoses["out_proj.weight"]
    assert (verdict.cause, verdict.op_name) == (
        Cause.NOT_ON_LOSS_PATH, "multi_head_attention_forward"), verdict.message()
    assert "of its 2 outputs the loss reads only output 2" in verdict.message()
    assert verdict.source.line == line, verdict.message()


class MaxWithIndices(torch.autograd.Function):
    """(values, indices), the indices marked non-differentiable."""

    @staticmethod
    def forward(ctx, x):
        values, indices = x.max(dim=1, keepdim=True)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.shape = x.shape
        return values, indices

    @staticmethod
    def backward(ctx, grad, _):
        (indices,) = ctx.saved_tensors
        return torch.zeros(ctx.shape).scatter(1, indices, grad)


class RecomputingCheckpoint(torch.autograd.Function):
    """DeepSpeed's and Megatron's reentrant checkpoint: the block runs again in backward."""

    @staticmethod
    def forward(ctx, block, x):
        ctx.block = block
        ctx.save_for_backward(x)
        with torch.no_grad():
            return block(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            torch.autograd.backward(ctx.block(x), grad)
        return None, x.grad


def only_the_indices_of_max(m, x):
    h, out = m.healthy(x)
    return out + m.broken(h).max(dim=1, keepdim=True).indices.float()  # <- here


def only_the_indices_of_a_custom_function(m, x):
    h, out = m.healthy(x)
    return out + MaxWithIndices.apply(m.broken(h))[1].float()  # <- here


def detach_in_a_recomputing_checkpoint(m, x):
    h, out = m.healthy(x)

    def block(t):
        return t.mean(1, keepdim=True) + m.broken(t).detach()  # <- here

    return out + RecomputingCheckpoint.apply(block, h)


@pytest.mark.parametrize("forward, op", [
    (only_the_indices_of_max, "max"), (only_the_indices_of_a_custom_function, "MaxWithIndices"),
    (detach_in_a_recomputing_checkpoint, "detach")], ids=lambda f: getattr(f, "__name__", f))
def test_outputs_that_carry_no_gradient_and_checkpoints_of_other_libraries(forward, op):
    """A call some outputs of which carry no gradient (``max``'s indices, a Function's output
    marked non-differentiable) passed them all on ("computed, then cleared"; "its backward()
    returns None"); a reentrant checkpoint not PyTorch's was taken for a Function that reads
    parameters it is not given."""
    with diagnose_missing_gradients() as report:
        train(Base(), forward)
    verdict = report.diagnoses["broken.weight"]
    assert (verdict.cause, verdict.op_name) == (Cause.BROKEN_AT_OP, op), verdict.message()
    assert verdict.source.line == marked_line(forward), verdict.message()
    if op != "detach":
        assert "outputs int64, which carries no gradient" in verdict.message()


def test_a_detach_after_a_differentiable_all_gather(tmp_path):
    """CLIP-style contrastive losses gather embeddings with torch.distributed.nn's
    differentiable all_gather (a Function of PyTorch's own): its forward's calls were
    blamed, "ran with gradient tracking off". (One process: a group of one.)"""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    def forward(m, x):
        h, out = m.healthy(x)
        gathered = torch.cat(all_gather(m.broken(h)), 0)
        return out + gathered.detach()  # <- here

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        with diagnose_missing_gradients() as report:
            train(Base(), forward)
    finally:
        dist.destroy_process_group()
    verdict = report.diagnoses["broken.weight"]
    assert (verdict.cause, verdict.op_name) == (Cause.BROKEN_AT_OP, "detach"), verdict.message()
    assert verdict.source.line == marked_line(forward)


def test_a_loss_through_split_with_the_gradient_cleared_is_said_cleared():
    """Of a Python function's outputs (``split``) the loss reads one: that is no reason for
    a missing gradient, the zero_grad() between backward() and step() is."""
    model = Base()
    optimizer = torch.optim.SGD(model.parameters(), 1e-2)
    with diagnose_missing_gradients() as report:
        for _ in range(2):
            h, out = model.healthy(X)
            first, _ = model.broken(torch.cat([h, h], 1)[:, :8]).repeat(1, 2).split(1, 1)
            (out + first).sum().backward()
            model.broken.zero_grad()
            optimizer.step()
    assert report.diagnoses["broken.weight"].cause is Cause.CLEARED, str(report)


def test_two_recordings_at_once_ended_in_either_order_leave_torch_as_it_was():
    """Two monitors recording one step: the first ended put back what it had patched,
    under the second's patches, which stayed for good (and the second's Function calls
    went unrecorded). (A recording ended before one that started after it still takes the
    later one's mode off the thread's mode stack, which is last in, first out.)"""
    import contextlib

    originals = (vars(torch.autograd.Function)["apply"], torch.Tensor.backward,
                 torch.autograd.backward, torch.autograd.grad)
    for first_ends_first in (True, False):
        model = Base()
        optimizer = torch.optim.SGD(model.parameters(), 1e-2)
        first, second = contextlib.ExitStack(), contextlib.ExitStack()
        first.enter_context(diagnose_missing_gradients())
        report = second.enter_context(diagnose_missing_gradients())
        if first_ends_first:
            first.close()
        train(model, detach_after_a_custom_function, optimizer=optimizer)
        (first if not first_ends_first else second).close()
        (second if not first_ends_first else first).close()
        if not first_ends_first:  # a Function on the path is seen as one
            assert report.diagnoses["broken.weight"].op_name == "detach", str(report)
        assert (vars(torch.autograd.Function)["apply"], torch.Tensor.backward,
                torch.autograd.backward, torch.autograd.grad) == originals


def test_a_model_moved_after_wrapping_is_blamed_where_its_output_is_left_out():
    """Hugging Face's Trainer moves the model (``model.to(device)``) after the optimizer
    exists: that read, without gradient tracking, was named instead of the layer whose
    output never reaches the loss (BERT's pooler under a masked-LM loss)."""
    with diagnose_missing_gradients() as report:
        model = Base().to("cpu")
        train(model, output_left_out)
    verdict = report.diagnoses["broken.weight"]
    assert (verdict.cause, verdict.op_name) == (Cause.NOT_ON_LOSS_PATH, "linear"), \
        verdict.message()
    assert verdict.source.line == marked_line(output_left_out), verdict.message()


def test_reentrant_checkpoint_of_an_input_without_gradient():
    """torch.utils.checkpoint(use_reentrant=True) runs the block without gradient
    tracking when no input needs a gradient: its parameters get none."""
    with diagnose_missing_gradients() as report:
        train(Base(), reentrant_checkpoint)
    verdict = report.diagnoses["broken.weight"]
    assert verdict.cause is Cause.OUTSIDE_TAPE, verdict.message()
    assert "use_reentrant=False" in verdict.hint


def test_item_round_trip_of_the_whole_loss():
    """The classic workaround for "element 0 of tensors does not require grad"."""
    model = Base()

    def forward(m, x):
        return m.healthy(x)[1]

    with diagnose_missing_gradients() as report:
        optimizer = torch.optim.SGD(model.parameters(), 1e-2)
        for _ in range(2):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(forward(model, X), Y)
            loss = torch.tensor(loss.item(), requires_grad=True)  # the workaround
            loss.backward()
            optimizer.step()
    causes = {name: d.cause for name, d in report.diagnoses.items()}
    assert causes == {"trunk.weight": Cause.LEFT_TENSORFLOW, "trunk.bias": Cause.LEFT_TENSORFLOW,
                      "head.weight": Cause.LEFT_TENSORFLOW, "head.bias": Cause.LEFT_TENSORFLOW,
                      "broken.weight": Cause.UNUSED, "broken.bias": Cause.UNUSED}
    assert report.diagnoses["head.weight"].op_name == "item"


def test_requires_grad_turned_off_after_the_optimizer_was_built():
    model = Base()
    optimizer = torch.optim.SGD(model.parameters(), 1e-2)
    model.head.requires_grad_(False)  # meant to freeze `broken`
    with diagnose_missing_gradients() as report:
        train(model, lambda m, x: m.healthy(x)[1] + m.broken(m.healthy(x)[0]), optimizer=optimizer)
    assert set(report.diagnoses) == {"head.weight", "head.bias"}
    assert report.diagnoses["head.weight"].cause is Cause.NOT_TRACKED


def test_model_rebuilt_after_its_optimizer():
    """The optimizer still holds the first model's parameters; the loss reads the second
    model's, which no optimizer updates: the verdict says so."""
    model = Base()
    optimizer = torch.optim.SGD(model.parameters(), 1e-2)
    model = Base()
    with diagnose_missing_gradients() as report:
        train(model, unused_layer, optimizer=optimizer)
    assert len(report.diagnoses) == 6
    assert {d.cause for d in report.diagnoses.values()} == {Cause.UNUSED}
    assert {d.reason for d in report.diagnoses.values()} == {STAND_IN}
    assert all("created again, copied (deepcopy) or reloaded" in d.hint
               for d in report.diagnoses.values())


def test_a_copy_of_the_model_trained_instead_of_the_optimizers():
    """An EMA-style deep copy made each step computes the loss: the optimizer's own
    parameters are only read by the copying."""
    model = Base()

    def forward(m, x):
        return unused_layer(copy.deepcopy(m), x)

    with diagnose_missing_gradients() as report:
        train(model, forward)
    verdict = report.diagnoses["trunk.weight"]
    assert verdict.cause is Cause.NOT_ON_LOSS_PATH, verdict.message()
    assert verdict.reason == STAND_IN
    # The unused layer of a model that does train is not blamed on a stand-in: the layers
    # shaped like it are the optimizer's own.
    with diagnose_missing_gradients() as report:
        train(Base(), unused_layer)
    assert {d.reason for d in report.diagnoses.values()} == {""}
    # Nor is it where a block shaped like it trains outside the optimizer (left out of it,
    # requires_grad on): the loss also reads parameters the optimizer updates.
    torch.manual_seed(0)
    fixed, tuned, unused = (torch.nn.Linear(8, 8) for _ in range(3))
    with diagnose_missing_gradients() as report:
        train(None, lambda _, x: tuned(fixed(torch.nn.functional.pad(x, (0, 4)))).sum(1, True),
              optimizer=torch.optim.SGD([*tuned.parameters(), *unused.parameters()], 1e-2))
    assert {d.cause for d in report.diagnoses.values()} == {Cause.UNUSED}
    assert {d.reason for d in report.diagnoses.values()} == {""}, str(report)


def test_zero_grad_between_backward_and_step():
    """The beginner's loop that never learns: the gradients backward() computed are
    cleared before the update."""
    model = Base()
    optimizer = torch.optim.SGD(model.parameters(), 1e-2)

    def step(clear):
        loss = torch.nn.functional.mse_loss(unused_layer(model, X), Y)
        loss.backward()  # <- here
        clear()
        optimizer.step()

    for clear in (optimizer.zero_grad, model.zero_grad,
                  lambda: [setattr(p, "grad", None) for p in model.parameters()]):
        with diagnose_missing_gradients() as report:
            for _ in range(2):
                step(clear)
        verdict = report.diagnoses["trunk.weight"]
        assert verdict.cause is Cause.CLEARED, verdict.message()
        assert (verdict.op_name, verdict.source.line) == ("backward", marked_line(step))
        assert report.diagnoses["broken.weight"].cause is Cause.UNUSED
    # backward(inputs=...) that leaves a parameter out is not a clearing
    with diagnose_missing_gradients() as report:
        for _ in range(2):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(unused_layer(model, X), Y)
            loss.backward(inputs=list(model.head.parameters()))
            optimizer.step()
    assert report.diagnoses["trunk.weight"].cause is Cause.UNKNOWN


@pytest.mark.parametrize("given", [list, iter], ids=["list", "iterator"])
def test_gradients_taken_with_autograd_grad(given):
    """Loops that call ``torch.autograd.grad`` and store the gradients themselves
    (meta-learning, functional training): the recording ends there as at ``backward()``.
    A layer never called, one not asked for, one whose gradient is not stored. Asked
    with an iterator (``model.parameters()``), every parameter read "not asked for"."""
    model = Base()
    optimizer = torch.optim.SGD(model.parameters(), 1e-2)
    asked = [*model.trunk.parameters(), model.head.weight]  # head.bias forgotten
    with diagnose_missing_gradients() as report:
        for _ in range(2):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(unused_layer(model, X), Y)
            grads = torch.autograd.grad(loss, given(asked))  # <- here
            for param, grad in zip(asked[:-1], grads[:-1], strict=True):  # head.weight's too
                param.grad = grad
            optimizer.step()
    line = marked_line(test_gradients_taken_with_autograd_grad)
    causes = {name: (d.cause, d.op_name, d.source.line if d.source else None, d.reason)
              for name, d in report.diagnoses.items()}
    assert causes == {
        "broken.weight": (Cause.UNUSED, "", None, ""),
        "broken.bias": (Cause.UNUSED, "", None, ""),
        "head.bias": (Cause.UNKNOWN, "autograd.grad", line, "was not asked for it (inputs=...)"),
        "head.weight": (Cause.UNKNOWN, "autograd.grad", line, "returned its gradient, which "
                        "was not in .grad at the optimizer step")}, str(report)
    assert "A differentiable path to the loss exists, but autograd.grad() at" in \
        report.diagnoses["head.bias"].message()


def test_several_losses_at_once_with_autograd_backward():
    """``torch.autograd.backward([main, auxiliary])``: every loss counts. A layer that
    reaches only the auxiliary loss, detached, is explained as detached (with the first
    loss alone it would read as not reaching the loss at all)."""
    model = Base()
    with diagnose_missing_gradients() as report:
        optimizer = torch.optim.SGD(model.parameters(), 1e-2)
        for _ in range(2):
            optimizer.zero_grad()
            h, out = model.healthy(X)
            main = torch.nn.functional.mse_loss(out, Y)
            auxiliary = (model.broken(h).detach() * h).mean()  # <- here
            torch.autograd.backward([main, auxiliary])
            optimizer.step()
    verdict = report.diagnoses["broken.weight"]
    assert (verdict.cause, verdict.op_name) == (Cause.BROKEN_AT_OP, "detach"), str(report)
    assert verdict.source.line == marked_line(test_several_losses_at_once_with_autograd_backward)
    assert set(report.diagnoses) == {"broken.weight", "broken.bias"}


def test_a_gradient_penalty_is_part_of_the_loss_not_its_end():
    """WGAN-GP: ``torch.autograd.grad(..., create_graph=True)`` inside the critic's loss
    (the gradient penalty) does not end the recording; the loss's ``backward()`` does. A
    layer used after the penalty, detached, is explained as detached (ended at the
    penalty, it would read as never used)."""
    critic, extra = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD([*critic.parameters(), *extra.parameters()], 1e-2)
    with diagnose_missing_gradients() as report:
        for _ in range(2):
            optimizer.zero_grad()
            inter = X.clone().requires_grad_(True)
            grad = torch.autograd.grad(critic(inter).sum(), inter, create_graph=True)[0]
            penalty = ((grad.norm(2, dim=1) - 1) ** 2).mean()
            loss = critic(X).mean() + 10 * penalty + extra(X).detach().mean()
            loss.backward()
            optimizer.step()
    verdict = report.diagnoses["group0.param2"]  # extra.weight
    assert (verdict.cause, verdict.op_name) == (Cause.BROKEN_AT_OP, "detach"), str(report)


def test_the_doctor_names_parameters_beside_dead_weak_proxies():
    """The doctor finds the model among live objects. A dead ``weakref.proxy`` among them
    (``torch.compile`` leaves some) raised ReferenceError from isinstance()."""
    class Referent:
        pass

    referent = Referent()
    proxy = weakref.proxy(referent)
    del referent
    with diagnose_missing_gradients() as report:
        train(Base(), unused_layer)
    assert set(report.diagnoses) == {"broken.weight", "broken.bias"}
    del proxy


def test_healthy_training_is_not_diagnosed():
    def full(m, x):
        h, out = m.healthy(x)
        return out + m.broken(h)

    with diagnose_missing_gradients() as report:
        train(Base(), full, steps=3)
    assert not report, str(report)


def test_parameters_do_not_count_towards_what_a_recording_keeps_alive(monkeypatch):
    """A model larger than the recording limit is still explained when its step's other
    tensors fit: its parameters are alive whether recorded or not."""
    from gradwatch.agent.torch import diagnosis

    class Wide(Base):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Parameter(torch.zeros(2**19))  # 2 MiB

        def healthy(self, x):
            h, out = super().healthy(x)
            return h, out + self.table.mean()

    monkeypatch.setattr(diagnosis, "MAX_RECORDED_BYTES", 2**20)
    model = Wide()
    with diagnose_missing_gradients() as report:
        train(model, unused_layer)
    assert {d.cause for d in report.diagnoses.values()} == {Cause.UNUSED}, str(report)
    assert set(report.diagnoses) == {"broken.weight", "broken.bias"}


def test_accumulated_micro_batches_past_the_recording_limit_are_explained(monkeypatch,
                                                                          caplog):
    """A recording lasts to the step, through every micro-batch's loss: where the tensors
    kept pass the limit after a loss, recording stops there and what came before explains
    the step (the limit is not a reason to give up, as it is before any loss)."""
    from gradwatch.agent.torch import diagnosis

    monkeypatch.setattr(diagnosis, "MAX_RECORDED_BYTES", 2**20)
    model, wide = Base(), torch.randn(4096, 4)  # 64 kB a micro-batch input, more inside
    optimizer = torch.optim.SGD(model.parameters(), 1e-2)
    with diagnose_missing_gradients() as report:
        for _ in range(2):
            optimizer.zero_grad()
            for _ in range(8):
                out = unused_layer(model, wide)
                torch.nn.functional.mse_loss(out, torch.zeros_like(out)).backward()
            optimizer.step()
    assert {d.cause for d in report.diagnoses.values()} == {Cause.UNUSED}, str(report)
    assert set(report.diagnoses) == {"broken.weight", "broken.bias"}
    assert "will not be explained" not in caplog.text


def test_recordings_that_explain_nothing_back_off():
    """A missing gradient no recorded step explains costs bursts of 3 recorded steps,
    resting 10, 20, 40, ... steps between them; one that explains something resets it."""
    from gradwatch.agent.torch.diagnosis import Retries

    retries, recorded, due = Retries(), [], True
    for step in range(1000):
        if due:
            recorded.append(step)
            retries.recorded(explained=0)
        due = retries.step_ended()
    assert recorded[:9] == [0, 1, 2, 13, 14, 15, 36, 37, 38]
    assert len(recorded) == 3 * 7  # rests of 10 ... 640 steps fit in 1,000
    retries = Retries()
    for explained in (0, 0, 1, 0, 0):  # the third explained something: no burst ended
        retries.recorded(explained=explained)
        assert retries.step_ended()
