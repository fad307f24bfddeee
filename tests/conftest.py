"""Session-scoped real services: a local Ray, a SeaweedFS S3 server and the crawl zoo HTTP server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("project", deadline=None, max_examples=60)
settings.load_profile("project")

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray for the session. It starts after the S3 server so its workers inherit the S3 env."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from tests.support.seaweed import start_seaweed

    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test, named after the test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def zoo_assets_dir(tmp_path_factory) -> Path:
    return Path(os.environ.get("PS3_TEST_CACHE", tmp_path_factory.mktemp("zoo-assets")))


@pytest.fixture(scope="session")
def zoo(zoo_assets_dir):
    from tests.support.zoo import serve_zoo

    with serve_zoo(zoo_assets_dir) as server:
        yield server


def pytest_collection_modifyitems(config, items):
    """The README's fresh-clone tests run first; GPU tests skip cleanly on CPU machines."""
    # A newcomer's machine has no Ray cluster, S3 server, leftover worker or exported test setting
    # running: the fresh-clone demo runs before any other test has started one (in CI, run late in
    # the suite, it once turned every caption into an error row; environment alone did not explain it).
    items.sort(key=lambda item: not item.nodeid.startswith("tests/test_readme_commands.py"))
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory) -> Path:
    """The locally trained tiny Qwen2-VL captioner (built once per session, or cached in PS3_TEST_CACHE)."""
    from ps3_engine.training.tiny_captioner import build_tiny_captioner

    cache = os.environ.get("PS3_TEST_CACHE")
    folder = Path(cache) / "tiny-captioner" if cache else tmp_path_factory.mktemp("tiny-captioner")
    return build_tiny_captioner(folder, train_steps=80)
