"""Peak memory of validating (and hashing) one large image, in a fresh process per case.

    .venv/bin/python bench/bench_decode_memory.py [--root DIR]

The cases: a 9459x9459 PNG (just under the default ``max_pixels``; black RGB, about 270 KB),
the same as a palette PNG, and an 8000x6000 JPEG. Each runs the medium validator
(``builder.validate.ImageValidator``) once in its own Python process and prints the process's
peak RSS growth over the validation (``ru_maxrss`` after minus the RSS before: the imports and
the encoded bytes are not counted). ``--root DIR`` imports ``builder`` from DIR instead, to
measure an older version in the same command, e.g.::

    mkdir -p /tmp/pxc-old && git archive 0af2ebd builder | tar -x -C /tmp/pxc-old
    .venv/bin/python bench/bench_decode_memory.py --root /tmp/pxc-old
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "memory"

CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from builder.records import Candidate, Record
from builder.spec import ValidationSpec
from builder.validate import ImageValidator
data = open(sys.argv[2], "rb").read()
v = ImageValidator(ValidationSpec(level="medium"))
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
before = rss_kb()
r = v.check(Record(Candidate("u", "x"), data=data))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mb": (peak - before) / 1024, "rejected": r.rejected, "reason": r.reason,
                  "phash": r.phash}))
"""


def make_cases() -> dict[str, Path]:
    from PIL import Image
    OUT.mkdir(parents=True, exist_ok=True)
    cases = {"png_rgb_9459": OUT / "black_9459.png", "png_palette_9459": OUT / "pal_9459.png",
             "jpeg_8000x6000": OUT / "big.jpg"}
    if not cases["png_rgb_9459"].exists():
        Image.new("RGB", (9459, 9459)).save(cases["png_rgb_9459"], optimize=True)
    if not cases["png_palette_9459"].exists():
        Image.new("P", (9459, 9459)).save(cases["png_palette_9459"], optimize=True)
    if not cases["jpeg_8000x6000"].exists():
        small = Image.effect_mandelbrot((800, 600), (-2, -1.2, 1, 1.2), 60).convert("RGB")
        buf = io.BytesIO()
        small.resize((8000, 6000), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=85)
        cases["jpeg_8000x6000"].write_bytes(buf.getvalue())
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=REPO, help="where to import builder from")
    args = ap.parse_args()
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    for name, path in make_cases().items():
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.root), str(path)],
                             capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<18} {path.stat().st_size / 1024:8.0f} KB  peak +{res['mb']:7.0f} MB  "
              f"{'rejected ' + res['reason'] if res['rejected'] else 'accepted'}")


if __name__ == "__main__":
    main()
