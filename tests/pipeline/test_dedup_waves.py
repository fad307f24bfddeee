"""Dedup by waves: the wave rule against a brute-force reference, persistence, reuse and the streaming path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.dedup import HASH_COLUMNS, WAVES_PREFIX, WaveDedup, run_dedup, solve, wave_key
from ps3_engine.pipeline.dedup_store import sha_words
from ps3_engine.pipeline.dedup_sweep import DedupState, digest_groups
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.schemas import ERROR_SCHEMA
from ps3_engine.schemas.image import IMAGE_SCHEMA

HASH_SCHEMA = pa.schema([IMAGE_SCHEMA.field(name) for name in HASH_COLUMNS])
K = 4


def flip_bits(rng: np.random.Generator, values: np.ndarray, low: int, high: int) -> np.ndarray:
    """Each value with ``low..high`` distinct random bits flipped."""
    out = values.copy()
    for i, count in enumerate(rng.integers(low, high + 1, values.size)):
        for bit in rng.choice(64, count, replace=False):
            out[i] ^= np.uint64(1) << np.uint64(bit)
    return out


def wave_rows(num_rows: int, num_waves: int, seed: int) -> dict[str, np.ndarray]:
    """Rows in canonical order over ``num_waves`` waves, with clusters planted across waves.

    Random images in every wave; near variants (1-6 bits, some beyond k) of earlier-wave images, some
    larger than their original (a later, larger image must not take over); byte copies of earlier
    rows; chains (a variant of a variant, so a new image can be near a dropped one only); and bridges:
    pairs of earlier images 8 bits apart, each kept, joined by a later image 4 bits from both.
    """
    rng = np.random.default_rng(seed)
    per_wave = num_rows // num_waves
    phash, pixels, num_bytes, digest, wave, bridge = [], [], [], [], [], []
    next_digest = next_bridge = 0

    def add(
        values: np.ndarray,
        k: int,
        px: np.ndarray | None = None,
        digests: np.ndarray | None = None,
        role: int = 0,
    ) -> None:
        nonlocal next_digest
        num = values.size
        # Bridge rows carry 3 * bridge id + role - 1 (role 1: a, 2: b, 3: c); others -1.
        bridge.append(3 * np.arange(next_bridge, next_bridge + num) + role - 1 if role else np.full(num, -1))
        if digests is None:
            digests = np.arange(next_digest, next_digest + num)
            next_digest += num
        phash.append(values)
        pixels.append(px if px is not None else rng.choice([10_000, 20_000, 30_000], num).astype(np.int64))
        num_bytes.append(rng.integers(1000, 1004, num).astype(np.int64))
        digest.append(digests)
        wave.append(np.full(num, k, np.int64))

    for k in range(num_waves):
        prior = np.concatenate(phash) if phash else np.empty(0, np.uint64)
        prior_digest = np.concatenate(digest) if digest else np.empty(0, np.int64)
        prior_pixels = np.concatenate(pixels) if pixels else np.empty(0, np.int64)
        quarter = per_wave // 4
        if prior.size:
            picks = rng.integers(0, prior.size, quarter)
            # Variants of earlier images; half of them larger than any earlier image.
            larger = np.where(rng.random(quarter) < 0.5, 10 * prior_pixels[picks], prior_pixels[picks])
            add(flip_bits(rng, prior[picks], 1, 6), k, larger)
            copies = rng.integers(0, prior.size, quarter // 4)
            add(prior[copies], k, prior_pixels[copies], prior_digest[copies])
        if k >= 2:
            # Bridges: a (wave k-2) and b (wave k-1) 8 bits apart, c (wave k, larger) 4 bits from both.
            num_bridges = quarter // 8
            a = rng.integers(0, 2**64, num_bridges, dtype=np.uint64)
            bits = np.array([rng.choice(64, 8, replace=False) for _ in range(num_bridges)])
            masks = [np.bitwise_or.reduce(np.uint64(1) << bits[:, i : i + 4].astype(np.uint64), axis=1) for i in (0, 4)]
            add(a, k - 2, role=1)
            add(a ^ masks[0] ^ masks[1], k - 1, role=2)
            add(a ^ masks[0], k, np.full(num_bridges, 90_000, np.int64), role=3)
            next_bridge += num_bridges
        fill = per_wave - sum(w.size for w in wave if w[0] == k)
        add(rng.integers(0, 2**64, max(fill, 0), dtype=np.uint64), k)
    order = np.lexsort((np.arange(sum(w.size for w in wave)), np.concatenate(wave)))
    rows = {
        "phash": np.concatenate(phash),
        "pixels": np.concatenate(pixels),
        "num_bytes": np.concatenate(num_bytes),
        "digest": np.concatenate(digest),
        "wave": np.concatenate(wave),
        "bridge": np.concatenate(bridge),
    }
    rows = {name: column[order] for name, column in rows.items()}
    # Byte copies must look like copies: same pHash, size and bytes as their first occurrence.
    _, first, inverse = np.unique(rows["digest"], return_index=True, return_inverse=True)
    for name in ("phash", "pixels", "num_bytes"):
        rows[name] = rows[name][first[inverse]]
    return rows


def brute_force_waves(rows: dict[str, np.ndarray], k: int) -> np.ndarray:
    """The wave rule by definition: every pair compared, components recomputed for each wave prefix."""
    phash, digest, wave = rows["phash"], rows["digest"], rows["wave"]
    num = phash.size
    pairs_a, pairs_b = [], []
    for start in range(0, num, 1024):
        block = phash[start : start + 1024]
        close = np.bitwise_count(block[:, None] ^ phash[None, :]) <= k
        close |= digest[start : start + 1024, None] == digest[None, :]
        i, j = np.nonzero(close)
        pairs_a.append(i + start)
        pairs_b.append(j)
    a, b = np.concatenate(pairs_a), np.concatenate(pairs_b)
    representative = np.full(num, -1, np.int64)

    def better(row: int) -> tuple[int, int, int]:
        return (rows["pixels"][row], rows["num_bytes"][row], -row)

    for current in range(int(wave.max()) + 1):
        inside = (wave[a] <= current) & (wave[b] <= current)
        graph = coo_matrix((np.ones(inside.sum(), np.int8), (a[inside], b[inside])), shape=(num, num))
        label = connected_components(graph, directed=False)[1]
        members: dict[int, list[int]] = {}
        for row in np.flatnonzero(wave <= current).tolist():
            members.setdefault(int(label[row]), []).append(row)
        for rows_of_component in members.values():
            new = [r for r in rows_of_component if wave[r] == current]
            if not new:
                continue
            old_kept = [r for r in rows_of_component if wave[r] < current and representative[r] == r]
            chosen = max(old_kept or new, key=better)
            representative[new] = chosen
    return representative


def solve_rows(rows: dict[str, np.ndarray], k: int, waves: bool = True) -> np.ndarray:
    wave = rows["wave"] if waves else None
    return solve(rows["digest"], rows["phash"], rows["pixels"], rows["num_bytes"], k, wave)


@pytest.mark.slow
def test_waves_match_the_brute_force_rule_on_20k_rows():
    rows = wave_rows(20_000, num_waves=6, seed=3)
    expected = brute_force_waves(rows, K)
    got = solve_rows(rows, K)
    assert np.array_equal(got, expected)
    dropped = got != np.arange(got.size)
    # The data must exercise every rule: drops against earlier waves, later larger images that did
    # not take over, and bridges whose two earlier images both stay kept.
    assert np.count_nonzero(dropped & (rows["wave"] > rows["wave"][got])) > 1000
    assert np.count_nonzero(dropped & (rows["pixels"] > rows["pixels"][got])) > 300
    by_role = {role: np.flatnonzero((rows["bridge"] >= 0) & (rows["bridge"] % 3 == role - 1)) for role in (1, 2, 3)}
    a, b, c = (by_role[role][np.argsort(rows["bridge"][by_role[role]])] for role in (1, 2, 3))
    bridged = ~dropped[a] & ~dropped[b] & ((got[c] == a) | (got[c] == b))
    assert np.count_nonzero(bridged) > 0.9 * c.size > 100
    assert not np.array_equal(solve_rows(rows, K, waves=False), got), "one pass must differ on this data"


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_waves_one_by_one_equals_the_sweep(seed):
    rows = wave_rows(6000, num_waves=5, seed=seed)
    words = np.zeros((rows["digest"].size, 4), np.uint64)
    words[:, 0] = rows["digest"]
    state = DedupState(K)
    streamed = [
        state.add_wave(words[m], rows["phash"][m], rows["pixels"][m], rows["num_bytes"][m])
        for m in (rows["wave"] == k for k in range(5))
    ]
    assert np.array_equal(np.concatenate(streamed), solve_rows(rows, K))
    assert np.array_equal(np.concatenate(streamed), brute_force_waves(rows, K))


def test_one_wave_is_the_single_pass_rule():
    rows = wave_rows(3000, num_waves=3, seed=9)
    one = {**rows, "wave": np.zeros_like(rows["wave"])}
    assert np.array_equal(solve_rows(one, K), brute_force_waves(one, K))


def test_wave_key_is_fixed_by_the_shard_id():
    assert wave_key("0a1b2c3d-00063", 64) == ("0a1b2c3d", 0)
    assert wave_key("0a1b2c3d-00064", 64) == ("0a1b2c3d", 1)
    assert wave_key("0a1b2c3d-100000", 64) == ("0a1b2c3d", 1562)
    for bad in ("0a1b2c3d", "-00001", "abc-x1"):
        with pytest.raises(ValueError, match="is not '<prefix>-<index>'"):
            wave_key(bad, 64)


# -- through a run layout ---------------------------------------------------------------------------


def commit_crawl_shard(layout: RunLayout, shard_id: str, rows: dict[str, np.ndarray]) -> None:
    """A committed crawl shard carrying only the hash columns (the dedup reads nothing else)."""
    num = rows["phash"].size
    table = pa.table(
        {
            "item_id": [f"item-{shard_id}-{i}" for i in range(num)],
            "shard_id": [shard_id] * num,
            "source_ref": [f"https://host.example/{shard_id}/{i}.jpg" for i in range(num)],
            "sha256": [f"{d:064x}" for d in rows["digest"].tolist()],
            "phash": rows["phash"],
            "width": rows["pixels"].astype(np.int32),
            "height": np.ones(num, np.int32),
            "num_bytes": rows["num_bytes"],
        },
        schema=HASH_SCHEMA,
    )
    task = ShardTask(stage="crawl", shard_id=shard_id, input_key="", input_checksum="", input_shards=())
    layout.commit_shard(
        task, fingerprint="f", output=table, errors=ERROR_SCHEMA.empty_table(), attempt=1, wall_seconds=0.0
    )


def split_into_shards(rows: dict[str, np.ndarray], prefix: str, shards_per_wave: int) -> dict[str, dict]:
    """Shards of one source: each wave's rows cut into ``shards_per_wave`` shards, numbered in order."""
    shards = {}
    for k in range(int(rows["wave"].max()) + 1):
        at = np.flatnonzero(rows["wave"] == k)
        for i, part in enumerate(np.array_split(at, shards_per_wave)):
            shards[f"{prefix}-{k * shards_per_wave + i:05d}"] = {name: column[part] for name, column in rows.items()}
    return shards


