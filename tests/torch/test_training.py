"""Real PyTorch training (in this process, on CPU) reporting to a real collector subprocess.

Each test closes its monitor (everything acknowledged), then asserts on the scraped
``/metrics`` and on the alerts the webhook received.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

from gradwatch.agent.torch import GradientMonitor, stats
from tests.support.logs import gradwatch_warnings
from tests.support.metrics import parse_metrics, select
from tests.support.services import CollectorProcess, free_port
from tests.support.torch_ops import OpCounter

pytestmark = pytest.mark.integration

X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


class Net(torch.nn.Module):
    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.hidden = torch.nn.Linear(4, 8)
        self.out = torch.nn.Linear(8, 1)
        self.unused = torch.nn.Linear(8, 3) if extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


@pytest.fixture(params=["exact counts", "norms alone"])
def layout(request, monkeypatch) -> str:
    """The records of the CPU (NaN and Inf counted exactly) and of an accelerator (the
    norms alone, marked by the sender), the latter on CPU tensors: no accelerator runs
    here."""
    if request.param == "norms alone":
        monkeypatch.setattr(stats, "counts_exactly", lambda device: False)
    return request.param


def monitor_for(collector, job: str) -> GradientMonitor:
    return GradientMonitor(collector=collector.grpc_target, training_job=job,
                           flush_interval_s=0.05)


def metrics(collector, name: str, job: str, **labels: str) -> dict[str, float]:
    return select(parse_metrics(collector.scrape()), name, training_job=job, **labels)


def train(model, optimizer, steps: int, *, before_step=None) -> list[dict[str, float]]:
    """Plain steps; returns each step's gradient norms as torch computed them."""
    norms = []
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        norms.append({n: float(p.grad.norm()) for n, p in model.named_parameters()
                      if p.grad is not None})
        if before_step:
            before_step()
        optimizer.step()
    return norms


def test_every_parameter_of_every_step_is_reported_by_name(collector, job_name, layout):
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.Adam(model.parameters(), 1e-2), model)
        norms = train(model, optimizer, 7)
    assert monitor.close() is True
    assert metrics(collector, "gradwatch_steps_total", job_name) == {
        f"optimizer=Adam,task_index=0,task_type=worker,training_job={job_name}": 7.0}
    reported = metrics(collector, "gradwatch_gradient_norm", job_name)
    assert reported == pytest.approx(norms[-1], rel=1e-5)
    assert set(metrics(collector, "gradwatch_gradient_present", job_name).values()) == {1.0}


@pytest.mark.parametrize("how", ["create_graph", "MAML inner loop"])
def test_gradients_that_carry_a_graph_are_measured(collector, job_name, caplog, how):
    """``backward(create_graph=True)`` (Hessian-vector products, AdaHessian) and a MAML
    inner loop's ``SGD(differentiable=True)``: measuring such gradients built a graph, and
    writing the record then raised; the optimizer was dropped at its first step, with a
    traceback per optimizer (72 in a MAML run)."""
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        if how == "create_graph":
            optimizer = monitor.wrap(torch.optim.Adam(model.parameters(), 1e-2), model)
            norms = []
            for _ in range(5):
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(X), Y).backward(create_graph=True)
                norms.append({n: float(p.grad.norm()) for n, p in model.named_parameters()})
                optimizer.step()
        else:  # (each inner step updates clones of the last, as torch.func users write it)
            names = [n for n, _ in model.named_parameters()]
            fast = list(model.parameters())
            for _ in range(5):
                loss = torch.nn.functional.mse_loss(
                    torch.func.functional_call(model, dict(zip(names, fast, strict=True)),
                                               (X,)), Y)
                grads = torch.autograd.grad(loss, fast, create_graph=True)
                fast = [f.clone() for f in fast]  # not leaves: differentiable in the model's
                for f, g in zip(fast, grads, strict=True):
                    f.grad = g
                norms = [{f"group0.param{i}": float(f.grad.norm())
                          for i, f in enumerate(fast)}]
                monitor.wrap(torch.optim.SGD(fast, 1e-2, differentiable=True)).step()
    assert monitor.close() is True
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        norms[-1], rel=1e-5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name.startswith("gradwatch")]
    # (a new optimizer over new parameters at each inner step is a new session each time)
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [
        5.0 if how == "create_graph" else 1.0]


def test_an_optimizer_given_named_parameters_names_them_without_the_model(collector,
                                                                          job_name):
    """torch >= 2.6 optimizers keep the names of ``model.named_parameters()``: wrapped
    without the model, the parameters are reported by those names."""
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.named_parameters(), 1e-2))
        train(model, optimizer, 1)
    assert set(metrics(collector, "gradwatch_gradient_present", job_name)) == {
        "hidden.weight", "hidden.bias", "out.weight", "out.bias"}


def test_a_tied_weight_given_twice_is_one_parameter(collector, job_name):
    """A decoder tied to its embedding, the optimizer made from both modules' parameters:
    torch warns of the duplicate and updates it once. It was reported twice: a phantom
    ``#2`` variable, and a global norm √2 too large."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 4)
    decoder = torch.nn.Linear(4, 10, bias=False)
    decoder.weight = embedding.weight
    model = torch.nn.ModuleDict({"embedding": embedding, "decoder": decoder})
    tokens = torch.arange(10)
    with monitor_for(collector, job_name) as monitor:
        with pytest.warns(UserWarning, match="duplicate"):
            sgd = torch.optim.SGD([*embedding.parameters(), *decoder.parameters()], 1e-2)
        optimizer = monitor.wrap(sgd, model)
        for _ in range(2):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(decoder(embedding(tokens)), tokens).backward()
            norm = float(embedding.weight.grad.norm())
            optimizer.step()
    assert monitor.close() is True
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        {"embedding.weight": norm}, rel=1e-5)
    assert list(metrics(collector, "gradwatch_global_gradient_norm", job_name).values()) == \
        pytest.approx([norm], rel=1e-5)


def test_missing_gradients_page_with_their_cause_and_line(collector, webhook, job_name, layout):
    model = Net(extra=True)
    # Flushing every millisecond, the first page must already say why (the first step is
    # diagnosed as it ends, and its diagnosis leaves no later than its record).
    with GradientMonitor(collector=collector.grpc_target, training_job=job_name,
                         flush_interval_s=0.001) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        train(model, optimizer, 3)
    present = metrics(collector, "gradwatch_gradient_present", job_name)
    assert present == {"hidden.weight": 1, "hidden.bias": 1, "out.weight": 1, "out.bias": 1,
                       "unused.weight": 0, "unused.bias": 0}
    alert = webhook.wait_for(lambda a: a["labels"].get("training_job") == job_name, 10)
    assert alert is not None, webhook.alerts
    assert "module in the forward pass" in alert["annotations"]["causes"], "the first page"
    assert alert["labels"]["alertname"] == "GradientMissing"
    assert alert["annotations"]["variables"] == "unused.weight, unused.bias"


def test_bookkeeping_between_wrap_and_training_does_not_explain_an_unused_layer(collector,
                                                                                job_name):
    """What runs between ``wrap`` and the first step is recorded too: Hugging Face's
    ``Trainer`` is given the wrapped optimizer, then moves the model (``model.to``); users
    evaluate under ``torch.no_grad()`` or copy the ``state_dict``. Such reads lead nowhere
    near the loss: the layer never called in training is still ``unused``."""
    model = Net(extra=True)
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        model.to("cpu")
        with torch.no_grad():
            model.unused(torch.relu(model.hidden(X)))  # a look at every head, untrained
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        train(model, optimizer, 3)
    assert initial.keys() == model.state_dict().keys()
    causes = {labels["variable"]: labels["cause"] for labels, _ in parse_metrics(
        collector.scrape())["gradwatch_gradient_missing_cause_info"]
        if labels["training_job"] == job_name}
    assert causes == {"unused.weight": "unused", "unused.bias": "unused"}


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_between_backward_and_step_pages_as_cleared(collector, webhook, job_name,
                                                              caplog, set_to_none):
    """The loop that never learns because ``zero_grad()`` runs after ``backward()``: every
    parameter pages, with the cause ``cleared`` and the line of the backward call, and the
    log says that once (not also that no backward ran, as the zeros alone would suggest)."""
    caplog.set_level(logging.WARNING, logger="gradwatch")
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        for _ in range(3):
            backward_line = sys._getframe().f_lineno + 1
            torch.nn.functional.mse_loss(model(X), Y).backward()
            optimizer.zero_grad(set_to_none=set_to_none)
            optimizer.step()
    assert monitor.close() is True
    verdicts = [r.getMessage() for r in caplog.records if "gradient" in r.getMessage()]
    assert len(verdicts) == 1 and "then cleared before the optimizer step" in verdicts[0], \
        verdicts
    # With set_to_none=False the cause may come from the second step's recording: the page
    # can go out undiagnosed first, then the cause follows at once as an update.
    alert = webhook.wait_for(
        lambda a: a["labels"].get("training_job") == job_name
        and "then cleared before the optimizer step" in a["annotations"].get("causes", ""), 10)
    assert alert is not None and alert["labels"]["alertname"] == "GradientMissing"
    causes = parse_metrics(collector.scrape())["gradwatch_gradient_missing_cause_info"]
    mine = [labels for labels, _ in causes if labels["training_job"] == job_name]
    assert {(c["variable"], c["cause"], c["source"]) for c in mine} == {
        (name, "cleared", f"{__file__}:{backward_line}") for name, _ in model.named_parameters()}


def test_a_gan_generators_gradient_zeroed_after_the_critics_step_is_not_called_cleared(
        collector, job_name):
    """A GAN step: the critic's loss reaches the generator too (its gradients are computed
    there, then zeroed on purpose before the generator's loss); the generator's own loss
    detaches its first layer. The critic's step cannot tell why the generator's step lacks
    that gradient (never "cleared"); the generator's own step says where."""
    torch.manual_seed(0)
    g1, g2, critic = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    generator = torch.nn.Sequential(g1, g2)
    with monitor_for(collector, job_name) as monitor:
        opt_d = monitor.wrap(torch.optim.SGD(critic.parameters(), 1e-2), critic)
        opt_g = monitor.wrap(torch.optim.SGD(generator.parameters(), 1e-2), generator)
        for _ in range(4):
            opt_d.zero_grad()
            critic(generator(X)).mean().backward()
            opt_d.step()
            opt_g.zero_grad()
            (-critic(g2(g1(X).detach())).mean()).backward()
            opt_g.step()
    assert monitor.close() is True
    causes = parse_metrics(collector.scrape())["gradwatch_gradient_missing_cause_info"]
    mine = {labels["variable"]: (labels["cause"], labels["op"]) for labels, _ in causes
            if labels["training_job"] == job_name}
    assert mine == {"0.weight": ("broken_at_op", "detach"),
                    "0.bias": ("broken_at_op", "detach")}, mine


