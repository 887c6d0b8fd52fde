"""Bearer tokens scoped to training jobs, from a file that can change under a running collector."""

from __future__ import annotations

import os

import grpc
import pytest

from gradwatch.collector.auth import (
    TokenAuthority,
    TokensFileError,
    bearer_token,
    digest,
    load_tokens,
)
from gradwatch.collector.ingest import InvalidReport

VISION = "vision-token-0123456789"
NLP = "nlp-token-0123456789ab"


def write(path, text: str) -> None:
    path.write_text(text)
    stat = path.stat()  # a visibly newer file, even within the filesystem's time resolution
    os.utime(path, (stat.st_atime, stat.st_mtime + 1))


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.yaml"
    write(path, f"""
tokens:
  - name: vision
    token: {VISION}
    training_jobs: ["vision-*"]
  - name: nlp
    sha256: {digest(NLP)}
    training_jobs: ["nlp-bert", "nlp-t5"]
""")
    return path


def test_a_token_writes_only_its_jobs(tokens_file):
    authority = TokenAuthority(tokens_file)
    assert authority.authorize(digest(VISION), "vision-resnet") == "vision"
    assert authority.authorize(digest(NLP), "nlp-t5") == "nlp"
    with pytest.raises(InvalidReport) as denied:
        authority.authorize(digest(VISION), "nlp-t5")
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "'vision' may not report training job 'nlp-t5'" in denied.value.message
    assert VISION not in denied.value.message


@pytest.mark.parametrize("token", [None, "not-a-known-token-at-all"])
def test_missing_or_unknown_token_is_unauthenticated(tokens_file, token):
    with pytest.raises(InvalidReport) as denied:
        TokenAuthority(tokens_file).authorize(token and digest(token), "vision-a")
    assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_rotation_adds_and_revokes_tokens_without_restart(tokens_file):
    authority = TokenAuthority(tokens_file, check_interval_s=0)
    rotated = "vision-token-rotated-0001"
    write(tokens_file, f"""
tokens:
  - name: vision
    token: {rotated}
    training_jobs: ["vision-*"]
""")
    assert authority.authorize(digest(rotated), "vision-a") == "vision"
    with pytest.raises(InvalidReport, match="unknown or revoked"):
        authority.authorize(digest(VISION), "vision-a")


def test_a_broken_file_keeps_the_previous_tokens(tokens_file, caplog):
    authority = TokenAuthority(tokens_file, check_interval_s=0)
    write(tokens_file, f"tokens:\n  - name: vision\n    token: {VISION}\n")
    assert authority.authorize(digest(VISION), "vision-a") == "vision"
    assert "training_jobs" in caplog.text and VISION not in caplog.text


@pytest.mark.parametrize("text, field", [
    ("[]", "one key, tokens"),
    ("tokens:\n  - name: a\n    training_jobs: [x]\n", "exactly one of token and sha256"),
    ("tokens:\n  - name: a\n    token: short\n    training_jobs: [x]\n", "token: at least 16"),
    ("tokens:\n  - name: a\n    sha256: abc\n    training_jobs: [x]\n", "64 hex digits"),
    (f"tokens:\n  - name: a\n    token: {VISION}\n    training_jobs: []\n", "training_jobs"),
    (f"tokens:\n  - name: a\n    token: {VISION}\n    jobs: [x]\n", "unknown field 'jobs'"),
    (f"tokens:\n  - name: a\n    token: {VISION}\n    training_jobs: [x]\n"
     f"  - name: b\n    token: {VISION}\n    training_jobs: [y]\n", "same token as 'a'"),
])
def test_invalid_files_are_refused_naming_the_field(tmp_path, text, field):
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    with pytest.raises(TokensFileError, match=field) as error:
        load_tokens(path)
    assert VISION not in str(error.value)


def test_bearer_token_from_metadata():
    assert bearer_token([("x", "1"), ("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None


def test_a_yaml_error_does_not_quote_the_file(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(f"tokens:\n  - name: a\n    token: [{VISION}\n")
    with pytest.raises(TokensFileError, match="invalid YAML at line") as error:
        load_tokens(path)
    assert VISION not in str(error.value)
