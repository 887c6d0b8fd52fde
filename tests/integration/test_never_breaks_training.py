"""gradwatch never breaks or floods a training job, systematically: every agent setting fed
generated bad values, and every collector fault at start, during the run and at exit, with
real collector processes, real sockets and real certificates.

Each case asserts that training ends with the weights a run without gradwatch ends with; that
the monitor works, disables itself or buffers; that the ``gradwatch`` loggers say at most a
few lines per change of state and never a traceback (DEBUG included; nor any other logger,
thread or subprocess); and that ``close()`` returns within its timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.agent.core.identity import tf_config, torchrun
from gradwatch.agent.core.settings import AgentSettings
from tests.support.certificates import Certificates, make_certificates
from tests.support.faults import Blackhole, TcpProxy
from tests.support.metrics import parse_metrics, select
from tests.support.services import CollectorProcess, free_port

torch = pytest.importorskip("torch")

from gradwatch.agent.torch import GradientMonitor as TorchMonitor  # noqa: E402
from tests.support.torch_job import TorchJob, reference_weights  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

#: ``close(timeout_s)`` waits that long for acknowledgements, then stops its thread.
CLOSE_S = 1.0
#: What closing may take beyond its timeout (cancelling the sender's calls).
CLOSE_SLACK_S = 0.5
#: Warnings and errors allowed per change of state (going away, the summary at close).
LINES_PER_CHANGE = 2
GOOD_TOKEN = "faults-good-token-0123456789"
OTHER_TOKEN = "elsewhere-token-0123456789"
#: gRPC's own (C core) log lines on stderr: ``E1130 03:00:26.795203   11972 file.cc:1] ...``
NATIVE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")
#: Measured per case, printed at the end of the module (docs/reliability.md quotes them).
MEASURED: dict[str, str] = {}


# -- what a case observes -----------------------------------------------------------------

class Observed(logging.Handler):
    """While entered: every record of the ``gradwatch`` loggers (DEBUG included), records
    with a traceback or at ERROR from gRPC's loggers or the sender's thread (asyncio), and
    exceptions that ended a thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.foreign: list[logging.LogRecord] = []
        self.thread_errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Observed:
        observed = self

        class Foreign(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                ours = record.threadName == "gradwatch-sender" or record.name.startswith(
                    "grpc")  # not the test's own proxy
                if ours and not record.name.startswith("gradwatch") and (
                        record.exc_info or record.levelno >= logging.ERROR):
                    observed.foreign.append(record)

        self._foreign = Foreign(logging.WARNING)
        self._logger = logging.getLogger("gradwatch")
        self._level = self._logger.level
        self._logger.setLevel(logging.DEBUG)
        self._logger.addHandler(self)
        logging.getLogger().addHandler(self._foreign)
        self._hook = threading.excepthook
        threading.excepthook = lambda args: self.thread_errors.append(
            f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}: "
            f"{args.exc_value}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        threading.excepthook = self._hook
        logging.getLogger().removeHandler(self._foreign)
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)

    def mark(self) -> int:
        return len(self.records)

    def lines(self, since: int = 0, until: int | None = None) -> list[str]:
        """Warnings and errors of the gradwatch loggers (what a user at the default
        level sees), of records ``since`` to ``until``."""
        return [r.getMessage() for r in self.records[since:until]
                if r.levelno >= logging.WARNING]

    def assert_quiet(self) -> None:
        """No traceback anywhere, at any level."""
        with_traceback = [f"{r.name}: {r.getMessage()}" for r in self.records if r.exc_info]
        assert not with_traceback, with_traceback
        assert not self.foreign, [f"{r.name}: {r.getMessage()}" for r in self.foreign]
        assert not self.thread_errors, self.thread_errors


def timed_close(monitor: Any, timeout_s: float = CLOSE_S) -> tuple[bool, float]:
    start = time.monotonic()
    delivered = monitor.close(timeout_s=timeout_s)
    return delivered, time.monotonic() - start


def sender_threads() -> int:
    return sum(t.name == "gradwatch-sender" and t.is_alive() for t in threading.enumerate())


def steps_delivered(collector: CollectorProcess, job: str) -> float:
    samples = parse_metrics(collector.scrape())
    return sum(select(samples, "gradwatch_steps_total", training_job=job).values())


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def write_tokens(path: Path, **patterns: str) -> None:
    """A collector tokens file: token → the job pattern it may report."""
    lines = ["tokens:"]
    for n, (token, pattern) in enumerate(patterns.items()):
        lines += [f"  - name: t{n}", f"    token: {token}", f"    training_jobs: ['{pattern}']"]
    path.write_text("\n".join(lines) + "\n")
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 1))  # visibly changed, even within 1 s


