"""``gradwatch demo``: collector + a real, broken, distributed training run + its alert.

Starts a collector and a webhook receiver on loopback, runs
`gradwatch.demo.training` (Keras, MirroredStrategy over 2 logical CPUs) or, with
``--framework torch``, `gradwatch.demo.torch_training` (DDP over 2 processes under
torchrun) with the agent, then prints the GradientMissing alert the webhook received
and the `/metrics` lines that show the problem. Exits 0 if the alert arrived.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from prometheus_client.parser import text_string_to_metric_families

from gradwatch.demo.processes import CollectorProcess, WebhookReceiver

JOB = "gradwatch-demo"


def add_parser(subparsers: argparse._SubParsersAction, summary: str) -> None:
    """Adds the subcommand, with ``summary`` as its line in ``gradwatch --help``."""
    parser = subparsers.add_parser(
        "demo", help=summary,
        description="Start a collector and a real, broken, distributed training run; print "
                    "the alert it fires, its cause and the metrics that show it. Exit status "
                    "0 when the alert arrived.")
    parser.add_argument("--framework", choices=("tensorflow", "torch"), default="tensorflow",
                        help="tensorflow: Keras model.fit under MirroredStrategy; torch: "
                             "DistributedDataParallel over 2 processes under torchrun")
    parser.add_argument("--epochs", type=int, default=2, metavar="N",
                        help="epochs to train (default %(default)s)")
    parser.add_argument("--replicas", type=int, default=2, metavar="N",
                        help="replicas (tensorflow) or processes (torch) (default %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="leave the collector running (its web UI open) until Ctrl-C")
    parser.set_defaults(func=run)


def _say(step: str, text: str) -> None:
    print(f"\n\033[1m[{step}] {text}\033[0m", flush=True)


def _show_alert(alert: dict) -> None:
    labels, notes = alert["labels"], alert["annotations"]
    status = "RESOLVED" if "endsAt" in alert else "FIRING"
    print(f"  {labels['alertname']} {status} severity={labels.get('severity')}"
          f" training_job={labels['training_job']} optimizer={labels['optimizer']}")
    print(f"  summary:   {notes.get('summary')}")
    print(f"  variables: {notes.get('variables')}")
    print(f"  tasks:     {notes.get('tasks')}")
    print("  causes:")
    for cause in notes.get("causes", "").split(" | "):
        print(f"    {cause}")
    print(f"  runbook:   {notes.get('runbook_url')}")


def _show_metrics(text: str) -> None:
    """The series that show the problem (healthy variables are left out)."""
    wanted = {
        "gradwatch_steps_total": lambda v: True,
        "gradwatch_variables_without_gradient": lambda v: True,
        "gradwatch_gradient_present": lambda v: v == 0,
        "gradwatch_gradient_missing_steps_total": lambda v: v > 0,
        "gradwatch_gradient_missing_cause_info": lambda v: True,
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not wanted.get(sample.name, lambda v: False)(sample.value):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            print(f"  {sample.name}{{{labels}}} {sample.value:g}")


def _training(args: argparse.Namespace) -> tuple[str, list[str]]:
    """What the demo trains, as (description, command)."""
    if args.framework == "torch":
        return (f"PyTorch DistributedDataParallel x {args.replicas} processes (torchrun, gloo); "
                "one head is detached before the loss, one layer is never called",
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(args.replicas), "-m", "gradwatch.demo.torch_training",
                 "--epochs", str(args.epochs)])
    return (f"Keras model.fit, MirroredStrategy x {args.replicas} replicas; one head goes "
            "through tf.math.floor, one layer is never called",
            [sys.executable, "-m", "gradwatch.demo.training", "--epochs", str(args.epochs),
             "--replicas", str(args.replicas)])


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with WebhookReceiver() as webhook, CollectorProcess("--webhook-url", webhook.url) as collector:
        _say("1/4", f"collector up: gRPC {collector.grpc_target}, {collector.metrics_url}")
        description, command = _training(args)
        _say("2/4", f"training {JOB!r}: {description}")
        env = {**os.environ, "GRADWATCH_COLLECTOR": collector.grpc_target,
               "GRADWATCH_TRAINING_JOB": JOB, "TF_CPP_MIN_LOG_LEVEL": "3",
               "OMP_NUM_THREADS": "1"}
        training = subprocess.run(command, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=300)
        for line in training.stdout.splitlines():
            if "/step" in line or line.startswith(("Epoch", "ERROR", "Traceback")):
                print(f"  {line}")
        if training.returncode != 0:
            print(training.stdout[-4000:], file=sys.stderr)
            print("training failed", file=sys.stderr)
            return 1
        _say("3/4", f"alert delivered to the webhook {webhook.url}")
        alert = webhook.wait_for(lambda a: a["labels"]["alertname"] == "GradientMissing", 10)
        if alert is None:
            print("no GradientMissing alert arrived; collector log:\n" + collector.log(),
                  file=sys.stderr)
            return 1
        _show_alert(alert)
        _say("4/4", f"what Prometheus sees at {collector.metrics_url}")
        _show_metrics(collector.scrape())
        page = collector.metrics_url.removesuffix("/metrics") + "/jobs/" + JOB
        print(f"\ndemo finished in {time.monotonic() - started:.1f} s; the job's page: {page}")
        if args.keep:
            print("the collector keeps running (--keep); Ctrl-C stops it", flush=True)
            try:
                while collector.process.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    return 0
