"""Signed checkpoints of the ledger's Merkle tree head, and witnesses' cosignatures.

A checkpoint says "the log called ORIGIN had SIZE entries and this root" (:mod:`.merkle`); the
centre signs it, and every site's worker that has checked it (signature, and a consistency
proof from the last checkpoint it saw) signs the same text as a witness. Once one site holds a
checkpoint, the centre cannot show anyone a ledger that does not extend it without a consistency
proof failing somewhere; a saved checkpoint checks today's ledger (``verify_ledger
--checkpoint``).

The format is the C2SP one (https://c2sp.org/tlog-checkpoint inside https://c2sp.org/signed-note),
so tools that read Certificate Transparency and Go checksum-database notes read ours::

    ledger.example.org/consortium        the origin: the log's identity
    1234                                 the tree size, decimal
    Ic0mL3b...base64 root...=            the root hash, standard base64
                                         a blank line, then one line per signature:
    — ledger.example.org/consortium Ab3xY...base64(key id || Ed25519 signature)...
    — site-hospital-a 8vQ2...

Each signature is Ed25519 over the checkpoint text exactly (the three lines, final newline
included). The key id is the first 4 bytes of SHA-256(name || "\\n" || 0x01 || public key), as
the signed-note spec defines it, so a verifier picks the line meant for its key by name and id
and ignores the others. A witness's cosignature is such a line by the site's key, over the same
text. (C2SP's later ``cosignature/v1`` adds a timestamp to what the witness signs; we sign the
checkpoint text itself, as the site worker's only claim is "I checked this head".)

Keys are the project's: Ed25519 in PEM, PKCS#8 for private keys and SubjectPublicKeyInfo for
public ones, as site workers already hold them (``SITE_SIGNING_KEY``) and the centre registers
them (a site credential's ``public_key``); see ``training/fl/signing.py``, whose loaders the
ledger cannot import (it imports no app) and which these mirror. The centre has no key of its
own yet: whoever signs passes the PEM. Like :mod:`.merkle`, this module imports nothing of
Django or of the project.

Every failure is a :class:`CheckpointError` (a ``ValueError``): :class:`MalformedCheckpoint`
for text that is not a checkpoint, :class:`WrongOrigin` for another log's checkpoint,
:class:`BadCheckpointSignature` for a signature that is missing or does not verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import unicodedata
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit.ledger.merkle import HASH_SIZE

__all__ = [
    "BadCheckpointSignature",
    "Checkpoint",
    "CheckpointError",
    "MalformedCheckpoint",
    "NoteSignature",
    "SignedCheckpoint",
    "WrongOrigin",
    "checkpoint_from_json",
    "checkpoint_to_json",
    "cosign_checkpoint",
    "key_id",
    "parse_checkpoint",
    "parse_signed_checkpoint",
    "sign_checkpoint",
    "sign_note",
    "verifier_key",
    "verify_checkpoint",
    "verify_cosignature",
    "verify_note_signature",
]

_SIGNATURE_PREFIX = "\u2014 "  # an em dash and a space: how the signed-note spec marks a line
_ALG_ED25519 = b"\x01"
_KEY_ID_BYTES = 4
_SIGNATURE_BYTES = 64
_MAX_SIGNATURES = 100  # as the signed-note reference implementation allows
_MAX_NOTE_CHARS = 100_000
_MAX_SIZE = 2**64 - 1
_SIZE_RE = re.compile(r"0|[1-9][0-9]{0,19}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{8}")
_ROOT_HEX_RE = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint, note or signature that cannot be accepted; the message says why."""


class MalformedCheckpoint(CheckpointError):
    """Text (or JSON) that is not a well-formed checkpoint or signed note."""


class WrongOrigin(CheckpointError):
    """A checkpoint of another log than the one expected."""


class BadCheckpointSignature(CheckpointError):
    """A signature that is missing, made with another key, or does not verify."""


# --- keys -------------------------------------------------------------------------------


