"""Read-only commands leave no trace on a run root: a mistyped path must not become a folder."""

from __future__ import annotations

import pytest

from ps3_engine.pipeline.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["config", "show", "--run-root", "{root}"],
        ["plan", "--run-root", "{root}", "--set", "crawl.min_short_side=512"],
    ],
    ids=["config-show", "plan"],
)
def test_read_only_command_creates_nothing_at_a_new_run_root(tmp_path, capsys, argv):
    root = tmp_path / "no-such-run"
    code = main([arg.format(root=root) for arg in argv])
    assert code == 0
    assert str(root) in capsys.readouterr().out
    assert not root.exists()
