"""Signed checkpoints of the ledger's tree head and witnesses' cosignatures.

The format is checked against other implementations' published values: the Go signed-note
package's example key and note (golang.org/x/mod/sumdb/note, ``note_test.go``; Ed25519 is
deterministic, so our line must be theirs byte for byte), the signed-note spec's key-id
example and the tlog-checkpoint/tlog-witness specs' example note. The keys are made by the
project's own site-key helper, so the formats are the ones site workers already hold.
"""

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit.ledger.checkpoint import (
    BadCheckpointSignature,
    Checkpoint,
    CheckpointError,
    MalformedCheckpoint,
    NoteSignature,
    SignedCheckpoint,
    WrongOrigin,
    checkpoint_from_json,
    checkpoint_to_json,
    cosign_checkpoint,
    key_id,
    parse_checkpoint,
    parse_signed_checkpoint,
    sign_checkpoint,
    sign_note,
    verifier_key,
    verify_checkpoint,
    verify_cosignature,
    verify_note_signature,
)
from audit.ledger.merkle import MerkleTree, ProofError, verify_consistency
from training.fl.signing import generate_keypair

ORIGIN = "ledger.consortium.test/main"
ROOT = hashlib.sha256(b"a root").digest()
ROOT_B64 = base64.b64encode(ROOT).decode()


@pytest.fixture(scope="module")
def centre():
    return generate_keypair()


@pytest.fixture(scope="module")
def site():
    return generate_keypair()


def raw_private_pem(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def raw_public_pem(raw: bytes) -> bytes:
    return Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- other implementations' values ----------------------------------------------------------

GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_LINE = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqd"
    "ngotpRZb6KE6RyyBwJnAM=\n"
)


