"""serve.samples and the samples route without Ray: what one request for thumbnails may cost
the API's replica, and whose images it shows."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import io
import json
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from builder.records import ACCEPTED_SCHEMA
from builder.spec import OutputSpec, parse_spec
from builder.writers import ShardWriter
from serve import samples
from serve.app import JobAPI
from serve.auth import ANONYMOUS, Authenticator, RateLimiter
from serve.cache import ReadCache
from serve.errors import ApiError
from serve.samples import MAX_SAMPLES, Found, Marker, SampleCache, SamplesBusy, thumbnail
from serve.store import JobStore

ROUTE = JobAPI.func_or_class
REQUEST = SimpleNamespace(headers={})


def encoded(size: tuple[int, int], fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("L", size, 128).save(out, fmt)
    return out.getvalue()


def jpeg(color: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(out, "JPEG")
    return out.getvalue()


def spec_of(labels: list[str], name: str = "pets", **output: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "target": 5, "sources": [{"engine": "duckduckgo"}]}
    if any("/" in label for label in labels):
        spec["categories"] = {}
        for label in labels:
            top, leaf = label.split("/")
            spec["categories"].setdefault(top, {})[leaf] = [leaf]
    else:
        spec["classes"] = {label: [label] for label in labels}
    if output:
        spec["output"] = output
    return spec


def write_parquet(root: Path, rows: list[tuple[str, str]], color: str,
                  row_group_size: Optional[int] = None) -> None:
    """``rows``: (id, label) pairs, one shard."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": [i for i, _ in rows], "label_name": [lb for _, lb in rows],
                      "split": ["train"] * len(rows),
                      "image": [{"bytes": jpeg(color), "path": "x.jpg"}] * len(rows)})
    pq.write_table(table, root / "data" / "train-00000.parquet", row_group_size=row_group_size)


def mark(root: Path, job_id: str, marker: str = "_SUCCESS") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / marker).write_text(json.dumps({"job_id": job_id, "created": time.time_ns()}))


class Replica:
    """What the samples route uses of a JobAPI replica: these attributes, the class's
    methods (an instance of the Serve class itself is an ASGI wrapper)."""

    def __getattr__(self, name: str) -> Any:
        return inspect.getattr_static(ROUTE, name).__get__(self, ROUTE)


class Api:
    """A replica of the API for the samples route, without Ray, on a SQLite store."""

    def __init__(self, tmp: Path, cache: Optional[SampleCache] = None):
        api = Replica()
        api.store = JobStore(f"sqlite:///{tmp / 'jobs.db'}")
        api.auth = Authenticator(api.store, enabled=False)
        api.limiter = RateLimiter(0, 1)
        api.reads = ReadCache(0.0)
        api.samples = cache or SampleCache()
        self.api = api

    def job(self, job_id: str, spec: dict[str, Any], uri: Path, state: str = "succeeded",
            queued: bool = False, **fields: Any) -> None:
        data = parse_spec(spec).model_dump(mode="json")
        self.api.store.create_job(job_id, ANONYMOUS, data["name"], data, str(uri),
                                  queued=queued)
        if state == "cancelled" and queued:
            assert self.api.store.cancel_queued(job_id)
        else:
            self.api.store.update_job(job_id, state=state, **fields)

    async def get(self, job_id: str, label: Optional[str] = None,
                  limit: int = 24) -> dict[str, Any]:
        return await ROUTE.samples(self.api, job_id, REQUEST, label, limit)

    def run(self, job_id: str, label: Optional[str] = None, limit: int = 24) -> dict[str, Any]:
        return asyncio.run(self.get(job_id, label, limit))


def ids(answer: dict[str, Any]) -> list[str]:
    return [s["id"] for s in answer["samples"]]