class Generator(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = torch.nn.Linear(2, 8), torch.nn.Linear(8, 4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(z))
        return self.head(h).detach() + h[:, :4]  # the bug: the head's output detached


def test_a_dcgan_tutorials_loop_explains_the_generators_missing_gradient(collector,
                                                                         job_name):
    """The DCGAN tutorial's order: the generator runs between the discriminator's two
    backward passes, before its step; the generator's loss comes after. The recording
    ended at the first backward and explained every optimizer's missing gradients with
    it: the generator's head, never run by then, was "never read by the loss". A recording
    now lasts to the step, and an optimizer whose parameters it did not see waits for its
    own: the detach() in the generator's forward is named."""
    torch.manual_seed(0)
    generator = Generator()
    critic = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    bce = torch.nn.BCEWithLogitsLoss()
    with monitor_for(collector, job_name) as monitor:
        opt_d = monitor.wrap(torch.optim.Adam(critic.parameters(), 2e-4), critic)
        opt_g = monitor.wrap(torch.optim.Adam(generator.parameters(), 2e-4), generator)
        for _ in range(4):
            critic.zero_grad()
            bce(critic(X[:8, :4]), torch.ones(8, 1)).backward()
            fake = generator(torch.randn(8, 2))
            bce(critic(fake.detach()), torch.zeros(8, 1)).backward()
            opt_d.step()
            generator.zero_grad()
            bce(critic(fake), torch.ones(8, 1)).backward()
            opt_g.step()
    assert monitor.close() is True
    causes = parse_metrics(collector.scrape())["gradwatch_gradient_missing_cause_info"]
    mine = {labels["variable"]: (labels["cause"], labels["op"], labels["source"])
            for labels, _ in causes if labels["training_job"] == job_name}
    detach_line = f"{__file__}:{Generator.forward.__code__.co_firstlineno + 2}"
    assert mine == {name: ("broken_at_op", "detach", detach_line)
                    for name in ("head.weight", "head.bias")}, mine


def test_parameters_frozen_before_training_are_not_watched(collector, webhook, job_name, caplog):
    """Fine-tuning as the PyTorch forum's "Best practice for freezing layers?" does it:
    requires_grad = False on the frozen layers, every parameter in the optimizer (it skips
    those without a gradient). Frozen on purpose, they must not page; a layer that is
    never called still does."""
    model = Net(extra=True)
    model.hidden.requires_grad_(False)
    caplog.set_level(logging.INFO, logger="gradwatch")
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        train(model, optimizer, 3)
    assert monitor.close() is True
    present = metrics(collector, "gradwatch_gradient_present", job_name)
    assert present == {"out.weight": 1, "out.bias": 1, "unused.weight": 0, "unused.bias": 0}
    alert = webhook.wait_for(lambda a: a["labels"].get("training_job") == job_name, 10)
    assert alert is not None and alert["labels"]["alertname"] == "GradientMissing"
    assert alert["annotations"]["variables"] == "unused.weight, unused.bias"
    assert "SGD: 2 of 6 parameters are frozen (requires_grad=False) and not watched" \
        in caplog.text


def test_parameters_unfrozen_later_are_watched_from_then_on(collector, job_name, caplog):
    """fastai's fine_tune: freeze, train, unfreeze, train on with the same optimizer. The
    thawed parameters are watched from the step they thaw at (the whole body thawed, or its top
    layers first), or within 100 steps (any other part), by the same task and optimizer:
    its step count and per-variable totals go on, and nothing is lost or refused on the
    way (the larger session registers once the smaller one's steps are in)."""
    from gradwatch.agent.torch.monitor import THAW_CHECK_STEPS

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(layer for _ in range(3) for layer in (
        torch.nn.Linear(4, 4), torch.nn.ReLU())), torch.nn.Linear(4, 1))
    model[:6].requires_grad_(False)
    caplog.set_level(logging.INFO, logger="gradwatch")
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        train(model, optimizer, 2)
        model[4].requires_grad_(True)  # the top frozen layer first
        train(model, optimizer, 2)
        model[0].bias.requires_grad_(True)  # neither the first nor the last still frozen
        norms = train(model, optimizer, THAW_CHECK_STEPS)
    assert monitor.close() is True
    assert gradwatch_warnings(caplog) == []
    grown = [r.getMessage() for r in caplog.records if "more parameters train" in r.message]
    assert grown == ["gradwatch: SGD: 2 more parameters train; watched from step 2 on: 4 in all",
                     "gradwatch: SGD: 1 more parameters train; watched from step "
                     f"{THAW_CHECK_STEPS} on: 5 in all"]
    assert set(norms[-1]) == {"0.bias", "4.weight", "4.bias", "6.weight", "6.bias"}
    steps = THAW_CHECK_STEPS + 4
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [steps]
    assert list(metrics(collector, "gradwatch_last_step", job_name).values()) == [steps - 1]
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        norms[-1], rel=1e-5)
    assert set(metrics(collector, "gradwatch_gradient_present", job_name).values()) == {1.0}
    missing = metrics(collector, "gradwatch_gradient_missing_steps_total", job_name)
    assert missing == dict.fromkeys(norms[-1], 0)


def test_parameters_added_with_add_param_group_are_watched_from_their_first_update(
        collector, job_name, caplog):
    """Gradual unfreezing as ULMFiT does it: the head trains, then the body joins the
    optimizer with ``add_param_group``; it is watched from its first update."""
    model = Net()
    model.hidden.requires_grad_(False)
    caplog.set_level(logging.INFO, logger="gradwatch")
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.Adam(model.out.parameters(), 1e-3), model)
        train(model, optimizer, 2)
        model.hidden.requires_grad_(True)
        optimizer.add_param_group({"params": list(model.hidden.parameters()), "lr": 1e-4})
        norms = train(model, optimizer, 3)
    assert monitor.close() is True
    assert gradwatch_warnings(caplog) == []
    assert "Adam: 2 more parameters train; watched from step 2 on: 4 in all" \
        in caplog.text
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [5.0]
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        norms[-1], rel=1e-5)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "still training"])
def test_param_group_lists_edited_by_hand_are_followed(collector, webhook, job_name, caplog,
                                                      frozen):
    """Parameters appended to a param group's list are watched from their first update; one
    taken out of every group (and frozen: what ``leave it out of the optimizer`` advises)
    is no longer watched, so it does not page as missing."""
    model = Net()
    caplog.set_level(logging.INFO, logger="gradwatch")
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.out.parameters(), 1e-2), model)
        train(model, optimizer, 2)
        optimizer.param_groups[0]["params"].extend(model.hidden.parameters())
        train(model, optimizer, 2)
        group = optimizer.param_groups[0]
        group["params"] = [p for p in group["params"] if p is not model.out.bias]
        model.out.bias.requires_grad_(not frozen)
        norms = train(model, optimizer, 2)
    assert monitor.close() is True
    assert gradwatch_warnings(caplog) == []
    assert "SGD: 1 left the optimizer; watched from step 4 on: 3 in all" in caplog.text
    assert metrics(collector, "gradwatch_gradient_present", job_name) == {
        "out.weight": 1, "hidden.weight": 1, "hidden.bias": 1}
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        {k: v for k, v in norms[-1].items() if k != "out.bias"}, rel=1e-5)
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [6.0]
    assert webhook.wait_for(lambda a: a["labels"].get("training_job") == job_name, 2) is None


def test_a_grown_session_waits_for_a_collector_that_comes_later(job_name):
    """The set grows while no collector listens: once one starts, the smaller session
    registers and delivers its steps, then the larger one; nothing is lost."""
    port = free_port()
    model = Net()
    model.hidden.requires_grad_(False)
    monitor = GradientMonitor(collector=f"127.0.0.1:{port}", training_job=job_name,
                              flush_interval_s=0.05)
    optimizer = monitor.wrap(torch.optim.Adam(model.out.parameters(), 1e-3), model)
    train(model, optimizer, 3)
    model.hidden.requires_grad_(True)
    optimizer.add_param_group({"params": list(model.hidden.parameters())})
    train(model, optimizer, 3)
    with CollectorProcess("--grpc-address", f"127.0.0.1:{port}") as collector:
        train(model, optimizer, 2)
        assert monitor.close(timeout_s=30) is True
        assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [8.0]
        assert set(metrics(collector, "gradwatch_gradient_present", job_name)) == {
            "out.weight", "out.bias", "hidden.weight", "hidden.bias"}


def test_pytorch_lightning_backbone_finetuning(collector, job_name, tmp_path, caplog):
    """Lightning's ``BackboneFinetuning`` callback, as its docstring's transfer-learning
    model uses it: the optimizer holds the head; at the unfreezing epoch the callback
    thaws the backbone and adds it with ``add_param_group``. The backbone is watched from
    the step after, in the same session's count."""
    pl = pytest.importorskip("pytorch_lightning")
    monitor = monitor_for(collector, job_name)

    class TransferLearning(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(2)
            self.backbone = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
            self.head = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_index):
            x, y = batch
            return torch.nn.functional.mse_loss(self.head(self.backbone(x)), y)

        def configure_optimizers(self):
            return monitor.wrap(torch.optim.Adam(self.head.parameters(), 1e-3), self)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8)
    finetuning = pl.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, callbacks=[finetuning],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    caplog.set_level(logging.INFO, logger="gradwatch")
    with monitor:
        trainer.fit(TransferLearning(), loader)
    assert monitor.close() is True
    assert gradwatch_warnings(caplog) == []
    assert "Adam: 2 more parameters train; watched from step 4 on: 4 in all" \
        in caplog.text
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [12.0]
    assert metrics(collector, "gradwatch_gradient_present", job_name) == {
        "head.weight": 1, "head.bias": 1, "backbone.0.weight": 1, "backbone.0.bias": 1}


