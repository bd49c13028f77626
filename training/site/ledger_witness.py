"""The site worker as a witness of the centre's ledger (docs/architecture.md, section 5).

Before every task (training, evaluation, privacy audit) the worker asks the centre for the
ledger's newest signed checkpoint with a consistency proof from the last checkpoint it saw
(``GET ledger/checkpoint/?since=<size>``, ``training.rounds.site_api_ledger``), and checks both
with the ledger's own verifiers (``audit.ledger.checkpoint`` and ``audit.ledger.merkle``, which
import nothing of Django):

1. the centre's signature, with the centre's public key: ``CENTRAL_LEDGER_PUBLIC_KEY`` (the PEM,
   or the path of a file holding it; the worker credentials page and ``create_site_credentials``
   print it), or else the key the first checkpoint came with, pinned in the state file (trust
   on first use, said in the log);
2. that the log is the one it saw (the same origin), and the RFC 9162 proof that today's tree
   extends the one it saved: the same ledger, only longer.

Only then is the new checkpoint saved (``DATA_ROOT/.fl-state/ledger.json``, beside the
worker's other state, written whole and renamed) and cosigned with the site's key
(``SITE_SIGNING_KEY``, under the site's slug), and the cosignature posted (``POST
ledger/checkpoint/witness/``) for the centre to keep. A failed check raises
:class:`LedgerRefused`: the worker does not do the task (it trains, evaluates and audits
nothing for a centre whose ledger it cannot trust), and says that the centre's ledger was
rewritten (or is not the one it saw). So a database administrator at the centre who rewrites
history, even recomputing every hash so that the chain still verifies, is caught by the first
site worker that looks.

A witness that could not be posted (the centre refused or did not answer) is logged and the
task goes on: what protects the site is its own check, which passed.

The check and the cosignature are two steps (:func:`check_ledger`, :func:`post_witness`;
:func:`witness_ledger` does both). A training task spends no request of its own on either:
its round-model request asks for the checkpoint alongside the model
(:func:`check_ledger_alongside`, ``?ledger_since=``; the model is not used before the check
passed) and its upload carries the cosignature (:func:`cosignature_body`, ``X-Ledger-Witness``;
:func:`witness_answered` reads what the centre made of it). The check, which is what guards
the site, still comes before training, and a cosignature of today's checkpoint vouches for
every earlier one the site checked (each was proven to extend the one before). A task whose
upload did not say what became of its cosignature (training failed; an older centre, which
also sends no checkpoint with the model and is then asked on its own) posts it itself.

A checkpoint is cosigned once: the centre serves the same one for ``LEDGER_CHECKPOINT_SECONDS``
(a second by default, several rounds of a small job), and a cosignature the centre said it holds
(:func:`witness_answered`, :func:`post_witness`) is not sent again for the next task that checks
the same checkpoint (:func:`witness_held`). The check itself is never skipped. What is
remembered is this process's (a restarted worker sends its cosignature once more, which the
centre answers as already held), and only the newest checkpoint, the only one a site is served;
a centre that lost a cosignature it had said it holds gets the site's next one with its next
checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from audit.ledger.checkpoint import (
    CheckpointError,
    SignedCheckpoint,
    checkpoint_from_json,
    checkpoint_to_json,
    cosign_checkpoint,
    verify_checkpoint,
)
from audit.ledger.merkle import ProofError, proof_from_hex, verify_consistency
from training.site.client import CentralClient, CentralError, WorkerConfig
from training.site.protocol import LEDGER_CHECKPOINT_HEADER, decode_ledger_header

log = logging.getLogger(__name__)

__all__ = [
    "CheckedCheckpoint",
    "LedgerRefused",
    "WitnessOutcome",
    "check_ledger",
    "check_ledger_alongside",
    "cosignature_body",
    "post_witness",
    "preview_ledger_check",
    "state_file",
    "state_path",
    "witness_answered",
    "witness_held",
    "witness_ledger",
]

PUBLIC_KEY_ENV = "CENTRAL_LEDGER_PUBLIC_KEY"
T = TypeVar("T")
R = TypeVar("R")
_STATE_VERSION = 1


class _HeldWitness:
    """Per centre and site (a worker serves one), the newest checkpoint whose cosignature the
    centre said it holds (stored then, or before), by the log's origin, the tree's size and
    its root: any other checkpoint is one to cosign."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], tuple[str, int, bytes]] = {}

    @staticmethod
    def _of(config: WorkerConfig, signed: SignedCheckpoint):
        checkpoint = signed.checkpoint
        who = (config.central_url, config.site_slug)
        return who, (checkpoint.origin, checkpoint.tree_size, checkpoint.root_hash)

    def holds(self, config: WorkerConfig, signed: SignedCheckpoint) -> bool:
        who, which = self._of(config, signed)
        with self._lock:
            return self._held.get(who) == which

    def remember(self, config: WorkerConfig, signed: SignedCheckpoint) -> None:
        who, which = self._of(config, signed)
        with self._lock:
            self._held[who] = which