def fresh_run_drops(root, shards: dict[str, dict]) -> list[dict]:
    """The drop rows of a stage-by-stage dedup of ``shards`` committed into a new run at ``root``."""
    layout = run_with(root, shards)
    run_dedup(layout, K, wave_shards=2)
    return drop_rows(layout)


def run_with(root, shards: dict[str, dict], shard_ids=None) -> RunLayout:
    """A new run at ``root`` with the crawl shards ``shard_ids`` (all by default) of ``shards`` committed."""
    layout = RunLayout(Storage(str(root)))
    for shard_id in shards if shard_ids is None else shard_ids:
        commit_crawl_shard(layout, shard_id, shards[shard_id])
    return layout


def sharded_waves(num_rows: int, num_waves: int, seed: int):
    """``wave_rows`` split two crawl shards per wave: (rows, shards, sorted shard ids)."""
    rows = wave_rows(num_rows, num_waves=num_waves, seed=seed)
    shards = split_into_shards(rows, "0a1b2c3d", shards_per_wave=2)
    return rows, shards, sorted(shards)


def drop_rows(layout: RunLayout) -> list[dict]:
    table = layout.storage.read_parquet(layout.DEDUP_KEY).drop_columns(["created_at"])
    return sorted(table.to_pylist(), key=lambda r: (r["shard_id"], r["item_id"]))


