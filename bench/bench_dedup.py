"""Near-duplicate accuracy on real photographs: recall per transform, distinct images lost, the
copy kept, for PixCrawler's rule, a real ``pixcrawler build --local`` and imagehash's pHash.

    .venv/bin/python bench/dedup_corpus.py                  # once: fetch the photos, cut the corpus
    .venv/bin/python bench/bench_dedup.py [--seeds 3] [--sweep 4,6,7,8,9,10] [--no-build]

1. The corpus (``bench/dedup_corpus.py``) is hashed with the medium validator
   (``builder.validate.ImageValidator``): exactly the signatures a build computes.
2. **Oracle.** For each seed the files are put in a shuffled order and replayed through the rule
   (``builder.similarity.near_distance``) by brute force, first kept wins: the decisions any exact
   index must reproduce. Printed per threshold of ``--sweep``.
3. **imagehash.** The same replay with ``imagehash.phash`` (8x8, its default) alone at 4 and 8 bits.
4. **Build.** The files are served by ``python -m http.server`` (a separate process, 127.0.0.1) in
   the seed-0 order as a URL list, and ``pixcrawler build --local`` runs over it at level medium
   with the spec's default threshold. Its rejects say which image each duplicate lost to. This
   measures the pipeline as it is (its dedup index decides), next to the oracle.

Recall for a transform: the share of its copies that do not end up kept beside another image of
their group. Lost: distinct images (tiles) none of whose files was kept. Wrong: files rejected as
duplicates of another group's image. Kept copy: which file of each group the dataset holds (first
wins), and which the best-copy ranking (``builder.similarity.best_copy``) would pick.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from bench.dedup_corpus import DEFAULT_CACHE, GOAL, TRANSFORMS, Item, build  # noqa: E402
from builder.dedup import KeyScheme  # noqa: E402
from builder.records import Candidate, Record  # noqa: E402
from builder.similarity import Copy, best_copy, decode, near_distance  # noqa: E402
from builder.spec import ValidationSpec  # noqa: E402
from builder.validate import ImageValidator  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "dedup"
Decide = Callable[[int, list[int]], Optional[int]]
"""(newcomer index, kept indices) -> the kept index it duplicates, or None."""


def hash_corpus(folder: Path, items: list[Item]) -> list[Record]:
    validator = ImageValidator(ValidationSpec(level="medium", min_side=16))
    out = []
    for it in items:
        r = validator.check(Record(Candidate(f"file:{it.name}", "bench"),
                                   data=(folder / "files" / it.name).read_bytes()))
        if r.rejected:
            raise RuntimeError(f"{it.name}: {r.reason} {r.detail}")
        r.data = None
        out.append(r)
    return out


def replay(order: list[int], decide: Decide) -> dict[int, Optional[int]]:
    """index -> the kept index it duplicates (None: kept), first kept wins."""
    kept: list[int] = []
    out: dict[int, Optional[int]] = {}
    for i in order:
        out[i] = decide(i, kept)
        if out[i] is None:
            kept.append(i)
    return out


def rule_decider(recs: list[Record], t: int) -> Decide:
    """The rule, vectorised over the kept images (``check_oracle`` holds it to the pure one)."""
    probes = np.array([decode(r.near_probes) for r in recs], dtype=np.uint64)  # (n, P, 2)
    stored = np.array([decode(r.near_stored) for r in recs], dtype=np.uint64)  # (n, S, 2)
    sha = [r.sha256 for r in recs]
    scheme = KeyScheme(t)

    def decide(i: int, kept: list[int]) -> Optional[int]:
        if not kept:
            return None
        same = [k for k in kept if sha[k] == sha[i]]
        if same:
            return same[0]
        s = stored[kept]                                   # (K, S, 2)
        x = probes[i][None, :, None, :] ^ s[:, None, :, :]  # (K, P, S, 2)
        d = np.bitwise_count(x).max(axis=-1).reshape(len(kept), -1)  # (K, P*S)
        if not scheme.exact:
            kk, ps = np.nonzero(d <= t)
            pairs = x.reshape(len(kept), -1, 2)[kk, ps]    # a and b xors of the pairs within t
            zero = np.zeros(len(pairs), dtype=np.uint64)
            unkeyed = scheme.designated(pairs[:, 0], pairs[:, 1], zero, zero) < 0
            d[kk[unkeyed], ps[unkeyed]] = t + 1
        d = d.min(axis=1)
        j = int(d.argmin())
        return kept[j] if d[j] <= t else None
    return decide


def check_oracle(recs: list[Record], t: int, pairs: int = 3000) -> None:
    """The vectorised rule must decide as ``near_distance`` does (random and close pairs)."""
    rnd = random.Random(1)
    decide = rule_decider(recs, t)
    for _ in range(pairs):
        i, k = rnd.randrange(len(recs)), rnd.randrange(len(recs))
        if i == k or recs[i].sha256 == recs[k].sha256:
            continue
        pure = near_distance(decode(recs[i].near_probes), decode(recs[k].near_stored), t)
        if (decide(i, [k]) is not None) != (pure is not None):
            raise AssertionError(f"vectorised rule disagrees with near_distance on {i}, {k}")


def phash_decider(codes: list[int], t: int) -> Decide:
    arr = np.array(codes, dtype=np.uint64)

    def decide(i: int, kept: list[int]) -> Optional[int]:
        if not kept:
            return None
        d = np.bitwise_count(arr[kept] ^ arr[i])
        j = int(d.argmin())
        return kept[j] if d[j] <= t else None
    return decide


def score(items: list[Item], dup_of: dict[int, Optional[int]]) -> dict:
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, it in enumerate(items):
        groups[it.group].append(i)
    kept = {g: [i for i in members if dup_of.get(i) is None] for g, members in groups.items()}
    missed, total = collections.Counter(), collections.Counter()
    kept_as = collections.Counter()
    for g, members in groups.items():
        ks = kept[g]
        original = next(i for i in members if items[i].transform == "original")
        rep = original if original in ks else (ks[0] if ks else None)
        if len(members) > 1 and rep is not None:
            kept_as[items[rep].transform] += 1
        for i in members:
            if items[i].transform == "original":
                continue
            total[items[i].transform] += 1
            if i in ks and i != rep:
                missed[items[i].transform] += 1
    lost = sorted(g for g, ks in kept.items() if not ks)
    wrong = sum(1 for i, k in dup_of.items() if k is not None and items[i].group != items[k].group)
    recall = {t: 1 - missed[t] / total[t] for t in TRANSFORMS if total[t]}
    return {"recall": recall, "lost": lost, "wrong": wrong, "kept_as": kept_as}


def mean_scores(scores: list[dict]) -> dict:
    recall = {t: statistics.mean(s["recall"][t] for s in scores) for t in scores[0]["recall"]}
    return {"recall": recall, "lost": statistics.mean(len(s["lost"]) for s in scores),
            "lost_names": sorted({g for s in scores for g in s["lost"]}),
            "wrong": statistics.mean(s["wrong"] for s in scores)}


def row(name: str, s: dict) -> str:
    cells = " ".join(f"{s['recall'][t]:6.3f}" for t in TRANSFORMS)
    fails = [t for t in TRANSFORMS if s["recall"][t] < GOAL[t]]
    verdict = "goals met" if not fails and not s["lost"] else \
        "below goal: " + ", ".join(fails + ([f"{s['lost']:.1f} lost"] if s["lost"] else []))
    return f"{name:<22} {cells} {s['lost']:5.1f} {s['wrong']:6.1f}  {verdict}"


def header() -> str:
    return f"{'':<22} " + " ".join(f"{t[:6]:>6}" for t in TRANSFORMS) + "  lost  wrong"


def best_copy_choice(items: list[Item], recs: list[Record],
                     dup_of: dict[int, Optional[int]]) -> collections.Counter:
    """Which transform the ranking picks in each cluster (a kept image and its duplicates)."""
    clusters: dict[int, list[int]] = collections.defaultdict(list)
    for i, k in dup_of.items():
        clusters[i if k is None else k].append(i)
    out: collections.Counter = collections.Counter()
    for members in clusters.values():
        if len(members) < 2:
            continue
        copies = {recs[i].id: i for i in members}
        pick = best_copy(Copy(recs[i].id, recs[i].width, recs[i].height, recs[i].downloaded_bytes,
                              recs[i].format, recs[i].colour, recs[i].jpeg_quality)
                         for i in members)
        out[items[copies[pick.image_id]].transform] += 1
    return out


def format_check(folder: Path, items: list[Item]) -> None:
    """Each original tile (a JPEG) against a PNG of its decoded pixels: bits apart per view."""
    import io

    from builder.hashing import hash_bytes
    worst, whole = [], []
    for it in items:
        if it.transform != "original":
            continue
        data = (folder / "files" / it.name).read_bytes()
        buf = io.BytesIO()
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB").save(buf, "PNG")
        a, b = hash_bytes(data), hash_bytes(buf.getvalue())
        d = [max((x[0] ^ y[0]).bit_count(), (x[1] ^ y[1]).bit_count())
             for x, y in zip(a.stored + a.probes, b.stored + b.probes)]
        worst.append(max(d))
        whole.append(d[0])
    n = len(worst)
    print(f"JPEG vs PNG of the same pixels ({n} tiles): whole view within 1 bit "
          f"{sum(w <= 1 for w in whole) / n:.1%} (max {max(whole)}), every view within 1 bit "
          f"{sum(w <= 1 for w in worst) / n:.1%} (max {max(worst)})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_build(folder: Path, items: list[Item], order: list[int], t: int) -> tuple[dict, float]:
    """``pixcrawler build --local`` over the files served in ``order``: index -> kept index."""
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                               "127.0.0.1", "--directory", str(folder / "files")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        urls = OUT / "urls.txt"
        urls.write_text("".join(f"{base}{items[i].name}\n" for i in order))
        spec = {
            "name": "dedup-bench", "target": len(order), "classes": {"bench": {}},
            "sources": [{"engine": "urllist", "path": str(urls), "per_page": 500,
                         "max_pages": len(order) // 500 + 2}],
            "download": {"allow_private_networks": True, "retries": 1, "respect_robots": False,
                         "per_host_concurrency": 32, "concurrency": 32},
            "validation": {"level": "medium", "min_side": 16, "near_duplicate_threshold": t},
            "output": {"uri": str(OUT / "dataset"), "formats": ["parquet"]},
        }
        spec_path = OUT / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        exe = Path(sys.executable).with_name("pixcrawler")
        t0 = time.perf_counter()
        done = subprocess.run([str(exe), "build", str(spec_path), "--local"],
                              capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        (OUT / "build.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"pixcrawler build failed ({done.returncode}); see {OUT}/build.log")
    finally:
        server.terminate()
        server.wait()
    by_name = {it.name: i for i, it in enumerate(items)}
    dup_of: dict[int, Optional[int]] = {i: None for i in order}
    ids: dict[str, int] = {}
    with open(OUT / "dataset" / "rejects.csv", newline="") as f:
        rejects = list(csv.DictReader(f))
    import pyarrow.parquet as pq
    for path in (OUT / "dataset").rglob("*.parquet"):
        if "rejects" in path.name:
            continue
        table = pq.read_table(path, columns=["id", "url"]).to_pylist()
        for r in table:
            ids[r["id"]] = by_name[r["url"].rsplit("/", 1)[1]]
    other = collections.Counter()
    for r in rejects:
        i = by_name[r["url"].rsplit("/", 1)[1]]
        if r["reason"] in ("near_duplicate", "exact_duplicate"):
            dup_of[i] = ids.get(r["duplicate_of"], i)
        else:
            dup_of[i] = i
            other[r["reason"]] += 1
    if other:
        print(f"  build: other rejects {dict(other)} (counted as not kept)")
    return dup_of, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sweep", default="4,6,7,8,9,10")
    ap.add_argument("--split", choices=["all", "dev", "test"], default="all")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    folder, all_items = build(args.cache)
    items = [it for it in all_items if args.split == "all" or it.split == args.split]
    t_default = ValidationSpec().near_duplicate_threshold
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"corpus: {folder}: {len(items)} files, {len({i.group for i in items})} distinct "
          f"tiles, {sum(i.transform != 'original' for i in items)} copies ({args.split})")
    cpu0 = time.process_time()
    recs = hash_corpus(folder, items)
    for it, r in zip(items, recs):
        r.downloaded_bytes = (folder / "files" / it.name).stat().st_size
    print(f"hashing: {len(recs) / (time.process_time() - cpu0):.0f} files/s (CPU, one process)")
    format_check(folder, items)
    check_oracle(recs, t_default)
    orders = [random.Random(seed).sample(range(len(items)), len(items))
              for seed in range(args.seeds)]
    print(f"\nrecall per transform, mean of {args.seeds} shuffled orders (goal: "
          + ", ".join(f"{g} {'/'.join(t[:6] for t in TRANSFORMS if GOAL[t] == g)}"
                      for g in sorted(set(GOAL.values()), reverse=True)) + "; 0 lost)")
    print(header())
    for t in [int(x) for x in args.sweep.split(",")]:
        s = mean_scores([score(items, replay(o, rule_decider(recs, t))) for o in orders])
        print(row(f"rule t={t}" + (" (default)" if t == t_default else ""), s))
        if s["lost_names"]:
            print(f"{'':<22} lost: {', '.join(s['lost_names'][:6])}")
    import imagehash
    codes = []
    for it in items:
        with Image.open(folder / "files" / it.name) as img:
            codes.append(int(str(imagehash.phash(img)), 16))
    for t in (4, 8):
        s = mean_scores([score(items, replay(o, phash_decider(codes, t))) for o in orders])
        print(row(f"imagehash pHash t={t}", s))
    first = replay(orders[0], rule_decider(recs, t_default))
    sc = score(items, first)
    print(f"\ncopy kept per group with copies (seed 0, t={t_default}): first wins: "
          f"{dict(sc['kept_as'].most_common())}")
    print(f"  best-copy ranking over each cluster: "
          f"{dict(best_copy_choice(items, recs, first).most_common())}")
    if args.no_build:
        return
    dup_of, wall = run_build(folder, items, orders[0], t_default)
    s = score(items, dup_of)
    print(f"\npixcrawler build --local, seed-0 order, t={t_default}: {wall:.0f} s wall")
    print(header())
    print(row("build (its index)", {**s, "lost": len(s["lost"])}))
    print(row("oracle, same order", {**sc, "lost": len(sc["lost"])}))
    agree = sum(1 for i in orders[0] if (dup_of[i] is None) == (first[i] is None))
    print(f"kept/rejected decisions equal to the oracle's: {agree}/{len(items)}")
    print(f"copy kept (build): {dict(s['kept_as'].most_common())}")
    (OUT / "summary.json").write_text(json.dumps({"build": {**s, "lost": s["lost"]},
                                                  "oracle": {**sc, "lost": sc["lost"]}},
                                                 default=dict, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
