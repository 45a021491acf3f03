"""The job-wide duplicate index, partitioned so its cost per decision stays flat at any size.

Three kinds of entry, each spread over ``K`` partitions by a hash of its key:

* **URL claims** (normalised URL -> the candidate that first took it up): ``duplicate_url``;
* **exact claims** (image id, the first 64 bits of sha256 -> the candidate that holds it):
  ``exact_duplicate``. One partition owns an id, so two copies of the same bytes are decided in
  the order they reach it, whichever workers hold them;
* **near signatures**: each image stores a few signatures, each a pair of 64-bit codes
  ``(a, b)`` (its pHash and dHash today), and probes with a few more (``builder.hashing``). A
  newcomer is a near duplicate of a kept image when some probe signature and some stored
  signature are within ``t`` bits on ``a`` AND within ``t`` bits on ``b``.

Near lookups use multi-index hashing on both codes: cut ``a`` and ``b`` into ``t + 1`` chunks
each. By the pigeonhole principle two signatures within ``t`` bits on both codes agree exactly
on some chunk ``i`` of ``a`` and some chunk ``j`` of ``b``, so they share the key ``(i, j,
a_i, b_j)``. Above ``t`` = 4 the keys would get too narrow for flat lookups, so they keep the
width of ``t`` = 4 (about 26 bits) in two cuttings of the codes, and the near-duplicate rule
asks for that shared key (``KeyScheme``, ``builder.similarity``). A bucket then holds about one
entry at 10M kept images, and a lookup costs the same at 100k and at 10M. Keys are spread
over the partitions, and each partition keeps its keys in a numpy open-addressing table: a
batch of lookups is a handful of vectorised passes, not a Python loop.

**Deciding.** A unit of work (a shard) sends each partition one ``check`` call with its items
in order; the partition reports what each probe meets and files the item's own signatures, in
one step. A pair of near duplicates meets in several buckets; it is counted in exactly one of
them, the *designated* one (the first ``(i, j)`` where both chunks agree), so the pair is judged
in one place, in the order its two items reached that partition. The client
(``DedupClient.decide``) then decides each item in order: a duplicate of a kept image; *held*
where it would be the duplicate of an undecided image only (an earlier kept item of the same
unit, another unit's pending exact entry, or a near one of a unit issued earlier, its token
smaller), which a later stage of its unit may still refuse; else kept. Rejected and held
items are released and accepted ones marked kept (``settle``), so later lookups see the final
state; a held item is decided again once its image is settled, and so is a duplicate of it,
never of an image the dataset does not get (``builder.worker``). ``settle`` names the entries
by the rows ``check`` filed them in (a few per item, not a lookup of each of its keys), and by
the rows of the candidate's earlier, unsettled attempts that its probes met (a candidate
probes with its stored signatures too, ``builder.hashing``). Fed one unit at a time this
gives exactly the decisions of a single brute-force index (tested against one). Two near
duplicates decided at the same moment on different workers may, rarely, both be kept, and so
may a held item and a near copy of it a later-issued unit decides while it waits (its entries
are dropped then: kept, they would let held items of several units hold each other); an image
is never lost to such a race, because a pending entry only holds later-issued items.

**Idempotent.** Every entry carries the claim (a hash of the candidate's key) of the candidate
that made it. A retried unit meets its own entries and is not a duplicate of itself; an image
already written by an earlier attempt is reported as such (``state`` WRITTEN), so the retry
never writes it twice.

**Removal** is O(1): an entry is marked dead; tables are rebuilt (dead entries dropped) when
they grow. **Recovery**: a partition is rebuilt from the journal's records of written images
and decided URLs (``load``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from builder.reasons import Reason
from builder.units import POS_BITS

U64 = np.uint64

PENDING, KEPT, WRITTEN, WRITING, DONE = 1, 2, 3, 4, 5
"""Entry states (0 is a dead entry). PENDING: filed by a check, not yet decided; KEPT: its
unit accepted it; WRITING: a shard holding it is being written (``ref`` names the shard);
WRITTEN: it is in a committed shard of the output; DONE (URLs only): decided by an earlier run
whose dataset this run continues, held by the candidate key's own claim."""

MAX_RELATIONS = 8
"""Near matches reported per probed item (the closest ones)."""
NEAR_START_SLOTS = 1 << 23
"""The most slots a partition's near-duplicate table starts with: 96 MiB (8-byte keys, 4-byte
rows), room for the keys of 20,000 images at the default threshold. Past it the table grows as
it fills."""
KEY_T = 4
"""The widest threshold whose keys every pair within it shares (pigeonhole); above it the
keys stay this wide (see ``KeyScheme``)."""
KEY_SPLITS = 2
"""Cuttings of the codes into chunks above ``KEY_T``: the contiguous one and a shuffled one."""
KEY_SEED = 0x5EED_D0D6
"""Seed of the shuffled cutting: fixed, so every process computes the same keys."""


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of each element (uint64 in, uint64 out): a cheap, well-spread hash."""
    x = np.asarray(x, dtype=U64) + U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> U64(27))) * U64(0x94D049BB133111EB)
    return x ^ (x >> U64(31))


def claim_of(key: str) -> int:
    """The 64-bit claim of a candidate key (its identity in the index): a candidate key's 16
    hex digits read as a number (so ``claim_text`` gives the key back), else a hash."""
    if len(key) == 16:
        try:
            return int(key, 16) or 1
        except ValueError:
            pass
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") or 1


def claim_text(claim: int) -> str:
    return f"{claim:016x}"


def url_hash(norm_url: str) -> int:
    """The 64-bit key of a normalised URL."""
    return int.from_bytes(hashlib.blake2b(norm_url.encode(), digest_size=8,
                                          person=b"url").digest(), "big") or 1


def id_number(image_id: str) -> int:
    """An image id (16 hex digits) as its 64-bit number."""
    return int(image_id[:16], 16)


def id_text(number: int) -> str:
    return f"{number:016x}"


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(x, dtype=U64)).astype(np.int64)


def _chunk_masks(n: int, permutation: Optional[np.ndarray]) -> np.ndarray:
    """``n`` bit masks cutting 64 bit positions into ``n`` near-equal groups: contiguous, or
    over ``permutation`` (a fixed shuffle of the positions)."""
    positions = np.arange(64) if permutation is None else permutation
    bounds = [round(i * 64 / n) for i in range(n + 1)]
    masks = []
    for i in range(n):
        m = 0
        for pos in positions[bounds[i]:bounds[i + 1]]:
            m |= 1 << int(63 - pos)
        masks.append(m)
    return np.array(masks, dtype=U64)


class KeyScheme:
    """The bucket keys of signatures for threshold ``t``, and which key a pair meets at.

    Both codes are cut into ``c = min(t, KEY_T) + 1`` chunks; a key is one chunk of ``a`` and
    one of ``b`` (``c^2`` keys), once per *cutting* (``splits``: the contiguous one, and for
    ``t`` above ``KEY_T`` a second over a fixed shuffle of the bit positions). Up to ``KEY_T``
    the pigeonhole principle makes every pair within ``t`` share a key, so the index finds
    exactly the pairs within ``t``. Above it, the near-duplicate rule itself asks for a shared
    key (``builder.similarity``): within ``t`` bits on both codes *and* agreeing on a chunk of
    each in one cutting. Keys stay about 26 bits wide whatever ``t``, so lookups stay flat; on
    real photographs the key condition costs up to 2 points of recall at ``t`` = 8
    (bench/README.md).
    """

    def __init__(self, t: int):
        if not 0 <= t <= 64:
            raise ValueError(f"threshold must be in 0..64, got {t}")
        self.t = t
        self.n_chunks = min(t, KEY_T) + 1
        self.splits = 1 if t <= KEY_T else KEY_SPLITS
        rng = np.random.default_rng(KEY_SEED)
        perms = [None] + [rng.permutation(64) for _ in range(self.splits - 1)]
        self._masks = [_chunk_masks(self.n_chunks, perm) for perm in perms]
        self.n_keys = self.splits * self.n_chunks * self.n_chunks

    @property
    def exact(self) -> bool:
        """Whether every pair within ``t`` shares a key (the keyed condition adds nothing)."""
        return self.t <= KEY_T

    def keys(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([n, n_keys] nonzero uint64 keys, [n_keys] key index) of signatures ``(a, b)``."""
        a = np.asarray(a, dtype=U64)[:, None]
        b = np.asarray(b, dtype=U64)[:, None]
        n = self.n_chunks
        ia = np.repeat(np.arange(n), n)
        jb = np.tile(np.arange(n), n)
        out, kidx = [], []
        for split, masks in enumerate(self._masks):
            ca, cb = a & masks[None, :], b & masks[None, :]
            k = split * n * n + ia * n + jb
            out.append(mix64(ca[:, ia] * U64(0x100000001B3) ^ mix64(cb[:, jb]) ^
                             mix64(k.astype(U64) + U64(0xA5A5))))
            kidx.append(k)
        return np.concatenate(out, axis=1) | U64(1), np.concatenate(kidx).astype(np.int64)

    def designated(self, pa: np.ndarray, pb: np.ndarray, sa: np.ndarray,
                   sb: np.ndarray) -> np.ndarray:
        """The key index at which each pair of signatures is judged: in the first cutting where
        they agree on a chunk of ``a`` and a chunk of ``b``, the first such chunks; -1 where
        there is none (then they are not near duplicates)."""
        xa = np.asarray(pa, dtype=U64) ^ np.asarray(sa, dtype=U64)
        xb = np.asarray(pb, dtype=U64) ^ np.asarray(sb, dtype=U64)
        n = self.n_chunks
        out = np.full(len(xa), -1, dtype=np.int64)
        for split, masks in enumerate(self._masks):
            eq_a = (xa[:, None] & masks[None, :]) == 0
            eq_b = (xb[:, None] & masks[None, :]) == 0
            hit = eq_a.any(axis=1) & eq_b.any(axis=1) & (out < 0)
            out[hit] = split * n * n + eq_a[hit].argmax(axis=1) * n + eq_b[hit].argmax(axis=1)
        return out