def files_of(layout: RunLayout) -> dict[str, tuple[int, bytes]]:
    return {obj.key: (obj.size, layout.storage.read_bytes(obj.key)) for obj in layout.storage.list("crawl/_dedup/")}


def expected_drops(rows: dict[str, np.ndarray], shards: dict[str, dict]) -> set[str]:
    representative = brute_force_waves(rows, K)
    item_ids = [f"item-{s}-{i}" for s, part in shards.items() for i in range(part["phash"].size)]
    return {item_ids[i] for i in np.flatnonzero(representative != np.arange(representative.size))}


@pytest.fixture(scope="module")
def wave_data():
    rows, shards, _ = sharded_waves(3000, num_waves=4, seed=21)
    return rows, shards


def test_run_dedup_decides_by_waves_and_reuses_them(tmp_path, wave_data):
    rows, shards = wave_data
    layout = run_with(tmp_path / "run", shards)
    first = run_dedup(layout, K, wave_shards=2)
    num_rows = rows["phash"].size
    assert (first.waves_computed, first.waves_reused, first.rows_read) == (4, 0, num_rows)
    drops = drop_rows(layout)
    assert {r["item_id"] for r in drops} == expected_drops(rows, shards)
    assert first.dropped_exact > 50 and first.dropped_near > 300
    assert first.kept + first.dropped_exact + first.dropped_near == num_rows
    waves = sorted(o.key for o in layout.storage.list(WAVES_PREFIX))
    assert waves == [f"{WAVES_PREFIX}0a1b2c3d-{k:06d}.parquet" for k in range(4)]

    before = files_of(layout)
    again = run_dedup(layout, K, wave_shards=2)
    assert (again.recomputed, again.fingerprint) == (False, first.fingerprint)
    assert files_of(layout) == before

    # A changed shard in wave 2: waves 0-1 are read back, waves 2-3 recomputed, and the result is
    # the one a fresh run gives.
    changed = dict(shards)
    victim = "0a1b2c3d-00005"
    changed[victim] = {name: column[:-10] for name, column in shards[victim].items()}
    commit_crawl_shard(layout, victim, changed[victim])
    rerun = run_dedup(layout, K, wave_shards=2)
    assert (rerun.waves_computed, rerun.waves_reused, rerun.incremental) == (2, 2, True)
    # Waves 0-1 were not searched again: their state came back from the persisted links.
    assert rerun.resumed
    assert rerun.rows_read == sum(p["phash"].size for s, p in changed.items() if wave_key(s, 2)[1] >= 2)
    for key in ("crawl/_dedup/waves/0a1b2c3d-000000.parquet", "crawl/_dedup/waves/0a1b2c3d-000001.parquet"):
        assert layout.storage.read_bytes(key) == before[key][1]
    fresh = run_with(tmp_path / "fresh", changed)
    from_scratch = run_dedup(fresh, K, wave_shards=2)
    assert drop_rows(layout) == drop_rows(fresh)
    assert (rerun.kept, rerun.dropped_exact, rerun.dropped_near) == (
        from_scratch.kept,
        from_scratch.dropped_exact,
        from_scratch.dropped_near,
    )

    # A wave whose shards are all gone: its file is deleted, and the waves after it recomputed.
    for shard_id in ("0a1b2c3d-00006", "0a1b2c3d-00007"):
        layout.storage.delete(layout.manifest_key("crawl", shard_id))
    shrunk = run_dedup(layout, K, wave_shards=2)
    assert (shrunk.waves_computed, shrunk.waves_reused) == (0, 3)
    assert sorted(o.key for o in layout.storage.list(WAVES_PREFIX))[-1].endswith("0a1b2c3d-000002.parquet")
    assert len(layout.storage.list(WAVES_PREFIX)) == 3


