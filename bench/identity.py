"""A large model file's content identity: the first lookup hashes every byte, the second reads only the index.

Writes a file of `--gb` GB (sparse, with a random 1 MiB every 64 MiB so its hash depends on its content; `--random`
writes it all random, slower to make), then looks its identity up three times, each in a fresh child process so the
in-process memo plays no part: the first hashes the file (BLAKE3, all cores), the second and third find it in the
run store's index by (real path, size, mtime, inode). Bytes read are the child's `rchar` (/proc/self/io: everything
read through read(), from disk or page cache).

Run: .venv/bin/python bench/identity.py [--gb 12] [--random] [--folder DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from trainer_core.content_hash import ContentIndex, content_identity
def rchar():
    return int(next(l for l in open('/proc/self/io') if l.startswith('rchar')).split()[1])
before, t0 = rchar(), time.perf_counter()
digest = content_identity({path!r}, ContentIndex({store!r}))
print(json.dumps({{"seconds": time.perf_counter() - t0, "bytes": rchar() - before, "digest": digest}}))
"""


def write_file(path: Path, gb: float, random: bool) -> None:
    size, block, step = int(gb * 1e9), 1 << 20, 64 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size - block + 1, block if random else step):
            f.seek(offset)
            f.write(os.urandom(block))


def lookup(path: Path, store: Path) -> dict:
    code = _CHILD.format(root=str(ROOT), path=str(path), store=str(store))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.0, help="file size (12 for a Flux-dev fp8 base)")
    parser.add_argument("--random", action="store_true", help="random bytes throughout instead of a sparse file")
    parser.add_argument("--folder", default=None, help="where to write it (default: the temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        model, store = Path(tmp) / "model.safetensors", Path(tmp) / "store"
        t0 = time.perf_counter()
        write_file(model, args.gb, args.random)
        print(f"wrote {args.gb:g} GB in {time.perf_counter() - t0:.1f} s")
        runs = [lookup(model, store) for _ in range(3)]
        assert len({r["digest"] for r in runs}) == 1
        first, later = runs[0], runs[1:]
        for name, r in zip(("first", "second", "third"), runs):
            print(f"{name:6s} lookup: {r['seconds'] * 1000:10.1f} ms, {r['bytes']:>14,} bytes read")
        second = min(later, key=lambda r: r["seconds"])
        print(f"identity of a {args.gb:g} GB file: second lookup {second['seconds'] / first['seconds']:.2e}x the "
              f"first's time and {second['bytes'] / first['bytes']:.2e}x its bytes read "
              f"({first['bytes'] / first['seconds'] / 1e9:.2f} GB/s hashed the first time)")


if __name__ == "__main__":
    main()