class LoRALinear(torch.nn.Module):
    """A frozen linear layer with a trainable low-rank adapter beside it."""

    def __init__(self, width: int, rank: int = 2) -> None:
        super().__init__()
        self.base = torch.nn.Linear(width, width).requires_grad_(False)
        self.lora_a = torch.nn.Parameter(0.01 * torch.randn(rank, width))
        self.lora_b = torch.nn.Parameter(0.01 * torch.randn(width, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


def test_lora_under_reentrant_checkpointing_pages_the_adapters_alone(collector, webhook,
                                                                      job_name):
    """LoRA with reentrant gradient checkpointing and frozen embeddings (microsoft/LoRA#120,
    huggingface/transformers#21381): no input of a checkpointed block needs a gradient, so
    the adapters silently get none while the head trains. The page names the adapters
    alone (the frozen base is not watched) and says to use use_reentrant=False."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    embed = torch.nn.Embedding(16, 8).requires_grad_(False)
    blocks = torch.nn.ModuleList([LoRALinear(8), LoRALinear(8)])
    head = torch.nn.Linear(8, 1)
    model = torch.nn.ModuleDict({"embed": embed, "blocks": blocks, "head": head})
    ids = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(0))
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.AdamW(model.parameters(), 1e-3), model)
        for _ in range(3):
            optimizer.zero_grad()
            h = embed(ids)
            for block in blocks:
                h = checkpoint(block, h, use_reentrant=True)
            head(h).pow(2).mean().backward()
            optimizer.step()
    assert monitor.close() is True
    adapters = [f"blocks.{i}.lora_{m}" for i in (0, 1) for m in "ab"]
    present = metrics(collector, "gradwatch_gradient_present", job_name)
    assert present == {**dict.fromkeys(adapters, 0), "head.weight": 1, "head.bias": 1}
    alert = webhook.wait_for(lambda a: a["labels"].get("training_job") == job_name, 10)
    assert alert is not None and alert["labels"]["alertname"] == "GradientMissing"
    assert alert["annotations"]["variables"] == ", ".join(adapters)
    assert "use_reentrant=False" in alert["annotations"]["causes"]


def test_compiled_model_names_and_norms(collector, job_name):
    model = Net()
    compiled = torch.compile(model)
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.Adam(compiled.parameters(), 1e-2), compiled)
        norms = train(compiled, optimizer, 3)
    reported = metrics(collector, "gradwatch_gradient_norm", job_name)
    assert set(reported) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
    assert reported["out.weight"] == pytest.approx(norms[-1]["_orig_mod.out.weight"], rel=1e-5)


def test_a_compiled_model_compiles_as_often_as_without_gradwatch(collector, job_name):
    """The first step after ``wrap`` is recorded for diagnosis. Dynamo traced the recording
    mode: a graph break at nearly every op, then the model compiled again without it (a
    6-block MLP: 6 graphs where it compiles 1; 7.3 s and 3.6 s for its first two steps
    against 1.7 s). The recorded step runs eagerly and still explains an unused layer."""
    from torch._dynamo.utils import counters

    def graphs(monitor: GradientMonitor | None) -> int:
        model = Net(extra=True)
        compiled = torch.compile(model, backend="eager")  # Dynamo's part is at stake
        optimizer = torch.optim.Adam(compiled.parameters(), 1e-2)
        if monitor is not None:
            optimizer = monitor.wrap(optimizer, compiled)
        torch._dynamo.reset()
        counters.clear()
        train(compiled, optimizer, 4)
        return counters["stats"]["unique_graphs"]

    plain = graphs(None)
    with monitor_for(collector, job_name) as monitor:
        watched = graphs(monitor)
    assert watched == plain == 1
    assert graphs(None) == 1  # the compiler compiles again once the recording is over
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [4.0]
    assert set(metrics(collector, "gradwatch_gradient_missing_cause_info", job_name,
                       cause="unused")) == {"unused.weight", "unused.bias"}


def test_a_compiled_model_trained_with_autograd_grad_compiles(collector, job_name):
    """A loop without ``backward()`` (``torch.autograd.grad``, gradients stored by hand):
    the first recording waited for a ``backward()`` that never came, recording every step
    of the run (2.5x slower steps, tensors kept up to 256 MiB) and, compiled, running the
    model eagerly for good. It ends with the step now."""
    from torch._dynamo.utils import counters

    model = Net()
    compiled = torch.compile(model, backend="eager")
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(compiled.parameters(), 1e-2), compiled)
        torch._dynamo.reset()
        counters.clear()
        for _ in range(4):
            loss = torch.nn.functional.mse_loss(compiled(X), Y)
            for param, grad in zip(model.parameters(), torch.autograd.grad(
                    loss, list(model.parameters())), strict=True):
                param.grad = grad
            optimizer.step()
            optimizer.zero_grad()
    assert counters["stats"]["unique_graphs"] == 1
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [4.0]
    assert set(metrics(collector, "gradwatch_gradient_present", job_name).values()) == {1.0}


def compiled_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int
                   ) -> tuple[int, dict[str, float]]:
    """Trains with ``optimizer.step()`` inside a ``torch.compile``d function; returns the
    graphs Dynamo made and the last step's gradient norms."""
    from torch._dynamo.utils import counters

    @torch.compile(backend="eager")  # Dynamo's part is at stake; no code generation
    def step() -> None:
        optimizer.step()

    torch._dynamo.reset()
    counters.clear()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        norms = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
        step()
    return counters["stats"]["unique_graphs"], norms


def test_a_compiled_optimizer_step_compiles_without_the_hooks(collector, job_name):
    """PyTorch's "compiling the optimizer" recipe: ``torch.compile`` of a function that
    calls ``optimizer.step()``. Dynamo traced the hooks' bookkeeping too: 11 graphs where
    the plain step makes 1 (the ring's index recompiled the write at every step). The
    hooks run eagerly; the step compiles as without gradwatch."""
    model = Net()
    plain, _ = compiled_steps(model, torch.optim.Adam(model.parameters(), torch.tensor(0.01)), 6)
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.Adam(model.parameters(), torch.tensor(0.01)), model)
        graphs, norms = compiled_steps(model, optimizer, 6)
    assert graphs == plain
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [6.0]
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        norms, rel=1e-5)


def test_a_compiled_training_step_with_clipping_is_watched_and_diagnosed(collector, job_name):
    """The whole step compiled: forward, ``backward()``, ``clip_grad_norm_``,
    ``optimizer.step()`` and ``zero_grad()`` in one ``torch.compile``d function, with a
    layer the forward never calls: every step reported, the layer paged with its cause."""
    model, unused = Net(), torch.nn.Linear(3, 3)
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.AdamW(
            [*model.parameters(), *unused.parameters()], 1e-3), model)

        @torch.compile(backend="eager")
        def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            optimizer.step()
            optimizer.zero_grad()
            return loss

        torch._dynamo.reset()
        for _ in range(5):
            train_step(X, Y)
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [5.0]
    present = metrics(collector, "gradwatch_gradient_present", job_name)
    assert sorted(v for v in present.values()) == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert set(metrics(collector, "gradwatch_gradient_missing_cause_info", job_name,
                       cause="unused")) == {"group0.param4", "group0.param5"}
    norms = metrics(collector, "gradwatch_gradient_norm", job_name)
    assert max(norms.values()) > 1e-3  # before clipping


def test_an_optimizer_per_parameter_stepping_inside_backward(collector, job_name):
    """PyTorch's "fusing the optimizer step into the backward pass" recipe: one optimizer
    per parameter, stepped (and zeroed) by a post-accumulate-grad hook inside
    ``backward()``. Each is its own session, every step, with the gradient's norm."""
    model = Net()
    norms: dict[str, float] = {}
    names = {p: n for n, p in model.named_parameters()}
    with monitor_for(collector, job_name) as monitor:
        optimizers = {p: monitor.wrap(torch.optim.Adam([p], foreach=False), model)
                      for p in model.parameters()}

        def step_in_backward(param: torch.Tensor) -> None:
            norms[names[param]] = float(param.grad.norm())
            optimizers[param].step()
            optimizers[param].zero_grad()

        for param in model.parameters():
            param.register_post_accumulate_grad_hook(step_in_backward)
        for _ in range(3):
            torch.nn.functional.mse_loss(model(X), Y).backward()
    assert monitor.close() is True
    steps = metrics(collector, "gradwatch_steps_total", job_name)
    assert sorted(k.split(",")[0] for k in steps) == [
        "optimizer=Adam", "optimizer=Adam_2", "optimizer=Adam_3", "optimizer=Adam_4"]
    assert set(steps.values()) == {3.0}
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        norms, rel=1e-5)


def test_accumulated_gradients_are_reported_once_per_optimizer_step(collector, job_name):
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        for _ in range(2):  # 2 optimizer steps of 4 micro-batches each
            optimizer.zero_grad()
            for micro in X.split(8):
                torch.nn.functional.mse_loss(model(micro), Y[:8]).backward()
            accumulated = float(model.out.weight.grad.norm())
            optimizer.step()
    assert set(metrics(collector, "gradwatch_steps_total", job_name).values()) == {2.0}
    assert metrics(collector, "gradwatch_gradient_norm", job_name)["out.weight"] == \
        pytest.approx(accumulated, rel=1e-5)


def test_accumulated_gradients_clipped_after_every_micro_batch(collector, job_name):
    """Clipping after each micro-batch's backward (common in users' accumulation loops):
    the step applies the sum of the four, clipped as it grew. gradwatch measured at the
    first clip and kept that record: the first micro-batch's norms (out.weight 0.278 for
    0.532), and a NaN that entered at the third never counted. Each clip now measures
    again when a backward pass added to the gradients since the last one."""
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        for step in range(2):
            optimizer.zero_grad()
            for micro, x in enumerate(X.clone().split(8)):
                if step == 1 and micro == 2:
                    x[0, 0] = float("nan")
                torch.nn.functional.mse_loss(model(x), Y[:8]).backward()
                before = {n: p.grad.clone() for n, p in model.named_parameters()}
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e3)
            if step == 0:
                norms = {n: float(g.norm()) for n, g in before.items()}
                optimizer.step()
                time.sleep(0.3)  # reported before the NaN step
                reported = metrics(collector, "gradwatch_gradient_norm", job_name)
            else:
                nans = {n: float(g.isnan().sum()) for n, g in before.items()}
                optimizer.step()
    assert monitor.close() is True
    assert reported == pytest.approx(norms, rel=1e-5)
    assert min(nans.values()) > 0
    assert metrics(collector, "gradwatch_gradient_nan_values_total", job_name) == nans
    assert list(metrics(collector, "gradwatch_nonfinite_steps_total", job_name).values()) \
        == [1.0]