def test_a_source_added_later_is_decided_against_the_old_waves(tmp_path, wave_data):
    rows, shards = wave_data
    layout = run_with(tmp_path / "run", shards)
    run_dedup(layout, K, wave_shards=2)
    old_drops = drop_rows(layout)
    old_files = {o.key: layout.storage.read_bytes(o.key) for o in layout.storage.list(WAVES_PREFIX)}
    # The new source's prefix sorts first, and its images are larger copies of kept old ones.
    kept = np.flatnonzero(brute_force_waves(rows, K) == np.arange(rows["phash"].size))[:40]
    new = {name: column[kept].copy() for name, column in rows.items()}
    new["digest"] = np.arange(10**6, 10**6 + kept.size)
    new["pixels"] *= 100
    commit_crawl_shard(layout, "00000000-00000", new)
    later = run_dedup(layout, K, wave_shards=2)
    assert (later.waves_computed, later.waves_reused) == (1, 4)
    assert {o.key: layout.storage.read_bytes(o.key) for o in layout.storage.list(WAVES_PREFIX)}.items() >= (
        old_files.items()
    )
    drops = drop_rows(layout)
    assert [r for r in drops if not r["shard_id"].startswith("00000000")] == old_drops
    assert {r["item_id"] for r in drops if r["shard_id"].startswith("00000000")} == {
        f"item-00000000-00000-{i}" for i in range(kept.size)
    }


