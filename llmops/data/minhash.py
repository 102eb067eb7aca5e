"""MinHash signatures over word shingles, and near-duplicate detection with LSH banding.

Deterministic by construction: shingles are hashed with CRC-32 and the permutation
coefficients come from SHA-256 of fixed labels (not from a random generator whose stream
could change between numpy versions).

The banding is chosen so that LSH finds *every* pair whose signature estimate reaches the
threshold: with `m` allowed mismatching positions we use `m + 1` bands, so at least one band
of such a pair matches exactly. The result is therefore the same as comparing all pairs of
signatures, at a cost close to linear in the number of rows for usual thresholds.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from typing import Sequence

import numpy as np

_SHIFT = np.uint64(32)
_WORD = re.compile(r"\w+")
_CHUNK_ELEMENTS = 1 << 22  # cap on the (num_perm x shingles) block computed at once


def shingles(text: str, size: int) -> set[str]:
    """Lower-cased word n-grams of `text`; the whole text when shorter than `size` words."""
    words = _WORD.findall(text.lower())
    if not words:
        return set()
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def _coefficients(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    # multiply-add-shift hashing of 32-bit keys: ((a*x + b) mod 2^64) >> 32 with 64-bit a (odd)
    # and b is a strongly universal family; numpy's uint64 arithmetic wraps mod 2^64.
    a = [int.from_bytes(hashlib.sha256(f"llmops-minhash-a-{i}".encode()).digest()[:8], "big") | 1 for i in range(num_perm)]
    b = [int.from_bytes(hashlib.sha256(f"llmops-minhash-b-{i}".encode()).digest()[:8], "big") for i in range(num_perm)]
    return np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64)


def signatures(texts: Sequence[str], num_perm: int = 64, shingle_size: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures, shape (len(texts), num_perm), and a mask of texts that had shingles.

    Rows without any word get an all-max signature and `False` in the mask.
    """
    n = len(texts)
    sig = np.full((n, num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    hashes: list[np.ndarray] = []
    for text in texts:
        sh = shingles(text, shingle_size)
        hashes.append(np.fromiter((zlib.crc32(s.encode("utf-8")) for s in sh), dtype=np.uint64, count=len(sh)))
    counts = np.array([len(h) for h in hashes], dtype=np.int64)
    has = counts > 0
    a, b = _coefficients(num_perm)
    rows = np.flatnonzero(has)
    start = 0
    while start < len(rows):
        # take as many rows as fit in one block
        stop, total = start, 0
        while stop < len(rows) and (total == 0 or (total + counts[rows[stop]]) * num_perm <= _CHUNK_ELEMENTS):
            total += counts[rows[stop]]
            stop += 1
        block_rows = rows[start:stop]
        flat = np.concatenate([hashes[i] for i in block_rows])
        offsets = np.concatenate(([0], np.cumsum(counts[block_rows])[:-1]))
        values = (a[:, None] * flat[None, :] + b[:, None]) >> _SHIFT
        sig[block_rows] = np.minimum.reduceat(values, offsets, axis=1).T
        start = stop
    return sig, has


def banding(num_perm: int, threshold: float) -> tuple[int, int, int]:
    """(bands, rows_per_band, min_matches): LSH layout that misses no pair at or above threshold."""
    need = max(1, math.ceil(threshold * num_perm - 1e-9))
    mismatches = num_perm - need
    bands = min(mismatches + 1, num_perm)
    return bands, num_perm // bands, need


def near_duplicates(sig: np.ndarray, valid: np.ndarray, threshold: float) -> list[int]:
    """Indexes of rows that are near duplicates of an earlier kept row, in input order.

    A row is dropped when its signature agrees with a kept row's on at least
    `threshold` of the positions (the MinHash estimate of their Jaccard similarity).
    """
    n, num_perm = sig.shape
    bands, width, need = banding(num_perm, threshold)
    keys = np.ascontiguousarray(sig[:, : bands * width]).reshape(n, bands, width)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    dropped: list[int] = []
    for i in range(n):
        if not valid[i]:
            continue
        row_keys = [keys[i, j].tobytes() for j in range(bands)]
        seen: set[int] = set()
        duplicate = False
        for j, key in enumerate(row_keys):
            for k in buckets[j].get(key, ()):
                if k in seen:
                    continue
                seen.add(k)
                if int(np.count_nonzero(sig[i] == sig[k])) >= need:
                    duplicate = True
                    break
            if duplicate:
                break
        if duplicate:
            dropped.append(i)
            continue
        for j, key in enumerate(row_keys):
            buckets[j].setdefault(key, []).append(i)
    return dropped