_held = _HeldWitness()


class LedgerRefused(RuntimeError):
    """The centre's ledger failed this site's check: the worker refuses the task."""


@dataclass(frozen=True)
class CheckedCheckpoint:
    """The centre's checkpoint as this site checked and saved it, ready to be cosigned."""

    signed: SignedCheckpoint
    previous_size: int  # the size of the checkpoint the site saw before this one


@dataclass(frozen=True)
class WitnessOutcome:
    tree_size: int
    previous_size: int
    witnessed: bool  # the centre stored (or already had) this site's cosignature


def state_file(data_root: Path) -> Path:
    """Where a worker whose ``DATA_ROOT`` is ``data_root`` keeps the last checkpoint it saw and
    the centre's key it trusts."""
    return data_root / ".fl-state" / "ledger.json"


def state_path(config: WorkerConfig) -> Path:
    """:func:`state_file` of this worker."""
    return state_file(config.data_root)


def configured_public_key(environ: dict | None = None) -> str | None:
    """``CENTRAL_LEDGER_PUBLIC_KEY``: the PEM itself, or the path of a file holding it."""
    raw = ((os.environ if environ is None else environ).get(PUBLIC_KEY_ENV) or "").strip()
    if not raw:
        return None
    if raw.startswith("-----BEGIN"):
        return raw.replace("\\n", "\n") + ("\n" if not raw.endswith("\n") else "")
    path = Path(raw).expanduser()
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerRefused(
            f"{PUBLIC_KEY_ENV}={raw}: cannot read the centre's public key there ({exc})"
        ) from None


