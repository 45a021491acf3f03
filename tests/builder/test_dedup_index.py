"""The partitioned dedup index against a brute-force oracle, and its idempotency rules."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import pytest

from builder.dedup import (NEAR_START_SLOTS, ClaimTable, DedupItem, DedupPartition, KeyScheme,
                           LocalPartitions, Multimap, _skewed, _slot, claim_of)
from builder.hashing import hamming
from builder.similarity import near_distance
from builder.reasons import Reason


def run(coro):
    return asyncio.run(coro)


def flip(rnd: random.Random, value: int, n: int) -> int:
    """``value`` with up to ``n`` random bits flipped (a bit drawn twice flips back)."""
    for _ in range(n):
        value ^= 1 << rnd.randrange(64)
    return value


def test_multimap_keeps_every_row_of_a_key_through_growth():
    m = Multimap(16)
    rnd = np.random.default_rng(1)
    keys = rnd.integers(1, 2**63, size=3000, dtype=np.uint64)
    keys[::3] = keys[0]  # one key with 1000 rows
    for start in range(0, 3000, 500):
        m.make_room(500, lambda: np.ones(3000, dtype=bool))
        m.insert(keys[start:start + 500], np.arange(start, start + 500))
    q, rows = m.lookup(np.array([keys[0], keys[1], 12345], dtype=np.uint64))
    assert sorted(rows[q == 0].tolist()) == list(range(0, 3000, 3))
    assert rows[q == 1].tolist() == [1] and not (q == 2).any()


def test_multimap_makes_room_past_half_full_and_reads_the_live_rows_only_then():
    m = Multimap(16)
    asked = []

    def alive() -> np.ndarray:
        asked.append(1)
        return np.ones(20, dtype=bool)

    assert not m.make_room(8, alive) and not asked  # 8 keys fill 16 slots half: room
    m.insert(np.arange(1, 9, dtype=np.uint64) * 7919, np.arange(8))
    assert m.make_room(1, alive) and asked == [1]
    assert m.capacity == 32 and m.count == 8  # twice the 9 keys it then holds, a power of 2


def _home(key: int, capacity: int) -> int:
    return int(_slot(np.array([key], np.uint64), np.uint64(capacity - 1))[0])


def _probe_by_slot(batches: list[tuple[list[int], list[int]]], capacity: int
                   ) -> tuple[list[int], list[int]]:
    """The table a slot-by-slot probe builds: every batch's keys step together from their
    home slots; a free slot goes to the first key to reach it, of keys reaching it together to
    the last one given."""
    table, table_rows = [0] * capacity, [0] * capacity
    for keys, rows in batches:
        pos = [_home(k, capacity) for k in keys]
        pending = list(range(len(keys)))
        while pending:
            claims = {pos[i]: i for i in pending if table[pos[i]] == 0}
            for slot, i in claims.items():
                table[slot], table_rows[slot] = keys[i], rows[i]
            pending = [i for i in pending if claims.get(pos[i]) != i]
            for i in pending:
                pos[i] = (pos[i] + 1) % capacity
    return table, table_rows


def _lookup_by_slot(table: list[int], table_rows: list[int], queries: list[int]
                    ) -> list[tuple[int, int]]:
    """(query, row) pairs in the order a slot-by-slot probe meets them: by distance from the
    home slot, then by query."""
    found = []
    for q, key in enumerate(queries):
        slot, dist = _home(key, len(table)), 0
        while table[slot]:
            if table[slot] == key:
                found.append((dist, q, table_rows[slot]))
            slot, dist = (slot + 1) % len(table), dist + 1
    return [(q, row) for _, q, row in sorted(found)]


@pytest.mark.parametrize("capacity,batch,distinct", [(16, 8, 3), (64, 5, 10), (256, 40, 30),
                                                     (1024, 500, 400), (16384, 6000, 2000)])
def test_multimap_places_and_finds_rows_as_a_slot_by_slot_probe(capacity, batch, distinct):
    """Windowed passes (small batches and lookups) and one-slot passes (big batches) put every
    row where probing one slot at a time would, and report matches in its order, also where
    runs of slots wrap round the end of the table."""
    rnd = np.random.default_rng(capacity)
    pool = rnd.integers(1, 2**63, size=distinct, dtype=np.uint64)
    keys = pool[rnd.integers(0, distinct, size=capacity // 2)]
    m = Multimap(capacity)
    batches = []
    for start in range(0, len(keys), batch):
        chunk = keys[start:start + batch]
        rows = np.arange(start, start + len(chunk))
        m.insert(chunk, rows)
        batches.append(([int(k) for k in chunk], rows.tolist()))
    table, table_rows = _probe_by_slot(batches, capacity)
    assert m.keys.tolist() == table
    assert m.rows[m.keys != 0].tolist() == [r for k, r in zip(table, table_rows) if k]
    queries = np.concatenate([pool, rnd.integers(1, 2**63, size=20, dtype=np.uint64)])
    q, rows = m.lookup(queries)
    assert list(zip(q.tolist(), rows.tolist())) == _lookup_by_slot(
        table, table_rows, [int(k) for k in queries])


@pytest.mark.parametrize("capacity,n,distinct,tail", [
    (16, 8, 1, False), (64, 32, 2, True), (1024, 512, 3, False), (1024, 500, 60, True),
    (4096, 2048, 2048, True), (8192, 3000, 10, True)])
def test_multimap_fills_an_empty_table_as_a_slot_by_slot_probe(capacity, n, distinct, tail):
    """An insert into an empty table (every rebuild's) with popular keys places them all at
    once: where stepping one slot at a time would, for popular keys (long runs of one home)
    and for runs that wrap round the end of the table (``tail``: homes in its last slots).
    Without popular keys it steps; the all-at-once fill still agrees."""
    rnd = np.random.default_rng(capacity + n + distinct)
    pool = rnd.integers(1, 2**63, size=8 * distinct + 64, dtype=np.uint64)
    if tail:
        homes = _slot(pool, np.uint64(capacity - 1)).astype(np.int64)
        pool = pool[np.argsort(-homes, kind="stable")]
    pool = pool[:distinct]
    weights = 1.0 / np.arange(1, distinct + 1) ** 1.2
    keys = pool[rnd.choice(distinct, size=n, p=weights / weights.sum())]
    m, filled = Multimap(capacity), Multimap(capacity)
    m.insert(keys, np.arange(n))
    filled._fill(keys, np.arange(n, dtype=np.int32))
    table, table_rows = _probe_by_slot([([int(k) for k in keys], list(range(n)))], capacity)
    for built in (m, filled):
        assert built.keys.tolist() == table
        assert built.rows[built.keys != 0].tolist() == [r for k, r in zip(table, table_rows)
                                                        if k]
    alive = rnd.random(n) < 0.7
    m.rebuild(capacity, alive)
    survivors = [(int(k), int(r)) for k, r in zip(table, table_rows) if k and alive[r]]
    table, table_rows = _probe_by_slot([([k for k, _ in survivors], [r for _, r in survivors])],
                                       capacity)
    assert m.keys.tolist() == table and m.count == len(survivors)
    assert m.rows[m.keys != 0].tolist() == [r for k, r in zip(table, table_rows) if k]


def test_an_empty_table_is_filled_at_once_only_where_keys_repeat():
    """The all-at-once fill is chosen for batches whose keys repeat enough to make stepping
    slow, judged on a sample of the batch."""
    rnd = np.random.default_rng(3)
    distinct = rnd.integers(1, 2**63, size=200_000, dtype=np.uint64)
    assert not _skewed(distinct)
    assert not _skewed(distinct[rnd.integers(0, 200_000, size=200_000)])
    assert _skewed(distinct[rnd.integers(0, 2_000, size=200_000)])
    assert _skewed(np.concatenate([distinct, np.full(2_000, distinct[0])]))


@pytest.mark.parametrize("crowded", [False, True])
def test_claim_table_matches_a_dict_through_claims_kills_and_growth(crowded):
    """Random batches of claims, re-claims and kills against a dict; ``crowded``: keys share
    a few home slots (long runs that wrap past the table's end, and meet in one batch)."""
    rnd = np.random.default_rng(7)
    table, oracle = ClaimTable(16), {}
    pool = rnd.integers(1, 2**64 - 1, 600 if not crowded else 200_000, dtype=np.uint64)
    if crowded:  # homes in the last two and first two slots at every capacity up to 1024
        home = _slot(pool, np.uint64(1023)).astype(np.int64)
        pool = pool[(home >= 1022) | (home <= 1)][:600]
    pool = np.unique(pool)
    for step in range(120):
        keys = np.unique(rnd.choice(pool, size=int(rnd.integers(1, 40))))
        if step % 3 == 2:
            claims = np.array([oracle.get(int(k), (0, 0))[0] or 1 for k in keys], np.uint64)
            claims[::2] += np.uint64(1)  # half of them name the wrong holder: no effect
            table.kill(keys, claims)
            for k, c in zip(keys.tolist(), claims.tolist()):
                if oracle.get(k, (0, 0))[0] == c:
                    oracle[k] = (c, 0)
        else:
            claims = rnd.integers(1, 2**64 - 1, len(keys), dtype=np.uint64)
            state = int(rnd.integers(1, 4))
            table.put(keys, claims, state)
            oracle.update({k: (c, state) for k, c in zip(keys.tolist(), claims.tolist())})
        slots = table.find(pool)
        got = {int(k): (int(table.claims[s]), int(table.states[s]))
               for k, s in zip(pool, slots) if s >= 0}
        assert {k: v for k, v in got.items() if v[1]} == \
            {k: v for k, v in oracle.items() if v[1]}
        assert table.live == sum(1 for _, st in oracle.values() if st)
        assert table.used <= ClaimTable.LOAD * table.capacity
    assert table.capacity > 16


def test_pairs_within_t_share_their_designated_key():
    """Up to t=4 every pair within t meets at a key (pigeonhole); above, those the rule keeps
    (a shared chunk of each code in one cutting) do."""
    rnd = random.Random(5)
    for t in (0, 2, 4, 6, 8):
        scheme = KeyScheme(t)
        for _ in range(300):
            a, b = rnd.getrandbits(64), rnd.getrandbits(64)
            a2 = flip(rnd, a, rnd.randrange(t + 1))
            b2 = flip(rnd, b, rnd.randrange(t + 1))
            if hamming(a, a2) > t or hamming(b, b2) > t:
                continue
            k1, kidx = scheme.keys(np.array([a], np.uint64), np.array([b], np.uint64))
            k2, _ = scheme.keys(np.array([a2], np.uint64), np.array([b2], np.uint64))
            d = scheme.designated(np.array([a2], np.uint64), np.array([b2], np.uint64),
                                  np.array([a], np.uint64), np.array([b], np.uint64))[0]
            if t > 4 and d < 0:
                assert near_distance([(a2, b2)], [(a, b)], t) is None
                continue
            assert d >= 0 and k1[0, kidx == d][0] == k2[0, kidx == d][0]


def skewed_signatures(n: int, seed: int) -> list[tuple[int, int, int]]:
    """(id, a, b): real-image-like skew (many hashes share long prefixes) plus near copies."""
    rnd = random.Random(seed)
    bases = [(rnd.getrandbits(64), rnd.getrandbits(64)) for _ in range(40)]
    out = []
    for i in range(n):
        r = rnd.random()
        if out and r < 0.25:  # a near copy of something seen
            _, a, b = rnd.choice(out)
            flips = rnd.randrange(9)
        elif r < 0.6:  # a skewed hash: close to one of a few common layouts
            a, b = rnd.choice(bases)
            flips = 6 + rnd.randrange(14)
        else:
            a, b = rnd.getrandbits(64), rnd.getrandbits(64)
            flips = 0
        a, b = flip(rnd, a, flips), flip(rnd, b, flips // 2)
        if out and rnd.random() < 0.05:  # the same bytes again: same id, same signatures
            out.append(rnd.choice(out))
        else:
            out.append((rnd.getrandbits(64), a, b))
    return out


def oracle(items: list[tuple[int, int, int]], t: int, near: bool = True) -> list[str]:
    """Brute force over the kept images with the rule itself (builder.similarity)."""
    kept: list[tuple[int, int, int]] = []
    ids: set[int] = set()
    out = []
    for image_id, a, b in items:
        if image_id in ids:
            out.append("exact")
        elif near and any(near_distance([(a, b)], [(ka, kb)], t) is not None
                          for _, ka, kb in kept):
            out.append("near")
        else:
            out.append("kept")
            kept.append((image_id, a, b))
            ids.add(image_id)
    return out


@pytest.mark.parametrize("k,t,unit", [(1, 4, 1), (4, 4, 17), (3, 2, 64), (5, 6, 33),
                                      (2, 8, 20), (3, 0, 10), (2, 12, 7)])
def test_partitioned_index_decides_like_a_brute_force_oracle(k, t, unit):
    items = skewed_signatures(2500, seed=k * 100 + t)
    expected = oracle(items, t)
    assert decide_all(LocalPartitions(t, near=True, k=k).client(), items, unit) == expected
    assert expected.count("near") > (100 if t else 40) and expected.count("exact") > 20


def decide_all(client: Any, items: list[tuple[int, int, int]], unit: int) -> list[str]:
    """Each item's decision, the items decided and settled ``unit`` at a time, as a unit
    does: the held settled as dropped and decided again, until none is."""
    got: list[str] = []
    for start in range(0, len(items), unit):
        chunk = items[start:start + unit]
        batch = [DedupItem(claim_of(f"c{start + i}"), start + i, image_id, [(a, b)], [(a, b)])
                 for i, (image_id, a, b) in enumerate(chunk)]
        final: dict[int, Any] = {}
        while batch:
            decisions = run(client.decide(batch))
            keep = [not d.duplicate and not d.held for d in decisions]
            run(client.settle(batch, keep, [not k for k in keep]))
            final.update({it.token: d for it, d in zip(batch, decisions) if not d.held})
            batch = [it for it, d in zip(batch, decisions) if d.held]
        got += ["kept" if not final[start + i].duplicate else
                "exact" if final[start + i].reason == Reason.EXACT_DUPLICATE else "near"
                for i in range(len(chunk))]
    return got


def test_an_index_sized_for_its_signatures_files_them_without_growing():
    """The near table starts with room for the expected signatures' keys, so filing them
    re-files nothing; it decides as an index that grew its way up does."""
    items = skewed_signatures(3000, seed=11)
    sized = LocalPartitions(4, near=True, k=1, signatures=len(items))
    table = sized.partitions[0]._near
    keys, start = table.keys, table.capacity
    got = decide_all(sized.client(), items, 50)
    assert got == oracle(items, 4)
    assert table.keys is keys and table.capacity == start  # never rebuilt
    assert table.count > len(items) * KeyScheme(4).n_keys // 2
    grown = LocalPartitions(4, near=True, k=1)
    assert decide_all(grown.client(), items, 50) == got
    assert 1024 < grown.partitions[0]._near.capacity <= start


def test_the_first_size_is_a_share_capped_and_only_for_near_duplicates():
    assert DedupPartition(4, True, 10 ** 9)._near.capacity == NEAR_START_SLOTS
    assert DedupPartition(4, False, 10 ** 6)._near.capacity == 1024
    assert DedupPartition(4)._near.capacity == 1024
    share = DedupPartition(4, True, 1000)._near.capacity
    assert share >= 2 * 1000 * KeyScheme(4).n_keys
    assert [p._near.capacity for p in LocalPartitions(4, k=4, signatures=4000).partitions] == \
        [share] * 4


def test_a_retried_unit_is_not_a_duplicate_of_itself_and_sees_what_it_wrote():
    client = LocalPartitions(4, k=3).client()
    rnd = random.Random(2)
    sigs = [(rnd.getrandbits(64), rnd.getrandbits(64)) for _ in range(20)]
    batch = [DedupItem(claim_of(f"k{i}"), i, 1000 + i, [sigs[i]], [sigs[i]]) for i in range(20)]
    first = run(client.decide(batch))
    assert not any(d.duplicate for d in first)
    run(client.settle(batch, [True] * 20, [False] * 20))
    run(client.mark_written([it.image_id for it in batch[:5]], [it.claim for it in batch[:5]]))
    again = run(client.decide(batch))
    assert not any(d.duplicate for d in again)
    assert [d.written for d in again] == [True] * 5 + [False] * 15
    other = [DedupItem(claim_of("other"), 99, 1000, [(0, 0)], [(0, 0)])]
    assert run(client.decide(other))[0].reason == Reason.EXACT_DUPLICATE


def _items(prefix: str, sigs: list[tuple[int, int]], token0: int = 0) -> list[DedupItem]:
    return [DedupItem(claim_of(f"{prefix}{i}"), token0 + i, 1000 + i, [sig], [sig])
            for i, sig in enumerate(sigs)]


@pytest.mark.parametrize("k", [1, 3])
def test_settling_a_retry_also_settles_its_unsettled_first_attempt(k):
    """A unit checked, then lost before it settled, then retried and rejected: the first
    attempt's pending entries die with the retry's, so they do not make later copies
    duplicates of images that are not in the dataset."""
    client = LocalPartitions(4, k=k).client()
    rnd = random.Random(3)
    sigs = [(rnd.getrandbits(64), rnd.getrandbits(64)) for _ in range(10)]
    run(client.decide(_items("c", sigs)))  # the lost attempt: never settled
    retry = _items("c", sigs)  # the same candidates, issued again
    assert not any(d.duplicate for d in run(client.decide(retry)))
    assert all(len(it.filed[1]) > 1 for it in retry)  # its own rows and the lost attempt's
    run(client.settle(retry, [False] * 10, [True] * 10))
    copies = _items("n", [(a ^ 1, b) for a, b in sigs], token0=100)
    assert not any(d.duplicate for d in run(client.decide(copies)))


@pytest.mark.parametrize("k", [1, 3])
def test_a_resent_units_earlier_entries_die_unless_written(k):
    """A unit kept images, then was resent (its worker lost before it wrote them), and this
    time did not find them again (a fetch failed, the search changed): nothing settled their
    entries, and later copies of them, in any class, were rejected as duplicates of images
    the dataset never got. A resent unit drops its earlier attempt's entries first; what a
    shard holds (being written or written) and what the journal loaded stay."""
    from builder.units import POS_BITS

    parts = LocalPartitions(4, k=k)
    client = parts.client()
    rnd = random.Random(4)
    sigs = [(rnd.getrandbits(64), rnd.getrandbits(64)) for _ in range(6)]
    seq = 7
    kept = _items("k", sigs, token0=seq << POS_BITS)
    run(client.decide(kept))
    run(client.settle(kept, [True] * 6, [False] * 6))
    run(client.mark_written([kept[0].image_id], [kept[0].claim]))  # in a committed shard
    loaded = (42, claim_of("journal"), [(0xABCD, 0x1234)])
    for p, payload in enumerate(client.load_payloads([], [loaded])):
        parts.partitions[p].load(payload)
    run(client.drop_unit(seq))  # the resend starts; it finds none of them again
    later = 50 << POS_BITS
    copies = [DedupItem(claim_of(f"c{i}"), later + i, 5000 + i, [(a ^ 1, b)], [(a ^ 1, b)])
              for i, (a, b) in enumerate(sigs)]
    same_bytes = [DedupItem(claim_of(f"s{i}"), later + 10 + i, it.image_id, [], [])
                  for i, it in enumerate(kept)]
    journal_copy = [DedupItem(claim_of("j"), later + 20, 43, [(0xABCD ^ 1, 0x1234)],
                              [(0xABCD ^ 1, 0x1234)])]
    decisions = run(client.decide(copies + same_bytes + journal_copy))
    assert [d.duplicate for d in decisions] == \
        [True] + [False] * 5 + [True] + [False] * 5 + [True]
    assert decisions[0].kept_id == decisions[6].kept_id == f"{kept[0].image_id:016x}"


def test_a_resent_unit_keeps_the_signatures_of_what_it_wrote_after_a_partition_restart():
    """The partition holding a written image's exact entry was rebuilt from the journal (its
    node lost), where the entry has no unit: the resent unit's drop took the image for one
    it never wrote and killed its signatures in the other partitions, and a later
    near-duplicate of an image in the dataset was accepted. The unit names what the journal
    says it wrote."""
    from builder.dedup import mix64, partition_of
    from builder.units import POS_BITS

    for image_id in range(1000, 1040):  # one whose exact entry and signatures are apart
        if partition_of(mix64(np.array([image_id], np.uint64)), 3)[0] == 0:
            break
    parts = LocalPartitions(4, k=3)
    client = parts.client()
    sig = (0x0123456789ABCDEF, 0xFEDCBA9876543210)
    seq = 7
    item = DedupItem(claim_of("w"), seq << POS_BITS, image_id, [sig], [sig])
    run(client.decide([item]))
    run(client.settle([item], [True], [False]))
    run(client.mark_written([image_id], [item.claim]))
    parts.partitions[0] = DedupPartition(4)  # its node lost: rebuilt from the journal
    parts.partitions[0].load(client.load_payloads([], [(image_id, item.claim, [sig])],
                                                  only=0)[0])
    run(client.drop_unit(seq, [image_id]))  # the resend restored it from the journal
    copy = (sig[0] ^ 0b111, sig[1])
    later = DedupItem(claim_of("c"), 50 << POS_BITS, 77, [copy], [copy])
    assert run(client.decide([later]))[0].reason == Reason.NEAR_DUPLICATE


def test_settle_leaves_alone_rows_a_restarted_partition_gave_to_others():
    """Rows named by a check belong to that partition's incarnation: settling them against a
    partition rebuilt from the journal touches no other candidate's entries."""
    parts = LocalPartitions(4, k=1)
    client = parts.client()
    item = _items("a", [(0xF0F0, 0x0F)])
    run(client.decide(item))
    assert item[0].filed[1].tolist() == [0]
    parts.partitions[0] = DedupPartition(4)  # restarted: it holds the written image only
    for payload in client.load_payloads([], [(7, claim_of("w"), [(0xF0F0, 0x0F)])]):
        parts.partitions[0].load(payload)
    run(client.settle(item, [False], [True]))
    newcomer = DedupItem(claim_of("n"), 9, 9, [(0xF0F1, 0x0F)], [(0xF0F1, 0x0F)])
    assert run(client.decide([newcomer]))[0].reason == Reason.NEAR_DUPLICATE


def test_pending_entries_count_only_against_later_issued_items():
    client = LocalPartitions(4, k=2).client()
    early = DedupItem(claim_of("early"), 1, 1, [(0xABCDEF, 0x123)], [(0xABCDEF, 0x123)])
    late = DedupItem(claim_of("late"), 2, 2, [(0xABCDEF ^ 1, 0x123)], [(0xABCDEF ^ 1, 0x123)])
    # the later-issued unit reaches the index first; the earlier one is not its duplicate
    assert not run(client.decide([late]))[0].duplicate
    assert not run(client.decide([early]))[0].duplicate
    # once the later one is decided and kept, everything after sees it
    run(client.settle([late], [True], [False]))
    third = DedupItem(claim_of("third"), 0, 3, [(0xABCDEF ^ 2, 0x123)], [(0xABCDEF ^ 2, 0x123)])
    assert run(client.decide([third]))[0].reason == Reason.NEAR_DUPLICATE


def _one(name: str, token: int, image_id: int, sig: tuple[int, int]) -> DedupItem:
    return DedupItem(claim_of(name), token, image_id, [sig], [sig])


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("holder_kept", [False, True])
@pytest.mark.parametrize("same_bytes", [True, False])
def test_a_copy_of_an_undecided_image_waits_for_it(k, holder_kept, same_bytes):
    """A copy decided while the first is undecided (its unit between its check and its
    settle, where a later stage may refuse it) was rejected at once: were the first then
    refused, neither was kept. It is held instead, whichever unit was issued first, and
    decided again once the first is settled: a duplicate of it if kept, kept if not."""
    client = LocalPartitions(4, k=k).client()
    sig = (0xF0F0F0F0, 0x0F0F)
    first = _one("unit2\nA", 2, 0x1234, sig)
    copy = _one("unit1\nB", 1, 0x1234 if same_bytes else 0x5678,
                sig if same_bytes else (sig[0] ^ 0b11, sig[1]))
    if not same_bytes:  # a near pending entry holds only items issued after it
        first, copy = _one("unit1\nA", 1, 0x1234, sig), _one("unit2\nB", 2, 0x5678,
                                                            copy.stored[0])
    assert not run(client.decide([first]))[0].duplicate
    (held,) = run(client.decide([copy]))
    reason = Reason.EXACT_DUPLICATE if same_bytes else Reason.NEAR_DUPLICATE
    assert held.held and not held.duplicate and held.reason == reason
    run(client.settle([copy], [False], [True]))
    run(client.settle([first], [holder_kept], [not holder_kept]))
    (again,) = run(client.decide([copy]))
    assert not again.held and again.duplicate == holder_kept
    assert again.reason == (reason if holder_kept else None)


def test_a_copy_of_a_duplicate_not_yet_settled_is_not_its_duplicate():
    """B, a near duplicate of kept A, keeps its signatures filed until its unit settles; C,
    near B but not A, was rejected against B, which is never kept: it waits for B instead,
    then is kept."""
    client = LocalPartitions(4, k=2).client()
    s = (0x0123456789ABCDEF, 0xFEDCBA9876543210)
    a = _one("unitA\nk", 1, 0xA, s)
    run(client.decide([a]))
    run(client.settle([a], [True], [False]))
    b = _one("unitB\nk", 2, 0xB, (s[0] ^ 0b111, s[1]))                   # 3 bits from A
    c = _one("unitC\nk", 3, 0xC, (s[0] ^ (0b111 << 60) ^ 0b111, s[1]))   # 3 from B, 6 from A
    (db,) = run(client.decide([b]))
    assert db.duplicate and db.reason == Reason.NEAR_DUPLICATE
    (dc,) = run(client.decide([c]))
    assert dc.held and dc.kept_id == f"{0xB:016x}"
    run(client.settle([b], [False], [True]))
    run(client.settle([c], [False], [True]))
    assert not run(client.decide([c]))[0].duplicate


def test_a_copy_of_an_image_its_own_unit_keeps_waits_for_that_units_later_stages():
    """Within one unit the first copy is kept at the check and its later copies were
    rejected against it at once; a later stage of the unit (the slow level, the grant) may
    refuse the first, so they wait for its settle."""
    client = LocalPartitions(4, k=2).client()
    sig = (0xAAAA5555, 0x1234)
    first, same, near = (_one("u\n1", 10, 0x1, sig), _one("u\n2", 11, 0x1, sig),
                         _one("u\n3", 12, 0x3, (sig[0] ^ 1, sig[1])))
    decisions = run(client.decide([first, same, near]))
    assert not decisions[0].duplicate and not decisions[0].held
    assert [(d.held, d.reason) for d in decisions[1:]] == [
        (True, Reason.EXACT_DUPLICATE), (True, Reason.NEAR_DUPLICATE)]
    run(client.settle([first, same, near], [False, False, False], [True, True, True]))
    again = run(client.decide([same, near]))
    assert not again[0].duplicate and not again[0].held  # the first was refused: kept
    assert again[1].held and again[1].reason == Reason.NEAR_DUPLICATE  # waits on the new one


def test_released_images_and_urls_are_forgotten():
    parts = LocalPartitions(4, k=2)
    client = parts.client()
    item = DedupItem(claim_of("a"), 1, 7, [(5, 5)], [(5, 5)])
    run(client.decide([item]))
    run(client.settle([item], [False], [True]))
    newcomer = DedupItem(claim_of("b"), 2, 7, [(5, 5)], [(5, 5)])
    assert not run(client.decide([newcomer]))[0].duplicate
    assert run(client.check_urls([claim_of("x")], [42])) == [(0, False)]
    assert run(client.check_urls([claim_of("y")], [42])) == [(claim_of("x"), False)]
    run(client.release_urls([claim_of("x")], [42]))
    assert run(client.check_urls([claim_of("y")], [42])) == [(0, False)]


def test_load_restores_written_images_urls_and_signatures():
    parts = LocalPartitions(4, k=3)
    client = parts.client()
    for p, payload in enumerate(client.load_payloads([(42, claim_of("u"))],
                                                     [(7, claim_of("w"), [(0xF0F0, 0x0F)])])):
        parts.partitions[p].load(payload)
    near = DedupItem(claim_of("n"), 5, 8, [(0xF0F1, 0x0F)], [(0xF0F1, 0x0F)])
    exact = DedupItem(claim_of("e"), 6, 7, [(1, 1)], [(1, 1)])
    again = DedupItem(claim_of("w"), 7, 7, [(0xF0F0, 0x0F)], [(0xF0F0, 0x0F)])
    d = run(client.decide([near, exact, again]))
    assert d[0].reason == Reason.NEAR_DUPLICATE and d[1].reason == Reason.EXACT_DUPLICATE
    assert d[2].written
    assert run(client.check_urls([claim_of("v")], [42])) == [(claim_of("u"), False)]
    stats = [p.stats() for p in parts.partitions]
    # the written image, and the near item's pending claim (the exact copy filed nothing)
    assert sum(s["images"] for s in stats) == 2 and sum(s["urls"] for s in stats) == 1


@pytest.mark.parametrize("done", [False, True])
def test_a_recovering_partition_builds_its_own_payload_alone(done):
    """A partition that recovers reads the whole journal; ``only`` gives it what the full
    split would have given it, and nothing for the others."""
    rng = random.Random(5)
    client = LocalPartitions(4, k=3).client()
    urls = [(rng.getrandbits(64), claim_of(f"u{i}")) for i in range(40)]
    written = [(rng.getrandbits(63), claim_of(f"w{i}"),
                [(rng.getrandbits(64), rng.getrandbits(64)) for _ in range(3)])
               for i in range(40)]
    full = client.load_payloads(urls, written, done=done)
    assert all(len(payload["u_hash"]) and len(payload["n_key"]) for payload in full)
    for p in range(3):
        alone = client.load_payloads(urls, written, done=done, only=p)
        assert [q for q, payload in enumerate(alone) if payload] == [p]
        assert alone[p].keys() == full[p].keys()
        for name, values in full[p].items():
            assert np.array_equal(alone[p][name], values), name


def test_urls_decided_by_an_earlier_run_are_not_new_candidates():
    parts = LocalPartitions(4, k=2)
    client = parts.client()
    for p, payload in enumerate(client.load_payloads([(42, claim_of("key-a"))], [], done=True)):
        parts.partitions[p].load(payload)
    # the same candidate (same key) in this run: decided already
    assert run(client.check_urls([claim_of("unit\nkey-a")], [42], [claim_of("key-a")])) \
        == [(0, True)]
    # another candidate with that URL: a duplicate URL
    assert run(client.check_urls([claim_of("unit\nkey-b")], [42], [claim_of("key-b")])) \
        == [(claim_of("key-a"), False)]