def test_signatures_match_the_go_signed_note_reference_byte_for_byte():
    # PRIVATE+KEY+<name>+<key id>+base64(0x01 || seed): the key itself may hold a "+".
    seed = base64.b64decode(GO_SKEY.split("+", 4)[4])[1:]
    private_pem = raw_private_pem(seed)
    public_pem = (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    signature = sign_note(GO_TEXT, name="PeterNeumann", private_pem=private_pem)
    assert signature.line() == GO_LINE
    assert verifier_key("PeterNeumann", public_pem) == GO_VKEY
    assert key_id("PeterNeumann", public_pem).hex() == "c74f20a3"
    parsed = NoteSignature.from_line(GO_LINE)
    assert parsed == signature
    verify_note_signature(GO_TEXT, parsed, name="PeterNeumann", public_pem=public_pem)
    with pytest.raises(BadCheckpointSignature, match="does not match this text"):
        verify_note_signature(
            GO_TEXT.replace("cryptography", "cryptographY"),
            parsed,
            name="PeterNeumann",
            public_pem=public_pem,
        )


def test_key_ids_match_the_signed_note_spec_example():
    public = raw_public_pem(
        bytes.fromhex("e932791ae6e7a840a46164c904786426d5e7821dd8b29a00d61cae72afdd4da4")
    )
    assert key_id("example.com/foo", public).hex() == "530d903a"


SPEC_NOTE = (
    "example.com/behind-the-sofa\n"
    "20852163\n"
    "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    "\n"
    "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5"
    "/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
    "\u2014 example.com/behind-the-sofa opLqBQsREYCgu6xQkYQwJr9fo45a62DN9EdmHXnZdXNqlcVGlCum2Wks"
    "+49/V6267UEjw6QUXTS5Rovnzv++qbSzm9Q=\n"
)


def test_the_spec_example_checkpoint_parses_and_prints_back_unchanged():
    signed = parse_signed_checkpoint(SPEC_NOTE, origin="example.com/behind-the-sofa")
    assert signed.checkpoint.tree_size == 20852163
    assert base64.b64encode(signed.checkpoint.root_hash).decode() == (
        "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="
    )
    # Two keys under one name (a key rotation): told apart by their ids.
    assert [s.name for s in signed.signatures] == ["example.com/behind-the-sofa"] * 2
    assert signed.signatures[0].key_id != signed.signatures[1].key_id
    assert signed.text() == SPEC_NOTE
    with pytest.raises(WrongOrigin, match="of the log 'example.com/behind-the-sofa', not"):
        parse_signed_checkpoint(SPEC_NOTE, origin=ORIGIN)


# --- signing, verifying, tampering ---------------------------------------------------------


def test_a_checkpoint_is_the_three_line_text(centre):
    checkpoint = Checkpoint(ORIGIN, 1234, ROOT)
    assert checkpoint.text() == f"{ORIGIN}\n1234\n{ROOT_B64}\n"
    assert parse_checkpoint(checkpoint.text(), origin=ORIGIN) == checkpoint
    signed = sign_checkpoint(checkpoint, name=ORIGIN, private_pem=centre[0])
    assert signed.text().startswith(checkpoint.text() + "\n\u2014 " + ORIGIN + " ")
    assert signed.text().count("\n") == 5


def test_a_signed_checkpoint_verifies_after_the_round_trip(centre):
    signed = sign_checkpoint(Checkpoint(ORIGIN, 7, ROOT), name=ORIGIN, private_pem=centre[0])
    back = verify_checkpoint(signed.text(), origin=ORIGIN, name=ORIGIN, public_pem=centre[1])
    assert back == signed
    assert verify_checkpoint(signed, origin=ORIGIN, name=ORIGIN, public_pem=centre[1]) == signed
    # The empty log has a checkpoint too.
    empty = sign_checkpoint(
        Checkpoint(ORIGIN, 0, MerkleTree().root()), name=ORIGIN, private_pem=centre[0]
    )
    verify_checkpoint(empty.text(), origin=ORIGIN, name=ORIGIN, public_pem=centre[1])


@pytest.mark.parametrize(
    ("find", "replace"),
    [
        ("\n7\n", "\n8\n"),  # the size
        ("\n7\n", "\n70\n"),
        (ROOT_B64, base64.b64encode(hashlib.sha256(b"another").digest()).decode()),  # the root
    ],
)
def test_a_tampered_size_or_root_fails_the_signature(centre, find, replace):
    note = sign_checkpoint(Checkpoint(ORIGIN, 7, ROOT), name=ORIGIN, private_pem=centre[0]).text()
    tampered = note.replace(find, replace, 1)
    assert tampered != note
    with pytest.raises(BadCheckpointSignature, match="does not match this text"):
        verify_checkpoint(tampered, origin=ORIGIN, name=ORIGIN, public_pem=centre[1])


def test_a_tampered_origin_is_another_log(centre):
    note = sign_checkpoint(Checkpoint(ORIGIN, 7, ROOT), name=ORIGIN, private_pem=centre[0]).text()
    moved = note.replace(ORIGIN + "\n", "ledger.elsewhere.test/main\n", 1)
    with pytest.raises(WrongOrigin, match="'ledger.elsewhere.test/main', not"):
        verify_checkpoint(moved, origin=ORIGIN, name=ORIGIN, public_pem=centre[1])
    # Asked for as the other log, the centre's signature does not cover it.
    with pytest.raises(BadCheckpointSignature, match="does not match"):
        verify_checkpoint(
            moved, origin="ledger.elsewhere.test/main", name=ORIGIN, public_pem=centre[1]
        )


def test_forged_signatures_fail(centre, site):
    checkpoint = Checkpoint(ORIGIN, 7, ROOT)
    # Signed by another key under the centre's name: no line with the centre's key id.
    forged = sign_checkpoint(checkpoint, name=ORIGIN, private_pem=site[0])
    with pytest.raises(BadCheckpointSignature, match="no signature by .* with this key"):
        verify_checkpoint(forged.text(), origin=ORIGIN, name=ORIGIN, public_pem=centre[1])
    # The centre's id with altered signature bytes.
    genuine = sign_checkpoint(checkpoint, name=ORIGIN, private_pem=centre[0]).signatures[0]
    bent = NoteSignature(
        genuine.name, genuine.key_id, bytes([genuine.signature[0] ^ 1]) + (genuine.signature[1:])
    )
    with pytest.raises(BadCheckpointSignature, match="does not match this text"):
        verify_checkpoint(
            SignedCheckpoint(checkpoint, (bent,)), origin=ORIGIN, name=ORIGIN, public_pem=centre[1]
        )
    # A genuine signature of another checkpoint, moved onto this one.
    other = sign_checkpoint(Checkpoint(ORIGIN, 8, ROOT), name=ORIGIN, private_pem=centre[0])
    moved = SignedCheckpoint(checkpoint, other.signatures)
    with pytest.raises(BadCheckpointSignature, match="at size 7: .* does not match"):
        verify_checkpoint(moved, origin=ORIGIN, name=ORIGIN, public_pem=centre[1])
    # A signature of the wrong length, under the right id.
    short = NoteSignature(genuine.name, genuine.key_id, genuine.signature[:63])
    with pytest.raises(BadCheckpointSignature, match="is 63 bytes; an Ed25519 signature is 64"):
        verify_checkpoint(
            SignedCheckpoint(checkpoint, (short,)), origin=ORIGIN, name=ORIGIN, public_pem=centre[1]
        )


# --- witnesses ------------------------------------------------------------------------------


def test_a_witness_cosigns_the_same_text_and_the_centre_checks_it(centre, site):
    signed = sign_checkpoint(Checkpoint(ORIGIN, 7, ROOT), name=ORIGIN, private_pem=centre[0])
    cosignature = cosign_checkpoint(
        signed.checkpoint, name="witness.hospital-a", private_pem=site[0]
    )
    verify_cosignature(
        signed.checkpoint, cosignature, name="witness.hospital-a", public_pem=site[1]
    )
    # What the worker posts and the centre reads back.
    assert NoteSignature.from_json(cosignature.to_json()) == cosignature
    witnessed = signed.with_signature(cosignature)
    again = verify_checkpoint(witnessed.text(), origin=ORIGIN, name=ORIGIN, public_pem=centre[1])
    verify_cosignature(
        again.checkpoint,
        again.signature_by("witness.hospital-a", site[1]),
        name="witness.hospital-a",
        public_pem=site[1],
    )
    # Checked against another site's key, another name, or another checkpoint: refused.
    other_site = generate_keypair()
    with pytest.raises(BadCheckpointSignature, match="made with another key"):
        verify_cosignature(
            signed.checkpoint, cosignature, name="witness.hospital-a", public_pem=other_site[1]
        )
    with pytest.raises(BadCheckpointSignature, match="is by 'witness.hospital-a', not"):
        verify_cosignature(
            signed.checkpoint, cosignature, name="witness.hospital-b", public_pem=site[1]
        )
    with pytest.raises(BadCheckpointSignature, match="does not match"):
        verify_cosignature(
            Checkpoint(ORIGIN, 8, ROOT), cosignature, name="witness.hospital-a", public_pem=site[1]
        )
    with pytest.raises(BadCheckpointSignature, match="no signature by 'witness.hospital-a'"):
        signed.signature_by("witness.hospital-a", site[1])
    # A witness's line is not the log's signature.
    with pytest.raises(BadCheckpointSignature, match="no signature by"):
        verify_checkpoint(
            SignedCheckpoint(signed.checkpoint, (cosignature,)),
            origin=ORIGIN,
            name=ORIGIN,
            public_pem=centre[1],
        )
    # A signature line cannot be added twice.
    with pytest.raises(MalformedCheckpoint, match="two signatures by the same key"):
        witnessed.with_signature(cosignature)


def test_the_witness_flow_catches_a_rewritten_ledger(centre, site):
    """What a site worker does each task: check the new head against the last it signed."""
    entries = [hashlib.sha256(str(i).encode()).digest() for i in range(17)]
    tree = MerkleTree(entries[:10])
    seen = sign_checkpoint(Checkpoint(ORIGIN, 10, tree.root()), name=ORIGIN, private_pem=centre[0])
    tree.extend(entries[10:])
    latest = sign_checkpoint(
        Checkpoint(ORIGIN, 17, tree.root()), name=ORIGIN, private_pem=centre[0]
    )
    proof = tree.consistency_proof(10)

    old = verify_checkpoint(seen.text(), origin=ORIGIN, name=ORIGIN, public_pem=centre[1])
    new = verify_checkpoint(latest.text(), origin=ORIGIN, name=ORIGIN, public_pem=centre[1])
    verify_consistency(
        old.checkpoint.tree_size,
        new.checkpoint.tree_size,
        old.checkpoint.root_hash,
        new.checkpoint.root_hash,
        proof,
    )
    cosignature = cosign_checkpoint(new.checkpoint, name="witness.hospital-a", private_pem=site[0])
    verify_cosignature(new.checkpoint, cosignature, name="witness.hospital-a", public_pem=site[1])

    # The centre rewrites entry 3 and signs a new head: its signature holds, the proof cannot.
    rewritten = MerkleTree([*entries[:3], b"rewritten", *entries[4:]])
    forged = sign_checkpoint(
        Checkpoint(ORIGIN, 17, rewritten.root()), name=ORIGIN, private_pem=centre[0]
    )
    verify_checkpoint(forged.text(), origin=ORIGIN, name=ORIGIN, public_pem=centre[1])
    with pytest.raises(ProofError, match="old root"):
        verify_consistency(
            10, 17, old.checkpoint.root_hash, rewritten.root(), rewritten.consistency_proof(10)
        )


# --- strict parsing -------------------------------------------------------------------------


def _with_root(text_root: str) -> str:
    return f"{ORIGIN}\n5\n{text_root}\n"


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        (f"{ORIGIN}\n5\n{ROOT_B64}", MalformedCheckpoint, "must end with a newline"),
        (f"{ORIGIN}\n5\n", MalformedCheckpoint, "three lines .* got 2"),
        (f"{ORIGIN}\n5\n{ROOT_B64}\nextension\n", MalformedCheckpoint, "three lines .* got 4"),
        (f"{ORIGIN}\r\n5\r\n{ROOT_B64}\r\n", MalformedCheckpoint, r"end in \\n alone"),
        (f"\n5\n{ROOT_B64}\n", MalformedCheckpoint, "origin must be a non-empty string"),
        (f"{ORIGIN} \n5\n{ROOT_B64}\n", MalformedCheckpoint, "surrounding spaces"),
        (f"{ORIGIN}\x07\n5\n{ROOT_B64}\n", MalformedCheckpoint, "control characters"),
        (f"other.test/log\n5\n{ROOT_B64}\n", WrongOrigin, "'other.test/log', not"),
        (f"{ORIGIN}\n05\n{ROOT_B64}\n", MalformedCheckpoint, "without leading zeros, got '05'"),
        (f"{ORIGIN}\n-5\n{ROOT_B64}\n", MalformedCheckpoint, "decimal integer"),
        (f"{ORIGIN}\n+5\n{ROOT_B64}\n", MalformedCheckpoint, "decimal integer"),
        (f"{ORIGIN}\n 5\n{ROOT_B64}\n", MalformedCheckpoint, "decimal integer"),
        (f"{ORIGIN}\n5.0\n{ROOT_B64}\n", MalformedCheckpoint, "decimal integer"),
        (f"{ORIGIN}\n١٢\n{ROOT_B64}\n", MalformedCheckpoint, "decimal integer"),
        (f"{ORIGIN}\n{2**64}\n{ROOT_B64}\n", MalformedCheckpoint, "2\\*\\*64 - 1"),
        (f"{ORIGIN}\n\n{ROOT_B64}\n", MalformedCheckpoint, "decimal integer"),
        (_with_root("not base64!"), MalformedCheckpoint, "root hash is not valid base64"),
        (_with_root(ROOT_B64.rstrip("=")), MalformedCheckpoint, "not valid base64"),
        (_with_root(ROOT_B64[:-2] + "N="), MalformedCheckpoint, "not in canonical base64"),
        (_with_root(ROOT.hex()), MalformedCheckpoint, "is 48 bytes; a SHA-256 root is 32"),
        (
            _with_root(base64.b64encode(ROOT[:31]).decode()),
            MalformedCheckpoint,
            "is 31 bytes; a SHA-256 root is 32",
        ),
        (
            _with_root(base64.urlsafe_b64encode(b"\xfb" * 32).decode()),
            MalformedCheckpoint,
            "not valid base64",
        ),
    ],
)
def test_malformed_checkpoints_are_refused_saying_why(text, error, message):
    assert issubclass(error, CheckpointError)
    assert issubclass(error, ValueError)
    with pytest.raises(error, match=message):
        parse_checkpoint(text, origin=ORIGIN)


