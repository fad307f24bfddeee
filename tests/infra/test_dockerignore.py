"""The image build context leaves out what git leaves out (virtualenvs, run outputs, caches).

A path that .gitignore names but .dockerignore does not is sent to the Docker daemon with every build:
scripts/setup_vllm.sh's .venv-vllm alone is several GB.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _patterns(path: Path) -> set[str]:
    """Entries without comments, leading '/' or trailing '/' (both files use them for folders)."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return {line.strip("/") for line in lines if line and not line.startswith(("#", "!"))}


def test_every_gitignored_path_stays_out_of_the_docker_build_context():
    docker = _patterns(ROOT / ".dockerignore")
    # A .gitignore entry without a '/' matches at any depth; .dockerignore spells that '**/name'.
    missing = sorted(p for p in _patterns(ROOT / ".gitignore") if p not in docker and f"**/{p}" not in docker)
    assert not missing, f".dockerignore lacks {missing} (listed in .gitignore)"
