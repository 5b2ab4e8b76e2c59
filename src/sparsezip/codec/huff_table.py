"""huff-v2's code table: Huffman code lengths limited to 12 bits, canonical codes and the 12-bit decode table.

Deterministic (ties broken by node creation order), so the numpy and native encoders, which both take their
table from huffman_lengths, write identical bytes.
"""

from __future__ import annotations

import heapq

import numpy as np

from ..errors import SparsezipError

V2_TABLE_SIZE = 128  # one code length per 7-bit symbol
V2_MAX_CODE = 12  # longest Huffman code, in bits


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code lengths (uint8 [128], 0 = unused) of a Huffman code for `counts`, limited to 12 bits.

    Deterministic (ties broken by node creation order), so the numpy and native encoders,
    which both call this, write identical tables. When the plain Huffman code is too deep,
    counts are halved (keeping every used symbol >= 1) until it fits: rare, since 12 bits
    only overflow for symbols ~1/2000 as likely as the typical one, and cheap in bits.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (V2_TABLE_SIZE,) or (counts < 0).any():
        raise SparsezipError(f"symbol counts must be {V2_TABLE_SIZE} non-negative ints")
    while True:
        lengths = _plain_huffman_lengths(counts)
        if lengths.max(initial=0) <= V2_MAX_CODE:
            return lengths
        counts = np.where(counts > 0, (counts + 1) // 2, 0)


def _plain_huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Unlimited Huffman code lengths; a lone symbol gets length 1 (a code needs at least one bit)."""
    used = [int(s) for s in np.flatnonzero(counts)]
    lengths = np.zeros(V2_TABLE_SIZE, dtype=np.uint8)
    if len(used) == 1:
        lengths[used[0]] = 1
    if len(used) <= 1:
        return lengths
    # Nodes 0..127 are symbols; merged nodes get ids from 128 up. Heap entries (count, id).
    heap = [(int(counts[s]), s) for s in used]
    heapq.heapify(heap)
    parent: dict[int, int] = {}
    next_id = V2_TABLE_SIZE
    while len(heap) > 1:
        c1, a = heapq.heappop(heap)
        c2, b = heapq.heappop(heap)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (c1 + c2, next_id))
        next_id += 1
    depth = {heap[0][1]: 0}
    for node in range(next_id - 1, V2_TABLE_SIZE - 1, -1):  # parents always have larger ids
        if node in parent:
            depth[node] = depth[parent[node]] + 1
    for s in used:
        lengths[s] = depth[parent[s]] + 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes (uint16 [128]) for code lengths: sorted by (length, symbol), codes increase."""
    codes = np.zeros(V2_TABLE_SIZE, dtype=np.uint16)
    code, prev_len = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev_len
        codes[s], prev_len = code, int(lengths[s])
        code += 1
    return codes


def v2_decode_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a code-length table; return 12-bit lookup tables (symbol uint8 [4096], length uint8 [4096]).

    Length 0 in the length table marks a bit pattern that starts no valid code.
    """
    lengths = np.asarray(lengths, dtype=np.uint8)
    if (lengths > V2_MAX_CODE).any():
        s = int(np.argmax(lengths > V2_MAX_CODE))
        raise SparsezipError(
            f"huff-v2 code table is corrupted: symbol {s} has code length {lengths[s]} (max {V2_MAX_CODE})"
        )
    used = lengths > 0
    kraft = int((1 << (V2_MAX_CODE - lengths[used].astype(np.int64))).sum())
    if kraft > 1 << V2_MAX_CODE:
        raise SparsezipError("huff-v2 code table is corrupted: the code lengths over-subscribe the code space")
    codes = canonical_codes(lengths)
    sym_of = np.zeros(1 << V2_MAX_CODE, dtype=np.uint8)
    len_of = np.zeros(1 << V2_MAX_CODE, dtype=np.uint8)
    for s in np.flatnonzero(used):  # <= 128 symbols
        shift = V2_MAX_CODE - int(lengths[s])
        lo = int(codes[s]) << shift
        sym_of[lo : lo + (1 << shift)] = s
        len_of[lo : lo + (1 << shift)] = lengths[s]
    return sym_of, len_of
