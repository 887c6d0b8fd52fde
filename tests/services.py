"""Helpers for tests that start real services (see gradwatch.testing for the services)."""

from __future__ import annotations

import os
import shutil

import pytest

from gradwatch.testing import free_port

__all__ = ["free_port", "require_binary"]


def require_binary(name: str) -> str:
    """The binary's path; a test needing it fails in CI (which installs it) and is
    skipped elsewhere with the install hint."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (make test installs it with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