def actor_critic() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.ModuleDict]:
    torch.manual_seed(0)
    actor, critic = torch.nn.Linear(4, 2), torch.nn.Linear(4, 1)
    return actor, critic, torch.nn.ModuleDict({"actor": actor, "critic": critic})


def rollout() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Observations, actions taken, returns."""
    return torch.randn(32, 4), torch.randint(0, 2, (32,)), torch.randn(32, 1)


def actor_critic_losses(actor: torch.nn.Module, critic: torch.nn.Module, *,
                        detach_advantage: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One rollout's policy-gradient loss and value loss."""
    obs, action, ret = rollout()
    value = critic(obs)
    log_prob = torch.log_softmax(actor(obs), -1).gather(1, action[:, None])
    advantage = (ret - value).detach() if detach_advantage else ret - value
    return -(log_prob * advantage).mean(), torch.nn.functional.mse_loss(value, ret)


@pytest.mark.parametrize("clipped", ["each network", "everything", "the actor only"])
def test_losses_backpropagated_and_clipped_one_by_one(collector, job_name, clipped, caplog):
    """Actor-critic programs (A2C, PPO) with one optimizer: the actor's loss (the advantage
    detached from the critic) backpropagated and clipped, then the critic's loss. gradwatch
    measured at the first clip, when the critic had no gradient yet: at every step it read
    missing, paged GradientMissing and was blamed on the advantage's ``detach()``. Those
    that get a gradient after the clip are now measured and added, before clipping."""
    actor, critic, model = actor_critic()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.Adam(model.parameters(), 1e-3), model)
        for _ in range(3):
            optimizer.zero_grad()
            actor_loss, critic_loss = actor_critic_losses(actor, critic)
            actor_loss.backward()
            actor_norm = float(actor.weight.grad.norm())
            torch.nn.utils.clip_grad_norm_(
                model.parameters() if clipped == "everything" else actor.parameters(), 1e-3)
            critic_loss.backward()
            critic_norm = float(critic.weight.grad.norm())
            if clipped != "the actor only":
                torch.nn.utils.clip_grad_norm_(
                    critic.parameters() if clipped == "each network" else model.parameters(),
                    1e-3)
            optimizer.step()
    assert monitor.close() is True
    assert set(metrics(collector, "gradwatch_gradient_present", job_name).values()) == {1.0}
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [3.0]
    norms = metrics(collector, "gradwatch_gradient_norm", job_name)
    assert norms["critic.weight"] == pytest.approx(critic_norm, rel=1e-5)  # before clipping
    assert norms["actor.weight"] == pytest.approx(actor_norm, rel=1e-5)
    assert gradwatch_warnings(caplog) == []


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_submodules_zero_grad_clears_its_own_gradients_only(collector, job_name,
                                                              set_to_none):
    """Actor-critic with one optimizer: the actor's loss reaches the critic too, so the loop
    zeroes the critic's gradients (``model.critic.zero_grad()``) before backpropagating
    the critic's own loss. That took every gradient of the optimizer as cleared: the
    actor read missing at every step, paged, and was blamed on ``zero_grad()``."""
    actor, critic, model = actor_critic()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.Adam(model.parameters(), 1e-3), model)
        for _ in range(3):
            optimizer.zero_grad()
            actor_loss, critic_loss = actor_critic_losses(actor, critic, detach_advantage=False)
            actor_loss.backward(retain_graph=True)
            critic.zero_grad(set_to_none=set_to_none)
            critic_loss.backward()
            norms = {name: float(p.grad.norm()) for name, p in model.named_parameters()}
            optimizer.step()
    assert monitor.close() is True
    assert set(metrics(collector, "gradwatch_gradient_present", job_name).values()) == {1.0}
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        norms, rel=1e-5)


def test_a_loss_backpropagated_after_a_clip_is_part_of_the_diagnosis(collector, job_name):
    """The actor's loss backpropagated and clipped, then the critic run and its loss, detached
    by mistake: the recording ended at the clip, so the critic read as never used."""
    actor, critic, model = actor_critic()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.Adam(model.parameters(), 1e-3), model)
        for _ in range(2):
            obs, action, ret = rollout()
            optimizer.zero_grad()
            log_prob = torch.log_softmax(actor(obs), -1).gather(1, action[:, None])
            (-(log_prob * ret).mean()).backward()
            torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
            detached_line = sys._getframe().f_lineno + 1
            value = critic(obs).detach().requires_grad_()
            torch.nn.functional.mse_loss(value, ret).backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            optimizer.step()
    assert monitor.close() is True
    causes = parse_metrics(collector.scrape())["gradwatch_gradient_missing_cause_info"]
    mine = {labels["variable"]: (labels["cause"], labels["op"], labels["source"])
            for labels, _ in causes if labels["training_job"] == job_name}
    assert mine == {name: ("broken_at_op", "detach", f"{__file__}:{detached_line}")
                    for name in ("critic.weight", "critic.bias")}, mine


def test_lazy_modules_wrapped_before_their_first_forward(collector, job_name):
    """``nn.LazyLinear`` with its optimizer made and wrapped before the dry run: the
    recording of the first step read the uninitialized parameters' shapes and raised out
    of the user's forward pass."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.ReLU(), torch.nn.LazyLinear(1))
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.Adam(model.parameters(), 1e-2), model)
        model(X[:2])  # the dry run
        norms = train(model, optimizer, 2)
    assert monitor.close() is True
    assert set(metrics(collector, "gradwatch_gradient_present", job_name).values()) == {1.0}
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        norms[-1], rel=1e-5)


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization as github.com/davda54/sam writes it: a torch optimizer
    sharing its base optimizer's ``param_groups``; its README's loop calls ``first_step``
    (climb to the neighbourhood's worst point) and ``second_step`` (come back, step the base
    optimizer with that point's gradients), never ``step``."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, **kwargs) -> None:
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        norm = torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]
                            if p.grad is not None]).norm()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["old_p"] = p.data.clone()
                    p.add_(p.grad * group["rho"] / (norm + 1e-12))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None) -> None:
        self.first_step(zero_grad=True)
        torch.enable_grad()(closure)()
        self.second_step()


def test_an_optimizer_of_parameters_left_on_the_meta_device_pages(collector, job_name,
                                                                  caplog):
    """A model made on the meta device, its optimizer made there, then ``to_empty()``: the
    model holds new parameters and the optimizer updates nothing. gradwatch explained it
    in the log, then failed to record a step on the meta device (a traceback), so nothing
    paged."""
    with torch.device("meta"):
        model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        model.to_empty(device="cpu")
        model.hidden.reset_parameters()
        model.out.reset_parameters()
        train(model, optimizer, 2)
    assert monitor.close() is True
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert set(metrics(collector, "gradwatch_gradient_present", job_name).values()) == {0.0}
    causes = parse_metrics(collector.scrape())["gradwatch_gradient_missing_cause_info"]
    assert {labels["cause"] for labels, _ in causes
            if labels["training_job"] == job_name} == {"not_on_loss_path"}


class Lookahead(torch.optim.Optimizer):
    """Lookahead as some write it: not set up as a torch optimizer (no
    ``Optimizer.__init__``), its base optimizer held under a name of its own and sharing
    its ``param_groups``; every ``k`` steps the weights go halfway back to slow copies."""

    def __init__(self, base: torch.optim.Optimizer, k: int = 2) -> None:
        self._base_optimizer, self.k, self.steps = base, k, 0
        self.param_groups, self.defaults, self.state = base.param_groups, base.defaults, {}
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None) -> None:
        self._base_optimizer.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            params = [p for g in self.param_groups for p in g["params"]]
            for slow, p in zip(self.slow, params, strict=True):
                slow.add_(p - slow, alpha=0.5)
                p.copy_(slow)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._base_optimizer.zero_grad(set_to_none)


def test_an_optimizer_wrapper_holding_its_base_under_another_name(collector, job_name,
                                                                   caplog):
    """The wrapper above could not be watched: ``wrap`` logged a traceback (it has no step
    hooks of its own) and nothing was reported. Its base optimizer is watched instead."""
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(Lookahead(torch.optim.Adam(model.parameters(), 1e-2)), model)
        norms = train(model, optimizer, 3)
    assert monitor.close() is True
    assert gradwatch_warnings(caplog) == []
    assert metrics(collector, "gradwatch_steps_total", job_name) == {
        f"optimizer=Adam,task_index=0,task_type=worker,training_job={job_name}": 3.0}
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        norms[-1], rel=1e-5)


@pytest.mark.parametrize("style", ["first_step, second_step", "step(closure)"])
def test_sam_reports_the_gradients_its_base_optimizer_applies(collector, job_name, style):
    """SAM wrapped as users wrap an optimizer. Driven as its README shows (first_step,
    second_step), gradwatch reported nothing and said nothing: SAM's own ``step``, which
    gradwatch hooked, never runs. The base optimizer it shares its parameter groups with
    is watched instead: each update is reported once, with the gradients it applies (the
    second backward pass's)."""
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(SAM(model.parameters(), torch.optim.SGD, lr=0.1), model)

        def loss() -> torch.Tensor:
            loss = torch.nn.functional.mse_loss(model(X), Y)
            loss.backward()
            return loss

        applied: dict[str, float] = {}

        def closure() -> torch.Tensor:
            value = loss()
            applied.update({n: float(p.grad.norm()) for n, p in model.named_parameters()})
            return value

        for _ in range(3):
            loss()
            if style == "step(closure)":
                optimizer.step(closure)
                optimizer.zero_grad()
            else:
                optimizer.first_step(zero_grad=True)
                loss()
                applied.update({n: float(p.grad.norm()) for n, p in model.named_parameters()})
                optimizer.second_step(zero_grad=True)
    assert monitor.close() is True
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [3.0]
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        applied, rel=1e-5)


def clip_in_two_calls(parameters, max_norm: float) -> None:
    """torch ≥ 2.6's split API, as TorchTitan clips (the total norm may be all-reduced
    between the two calls)."""
    parameters = list(parameters)
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)


def clip_in_one_call(parameters, max_norm: float) -> None:
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)  # looked up now, as users do


@pytest.mark.parametrize("clip", [clip_in_one_call, clip_in_two_calls],
                         ids=["clip_grad_norm_", "clip_grads_with_norm_"])