def test_streaming_decisions_equal_the_stage_by_stage_run(tmp_path, wave_data):
    rows, shards = wave_data
    streamed = RunLayout(Storage(str(tmp_path / "streamed")))
    by_wave: dict[tuple[str, int], list[str]] = {}
    for shard_id, part in shards.items():
        commit_crawl_shard(streamed, shard_id, part)
        by_wave.setdefault(wave_key(shard_id, 2), []).append(shard_id)
    gate = WaveDedup(streamed, K, wave_shards=2)
    assert gate.decide([]) == {}
    with pytest.raises(ValueError, match="one wave at a time"):
        gate.decide(["0a1b2c3d-00001", "0a1b2c3d-00002"])
    with pytest.raises(ValueError, match="undecided wave"):
        gate.decide(by_wave[("0a1b2c3d", 1)])
    decided: dict[str, tuple[str, ...]] = {}
    for key in sorted(by_wave):
        decided.update(gate.decide(by_wave[key]))
    assert set(decided) == set(shards)
    assert {i for ids in decided.values() for i in ids} == expected_drops(rows, shards)
    assert all(list(ids) == sorted(ids) for ids in decided.values())

    # A new process finds the waves persisted and answers from them; run_dedup only writes the drops.
    again = WaveDedup(streamed, K, wave_shards=2)
    assert again.decide(by_wave[("0a1b2c3d", 2)]) == {s: decided[s] for s in by_wave[("0a1b2c3d", 2)]}
    outcome = run_dedup(streamed, K, wave_shards=2)
    assert (outcome.waves_computed, outcome.waves_reused, outcome.rows_read) == (0, 4, 0)
    staged_drops = fresh_run_drops(tmp_path / "staged", shards)
    assert drop_rows(streamed) == staged_drops
    assert streamed.dropped_item_ids() == {r["item_id"] for r in staged_drops}


def test_digest_groups_are_exact_even_when_first_words_collide():
    words = np.array([[7, 1, 2, 3], [7, 1, 2, 4], [7, 1, 2, 3], [5, 0, 0, 0]], np.uint64)
    group, first = digest_groups(words)
    assert group[0] == group[2] and len({group[0], group[1], group[3]}) == 3
    assert sorted(first.tolist()) == [0, 1, 3]


def test_sha256_hex_becomes_its_32_bytes_and_other_text_still_groups():
    digest = bytes(range(32))
    words = sha_words(pa.array([digest.hex(), digest.hex().upper()]))
    assert words.tobytes() == digest * 2
    odd = sha_words(pa.array(["a", "b", "a"]))
    assert odd.shape == (3, 4) and np.array_equal(odd[0], odd[2]) and not np.array_equal(odd[0], odd[1])


def test_a_run_without_committed_crawl_shards_has_an_empty_drop_table(tmp_path):
    layout = RunLayout(Storage(str(tmp_path / "run")))
    outcome = run_dedup(layout, K, wave_shards=2)
    assert (outcome.kept, outcome.dropped_exact, outcome.dropped_near, outcome.waves_computed) == (0, 0, 0, 0)
    assert layout.storage.read_parquet(layout.DEDUP_KEY).num_rows == 0
    assert layout.dropped_item_ids() == set()
    assert WaveDedup(layout, K, wave_shards=2).decide([]) == {}


