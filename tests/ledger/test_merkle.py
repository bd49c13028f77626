"""The ledger's RFC 9162 Merkle tree: known answers, every proof against an independent
reference, every kind of tampering, and the cost of a proof at 100,000 entries.

The known answers are the Certificate Transparency reference vectors (transparency-dev/merkle,
``testonly/constants.go``, ``compact/range_test.go``, ``testonly/reference_test.go``), computed
by implementations other than ours. The reference below is RFC 9162's recursive definitions
(MTH, PATH, SUBPROOF) written out naively, sharing nothing with ``audit.ledger.merkle`` but the
two hash prefixes.
"""

import base64
import functools
import hashlib
import subprocess
import sys

import pytest

from audit.ledger import merkle
from audit.ledger.chain import append_entry
from audit.ledger.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    ProofError,
    consistency_proof,
    entry_leaf,
    inclusion_proof,
    leaf_hash,
    ledger_tree,
    node_hash,
    proof_from_hex,
    proof_to_hex,
    tree_root,
    verify_consistency,
    verify_inclusion,
)
from audit.models import LedgerEntry

H = bytes.fromhex

# --- the reference: RFC 9162's definitions, naively -----------------------------------------


class Reference:
    def __init__(self, leaves):
        self.leaves = list(leaves)

    @functools.cache  # noqa: B019 (one Reference per test; the cache dies with it)
    def mth(self, lo, hi):
        if hi == lo:
            return hashlib.sha256(b"").digest()
        if hi - lo == 1:
            return hashlib.sha256(b"\x00" + self.leaves[lo]).digest()
        k = 1
        while k * 2 < hi - lo:
            k *= 2
        return hashlib.sha256(b"\x01" + self.mth(lo, lo + k) + self.mth(lo + k, hi)).digest()

    def path(self, m, lo, hi):
        if hi - lo == 1:
            return []
        k = 1
        while k * 2 < hi - lo:
            k *= 2
        if m < k:
            return self.path(m, lo, lo + k) + [self.mth(lo + k, hi)]
        return self.path(m - k, lo + k, hi) + [self.mth(lo, lo + k)]

    def subproof(self, m, lo, hi, b):
        n = hi - lo
        if m == n:
            return [] if b else [self.mth(lo, hi)]
        k = 1
        while k * 2 < n:
            k *= 2
        if m <= k:
            return self.subproof(m, lo, lo + k, b) + [self.mth(lo + k, hi)]
        return self.subproof(m - k, lo + k, hi, False) + [self.mth(lo, lo + k)]


def data(n, salt=b""):
    return [hashlib.sha256(salt + i.to_bytes(4, "big")).digest() for i in range(n)]


def fails(check, *args):
    with pytest.raises(ProofError):
        check(*args)


def flipped(value: bytes) -> bytes:
    return bytes([value[0] ^ 8]) + value[1:]


SOME_HASH = H("abacaba000000000000000000000000000000000000000000060061e00123456")

# --- known answers --------------------------------------------------------------------------