def slow_reads(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[tuple]:
    """Every sample read takes ``seconds`` longer (blocking its thread); returns the reads."""
    real, reads = samples.read_samples, []

    def read(*args: Any) -> Any:
        reads.append(args)
        time.sleep(seconds)
        return real(*args)

    monkeypatch.setattr(samples, "read_samples", read)
    return reads


def test_a_huge_image_is_left_out_unless_a_reduced_decode_makes_it_small():
    """A PNG of up to 89 Mpx (validation.max_pixels) was decoded whole for its thumbnail, in
    the replica, up to 200 per request."""
    assert thumbnail(encoded((6000, 5000), "PNG")) is None
    assert thumbnail(encoded((6000, 5000), "JPEG")).startswith("data:image/jpeg;base64,")
    assert thumbnail(encoded((400, 300), "PNG")).startswith("data:image/jpeg;base64,")


def test_a_non_jpeg_image_over_8_mpx_is_left_out():
    """The budget was 25 Mpx: 0.3 s of CPU per PNG or WebP, up to 200 per request."""
    assert thumbnail(encoded((3000, 3000), "PNG")) is None
    assert thumbnail(encoded((3000, 3000), "JPEG")).startswith("data:image/jpeg;base64,")
    assert thumbnail(encoded((2800, 2800), "PNG")).startswith("data:image/jpeg;base64,")


def test_answers_are_cached_by_job_and_label_whatever_the_limit(monkeypatch):
    """The cache was keyed by limit too: each limit from 1 to 200 read the dataset again."""
    reads = []

    def read(uri, fingerprint, label, limit, labels):
        reads.append(limit)
        return Found([{"id": str(i)} for i in range(min(limit, 30))])

    monkeypatch.setattr(samples, "dataset_marker", lambda uri: Marker("j", "fp"))
    monkeypatch.setattr(samples, "_read_unchanged", read)

    async def scenario() -> None:
        cache = SampleCache()

        async def count(label: str, n: int) -> int:
            return len((await cache.get("j", "u", label, n)).samples)

        assert await count("cat", 5) == 5
        assert [await count("cat", n) for n in range(1, 6)] == [1, 2, 3, 4, 5]
        assert await count("cat", 24) == 24 and reads == [5, MAX_SAMPLES]
        assert [await count("cat", n) for n in (100, 200, 7)] == [30, 30, 7]
        assert reads == [5, MAX_SAMPLES]  # the dataset has 30: nothing more to read
        await count("dog", 3)
        assert reads == [5, MAX_SAMPLES, 3]

    asyncio.run(scenario())


def test_one_keys_reads_leave_the_others_to_other_keys(monkeypatch):
    """One key asking for class after class of large images (a read goes on after its
    request goes away) held both of the replica's reads, and every other key got 429s. A
    key's reads now run one at a time; with auth off (no key) they are not counted."""
    def read(uri, fingerprint, label, limit, labels):
        time.sleep(1.5)  # the queue's wait runs out well before a read ends, even under load
        return Found([{"id": label}])

    monkeypatch.setattr(samples, "dataset_marker", lambda uri: Marker("j", "fp"))
    monkeypatch.setattr(samples, "_read_unchanged", read)

    async def scenario(alice: Optional[str], bob: Optional[str]) -> list[Any]:
        cache = SampleCache(queue_s=0.8)
        hers = [asyncio.create_task(cache.get("j", "u", f"a{i}", 1, owner=alice))
                for i in range(3)]
        await asyncio.sleep(0.1)
        his = asyncio.create_task(cache.get("j", "u", "b", 1, owner=bob))
        return await asyncio.gather(*hers, his, return_exceptions=True)

    answers = asyncio.run(scenario("alice", "bob"))
    assert [isinstance(a, SamplesBusy) for a in answers] == [False, True, True, False]
    assert answers[-1].samples == [{"id": "b"}]
    answers = asyncio.run(scenario(None, None))  # auth off: the replica's two reads, shared
    assert [isinstance(a, SamplesBusy) for a in answers] == [False, False, True, True]


def test_a_request_waits_queue_s_in_all_for_its_keys_read_and_the_replicas(monkeypatch):
    """A request that waited for its key's read, then for one of the replica's, waited up
    to twice ``queue_s`` before its 429."""
    def read(uri, fingerprint, label, limit, labels):
        time.sleep({"a0": 0.75}.get(label, 2.25))
        return Found([{"id": label}])

    monkeypatch.setattr(samples, "dataset_marker", lambda uri: Marker("j", "fp"))
    monkeypatch.setattr(samples, "_read_unchanged", read)

    async def scenario() -> float:
        cache = SampleCache(queue_s=1.0)
        first = asyncio.create_task(cache.get("j", "u", "a0", 1, owner="alice"))
        others = [asyncio.create_task(cache.get("j", "u", f"c{i}", 1, owner=f"c{i}"))
                  for i in range(2)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(SamplesBusy):
            await cache.get("j", "u", "a1", 1, owner="alice")  # alice's, then a replica's
        waited = time.monotonic() - started
        await asyncio.gather(first, *others, return_exceptions=True)
        return waited

    assert asyncio.run(scenario()) < 1.4  # waiting twice would be about 0.7 + 1.0


def test_a_burst_of_sample_reads_leaves_the_event_loop_s_executor_free(tmp_path, monkeypatch):
    """Each request held a thread of the loop's default executor while it waited for one of
    the two reads: a burst of them made every other to_thread call of the replica (auth,
    store reads, /healthz) wait, 7.9 s in a reproduction."""
    labels = [f"c{i}" for i in range(12)]
    uri = tmp_path / "pets"
    write_parquet(uri, [(f"{label}-1", label) for label in labels], "red")
    mark(uri, "pets-00000001")
    api = Api(tmp_path)
    api.job("pets-00000001", spec_of(labels), uri)
    slow_reads(monkeypatch, 0.9)  # waiting for a held thread would take about 0.8 s

    async def scenario() -> float:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=4))
        burst = [asyncio.create_task(api.get("pets-00000001", label)) for label in labels]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await asyncio.to_thread(lambda: None)
        waited = time.monotonic() - started
        answers = await asyncio.gather(*burst)
        assert [ids(a) for a in answers] == [[f"{label}-1"] for label in labels]
        return waited

    assert asyncio.run(scenario()) < 0.4