def test_norms_are_taken_before_clipping(collector, job_name, clip):
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        norms = train(model, optimizer, 2, before_step=lambda: clip(
            model.parameters(), max_norm=1e-3))
    reported = metrics(collector, "gradwatch_gradient_norm", job_name)
    assert reported["out.weight"] == pytest.approx(norms[-1]["out.weight"], rel=1e-5)
    assert reported["out.weight"] > 1e-2  # clipped, it would be below 1e-3


@pytest.mark.parametrize("write", ["pruning mask", "step pre-hook adding noise"])
def test_gradients_written_in_place_after_clipping_keep_the_norms_before(collector,
                                                                        job_name, write):
    """Between the clip and the update, programs write ``.grad`` in place: a pruning mask,
    noise for differential privacy (often from a step pre-hook). The write moves the
    gradients' version counters as a backward pass would; it is no backward pass, and the
    norms stay those before clipping (not 1e4 times smaller)."""
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)

        def write_in_place(*_) -> None:
            for p in model.parameters():
                p.grad.mul_(torch.ones_like(p.grad)) if write == "pruning mask" else \
                    p.grad.add_(torch.zeros_like(p.grad))

        if write == "step pre-hook adding noise":
            optimizer.register_step_pre_hook(write_in_place)

        def before_step() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
            if write == "pruning mask":
                write_in_place()

        norms = train(model, optimizer, 2, before_step=before_step)
    reported = metrics(collector, "gradwatch_gradient_norm", job_name)
    assert reported == pytest.approx(norms[-1], rel=1e-5)


def test_a_step_skipped_after_clipping_found_it_not_finite_is_not_reported(collector,
                                                                           job_name):
    """The loop that clips and skips the update when the total norm is not finite (a bad
    batch): the skipped step's gradients, measured at the clipping, are dropped at the
    next ``zero_grad``; each step taken reports its own, and nothing pages as NaN."""
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        for batch in range(5):
            optimizer.zero_grad()
            x = X.clone()
            if batch == 2:
                x[0, 0] = float("nan")
            torch.nn.functional.mse_loss(model(x), Y).backward()
            norms = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
            if not torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)):
                continue
            optimizer.step()
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [4.0]
    assert list(metrics(collector, "gradwatch_nonfinite_steps_total", job_name).values()) \
        == [0.0]
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(norms,
                                                                                    rel=1e-5)


@pytest.mark.parametrize("make, keyword, clip", [
    (lambda params: torch.optim.LBFGS(params, max_iter=4), False, False),
    (lambda params: torch.optim.LBFGS(params, max_iter=4), False, True),
    (lambda params: torch.optim.SGD(params, 1e-2), True, False)])
def test_a_step_given_a_closure_reports_the_gradients_the_closure_computes(
        collector, job_name, make, keyword, clip):
    """``optimizer.step(closure)`` (LBFGS, as PyTorch's neural style tutorial uses it):
    the gradients exist only once the step has called the closure. The first call's are
    reported (later calls are LBFGS's own evaluations), not the stale or absent ones the
    step started with; also where the closure clips (as Lightning's does with
    ``gradient_clip_val``): each clip measured again, so the last call's were reported."""
    model = Net()
    calls: list[list[dict[str, float]]] = []  # per step, each call's gradient norms

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), Y)
        loss.backward()
        calls[-1].append({n: float(p.grad.norm()) for n, p in model.named_parameters()})
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-2)
        return loss

    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(make(model.parameters()), model)
        for _ in range(3):
            calls.append([])
            optimizer.step(closure=closure) if keyword else optimizer.step(closure)
    assert monitor.close() is True
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [3.0]
    assert set(metrics(collector, "gradwatch_gradient_present", job_name).values()) == {1.0}
    reported = metrics(collector, "gradwatch_gradient_norm", job_name)
    assert len(calls[-1]) > 1 or not clip
    assert reported == pytest.approx(calls[-1][0], rel=1e-5)


def test_pytorch_lightning_automatic_optimization(collector, job_name, tmp_path):
    """Lightning's ``Trainer`` steps the optimizer with a closure that runs
    ``training_step`` and the backward pass: every parameter is present, every step."""
    pl = pytest.importorskip("pytorch_lightning")
    monitor = monitor_for(collector, job_name)

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def training_step(self, batch, batch_index):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return monitor.wrap(torch.optim.Adam(self.parameters(), 1e-3), self)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with monitor:
        trainer.fit(Regression(), loader)
    assert monitor.close() is True
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [8.0]
    assert set(metrics(collector, "gradwatch_gradient_present", job_name).values()) == {1.0}
    assert set(metrics(collector, "gradwatch_gradient_norm", job_name)) == {
        "net.hidden.weight", "net.hidden.bias", "net.out.weight", "net.out.bias"}


@pytest.mark.parametrize("wrapped", ["before prepare", "after prepare"])
def test_hugging_face_accelerate_with_gradient_accumulation(collector, job_name, wrapped):
    """Accelerate's quick-tour loop: ``accelerator.accumulate``, ``accelerator.backward``,
    ``clip_grad_norm_`` when gradients sync, an LR scheduler. Whether the user wraps the
    optimizer before ``prepare`` or the ``AcceleratedOptimizer`` it returns, each update
    (every second batch) is reported once, with the accumulated norms before clipping."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    model = Net()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=4)
    unclipped = []
    try:
        with monitor_for(collector, job_name) as monitor:
            optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
            if wrapped == "before prepare":
                optimizer = monitor.wrap(optimizer, model)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
            accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
            model, optimizer, loader, scheduler = accelerator.prepare(
                model, optimizer, loader, scheduler)
            if wrapped == "after prepare":
                optimizer = monitor.wrap(optimizer, model)
            for x, y in loader:
                with accelerator.accumulate(model):
                    accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
                    if accelerator.sync_gradients:
                        unclipped.append({n: p.grad.norm().item()
                                          for n, p in model.named_parameters()})
                        accelerator.clip_grad_norm_(model.parameters(), 1e-3)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
        assert monitor.close() is True
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert len(unclipped) == 4  # 8 batches, an update every second one
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [4.0]
    assert list(metrics(collector, "gradwatch_last_step", job_name).values()) == [3.0]
    assert set(metrics(collector, "gradwatch_gradient_present", job_name).values()) == {1.0}
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        unclipped[-1], rel=1e-5)


@pytest.mark.timeout(120)
def test_forked_data_loader_workers_and_children_run_while_the_monitor_streams(
        collector, job_name):
    """DataLoader workers fork the training process at every epoch while the sender is in
    a gRPC call. gRPC's fork handlers crashed such a child (SIGSEGV: "DataLoader worker
    exited unexpectedly", 5 runs in 6); a forked child that steps the wrapped optimizer
    reports nothing and exits at once, and the parent delivers every step. A child that
    makes its own monitor (Hogwild) after the parent streamed is disabled with one line
    (its channel never connected: 10 s lost at close, steps undelivered, no word why),
    also once the parent's monitor is closed (gRPC's asyncio runtime stays up); a child
    forked before the parent streamed delivers its steps."""
    env = {**os.environ, "GRADWATCH_COLLECTOR": collector.grpc_target,
           "GRADWATCH_TRAINING_JOB": job_name, "OMP_NUM_THREADS": "1"}
    env.pop("GRPC_ENABLE_FORK_SUPPORT", None)
    script = Path(__file__).with_name("forked_workers_job.py")
    result = subprocess.run([sys.executable, str(script), "6"], env=env,
                            capture_output=True, text=True, timeout=100)
    output = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, output
    assert "steps 24" in result.stdout, output
    assert result.stdout.count("child exited 0") == 4, output
    assert "skipping fork() handlers" not in result.stderr
    assert "gradwatch: gRPC's fork handlers are on" not in result.stderr
    assert result.stderr.count("gRPC cannot connect from such a child") == 2, output
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [24.0]
    assert list(metrics(collector, "gradwatch_steps_total", f"{job_name}-child").values()
                ) == [3.0]


@pytest.mark.parametrize("optimizer_each_run", ["new", "same"])
def test_a_notebook_cell_run_again_replaces_its_monitor(collector, job_name, caplog,
                                                        optimizer_each_run):
    """A notebook cell that makes a monitor, wraps and trains, run twice: the first
    monitor is never closed. Both reported the task's ``Adam`` and kept replacing each
    other's session at the collector (NOT_FOUND every flush; the first one's exit hook
    left a session with 0 steps). The second monitor closes the first."""
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    monitors = []
    for _ in range(2):
        monitors.append(monitor_for(collector, job_name))
        if optimizer_each_run == "new":
            optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        train(model, monitors[-1].wrap(optimizer, model), 5)
        time.sleep(0.3)  # a few flushes
    assert monitors[1].close() is True
    monitors[0].close()  # what its exit hook does
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [5.0]
    warnings = gradwatch_warnings(caplog)
    assert len(warnings) == 1 and "replaces the one open in this process" in warnings[0]


@pytest.mark.parametrize("reset", ["none", "zero_grad(set_to_none=False)"])
def test_a_step_without_a_backward_pass_since_the_last_says_so(collector, job_name, caplog,
                                                                reset):
    """``step()`` called twice after one ``backward()`` (or after ``zero_grad`` with no
    ``backward()``): the second update reuses old gradients, and every parameter is
    missing at that step. It paged without a cause ("not diagnosed"): the recording of
    the next, healthy step had nothing to explain."""
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(X), Y).backward()
            optimizer.step()
            if reset != "none":
                optimizer.zero_grad(set_to_none=False)
            optimizer.step()  # the bug
    causes = parse_metrics(collector.scrape())["gradwatch_gradient_missing_cause_info"]
    mine = {labels["variable"]: labels["cause"] for labels, _ in causes
            if labels["training_job"] == job_name}
    assert mine == {name: "unknown" for name, _ in model.named_parameters()}, mine
    warnings = gradwatch_warnings(caplog)
    assert len(warnings) == 1 and "Its gradient is as the previous step" in warnings[0]


def test_a_part_of_the_model_skipped_for_a_step_is_not_said_to_have_had_no_backward(
        collector, job_name, caplog):
    """Two optimizers, gradients zeroed in place, the encoder skipped at one step while
    the head trains: every encoder gradient is as the last step left it, but backward()
    ran (for the head). It was said to be "stepped again on old gradients" and paged as
    critical (with a skip of one step, no recording catches it: it is not diagnosed)."""
    encoder, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    model = torch.nn.Sequential(encoder, head)
    with monitor_for(collector, job_name) as monitor:
        optimizers = [monitor.wrap(torch.optim.SGD(encoder.parameters(), 1e-2), model),
                      monitor.wrap(torch.optim.Adam(head.parameters(), 1e-2), model)]
        for step in range(4):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=False)
            h = X if step == 2 else encoder(X)
            torch.nn.functional.mse_loss(head(h), Y).backward()
            for optimizer in optimizers:
                optimizer.step()
    assert not [w for w in gradwatch_warnings(caplog) if "previous step" in w]
    assert list(metrics(collector, "gradwatch_gradient_missing_steps_total", job_name,
                        optimizer="SGD").values()) == [1.0, 1.0]


def test_models_trained_one_after_another_go_and_their_sessions_end(collector, job_name):
    """A hyperparameter sweep, a k-fold loop or a notebook cell run again trains a fresh
    model and optimizer each time under one monitor. The monitor kept every model, its
    parameters and its optimizer (Adam's moments too) alive until it closed: out of
    memory after a few trials on a GPU. Each trial also opened a session under a new name
    (Adam, Adam_2, ...: a new series each) that stayed open. Now a dropped optimizer goes
    with its model at once (no garbage collector pass needed), its session ends at the
    collector once delivered, and the next trial reports under its name."""
    trials = [lambda p: torch.optim.Adam(p, 1e-2), lambda p: torch.optim.Adam(p, 1e-3),
              lambda p: torch.optim.SGD(p, 1e-2)]
    gone = []
    with monitor_for(collector, job_name) as monitor:
        for steps, make in enumerate(trials, start=2):
            model = Net()
            optimizer = monitor.wrap(make(model.parameters()), model)
            assert [[ref() is None for ref in refs] for refs in gone] == [
                [True] * 3] * len(gone)  # model, a parameter, optimizer of each trial before
            train(model, optimizer, steps)
            gone.append((weakref.ref(model), weakref.ref(model.hidden.weight),
                         weakref.ref(optimizer)))
            del model, optimizer
        deadline = time.monotonic() + 20
        while (reporting := {k.split(",")[0] for k in metrics(
                collector, "gradwatch_last_report_timestamp_seconds", job_name)}) != {
                "optimizer=SGD"}:  # Adam's last session said goodbye while SGD trains on
            assert time.monotonic() < deadline, reporting
            time.sleep(0.05)
    assert monitor.close() is True
    assert metrics(collector, "gradwatch_steps_total", job_name) == {
        f"optimizer=Adam,task_index=0,task_type=worker,training_job={job_name}": 3.0,
        f"optimizer=SGD,task_index=0,task_type=worker,training_job={job_name}": 4.0}
    assert all(ref() is None for refs in gone for ref in refs)


def test_a_second_process_for_one_task_says_why_nothing_was_delivered(collector, job_name,
                                                                      caplog):
    """Two processes started as the same task (a launcher run twice): the collector
    refuses the second one's session (ALREADY_EXISTS), which says so when it starts; its
    closing line then blamed a collector that sent no acknowledgement within 5 s."""
    first = subprocess.Popen([sys.executable, "-c", f"""
import time, torch
from gradwatch.agent.torch import GradientMonitor
model = torch.nn.Linear(4, 1)
with GradientMonitor(collector={collector.grpc_target!r}, training_job={job_name!r},
                     flush_interval_s=0.05) as monitor:
    optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 0.1), model)
    for _ in range(600):
        optimizer.zero_grad(); model(torch.ones(2, 4)).sum().backward(); optimizer.step()
        print("stepped", flush=True)
        time.sleep(0.05)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "stepped\n"
        deadline = time.monotonic() + 30
        while not metrics(collector, "gradwatch_steps_total", job_name):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        model = torch.nn.Linear(4, 1)
        caplog.set_level(logging.WARNING, logger="gradwatch")
        monitor = monitor_for(collector, job_name)
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 0.1), model)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            optimizer.step()
        time.sleep(0.5)
        assert monitor.close(timeout_s=1.0) is False
    finally:
        first.kill()
        first.wait(timeout=30)
    (closing,) = [w for w in gradwatch_warnings(caplog) if "closed with" in w]
    assert "the collector did not take SGD: " in closing and "already reporting" in closing, \
        closing