@dataclasses.dataclass
class Lab:
    """Shared real parts: a plain, a TLS and a token-checking collector, certificates from
    two unrelated CAs, and a file that is no certificate."""

    plain: CollectorProcess
    tls: CollectorProcess
    tokens: CollectorProcess
    certificates: Certificates
    other_ca: Path
    not_a_certificate: Path
    folder: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    folder = tmp_path_factory.mktemp("faults")
    (folder / "ca").mkdir()
    (folder / "other").mkdir()
    certificates = make_certificates(folder / "ca")
    other = make_certificates(folder / "other")
    not_a_certificate = folder / "not-a-certificate.pem"
    not_a_certificate.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n"
                                 "-----END CERTIFICATE-----\n")
    write_tokens(folder / "tokens.yaml", **{GOOD_TOKEN: "faults-*", OTHER_TOKEN: "elsewhere-*"})
    with CollectorProcess() as plain, \
            CollectorProcess("--grpc-tls-cert-file", str(certificates.server_cert),
                             "--grpc-tls-key-file", str(certificates.server_key)) as tls, \
            CollectorProcess("--tokens-file", str(folder / "tokens.yaml")) as tokens:
        yield Lab(plain, tls, tokens, certificates, other.ca, not_a_certificate, folder)
        for collector in (plain, tls, tokens):
            assert collector.process.poll() is None, f"collector died:\n{collector.log()}"


@pytest.fixture(scope="module", autouse=True)
def report_measured() -> Iterator[None]:
    yield
    if MEASURED:
        print("\nlog lines (warnings and errors of the gradwatch loggers) per case:")
        for case, figures in sorted(MEASURED.items()):
            print(f"  {case}: {figures}")


# -- every setting, generated bad values --------------------------------------------------

ARGUMENTS = [f.name for f in dataclasses.fields(AgentSettings)]
VARIABLES = sorted(AgentSettings.environment_variables().values())
#: What launchers set and identity reads (WORLD_SIZE and LOCAL_RANK: read by nothing, fed
#: anyway so that a change that starts reading them is covered).
LAUNCHER_VARIABLES = ["TF_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID",
                      "JOB_COMPLETION_INDEX", "POD_NAME"]
OWN_VARIABLES = {*VARIABLES, *LAUNCHER_VARIABLES}

TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
               max_size=24)
NUMBERISH = st.sampled_from([
    "", " ", "0", "-1", "-0.0", "1e-300", "5e-324", "1e400", "-1e400", "inf", "nan", "1.5",
    "4294967296", "99999999999", "18446744073709551616", "²", "٣", "0x10", "1_000", " 7 ",
    "true", "off", "yes", "maybe", "{}", "[]", "null", "\t", "a\nb", "x" * 300, "é", "\x7f"])
