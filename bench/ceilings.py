"""The disk read ceiling of the benchmarks: random whole-blob reads of a model's expert files, uncached.

Shared by the scripts (bench/decode.py's read_ceiling) and the pytest-benchmark harness (bench/conftest.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import mmap
import os
import random
import time


def _open_uncached(path: str) -> tuple[int, str]:
    """A descriptor that bypasses the page cache, and how: O_DIRECT (Linux), F_NOCACHE (macOS), or plain
    buffered reads where neither is possible (tmpfs refuses O_DIRECT: the number is then a memory copy)."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), "O_DIRECT"
        except OSError:
            return os.open(path, os.O_RDONLY), "buffered (O_DIRECT refused)"
    fd = os.open(path, os.O_RDONLY)
    import fcntl

    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)  # 48: F_NOCACHE in Darwin's <fcntl.h>
        return fd, "F_NOCACHE"
    except OSError:
        return fd, "buffered"


def disk_read_gbps(path: str, header: dict, threads: int = 8, seconds: float = 2.0, seed: int = 0) -> tuple[float, str]:
    """GB/s of `threads` threads reading whole expert blobs at random (layer, expert), uncached."""
    ex = header["experts"]
    size = -(-ex["blob_size"] // 4096) * 4096  # whole logical blocks, as O_DIRECT wants
    opened = [_open_uncached(os.path.join(path, layer["file"])) for layer in ex["layers"]]
    fds, mode = [fd for fd, _ in opened], opened[0][1]
    n_experts = header["config"]["num_experts"]
    preadv = getattr(os, "preadv", None)

    def worker(i: int) -> int:
        buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
        rng, done = random.Random(seed * 1000 + i), 0
        while time.perf_counter() < stop:
            fd, offset = fds[rng.randrange(len(fds))], 16384 + rng.randrange(n_experts) * ex["stride"]
            if preadv:
                done += preadv(fd, [buf], offset)
            else:  # an interpreter without preadv: F_NOCACHE needs no aligned buffer
                done += len(os.pread(fd, size, offset))
        return done

    try:
        t0 = time.perf_counter()
        stop = t0 + seconds
        with cf.ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(worker, range(threads)))
        return total / (time.perf_counter() - t0) / 1e9, mode
    finally:
        for fd in fds:
            os.close(fd)
