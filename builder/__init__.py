"""PixCrawler's domain core: spec, records, sources, fetching, validation, dedup, writers.

Nothing in this package imports ray (see DESIGN.md): it runs and tests in-process.
"""

import os

__version__ = "0.1.0"

ARROW_ALLOCATOR_ENV = {"MIMALLOC_ARENA_EAGER_COMMIT": "0"}
"""pyarrow's allocator (mimalloc 3) reserves arenas of 1 GiB as transparent huge pages and, by
default, commits them eagerly. A job's Arrow buffers (the rows of each unit, the shards) come
and go every few milliseconds: the allocator hands their spans back to the OS, and the next
buffer there faults in a whole 2 MiB page, which the kernel zeroes. That zeroing was a fifth
of the in-process runner's CPU (bench/README.md, twelfth session). Committed on demand, the
spans fault in 4 KiB pages and the job needs about a fifth less CPU. mimalloc reads its
options once, when pyarrow loads, so they are set here, before any module of the package
imports pyarrow, for this process and the processes it starts (worker processes, an embedded
Ray's workers); a value already in the environment is kept."""

NUMPY_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1"}
"""One thread for numpy's matrix products (OpenBLAS, in numpy's wheels). The package's
parallelism is its processes, one per core, and Ray gives its workers one such thread too
(OMP_NUM_THREADS). OpenBLAS's own threads wake for any product of more than about 260,000
multiplications, such as the luma grid of a photo over about 2,000 px
(``builder.hashing.grid_weights``), and then only contend with the other processes: a
4000x3000 JPEG's hashes took 23 ms of CPU with them against 12.4 ms with one thread. OpenBLAS
reads the setting when numpy loads, so it is set here with the allocator's, for this process
and the ones it starts; a value already in the environment is kept. PyTorch's and
onnxruntime's threads (the slow level's models) are their own, and this leaves them alone."""

NUMPY_HUGEPAGE_ENV = {"NUMPY_MADVISE_HUGEPAGE": "0"}
"""No transparent huge pages for numpy's arrays. numpy asks for them for every array of 4 MiB
and more: here, the dedup index's tables (``builder.dedup.Multimap``), which double as the
index grows. Each new table faults in 2 MiB pages that the kernel zeroes, as pyarrow's arenas
did above, and how long that takes depends on whether the kernel has huge pages ready. On the
machine we measure on, growing one table (``bench/bench_index_growth.py``) took a median
1.29 s of CPU with them against 0.76 s without at 4M keys (about 20,000 photos; 0.57-2.0 s
against 0.74-0.78 s), 17.1 s against 7.8 s at 32M keys, while lookups in the grown table were
12% faster with them. Over the 20,000-photo bench the runner's index calls took 2.4-3.1 s
with them, 1.7 s without. Where huge pages come cheap they can win: an earlier measurement
here filled a 10M-image partition in 148 s with them against 317 s without (bench/README.md,
"The partitions as Ray actors, and huge pages"); set the variable to 1 for such an index.
numpy reads it when it loads, so it is set here with the others; a value already in the
environment is kept."""

for _name, _value in {**ARROW_ALLOCATOR_ENV, **NUMPY_THREAD_ENV, **NUMPY_HUGEPAGE_ENV}.items():
    os.environ.setdefault(_name, _value)