ADDRESSES = st.sampled_from([
    ":", "127.0.0.1", "127.0.0.1:", ":8470", "127.0.0.1:0", "127.0.0.1:99999",
    "collector.invalid:8470", "dns:///collector.invalid:8470", "dns:///", "a,b", ",,,",
    "[::1]:1", "unix:/tmp/gradwatch.sock", "http://127.0.0.1:8470", "127.0.0.1:1,:2",
    "127.0.0.1:1,127.0.0.1:2,collector.invalid:3"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6)
TASKS = st.fixed_dictionaries({"task": st.fixed_dictionaries(
    {}, optional={"type": JSON | st.sampled_from(["", "a\x01b", "x" * 300]),
                  "index": JSON | st.sampled_from([1e400, -1, 2**32, 2**70, "3", "²", True])})})
TF_CONFIGS = (JSON.map(json.dumps) | TASKS.map(json.dumps)
              | TASKS.map(json.dumps).map(lambda text: text[: len(text) // 2]))
ENV_VALUES = NUMBERISH | TEXT | ADDRESSES
ARGUMENT_VALUES = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.just(10**400)
                   | st.floats() | TEXT | NUMBERISH | ADDRESSES | st.binary(max_size=8)
                   | st.lists(st.integers(), max_size=2) | st.just(object())
                   | st.just(Path("/nonexistent/file.pem")))


def values_for(source: str) -> st.SearchStrategy:
    if source == "TF_CONFIG":
        return TF_CONFIGS
    return ENV_VALUES if source in OWN_VARIABLES else ARGUMENT_VALUES


class EveryLauncher(TorchMonitor):
    """The PyTorch monitor reading ``TF_CONFIG`` too: identity is framework-neutral, so one
    in-process front end covers every launcher's variables."""

    launchers = (tf_config, torchrun)


def run_with(sources: dict[str, Any], collector: str) -> None:
    """A monitor made from ``sources`` (arguments and variables; the rest unset, the
    collector ``collector`` unless a source sets it) watches 3 steps; then the checks."""
    arguments = {k: v for k, v in sources.items() if k in ARGUMENTS}
    if "collector" not in sources and "GRADWATCH_COLLECTOR" not in sources:
        arguments["collector"] = collector
    environ = {k: v for k, v in os.environ.items()
               if k not in OWN_VARIABLES and not k.startswith("GRADWATCH_")}
    environ.update({k: v for k, v in sources.items() if k in OWN_VARIABLES})
    threads = sender_threads()
    with Observed() as observed, mock.patch.dict(os.environ, environ, clear=True):
        monitor = EveryLauncher(**arguments)  # never raises
        started = observed.mark()
        job = TorchJob(monitor)
        job.train(3)
        delivered, seconds = timed_close(monitor, 0.5)
    case = f"with {sources!r}"
    assert job.weights() == reference_weights(3), f"training changed {case}"
    assert seconds <= 0.5 + CLOSE_SLACK_S, f"close took {seconds:.2f} s {case}"
    observed.assert_quiet()
    assert sender_threads() <= threads, f"the sender thread outlived close() {case}"
    at_start, later = observed.lines(until=started), observed.lines(started)
    said = "\n".join([case, *at_start, "-- then:", *later])
    if not monitor.enabled:
        invalid = [line for line in at_start if "disabled, invalid settings" in line]
        assert len(at_start) == len(invalid) <= 1 and not later, said
        assert invalid or monitor.settings == AgentSettings(enabled=False), said
    else:  # the launcher's ignored values, a token without TLS; then a change and a
        # summary (the sender may meet a failure before the constructor returns)
        assert len(at_start) + len(later) <= 2 + LINES_PER_CHANGE, said
        if delivered is False:
            assert later and "closed with" in later[-1], said


PROPERTY_SETTINGS = settings(max_examples=4, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("source", ARGUMENTS + VARIABLES + LAUNCHER_VARIABLES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_a_bad_value_of_any_setting_never_breaks_training(lab, source, data):
    run_with({source: data.draw(values_for(source), label=source)}, lab.plain.grpc_target)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_several_bad_settings_at_once_never_break_training(lab, data):
    names = data.draw(st.lists(st.sampled_from(ARGUMENTS + VARIABLES + LAUNCHER_VARIABLES),
                               min_size=2, max_size=5, unique=True), label="sources")
    run_with({name: data.draw(values_for(name), label=name) for name in names},
             lab.plain.grpc_target)


# -- every collector fault: at start, during the run, at exit ----------------------------

#: Faults present before the monitor starts. (A name that does not resolve cannot be made
#: to stop resolving mid-run here: no DNS server of our own.)
AT_START = ["absent", "refusing: token for another job", "refusing: no token",
            "token rejected: unknown token", "blackholed: accepts, never answers",
            "blackholed: never accepts", "TLS: CA file missing", "TLS: wrong CA",
            "TLS: CA file not a certificate", "TLS: plaintext to a TLS collector",
            "DNS: name does not resolve", "DNS: dns:/// name does not resolve"]
DURING = ["absent: collector killed", "refusing: token's jobs changed", "token revoked",
          "blackholed: stops answering", "TLS: CA file removed", "TLS: CA file replaced"]


@dataclasses.dataclass
class Setup:
    """Monitor arguments for a fault; ``inject`` starts it (None: present from the start);
    ``delivered_to`` is the collector a healthy start delivers to."""

    arguments: dict[str, Any]
    inject: Callable[[], None] | None = None
    delivered_to: CollectorProcess | None = None


@contextlib.contextmanager
def fault(lab: Lab, name: str, folder: Path) -> Iterator[Setup]:
    """The real parts for fault ``name`` (one of `AT_START` or `DURING`)."""
    tokens = {"collector": lab.tokens.grpc_target}
    tls = {"collector": lab.tls.grpc_target}
    start = {
        "absent": {"collector": f"127.0.0.1:{free_port()}"},
        "refusing: token for another job": {**tokens, "token": OTHER_TOKEN},
        "refusing: no token": tokens,
        "token rejected: unknown token": {**tokens, "token": "unknown-token-0123456789"},
        "TLS: CA file missing": {**tls, "tls_ca_file": str(folder / "missing-ca.pem")},
        "TLS: wrong CA": {**tls, "tls_ca_file": str(lab.other_ca)},
        "TLS: CA file not a certificate": {**tls, "tls_ca_file": str(lab.not_a_certificate)},
        "TLS: plaintext to a TLS collector": tls,
        "DNS: name does not resolve": {"collector": "collector.invalid:8470"},
        "DNS: dns:/// name does not resolve": {"collector": "dns:///collector.invalid:8470"},
    }
    if name in start:
        yield Setup(start[name])
    elif name.startswith("blackholed") and name in AT_START:
        with Blackhole(accepts="never accepts" not in name) as hole:
            yield Setup({"collector": hole.address})
    elif name.startswith("absent: ") and name.endswith("collector killed"):
        with CollectorProcess() as collector:
            def kill() -> None:
                collector.process.kill()
                collector.process.wait()

            # dns:///: looked up in a thread, which the exit hook cannot start any more
            target = ("dns:///" if "dns:///" in name else "") + collector.grpc_target
            yield Setup({"collector": target}, kill, collector)
    elif name in ("refusing: token's jobs changed", "token revoked"):
        path = folder / "tokens.yaml"
        write_tokens(path, **{GOOD_TOKEN: "faults-*"})
        with CollectorProcess("--tokens-file", str(path)) as collector:
            def change() -> None:
                if name == "token revoked":
                    write_tokens(path, **{OTHER_TOKEN: "faults-*"})
                else:
                    write_tokens(path, **{GOOD_TOKEN: "elsewhere-*"})

            yield Setup({"collector": collector.grpc_target, "token": GOOD_TOKEN}, change,
                        collector)
    elif name == "blackholed: stops answering":
        with TcpProxy(lab.plain.grpc_target) as link, Blackhole() as hole:
            def swallow() -> None:
                link.blackhole()  # open connections swallow everything, both ways
                link.retarget(hole.address, cut=False)  # new ones hang

            yield Setup({"collector": link.address}, swallow, lab.plain)
    elif name.startswith("TLS: CA file re"):
        ca = folder / "ca.pem"
        shutil.copy(lab.certificates.ca, ca)
        with TcpProxy(lab.tls.grpc_target) as link:
            def break_ca() -> None:
                if name.endswith("removed"):
                    ca.unlink()
                else:
                    shutil.copy(lab.other_ca, ca)
                link.retarget(lab.tls.grpc_target)  # cut: the next connection reads the file

            yield Setup({"collector": link.address, "tls_ca_file": str(ca)}, break_ca, lab.tls)
    else:
        raise AssertionError(f"no such fault: {name}")


@pytest.mark.parametrize("name", AT_START)
def test_a_collector_fault_from_the_start(lab, name, tmp_path):
    """PyTorch, in this process: 20 steps against the fault, then ``close()``."""
    with Observed() as observed, fault(lab, name, tmp_path) as setup:
        monitor = TorchMonitor(training_job=f"faults-start-{free_port()}",
                               flush_interval_s=0.05, ack_timeout_s=0.5, **setup.arguments)
        job = TorchJob(monitor)
        job.train(20, pause_s=0.02)
        delivered, seconds = timed_close(monitor)
    assert job.weights() == reference_weights(20)
    assert not delivered
    assert seconds <= CLOSE_S + CLOSE_SLACK_S, f"close took {seconds:.2f} s"
    observed.assert_quiet()
    # By content, not time: the sender thread may meet the fault before the monitor's
    # constructor returns.
    lines = observed.lines()
    at_start = [line for line in lines if "token without TLS" in line]
    later = [line for line in lines if line not in at_start]
    MEASURED[f"start, {name}"] = f"{len(at_start)} at start, {len(later)} after"
    # One line when the collector is found away (unless the first attempt is still
    # hanging), a summary at close naming every step that waits.
    assert 1 <= len(later) <= LINES_PER_CHANGE, later
    assert "closed with 20 steps not delivered" in later[-1], later


def train_through(monitor: Any, setup: Setup, train: Callable[[int, float], None],
                  observed: Observed, case: str) -> tuple[bool, float, list[str]]:
    """10 healthy steps (delivered), the fault, 30 more steps over 1.5 s, ``close()``; the
    lines said from the fault on."""
    train(10, 0.02)
    job_name = monitor.identity.training_job
    wait_until(lambda: steps_delivered(setup.delivered_to, job_name) >= 10)
    healthy = observed.lines()
    assert all("token without TLS" in line for line in healthy), healthy
    since = observed.mark()
    setup.inject()
    train(30, 0.05)
    delivered, seconds = timed_close(monitor)
    later = observed.lines(since)
    MEASURED[case] = f"{len(healthy)} while healthy, {len(later)} after the fault"
    return delivered, seconds, later


def check_fault_during(delivered: bool, seconds: float, later: list[str]) -> None:
    assert not delivered
    assert seconds <= CLOSE_S + CLOSE_SLACK_S, f"close took {seconds:.2f} s"
    # The change (a reason, or a second one when the reconnection fails differently from
    # the stream) and the summary at close.
    assert 1 <= len(later) <= LINES_PER_CHANGE + 1, "\n".join(later)
    assert "closed with" in later[-1] and "steps not delivered" in later[-1], later


@pytest.mark.parametrize("name", DURING)
def test_a_collector_fault_during_training_pytorch(lab, name, tmp_path):
    with Observed() as observed, fault(lab, name, tmp_path) as setup:
        monitor = TorchMonitor(training_job=f"faults-torch-{free_port()}",
                               flush_interval_s=0.05, ack_timeout_s=0.5, **setup.arguments)
        job = TorchJob(monitor)
        result = train_through(monitor, setup, job.train, observed, f"during, torch, {name}")
    check_fault_during(*result)
    assert job.weights() == reference_weights(40)
    observed.assert_quiet()


@pytest.fixture(scope="module")
def keras_reference() -> list:
    from gradwatch.agent import GradientMonitor
    from tests.support.trainers import Trainer

    trainer = Trainer(GradientMonitor(enabled=False))
    trainer.train(40)
    return [v.numpy().tolist() for v in trainer.model.trainable_variables]


@pytest.mark.parametrize("name", DURING)
def test_a_collector_fault_during_training_keras(lab, name, tmp_path, keras_reference):
    from gradwatch.agent import GradientMonitor
    from tests.support.trainers import Trainer

    with Observed() as observed, fault(lab, name, tmp_path) as setup:
        monitor = GradientMonitor(training_job=f"faults-keras-{free_port()}",
                                  flush_interval_s=0.05, ack_timeout_s=0.5, **setup.arguments)
        trainer = Trainer(monitor)

        def train(steps: int, pause_s: float) -> None:
            for _ in range(steps):
                trainer.train(1)
                time.sleep(pause_s)

        result = train_through(monitor, setup, train, observed, f"during, keras, {name}")
    check_fault_during(*result)
    assert [v.numpy().tolist() for v in trainer.model.trainable_variables] == keras_reference
    observed.assert_quiet()


def test_every_setting_is_an_argument_of_every_front_end():
    """The README's promise (an argument per setting): the TensorFlow monitor spells its
    arguments out, and lacked ``ack_timeout_s`` and ``failback_interval_s``."""
    from gradwatch.agent import GradientMonitor

    for monitor in (GradientMonitor, TorchMonitor):
        monitor(enabled=False, **{name: None for name in ARGUMENTS if name != "enabled"})


def test_keras_with_a_malformed_tf_config_reports_as_worker_0(lab, keras_reference):
    """TF_CONFIG as TensorFlow's own launchers would never write it: one line, delivered."""
    from gradwatch.agent import GradientMonitor
    from tests.support.trainers import Trainer

    for raw in ('{"task": {"type": "worker", "index": 1e400}}', '{"task": {"type": 7}}',
                '{"task": {"index": 4294967296}}', '{"task": '):
        with Observed() as observed, mock.patch.dict(os.environ, {"TF_CONFIG": raw}):
            monitor = GradientMonitor(collector=lab.plain.grpc_target, flush_interval_s=0.05,
                                      training_job=f"faults-tf-config-{free_port()}")
            trainer = Trainer(monitor)
            trainer.train(40)
            delivered, _ = timed_close(monitor, 10.0)
        assert delivered, raw
        assert (monitor.identity.task_type, monitor.identity.task_index) == ("worker", 0)
        assert [v.numpy().tolist() for v in trainer.model.trainable_variables] == \
            keras_reference
        observed.assert_quiet()
        lines = observed.lines()
        assert len(lines) == 1 and "TF_CONFIG" in lines[0], lines


# -- at exit: the training process ends without close() ----------------------------------

EXIT_SCRIPT = """
import atexit, json, logging, sys, time
ended = []  # registered first, so it runs after the monitor's exit hook:
atexit.register(lambda: print(f"{time.monotonic() - ended[0]:.3f}", flush=True))
logging.basicConfig(level=logging.INFO)
from gradwatch.agent.torch import GradientMonitor
from tests.support.torch_job import TorchJob
monitor = GradientMonitor(flush_interval_s=0.05)  # GRADWATCH_TRAINING_JOB: one per case
job = TorchJob(monitor)
job.train(10, pause_s=0.02)
print("trained", flush=True)
sys.stdin.readline()  # meanwhile the test starts the fault
job.train(10)
print(json.dumps(job.weights()), flush=True)
ended.append(time.monotonic())
"""
#: Faults at exit: started after 10 steps, just before the last 10 and the exit; the last
#: three are there from the start (gRPC's own lines are counted here, on real stderr).
AT_EXIT = ["absent: collector killed", "absent: dns:/// collector killed", "token revoked",
           "blackholed: stops answering", "TLS: CA file removed", "TLS: CA file replaced",
           "blackholed: never accepts", "TLS: CA file not a certificate", "TLS: wrong CA"]


def run_to_exit(lab: Lab, name: str, folder: Path) -> dict[str, Any]:
    """One training process facing fault ``name`` at its exit; what it printed and how
    long its exit hook took."""
    with fault(lab, name, folder) as setup:
        arguments = setup.arguments
        env = {"PATH": os.environ.get("PATH", "/usr/bin"), "PYTHONPATH": str(ROOT),
               "TF_CPP_MIN_LOG_LEVEL": "3"}
        env.update({AgentSettings.environment_variables()[k]: str(v)
                    for k, v in arguments.items()})
        # The cases run at once, some against the same collector: a job each, or their
        # worker/0 tasks would take each other for a second reporter (ALREADY_EXISTS).
        env["GRADWATCH_TRAINING_JOB"] = f"faults-exit-{AT_EXIT.index(name)}"
        process = subprocess.Popen([sys.executable, "-c", EXIT_SCRIPT], env=env, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        try:
            assert process.stdout.readline().strip() == "trained", process.stderr.read()
            if setup.inject is not None:
                setup.inject()
                time.sleep(1.5)  # a collector re-reads its tokens file once a second
            stdout, stderr = process.communicate("go\n", timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    weights, hook_seconds = [*stdout.splitlines(), "", ""][:2]
    return {"code": process.returncode, "weights": weights, "stderr": stderr,
            "seconds": float(hook_seconds or "nan")}


@pytest.fixture(scope="module")
def exits(lab, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Every `AT_EXIT` case at once (each waits for its exit hook's 5 s)."""
    folders = {name: tmp_path_factory.mktemp("exit") for name in AT_EXIT}
    with ThreadPoolExecutor(len(AT_EXIT)) as pool:
        futures = {name: pool.submit(run_to_exit, lab, name, folders[name])
                   for name in AT_EXIT}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", AT_EXIT)
def test_a_collector_fault_at_exit(exits, name):
    """The exit hook flushes for at most 5 s; then the process ends, quietly."""
    result = exits[name]
    stderr = result["stderr"]
    assert result["code"] == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert json.loads(result["weights"]) == reference_weights(20)
    assert result["seconds"] <= 5.0 + CLOSE_SLACK_S, result["seconds"]  # the exit hook
    # (The token cases' "sending a token without TLS" is the setup's, not the fault's: the
    # revoked token's fault may take two reasons, gRPC's INTERNAL and UNAUTHENTICATED.)
    lines = [line for line in stderr.splitlines()
             if line.startswith(("WARNING:gradwatch", "ERROR:gradwatch"))
             and "sending a token without TLS" not in line]
    native = [line for line in stderr.splitlines() if NATIVE_LINE.match(line)]
    MEASURED[f"exit, {name}"] = (f"{len(lines)} lines, {len(native)} of gRPC's own, exit "
                                 f"hook {result['seconds']:.2f} s")
    assert 1 <= len(lines) <= LINES_PER_CHANGE + 1, stderr[-3000:]
    assert "steps not delivered" in lines[-1], lines
    assert not [line for line in native if line.startswith("E")], native
