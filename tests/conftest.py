"""Shared fixtures for the test suite."""

import pytest


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory, so a run's `.pipebuild/` cache lands inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
