"""Identity precedence: arguments, GRADWATCH_* variables, TF_CONFIG, defaults."""

import json

from gradwatch.agent.identity import resolve_identity


def test_defaults(monkeypatch):
    for name in ("TF_CONFIG", "GRADWATCH_TRAINING_JOB", "GRADWATCH_TASK_TYPE",
                 "GRADWATCH_TASK_INDEX"):
        monkeypatch.delenv(name, raising=False)
    identity = resolve_identity()
    assert (identity.task_type, identity.task_index) == ("worker", 0)
    assert identity.training_job


def test_tf_config_then_environment_then_arguments(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
        "task": {"type": "worker", "index": 1}}))
    monkeypatch.delenv("GRADWATCH_TASK_INDEX", raising=False)
    monkeypatch.setenv("GRADWATCH_TRAINING_JOB", "from-env")
    identity = resolve_identity()
    assert (identity.training_job, identity.task_type, identity.task_index) == (
        "from-env", "worker", 1)
    monkeypatch.setenv("GRADWATCH_TASK_INDEX", "3")
    assert resolve_identity().task_index == 3
    explicit = resolve_identity("run", "chief", 0)
    assert (explicit.training_job, explicit.task_type, explicit.task_index) == ("run", "chief", 0)


def test_unparsable_tf_config_is_ignored(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    monkeypatch.delenv("GRADWATCH_TASK_TYPE", raising=False)
    monkeypatch.delenv("GRADWATCH_TASK_INDEX", raising=False)
    assert (resolve_identity().task_type, resolve_identity().task_index) == ("worker", 0)


def test_kubernetes_indexed_job_and_pod_name(monkeypatch):
    for name in ("TF_CONFIG", "GRADWATCH_TASK_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "5")
    monkeypatch.setenv("POD_NAME", "trainer-worker-5")
    identity = resolve_identity()
    assert (identity.task_index, identity.hostname) == (5, "trainer-worker-5")


def test_downward_api_example_sets_the_agents_variables():
    from pathlib import Path

    import yaml

    env = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" /
                          "agent-env.yaml").read_text())
    names = {e["name"] for e in env}
    assert {"GRADWATCH_COLLECTOR", "GRADWATCH_TRAINING_JOB", "GRADWATCH_TASK_TYPE",
            "GRADWATCH_TASK_INDEX", "POD_NAME"} <= names
