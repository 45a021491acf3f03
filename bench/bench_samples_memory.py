"""What one request for thumbnails costs the API replica in memory.

    .venv/bin/python bench/bench_samples_memory.py [--images 100] [--mb 9] [--limit 24]
        [--code DIR ...]

Writes one Parquet shard with PixCrawler's own writer (``builder.writers.ShardWriter``): one
class, ``--images`` distinct images of ``--mb`` MB each (a small JPEG padded to the size, which
a decoder reads to its end marker), the whole shard in one row group, as a job's large images
make it. Then, for each ``--code`` checkout (default: this one), a fresh Python process imports
that checkout's ``serve.samples`` and calls ``read_samples(uri, label, limit)``, as the
samples route does, and prints the peak RSS it added (the process's ``VmHWM`` after the call
less before it) and the thumbnails it returned. To compare with an earlier commit:

    git worktree add /tmp/before COMMIT
    .venv/bin/python bench/bench_samples_memory.py --code . --code /tmp/before
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from builder.spec import OutputSpec
from builder.writers import ShardWriter

ROOT = Path(__file__).resolve().parents[1]
LABEL = "cat"

CHILD = """
import json, sys
from serve.samples import read_samples
def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
before = hwm()
found = read_samples(sys.argv[1], sys.argv[2], int(sys.argv[3]))
after = hwm()
print(json.dumps({"added_mib": after - before, "peak_mib": after,
                  "thumbnails": len(found.samples)}))
"""


def image(i: int, size: int) -> bytes:
    """A distinct valid JPEG padded to ``size`` bytes."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(out, "JPEG")
    data = out.getvalue()
    return data + i.to_bytes(4, "little") * ((size - len(data)) // 4)


def write_dataset(root: Path, images: int, size: int) -> None:
    rows = []
    for i in range(images):
        data = image(i, size)
        rows.append({"id": hashlib.sha256(data).hexdigest()[:16], "label": LABEL,
                     "split": "train", "image": data, "format": "jpeg", "width": 32,
                     "height": 32, "bytes": len(data)})
    journal = SimpleNamespace(write_shard_intent=lambda *a: None, write_shard=lambda *a: None)
    ShardWriter(OutputSpec(formats=["parquet"]), str(root), [LABEL]).write(
        rows, "train", 0, journal)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--mb", type=float, default=9.0)
    ap.add_argument("--limit", type=int, default=24, help="thumbnails asked for")
    ap.add_argument("--code", action="append", help="a checkout whose serve.samples to run")
    args = ap.parse_args()
    size = int(args.mb * 1_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "dataset"
        write_dataset(root, args.images, size)
        shard = sum(p.stat().st_size for p in root.rglob("*.parquet"))
        print(f"one shard, one row group: {args.images} images of {args.mb:g} MB "
              f"({shard / 2**20:.0f} MiB); {args.limit} thumbnails asked for")
        for code in args.code or [str(ROOT)]:
            out = subprocess.run([sys.executable, "-c", CHILD, str(root), LABEL,
                                  str(args.limit)], cwd=code, env={"PYTHONPATH": code},
                                 capture_output=True, text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{code}: +{got['added_mib']:.0f} MiB peak RSS (peak {got['peak_mib']:.0f} "
                  f"MiB), {got['thumbnails']} thumbnails")


if __name__ == "__main__":
    main()