def test_a_loss_without_graph_is_explained_before_pytorchs_error(collector, job_name,
                                                                 caplog):
    """A loss computed through ``argmax`` alone has no graph: ``backward()`` raises
    PyTorch's "element 0 of tensors does not require grad", no step follows, and gradwatch
    said nothing, though it had recorded the cause. It says it now, and PyTorch's error
    goes on unchanged."""
    caplog.set_level(logging.WARNING, logger="gradwatch")
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        line = sys._getframe().f_lineno + 1
        loss = (model(X).argmax(-1).float() - Y[:, 0]).square().mean()
        with pytest.raises(RuntimeError, match="does not require grad"):
            loss.backward()
    (said,) = gradwatch_warnings(caplog)
    assert "gets no gradient: The path to the loss crosses argmax()" in said
    assert f"{__file__}:{line}" in said


def test_a_dropped_optimizer_is_left_alone_until_forgotten(collector, job_name):
    """A notebook cell run again wraps a new optimizer over the same model: the old one is
    dropped but forgotten only at the next step's end. Clipping before that reached its
    hooks, which read its (gone) param groups: an AttributeError raised into training."""
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.Adam(model.parameters(), 1e-2), model)
        train(model, optimizer, 2)
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    assert monitor.close() is True
    assert metrics(collector, "gradwatch_steps_total", job_name) == {
        f"optimizer=Adam,task_index=0,task_type=worker,training_job={job_name}": 2.0,
        f"optimizer=SGD,task_index=0,task_type=worker,training_job={job_name}": 1.0}