def partition_of(keys: np.ndarray, k: int) -> np.ndarray:
    """The partition owning each key (high bits, so it is independent of the table slot)."""
    return ((np.asarray(keys, dtype=U64) >> U64(32)) % U64(k)).astype(np.int64)


def _slot(keys: np.ndarray, mask: np.uint64) -> np.ndarray:
    """A key's home slot: its high bits, mixed (keys need not be random: ids may be
    sequential, and near keys have their lowest bit set)."""
    return (keys * U64(0x9E3779B97F4A7C15) >> U64(20)) & mask


_PROBE_BUDGET = 2048
_MIN_WIDTH, _MAX_WIDTH = 4, 64
"""Slots one vectorised pass of a lookup (or of a small insert) reads after the home slots:
``_PROBE_BUDGET`` shared by the keys still probing, ``_MIN_WIDTH`` to ``_MAX_WIDTH`` consecutive
slots each. So the long tail of probe sequences (a popular key's rows make long runs) takes a
few passes, not one pass per slot."""
_INSERT_WINDOWED, _SPREAD = 4096, 16
"""An insert probes several slots per pass (sorting its keys by slot each pass) once it has at
most ``_INSERT_WINDOWED`` keys left, few enough for the table to hold them about ``_SPREAD``
slots apart; until then one slot per pass."""


_SKEW_SAMPLE, _SKEW_PAIRS = 1 << 14, 4


def _starts(counts: np.ndarray) -> np.ndarray:
    """Where each of consecutive groups of ``counts`` items starts (the exclusive running
    sum)."""
    return np.cumsum(counts) - counts