def _private_key(private_pem: bytes | str) -> Ed25519PrivateKey:
    data = private_pem.encode("ascii") if isinstance(private_pem, str) else private_pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise CheckpointError(f"not a usable PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointError(f"checkpoint keys must be Ed25519, got {type(key).__name__}")
    return key


def _public_key(public_pem: bytes | str) -> Ed25519PublicKey:
    data = public_pem.encode("ascii") if isinstance(public_pem, str) else public_pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise BadCheckpointSignature(f"not a valid PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BadCheckpointSignature(
            f"checkpoint keys must be Ed25519, got {type(key).__name__}: refused"
        )
    return key


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _check_key_name(name: object) -> str:
    """A signed-note key name: non-empty, no whitespace and no '+' (the vkey separator)."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"a key name must be a non-empty string, got {name!r}")
    if "+" in name or any(c.isspace() or unicodedata.category(c) == "Cc" for c in name):
        raise CheckpointError(
            f"a key name may not contain '+', spaces or control characters: {name!r}"
        )
    return name


def _key_id(name: str, raw_public: bytes) -> bytes:
    return hashlib.sha256(name.encode("utf-8") + b"\n" + _ALG_ED25519 + raw_public).digest()[
        :_KEY_ID_BYTES
    ]


def key_id(name: str, public_pem: bytes | str) -> bytes:
    """The 4-byte id of an Ed25519 key under ``name``, as signed-note lines carry it."""
    return _key_id(_check_key_name(name), _raw_public(_public_key(public_pem)))


def verifier_key(name: str, public_pem: bytes | str) -> str:
    """The key in the signed-note "vkey" form (``name+keyid+base64(0x01 || key)``).

    What witness configurations and the Go ``note`` package take, so a checkpoint can be
    checked with tools that are not ours.
    """
    raw = _raw_public(_public_key(public_pem))
    name = _check_key_name(name)
    encoded = base64.b64encode(_ALG_ED25519 + raw).decode("ascii")
    return f"{name}+{_key_id(name, raw).hex()}+{encoded}"


# --- the checkpoint text ----------------------------------------------------------------


def _check_origin(origin: object) -> str:
    if not isinstance(origin, str) or not origin:
        raise MalformedCheckpoint(f"the origin must be a non-empty string, got {origin!r}")
    if origin != origin.strip() or any(unicodedata.category(c) == "Cc" for c in origin):
        raise MalformedCheckpoint(
            f"the origin may not have surrounding spaces or control characters: {origin!r}"
        )
    return origin


def _b64decode_strict(text: str, what: str) -> bytes:
    """Standard base64 with padding, in its one canonical spelling."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedCheckpoint(f"{what} is not valid base64 ({exc}): {text!r}") from exc
    if base64.b64encode(data).decode("ascii") != text:
        raise MalformedCheckpoint(f"{what} is not in canonical base64: {text!r}")
    return data


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: the log's ``origin``, its ``tree_size`` and the Merkle ``root_hash``."""

    origin: str
    tree_size: int
    root_hash: bytes

    def __post_init__(self) -> None:
        _check_origin(self.origin)
        size = self.tree_size
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= _MAX_SIZE:
            raise MalformedCheckpoint(
                f"the tree size must be an integer from 0 to 2**64 - 1, got {size!r}"
            )
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            got = len(self.root_hash) if isinstance(self.root_hash, bytes) else self.root_hash
            raise MalformedCheckpoint(
                f"the root hash must be {HASH_SIZE} bytes (SHA-256), got {got!r}"
            )

    def text(self) -> str:
        """The canonical checkpoint text: what every signature is over."""
        root = base64.b64encode(self.root_hash).decode("ascii")
        return f"{self.origin}\n{self.tree_size}\n{root}\n"


def parse_checkpoint(text: str, *, origin: str | None = None) -> Checkpoint:
    """Read a checkpoint's text (no signatures) strictly.

    Exactly three lines, each ending in a newline; no extension lines (our log defines none).
    With ``origin``, a checkpoint of another log is refused (:class:`WrongOrigin`).
    """
    if not isinstance(text, str):
        raise MalformedCheckpoint(f"a checkpoint is text, got {type(text).__name__}")
    if not text.endswith("\n"):
        raise MalformedCheckpoint("a checkpoint's text must end with a newline")
    if "\r" in text:
        raise MalformedCheckpoint("a checkpoint's lines end in \\n alone, not \\r\\n")
    lines = text[:-1].split("\n")
    if len(lines) != 3:
        raise MalformedCheckpoint(
            f"a checkpoint is three lines (origin, tree size, root hash), got {len(lines)}"
        )
    origin_line, size_line, root_line = lines
    found = _check_origin(origin_line)
    if origin is not None and found != origin:
        raise WrongOrigin(f"the checkpoint is of the log {found!r}, not {origin!r}")
    if not _SIZE_RE.fullmatch(size_line) or int(size_line) > _MAX_SIZE:
        raise MalformedCheckpoint(
            f"the tree size must be a decimal integer from 0 to 2**64 - 1 without leading "
            f"zeros, got {size_line!r}"
        )
    root = _b64decode_strict(root_line, "the root hash")
    if len(root) != HASH_SIZE:
        raise MalformedCheckpoint(
            f"the root hash is {len(root)} bytes; a SHA-256 root is {HASH_SIZE}"
        )
    return Checkpoint(found, int(size_line), root)


# --- signatures -------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: the signer's key ``name``, 4-byte ``key_id`` and the signature."""

    name: str
    key_id: bytes
    signature: bytes

    def __post_init__(self) -> None:
        try:
            _check_key_name(self.name)
        except CheckpointError as exc:
            raise MalformedCheckpoint(str(exc)) from None
        if not isinstance(self.key_id, bytes) or len(self.key_id) != _KEY_ID_BYTES:
            raise MalformedCheckpoint(f"a key id is {_KEY_ID_BYTES} bytes, got {self.key_id!r}")
        if not isinstance(self.signature, bytes) or not self.signature:
            raise MalformedCheckpoint("a signature line must carry a signature")

    def line(self) -> str:
        encoded = base64.b64encode(self.key_id + self.signature).decode("ascii")
        return f"{_SIGNATURE_PREFIX}{self.name} {encoded}\n"

    @classmethod
    def from_line(cls, line: str) -> NoteSignature:
        """Read one signature line (with or without its newline)."""
        if not isinstance(line, str):
            raise MalformedCheckpoint(f"a signature line is text, got {type(line).__name__}")
        body = line[:-1] if line.endswith("\n") else line
        if not body.startswith(_SIGNATURE_PREFIX):
            raise MalformedCheckpoint(
                f"a signature line starts with an em dash and a space: {line!r}"
            )
        parts = body[len(_SIGNATURE_PREFIX) :].split(" ")
        if len(parts) != 2:
            raise MalformedCheckpoint(
                f"a signature line is '\u2014 <name> <base64 signature>': {line!r}"
            )
        name, encoded = parts
        blob = _b64decode_strict(encoded, f"the signature of {name!r}")
        if len(blob) <= _KEY_ID_BYTES:
            raise MalformedCheckpoint(f"the signature of {name!r} is too short to hold one")
        return cls(name, blob[:_KEY_ID_BYTES], blob[_KEY_ID_BYTES:])

    def to_json(self) -> dict[str, str]:
        """``name``, ``key_id`` (8 hex digits) and ``signature`` (base64 of the Ed25519 bytes)."""
        return {
            "name": self.name,
            "key_id": self.key_id.hex(),
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: object) -> NoteSignature:
        """Read :meth:`to_json`'s form back strictly (what a witness posts)."""
        if not isinstance(data, dict) or set(data) != {"name", "key_id", "signature"}:
            shown = repr(data)[:300]
            raise MalformedCheckpoint(
                f'a signature is {{"name", "key_id", "signature"}} and nothing else, got {shown}'
            )
        name, kid, signature = data["name"], data["key_id"], data["signature"]
        if not isinstance(kid, str) or not _KEY_ID_RE.fullmatch(kid):
            raise MalformedCheckpoint(f"key_id must be 8 lower-case hex digits, got {kid!r}")
        if not isinstance(signature, str):
            raise MalformedCheckpoint(f"signature must be base64 text, got {signature!r}")
        if not isinstance(name, str):
            raise MalformedCheckpoint(f"name must be a string, got {name!r}")
        return cls(name, bytes.fromhex(kid), _b64decode_strict(signature, "signature"))


def sign_note(text: str, *, name: str, private_pem: bytes | str) -> NoteSignature:
    """The signed-note primitive: Ed25519 over ``text``'s UTF-8 bytes, as a signature line.

    Checkpoints are signed through it (:func:`sign_checkpoint`, :func:`cosign_checkpoint`);
    it is public so the format can be checked against other implementations' notes.
    """
    if not isinstance(text, str) or not text.endswith("\n"):
        raise MalformedCheckpoint("a note's text is a string ending in a newline")
    key = _private_key(private_pem)
    name = _check_key_name(name)
    signature = key.sign(text.encode("utf-8"))
    return NoteSignature(name, _key_id(name, _raw_public(key.public_key())), signature)


def verify_note_signature(
    text: str, signature: NoteSignature, *, name: str, public_pem: bytes | str
) -> None:
    """Check that ``signature`` is the key ``name``/``public_pem``'s over ``text``, or raise."""
    key = _public_key(public_pem)
    name = _check_key_name(name)
    if signature.name != name:
        raise BadCheckpointSignature(f"the signature is by {signature.name!r}, not {name!r}")
    if signature.key_id != _key_id(name, _raw_public(key)):
        raise BadCheckpointSignature(
            f"the signature by {name!r} was made with another key than the one given "
            f"(key id {signature.key_id.hex()})"
        )
    if len(signature.signature) != _SIGNATURE_BYTES:
        raise BadCheckpointSignature(
            f"the signature by {name!r} is {len(signature.signature)} bytes; an Ed25519 "
            f"signature is {_SIGNATURE_BYTES}"
        )
    try:
        key.verify(signature.signature, text.encode("utf-8"))
    except InvalidSignature:
        raise BadCheckpointSignature(
            f"the signature by {name!r} does not match this text: altered text or forged signature"
        ) from None


def _verify(
    checkpoint: Checkpoint, signature: NoteSignature, name: str, public_pem: bytes | str
) -> None:
    try:
        verify_note_signature(checkpoint.text(), signature, name=name, public_pem=public_pem)
    except BadCheckpointSignature as exc:
        raise BadCheckpointSignature(
            f"checkpoint of {checkpoint.origin!r} at size {checkpoint.tree_size}: {exc}"
        ) from None


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint with its signature lines (the centre's first, then witnesses')."""

    checkpoint: Checkpoint
    signatures: tuple[NoteSignature, ...]

    def __post_init__(self) -> None:
        if not self.signatures:
            raise MalformedCheckpoint("a signed checkpoint needs at least one signature")
        if len(self.signatures) > _MAX_SIGNATURES:
            raise MalformedCheckpoint(
                f"a signed checkpoint has at most {_MAX_SIGNATURES} signatures, "
                f"got {len(self.signatures)}"
            )
        seen: set[tuple[str, bytes]] = set()
        for sig in self.signatures:
            if (sig.name, sig.key_id) in seen:
                raise MalformedCheckpoint(f"two signatures by the same key ({sig.name!r})")
            seen.add((sig.name, sig.key_id))

    def text(self) -> str:
        """The signed note: the checkpoint, a blank line, one line per signature."""
        return self.checkpoint.text() + "\n" + "".join(s.line() for s in self.signatures)

    def with_signature(self, signature: NoteSignature) -> SignedCheckpoint:
        """This note with one more signature line (a witness's cosignature, say)."""
        return SignedCheckpoint(self.checkpoint, (*self.signatures, signature))

    def signature_by(self, name: str, public_pem: bytes | str) -> NoteSignature:
        """The line of the key ``name``/``public_pem``; :class:`BadCheckpointSignature` if none."""
        kid = key_id(name, public_pem)
        for sig in self.signatures:
            if sig.name == name and sig.key_id == kid:
                return sig
        raise BadCheckpointSignature(
            f"the checkpoint carries no signature by {name!r} with this key (key id {kid.hex()})"
        )


def sign_checkpoint(
    checkpoint: Checkpoint, *, name: str, private_pem: bytes | str
) -> SignedCheckpoint:
    """The log's signature: ``checkpoint`` signed by the key ``name`` (C2SP: the origin)."""
    return SignedCheckpoint(
        checkpoint, (sign_note(checkpoint.text(), name=name, private_pem=private_pem),)
    )


def cosign_checkpoint(
    checkpoint: Checkpoint, *, name: str, private_pem: bytes | str
) -> NoteSignature:
    """A witness's cosignature: the same checkpoint text signed by the witness's key.

    Sign only what was checked: the log's signature (:func:`verify_checkpoint`) and a
    consistency proof from the last checkpoint this witness signed (``merkle``).
    """
    return sign_note(checkpoint.text(), name=name, private_pem=private_pem)


def verify_cosignature(
    checkpoint: Checkpoint, signature: NoteSignature, *, name: str, public_pem: bytes | str
) -> None:
    """Check one signature over ``checkpoint`` by the key ``name``; raise if it does not hold."""
    _verify(checkpoint, signature, name, public_pem)


def parse_signed_checkpoint(note: str, *, origin: str | None = None) -> SignedCheckpoint:
    """Read a signed note strictly into a :class:`SignedCheckpoint`; verifies nothing."""
    if not isinstance(note, str):
        raise MalformedCheckpoint(f"a signed checkpoint is text, got {type(note).__name__}")
    if len(note) > _MAX_NOTE_CHARS:
        raise MalformedCheckpoint(f"a signed checkpoint is at most {_MAX_NOTE_CHARS} characters")
    split = note.find("\n\n")
    if split < 0:
        raise MalformedCheckpoint(
            "a signed checkpoint is its text, a blank line and signature lines; no blank line found"
        )
    checkpoint = parse_checkpoint(note[: split + 1], origin=origin)
    rest = note[split + 2 :]
    if not rest:
        raise MalformedCheckpoint("a signed checkpoint needs at least one signature line")
    if not rest.endswith("\n"):
        raise MalformedCheckpoint("a signed checkpoint's last signature line must end in \\n")
    lines = rest[:-1].split("\n")
    return SignedCheckpoint(checkpoint, tuple(NoteSignature.from_line(line) for line in lines))


def verify_checkpoint(
    note: str | SignedCheckpoint, *, origin: str, name: str, public_pem: bytes | str
) -> SignedCheckpoint:
    """Parse ``note`` (or take it parsed), check it is ``origin``'s and signed by the log's key.

    Returns the signed checkpoint; other signature lines (witnesses') are kept unchecked, for
    :func:`verify_cosignature`.
    """
    signed = note if isinstance(note, SignedCheckpoint) else parse_signed_checkpoint(note)
    if signed.checkpoint.origin != origin:
        raise WrongOrigin(
            f"the checkpoint is of the log {signed.checkpoint.origin!r}, not {origin!r}"
        )
    _verify(signed.checkpoint, signed.signature_by(name, public_pem), name, public_pem)
    return signed


# --- JSON, for the API -------------------------------------------------------------------


def checkpoint_to_json(signed: SignedCheckpoint) -> dict[str, object]:
    """The API's form: the signed ``note`` (what is verified) and its fields, for reading.

    ``root_hash`` is lower-case hex like the ledger's other hashes; ``signatures`` lists each
    line's :meth:`NoteSignature.to_json`.
    """
    checkpoint = signed.checkpoint
    return {
        "origin": checkpoint.origin,
        "tree_size": checkpoint.tree_size,
        "root_hash": checkpoint.root_hash.hex(),
        "note": signed.text(),
        "signatures": [s.to_json() for s in signed.signatures],
    }


def checkpoint_from_json(data: object, *, origin: str | None = None) -> SignedCheckpoint:
    """Read :func:`checkpoint_to_json`'s form: the note decides, the fields must agree with it."""
    fields = {"origin", "tree_size", "root_hash", "note", "signatures"}
    if not isinstance(data, dict) or set(data) != fields:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise MalformedCheckpoint(f"a checkpoint is an object with {sorted(fields)}, got {keys}")
    note = data["note"]
    if not isinstance(note, str):
        raise MalformedCheckpoint(f"note must be the signed checkpoint's text, got {note!r}")
    signed = parse_signed_checkpoint(note, origin=origin)
    checkpoint = signed.checkpoint
    root = data["root_hash"]
    if not isinstance(root, str) or not _ROOT_HEX_RE.fullmatch(root):
        raise MalformedCheckpoint(f"root_hash must be 64 lower-case hex digits, got {root!r}")
    listed = data["signatures"]
    if not isinstance(listed, list):
        raise MalformedCheckpoint(f"signatures must be a list, got {type(listed).__name__}")
    disagreements = [
        what
        for what, given, noted in (
            ("origin", data["origin"], checkpoint.origin),
            ("tree_size", data["tree_size"], checkpoint.tree_size),
            ("root_hash", root, checkpoint.root_hash.hex()),
        )
        if given != noted or type(given) is not type(noted)
    ]
    if [NoteSignature.from_json(s) for s in listed] != list(signed.signatures):
        disagreements.append("signatures")
    if disagreements:
        raise MalformedCheckpoint(
            f"the checkpoint's {', '.join(disagreements)} disagree with its signed note"
        )
    return signed