def test_a_step_on_old_gradients_then_a_group_removed_keeps_watching(collector, job_name):
    """``step()`` twice (the second on old gradients), then a param group taken out: the
    stale-gradient verdict, said at the next step, used the old table's indices on the
    new one (an IndexError that stopped the watching, or the wrong parameters named)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(
            [{"params": model[0].parameters()}, {"params": model[1].parameters()}], 1e-2),
            model)
        for extra_step in (False, True, False, False):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(X), Y).backward()
            optimizer.step()
            if extra_step:
                optimizer.step()  # the bug: no backward() since
                del optimizer.param_groups[1]
        assert not monitor.watched(optimizer)._failed
    assert monitor.close() is True
    assert metrics(collector, "gradwatch_steps_total", job_name) == {
        f"optimizer=SGD,task_index=0,task_type=worker,training_job={job_name}": 5.0}


def test_two_optimizers_are_two_sessions(collector, job_name):
    generator, critic = Net(), Net()
    with monitor_for(collector, job_name) as monitor:
        g = monitor.wrap(torch.optim.Adam(generator.parameters(), 1e-3), generator)
        d = monitor.wrap(torch.optim.Adam(critic.parameters(), 1e-3), critic)
        train(generator, g, 3)
        train(critic, d, 2)
    steps = metrics(collector, "gradwatch_steps_total", job_name)
    assert sorted(steps.values()) == [2.0, 3.0]
    assert {k.split(",")[0] for k in steps} == {"optimizer=Adam", "optimizer=Adam_2"}


@pytest.mark.parametrize("reset", ["zero_grad(set_to_none=False)",
                                   "model.zero_grad(set_to_none=False)",
                                   "model.zero_grad(set_to_none=False), wrapped without model",
                                   "zero_grad(set_to_none=False), clip_grad_norm_",
                                   "zero_grad(set_to_none=False), clip_grad_value_",
                                   "p.grad = None", "never"])
def test_a_gradient_left_from_an_earlier_step_is_not_present(collector, job_name, reset):
    """However gradients are reset between steps — zeroed in place (a zero tensor stays;
    by the optimizer, or by the model, whether or not ``wrap`` was given it), set to None
    by hand (PyTorch's performance tuning guide), or not at all (they accumulate) — a
    branch taken only at the first step shows as missing afterwards, not as present with
    norm 0; also where the step clips (the clip writes the stale zeros in place, which
    read as a gradient new since the clip)."""
    model = Net(extra=True)
    named = "without model" not in reset
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2),
                                 model if named else None)
        for step in range(3):
            if reset.startswith("zero_grad(set_to_none=False)"):
                optimizer.zero_grad(set_to_none=False)
            elif reset.startswith("model.zero_grad(set_to_none=False)"):
                model.zero_grad(set_to_none=False)
            elif reset == "p.grad = None":
                for p in model.parameters():
                    p.grad = None
            out = model(X)
            if step == 0:
                out = out + model.unused(torch.relu(model.hidden(X))).sum(1, keepdim=True)
            torch.nn.functional.mse_loss(out, Y).backward()
            if reset.endswith("clip_grad_norm_"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            elif reset.endswith("clip_grad_value_"):
                torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
            optimizer.step()
    assert (model.unused.weight.grad is None) == (reset == "p.grad = None")
    unused, hidden = ("unused.weight", "hidden.weight") if named else ("group0.param4",
                                                                        "group0.param0")
    present = metrics(collector, "gradwatch_gradient_present", job_name)
    assert present[unused] == 0 and present[hidden] == 1
    assert metrics(collector, "gradwatch_gradient_missing_steps_total", job_name)[unused] == 2


def test_a_watched_model_pickles_and_its_deep_copy_zeroes_its_own_gradients(collector,
                                                                          job_name):
    """``torch.save(model)`` (PyTorch's "saving and loading models": the entire model)
    failed once the model was wrapped ("Can't pickle <function Module.zero_grad>": its
    ``zero_grad`` was patched on the instance), and ``copy.deepcopy(model).zero_grad()``
    zeroed the original's gradients instead of the copy's."""
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        train(model, optimizer, 2)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=False)
        assert torch.equal(restored(X), model(X))
        twin = copy.deepcopy(model)
        torch.nn.functional.mse_loss(twin(X), Y).backward()
        twin.zero_grad()
        assert twin.out.weight.grad is None
        assert model.out.weight.grad is not None
        train(model, optimizer, 1)
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [3.0]


def test_a_head_used_every_other_step_is_explained_by_few_recorded_steps(collector, job_name,
                                                                       monkeypatch):
    """An auxiliary loss on even steps only: its head is missing at odd steps. The step
    after a missing one has it present, so recording only that step never explains it
    and records every other step for good; bursts of consecutive steps do, then rest."""
    from gradwatch.agent.torch import diagnosis

    started = []
    start = diagnosis.Recorder.start
    monkeypatch.setattr(diagnosis.Recorder, "start", lambda self: (
        started.append(1) if self._recording is None else None, start(self))[1])
    model = Net(extra=True)
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        for step in range(40):
            optimizer.zero_grad()
            out = model(X)
            if step % 2 == 0:
                out = out + model.unused(torch.relu(model.hidden(X))).mean(1, keepdim=True)
            torch.nn.functional.mse_loss(out, Y).backward()
            optimizer.step()
    causes = metrics(collector, "gradwatch_gradient_missing_cause_info", job_name,
                     cause="unused")
    assert causes == {"unused.weight": 1.0, "unused.bias": 1.0}
    assert len(started) <= 4, f"{len(started)} steps recorded in 40"


def scaled_steps(model, optimizer, scaler, steps: int, *, before_step=None) -> None:
    """Mixed-precision steps with ``scaler`` (a ``torch.amp.GradScaler``)."""
    for _ in range(steps):
        optimizer.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(X), Y)).backward()
        if before_step:
            before_step()
        scaler.step(optimizer)
        scaler.update()


def test_grad_scaler_overflow_is_skipped_not_nan_and_norms_are_unscaled(collector, webhook,
                                                                         job_name, layout):
    model = Net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # overflows float32 at first
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        scaled_steps(model, optimizer, scaler, 4)
        scale = scaler.get_scale()
        assert scale < 2.0**127, "the scaler backed off"
        optimizer.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(X), Y)).backward()
        scaler.unscale_(optimizer)
        unscaled = float(model.out.weight.grad.norm())
        scaler.step(optimizer)
        scaler.update()
    labels = {"task_index": "0"}
    assert sum(metrics(collector, "gradwatch_skipped_steps_total", job_name, **labels)
               .values()) >= 1
    assert sum(metrics(collector, "gradwatch_nonfinite_steps_total", job_name, **labels)
               .values()) == 0
    assert sum(metrics(collector, "gradwatch_steps_total", job_name).values()) == 5
    assert metrics(collector, "gradwatch_gradient_norm", job_name)["out.weight"] == \
        pytest.approx(unscaled, rel=1e-4)
    assert not [a for a in webhook.alerts if a["labels"].get("training_job") == job_name
                and a["labels"]["alertname"] == "GradientNonFinite"]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_step_adds_a_few_ops_whatever_the_parameter_count(collector, job_name, layout,
                                                            set_to_none):
    """gradwatch's part of ``zero_grad()`` and ``optimizer.step()`` is a fixed handful of
    ATen ops (one multi-tensor norm, its stack, the copy to the ring; on the CPU also the
    finiteness look and the zero counts) and of torch calls, never one per parameter."""
    added = {}
    for n in (2, 200):
        counts = []
        for watched in (False, True):
            params = [torch.nn.Parameter(torch.randn(64)) for _ in range(n)]
            with GradientMonitor(collector=collector.grpc_target, enabled=watched,
                                 training_job=f"{job_name}-{n}") as monitor:
                optimizer = monitor.wrap(torch.optim.SGD(params, 1e-3, foreach=True))
                for _ in range(3):  # the first step creates the session and is diagnosed
                    sum((p * p).sum() for p in params).backward()
                    with OpCounter() as counter:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=set_to_none)
            counts.append((counter.ops, counter.calls))
        added[n] = tuple(w - p for w, p in zip(counts[1], counts[0], strict=True))
    assert added[2] == added[200], added
    most = (7, 9) if layout == "exact counts" else (4, 5)  # ATen ops, torch calls
    assert all(count <= bound for count, bound in zip(added[2], most, strict=True)), added


def test_a_nan_gradient_pages(collector, webhook, job_name, layout):
    model = Net()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        optimizer.zero_grad()
        (torch.nn.functional.mse_loss(model(X), Y) * float("nan")).backward()
        optimizer.step()
    alert = webhook.wait_for(lambda a: a["labels"].get("training_job") == job_name
                             and a["labels"]["alertname"] == "GradientNonFinite", 10)
    assert alert is not None
    assert metrics(collector, "gradwatch_gradient_nan_values_total", job_name)[
        "out.weight"] == (8 if layout == "exact counts" else 1)  # else the variable marked


def test_a_misconfigured_monitor_says_so_once_and_training_goes_on(monkeypatch, caplog):
    monkeypatch.setenv("GRADWATCH_TASK_INDEX", "abc")
    model = Net()
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        monitor = GradientMonitor()
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
        train(model, optimizer, 2)
        monitor.close()
    assert not monitor.enabled
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1 and "GRADWATCH_TASK_INDEX" in problems[0], problems


def test_steps_wait_for_a_late_collector_and_arrive_once(job_name):
    """The collector is away for the first steps (the same sender as TensorFlow's:
    buffered, replayed, deduplicated); training never waits."""
    import time

    from tests.support.services import CollectorProcess, free_port

    port = free_port()
    model = Net()
    monitor = GradientMonitor(collector=f"127.0.0.1:{port}", training_job=job_name,
                              flush_interval_s=0.05)
    optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
    started = time.perf_counter()
    train(model, optimizer, 10)  # nothing listens yet
    assert time.perf_counter() - started < 5
    with CollectorProcess("--grpc-address", f"127.0.0.1:{port}") as collector:
        train(model, optimizer, 5)
        assert monitor.close(timeout_s=30)
        assert metrics(collector, "gradwatch_steps_total", job_name) == {
            f"optimizer=SGD,task_index=0,task_type=worker,training_job={job_name}": 15.0}


def test_statistics_every_nth_step_and_whenever_presence_changes(collector, job_name):
    """``statistics_every=3`` over 7 steps records steps 0, 3 and 6, plus step 4, where a
    parameter stops getting gradients (presence is reported when it changes)."""
    model = Net()
    monitor = GradientMonitor(collector=collector.grpc_target, training_job=job_name,
                              flush_interval_s=0.05, statistics_every=3)
    optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
    for step in range(7):
        model.out.bias.requires_grad_(step < 4)  # from step 4 on: no gradient
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        optimizer.step()
    assert monitor.close() is True
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [4.0]
    assert metrics(collector, "gradwatch_gradient_missing_steps_total", job_name)[
        "out.bias"] == 2.0  # steps 4 and 6


class DoubleNetWithPhase(Net):
    """A float64 model (``model.double()``) with a complex parameter: gradients that
    cannot be measured in float32 arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.double()
        self.phase = torch.nn.Parameter(torch.tensor([1 + 2j, -0.5j], dtype=torch.complex128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.double()) + (self.phase * self.phase.conj()).real.sum()


def test_float64_and_complex_parameters_are_measured(collector, job_name, caplog):
    model = DoubleNetWithPhase()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        with monitor_for(collector, job_name) as monitor:
            optimizer = monitor.wrap(torch.optim.Adam(model.parameters(), 1e-2), model)
            norms = train(model, optimizer, 4)
    assert [r.getMessage() for r in caplog.records] == []
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [4.0]
    reported = metrics(collector, "gradwatch_gradient_norm", job_name)
    assert reported == pytest.approx(norms[-1], rel=1e-6) and "phase" in reported


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank, in this process (DDP runs its hooks)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_with_a_grad_scaler_unscaled_before_clipping_reports_unscaled_norms(
        collector, job_name, one_rank_group):
    """PyTorch's AMP recipe with clipping under DDP: ``scaler.unscale_(optimizer)`` then
    ``clip_grad_norm_``. The DDP hook had measured the gradients while still scaled, and
    they were reported so: norms times the loss scale (65536 by default: a false
    GradientExploding on every such job)."""
    model = torch.nn.parallel.DistributedDataParallel(Net())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    norms = []
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-3), model)

        def unscale_and_clip():
            scaler.unscale_(optimizer)
            norms.append({n.removeprefix("module."): float(p.grad.norm())
                          for n, p in model.named_parameters()})
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)

        scaled_steps(model, optimizer, scaler, 3, before_step=unscale_and_clip)
    assert monitor.close() is True
    reported = metrics(collector, "gradwatch_gradient_norm", job_name)
    assert reported == pytest.approx(norms[-1], rel=1e-5)