def _skewed(keys: np.ndarray) -> bool:
    """Whether stepping would be slower than filling all at once for these keys: its work
    grows with the square of a key's rows (r rows walk r slots together), the fill's with the
    keys. Judged on a sample: the pairs of equal keys in it, scaled to the batch, over the
    batch's size; the two cost the same near 4-8 pairs per key (measured with keys of r rows
    each, 100k and 2M keys)."""
    n = len(keys)
    sample = keys[::max(1, n // _SKEW_SAMPLE)]
    _, counts = np.unique(sample, return_counts=True)
    pairs = float((counts * (counts - 1)).sum()) / 2 * (n / len(sample)) ** 2
    return pairs > _SKEW_PAIRS * n


class Multimap:
    """uint64 key -> int32 row, many rows per key: open addressing with linear probing, every
    operation vectorised over a batch. Key 0 marks an empty slot (keys are nonzero). Rows are
    never removed here; the owner marks rows dead and ``rebuild``s without them."""

    def __init__(self, capacity: int = 1024):
        cap = 1 << max(4, (capacity - 1).bit_length())
        self.keys = np.zeros(cap, dtype=U64)
        self.rows = np.zeros(cap, dtype=np.int32)
        self.count = 0

    @property
    def capacity(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.rows.nbytes

    def needs_room(self, n: int) -> bool:
        return (self.count + n) * 2 > self.capacity

    def make_room(self, n: int, alive: Callable[[], np.ndarray]) -> bool:
        """Make room for ``n`` more keys: where they would fill the table past half, rebuild
        it (``rebuild``, keeping the rows ``alive()`` says are live: asked only then, as it
        reads every row) twice as large as it then needs. Returns whether it rebuilt."""
        if not self.needs_room(n):
            return False
        self.rebuild(2 * (self.count + n), alive())
        return True

    def insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """File ``rows`` under ``keys`` (the caller makes room first: ``make_room``).

        Every key probes from its home slot one slot per step, all keys in step; a free slot
        goes to the first key to reach it, and of keys that reach it together (they share a
        home) to the last one given. Big batches take one step per pass; small ones take
        several steps per pass, as many as keep keys at different slots from meeting. Into an
        empty table (a rebuild), keys that repeat a lot are placed all at once (``_fill``):
        stepping would take one pass per row of the most popular key."""
        keys = np.asarray(keys, dtype=U64)
        rows = np.asarray(rows, dtype=np.int32)
        if not len(keys):
            return
        if self.count == 0 and _skewed(keys):
            self._fill(keys, rows)
            self.count = len(keys)
            return
        mask = self.capacity - 1
        pending = np.arange(len(keys))
        slots = _slot(keys, U64(mask)).astype(np.int64)
        by_slot = False  # whether the keys are in order of slot (then of the order given)
        while len(pending):
            if len(pending) > _INSERT_WINDOWED or len(pending) ** 2 * _SPREAD > self.capacity:
                taken = self._step(keys, rows, pending, slots)
                width, by_slot = 1, False
            else:
                if not by_slot:
                    order = np.argsort(slots, kind="stable")
                    pending, slots, by_slot = pending[order], slots[order], True
                taken, width = self._steps(keys, rows, pending, slots)
            pending = pending[~taken]
            slots = slots[~taken] + width
            if len(slots) and slots[-1] > mask:  # (keys in order stay so unless one wraps)
                by_slot = False
            slots &= mask
        self.count += len(keys)

    def _fill(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """``insert`` into an empty table, all at once: where a slot-by-slot probe puts every
        key, found without stepping (a batch with a popular key would take one pass per row),
        in memory of the batch's size, not the table's.

        Scanning slots upwards, the keys still probing form a stack: at each slot the keys
        at home there join it (in the order given), and the key on top takes the slot (the
        nearest home first, the last given of its home first). A key pushed to height h is
        taken at the first pop from height h after it, so the k-th push to each height pairs
        with the k-th pop from it. Keys still probing past the end wrap round and take the
        slots the scan left free, top of the stack first."""
        cap, n = self.capacity, len(keys)
        homes = _slot(keys, U64(cap - 1))
        order = np.argsort(homes, kind="stable")
        homes = homes[order].view(np.int64)
        first = np.flatnonzero(np.concatenate(([True], homes[1:] != homes[:-1])))
        home = homes[first]  # each distinct home, with its count of keys
        del homes
        count = np.diff(first, append=n)
        # the stack's height as each home's keys join it (Lindley's recursion)
        rise = np.cumsum(count[:-1] - np.diff(home))
        below = np.concatenate(([0], rise - np.minimum(np.minimum.accumulate(rise), 0)))
        push_height = np.arange(1, n + 1) - np.repeat(first - below, count)
        # from each home on, one pop per slot until the stack empties or the next home
        run = np.minimum(below + count, np.diff(home, append=cap))
        step = np.arange(run.sum()) - np.repeat(_starts(run), run)
        pop_slot = np.repeat(home, run) + step
        pop_height = np.repeat(below + count, run) - step
        del step
        levels = int(push_height.max()) + 1
        # stacks are mostly low: 16-bit heights sort by radix, several times faster
        small = np.uint16 if levels <= 1 << 16 else np.int64
        pushes = np.argsort(push_height.astype(small), kind="stable")
        pops = np.argsort(pop_height.astype(small), kind="stable")
        push_count = np.bincount(push_height, minlength=levels)
        pop_count = np.bincount(pop_height, minlength=levels)
        del push_height
        push_start = _starts(push_count)
        height = pop_height[pops]
        taken = order[pushes[push_start[height] + np.arange(len(pops))
                             - _starts(pop_count)[height]]]
        slots = pop_slot[pops]
        self.keys[slots] = keys[taken]
        self.rows[slots] = rows[taken]
        left = np.flatnonzero(push_count > pop_count)[::-1]
        if len(left):
            taken = order[pushes[push_start[left] + pop_count[left]]]
            gap_start = np.concatenate(([0], home + run))
            gap = np.concatenate((home, [cap])) - gap_start
            used = np.minimum(gap, np.maximum(len(left) - _starts(gap), 0))
            free = np.repeat(gap_start - _starts(used), used) + np.arange(len(left))
            self.keys[free] = keys[taken]
            self.rows[free] = rows[taken]

    def _step(self, keys: np.ndarray, rows: np.ndarray, pending: np.ndarray,
              slots: np.ndarray) -> np.ndarray:
        """One probe step of ``pending`` keys (in the order given) at ``slots``; which took
        theirs."""
        free = np.flatnonzero(self.keys[slots] == 0)
        taken = np.zeros(len(pending), dtype=bool)
        if len(free):
            # Several items may want one free slot: each writes its index into the slot's
            # (unused) row and the last writer wins, without sorting.
            self.rows[slots[free]] = free
            win = free[self.rows[slots[free]] == free]
            self.keys[slots[win]] = keys[pending[win]]
            self.rows[slots[win]] = rows[pending[win]]
            taken[win] = True
        return taken

    def _steps(self, keys: np.ndarray, rows: np.ndarray, pending: np.ndarray,
               slots: np.ndarray) -> tuple[np.ndarray, int]:
        """Probe steps of ``pending`` keys at ``slots`` (sorted by slot, then given order), as
        many as the nearest two distinct slots are apart (at most a window): within them no
        key reaches a slot another key can. Keys at one slot take its free slots in turn, the
        last given first. Returns which took a slot, and the steps taken."""
        mask = self.capacity - 1
        n = len(slots)
        first = np.ones(n, dtype=bool)
        first[1:] = slots[1:] != slots[:-1]
        if first.all():
            rank, distinct = np.zeros(n, dtype=np.int64), slots
        else:
            starts = np.flatnonzero(first)
            ends = np.append(starts[1:], n)
            rank = np.repeat(ends, ends - starts) - 1 - np.arange(n)
            distinct = slots[starts]
        gap = min(int(np.diff(distinct).min(initial=self.capacity)),
                  int(distinct[0] + self.capacity - distinct[-1]))
        width = min(gap, max(_MIN_WIDTH, min(_MAX_WIDTH, _PROBE_BUDGET // n)))
        window = (slots + np.arange(width)[:, None]) & mask  # [step, key]
        free = self.keys[window] == 0
        d, i = np.nonzero(free & (np.cumsum(free, axis=0) == rank + 1))
        placed = window[d, i]
        self.keys[placed] = keys[pending[i]]
        self.rows[placed] = rows[pending[i]]
        taken = np.zeros(n, dtype=bool)
        taken[i] = True
        return taken, width

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (query index, row) pair whose key equals the query's key, in the order of
        their distance from the key's home slot, then of the query index.

        A key's rows all lie in the run of occupied slots from its home slot on (slots are
        never emptied), so a probe sequence ends at the first empty slot."""
        keys = np.asarray(keys, dtype=U64)
        mask = self.capacity - 1
        home = _slot(keys, U64(mask)).astype(np.int64)
        # The home slots first: most probe sequences end there.
        found = self.keys[home]
        out_q = [np.flatnonzero(found == keys)]
        out_r = [self.rows[home[out_q[0]]]]
        active = np.flatnonzero(found != 0)
        offset = 1
        while len(active):
            # Windows stop half the table on: the load is at most 1/2, so every probe sequence
            # has ended by then, and a window wrapping round into its home's run would meet
            # the key's rows twice.
            width = min(max(_MIN_WIDTH, min(_MAX_WIDTH, _PROBE_BUDGET // len(active))),
                        self.capacity // 2 + 1 - offset)
            # [distance, key]: numpy's inner loops run along the keys, and the hits come
            # distance first, in the order a slot-by-slot probe meets them
            slots = (home[active] + np.arange(offset, offset + width)[:, None]) & mask
            found = self.keys[slots]
            d, q = np.nonzero(found == keys[active])
            out_q.append(active[q])
            out_r.append(self.rows[slots[d, q]])
            active = active[found.all(axis=0)]
            offset += width
        return np.concatenate(out_q), np.concatenate(out_r).astype(np.int64)

    def rebuild(self, capacity: int, alive: np.ndarray) -> None:
        """Re-file the live rows (``alive[row]``) into a table of at least ``capacity`` slots."""
        used = np.flatnonzero(self.keys)
        keys, rows = self.keys[used], self.rows[used]
        keep = alive[rows]
        cap = 1 << max(4, (max(capacity, 16) - 1).bit_length())
        self.keys = np.zeros(cap, dtype=U64)
        self.rows = np.zeros(cap, dtype=np.int32)
        self.count = 0
        self.insert(keys[keep], rows[keep])


class ClaimTable:
    """uint64 key -> (claim, state), at most one entry per key: open addressing with linear
    probing, the entries in the table's own slots (no row table beside it), every operation
    vectorised over a batch. Key 0 marks an empty slot (keys are nonzero). A dead entry
    (state 0) keeps its key and slot, so probe runs stay unbroken and the key's next claim
    takes the same slot; growing drops the dead.

    The URL claims of a long URL list live here: 17 bytes a slot, at a load of 3/8 to 3/4
    (23 to 45 bytes a URL), where rows of (hash, claim, state) filed in a ``Multimap`` took
    about 50."""

    LOAD = 0.75

    def __init__(self, capacity: int = 1024):
        self._alloc(1 << max(4, (capacity - 1).bit_length()))
        self.used = 0
        """Slots holding a key, live or dead."""

    def _alloc(self, cap: int) -> None:
        self.keys = np.zeros(cap, dtype=U64)
        self.claims = np.zeros(cap, dtype=U64)
        self.states = np.zeros(cap, dtype=np.uint8)

    @property
    def capacity(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.claims.nbytes + self.states.nbytes

    @property
    def live(self) -> int:
        return int(np.count_nonzero(self.states))

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Each key's slot, or -1 where the table has no entry for it (live or dead)."""
        slots, hit = self.probe(np.asarray(keys, dtype=U64))
        return np.where(hit, slots, -1)

    def probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each key's slot and whether it holds the key: else the first empty slot of its
        probe sequence (where it would go: see ``place``)."""
        mask = self.capacity - 1
        slot = _slot(keys, U64(mask)).astype(np.int64)
        found = self.keys[slot]
        hit = found == keys
        active = np.flatnonzero(~hit & (found != 0))
        offset = 1
        while len(active):
            width = min(max(_MIN_WIDTH, min(_MAX_WIDTH, _PROBE_BUDGET // len(active))),
                        self.capacity - offset)
            window = (slot[active] + np.arange(offset, offset + width)[:, None]) & mask
            found = self.keys[window]
            stop = (found == keys[active]) | (found == 0)
            ended = stop.any(axis=0)
            first = stop.argmax(axis=0)[ended]
            done = active[ended]
            slot[done] = window[first, np.flatnonzero(ended)]
            hit[done] = found[first, np.flatnonzero(ended)] != 0
            active = active[~ended]
            offset += width
        return slot, hit

    def reserve(self, n: int) -> None:
        """Make room for ``n`` new keys (this may move every entry: probe after it)."""
        if (self.used + n) > self.LOAD * self.capacity:
            self._grow(n)

    def put(self, keys: np.ndarray, claims: np.ndarray, state: Any) -> None:
        """Set the entries of distinct ``keys`` (``state``: one for all, or one each): a key's
        dead (or live) entry is overwritten in its slot; a new key takes the first empty slot
        of its probe sequence."""
        keys = np.asarray(keys, dtype=U64)
        if len(keys):
            self.reserve(len(keys))
            self.place(keys, claims, state, *self.probe(keys))

    def place(self, keys: np.ndarray, claims: np.ndarray, state: Any, slot: np.ndarray,
              hit: np.ndarray) -> None:
        """``put`` for keys just probed (``slot, hit``), with room reserved before the probe."""
        claims = np.asarray(claims, dtype=U64)
        states = np.broadcast_to(np.asarray(state, dtype=np.uint8), keys.shape)
        while True:
            # Two new keys may meet at one empty slot: the first takes it, the others probe on.
            _, first = np.unique(slot, return_index=True)
            take = np.zeros(len(keys), dtype=bool)
            take[first] = True
            take |= hit
            self.used += int(np.count_nonzero(take & ~hit))
            s = slot[take]
            self.keys[s], self.claims[s], self.states[s] = keys[take], claims[take], states[take]
            if take.all():
                return
            keys, claims, states = keys[~take], claims[~take], states[~take]
            slot, hit = self.probe(keys)

    def kill(self, keys: np.ndarray, claims: np.ndarray) -> None:
        """Drop the entries of ``keys`` held by ``claims`` (others stand)."""
        slots = self.find(keys)
        ok = slots >= 0
        slots = slots[ok]
        held = self.claims[slots] == np.asarray(claims, dtype=U64)[ok]
        self.states[slots[held]] = 0

    def _grow(self, n: int) -> None:
        """Re-file the live entries in a table at most half full with ``n`` more, dropping the
        dead ones; a slice of the old table at a time, so growing holds little beyond the
        two tables."""
        keys, claims, states, wanted = self.keys, self.claims, self.states, self.live + n
        cap = 16
        while wanted * 2 > cap:
            cap *= 2
        self._alloc(cap)
        self.used = 0
        for start in range(0, len(keys), _REFILE):
            part = slice(start, start + _REFILE)
            live = np.flatnonzero(states[part])
            self.put(keys[part][live], claims[part][live], states[part][live])


_REFILE = 1 << 16
"""Old slots re-filed per step when a ``ClaimTable`` grows."""


class _Columns:
    """Growable rows of named fields, stored row by row (one numpy record per entry), so the
    fields of an entry a lookup meets share its cache lines. ``cols[name]`` is a view of one
    field over every row."""

    def __init__(self, **dtypes: Any):
        self.n = 0
        self.data = np.zeros(64, dtype=np.dtype(list(dtypes.items()), align=True))

    def append(self, **values: np.ndarray) -> np.ndarray:
        m = len(next(iter(values.values())))
        if self.n + m > len(self.data):
            grown = np.zeros(max(2 * len(self.data), self.n + m), dtype=self.data.dtype)
            grown[:self.n] = self.data[:self.n]
            self.data = grown
        for name, value in values.items():
            self.data[name][self.n:self.n + m] = value
        self.n += m
        return np.arange(self.n - m, self.n)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.data[name]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def _near_start_slots(signatures: float, keys_per_signature: int) -> int:
    """A near-duplicate table's first size for ``signatures`` expected signatures (a share of
    a count, so maybe fractional): at most half full once their keys are all filed, where
    ``Multimap.make_room`` would grow it."""
    keys = math.ceil(max(signatures, 0.0) * keys_per_signature)
    return max(1024, min(2 * keys, NEAR_START_SLOTS))


def _arr(values: Any, dtype: Any) -> np.ndarray:
    return np.asarray(values if values is not None else [], dtype=dtype)


class DedupPartition:
    """One partition of the index: URL claims, exact claims and near signatures whose keys hash
    here. Every method takes and returns dicts of numpy arrays (cheap to send between
    processes). Calls are applied in the order they arrive."""

    def __init__(self, threshold: int, near: bool = True, signatures: float = 0.0):
        """``signatures``: how many stored signatures this partition expects to file (its
        share of ``JobLifecycle.index_signatures``). Its near-duplicate table starts with room
        for their keys, up to ``NEAR_START_SLOTS``, rather than doubling its way up from 1,024
        slots: each doubling re-files every key, 13 of them and 0.54 s of the runner's CPU
        over a job of 20,000 photos (bench/README.md)."""
        self.scheme = KeyScheme(threshold)
        self.t = threshold
        self.near = near
        self._urls = ClaimTable()
        self._exact = Multimap()
        self._ex = _Columns(id=U64, claim=U64, token=U64, ref=U64, state=np.uint8)
        self._near = Multimap(_near_start_slots(signatures if near else 0.0,
                                                self.scheme.n_keys))
        self._ne = _Columns(id=U64, claim=U64, token=U64, a=U64, b=U64, pos=np.int32,
                            state=np.uint8)
        self.decisions = 0

    # -- URLs -------------------------------------------------------------------------------

    def check_urls(self, req: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Claim each URL (``hash``) for its candidate (``claim``), in order. Returns
        ``other``: 0 where the URL is now (or already was) this candidate's, else the claim
        of the candidate that holds it; and ``done``: the URL was decided by an earlier run
        for the same candidate key (``kclaim``), so it is not a new candidate."""
        hashes, claims = _arr(req.get("hash"), U64), _arr(req.get("claim"), U64)
        kclaims = _arr(req.get("kclaim"), U64)
        other = np.zeros(len(hashes), dtype=U64)
        done = np.zeros(len(hashes), dtype=bool)
        table = self._urls
        table.reserve(len(hashes))
        slots, hit = table.probe(hashes)
        states = table.states[slots]  # 0 at a missing key's empty slot
        live = states > 0
        holders = np.where(live, table.claims[slots], 0).tolist()
        finished = states == DONE
        fresh: list[int] = []
        claimed: dict[int, int] = {}
        for i, (h, c) in enumerate(zip(hashes.tolist(), claims.tolist())):
            owner = holders[i] if live[i] else claimed.get(h)
            if finished[i]:
                if len(kclaims) and owner == int(kclaims[i]):
                    done[i] = True
                else:
                    other[i] = owner
            elif owner is None:
                claimed[h] = c
                fresh.append(i)
            elif owner != c:
                other[i] = owner
        if fresh:
            new = np.array(fresh)
            table.place(hashes[new], claims[new], KEPT, slots[new], hit[new])
        return {"other": other, "done": done}

    def release_urls(self, req: dict[str, np.ndarray]) -> None:
        """Drop URL claims (``hash`` held by ``claim``): a cancelled candidate's URL is free."""
        self._urls.kill(_arr(req.get("hash"), U64), _arr(req.get("claim"), U64))

    # -- checking images --------------------------------------------------------------------

    def check(self, req: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decide-and-file one unit's items that hash here (see the module docstring).

        ``req``: exact items ``x_pos, x_id, x_claim, x_token``; near probe keys ``q_key,
        q_kidx, q_sig`` with their signatures ``qs_pos, qs_a, qs_b, qs_claim`` (``q_sig``
        indexes them); near insert keys ``i_key, i_sig`` with their signatures ``is_pos,
        is_a, is_b, is_id, is_claim, is_token`` (``*_pos``: the item's position in its unit,
        the order of the calls).

        Returns ``x_other`` (0: the id is this candidate's, now or already; else the holder's
        claim) and ``x_ostate`` (the holder's entry's state), ``x_state`` (the state of the
        id's entry when it was this candidate's already, else 0), the near relations
        ``r_pos, r_id, r_claim, r_token, r_state, r_da, r_db`` (at most ``MAX_RELATIONS`` per
        item, closest first), and the near entries
        ``settle`` will update, ``f_pos, f_row``: the rows filed for each item, and the live
        rows of the same candidate that an earlier check filed and its probes met (a retried
        unit whose first attempt was never settled).
        """
        out = self._check_exact(req)
        out.update(self._check_near(_per_key(req)) if self.near else _no_relations())
        self.decisions += len(_arr(req.get("x_pos"), np.int64))
        return out

    def _check_exact(self, req: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = _arr(req.get("x_id"), U64)
        claims = _arr(req.get("x_claim"), U64)
        tokens = _arr(req.get("x_token"), U64)
        other = np.zeros(len(ids), dtype=U64)
        other_state = np.zeros(len(ids), dtype=np.uint8)
        state = np.zeros(len(ids), dtype=np.uint8)
        ref = np.zeros(len(ids), dtype=U64)
        q, rows = self._exact.lookup(ids | U64(1))
        live: dict[int, list[int]] = {}
        for qi, row in zip(q.tolist(), rows.tolist()):
            if self._ex["state"][row] and int(self._ex["id"][row]) == int(ids[qi]):
                live.setdefault(qi, []).append(row)
        new: dict[int, int] = {}
        add_ids, add_claims, add_tokens = [], [], []
        for i in range(len(ids)):
            c = int(claims[i])
            rows_i = live.get(i, [])
            mine = [r for r in rows_i if int(self._ex["claim"][r]) == c]
            if mine:
                state[i] = self._ex["state"][mine[-1]]
                ref[i] = self._ex["ref"][mine[-1]]
                continue
            if rows_i:
                # a decided holder before an undecided one (a copy waits only on the latter)
                row = max(rows_i, key=lambda r: int(self._ex["state"][r]) != PENDING)
                other[i] = self._ex["claim"][row]
                other_state[i] = self._ex["state"][row]
                continue
            holder = new.get(int(ids[i]))
            if holder is not None and holder != c:
                other[i] = holder
                other_state[i] = PENDING
                continue
            if holder is None:
                new[int(ids[i])] = c
                add_ids.append(int(ids[i]))
                add_claims.append(c)
                add_tokens.append(int(tokens[i]))
        if add_ids:
            a_ids = np.array(add_ids, U64)
            rows_new = self._ex.append(id=a_ids, claim=np.array(add_claims, U64),
                                       token=np.array(add_tokens, U64),
                                       state=np.full(len(add_ids), PENDING, np.uint8))
            self._exact.make_room(len(rows_new), lambda: self._alive(self._ex))
            self._exact.insert(a_ids | U64(1), rows_new)
        return {"x_other": other, "x_ostate": other_state, "x_state": state, "x_ref": ref}

    def _check_near(self, req: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        q_pos = _arr(req.get("q_pos"), np.int64)
        q_key = _arr(req.get("q_key"), U64)
        q_kidx = _arr(req.get("q_kidx"), np.int64)
        q_a, q_b = _arr(req.get("q_a"), U64), _arr(req.get("q_b"), U64)
        q_claim = _arr(req.get("q_claim"), U64)
        i_key = _arr(req.get("i_key"), U64)
        ne = self._ne
        # File this call's signatures first, tagged with their item's position, then probe
        # once: a probe counts this call's entries only where they come from an earlier item.
        first_new = ne.n
        i_pos = _arr(req.get("i_pos"), np.int64)
        first, filed = self._file(i_key, _arr(req.get("i_a"), U64), _arr(req.get("i_b"), U64),
                                  _arr(req.get("i_id"), U64), _arr(req.get("i_claim"), U64),
                                  _arr(req.get("i_token"), U64), PENDING, i_pos)
        qi, rows = self._near.lookup(q_key)
        ok = ne["state"][rows] > 0
        fresh = rows >= first_new
        ok[fresh] &= ne["pos"][rows[fresh]] < q_pos[qi[fresh]]
        qi, rows, fresh = qi[ok], rows[ok], fresh[ok]
        rel = {name: ne[name][rows] for name in ("id", "claim", "token", "state", "a", "b")}
        own = ~fresh & (rel["claim"] == q_claim[qi])
        f_pos, f_row = i_pos[first], filed
        if own.any():
            earlier = np.unique(np.stack([q_pos[qi[own]], rows[own]]), axis=1)
            f_pos = np.concatenate([f_pos, earlier[0]])
            f_row = np.concatenate([f_row, earlier[1]])
        out = self._relations(q_pos, q_kidx, q_a, q_b, q_claim, qi, rel)
        out.update(f_pos=f_pos.astype(np.int32), f_row=f_row.astype(np.int64))
        return out

    def _relations(self, q_pos: np.ndarray, q_kidx: np.ndarray, q_a: np.ndarray,
                   q_b: np.ndarray, q_claim: np.ndarray, qi: np.ndarray,
                   rel: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not len(qi):
            return _no_relations()
        da = popcount(q_a[qi] ^ rel["a"])
        db = popcount(q_b[qi] ^ rel["b"])
        near = (da <= self.t) & (db <= self.t) & (rel["claim"] != q_claim[qi])
        if near.any():
            idx = np.flatnonzero(near)
            desig = self.scheme.designated(q_a[qi[idx]], q_b[qi[idx]], rel["a"][idx],
                                           rel["b"][idx])
            near[idx[desig != q_kidx[qi[idx]]]] = False
        idx = np.flatnonzero(near)
        if not len(idx):
            return _no_relations()
        pos = q_pos[qi[idx]]
        dist = da[idx] + db[idx]
        order = np.lexsort((dist, pos))
        idx, pos = idx[order], pos[order]
        # keep the closest MAX_RELATIONS per item (and one per (item, claim))
        claims = rel["claim"][idx]
        _, first = np.unique(np.stack([pos.astype(U64), claims]), axis=1, return_index=True)
        first = np.sort(first)
        idx, pos = idx[first], pos[first]
        rank = np.arange(len(pos)) - np.searchsorted(pos, pos, side="left")
        keep = rank < MAX_RELATIONS
        idx, pos = idx[keep], pos[keep]
        return {"r_pos": pos, "r_id": rel["id"][idx], "r_claim": rel["claim"][idx],
                "r_token": rel["token"][idx], "r_state": rel["state"][idx],
                "r_da": da[idx], "r_db": db[idx]}

    def _file(self, keys: np.ndarray, a: np.ndarray, b: np.ndarray, ids: np.ndarray,
              claims: np.ndarray, tokens: np.ndarray, state: int,
              pos: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """One entry row per signature (``keys`` come ``n_keys`` to a signature, in order of
        its key index, so consecutive equal ``(a, b, claim)`` are one signature), filed under
        all its keys in this partition. ``pos``: the item's position in the current call.
        Returns each signature's first key (an index into ``keys``) and its row."""
        if not len(keys):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        new_sig = np.ones(len(keys), dtype=bool)
        new_sig[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1]) | (claims[1:] != claims[:-1])
        first = np.flatnonzero(new_sig)
        which = np.cumsum(new_sig) - 1
        rows = self._ne.append(id=ids[first], claim=claims[first], token=tokens[first],
                               a=a[first], b=b[first],
                               state=np.full(len(first), state, np.uint8),
                               pos=pos[first] if pos is not None else
                               np.full(len(first), -1, np.int64))
        self._near.make_room(len(keys), lambda: self._alive(self._ne))
        self._near.insert(keys, rows[which])
        return first, rows

    # -- settling ----------------------------------------------------------------------------

    def settle(self, req: dict[str, np.ndarray]) -> None:
        """Apply a unit's decisions: ``keep_*`` entries become KEPT, ``drop_*`` entries die.
        Exact entries by ``*_id`` + ``*_claim``; near entries by ``*_row`` (what ``check``
        returned as ``f_row``) + ``*_nclaim``. A row that does not hold a live entry of that
        claim is left alone: after a restart the rows are another incarnation's."""
        ne = self._ne
        for prefix, state in (("keep", KEPT), ("drop", 0)):
            ids, claims = _arr(req.get(f"{prefix}_id"), U64), _arr(req.get(f"{prefix}_claim"), U64)
            self._set_exact(ids, claims, state)
            rows = _arr(req.get(f"{prefix}_row"), np.int64)
            nclaims = _arr(req.get(f"{prefix}_nclaim"), U64)
            inside = (rows >= 0) & (rows < ne.n)
            rows, nclaims = rows[inside], nclaims[inside]
            hit = (ne["claim"][rows] == nclaims) & (ne["state"][rows] > 0)
            ne["state"][rows[hit]] = state

    def _of_unit(self, cols: _Columns, req: dict[str, np.ndarray]) -> np.ndarray:
        """Which of ``cols``' rows a unit filed (``seq``: its order, the high bits of its
        tokens, ``builder.units.WorkUnit.token``)."""
        seq = U64(int(np.asarray(req["seq"]).ravel()[0]))
        return (cols["token"][:cols.n] >> U64(POS_BITS)) == seq

    def unit_written(self, req: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The ids of the images here that a unit filed and a shard holds or is writing."""
        state = self._ex["state"][:self._ex.n]
        mine = self._of_unit(self._ex, req) & ((state == WRITING) | (state == WRITTEN))
        return {"id": self._ex["id"][:self._ex.n][mine]}

    def drop_unit(self, req: dict[str, np.ndarray]) -> None:
        """Kill the entries an earlier attempt of one unit filed that no shard holds (``seq``;
        ``keep_id``: its images a shard holds, whose signatures stay). A resend files again
        what it finds again, and settles the earlier rows of those claims with its own; an
        image it did not find again (its fetch failed, the search no longer returns it)
        kept its entries, and later copies of it were rejected as duplicates of an image the
        dataset never got. Rows loaded from the journal (token 0, no position) are no
        unit's."""
        state = self._ex["state"][:self._ex.n]
        state[self._of_unit(self._ex, req) & ((state == PENDING) | (state == KEPT))] = 0
        ne, n = self._ne, self._ne.n
        state = ne["state"][:n]
        dead = np.flatnonzero(self._of_unit(ne, req) & (state > 0) & (ne["pos"][:n] >= 0))
        keep = _arr(req.get("keep_id"), U64)
        if len(keep):
            dead = dead[~np.isin(ne["id"][dead], keep)]
        state[dead] = 0

    def mark_writing(self, req: dict[str, np.ndarray]) -> None:
        """These ids (``id`` + ``claim``) are being written in the shard ``ref``."""
        self._set_exact(_arr(req.get("id"), U64), _arr(req.get("claim"), U64), WRITING,
                        int(np.asarray(req.get("ref", [0])).ravel()[0]))

    def mark_written(self, req: dict[str, np.ndarray]) -> None:
        """These ids (``id`` + ``claim``) are in committed shards of the output."""
        self._set_exact(_arr(req.get("id"), U64), _arr(req.get("claim"), U64), WRITTEN)

    def _set_exact(self, ids: np.ndarray, claims: np.ndarray, state: int,
                   ref: Optional[int] = None) -> None:
        if not len(ids):
            return
        qi, rows = self._exact.lookup(ids | U64(1))
        hit = ((self._ex["id"][rows] == ids[qi]) & (self._ex["claim"][rows] == claims[qi])
               & (self._ex["state"][rows] > 0))
        self._ex["state"][rows[hit]] = state
        if ref is not None:
            self._ex["ref"][rows[hit]] = ref

    @staticmethod
    def _alive(cols: _Columns) -> np.ndarray:
        return cols["state"][:max(cols.n, 1)] > 0

    # -- recovery ----------------------------------------------------------------------------

    def load(self, req: dict[str, np.ndarray]) -> None:
        """Add entries recovered from the journal: URL claims (``u_hash, u_claim``; with
        ``u_done``, decided by an earlier run: see ``check_urls``), written images (``x_id,
        x_claim``) and their signatures' keys here (``n_key, n_a, n_b, n_id, n_claim``)."""
        u_hash = _arr(req.get("u_hash"), U64)
        if len(u_hash):
            slots, _ = self._urls.probe(u_hash)
            keep = self._urls.states[slots] == 0  # no entry, or a dead one
            _, first = np.unique(u_hash[keep], return_index=True)
            sel = np.flatnonzero(keep)[np.sort(first)]
            state = DONE if bool(np.asarray(req.get("u_done", [False])).ravel()[0]) else KEPT
            self._urls.put(u_hash[sel], _arr(req.get("u_claim"), U64)[sel], state)
        x_id = _arr(req.get("x_id"), U64)
        if len(x_id):
            rows = self._ex.append(id=x_id, claim=_arr(req.get("x_claim"), U64),
                                   token=np.zeros(len(x_id), U64),
                                   state=np.full(len(x_id), WRITTEN, np.uint8))
            self._exact.make_room(len(rows), lambda: self._alive(self._ex))
            self._exact.insert(x_id | U64(1), rows)
        n_key = _arr(req.get("n_key"), U64)
        if len(n_key) and self.near:
            self._file(n_key, _arr(req.get("n_a"), U64), _arr(req.get("n_b"), U64),
                       _arr(req.get("n_id"), U64), _arr(req.get("n_claim"), U64),
                       np.zeros(len(n_key), U64), KEPT)

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "urls": self._urls.live,
            "images": int((self._ex["state"][:self._ex.n] > 0).sum()),
            "signatures": int((self._ne["state"][:self._ne.n] > 0).sum()),
            "decisions": self.decisions,
            "bytes": (self._urls.nbytes + self._exact.nbytes
                      + self._ex.nbytes + self._near.nbytes + self._ne.nbytes),
        }


def _per_key(req: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The near columns of a ``check`` call, one row per key: each key with its signature's
    columns."""
    out = {"q_kidx": _arr(req.get("q_kidx"), np.int64)}
    for side, names in (("q", ("pos", "a", "b", "claim")),
                        ("i", ("pos", "a", "b", "claim", "id", "token"))):
        sig = _arr(req.get(f"{side}_sig"), np.int64)
        out[f"{side}_key"] = _arr(req.get(f"{side}_key"), U64)
        for name in names:
            column = _arr(req.get(f"{side}s_{name}"), np.int64 if name == "pos" else U64)
            out[f"{side}_{name}"] = column[sig]
    return out


def _sorted_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` of values already in order, without sorting
    them again (a check call's keys come in the order of their signatures)."""
    first = np.ones(len(values), dtype=bool)
    first[1:] = values[1:] != values[:-1]
    return values[first], np.cumsum(first) - 1


def _no_relations() -> dict[str, np.ndarray]:
    return {"r_pos": np.zeros(0, np.int64), "r_id": np.zeros(0, U64),
            "r_claim": np.zeros(0, U64), "r_token": np.zeros(0, U64),
            "r_state": np.zeros(0, np.uint8), "r_da": np.zeros(0, np.int64),
            "r_db": np.zeros(0, np.int64)}


# ---- the client side: routing calls and deciding ------------------------------------------

PartitionCall = Callable[[int, str, dict[str, np.ndarray]], Awaitable[Any]]
"""``call(partition, method, payload)``: run ``DedupPartition.<method>(payload)`` on one
partition (in this process, or on its actor) and return the result."""


@dataclass
class DedupItem:
    """One image to decide: its candidate's claim, its order token, its id and signatures."""

    claim: int
    token: int
    image_id: int
    stored: Sequence[tuple[int, int]]
    probes: Sequence[tuple[int, int]]
    filed: tuple[np.ndarray, np.ndarray] = field(
        default_factory=lambda: (np.zeros(0, np.int32), np.zeros(0, np.int64)),
        repr=False, compare=False)
    """(partition, row) of the near entries ``settle`` updates for this candidate, set by
    the last ``DedupClient.decide`` of it."""


@dataclass(frozen=True)
class DedupDecision:
    """``reason`` None: kept (``written``: an earlier attempt already wrote it; ``writing``:
    one may have). Otherwise the duplicate's reason, the id of the image it duplicates and the
    distance (a + b bits); ``held``: that image is undecided still (another unit's, or kept
    by this call and not yet settled), so this item is no duplicate yet: settle it as
    dropped, and decide it again once that image is settled."""

    reason: Optional[Reason] = None
    kept_id: str = ""
    distance: int = 0
    written: bool = False
    writing: int = -1
    """An earlier attempt was writing it in this shard (``ref``): written iff that shard
    committed, which the caller checks in the journal."""
    held: bool = False

    @property
    def duplicate(self) -> bool:
        """A duplicate of an image decided already (kept, or in the output)."""
        return self.reason is not None and not self.held


@dataclass
class WrittenImages:
    """Written images as ``DedupClient.load_payloads`` takes them: ``ids`` and ``claims``
    one per image, and each stored signature ``(sig_a, sig_b)`` with its image's index in
    ``sig_pos``. Arrays, so that a partition recovering from a journal of millions of images
    makes no Python object per signature."""

    ids: np.ndarray
    claims: np.ndarray
    sig_pos: np.ndarray
    sig_a: np.ndarray
    sig_b: np.ndarray

    @classmethod
    def of(cls, written: Sequence[tuple[int, int, Sequence[tuple[int, int]]]]
           ) -> "WrittenImages":
        """From ``(id, claim, stored signatures)`` tuples."""
        sigs = [(i, a, b) for i, w in enumerate(written) for a, b in w[2]]
        return cls(ids=np.array([w[0] for w in written], dtype=U64),
                   claims=np.array([w[1] for w in written], dtype=U64),
                   sig_pos=np.array([s[0] for s in sigs], dtype=np.int64),
                   sig_a=np.array([s[1] for s in sigs], dtype=U64),
                   sig_b=np.array([s[2] for s in sigs], dtype=U64))


@dataclass
class _Routed:
    payloads: list[dict[str, list]] = field(default_factory=list)


class DedupClient:
    """Routes one unit's items to the partitions and decides them (see the module docstring).

    ``call`` reaches the partitions; ``k`` is how many there are. Every method sends at most one
    call per partition, all at once.
    """

    def __init__(self, threshold: int, near: bool, k: int, call: PartitionCall):
        if k < 1:
            raise ValueError(f"the index needs at least one partition, got {k}")
        self.scheme = KeyScheme(threshold)
        self.near = near
        self.k = k
        self.call = call

    async def _fan_out(self, method: str, payloads: list[dict[str, Any]]) -> list[Any]:
        calls = {p: payload for p, payload in enumerate(payloads)
                 if any(len(v) for v in payload.values())}
        results = await asyncio.gather(*(self.call(p, method, {k: np.asarray(v) for k, v in
                                                               payload.items()})
                                         for p, payload in calls.items()))
        out: list[Any] = [None] * self.k
        for p, result in zip(calls, results):
            out[p] = result
        return out

    async def check_urls(self, claims: Sequence[int], hashes: Sequence[int],
                         kclaims: Optional[Sequence[int]] = None) -> list[tuple[int, bool]]:
        """Claim each URL for its candidate; per URL, (0 or the holder's claim, whether an
        earlier run decided this candidate already)."""
        hs = np.array(hashes, dtype=U64)
        cl = np.array(claims, dtype=U64)
        kc = np.array(kclaims if kclaims is not None else claims, dtype=U64)
        part = partition_of(hs, self.k)
        payloads = [{"hash": hs[part == p], "claim": cl[part == p], "kclaim": kc[part == p]}
                    for p in range(self.k)]
        results = await self._fan_out("check_urls", payloads)
        other = np.zeros(len(hs), dtype=U64)
        done = np.zeros(len(hs), dtype=bool)
        for p, result in enumerate(results):
            if result is not None:
                other[part == p] = result["other"]
                done[part == p] = result["done"]
        return [(int(o), bool(d)) for o, d in zip(other, done)]

    async def release_urls(self, claims: Sequence[int], hashes: Sequence[int]) -> None:
        hs = np.array(hashes, dtype=U64)
        part = partition_of(hs, self.k)
        await self._fan_out("release_urls", [{"hash": hs[part == p],
                                              "claim": np.array(claims, U64)[part == p]}
                                             for p in range(self.k)])

    def _near_rows(self, items: Sequence[DedupItem], which: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(item index, a, b, keys [n, n_keys], key index) of the items' signatures."""
        pos, a, b = [], [], []
        for i, item in enumerate(items):
            for sa, sb in getattr(item, which):
                pos.append(i)
                a.append(sa)
                b.append(sb)
        a_arr, b_arr = np.array(a, dtype=U64), np.array(b, dtype=U64)
        if not len(a_arr):
            empty = np.zeros((0, self.scheme.n_keys), U64)
            return np.zeros(0, np.int64), a_arr, b_arr, empty, np.zeros(0, np.int64)
        keys, kidx = self.scheme.keys(a_arr, b_arr)
        return np.array(pos, np.int64), a_arr, b_arr, keys, kidx

    async def decide(self, items: Sequence[DedupItem]) -> list[DedupDecision]:
        """Check and file a unit's items; returns one decision per item, in order. Call
        ``settle`` with the final outcome afterwards."""
        n = len(items)
        if not n:
            return []
        ids = np.array([it.image_id for it in items], dtype=U64)
        claims = np.array([it.claim for it in items], dtype=U64)
        tokens = np.array([it.token for it in items], dtype=U64)
        xpart = partition_of(mix64(ids), self.k)
        payloads: list[dict[str, Any]] = []
        for p in range(self.k):
            sel = np.flatnonzero(xpart == p)
            payloads.append({"x_pos": sel, "x_id": ids[sel], "x_claim": claims[sel],
                             "x_token": tokens[sel]})
        if self.near:
            qpos, qa, qb, qkeys, qkidx = self._near_rows(items, "probes")
            ipos, ia, ib, ikeys, _ = self._near_rows(items, "stored")
            nk = self.scheme.n_keys
            q_rep = np.repeat(np.arange(len(qpos)), nk)
            i_rep = np.repeat(np.arange(len(ipos)), nk)
            qk, ik = qkeys.ravel(), ikeys.ravel()
            qki = np.tile(qkidx.astype(np.uint8), len(qpos))
            qp, ip = partition_of(qk, self.k), partition_of(ik, self.k)
            for p in range(self.k):
                qs, is_ = np.flatnonzero(qp == p), np.flatnonzero(ip == p)
                # Each signature goes once, with the keys that hash here pointing at it: a
                # key in the call is 12 bytes, not the 48-56 of a key carrying its signature.
                qsig, q_sig = _sorted_unique(q_rep[qs])
                isig, i_sig = _sorted_unique(i_rep[is_])
                payloads[p].update(
                    q_key=qk[qs], q_kidx=qki[qs], q_sig=q_sig.astype(np.int32),
                    qs_pos=qpos[qsig], qs_a=qa[qsig], qs_b=qb[qsig],
                    qs_claim=claims[qpos[qsig]],
                    i_key=ik[is_], i_sig=i_sig.astype(np.int32),
                    is_pos=ipos[isig], is_a=ia[isig], is_b=ib[isig],
                    is_id=ids[ipos[isig]], is_claim=claims[ipos[isig]],
                    is_token=tokens[ipos[isig]])
        results = await self._fan_out("check", payloads)
        x_other = np.zeros(n, dtype=U64)
        x_ostate = np.zeros(n, dtype=np.uint8)
        x_state = np.zeros(n, dtype=np.uint8)
        x_ref = np.zeros(n, dtype=U64)
        relations: list[list[tuple[int, int, int, int, int]]] = [[] for _ in range(n)]
        f_part, f_pos, f_row = [], [], []
        for p, result in enumerate(results):
            if result is None:
                continue
            if "f_row" in result:
                f_part.append(np.full(len(result["f_row"]), p, np.int32))
                f_pos.append(result["f_pos"])
                f_row.append(result["f_row"])
            sel = np.flatnonzero(xpart == p)
            x_other[sel] = result["x_other"]
            x_ostate[sel] = result["x_ostate"]
            x_state[sel] = result["x_state"]
            x_ref[sel] = result["x_ref"]
            for pos, rid, rclaim, rtoken, rstate, da, db in zip(
                    result["r_pos"].tolist(), result["r_id"].tolist(),
                    result["r_claim"].tolist(), result["r_token"].tolist(),
                    result["r_state"].tolist(), result["r_da"].tolist(),
                    result["r_db"].tolist()):
                relations[pos].append((rclaim, rid, rtoken, rstate, da + db))
        _hand_out(items, f_part, f_pos, f_row)
        return self._resolve(items, claims, x_other, x_ostate, x_state, x_ref, relations)

    @staticmethod
    def _resolve(items: Sequence[DedupItem], claims: np.ndarray, x_other: np.ndarray,
                 x_ostate: np.ndarray, x_state: np.ndarray, x_ref: np.ndarray,
                 relations: list[list[tuple[int, int, int, int, int]]]
                 ) -> list[DedupDecision]:
        batch = {int(c): i for i, c in enumerate(claims.tolist())}
        written = {int(c) for c, s in zip(claims.tolist(), x_state.tolist())
                   if s in (WRITTEN, WRITING)}
        kept_claims: set[int] = set()
        held_claims: set[int] = set()
        decisions: list[DedupDecision] = []
        for i, item in enumerate(items):
            exact = bool(x_other[i])
            if exact and int(x_other[i]) in held_claims:
                # the same bytes as an earlier item of this unit that waits: wait with it
                decisions.append(DedupDecision(Reason.EXACT_DUPLICATE, id_text(item.image_id),
                                               held=True))
                held_claims.add(item.claim)
                continue
            if exact and int(x_other[i]) in batch and int(x_other[i]) not in kept_claims:
                # The id's holder is an earlier item of this unit that was rejected: judge this
                # copy as that item was judged (same bytes, same signatures), by its relations.
                exact = False
                fallback = True
            else:
                fallback = False
            if exact:
                # a holder kept here, or another unit's still undecided, may yet be rejected
                held = int(x_other[i]) in batch or bool(x_ostate[i] == PENDING)
                decisions.append(DedupDecision(Reason.EXACT_DUPLICATE, id_text(item.image_id),
                                               held=held))
                if held:
                    held_claims.add(item.claim)
                continue
            if x_state[i] in (WRITTEN, WRITING):
                decisions.append(DedupDecision(written=x_state[i] == WRITTEN,
                                               writing=int(x_ref[i]) if x_state[i] == WRITING
                                               else -1))
                kept_claims.add(item.claim)
                continue
            best: Optional[tuple[int, int]] = None
            waits: Optional[tuple[int, int]] = None
            for rclaim, rid, rtoken, rstate, dist in relations[i]:
                if rclaim in written:
                    final = True  # an earlier attempt of this unit wrote it: it is output
                elif rclaim in batch:
                    if not (batch[rclaim] < i and rclaim in kept_claims):
                        continue
                    final = False
                elif rstate in (KEPT, WRITTEN):
                    final = True
                elif rstate == PENDING and rtoken < item.token:
                    final = False
                else:
                    continue
                if final and (best is None or dist < best[0]):
                    best = (dist, rid)
                elif not final and (waits is None or dist < waits[0]):
                    waits = (dist, rid)
            if best is not None or waits is not None:
                dist, rid = best if best is not None else waits
                decisions.append(DedupDecision(Reason.NEAR_DUPLICATE, id_text(rid), dist,
                                               held=best is None))
                if best is None:
                    held_claims.add(item.claim)
                continue
            if fallback:  # the id is filed under the rejected item: never write it twice
                decisions.append(DedupDecision(Reason.EXACT_DUPLICATE, id_text(item.image_id)))
                continue
            decisions.append(DedupDecision())
            kept_claims.add(item.claim)
        return decisions

    async def settle(self, items: Sequence[DedupItem], keep: Sequence[bool],
                     drop: Sequence[bool]) -> None:
        """Record the unit's outcome: ``keep[i]`` accepted, ``drop[i]`` rejected after all
        (a duplicate, over target, refused by a later stage). Entries of items in neither list
        stay as they are."""
        ids = np.array([it.image_id for it in items], dtype=U64)
        claims = np.array([it.claim for it in items], dtype=U64)
        xpart = partition_of(mix64(ids), self.k)
        payloads: list[dict[str, Any]] = [{} for _ in range(self.k)]
        for prefix, mask in (("keep", np.array(keep, bool)), ("drop", np.array(drop, bool))):
            for p in range(self.k):
                sel = np.flatnonzero(mask & (xpart == p))
                payloads[p][f"{prefix}_id"] = ids[sel]
                payloads[p][f"{prefix}_claim"] = claims[sel]
                payloads[p][f"{prefix}_row"] = np.zeros(0, np.int64)
                payloads[p][f"{prefix}_nclaim"] = np.zeros(0, U64)
            if self.near and mask.any():
                chosen = [it for it, m in zip(items, mask) if m]
                part = np.concatenate([it.filed[0] for it in chosen])
                rows = np.concatenate([it.filed[1] for it in chosen])
                nclaim = np.repeat(claims[mask], [len(it.filed[1]) for it in chosen])
                if len(rows):
                    for p in range(self.k):
                        sel = part == p
                        payloads[p][f"{prefix}_row"] = rows[sel]
                        payloads[p][f"{prefix}_nclaim"] = nclaim[sel]
        await self._fan_out("settle", payloads)

    async def drop_unit(self, seq: int, written: Iterable[int] = ()) -> None:
        """Before a resent unit decides: its earlier attempt's entries that no shard holds
        die (``DedupPartition.drop_unit``), in every partition; ``written``: the ids of its
        images the journal's shards hold. An image's exact entry and its signatures may be
        in different partitions, so the ones being written or written are asked for too."""
        ask = [{"seq": np.array([seq], U64)}] * self.k
        found = [r["id"] for r in await self._fan_out("unit_written", ask) if r is not None]
        keep = np.unique(np.concatenate([np.fromiter(written, U64), *found]))
        await self._fan_out("drop_unit", [{"seq": np.array([seq], U64), "keep_id": keep}]
                            * self.k)

    async def mark_written(self, image_ids: Sequence[int], claims: Sequence[int],
                           writing: Optional[int] = None) -> None:
        """Record these images as written (or, with ``writing``, as being written in the
        shard with that reference)."""
        ids = np.array(image_ids, dtype=U64)
        part = partition_of(mix64(ids), self.k)
        payloads: list[dict[str, Any]] = [{"id": ids[part == p],
                                           "claim": np.array(claims, U64)[part == p]}
                                          for p in range(self.k)]
        if writing is not None:
            for payload in payloads:
                if len(payload["id"]):
                    payload["ref"] = np.array([writing], U64)
        await self._fan_out("mark_writing" if writing is not None else "mark_written", payloads)

    def load_payloads(self, urls: Union[Sequence[tuple[int, int]], np.ndarray],
                      written: Union[Sequence[tuple[int, int, Sequence[tuple[int, int]]]],
                                     WrittenImages],
                      done: bool = False, only: Optional[int] = None
                      ) -> list[dict[str, np.ndarray]]:
        """Per-partition ``load`` payloads that restore URL claims ``(hash, claim)`` (pairs,
        or an array of two columns; ``done``: decided by an earlier run, claims by candidate
        key) and written images (``(id, claim, stored signatures)`` tuples or
        ``WrittenImages``). ``only``: build that partition's payload alone and leave the
        others empty: a recovering partition reads the whole journal, and selecting every
        partition's share made its work grow with the number of partitions
        (``bench/bench_index_recovery.py``)."""
        parts = range(self.k) if only is None else (only,)
        u = np.asarray(urls, dtype=U64).reshape(-1, 2)
        upart = partition_of(u[:, 0], self.k)
        w = written if isinstance(written, WrittenImages) else WrittenImages.of(written)
        xpart = partition_of(mix64(w.ids), self.k)
        payloads: list[dict[str, np.ndarray]] = [{} for _ in range(self.k)]
        for p in parts:
            payloads[p] = {"u_hash": u[upart == p, 0], "u_claim": u[upart == p, 1],
                           "u_done": np.array([done]),
                           "x_id": w.ids[xpart == p], "x_claim": w.claims[xpart == p]}
        if self.near and len(w.sig_pos):
            keys, _ = self.scheme.keys(w.sig_a, w.sig_b)
            flat = keys.ravel()
            rep = np.repeat(np.arange(len(w.sig_pos)), self.scheme.n_keys)
            part = partition_of(flat, self.k)
            for p in parts:
                sel = part == p
                r = rep[sel]
                pos = w.sig_pos[r]
                payloads[p].update(n_key=flat[sel], n_a=w.sig_a[r], n_b=w.sig_b[r],
                                   n_id=w.ids[pos], n_claim=w.claims[pos])
        return payloads


def _hand_out(items: Sequence[DedupItem], part: list[np.ndarray], pos: list[np.ndarray],
              row: list[np.ndarray]) -> None:
    """Give each item its ``filed`` entries from the partitions' ``f_pos, f_row``."""
    p = np.concatenate(part) if part else np.zeros(0, np.int32)
    q = np.concatenate(pos) if pos else np.zeros(0, np.int32)
    r = np.concatenate(row) if row else np.zeros(0, np.int64)
    order = np.argsort(q, kind="stable")
    p, r = p[order], r[order]
    bounds = np.searchsorted(q[order], np.arange(len(items) + 1)).tolist()
    for i, item in enumerate(items):
        item.filed = (p[bounds[i]:bounds[i + 1]], r[bounds[i]:bounds[i + 1]])


class LocalPartitions:
    """The partitions in this process: ``call`` for a ``DedupClient`` (the in-process runner;
    tests and benchmarks)."""

    def __init__(self, threshold: int, near: bool = True, k: int = 1, signatures: float = 0.0):
        """``signatures``: the stored signatures the whole index expects (each partition
        files about its ``1/k`` share of their keys)."""
        self.partitions = [DedupPartition(threshold, near, signatures / k) for _ in range(k)]

    async def call(self, partition: int, method: str, payload: dict[str, np.ndarray]) -> Any:
        return getattr(self.partitions[partition], method)(payload)

    def client(self) -> DedupClient:
        p0 = self.partitions[0]
        return DedupClient(p0.t, p0.near, len(self.partitions), self.call)
