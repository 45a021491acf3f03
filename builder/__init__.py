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

for _name, _value in ARROW_ALLOCATOR_ENV.items():
    os.environ.setdefault(_name, _value)
