"""Identity precedence: settings (arguments, GRADWATCH_*), the launcher's environment
(TF_CONFIG, torchrun), Kubernetes, defaults."""

import json
import logging
from pathlib import Path

import pytest
import yaml

from gradwatch.agent.core.identity import resolve_identity, tf_config, torchrun
from gradwatch.agent.core.settings import AgentSettings


def identity(environ, launchers=(tf_config,), **arguments):
    return resolve_identity(AgentSettings.resolve(environ, **arguments), launchers, environ)


def test_defaults():
    found = identity({})
    assert (found.task_type, found.task_index) == ("worker", 0)
    assert found.training_job


def test_tf_config_then_environment_then_arguments():
    environ = {"TF_CONFIG": json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
                                        "task": {"type": "worker", "index": 1}}),
               "GRADWATCH_TRAINING_JOB": "from-env"}
    found = identity(environ)
    assert (found.training_job, found.task_type, found.task_index) == ("from-env", "worker", 1)
    assert identity({**environ, "GRADWATCH_TASK_INDEX": "3"}).task_index == 3
    explicit = identity(environ, training_job="run", task_type="chief", task_index=0)
    assert (explicit.training_job, explicit.task_type, explicit.task_index) == (
        "run", "chief", 0)


def test_unparsable_tf_config_is_ignored():
    found = identity({"TF_CONFIG": "{not json"})
    assert (found.task_type, found.task_index) == ("worker", 0)


def test_torchrun_rank_and_run_id():
    environ = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
               "TORCHELASTIC_RUN_ID": "bert-42"}
    found = identity(environ, launchers=(torchrun,))
    assert (found.training_job, found.task_type, found.task_index) == ("bert-42", "worker", 5)
    # torchrun without --rdzv-id says "none"; TF_CONFIG is not a torch launcher's business
    plain = identity({**environ, "TORCHELASTIC_RUN_ID": "none"}, launchers=(torchrun,))
    assert plain.training_job != "none" and plain.task_index == 5
    assert identity(environ).task_index == 0


@pytest.mark.parametrize("environ", [
    {"TF_CONFIG": '{"task": {"type": "worker", "index": 1e400}}'},
    {"TF_CONFIG": '{"task": {"type": 7, "index": 4294967296}}'},
    {"TF_CONFIG": '{"task": ["worker"]}'},
    {"RANK": "\u00b2"}, {"RANK": "99999999999"}, {"JOB_COMPLETION_INDEX": "\u00b2"},
    {"TORCHELASTIC_RUN_ID": "run\n2", "POD_NAME": "pod\x7f"},
])
def test_what_a_launcher_says_wrong_is_ignored_in_one_line(caplog, environ):
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        found = identity(environ, launchers=(tf_config, torchrun))
    assert (found.task_type, found.task_index) == ("worker", 0)
    assert "\n" not in found.training_job and found.hostname != "pod\x7f"
    assert len(caplog.records) == 1, caplog.records
    assert "ignoring what the launcher says" in caplog.records[0].getMessage()
    assert all(name in caplog.records[0].getMessage() for name in environ)


def test_kubernetes_indexed_job_and_pod_name():
    found = identity({"JOB_COMPLETION_INDEX": "5", "POD_NAME": "trainer-worker-5"})
    assert (found.task_index, found.hostname) == (5, "trainer-worker-5")


def test_downward_api_example_sets_the_agents_variables():
    env = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" /
                          "agent-env.yaml").read_text())
    names = {e["name"] for e in env}
    assert {"GRADWATCH_COLLECTOR", "GRADWATCH_TRAINING_JOB", "GRADWATCH_TASK_TYPE",
            "GRADWATCH_TASK_INDEX", "POD_NAME"} <= names
