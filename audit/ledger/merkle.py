"""The ledger as a verifiable log: an RFC 9162 (Certificate Transparency 2.0) Merkle tree.

Why a tree as well as the hash chain: the chain's head proves the whole ledger only to someone
who re-reads every entry. A Merkle tree head (size and root) lets anyone outside the centre who
kept an old head check, with a proof of about ``2 * log2(n)`` hashes and no entries, that today's
ledger still begins with exactly the ledger they saw (a *consistency proof*), and that one entry
is in it at its place (an *inclusion proof*). A site that keeps the heads it saw can therefore
catch the centre rewriting history, however the centre rewrites its own database.

The tree (RFC 9162, section 2.1.1), with domain separation so a leaf can never pass for a node::

    MTH({})       = SHA-256()                                    the empty tree
    MTH({d(0)})   = SHA-256(0x00 || d(0))                        a leaf
    MTH(D[n])     = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))  k: largest power of 2 < n

**The leaf for a ledger entry** is its ``entry_hash`` as the 32 bytes it spells
(:func:`entry_leaf`), and leaf ``i`` is the entry with ``seq == i + 1``. The entry hash already
commits to every stored field (``seq`` included) and to the entry before it, so the leaf needs no
second canonical form of the entry that could drift from the chain's; and because the chain is
inside the leaves, rewriting one entry changes its hash and every later one, so the root moves
and no consistency proof from a head that saw the old entry can succeed.

Proofs follow the RFC's definitions (``PATH``, section 2.1.3.1; ``PROOF``/``SUBPROOF``, 2.1.4.1)
and are checked with its verification algorithms (2.1.3.2 and 2.1.4.2) step by step.
:class:`MerkleTree` keeps the hash of every complete ("perfect") subtree, level by level, so the
tree is built once in O(n) hashes and appended to in O(1) amortised, after which the root at any
size up to ``n`` and any proof cost O(log^2 n) hashes at worst (a few hundred at a million
entries), with nothing cached that an append could make stale. The verifiers need no tree at all.

This module imports nothing of Django or of the project, so a site worker can check proofs with
it; a failed check raises :class:`ProofError` saying what did not hold.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleTree",
    "ProofError",
    "consistency_proof",
    "entry_leaf",
    "inclusion_proof",
    "leaf_hash",
    "ledger_tree",
    "node_hash",
    "proof_from_hex",
    "proof_to_hex",
    "tree_root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_sha256 = hashlib.sha256

#: MTH({}): the root of the empty tree, SHA-256 of the empty string.
EMPTY_ROOT = _sha256(b"").digest()

_ENTRY_HASH_RE = re.compile(r"[0-9a-f]{64}")
# Sizes and indices are uint64 in RFC 9162's structures.
_MAX_SIZE = 2**64 - 1


class ProofError(ValueError):
    """An inclusion or consistency proof that does not hold, or bad arguments to a check."""


def leaf_hash(leaf: bytes) -> bytes:
    """``SHA-256(0x00 || leaf)``: the hash of one leaf (RFC 9162, section 2.1.1)."""
    return _sha256(_LEAF_PREFIX + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def entry_leaf(entry_hash: str) -> bytes:
    """The leaf for a ledger entry: the 32 bytes its hex ``entry_hash`` spells.

    Only the form the chain writes (64 lower-case hex digits) is accepted, so one entry has
    exactly one leaf.
    """
    if not isinstance(entry_hash, str) or not _ENTRY_HASH_RE.fullmatch(entry_hash):
        raise ValueError(
            f"an entry hash is 64 lower-case hex digits (a SHA-256 digest), got {entry_hash!r}"
        )
    return bytes.fromhex(entry_hash)


def _largest_power_of_two_below(n: int) -> int:
    """``k`` of RFC 9162: the largest power of two smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_count(value: object, what: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProofError(f"{what} must be an integer, got {type(value).__name__}")
    if not minimum <= value <= _MAX_SIZE:
        raise ProofError(f"{what} must be between {minimum} and 2**64 - 1, got {value}")
    return value


def _check_hash(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProofError(f"{what} must be bytes, got {type(value).__name__}")
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes; a SHA-256 hash is {HASH_SIZE}")
    return value


def _check_proof(proof: object) -> list[bytes]:
    if isinstance(proof, bytes | str) or not isinstance(proof, Sequence):
        raise ProofError(f"a proof is a sequence of hashes, got {type(proof).__name__}")
    return [_check_hash(item, f"proof element {i}") for i, item in enumerate(proof)]


class MerkleTree:
    """An append-only RFC 9162 tree that serves roots and proofs for any size it has reached.

    ``_levels[h]`` holds, as one byte string, the hashes of the complete subtrees of ``2**h``
    leaves, left to right (level 0: the leaf hashes). Every left child in the RFC's recursion is
    such a subtree, so the hash of any range the recursion asks for is one lookup plus at most
    one recursion down the right edge. 100,000 entries take 6.4 MB. Not safe for appends from
    several threads at once; reads of sizes already reached never change.
    """

    __slots__ = ("_levels", "_size")

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self.extend(leaves)

    def __len__(self) -> int:
        return self._size

    @property
    def size(self) -> int:
        """How many leaves the tree holds."""
        return self._size

    def append(self, leaf: bytes) -> None:
        """Add one leaf (the raw leaf: it is hashed here, with the 0x00 prefix)."""
        self.extend((leaf,))

    def extend(self, leaves: Iterable[bytes]) -> None:
        """Add leaves in order: one hash per leaf and per completed node, nothing else.

        All or nothing: a leaf that is not bytes stops the call before the tree changes.
        """
        batch = list(leaves)
        for i, leaf in enumerate(batch):
            if not isinstance(leaf, bytes):
                raise TypeError(f"leaf {i} of the batch must be bytes, got {type(leaf).__name__}")
        if not batch:
            return
        sha256 = _sha256
        levels = self._levels
        levels[0] += b"".join([sha256(_LEAF_PREFIX + leaf).digest() for leaf in batch])
        self._size += len(batch)
        # Level by level, hash the pairs that are now complete and were not before. The two
        # children of parent i are bytes 64*i .. 64*i+64 of their level, side by side.
        level = 0
        while len(levels[level]) >= 2 * HASH_SIZE:
            below = levels[level]
            if level + 1 == len(levels):
                levels.append(bytearray())
            above = levels[level + 1]
            first, end = len(above) // HASH_SIZE, len(below) // (2 * HASH_SIZE)
            above += b"".join(
                [
                    sha256(_NODE_PREFIX + below[64 * i : 64 * i + 64]).digest()
                    for i in range(first, end)
                ]
            )
            level += 1

    def _check_size(self, size: int | None, what: str = "size") -> int:
        if size is None:
            return self._size
        _check_count(size, what)
        if size > self._size:
            raise ProofError(f"{what} {size} is beyond the tree, which has {self._size} leaves")
        return size

    def _range_hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for ``0 <= start < end <= size``."""
        n = end - start
        if n & (n - 1) == 0 and start & (n - 1) == 0:  # a complete subtree: stored
            level = n.bit_length() - 1
            offset = (start >> level) * HASH_SIZE
            return bytes(self._levels[level][offset : offset + HASH_SIZE])
        k = _largest_power_of_two_below(n)
        return node_hash(self._range_hash(start, start + k), self._range_hash(start + k, end))

    def leaf_hash(self, index: int) -> bytes:
        """The stored hash of leaf ``index`` (``SHA-256(0x00 || leaf)``)."""
        _check_count(index, "index")
        if index >= self._size:
            raise ProofError(f"index {index} is beyond the tree, which has {self._size} leaves")
        return self._range_hash(index, index + 1)

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves (default: all of them); the empty tree's for 0."""
        size = self._check_size(size)
        return self._range_hash(0, size) if size else EMPTY_ROOT

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[0:size]) of RFC 9162, section 2.1.3.1: the audit path, leaf up."""
        size = self._check_size(size)
        _check_count(index, "index")
        if index >= size:
            raise ProofError(f"index {index} is not in a tree of {size} leaves")
        start, end = 0, size
        siblings: list[bytes] = []  # top down; the RFC lists them bottom up
        while end - start > 1:
            k = _largest_power_of_two_below(end - start)
            if index < start + k:
                siblings.append(self._range_hash(start + k, end))
                end = start + k
            else:
                siblings.append(self._range_hash(start, start + k))
                start += k
        siblings.reverse()
        return siblings

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """PROOF(old_size, D[0:new_size]) of RFC 9162, section 2.1.4.1.

        Empty when there is nothing to prove: ``old_size`` 0 (every tree extends the empty
        one) or equal to ``new_size`` (the heads must then be equal).
        """
        new_size = self._check_size(new_size, "new_size")
        _check_count(old_size, "old_size")
        if old_size > new_size:
            raise ProofError(
                f"old_size {old_size} is larger than new_size {new_size}: a log only grows"
            )
        if old_size in (0, new_size):
            return []
        m, start, end = old_size, 0, new_size
        whole_old_tree = True  # SUBPROOF's b: the old tree's root is known to the verifier
        nodes: list[bytes] = []  # top down; the RFC lists them bottom up
        while m != end - start:
            k = _largest_power_of_two_below(end - start)
            if m <= k:
                nodes.append(self._range_hash(start + k, end))
                end = start + k
            else:
                nodes.append(self._range_hash(start, start + k))
                start += k
                m -= k
                whole_old_tree = False
        if not whole_old_tree:
            nodes.append(self._range_hash(start, end))
        nodes.reverse()
        return nodes


def ledger_tree(entry_hashes: Iterable[str]) -> MerkleTree:
    """The tree over ledger entries, given their ``entry_hash`` values in ``seq`` order."""
    return MerkleTree(entry_leaf(h) for h in entry_hashes)


def tree_root(leaves: Iterable[bytes]) -> bytes:
    """MTH of ``leaves`` (raw leaves, hashed here)."""
    return MerkleTree(leaves).root()


def inclusion_proof(leaves: Iterable[bytes], index: int) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of ``leaves`` (RFC 9162, 2.1.3.1)."""
    return MerkleTree(leaves).inclusion_proof(index)


def consistency_proof(leaves: Iterable[bytes], old_size: int) -> list[bytes]:
    """The consistency proof from the first ``old_size`` of ``leaves`` to all of them (2.1.4.1)."""
    return MerkleTree(leaves).consistency_proof(old_size)


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf`` is leaf ``index`` of the tree of ``tree_size`` with head ``root``.

    RFC 9162, section 2.1.3.2, step by step; ``leaf`` is the raw leaf (for a ledger entry,
    :func:`entry_leaf` of its hash). Returns None, or raises :class:`ProofError` saying why not.
    """
    if not isinstance(leaf, bytes):
        raise ProofError(f"the leaf must be bytes, got {type(leaf).__name__}")
    _check_count(index, "index")
    _check_count(tree_size, "tree_size")
    path = _check_proof(proof)
    _check_hash(root, "the root")
    # 1. leaf_index >= tree_size: fail.
    if index >= tree_size:
        raise ProofError(f"index {index} is not in a tree of {tree_size} leaves")
    # 2.-3.
    fn, sn = index, tree_size - 1
    r = leaf_hash(leaf)
    # 4.
    for p in path:
        if sn == 0:  # a.
            raise ProofError(
                f"the proof has {len(path)} hashes, more than leaf {index} of a tree of "
                f"{tree_size} leaves needs"
            )
        if fn & 1 or fn == sn:  # b.
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1  # c.
        sn >>= 1
    # 5.
    if sn != 0:
        raise ProofError(
            f"the proof has {len(path)} hashes, fewer than leaf {index} of a tree of "
            f"{tree_size} leaves needs"
        )
    if r != root:
        raise ProofError(
            f"the proof does not lead to the root: leaf {index} is not in this tree of "
            f"{tree_size} leaves (wrong leaf, index, size, root or proof)"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``new_size`` with head ``new_root`` extends the older head.

    RFC 9162, section 2.1.4.2, step by step, for ``0 < old_size < new_size``. The two cases the
    RFC leaves out take an empty proof: equal sizes need equal roots, and an empty old tree (its
    root must be :data:`EMPTY_ROOT`) is extended by every tree. Returns None, or raises
    :class:`ProofError` saying what did not hold.
    """
    _check_count(old_size, "old_size")
    _check_count(new_size, "new_size")
    _check_hash(old_root, "the old root")
    _check_hash(new_root, "the new root")
    path = _check_proof(proof)
    if old_size > new_size:
        raise ProofError(
            f"the old tree ({old_size} leaves) is larger than the new one ({new_size}): "
            "a log only grows"
        )
    if old_size == 0 or old_size == new_size:
        if path:
            raise ProofError(
                f"a consistency proof from size {old_size} to {new_size} is empty, "
                f"got {len(path)} hashes"
            )
        if old_size == 0 and old_root != EMPTY_ROOT:
            raise ProofError("the old root of an empty tree must be the empty tree's hash")
        if old_size == new_size and old_root != new_root:
            raise ProofError(
                f"two heads of the same size ({old_size}) with different roots: the log forked"
            )
        return
    # 1.
    if not path:
        raise ProofError(f"the consistency proof from {old_size} to {new_size} is empty")
    # 2.
    if old_size & (old_size - 1) == 0:
        path = [old_root, *path]
    # 3.
    fn, sn = old_size - 1, new_size - 1
    # 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        if sn == 0:  # a.
            raise ProofError(
                f"the proof has more hashes than a proof from {old_size} to {new_size} needs"
            )
        if fn & 1 or fn == sn:  # b.
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # 7.
    if sn != 0:
        raise ProofError(
            f"the proof has fewer hashes than a proof from {old_size} to {new_size} needs"
        )
    if fr != old_root:
        raise ProofError(
            f"the proof does not lead to the old root: the first {old_size} entries are not "
            "the ones the old head was made from (history rewritten, or a wrong proof)"
        )
    if sr != new_root:
        raise ProofError(
            f"the proof does not lead to the new root: the tree of {new_size} does not "
            f"extend the old head of {old_size} (wrong proof or root)"
        )


def proof_to_hex(proof: Sequence[bytes]) -> list[str]:
    """A proof as lower-case hex strings, for JSON (the ledger's hashes are hex elsewhere)."""
    return [_check_hash(item, f"proof element {i}").hex() for i, item in enumerate(proof)]


def proof_from_hex(items: object) -> list[bytes]:
    """Read back :func:`proof_to_hex`'s form strictly; :class:`ProofError` names what is wrong."""
    if not isinstance(items, list):
        raise ProofError(f"a proof is a JSON list of hex strings, got {type(items).__name__}")
    proof: list[bytes] = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not _ENTRY_HASH_RE.fullmatch(item):
            raise ProofError(f"proof element {i} is not 64 lower-case hex digits: {item!r}")
        proof.append(bytes.fromhex(item))
    return proof