CT_LEAVES = [
    b"",
    H("00"),
    H("10"),
    H("2021"),
    H("3031"),
    H("40414243"),
    H("5051525354555657"),
    H("606162636465666768696a6b6c6d6e6f"),
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_hashes_are_rfc_6962s():
    assert EMPTY_ROOT.hex() == CT_ROOTS[0]
    assert leaf_hash(b"").hex() == CT_ROOTS[1]
    assert leaf_hash(b"L123456").hex() == (
        "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    )
    assert node_hash(b"N123", b"N456").hex() == (
        "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"
    )


def test_roots_of_the_reference_vectors_at_every_size():
    tree = MerkleTree(CT_LEAVES)
    for size, expected in enumerate(CT_ROOTS):
        assert tree.root(size).hex() == expected
        assert tree_root(CT_LEAVES[:size]).hex() == expected


@pytest.mark.parametrize(
    ("size", "root_b64"),
    [
        (10, "VjWMPSYNtCuCNlF/RLnQy6HcwSk6CIipfxm+hettA+4="),
        (15, "j4SulYmocFuxdeyp12xXCIgK6PekBcxzAIj4zbQzNEI="),
        (16, "c+4Uc6BCMOZf/v3NZK1kqTUJe+bBoFtOhP+P3SayKRE="),
        (100, "dUh9hYH88p0CMoHkdr1wC2szbhcLAXOejWpINIooKUY="),
        (255, "SmdsuKUqiod3RX2jyF2M6JnbdE4QuTwwipfAowI4/i0="),
        (256, "qFI0t/tZ1MdOYgyPpPzHFiZVw86koScXy9q3FU5casA="),
        (1000, "RXrgb8xHd55Y48FbfotJwCbV82Kx22LZfEbmBGAvwlQ="),
        (4095, "cWRFdQhPcjn9WyBXE/r1f04ejxIm5lvg40DEpRBVS0w="),
        (4096, "6uU/phfHg1n/GksYT6TO9aN8EauMCCJRl3dIK0HDs2M="),
        (10000, "VZcav65F9haHVRk3wre2axFoBXRNeUh/1d9d5FQfxIg="),
        (65535, "iPuVYJhP6SEE4gUFp8qbafd2rYv9YTCDYqAxCj8HdLM="),
    ],
)
def test_golden_roots_of_larger_trees(size, root_b64, golden_tree):
    # compact/range_test.go's leaves: leaf i is i as two little-endian bytes.
    assert base64.b64encode(golden_tree.root(size)).decode() == root_b64


@pytest.fixture(scope="module")
def golden_tree():
    return MerkleTree(bytes([i & 0xFF, (i >> 8) & 0xFF]) for i in range(65535))


@pytest.mark.parametrize(
    ("index", "size", "expected"),
    [
        (0, 1, []),
        (0, 2, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"]),
        (1, 2, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"]),
        (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
        (
            1,
            5,
            [
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            0,
            8,
            [
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            [
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ],
)
def test_inclusion_proofs_of_the_reference_vectors(index, size, expected):
    proof = inclusion_proof(CT_LEAVES[:size], index)
    assert proof_to_hex(proof) == expected
    verify_inclusion(CT_LEAVES[index], index, size, proof, H(CT_ROOTS[size]))


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (1, 1, []),
        (
            1,
            8,
            [
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            [
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            [
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ],
)
def test_consistency_proofs_of_the_reference_vectors(old, new, expected):
    proof = consistency_proof(CT_LEAVES[:new], old)
    assert proof_to_hex(proof) == expected
    verify_consistency(old, new, H(CT_ROOTS[old]), H(CT_ROOTS[new]), proof)


# --- every proof against the reference, and tampered -----------------------------------------


def test_every_inclusion_proof_up_to_64_leaves_matches_the_reference_and_resists_tampering():
    leaves = data(64)
    tree = MerkleTree(leaves)
    ref = Reference(data(128))  # the same first 64 leaves, and room for the wrong sizes
    checked = 0
    for size in range(1, 65):
        root = tree.root(size)
        assert root == ref.mth(0, size)
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            assert proof == ref.path(index, 0, size)
            assert proof == inclusion_proof(leaves[:size], index)
            verify_inclusion(leaves[index], index, size, proof, root)
            leaf = leaves[index]
            # Wrong index, size, leaf or root.
            for wrong in {index - 1, index + 1, index ^ 2} - {-1}:
                fails(verify_inclusion, leaf, wrong, size, proof, root)
            # A wrong size fails whenever its proof has another length (see the next test).
            for wrong_size in (size * 2, size // 2, size + 1, size - 1, 64):
                if index < wrong_size != size and len(ref.path(index, 0, wrong_size)) != len(proof):
                    fails(verify_inclusion, leaf, index, wrong_size, proof, root)
            fails(verify_inclusion, b"WrongLeaf", index, size, proof, root)
            fails(verify_inclusion, leaf, index, size, proof, EMPTY_ROOT)
            fails(verify_inclusion, leaf, index, size, proof, SOME_HASH)
            # Garbage at either end, each element altered, one removed or inserted.
            fails(verify_inclusion, leaf, index, size, [*proof, root], root)
            fails(verify_inclusion, leaf, index, size, [root, *proof], root)
            for i in range(len(proof)):
                altered = list(proof)
                altered[i] = flipped(altered[i])
                fails(verify_inclusion, leaf, index, size, altered, root)
            if proof:
                fails(verify_inclusion, leaf, index, size, proof[:-1], root)
            if len(proof) > 1:
                fails(verify_inclusion, leaf, index, size, [proof[0], SOME_HASH, *proof[1:]], root)
            checked += 1
    assert checked == 64 * 65 // 2


def test_a_size_is_bound_by_the_root_it_is_signed_with_not_by_the_proof():
    # RFC 9162's verifiers use the size only for the proof's shape: leaf 0's path in a tree
    # of 5 has the shape it has in a tree of 8, so (size 8, root of 5) passes. What binds a
    # size to its root is the log's signature over both (a checkpoint): a verifier takes the
    # pair from one signed checkpoint, never the size from one place and the root from another.
    leaves = data(8)
    tree = MerkleTree(leaves)
    verify_inclusion(leaves[0], 0, 8, tree.inclusion_proof(0, 5), tree.root(5))
    verify_consistency(4, 6, tree.root(4), tree.root(5), tree.consistency_proof(4, 5))
    # Nothing proves the true tree of 8 from those: its root is another.
    fails(verify_inclusion, leaves[0], 0, 8, tree.inclusion_proof(0, 5), tree.root(8))
    fails(verify_consistency, 4, 8, tree.root(4), tree.root(8), tree.consistency_proof(4, 5))


def test_every_consistency_proof_up_to_40_leaves_matches_the_reference_and_resists_tampering():
    leaves = data(40)
    tree = MerkleTree(leaves)
    ref = Reference(data(80))  # the same first 40 leaves, and room for the wrong sizes
    other_roots = MerkleTree(data(40, salt=b"other"))
    for new in range(1, 41):
        new_root = tree.root(new)
        for old in range(1, new + 1):
            old_root = tree.root(old)
            proof = tree.consistency_proof(old, new)
            assert proof == (ref.subproof(old, 0, new, True) if old < new else [])
            verify_consistency(old, new, old_root, new_root, proof)
            if old == new:
                fails(verify_consistency, old, new, old_root, SOME_HASH, proof)
                fails(verify_consistency, old, new, old_root, new_root, [old_root])
                continue
            assert proof == consistency_proof(leaves[:new], old)
            # Swapped roots, roots of other trees or sizes.
            fails(verify_consistency, old, new, new_root, old_root, proof)
            fails(verify_consistency, old, new, other_roots.root(old), new_root, proof)
            fails(verify_consistency, old, new, old_root, other_roots.root(new), proof)
            fails(verify_consistency, new, old, new_root, old_root, proof)
            for wrong_old in range(1, new):  # the old size is bound: no other one passes
                if wrong_old != old:
                    fails(verify_consistency, wrong_old, new, old_root, new_root, proof)
            for wrong_new in (new - 1, new + 1, 2 * new):
                if old < wrong_new != new and len(ref.subproof(old, 0, wrong_new, True)) != len(
                    proof
                ):
                    fails(verify_consistency, old, wrong_new, old_root, new_root, proof)
            # Truncated, extended, each element altered.
            fails(verify_consistency, old, new, old_root, new_root, proof[:-1])
            fails(verify_consistency, old, new, old_root, new_root, proof[1:])
            fails(verify_consistency, old, new, old_root, new_root, [*proof, new_root])
            fails(verify_consistency, old, new, old_root, new_root, [old_root, *proof])
            fails(verify_consistency, old, new, old_root, new_root, [])
            for i in range(len(proof)):
                altered = list(proof)
                altered[i] = flipped(altered[i])
                fails(verify_consistency, old, new, old_root, new_root, altered)


def test_the_empty_tree():
    tree = MerkleTree()
    assert len(tree) == tree.size == 0
    assert tree.root() == EMPTY_ROOT == tree_root([])
    assert tree.consistency_proof(0) == []
    with pytest.raises(ProofError, match="not in a tree of 0 leaves"):
        tree.inclusion_proof(0)
    # Every tree extends the empty one, with nothing to prove...
    grown = MerkleTree(data(5))
    verify_consistency(0, 5, EMPTY_ROOT, grown.root(), [])
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    # ...but an "empty" head with another root, or a proof, is not accepted.
    with pytest.raises(ProofError, match="empty tree's hash"):
        verify_consistency(0, 5, SOME_HASH, grown.root(), [])
    with pytest.raises(ProofError, match="is empty, got 1 hashes"):
        verify_consistency(0, 5, EMPTY_ROOT, grown.root(), [SOME_HASH])
    with pytest.raises(ProofError, match="not in a tree of 0 leaves"):
        verify_inclusion(b"", 0, 0, [], EMPTY_ROOT)


def test_rewriting_one_leaf_breaks_consistency_with_every_earlier_head():
    leaves = data(20)
    honest = MerkleTree(leaves)
    saved_size, saved_root = 12, honest.root(12)
    for rewritten in range(saved_size):
        forged_leaves = list(leaves)
        forged_leaves[rewritten] = hashlib.sha256(b"forged").digest()
        forged = MerkleTree([*forged_leaves, *data(5, salt=b"more")])
        assert forged.root(saved_size) != saved_root
        for new in (saved_size, 20, 25):
            with pytest.raises(ProofError, match="old root|log forked"):
                verify_consistency(
                    saved_size, new, saved_root, forged.root(new), forged.consistency_proof(12, new)
                )
    # The honest log's growth still proves out.
    grown = MerkleTree([*leaves, *data(5, salt=b"more")])
    verify_consistency(saved_size, 25, saved_root, grown.root(), grown.consistency_proof(12))


def test_appending_one_leaf_at_a_time_gives_the_same_tree():
    leaves = data(70)
    whole = MerkleTree(leaves)
    growing = MerkleTree()
    for i, leaf in enumerate(leaves):
        growing.append(leaf)
        assert growing.root() == whole.root(i + 1) == tree_root(leaves[: i + 1])
    growing.extend([])
    assert growing.size == 70
    assert [growing.leaf_hash(i) for i in range(70)] == [leaf_hash(x) for x in leaves]


def test_extending_in_uneven_batches_gives_the_same_tree():
    leaves = data(300)
    whole = MerkleTree(leaves)
    growing = MerkleTree()
    start = 0
    for step in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 69):
        growing.extend(leaves[start : start + step])
        start += step
        assert growing.root() == whole.root(start)
        assert growing.consistency_proof(start // 2 + 1) == whole.consistency_proof(
            start // 2 + 1, start
        )
    assert growing.size == 300


def test_a_bad_leaf_stops_extend_without_corrupting_the_tree():
    tree = MerkleTree(data(3))
    with pytest.raises(TypeError, match="leaf 1 of the batch must be bytes, got str"):
        tree.extend([data(4)[3], "not bytes"])
    assert tree.size == 3
    assert tree.root() == tree_root(data(3))


def test_proofs_cost_logarithmic_hashes_at_100_000_entries(monkeypatch):
    size = 100_003
    tree = MerkleTree(data(size))
    calls = []
    real = hashlib.sha256

    def counting(payload=b""):
        calls.append(1)
        return real(payload)

    monkeypatch.setattr(merkle, "_sha256", counting)
    root = tree.root()
    old = 66_671
    proof = tree.consistency_proof(old)
    path = tree.inclusion_proof(54_321)
    # ceil(log2(100,003)) = 17: a proof has at most 17 + 1 hashes, and building it takes a
    # few hundred hashes at most (one O(log n) walk down the right edge per element).
    assert len(proof) <= 18 and len(path) <= 17
    assert len(calls) < 2 * 17 * 17
    monkeypatch.undo()
    verify_consistency(old, size, MerkleTree(data(old)).root(), root, proof)
    verify_inclusion(data(54_322)[-1], 54_321, size, path, root)


# --- ledger entries as leaves ----------------------------------------------------------------


@pytest.mark.django_db
def test_the_ledger_tree_is_built_from_entry_hashes_in_seq_order():
    entries = [append_entry(event="test.merkle", payload={"i": i}) for i in range(9)]
    hashes = list(LedgerEntry.objects.order_by("seq").values_list("entry_hash", flat=True))
    tree = ledger_tree(hashes)
    assert tree.size == LedgerEntry.objects.count()
    assert tree.root() == tree_root(bytes.fromhex(h) for h in hashes)
    for entry in entries:
        index = entry.seq - 1
        verify_inclusion(
            entry_leaf(entry.entry_hash),
            index,
            tree.size,
            tree.inclusion_proof(index),
            tree.root(),
        )
    # A leaf is the entry's hash: another entry's hash is not at this place.
    with pytest.raises(ProofError, match="does not lead to the root"):
        verify_inclusion(
            entry_leaf(entries[0].entry_hash),
            entries[1].seq - 1,
            tree.size,
            tree.inclusion_proof(entries[1].seq - 1),
            tree.root(),
        )


@pytest.mark.parametrize(
    "bad", ["A" * 64, "0" * 63, "0" * 65, "g" * 64, b"0" * 64, None, " " + "0" * 63]
)
def test_an_entry_leaf_is_the_hash_as_the_chain_writes_it(bad):
    assert entry_leaf("ab" * 32) == b"\xab" * 32
    with pytest.raises(ValueError, match="64 lower-case hex digits"):
        entry_leaf(bad)


# --- bad arguments get errors that say what is wrong ----------------------------------------


def test_bad_arguments_are_named():
    tree = MerkleTree(data(8))
    root = tree.root()
    proof = tree.inclusion_proof(3)
    with pytest.raises(ProofError, match="size 9 is beyond the tree, which has 8 leaves"):
        tree.root(9)
    with pytest.raises(ProofError, match="old_size 6 is larger than new_size 5"):
        tree.consistency_proof(6, 5)
    with pytest.raises(ProofError, match="index must be an integer, got bool"):
        tree.inclusion_proof(True)
    with pytest.raises(ProofError, match="index must be between 0 and"):
        tree.leaf_hash(-1)
    with pytest.raises(ProofError, match="index 8 is beyond the tree"):
        tree.leaf_hash(8)
    with pytest.raises(ProofError, match="proof element 1 is 31 bytes"):
        verify_inclusion(data(8)[3], 3, 8, [proof[0], proof[1][:31], proof[2]], root)
    with pytest.raises(ProofError, match="a proof is a sequence of hashes, got bytes"):
        verify_inclusion(data(8)[3], 3, 8, b"".join(proof), root)
    with pytest.raises(ProofError, match="the root must be bytes, got str"):
        verify_inclusion(data(8)[3], 3, 8, proof, root.hex())
    with pytest.raises(ProofError, match="the leaf must be bytes"):
        verify_inclusion(None, 3, 8, proof, root)
    with pytest.raises(ProofError, match="more than leaf 3 of a tree of 8 leaves needs"):
        verify_inclusion(data(8)[3], 3, 8, [*proof, root], root)
    with pytest.raises(ProofError, match="fewer than leaf 3 of a tree of 8 leaves needs"):
        verify_inclusion(data(8)[3], 3, 8, proof[:2], root)
    with pytest.raises(ProofError, match="a log only grows"):
        verify_consistency(8, 4, root, tree.root(4), [])
    with pytest.raises(ProofError, match="the old root must be bytes"):
        verify_consistency(4, 8, None, root, tree.consistency_proof(4))


def test_proofs_travel_as_hex():
    proof = MerkleTree(data(11)).consistency_proof(5)
    assert proof_from_hex(proof_to_hex(proof)) == proof
    with pytest.raises(ProofError, match="a proof is a JSON list"):
        proof_from_hex("00" * 32)
    with pytest.raises(ProofError, match="proof element 1 is not 64 lower-case hex digits"):
        proof_from_hex([proof[0].hex(), proof[1].hex().upper()])
    with pytest.raises(ProofError, match="proof element 0 is 3 bytes"):
        proof_to_hex([b"abc"])


def test_the_modules_a_site_worker_would_use_import_no_django():
    # The worker checks proofs and countersigns checkpoints without the centre's code.
    code = (
        "import sys, audit.ledger.merkle, audit.ledger.checkpoint; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('django', 'consortium', 'training') or m in ('audit.models', 'audit.ledger.chain')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(  # noqa: S603 (our own interpreter, a fixed program)
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, env={}
    )
    assert result.returncode == 0, result.stdout + result.stderr