def _read_state(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LedgerRefused(
            f"the ledger state {path} cannot be read ({exc}): it holds the last checkpoint "
            "this site saw; restore it, or remove it to start again from the centre's word"
        ) from None
    fields = {"version", "origin", "public_key", "key_source", "checkpoint"}
    if (
        not isinstance(state, dict)
        or set(state) != fields
        or state["version"] != _STATE_VERSION
        or not isinstance(state["checkpoint"], dict)
    ):
        raise LedgerRefused(f"the ledger state {path} is not one this worker wrote")
    return state


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def _refusal(exc: CentralError) -> LedgerRefused | None:
    """The centre's own answer that its ledger does not extend what this site saw."""
    code = exc.body.get("code") if isinstance(exc.body, dict) else None
    detail = exc.body.get("detail", "") if isinstance(exc.body, dict) else str(exc)
    if code == "since_ahead":
        return LedgerRefused(
            "the centre's ledger is SHORTER than the checkpoint this site saw: it was rolled "
            f"back or replaced; refusing its tasks ({detail})"
        )
    if code == "ledger_rewritten":
        return LedgerRefused(
            "the centre says its ledger contradicts a checkpoint it signed: history was "
            f"rewritten; refusing its tasks ({detail})"
        )
    return None


def witness_ledger(
    client: CentralClient, config: WorkerConfig, *, environ: dict | None = None
) -> WitnessOutcome:
    """Check the centre's newest checkpoint against the last one this site saw, save it and
    cosign it; :class:`LedgerRefused` saying why when the ledger is not the one it saw."""
    return post_witness(client, config, check_ledger(client, config, environ=environ))


def check_ledger(
    client: CentralClient, config: WorkerConfig, *, environ: dict | None = None
) -> CheckedCheckpoint:
    """Check the centre's newest checkpoint against the last one this site saw and save it;
    :class:`LedgerRefused` saying why when the ledger is not the one it saw.

    Tasks of one worker may run side by side: the state is read, checked and written under
    an exclusive lock on a file beside it, so each check starts from the newest state.
    """
    checked, _ = check_ledger_alongside(client, config, lambda since: (None, None), environ=environ)
    return checked


def check_ledger_alongside(
    client: CentralClient,
    config: WorkerConfig,
    fetch: Callable[[int], tuple[str | None, T]],
    *,
    environ: dict | None = None,
) -> tuple[CheckedCheckpoint, T]:
    """:func:`check_ledger`, with the centre's checkpoint carried by a request the task makes
    anyway (a training task's round model: ``?ledger_since=`` and ``X-Ledger-Checkpoint``),
    so that the check costs the centre no request of its own.

    ``fetch(since)`` makes that request and returns its ledger header (None when the centre
    sent none: an older centre, asked separately then) and its own result, which is returned
    beside the checked checkpoint. A :class:`~training.site.client.CentralError` from it that
    is the ledger's refusal (``since_ahead``, ``ledger_rewritten``) raises
    :class:`LedgerRefused`, as :func:`check_ledger`; any other is raised as it is, and
    nothing is saved. The result is never the caller's to use before the check passed.
    """
    path = state_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = _read_state(path)
        since = _seen_size(state)
        header, result = _asked(lambda: fetch(since))
        if header is None:
            answer = _asked(lambda: client.ledger_checkpoint(since))
        else:
            try:
                answer = decode_ledger_header(header)
            except ValueError as exc:
                raise LedgerRefused(
                    f"the centre's checkpoint is malformed ({LEDGER_CHECKPOINT_HEADER} is "
                    f"{exc}); refusing its tasks"
                ) from None
        signed, previous = _check_and_save(answer, state, path, environ)
    return CheckedCheckpoint(signed=signed, previous_size=previous), result


def _asked(request: Callable[[], R]) -> R:
    """A request whose answer may be the centre's refusal of this site's ledger check."""
    try:
        return request()
    except CentralError as exc:
        refusal = _refusal(exc)
        if refusal is not None:
            log.error("ledger check: %s", refusal)
            raise refusal from None
        raise


def cosignature_body(config: WorkerConfig, signed: SignedCheckpoint) -> dict:
    """This site's witness of a checkpoint it checked, as ``POST ledger/checkpoint/witness/``
    takes it (and the upload's ``X-Ledger-Witness`` carries it)."""
    cosignature = cosign_checkpoint(
        signed.checkpoint,
        name=config.site_slug,
        private_pem=config.signing_key_path.read_bytes(),
    )
    return {
        "tree_size": signed.checkpoint.tree_size,
        "root_hash": signed.checkpoint.root_hash.hex(),
        "cosignature": cosignature.to_json(),
    }


def witness_held(config: WorkerConfig, checked: CheckedCheckpoint) -> bool:
    """Whether the centre already said it holds this site's cosignature of the checkpoint
    just checked (an earlier task of this process checked the same one): the task then
    sends none (module docstring)."""
    return _held.holds(config, checked.signed)


def witness_answered(body: object, config: WorkerConfig, checked: CheckedCheckpoint) -> bool:
    """Whether the answer ``body`` of a request that carried this site's cosignature (the
    upload's) says what became of it: True when it does (a refusal is logged, as
    :func:`post_witness` logs one; a cosignature stored or already held is remembered, see
    :func:`witness_held`), False when it does not (an older centre ignored the header: the
    caller posts the cosignature on its own)."""
    outcome = body.get("ledger_witness") if isinstance(body, dict) else None
    if not isinstance(outcome, dict):
        return False
    if outcome.get("status") in (200, 201):
        _held.remember(config, checked.signed)
    else:
        log.warning(
            "ledger check passed, but the centre did not take this site's witness of "
            "checkpoint %d: %s",
            checked.signed.checkpoint.tree_size,
            outcome.get("detail", outcome),
        )
    return True


def post_witness(
    client: CentralClient, config: WorkerConfig, checked: CheckedCheckpoint
) -> WitnessOutcome:
    """Cosign a checkpoint :func:`check_ledger` passed and post the cosignature, unless the
    centre already said it holds it (:func:`witness_held`: no request); a centre that refuses
    it or does not answer is logged (``witnessed`` False), not raised."""
    signed = checked.signed
    witnessed = _held.holds(config, signed) or _post_witness(client, config, signed)
    return WitnessOutcome(
        tree_size=signed.checkpoint.tree_size,
        previous_size=checked.previous_size,
        witnessed=witnessed,
    )


def _seen_size(state: dict | None) -> int:
    """The size of the last checkpoint this site saw (0: none)."""
    return state["checkpoint"]["tree_size"] if state else 0


def _check_and_save(
    answer: object, state: dict | None, path: Path, environ: dict | None
) -> tuple[SignedCheckpoint, int]:
    signed, since, new_state = _check_answer(answer, state, environ)
    if state is None and new_state["key_source"] == "trust-on-first-use":
        log.warning(
            "ledger check: %s is not set; trusting the centre's key on first use and "
            "pinning it in %s (set %s to the key the credentials page shows to check it)",
            PUBLIC_KEY_ENV,
            path,
            PUBLIC_KEY_ENV,
        )
    _write_state(path, new_state)
    log.info(
        "ledger check: checkpoint %d extends the %d entries this site saw before",
        signed.checkpoint.tree_size,
        since,
    )
    return signed, since


def preview_ledger_check(
    client: CentralClient, config: WorkerConfig, *, environ: dict | None = None
) -> str:
    """What a task's :func:`check_ledger` would find now, saving nothing (``run_site_worker
    --check``): a sentence naming the checkpoint that verified, the key it verified with and
    what it extends; :class:`LedgerRefused` where a task would be refused (a key that is not
    the centre's, an unreadable ``CENTRAL_LEDGER_PUBLIC_KEY``, a rewritten ledger)."""
    path = state_path(config)
    state = _read_state(path)
    signed, since, new_state = _verify(client, state, environ)
    size = signed.checkpoint.tree_size
    source = new_state["key_source"]
    if state is None and source == "trust-on-first-use":
        return (
            f"{PUBLIC_KEY_ENV} is not set: the first task will trust the key the centre's "
            f"checkpoint {size} verifies with and pin it in {path}; set {PUBLIC_KEY_ENV} to "
            "the key the credentials page shows to check it instead"
        )
    if configured_public_key(environ):
        key = PUBLIC_KEY_ENV
    elif source == "configured":
        key = f"the key pinned in {path} (configured before; {PUBLIC_KEY_ENV} is unset now)"
    else:
        key = f"the key pinned in {path} on first use (set {PUBLIC_KEY_ENV} to check it)"
    seen = (
        f"it extends checkpoint {since}, the last this site saw"
        if state is not None
        else "this site has seen no checkpoint before"
    )
    return f"checkpoint {size} verifies with {key}; {seen}"


def _verify(
    client: CentralClient, state: dict | None, environ: dict | None
) -> tuple[SignedCheckpoint, int, dict]:
    """Fetch the centre's newest checkpoint and check it against ``state`` (the last one this
    site saw, or None): the signed checkpoint, the size it was proven from, and the state to
    save. Writes nothing."""
    since = _seen_size(state)
    return _check_answer(_asked(lambda: client.ledger_checkpoint(since)), state, environ)


def _check_answer(
    answer: object, state: dict | None, environ: dict | None
) -> tuple[SignedCheckpoint, int, dict]:
    """Check the centre's answer (what ``GET ledger/checkpoint/?since=`` answers) against
    ``state``: as :func:`_verify`."""
    since = _seen_size(state)
    if not isinstance(answer, dict):
        raise LedgerRefused(
            "the centre's checkpoint answer is not a JSON object; refusing its tasks"
        )
    if answer.get("since", since) != since:
        raise LedgerRefused(
            f"the centre's checkpoint answer proves from size {answer.get('since')!r}, not from "
            f"the {since} entries this site saw; refusing its tasks"
        )
    try:
        signed = checkpoint_from_json(answer.get("checkpoint"))
        proof = proof_from_hex(answer.get("consistency_proof"))
    except (CheckpointError, ProofError, ValueError, TypeError, AttributeError) as exc:
        raise LedgerRefused(
            f"the centre's checkpoint is malformed ({exc}); refusing its tasks"
        ) from None
    checkpoint = signed.checkpoint

    configured = configured_public_key(environ)
    if configured:
        public_key, source = configured, "configured"
    elif state:
        public_key, source = state["public_key"], state["key_source"]
    else:
        public_key, source = None, "trust-on-first-use"
    origin = state["origin"] if state else checkpoint.origin
    try:
        if public_key is None:
            # Trust on first use: the key is the one the centre's first checkpoint verifies
            # with; it must then sign every later one.
            public_key = answer.get("public_key")
            if not isinstance(public_key, str) or not public_key.startswith("-----BEGIN"):
                raise LedgerRefused("the centre's answer carries no ledger public key to pin")
        verify_checkpoint(signed, origin=origin, name=origin, public_pem=public_key)
    except CheckpointError as exc:
        refusal = LedgerRefused(
            f"the centre's checkpoint {checkpoint.tree_size} does not verify as the ledger "
            f"this site saw ({exc}): the centre's ledger or key is not the one it trusts; "
            "refusing its tasks"
        )
        log.error("ledger check: %s", refusal)
        raise refusal from None

    if state:
        old = checkpoint_from_json(state["checkpoint"]).checkpoint
        try:
            verify_consistency(
                old.tree_size, checkpoint.tree_size, old.root_hash, checkpoint.root_hash, proof
            )
        except ProofError as exc:
            refusal = LedgerRefused(
                f"the centre's ledger was REWRITTEN: its checkpoint {checkpoint.tree_size} does "
                f"not extend checkpoint {old.tree_size} that this site saw and witnessed "
                f"({exc}); refusing its tasks"
            )
            log.error("ledger check: %s", refusal)
            raise refusal from None
    return (
        signed,
        since,
        {
            "version": _STATE_VERSION,
            "origin": origin,
            "public_key": public_key,
            "key_source": source,
            "checkpoint": checkpoint_to_json(signed),
        },
    )


def _post_witness(client: CentralClient, config: WorkerConfig, signed: SignedCheckpoint) -> bool:
    try:
        client.ledger_witness(cosignature_body(config, signed))
    except CentralError as exc:
        log.warning(
            "ledger check passed, but the centre did not take this site's witness of "
            "checkpoint %d: %s",
            signed.checkpoint.tree_size,
            exc,
        )
        return False
    _held.remember(config, signed)
    return True