def test_a_request_waits_a_bounded_time_for_a_read_then_answers_429(tmp_path, monkeypatch):
    labels = [f"c{i}" for i in range(6)]
    uri = tmp_path / "pets"
    write_parquet(uri, [(f"{label}-1", label) for label in labels], "red")
    mark(uri, "pets-00000001")
    api = Api(tmp_path, SampleCache(queue_s=0.1))
    api.job("pets-00000001", spec_of(labels), uri)
    slow_reads(monkeypatch, 0.5)

    async def scenario() -> list[Any]:
        return await asyncio.gather(*(api.get("pets-00000001", label) for label in labels),
                                    return_exceptions=True)

    answers = asyncio.run(scenario())
    refused = [a for a in answers if isinstance(a, ApiError)]
    assert len(refused) == 4 and len([a for a in answers if isinstance(a, dict)]) == 2
    for exc in refused:
        assert exc.status == 429 and exc.body()["error"]["code"] == "samples_busy"
        assert exc.headers["Retry-After"] == str(samples.BUSY_RETRY_S)


def test_identical_requests_at_the_same_time_share_one_read(tmp_path, monkeypatch):
    uri = tmp_path / "pets"
    write_parquet(uri, [(f"cat-{i}", "cat") for i in range(3)], "red")
    mark(uri, "pets-00000001")
    api = Api(tmp_path)
    api.job("pets-00000001", spec_of(["cat"]), uri)
    reads = slow_reads(monkeypatch, 0.3)

    async def scenario() -> list[dict[str, Any]]:
        return await asyncio.gather(*(api.get("pets-00000001", "cat") for _ in range(8)))

    assert [ids(a) for a in asyncio.run(scenario())] == [["cat-0", "cat-1", "cat-2"]] * 8
    assert len(reads) == 1


