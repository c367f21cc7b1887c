"""Vectorised tables of uint64 keys (numpy only, no loop per key): open-addressing hash
tables, and sorted arrays (the n-gram model's levels when they were estimated on disk).

The n-gram model stores each order as one table: an n-gram's id *is* its slot, so the key
of an (n+1)-gram is `slot of its n-gram prefix * (V + 1) + last word`, exact and collision
free (a trie in hashed form, like KenLM's probing model). Keys are placed by linear probing
from a multiply-shift hash of a mixed key ("uint64 mixing"); insertion and lookup work on
whole arrays of keys at once, one probe step per round, so the Python loop runs once per
probe length (a handful of rounds), never once per key.
"""

from __future__ import annotations

import math

import numpy as np

EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)  # never a key: keys stay below 2**63
MAX_LOAD = 0.70  # a table is grown before a batch could push it past this load
TARGET_LOAD = 0.60  # the load a table is (re)built at
MIN_LOAD = 0.40  # below this a finished table is compacted

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S31, _S27, _S32, _S30 = (np.uint64(s) for s in (31, 27, 32, 30))


class TableFull(Exception):
    """Raised by `insert` when a table fills up (the caller grows it and retries)."""


def mix(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 keys -> well mixed uint64 hashes (a new array)."""
    x = keys ^ (keys >> _S30)
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def home_slots(hashes: np.ndarray, size: int) -> np.ndarray:
    """Map mixed hashes onto [0, size) with a multiply-shift (any size below 2**32)."""
    if size >= 1 << 32:
        raise ValueError(f"hash table of {size} slots is too large")
    return (((hashes >> _S32) * np.uint64(size)) >> _S32).astype(np.int64)


def table_size(n_keys: int, load: float = TARGET_LOAD) -> int:
    return max(16, int(math.ceil(n_keys / load)) + 1)


def empty_table(size: int) -> np.ndarray:
    return np.full(size, EMPTY, dtype=np.uint64)


def insert(
    table: np.ndarray, keys: np.ndarray, hashes: np.ndarray | None = None, fresh: bool = False
) -> np.ndarray:
    """Insert `keys` (duplicates allowed) into `table` in place; return each key's slot.

    Copies of one key always travel together (same home, same probe sequence), so a key
    lands in exactly one slot. `fresh=True` promises the table is empty (skips one read).
    Raises TableFull (the table keeps what was placed so far) when the table passes 90%
    load; the caller rebuilds it larger and inserts again.
    """
    size = table.shape[0]
    n = keys.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    pos = home_slots(mix(keys) if hashes is None else hashes, size)
    if fresh:  # every home slot is empty: claim them all, then see who won
        table[pos] = keys
        hit = table[pos] == keys
    else:
        cur = table[pos]
        empty = np.flatnonzero(cur == EMPTY)
        if empty.size:
            where = pos[empty]
            table[where] = keys[empty]  # several claimants of one slot: one wins
            cur[empty] = table[where]
        hit = cur == keys
    slots = np.where(hit, pos, -1)
    todo = np.flatnonzero(~hit)  # indices into keys still probing
    cur_keys = keys[todo]
    pos = pos[todo] + 1
    pos[pos == size] = 0
    rounds = 1
    while todo.size:
        rounds += 1
        cur = table[pos]
        empty = np.flatnonzero(cur == EMPTY)
        if empty.size:
            where = pos[empty]
            table[where] = cur_keys[empty]
            cur[empty] = table[where]
        hit = cur == cur_keys
        slots[todo[hit]] = pos[hit]
        miss = np.flatnonzero(~hit)
        todo = todo[miss]
        cur_keys = cur_keys[miss]
        pos = pos[miss] + 1
        pos[pos == size] = 0
        if rounds % 32 == 0 and np.count_nonzero(table != EMPTY) > 0.9 * size:
            raise TableFull(f"hash table of {size} slots is full")
    return slots


def lookup(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Slot of each key in `table`, or -1 where the key is absent."""
    size = table.shape[0]
    n = keys.shape[0]
    out = np.full(n, -1, dtype=np.int64)
    if n == 0 or size == 0:
        return out
    pos = home_slots(mix(keys), size)
    cur = table[pos]
    hit = cur == keys
    out[hit] = pos[hit]
    todo = np.flatnonzero(~hit & (cur != EMPTY))
    if todo.size == 0:
        return out
    cur_keys = keys[todo]
    pos = pos[todo] + 1
    pos[pos == size] = 0
    while todo.size:
        cur = table[pos]
        hit = cur == cur_keys
        out[todo[hit]] = pos[hit]
        keep = np.flatnonzero(~hit & (cur != EMPTY))
        todo = todo[keep]
        cur_keys = cur_keys[keep]
        pos = pos[keep] + 1
        pos[pos == size] = 0
    return out


def occupied(table: np.ndarray) -> np.ndarray:
    """Slots holding a key, in slot order."""
    return np.flatnonzero(table != EMPTY)


def rebuild(table: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-place every key of `table` into a new table of `size` slots.

    Returns (new_table, remap) with remap[old_slot] = new_slot (-1 for empty old slots).
    """
    old = occupied(table)
    keys = table[old]
    while True:
        new = empty_table(size)
        try:
            new_slots = insert(new, keys, fresh=True)
            break
        except TableFull:
            size = table_size(len(keys), 0.5)
    remap = np.full(table.shape[0], -1, dtype=np.int32 if size < 2**31 else np.int64)
    remap[old] = new_slots
    return new, remap


def estimate_distinct(keys: np.ndarray, hashes: np.ndarray | None = None, sample: int = 1 << 15) -> int:
    """Number of distinct keys, exact for small inputs, else a KMV-style estimate.

    Distinct keys whose mixed hash falls below a threshold t are counted exactly; the
    estimate is that count * 2**64 / t (relative error about 1/sqrt(count)).
    """
    n = keys.shape[0]
    if n <= 4 * sample:
        return int(np.unique(keys).shape[0])
    h = mix(keys) if hashes is None else hashes
    frac = sample / n
    t = np.uint64(int(frac * 2.0**64))
    below = np.unique(h[h < t]).shape[0]
    return int(math.ceil(below / frac))


# ----------------------------------------------------------------------------- sorted keys
def sort_order(values: np.ndarray) -> np.ndarray:
    """np.argsort(values) (stable) for non-negative integers, several times faster when the
    value and its index fit in 64 bits together: (value << index bits | index) is sorted by
    np.sort, which is vectorised (AVX-512 here), where argsort is not."""
    n = values.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    index_bits = max(1, (n - 1).bit_length())
    value_bits = int(values.max()).bit_length()
    if value_bits + index_bits > 63:
        return np.argsort(values, kind="stable")
    packed = values.astype(np.int64) << index_bits
    packed |= np.arange(n, dtype=np.int64)
    packed.sort()
    packed &= (1 << index_bits) - 1
    return packed


def sorted_lookup(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Position of each query in the sorted array `keys`, or -1 where it is absent.

    The queries are searched in sorted order: one binary search per query in a large array
    is a cache miss per step, while successive sorted queries walk the array once.
    """
    out = np.full(queries.shape[0], -1, dtype=np.int64)
    if queries.shape[0] == 0 or keys.shape[0] == 0:
        return out
    order = sort_order(queries.view(np.int64))
    q = queries[order]
    pos = np.minimum(np.searchsorted(keys, q), keys.shape[0] - 1)
    hit = np.asarray(keys[pos]) == q
    out[order[hit]] = pos[hit]
    return out
