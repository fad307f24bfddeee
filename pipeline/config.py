"""Typed run configuration: loaded from YAML, overridden from the CLI, validated at the boundary."""

from __future__ import annotations

import importlib.metadata
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ps3_engine.infra.storage import S3Settings
from ps3_engine.pipeline.executor import ExecutorConfig
from ps3_engine.stages.caption import CaptionConfig
from ps3_engine.stages.corpus import CorpusConfig
from ps3_engine.stages.crawl import CrawlConfig
from ps3_engine.stages.documents.corpus import DocumentCorpusConfig
from ps3_engine.stages.render import RenderConfig
from ps3_engine.stages.segment import SegmentConfig


class RunConfig(BaseModel):
    """One run of the data engine. ``run_root`` is a local folder or ``s3://bucket/prefix``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_root: str = Field(..., min_length=1)
    sources: list[str] = Field(default_factory=list)
    document_sources: list[str] = Field(default_factory=list, description="PDF lists, folders or S3 prefixes")
    s3: S3Settings = S3Settings()
    executor: ExecutorConfig = ExecutorConfig()
    crawl: CrawlConfig = CrawlConfig()
    segment: SegmentConfig = SegmentConfig()
    caption: CaptionConfig = CaptionConfig()
    corpus: CorpusConfig = CorpusConfig()
    render: RenderConfig = RenderConfig()
    document_corpus: DocumentCorpusConfig = DocumentCorpusConfig()


class ConfigError(ValueError):
    """A configuration that failed validation; the message lists every problem."""


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = target
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as YAML (``3``, ``true``, ``[a, b]``)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        dotted, value = override.split("=", 1)
        _set_dotted(raw, dotted.strip(), yaml.safe_load(value))
    return raw


def load_run_config(
    path: str | Path | None, overrides: list[str] | None = None, base: dict[str, Any] | None = None, **fields: Any
) -> RunConfig:
    """Load YAML (or start from ``base``, e.g. a run's snapshot), apply overrides and fields, validate."""
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    for key, value in fields.items():
        if value is not None:
            raw[key] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid run config:\n{exc}") from exc


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in (
        "ps3-engine",
        "ray",
        "pyarrow",
        "polars",
        "pydantic",
        "pillow",
        "urllib3",
        "torch",
        "transformers",
        "vllm",
    ):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def snapshot(config: RunConfig, fingerprints: dict[str, str]) -> dict[str, Any]:
    return {
        "config": config.model_dump(mode="json"),
        "fingerprints": fingerprints,
        "versions": versions(),
        "written_at": datetime.now(UTC).isoformat(),
    }