def test_the_largest_size_is_accepted():
    text = f"{ORIGIN}\n{2**64 - 1}\n{ROOT_B64}\n"
    assert parse_checkpoint(text).tree_size == 2**64 - 1


@pytest.mark.parametrize(
    ("size", "root", "message"),
    [
        (True, ROOT, "tree size must be an integer"),
        (-1, ROOT, "tree size must be an integer"),
        ("5", ROOT, "tree size must be an integer"),
        (5, ROOT[:31], "must be 32 bytes"),
        (5, ROOT.hex(), "must be 32 bytes"),
    ],
)
def test_a_checkpoint_cannot_be_built_wrong(size, root, message):
    with pytest.raises(MalformedCheckpoint, match=message):
        Checkpoint(ORIGIN, size, root)


def test_malformed_signed_notes_are_refused_saying_why(centre):
    note = sign_checkpoint(Checkpoint(ORIGIN, 5, ROOT), name=ORIGIN, private_pem=centre[0]).text()
    body, line = note.split("\n\n")
    cases = [
        (body, "no blank line found"),
        (body + "\n", "no blank line found"),
        (body + "\n\n", "needs at least one signature"),
        (note[:-1], "must end in"),
        (body + "\n\n" + line.replace("\u2014", "-"), "starts with an em dash"),
        (body + "\n\n" + line.replace(" ", "  ", 2), "'\u2014 <name> <base64 signature>'"),
        (body + "\n\n" + line[:-3] + "!=\n", "is not valid base64"),
        (body + "\n\n\u2014 " + ORIGIN + " AAAA\n", "too short to hold one"),
        (body + "\n\n" + line + line, "two signatures by the same key"),
        (body + "\n\n" + line * 101, "at most 100 signatures"),
        (note + "x" * 100_000, "at most 100000 characters"),
    ]
    for text, message in cases:
        with pytest.raises(MalformedCheckpoint, match=message):
            parse_signed_checkpoint(text)
    with pytest.raises(MalformedCheckpoint, match="needs at least one signature"):
        SignedCheckpoint(Checkpoint(ORIGIN, 5, ROOT), ())