def test_a_label_s_images_are_read_only_from_row_groups_that_hold_it(tmp_path, monkeypatch):
    """The label filter read the image column of every row, then dropped other labels'."""
    uri = tmp_path / "pets"
    rows = [(f"dog-{i}", "dog") for i in range(8)] + [(f"cat-{i}", "cat") for i in range(4)]
    write_parquet(uri, rows, "red", row_group_size=4)
    mark(uri, "pets-00000001")
    image_reads: list[Any] = []

    class Spy(pq.ParquetFile):
        def iter_batches(self, *args: Any, **kwargs: Any) -> Any:
            if "image" in (kwargs.get("columns") or ()):
                image_reads.append(kwargs.get("row_groups"))
            return super().iter_batches(*args, **kwargs)

        def read_row_group(self, i: int, *args: Any, **kwargs: Any) -> Any:
            if "image" in (kwargs.get("columns") or ()):
                image_reads.append([i])
            return super().read_row_group(i, *args, **kwargs)

    monkeypatch.setattr(samples.pq, "ParquetFile", Spy)
    api = Api(tmp_path)
    api.job("pets-00000001", spec_of(["cat", "dog"]), uri)
    assert sorted(ids(api.run("pets-00000001", "cat"))) == [f"cat-{i}" for i in range(4)]
    assert image_reads == [[2]]


def test_a_job_s_thumbnails_are_never_another_job_s(tmp_path):
    """The cache was keyed by output URI and label: after a second job overwrote the output,
    its request got the first job's images; a job cancelled before it started, with the same
    output, answered ready with them too."""
    uri = tmp_path / "pets"
    api = Api(tmp_path)
    spec = spec_of(["cat"])
    write_parquet(uri, [(f"red{i}", "cat") for i in range(3)], "red")
    mark(uri, "pets-00000001")
    api.job("pets-00000001", spec, uri)
    assert ids(api.run("pets-00000001", "cat")) == ["red0", "red1", "red2"]

    (uri / "_SUCCESS").unlink()  # the second job (output.overwrite: true) starts
    write_parquet(uri, [(f"blue{i}", "cat") for i in range(2)], "blue")
    mark(uri, "pets-00000002")
    api.job("pets-00000002", spec, uri)
    assert ids(api.run("pets-00000002", "cat")) == ["blue0", "blue1"]

    api.job("pets-00000003", spec, uri, state="cancelled", queued=True)
    for job_id in ("pets-00000001", "pets-00000003"):
        with pytest.raises(ApiError) as err:
            api.run(job_id, "cat")
        assert err.value.status == 409 and err.value.code == "no_dataset"
        assert "pets-00000002" in err.value.message
    assert "cancelled before it started" in err.value.message


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_imagefolder_folders_map_back_to_their_labels(tmp_path, layout):
    """A hierarchical class written flat went to mammals__dog/: ?label=mammals/dog found
    nothing and the unfiltered answer labelled them mammals__dog."""
    uri = tmp_path / "zoo"
    folder = "mammals__dog" if layout == "flat" else "mammals/dog"
    for label_folder, name in ((folder, "dog"), ("birds__owl" if layout == "flat"
                                                 else "birds/owl", "owl")):
        d = uri / "imagefolder" / "train" / label_folder
        d.mkdir(parents=True)
        for i in range(2):
            (d / f"{name}{i}.jpg").write_bytes(jpeg("green"))
        (d / f"{name}0.json").write_text("{}")  # a per-image label file: no image
    mark(uri, "zoo-00000001")
    api = Api(tmp_path)
    api.job("zoo-00000001", spec_of(["mammals/dog", "birds/owl"], name="zoo",
                                    formats=["imagefolder"], imagefolder_labels=layout), uri)
    dogs = api.run("zoo-00000001", "mammals/dog")
    assert dogs["ready"] and ids(dogs) == ["dog0", "dog1"]
    assert {s["label"] for s in dogs["samples"]} == {"mammals/dog"}
    every = api.run("zoo-00000001")
    assert {s["label"] for s in every["samples"]} == {"mammals/dog", "birds/owl"}


