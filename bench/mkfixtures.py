#!/usr/bin/env python3
"""Generates the benchmark fixtures (called by bench/run.sh; never committed).

    mkfixtures.py tree DIR NDIRS NFILES MAXSIZE SEED
        DIR/dNNNN/fNNNNN: NDIRS directories of NFILES regular files each, sizes drawn
        uniformly from 1..MAXSIZE (0: all files empty), content pseudo-random.
    mkfixtures.py big FILE MIB
        one MIB MiB file of incompressible, non-sparse data.
"""
import os
import random
import sys


def tree(root, ndirs, nfiles, maxsize, seed):
    rnd = random.Random(seed)
    blob = rnd.randbytes(1 << 16)
    os.makedirs(root, exist_ok=True)
    n = 0
    for d in range(ndirs):
        dpath = os.path.join(root, f"d{d:04d}")
        os.mkdir(dpath)
        for f in range(nfiles):
            fd = os.open(os.path.join(dpath, f"f{n:06d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            if maxsize:
                size = rnd.randint(1, maxsize)
                off = rnd.randrange(0, len(blob) - size)
                os.write(fd, blob[off:off + size])
            os.close(fd)
            n += 1


def big(path, mib):
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            # vary each MiB a little so nothing can dedupe or compress it away
            f.write(i.to_bytes(8, "little") + chunk[8:])
        f.flush()
        os.fsync(f.fileno())


def main(argv):
    if len(argv) >= 2 and argv[1] == "tree" and len(argv) == 7:
        tree(argv[2], int(argv[3]), int(argv[4]), int(argv[5]), int(argv[6]))
    elif len(argv) >= 2 and argv[1] == "big" and len(argv) == 4:
        big(argv[2], int(argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