# --- JSON -----------------------------------------------------------------------------------


def test_the_json_form_round_trips_and_its_fields_must_agree_with_the_note(centre, site):
    signed = sign_checkpoint(Checkpoint(ORIGIN, 5, ROOT), name=ORIGIN, private_pem=centre[0])
    signed = signed.with_signature(
        cosign_checkpoint(signed.checkpoint, name="witness.hospital-a", private_pem=site[0])
    )
    data = checkpoint_to_json(signed)
    assert data["origin"] == ORIGIN
    assert data["tree_size"] == 5
    assert data["root_hash"] == ROOT.hex()
    assert data["note"] == signed.text()
    assert [s["name"] for s in data["signatures"]] == [ORIGIN, "witness.hospital-a"]
    assert checkpoint_from_json(data, origin=ORIGIN) == signed
    for field, value in [
        ("tree_size", 6),
        ("tree_size", "5"),
        ("origin", "other.test/log"),
        ("root_hash", hashlib.sha256(b"x").hexdigest()),
        ("signatures", data["signatures"][:1]),
    ]:
        with pytest.raises(MalformedCheckpoint, match=f"{field} disagree with its signed note"):
            checkpoint_from_json({**data, field: value})
    with pytest.raises(MalformedCheckpoint, match="an object with"):
        checkpoint_from_json({**data, "extra": 1})
    with pytest.raises(MalformedCheckpoint, match="an object with"):
        checkpoint_from_json([data])
    with pytest.raises(MalformedCheckpoint, match="root_hash must be 64 lower-case hex"):
        checkpoint_from_json({**data, "root_hash": ROOT.hex().upper()})
    with pytest.raises(MalformedCheckpoint, match="note must be the signed checkpoint's text"):
        checkpoint_from_json({**data, "note": None})
    with pytest.raises(WrongOrigin):
        checkpoint_from_json(data, origin="other.test/log")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "w", "key_id": "0011223"}, "and nothing else"),
        ({"name": "w", "key_id": "001122GG", "signature": "AAAA"}, "key_id must be 8"),
        ({"name": "w", "key_id": "00112233", "signature": 5}, "signature must be base64"),
        ({"name": "w", "key_id": "00112233", "signature": "AA=A"}, "not valid base64"),
        ({"name": "a b", "key_id": "00112233", "signature": "AAAA"}, "may not contain"),
        ({"name": "a+b", "key_id": "00112233", "signature": "AAAA"}, "may not contain"),
        ({"name": 7, "key_id": "00112233", "signature": "AAAA"}, "name must be a string"),
    ],
)
def test_a_posted_cosignature_is_read_strictly(data, message):
    with pytest.raises(MalformedCheckpoint, match=message):
        NoteSignature.from_json(data)


