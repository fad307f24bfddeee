"""What ``status --check`` reports: a :class:`Gap` per problem, and the item comparison behind most of them.

Shared by the image conservation check (:mod:`ps3_engine.pipeline.conservation`), the document branch's
(:mod:`ps3_engine.pipeline.documents`) and the integrity check (:mod:`ps3_engine.pipeline.verify`), so none
of them imports another for it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ps3_engine.pipeline import shard_index
from ps3_engine.pipeline.layout import RunLayout


@dataclass(frozen=True)
class Gap:
    stage: str
    shard_id: str
    # "missing_shard" | "lost" | "duplicated" | "unexpected" | "dataset_mismatch" | "damaged" | "stale" | "pending"
    problem: str
    count: int
    examples: tuple[str, ...]

    def describe(self) -> str:
        if self.problem == "stale":
            return f"{self.stage}/{self.shard_id}: its input changed since it was computed; {self.examples[0]}"
        if self.problem == "pending":
            return f"{self.stage}/{self.shard_id}: not computed yet; {self.examples[0]}"
        return f"{self.stage}/{self.shard_id}: {self.count} {self.problem} e.g. {', '.join(self.examples[:3])}"


def stale_gap(stage: str, shard: str, command: str) -> Gap:
    """A shard computed from an upstream output that has changed since (``crawl --retry-failed``, a rerun
    of an earlier stage): it waits for a rerun of ``command``, and its items are not compared, as they
    would differ from the new input's without any being lost."""
    return Gap(stage, shard, "stale", 1, (f"rerun {command}",))


class MissingShards:
    """Tells a shard without a manifest that is only not computed yet from one that is gone.

    A new upstream shard (more sources crawled, a crawl shard committed before segment ran) has no
    downstream shard until its stage is rerun: a ``pending`` gap, which waits for that rerun like a stale
    shard. A shard computed before (its output or errors file is still there: the manifest is written
    last; or the stage's index folded its manifest) lost its manifest, and one that failed in the last
    run of its stage did not compute: both are ``missing_shard`` gaps, which fail the check as before.
    """

    def __init__(self, layout: RunLayout) -> None:
        self.storage = layout.storage
        summary = self.storage.read_json(RunLayout.SUMMARY_KEY) if self.storage.exists(RunLayout.SUMMARY_KEY) else {}
        self.failed = {(f["stage"], f["shard_id"]) for f in summary.get("failed_shards", [])}
        self._files: dict[str, dict[str, int]] = {}
        self._indexed: dict[str, set[str]] = {}

    def gap(self, stage: str, shard: str, command: str) -> Gap:
        """The gap of ``stage``'s shard ``shard`` without a manifest; ``command`` computes it."""
        if (command, shard) in self.failed or self._computed_before(stage, shard):
            return Gap(stage, shard, "missing_shard", 1, (shard,))
        return Gap(stage, shard, "pending", 1, (f"rerun {command}",))

    def _computed_before(self, stage: str, shard: str) -> bool:
        if stage not in self._files:
            self._files[stage] = shard_index.list_stage_files(self.storage, stage)
            self._indexed[stage] = set(shard_index.read_index(self.storage, stage)[0])
        files = self._files[stage]
        written = RunLayout.output_key(stage, shard) in files or RunLayout.errors_key(stage, shard) in files
        return written or shard in self._indexed[stage]


def compare_items(stage: str, shard: str, expected: set[str], seen: list[str], gaps: list[Gap]) -> None:
    """Append the ids of ``expected`` not in ``seen`` (lost), seen twice (duplicated) or not expected."""
    counts = Counter(seen)
    lost = sorted(expected - set(counts))
    duplicated = sorted(k for k, n in counts.items() if n > 1)
    unexpected = sorted(set(counts) - expected)
    for problem, items in (("lost", lost), ("duplicated", duplicated), ("unexpected", unexpected)):
        if items:
            gaps.append(Gap(stage, shard, problem, len(items), tuple(items[:5])))


def read_planned(layout: RunLayout, key: str) -> tuple[set[str], str]:
    """The item ids of a planned input shard (crawl, render) and the checksum the planner stored with them."""
    table = layout.storage.read_parquet(key, columns=["item_id"])
    checksum = (table.schema.metadata or {}).get(b"input_checksum", b"").decode()
    return set(table.column("item_id").to_pylist()), checksum


def read_column(layout: RunLayout, key: str, column: str) -> list:
    """One column of a Parquet file of the run, as Python values."""
    return layout.storage.read_parquet(key, columns=[column]).column(column).to_pylist()
