"""Regenerates bench/wwwroot: files of known sizes with deterministic content, and their sha256.

The files ship in the repository; this script documents how they were made and can check them:
`python bench/make_wwwroot.py --check` exits 1 when a file differs from what the seed gives.
Content comes from a seeded PRNG (random.Random.randbytes is stable across CPython versions for a
given seed), so anyone can regenerate byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from pathlib import Path

WWWROOT = Path(__file__).resolve().parent / "wwwroot"
SEED = 2026
# name -> size in bytes: small (request-bound), medium, large (throughput-bound).
SIZES: dict[str, int] = {"1k.bin": 1024, "100k.bin": 100 * 1024, "10m.bin": 10 * 1024 * 1024}
INDEX = """<!DOCTYPE html>
<html>
<head><title>l4lb: served through the VIP 20.0.0.1</title></head>
<body>
<h1>Hello from behind the load balancer</h1>
<p>This page was served by a backend on the VIP 20.0.0.1; the answer came back directly (DSR).</p>
<ul>
<li><a href="1k.bin">1k.bin</a> (1024 bytes)</li>
<li><a href="100k.bin">100k.bin</a> (102400 bytes)</li>
<li><a href="10m.bin">10m.bin</a> (10485760 bytes)</li>
</ul>
</body>
</html>
"""


def content(name: str) -> bytes:
    """The bytes a file should hold: the index page, or seeded PRNG bytes of its size."""
    if name == "index.html":
        return INDEX.encode()
    # One generator per file, seeded by the global seed and the name, so files are independent.
    rng = random.Random(f"{SEED}:{name}")
    return rng.randbytes(SIZES[name])


def names() -> list[str]:
    return ["index.html", *SIZES]


def sums_text() -> str:
    return "".join(f"{hashlib.sha256(content(n)).hexdigest()}  {n}\n" for n in names())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify the files instead of writing")
    args = ap.parse_args(argv)
    bad = []
    for name in [*names(), "SHA256SUMS"]:
        want = sums_text().encode() if name == "SHA256SUMS" else content(name)
        path = WWWROOT / name
        if args.check:
            if not path.is_file() or path.read_bytes() != want:
                bad.append(name)
        else:
            WWWROOT.mkdir(parents=True, exist_ok=True)
            path.write_bytes(want)
    if bad:
        print(f"make_wwwroot: differ from seed {SEED}: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
