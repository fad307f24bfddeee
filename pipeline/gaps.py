"""What ``status --check`` reports: a :class:`Gap` per problem, and the item comparison behind most of them.

Shared by the image conservation check (:mod:`ps3_engine.pipeline.conservation`), the document branch's
(:mod:`ps3_engine.pipeline.documents`) and the integrity check (:mod:`ps3_engine.pipeline.verify`), so none
of them imports another for it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ps3_engine.pipeline.layout import RunLayout


@dataclass(frozen=True)
class Gap:
    stage: str
    shard_id: str
    # "missing_shard" | "lost" | "duplicated" | "unexpected" | "dataset_mismatch" | "damaged" | "stale"
    problem: str
    count: int
    examples: tuple[str, ...]

    def describe(self) -> str:
        if self.problem == "stale":
            return f"{self.stage}/{self.shard_id}: its input changed since it was computed; {self.examples[0]}"
        return f"{self.stage}/{self.shard_id}: {self.count} {self.problem} e.g. {', '.join(self.examples[:3])}"


def stale_gap(stage: str, shard: str, command: str) -> Gap:
    """A shard computed from an upstream output that has changed since (``crawl --retry-failed``, a rerun
    of an earlier stage): it waits for a rerun of ``command``, and its items are not compared, as they
    would differ from the new input's without any being lost."""
    return Gap(stage, shard, "stale", 1, (f"rerun {command}",))


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