# --- keys -----------------------------------------------------------------------------------


def test_only_ed25519_keys_in_pem_are_used(centre):
    checkpoint = Checkpoint(ORIGIN, 5, ROOT)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_private = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ec_public = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(CheckpointError, match="must be Ed25519, got"):
        sign_checkpoint(checkpoint, name=ORIGIN, private_pem=ec_private)
    with pytest.raises(CheckpointError, match="not a usable PEM private key"):
        sign_checkpoint(checkpoint, name=ORIGIN, private_pem="not a key")
    signed = sign_checkpoint(checkpoint, name=ORIGIN, private_pem=centre[0].decode())
    with pytest.raises(BadCheckpointSignature, match="must be Ed25519, got"):
        verify_checkpoint(signed, origin=ORIGIN, name=ORIGIN, public_pem=ec_public)
    with pytest.raises(BadCheckpointSignature, match="not a valid PEM public key"):
        verify_checkpoint(signed, origin=ORIGIN, name=ORIGIN, public_pem="garbage")
    for bad_name in ("", "a b", "a+b", "tab\tname"):
        with pytest.raises(CheckpointError, match="key name"):
            sign_checkpoint(checkpoint, name=bad_name, private_pem=centre[0])
    with pytest.raises(MalformedCheckpoint, match="string ending in a newline"):
        sign_note("no newline", name=ORIGIN, private_pem=centre[0])
