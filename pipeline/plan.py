"""``ps3-engine plan``: what a rerun with a given config would recompute, per stage and shard, and why.

Nothing is written. Every stage has one shard per crawl shard, so the crawl plan gives the universe
of shard ids; a shard of a later stage is recomputed when it is missing, when its stage fingerprint
changed (config, schema or code version), when its committed input changed, or when the same shard of
an earlier stage is recomputed (its input will change). The document branch, where a run has one, is
planned beside it: render shards from the PDF sources, and their pages' corpus shards under build-corpus.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ps3_engine.pipeline.config import RunConfig
from ps3_engine.pipeline.documents import RENDER_STAGE, plan_document_corpus, plan_documents, render_input_key
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.runner import (
    STAGE_ORDER,
    STAGE_SHARDS,
    forced_stages,
    open_run,
    plan_caption,
    plan_corpus_rows,
    plan_segment,
    stage_fingerprints,
)
from ps3_engine.pipeline.sources import plan_crawl


@dataclass
class StagePlan:
    stage: str
    shards: int
    recompute: dict[str, str] = field(default_factory=dict)  # shard id -> reason
    note: str | None = None  # what else the user should know about this stage's shards

    @property
    def reasons(self) -> dict[str, int]:
        return dict(Counter(self.recompute.values()))


def _reason(layout: RunLayout, task: ShardTask | None, fingerprint: str, entry) -> str | None:
    if task is None:
        return "input not computed yet"
    if entry is None or layout.damage(entry) is not None:  # sizes from one listing of the stage's files
        return "missing"
    if entry.config_fingerprint != fingerprint:
        return "config changed"
    if entry.input_checksum != task.input_checksum:
        return "input changed"
    return None


def plan_run(config: RunConfig, force: frozenset[str] = frozenset()) -> list[StagePlan]:
    # Read-only: each stage's run state is read once (index + one listing), however many planners ask.
    layout = RunLayout(open_run(config).storage, read_only=True)
    layout.prefetch([STAGE_SHARDS[stage] for stage in STAGE_ORDER])
    fingerprints = stage_fingerprints(config)
    forced = forced_stages(set(force))  # shard stages
    if config.sources:
        crawl_tasks = plan_crawl(layout, config.sources, config.crawl.shard_size, config.s3, persist=False)
    else:  # plan against the input shards the run already has
        crawl_tasks = [
            ShardTask("crawl", key.rsplit("/", 1)[-1].removesuffix(".parquet"), key, entry.input_checksum, ())
            for key, entry in (
                (RunLayout.crawl_input_key(shard), entry) for shard, entry in layout.manifests("crawl").items()
            )
        ]
    # Crawl shards of sources this config does not list: a run does not crawl them again, but its later
    # stages plan from every committed crawl shard, so they belong to the universe (before, left out).
    kept = set(layout.manifests("crawl")) - {t.shard_id for t in crawl_tasks}
    universe = sorted({t.shard_id for t in crawl_tasks} | kept)
    planners = {
        "crawl": lambda: crawl_tasks,
        "segment": lambda: plan_segment(layout),
        "caption": lambda: plan_caption(layout),
        "build-corpus": lambda: plan_corpus_rows(layout),
    }
    plans: list[StagePlan] = []
    upstream: set[str] = set()
    for stage in STAGE_ORDER:
        shard_stage = STAGE_SHARDS[stage]
        tasks = {t.shard_id: t for t in planners[stage]()}
        manifests = layout.manifests(shard_stage)
        plan = StagePlan(stage, len(universe))
        if stage == "crawl" and kept:
            plan.note = f"{len(kept)} crawl shards of sources this config does not list: kept as they are"
        for shard_id in universe:
            if stage == "crawl" and shard_id in kept:
                continue
            if shard_stage in forced:
                reason: str | None = "forced"
            elif shard_id in upstream:
                reason = "upstream shard recomputes"
            else:
                reason = _reason(layout, tasks.get(shard_id), fingerprints[shard_stage], manifests.get(shard_id))
            if reason:
                plan.recompute[shard_id] = reason
        upstream = set(plan.recompute)
        plans.append(plan)
    render = _plan_documents(layout, config, fingerprints, forced, plans[-1])
    if render is not None:  # before build-corpus, as a run computes them
        plans.insert(len(plans) - 1, render)
    return plans


def _plan_documents(
    layout: RunLayout,
    config: RunConfig,
    fingerprints: dict[str, str],
    forced: set[str],
    corpus: StagePlan,
) -> StagePlan | None:
    """The render plan, and the pages' corpus shards added to ``corpus`` (None: no document branch).

    Before, plan left the document branch out: a changed render setting showed nothing to compute.
    ``forced``: the forced shard stages (:func:`forced_stages`); the pages' corpus rows are forced by
    ``--force render`` or ``--force build-corpus``, not by a forced image stage, as in a run.
    """
    manifests = layout.manifests(RENDER_STAGE)
    if config.document_sources:
        tasks = plan_documents(layout, config.document_sources, config.render.shard_size, config.s3, persist=False)
    elif not config.sources:  # plan against the render inputs the run already has, as for crawl
        tasks = [ShardTask(RENDER_STAGE, s, render_input_key(s), e.input_checksum, ()) for s, e in manifests.items()]
    else:  # image sources only: a run renders nothing, but still builds the pages' corpus rows
        tasks = []
    # Render shards of the run that this config does not plan (before, left out of the plan, pages and all):
    # a run keeps them as they are and build-corpus still adds their pages' rows to the corpus.
    kept = sorted(set(manifests) - {t.shard_id for t in tasks})
    if not tasks and not kept:
        return None
    plan = StagePlan(RENDER_STAGE, len(tasks) + len(kept))
    if kept:
        given = "other PDF sources than this config's" if config.document_sources else "PDF sources this config lacks"
        plan.note = f"{len(kept)} render shards of {given}: kept as they are (their pages stay in the corpus)"
    for task in tasks:
        reason = (
            "forced"
            if RENDER_STAGE in forced
            else _reason(layout, task, fingerprints[RENDER_STAGE], manifests.get(task.shard_id))
        )
        if reason:
            plan.recompute[task.shard_id] = reason
    pages = {t.shard_id: t for t in plan_document_corpus(layout)}
    committed = layout.manifests(STAGE_SHARDS["build-corpus"])
    corpus.shards += plan.shards
    for shard_id in [t.shard_id for t in tasks] + kept:
        if "document-corpus" in forced:
            reason: str | None = "forced"
        elif shard_id in plan.recompute:
            reason = "upstream shard recomputes"
        else:
            reason = _reason(layout, pages.get(shard_id), fingerprints["document-corpus"], committed.get(shard_id))
        if reason:
            corpus.recompute[shard_id] = reason
    return plan