def write_tar(path: Path, rows: list[tuple[str, str]]) -> None:
    """A WebDataset shard as builder.writers writes one: {id}.jpg, {id}.cls, {id}.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, label in rows:
            meta = json.dumps({"id": key, "label": label, "split": "train"}).encode()
            for name, data in ((f"{key}.jpg", jpeg("blue")), (f"{key}.cls", b"0"),
                               (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_webdataset_only_dataset_shows_its_thumbnails(tmp_path, monkeypatch):
    """Such a dataset answered an empty list, which the page shows as 'no accepted images'."""
    uri = tmp_path / "pets"
    write_tar(uri / "webdataset" / "train-00000.tar",
              [(f"dog{i}", "dog") for i in range(5)] + [("cat0", "cat"), ("cat1", "cat")])
    mark(uri, "pets-00000001")
    api = Api(tmp_path)
    api.job("pets-00000001", spec_of(["cat", "dog"], formats=["webdataset"]), uri)
    cats = api.run("pets-00000001", "cat")
    assert cats["ready"] and ids(cats) == ["cat0", "cat1"] and "message" not in cats
    assert ids(api.run("pets-00000001", limit=3)) == ["dog0", "dog1", "dog2"]
    monkeypatch.setattr(samples, "TAR_SCAN_SAMPLES", 4)
    api.api.samples = SampleCache()
    cats = api.run("pets-00000001", "cat")
    assert cats["samples"] == [] and "only the first 4 images" in cats["message"]


def test_a_failed_job_answers_409_unless_it_wrote_a_partial_dataset(tmp_path):
    """A failed job answered 200 'thumbnails are there once the job has written its
    dataset', which never happens."""
    api = Api(tmp_path)
    spec = spec_of(["cat"])
    api.job("pets-00000001", spec, tmp_path / "none", state="failed", error="boom")
    with pytest.raises(ApiError) as err:
        api.run("pets-00000001", "cat")
    assert err.value.status == 409 and err.value.code == "no_dataset"
    assert "failed (boom)" in err.value.message

    uri = tmp_path / "partial"
    write_parquet(uri, [("cat0", "cat")], "red")
    mark(uri, "pets-00000002", "_PARTIAL")
    api.job("pets-00000002", spec, uri, state="failed", error="lost a node")
    assert ids(api.run("pets-00000002", "cat")) == ["cat0"]

    api.job("pets-00000003", spec, tmp_path / "later", state="running")
    running = api.run("pets-00000003", "cat")
    assert running["ready"] is False and running["samples"] == []
    assert not os.path.exists(tmp_path / "later")


def padded_jpeg(color: str, size: int) -> bytes:
    """A valid JPEG of ``size`` bytes: a decoder stops at its end and ignores the padding."""
    data = jpeg(color)
    return data + bytes(size - len(data))


def write_shard(root: Path, images: list[tuple[str, bytes]]) -> list[str]:
    """``images``: (label, bytes) rows, one shard written by PixCrawler's own writer (one
    row group, its images uncompressed in one page); returns the rows' ids."""
    rows = [{"id": hashlib.sha256(data).hexdigest()[:16], "label": label, "split": "train",
             "image": data, "format": "jpeg", "width": 32, "height": 32, "bytes": len(data)}
            for label, data in images]
    journal = SimpleNamespace(write_shard_intent=lambda *a: None, write_shard=lambda *a: None)
    labels = sorted({label for label, _ in images})
    ShardWriter(OutputSpec(formats=["parquet"]), str(root), labels).write(rows, "train", 0,
                                                                           journal)
    return [row["id"] for row in rows]


