"""Read-only commands leave no trace at a new run root; a crawl refused at the start leaves no run there."""

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


def test_crawl_without_sources_leaves_no_run_root_behind(tmp_path, capsys):
    root = tmp_path / "new-run"
    assert main(["crawl", "--run-root", str(root)]) == 2
    assert "no crawl sources given" in capsys.readouterr().err
    # The command's log may stay (it holds the error); no run.json, so the root is not taken for a run.
    assert not (root / "run.json").exists()
    assert main(["status", str(root)]) == 2
    assert "is not a run root" in capsys.readouterr().err
