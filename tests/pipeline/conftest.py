"""Fixtures shared by the pipeline tests that need a finished run to change and rerun."""

from __future__ import annotations

import pytest

from tests.support.rerun_run import RerunRun, build_rerun_run


@pytest.fixture(scope="session")
def rerun_run(tmp_path_factory, zoo, tiny_captioner) -> RerunRun:
    """A finished run of both branches with one transient crawl failure (tests/support/rerun_run.py)."""
    return build_rerun_run(tmp_path_factory.mktemp("rerun-run"), zoo, tiny_captioner)