class CountingFS:
    """A filesystem whose files count what is read from them (``counts``: each read's size)."""

    def __init__(self, fs: Any, counts: list[int]):
        self.fs = fs
        self.counts = counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fs, name)

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        f = self.fs.open(path, mode, **kwargs)
        read = f.read

        def counted(*args: Any) -> bytes:
            data = read(*args)
            self.counts.append(len(data))
            return data

        f.read = counted
        return f

    def cat_file(self, path: str, *args: Any, **kwargs: Any) -> bytes:
        data = self.fs.cat_file(path, *args, **kwargs)
        self.counts.append(len(data))
        return data


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every read of the sample reads' files, from now on."""
    real, counts = samples.open_fs, []

    def open_fs(uri: str) -> tuple[CountingFS, str]:
        fs, root = real(uri)
        return CountingFS(fs, counts), root

    monkeypatch.setattr(samples, "open_fs", open_fs)
    return counts


def test_an_image_over_the_byte_cap_is_left_out_unread(tmp_path, monkeypatch):
    """The image column was read in batches of 64 rows of a 100-row group, all in one page:
    a request held every image of the group (up to 100 x download.max_bytes, 2 GB) to show
    one thumbnail."""
    uri = tmp_path / "pets"
    big = samples.THUMB_MAX_BYTES + 1
    images = [("cat", jpeg(color)) for color in ("red", "green", "blue", "white")]
    images[1:1] = [("cat", padded_jpeg(color, big)) for color in ("black", "gray", "pink")]
    ids_written = write_shard(uri, images)
    mark(uri, "pets-00000001")
    api = Api(tmp_path)
    api.job("pets-00000001", spec_of(["cat"]), uri)
    counts = count_reads(monkeypatch)
    answer = api.run("pets-00000001", "cat")
    small = {i for i, (_, data) in zip(ids_written, images) if len(data) < big}
    assert answer["ready"] and set(ids(answer)) == small and len(ids(answer)) == 4
    assert sum(counts) < 200_000  # the big images hold 3 x 8 MB


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset"])
def test_an_image_over_the_byte_cap_is_left_out_unread_in_every_format(tmp_path, monkeypatch,
                                                                        fmt):
    """Only the Parquet reader kept to the cap: an ImageFolder file or a WebDataset member
    (re-encoded at quality 100: 100 MB and more) was read whole for its thumbnail."""
    uri = tmp_path / "pets"
    monkeypatch.setattr(samples, "THUMB_MAX_BYTES", 200_000)
    images = [("cat0", jpeg("red")), ("cat1", padded_jpeg("black", 300_000)),
              ("cat2", jpeg("blue"))]
    if fmt == "imagefolder":
        folder = uri / "imagefolder" / "train" / "cat"
        folder.mkdir(parents=True)
        for key, data in images:
            (folder / f"{key}.jpg").write_bytes(data)
    else:
        (uri / "webdataset").mkdir(parents=True)
        with tarfile.open(uri / "webdataset" / "train-00000.tar", "w",
                          format=tarfile.USTAR_FORMAT) as tar:
            for key, data in images:
                meta = json.dumps({"id": key, "label": "cat", "split": "train"}).encode()
                for name, body in ((f"{key}.jpg", data), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
    mark(uri, "pets-00000001")
    api = Api(tmp_path)
    api.job("pets-00000001", spec_of(["cat"], formats=[fmt]), uri)
    counts = count_reads(monkeypatch)
    answer = api.run("pets-00000001", "cat")
    assert answer["ready"] and sorted(ids(answer)) == ["cat0", "cat2"]
    assert sum(counts) < 100_000


@pytest.mark.parametrize("options", [
    {"data_page_version": "1.0"},
    {"data_page_version": "2.0"},
    {"data_page_version": "1.0", "write_batch_size": 1, "data_page_size": 1},
    {"data_page_version": "2.0", "write_batch_size": 1, "data_page_size": 1},
], ids=["v1", "v2", "v1-page-per-image", "v2-page-per-image"])
def test_each_image_is_read_alone_from_its_page(tmp_path, monkeypatch, options):
    """Every Parquet data page layout of uncompressed PLAIN images, with null images (a null
    struct, and a null ``bytes`` in one) and one over the cap: exactly the label's images of
    at most ``THUMB_MAX_BYTES`` are read, without reading any row group whole."""
    monkeypatch.setattr(samples, "THUMB_MAX_BYTES", 2_000)
    colors = ["red", "green", "blue", "white", "black", "gray", "pink", "navy", "teal"]
    data = [jpeg(color) for color in colors]
    data[2] = padded_jpeg("olive", 2_001)
    image: list[Optional[dict[str, Any]]] = [{"bytes": d, "path": f"{i}.jpg"}
                                             for i, d in enumerate(data)]
    image[4], image[6] = None, {"bytes": None, "path": "6.jpg"}
    labels = ["cat", "dog", "cat", "dog", "cat", "dog", "cat", "cat", "cat"]
    table = pa.table({"id": [f"r{i}" for i in range(9)], "label_name": labels,
                      "split": ["train"] * 9,
                      "image": pa.array(image, ACCEPTED_SCHEMA.field("image").type)})
    uri = tmp_path / "pets"
    (uri / "data").mkdir(parents=True)
    pq.write_table(table, uri / "data" / "train-00000.parquet", row_group_size=5,
                   compression="none", use_dictionary=False, **options)

    def whole(*args: Any) -> Any:
        raise AssertionError("a row group's images were read whole")

    monkeypatch.setattr(samples, "_whole_group_images", whole)
    monkeypatch.setattr(samples, "thumbnail",
                        lambda b: hashlib.sha256(b).hexdigest() if b else None)
    found = samples.read_samples(str(uri), "cat", 24)
    assert [(s["id"], s["thumbnail"]) for s in found.samples] == [
        (f"r{i}", hashlib.sha256(data[i]).hexdigest()) for i in (0, 7, 8)]
    assert ids({"samples": samples.read_samples(str(uri), None, 2).samples}) == ["r0", "r1"]


def test_compressed_images_are_read_whole_only_under_a_budget(tmp_path, monkeypatch):
    """A shard whose images cannot be read alone (zstd: not as PixCrawler writes them) is read
    a row group at a time, and only a group whose images take ``CHUNK_READ_BYTES`` or less."""
    monkeypatch.setattr(samples, "CHUNK_READ_BYTES", 50_000)
    data = [jpeg("red"), jpeg("green"), padded_jpeg("blue", 60_000), jpeg("white")]
    table = pa.table({"id": [f"r{i}" for i in range(4)], "label_name": ["cat"] * 4,
                      "split": ["train"] * 4,
                      "image": [{"bytes": d, "path": f"{i}.jpg"} for i, d in enumerate(data)]})
    uri = tmp_path / "pets"
    (uri / "data").mkdir(parents=True)
    pq.write_table(table, uri / "data" / "train-00000.parquet", row_group_size=2,
                   compression="zstd", use_dictionary=False)
    assert ids({"samples": samples.read_samples(str(uri), "cat", 24).samples}) == ["r0", "r1"]


def test_an_unreadable_dataset_answers_502_and_the_reason_goes_to_the_log(tmp_path, caplog):
    """The 502 quoted the storage error to the API user: for an object store that can name
    the endpoint, the bucket layout and the operator's credentials' trouble."""
    uri = tmp_path / "pets"
    api = Api(tmp_path)
    write_parquet(uri, [(f"red{i}", "cat") for i in range(3)], "red")
    mark(uri, "pets-00000001")
    api.job("pets-00000001", spec_of(["cat"]), uri)
    (shard,) = (uri / "data").glob("*.parquet")
    shard.write_bytes(shard.read_bytes()[:40] + b"\0" * 200 + b"PAR1")
    with caplog.at_level("WARNING", logger="pixcrawler.serve"):
        with pytest.raises(ApiError) as err:
            api.run("pets-00000001", "cat")
    assert err.value.status == 502 and err.value.code == "output_unreadable"
    assert "pets-00000001" in err.value.message and "server's log" in err.value.message
    assert str(tmp_path) not in err.value.message
    logged = [r.getMessage() for r in caplog.records if "pets-00000001" in r.getMessage()]
    assert logged and str(tmp_path) in logged[0]