def test_a_ddp_bucket_that_cannot_be_measured_is_logged_once(collector, job_name, caplog,
                                                              monkeypatch, one_rank_group):
    """A failure in DDP's communication hook (the autograd thread, every bucket of every
    step) stops watching the optimizer with one line; the all-reduce and training go on."""
    from gradwatch.agent.torch import monitor as torch_monitor

    def broken(*args):
        raise RuntimeError("cannot measure")

    monkeypatch.setattr(torch_monitor, "measure", broken)
    model = torch.nn.parallel.DistributedDataParallel(Net(), bucket_cap_mb=0)
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        with monitor_for(collector, job_name) as monitor:
            optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
            train(model, optimizer, 5)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "no longer watched" in errors[0], errors
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_a_checkpoint_loaded_with_set_optimizer_state_dict_adds_no_step(collector, job_name):
    """torch.distributed.checkpoint's ``set_optimizer_state_dict`` (TorchTitan's resume)
    steps a fresh optimizer once, with zero gradients and a zero learning rate, to create
    the state it loads into: not a training step, so not reported as one."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model = Net()
    before = torch.optim.AdamW(model.parameters(), 1e-2)
    train(model, before, 3)
    saved = get_optimizer_state_dict(model, before)
    model.zero_grad(set_to_none=True)  # a resumed process starts without gradients
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.AdamW(model.parameters(), 1e-2), model)
        set_optimizer_state_dict(model, optimizer, saved)
        norms = train(model, optimizer, 4)
    assert optimizer.state_dict()["state"][0]["step"] == 7  # the checkpoint's 3, then 4
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [4.0]
    assert list(metrics(collector, "gradwatch_last_step", job_name).values()) == [3.0]
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(norms[-1],
                                                                                    rel=1e-5)


@pytest.mark.parametrize("registered", ["monitor.comm_hook", "bare", "bare, after wrap",
                                        "bare, before the monitor"])
def test_a_ddp_communication_hook_of_the_users_own(collector, job_name, caplog, registered,
                                                    one_rank_group):
    """DDP takes one communication hook. The user's own (here fp16 compression) runs after
    the measuring, given through ``monitor.comm_hook`` or bare, before ``wrap`` or after
    (it raised then: "can only be called once", gradwatch's own being registered); one
    registered before the monitor existed makes the norms those after it, and ``wrap``
    says so once. Training goes on either way."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    from gradwatch.agent.torch import ddp

    model = torch.nn.parallel.DistributedDataParallel(Net())
    if registered == "bare, before the monitor":
        model.register_comm_hook(None, fp16_compress_hook)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        with monitor_for(collector, job_name) as monitor:
            if registered in ("monitor.comm_hook", "bare"):
                model.register_comm_hook(None, monitor.comm_hook(fp16_compress_hook)
                                         if registered == "monitor.comm_hook"
                                         else fp16_compress_hook)
            optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
            if registered == "bare, after wrap":
                model.register_comm_hook(None, fp16_compress_hook)
            train(model, optimizer, 3)
    warnings = [r.getMessage() for r in caplog.records]
    hook = ddp.comm_hook_of(model)
    if registered == "bare, before the monitor":
        assert hook is fp16_compress_hook
        assert len(warnings) == 1 and "fp16_compress_hook" in warnings[0], warnings
    else:
        assert ddp.measures(hook) and hook.hook is fp16_compress_hook
        assert hook.__name__ == "fp16_compress_hook"  # as DDP logs it
        assert warnings == []
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [3.0]


def test_ddp_and_data_parallel_are_seen_through_their_wrappers(collector, job_name,
                                                                one_rank_group):
    """``torch.compile(DDP(model))`` gets the measuring communication hook on the DDP
    inside (else its norms would be averaged over ranks), and ``DDP(torch.compile(model))``
    one too (wrapping it failed: "M does not support len()", and nothing was watched);
    DataParallel's ``module.`` is not part of the names."""
    from gradwatch.agent.torch import ddp

    compiled = torch.compile(torch.nn.parallel.DistributedDataParallel(Net()))
    of_compiled = torch.nn.parallel.DistributedDataParallel(torch.compile(Net()))
    parallel = torch.nn.DataParallel(Net())
    with monitor_for(collector, job_name) as monitor:
        monitor.wrap(torch.optim.SGD(compiled.parameters(), 1e-2), compiled)
        assert ddp.measures(ddp.comm_hook_of(compiled._orig_mod))
        sgd = monitor.wrap(torch.optim.SGD(of_compiled.parameters(), 1e-2), of_compiled)
        assert ddp.measures(ddp.comm_hook_of(of_compiled))
        assert monitor.watched(sgd).names == ["hidden.weight", "hidden.bias", "out.weight",
                                              "out.bias"]
        optimizer = monitor.wrap(torch.optim.Adam(parallel.parameters(), 1e-2), parallel)
        train(parallel, optimizer, 1)
    assert set(metrics(collector, "gradwatch_gradient_present", job_name, optimizer="Adam")) \
        == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}


@pytest.mark.parametrize("statements", [1, 2])
def test_an_optimizer_made_each_epoch_continues_the_one_before(collector, job_name, caplog,
                                                               statements):
    """A loop that makes a new optimizer over the same parameters each epoch and wraps it:
    one optimizer name, its step count going on, and the old optimizers not kept alive.
    Made and wrapped in two statements (``optimizer = AdamW(...)`` drops the one before
    it is wrapped), each epoch started a new session from step 0."""
    import gc
    import weakref

    model = Net()
    caplog.set_level(logging.INFO, logger="gradwatch")
    first = None
    with monitor_for(collector, job_name) as monitor:
        for _ in range(3):
            if statements == 1:
                optimizer = monitor.wrap(torch.optim.AdamW(model.parameters(), 1e-2), model)
            else:
                optimizer = torch.optim.AdamW(model.parameters(), 1e-2)
                optimizer = monitor.wrap(optimizer, model)
            first = first or weakref.ref(optimizer)
            norms = train(model, optimizer, 2)
        del optimizer
        gc.collect()
        assert first() is None
        assert len(monitor._watched) == 1
    assert gradwatch_warnings(caplog) == []
    assert caplog.text.count("over the same parameters replaces the one wrapped before") == 1
    assert metrics(collector, "gradwatch_steps_total", job_name) == {
        f"optimizer=AdamW,task_index=0,task_type=worker,training_job={job_name}": 6.0}
    assert list(metrics(collector, "gradwatch_last_step", job_name).values()) == [5.0]
    assert metrics(collector, "gradwatch_gradient_norm", job_name) == pytest.approx(
        norms[-1], rel=1e-5)


def _sessions_of(model: torch.nn.Module) -> int:
    """The PyTorch sessions alive that watch a parameter of ``model`` (each holds a ring)."""
    import gc

    from gradwatch.agent.torch.session import TorchSession

    gc.collect()
    ids = {id(p) for p in model.parameters()}
    return sum(1 for o in gc.get_objects()
               if type(o) is TorchSession and any(id(p) in ids for p in o.params))


def _wait_for_last_step(collector, job: str, step: int, timeout_s: float = 10.0) -> float:
    """Seconds until the collector's last step of ``job`` is ``step``."""
    began = time.monotonic()
    while list(metrics(collector, "gradwatch_last_step", job).values()) != [float(step)]:
        assert time.monotonic() - began < timeout_s, metrics(collector, "gradwatch_last_step",
                                                             job)
        time.sleep(0.02)
    return time.monotonic() - began


def test_an_optimizer_made_every_few_steps_stays_one_session(collector, job_name, caplog):
    """An optimizer made again every 5 steps for 200 epochs under one monitor (an LR
    restart): the one session goes on, with no new ring buffer, registration or log line
    per epoch, and the collector keeps up. Each one made a session that registered only
    once the one before was delivered: after 4,000 steps of 10-step epochs the sender held
    358 sessions, RSS grew 0.6 MB an epoch, and the collector fell further behind."""
    model = Net()
    caplog.set_level(logging.INFO, logger="gradwatch")
    held = []
    with monitor_for(collector, job_name) as monitor:
        for _ in range(200):
            optimizer = monitor.wrap(torch.optim.Adam(model.parameters(), 1e-3), model)
            train(model, optimizer, 5)
            held.append(len(monitor._sender.buffer.sessions))
        alive = _sessions_of(model)
        _wait_for_last_step(collector, job_name, 999)
        assert metrics(collector, "gradwatch_steps_total", job_name) == {
            f"optimizer=Adam,task_index=0,task_type=worker,training_job={job_name}": 1000.0}
    assert monitor.close() is True
    assert max(held) == 1 and alive == 1, (held, alive)
    assert gradwatch_warnings(caplog) == []
    assert caplog.text.count("over the same parameters replaces the one wrapped before") == 1
    assert caplog.text.count("watching 4 variables of Adam") == 1
    assert caplog.text.count("registered Adam") == 1


def test_param_groups_added_every_few_steps_keep_a_few_sessions(collector, job_name,
                                                                caplog):
    """A layer added with ``add_param_group`` every 2 steps, 50 times: past `MAX_WAITING`
    sessions waiting for the collector, each table's session replaces the last waiting
    one instead of queueing behind it (the skipped tables' steps count as dropped), so the
    sender holds three at most, the collector reaches the last step soon after, and each
    change is one log line. They queued: after 2,000 steps of a layer added every 10, the
    sender held 149 sessions and RSS had grown 560 MB; 2.3 log lines a change."""
    from gradwatch.agent.core.buffer import MAX_WAITING

    class Growing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = torch.nn.Linear(4, 1)
            self.extra = torch.nn.ModuleList()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return sum((layer(x) for layer in self.extra), self.first(x))

    model = Growing()
    caplog.set_level(logging.INFO, logger="gradwatch")
    held, alive = [], []
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-3), model)
        for i in range(50):
            layer = torch.nn.Linear(4, 1)
            model.extra.append(layer)
            optimizer.add_param_group({"params": list(layer.parameters())})
            train(model, optimizer, 2)
            held.append(len(monitor._sender.buffer.sessions))
            if i % 10 == 9:
                alive.append(_sessions_of(model))
        _wait_for_last_step(collector, job_name, 99)
        assert len(metrics(collector, "gradwatch_gradient_present", job_name)) == 102
    assert monitor.close() is True
    # (and up to as many not read yet)
    assert max(held) <= 1 + MAX_WAITING and max(alive) <= 2 * (1 + MAX_WAITING), (held, alive)
    assert gradwatch_warnings(caplog) == []
    assert caplog.text.count("SGD: 2 more parameters train") == 50
    assert caplog.text.count("watching") == 1
    assert caplog.text.count("registered SGD") == 1


@pytest.mark.parametrize("own_hook", [False, True], ids=["DDP made after wrap",
                                                          "and a hook of the user's"])
def test_a_ddp_made_after_wrap_gets_the_measuring_hook(collector, job_name, caplog,
                                                       own_hook, one_rank_group):
    """Hugging Face Accelerate's ``prepare`` (or a script) wraps the model in DDP after
    the optimizer was wrapped with the plain model: the DDP gets the measuring hook at
    its first forward, or around the user's own registered meanwhile."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    from gradwatch.agent.torch import ddp

    model = Net()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        with monitor_for(collector, job_name) as monitor:
            optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 1e-2), model)
            distributed = torch.nn.parallel.DistributedDataParallel(model)
            if own_hook:
                distributed.register_comm_hook(None, fp16_compress_hook)
            train(distributed, optimizer, 3)
    hook = ddp.comm_hook_of(distributed)
    assert ddp.measures(hook) and (hook.hook is fp16_compress_hook) == own_hook
    assert gradwatch_warnings(caplog) == []
    assert list(metrics(collector, "gradwatch_steps_total", job_name).values()) == [3.0]
    assert set(metrics(collector, "gradwatch_gradient_present", job_name)) == {
        "hidden.weight", "hidden.bias", "out.weight", "out.bias"}


def test_two_training_threads_with_one_monitor(collector, job_name, caplog):
    """Two threads, each training its own model with its own optimizer, one monitor: the
    step recorded to explain a missing gradient stays on the thread that records it (a
    torch function mode is per thread), so neither optimizer stops being watched."""
    import threading

    models = [Net(extra=True), Net(extra=True)]
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        with monitor_for(collector, job_name) as monitor:
            optimizers = [monitor.wrap(torch.optim.Adam(m.parameters(), 1e-3), m)
                          for m in models]
            threads = [threading.Thread(target=train, args=(m, o, 100))
                       for m, o in zip(models, optimizers, strict=True)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert sorted(metrics(collector, "gradwatch_steps_total", job_name).values()) == [100.0,
                                                                                     100.0]