def test_increments_rebuild_the_decided_waves_from_their_links_and_match_a_fresh_run(tmp_path):
    """Shards arrive in three increments; each run_dedup rebuilds the earlier waves from the links
    file (no pair search over them) and decides only the new waves. A links file that does not fit
    (unreadable, or of another chain) is ignored and everything recomputed, with the same result."""
    rows, shards, ids = sharded_waves(4000, num_waves=6, seed=33)
    layout = RunLayout(Storage(str(tmp_path / "run")))
    outcomes = []
    for part in (ids[:4], ids[4:9], ids[9:]):  # the second increment also completes wave 2
        for shard_id in part:
            commit_crawl_shard(layout, shard_id, shards[shard_id])
        outcomes.append(run_dedup(layout, K, wave_shards=2))
    assert [o.resumed for o in outcomes] == [False, True, True]
    assert [(o.waves_computed, o.waves_reused) for o in outcomes] == [(2, 0), (3, 2), (2, 4)]
    assert {r["item_id"] for r in drop_rows(layout)} == expected_drops(rows, shards)

    assert drop_rows(layout) == fresh_run_drops(tmp_path / "fresh", shards)

    # Damaged links: ignored with a warning, every wave searched again; the same drops.
    links_key = "crawl/_dedup/links.parquet"
    layout.storage.write_bytes_atomic(links_key, layout.storage.read_bytes(links_key)[:100])
    victim = ids[-1]
    commit_crawl_shard(layout, victim, {name: column[:-5] for name, column in shards[victim].items()})
    damaged = run_dedup(layout, K, wave_shards=2)
    assert (damaged.resumed, damaged.waves_computed) == (False, 1)
    changed = {**shards, victim: {name: column[:-5] for name, column in shards[victim].items()}}
    assert drop_rows(layout) == fresh_run_drops(tmp_path / "again", changed)


def test_a_restarted_streaming_gate_rebuilds_decided_waves_from_their_links(tmp_path, caplog):
    """run_dedup decided waves 0-1 (and wrote their links); more shards commit and a new gate
    process decides waves 2-3 one by one: it rebuilds 0-1 from the links, and its drops equal a
    stage-by-stage run over all shards."""
    rows, shards, ids = sharded_waves(3000, num_waves=4, seed=44)
    layout = run_with(tmp_path / "run", shards, ids[:4])
    run_dedup(layout, K, wave_shards=2)
    for shard_id in ids[4:]:
        commit_crawl_shard(layout, shard_id, shards[shard_id])
    gate = WaveDedup(layout, K, wave_shards=2)
    with caplog.at_level("INFO", logger="ps3_engine.pipeline.dedup"):
        decided = {**gate.decide(ids[4:6]), **gate.decide(ids[6:])}
    assert "2 persisted waves" in caplog.text and "rebuilt from their links" in caplog.text
    assert {i for s in ids[4:] for i in decided[s]} == {
        i for i in expected_drops(rows, shards) if i.rsplit("-", 1)[0] in {f"item-{s}" for s in ids[4:]}
    }
    run_dedup(layout, K, wave_shards=2)
    assert drop_rows(layout) == fresh_run_drops(tmp_path / "staged", shards)


def test_links_persisted_by_the_streaming_gate_serve_the_next_increment(tmp_path):
    """The gate decides waves 0-2 and persists their links at the end of its run; one more wave of
    shards commits and run_dedup rebuilds 0-2 from the links instead of searching their pairs, with
    the drops of a fresh stage-by-stage run."""
    _, shards, ids = sharded_waves(3000, num_waves=4, seed=55)
    layout = run_with(tmp_path / "run", shards, ids[:6])
    gate = WaveDedup(layout, K, wave_shards=2)
    gate.persist_links()  # nothing decided yet: nothing written
    assert not layout.storage.exists("crawl/_dedup/links.parquet")
    for start in (0, 2, 4):
        gate.decide(ids[start : start + 2])
    gate.persist_links()
    for shard_id in ids[6:]:
        commit_crawl_shard(layout, shard_id, shards[shard_id])
    outcome = run_dedup(layout, K, wave_shards=2)
    assert (outcome.resumed, outcome.waves_computed, outcome.waves_reused) == (True, 1, 3)
    assert drop_rows(layout) == fresh_run_drops(tmp_path / "fresh", shards)
