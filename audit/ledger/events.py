"""The ledger's events: the one registry of event names and the schema of each payload.

Every service that writes the ledger names its event by one of the constants below, and the
reports, the pages and the verifiers read entries by the same constants. Each event states
what its entry is about (``subject``, a model label, or ``""`` when the entry names none) and
the fields of its payload: their JSON types, and which of them a writer may leave out.

An :class:`Event` is a ``str`` (the name that is stored, hashed and filtered on, exactly as
before this registry existed), so comparing an entry's ``event`` column with a constant is a
plain string comparison. :func:`audit.ledger.chain.append_entry` checks a payload against its
event's schema whenever it is given an :class:`Event`; a plain string is written as it is
(tools and tests that plant synthetic entries), and the architecture tests check that the
product's own writers always pass a constant from here.

Payload fields are part of the audit record, which outlives any release: add fields (as
optional ones for entries already written), never rename or drop one. The reports read old
entries too, so a reader must not assume an optional field is present.

This module imports nothing from the project: every layer may read it.

Why one module: it is the table of every event the product writes, read top to bottom by
auditors and developers alike; splitting it by app would scatter the one list this module
exists to keep in one place.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final


class EventPayloadError(ValueError):
    """A payload does not match its event's schema: a programming error in the writer,
    refused before anything is written, so the ledger never holds a malformed entry."""


@dataclass(frozen=True)
class JSONType:
    """A JSON type a payload field may hold (``nullable``: ``null`` too)."""

    name: str
    python: tuple[type, ...]
    nullable: bool = False

    def accepts(self, value: object) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool):  # a bool is an int to Python, never to JSON's readers
            return bool in self.python
        return isinstance(value, self.python)

    def or_null(self) -> JSONType:
        return JSONType(f"{self.name} or null", self.python, nullable=True)


STRING: Final = JSONType("string", (str,))
INTEGER: Final = JSONType("integer", (int,))
NUMBER: Final = JSONType("number", (int, float))
BOOLEAN: Final = JSONType("boolean", (bool,))
OBJECT: Final = JSONType("object", (dict,))
ARRAY: Final = JSONType("array", (list, tuple))


@dataclass(frozen=True)
class Field:
    """One payload field: its JSON type, whether a writer may leave it out, what it holds."""

    name: str
    type: JSONType
    doc: str
    optional: bool = False


class Event(str):
    """An event name with its schema. Compares, hashes and stores as the plain name."""

    subject: str
    fields: tuple[Field, ...]
    doc: str

    def __new__(cls, name: str, *, subject: str, doc: str, fields: tuple[Field, ...] = ()) -> Event:
        self = super().__new__(cls, name)
        self.subject = subject
        self.fields = fields
        self.doc = doc
        return self

    @property
    def name(self) -> str:
        return str(self)

    def field_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields)

    def check(self, payload: Mapping[str, Any]) -> None:
        """Refuse a payload with a missing required field, an undeclared field, or a value of
        the wrong JSON type, naming each problem."""
        declared = {f.name: f for f in self.fields}
        problems = [
            f"missing field {f.name!r}"
            for f in self.fields
            if not f.optional and f.name not in payload
        ]
        problems += [f"undeclared field {key!r}" for key in sorted(set(payload) - set(declared))]
        problems += [
            f"field {key!r} must be {declared[key].type.name}, not {type(value).__name__}"
            for key, value in payload.items()
            if key in declared and not declared[key].type.accepts(value)
        ]
        if problems:
            raise EventPayloadError(f"ledger event {self.name!r}: " + "; ".join(problems))


_REGISTRY: dict[str, Event] = {}


def _event(name: str, *, subject: str, doc: str, fields: tuple[Field, ...] = ()) -> Event:
    if name in _REGISTRY:
        raise ValueError(f"ledger event {name!r} declared twice")
    event = Event(name, subject=subject, doc=doc, fields=fields)
    _REGISTRY[name] = event
    return event


def F(name: str, type_: JSONType, doc: str, *, optional: bool = False) -> Field:  # noqa: N802
    return Field(name, type_, doc, optional=optional)


def registered(name: str) -> Event | None:
    """The registered event of that name, or ``None`` (a synthetic or unknown entry)."""
    return _REGISTRY.get(name)


def all_events() -> Iterator[Event]:
    """Every registered event, in the order they are declared here."""
    return iter(_REGISTRY.values())


_JOB_ID = F("job_id", INTEGER, "The training job's id.")
_ROUND = F("round", INTEGER, "The round's index (1 for the first round).")
_SITE = F("site", STRING, "The institution's site slug.")
_AGREEMENT_ID = F("agreement_id", INTEGER, "The agreement's id.")
_VERSION = F("version", INTEGER, "The agreement version's number.")
_USER_ID = F("user_id", INTEGER, "The member's user id.")
_USERNAME = F("username", STRING, "The member's username at the time.")
_REASON = F("reason", STRING, "Why, in words.")
_SPEC_DIGEST = F("spec_digest", STRING, "SHA-256 of the job spec's canonical JSON.")
_TITLE = F("title", STRING, "The job's title.")
_PROJECTED = F(
    "projected_epsilon",
    OBJECT,
    "Per institution slug, the ε the job would have spent at its end (at the agreement's δ).",
)
_LINEAGE = F("lineage_hash", STRING, "Hash chaining this model to its parents and updates.")
_UPDATE_SITE_FIELDS = (
    _JOB_ID,
    _ROUND,
    _SITE,
    F("credential", STRING, "The site credential's token prefix that uploaded it."),
    F("global_model", STRING, "Digest of the round's global model."),
    F("start_model", STRING, "Digest of the model the site started from."),
)

# --- Governance (consortium.governance.services.*) -----------------------------------------

CONSORTIUM_CREATED = _event(
    "consortium.created",
    subject="consortium.consortium",
    doc="A consortium was created.",
    fields=(F("name", STRING, "Its name."), F("slug", STRING, "Its slug.")),
)
INSTITUTION_CREATED = _event(
    "institution.created",
    subject="consortium.institution",
    doc="An institution (a hospital site) joined the consortium.",
    fields=(
        F("name", STRING, "Its name."),
        F("slug", STRING, "Its site slug (its workers' queue is site.<slug>)."),
        F("country", STRING, "Its country code."),
        F("worker_key_fingerprint", STRING, "Fingerprint of its worker's public key, or ''."),
    ),
)
INSTITUTION_UPDATED = _event(
    "institution.updated",
    subject="consortium.institution",
    doc="An institution's details or worker key changed.",
    fields=(F("changes", OBJECT, "Per changed field, its old and new value."),),
)
MEMBER_INVITED = _event(
    "member.invited",
    subject="consortium.invitation",
    doc="Someone was invited to a role.",
    fields=(
        F("email", STRING, "The address invited."),
        F("role", STRING, "The role offered."),
        F("expires_at", STRING, "When the invitation expires (ISO 8601)."),
    ),
)
INVITATION_REVOKED = _event(
    "member.invitation_revoked",
    subject="consortium.invitation",
    doc="A pending invitation was revoked.",
    fields=(F("email", STRING, "The address invited."), F("role", STRING, "The role offered.")),
)
MEMBER_JOINED = _event(
    "member.joined",
    subject="consortium.membership",
    doc="A user took a role: by accepting an invitation, or granted directly by an operator.",
    fields=(
        _USER_ID,
        _USERNAME,
        F("role", STRING, "The role taken."),
        F("invitation_id", INTEGER, "The invitation accepted.", optional=True),
        F("via", STRING, "How a role granted without an invitation came.", optional=True),
    ),
)
MEMBER_ROLE_CHANGED = _event(
    "member.role_changed",
    subject="consortium.membership",
    doc="A member's role changed.",
    fields=(
        _USER_ID,
        _USERNAME,
        F("old_role", STRING, "The role before."),
        F("new_role", STRING, "The role after."),
    ),
)
MEMBER_REMOVED = _event(
    "member.removed",
    subject="consortium.membership",
    doc="A membership was removed.",
    fields=(_USER_ID, _USERNAME, F("role", STRING, "The role it had.")),
)
AGREEMENT_DRAFTED = _event(
    "agreement.drafted",
    subject="consortium.agreementversion",
    doc="A draft agreement version was started (a new agreement, or an amendment).",
    fields=(
        _AGREEMENT_ID,
        _VERSION,
        F("title", STRING, "The agreement's title."),
        F("amends_version", INTEGER, "The version this draft amends.", optional=True),
    ),
)
AGREEMENT_DRAFT_EDITED = _event(
    "agreement.draft_edited",
    subject="consortium.agreementversion",
    doc="A draft version's terms were edited.",
    fields=(_AGREEMENT_ID, _VERSION, F("changed", ARRAY, "The names of the terms changed.")),
)
AGREEMENT_PUBLISHED = _event(
    "agreement.version_published",
    subject="consortium.agreementversion",
    doc="A version was published: its terms are frozen and open for signature.",
    fields=(
        _AGREEMENT_ID,
        _VERSION,
        F("content_digest", STRING, "SHA-256 of the version's canonical terms."),
        F("terms", OBJECT, "The published terms (privacy floor, purposes, validity)."),
    ),
)
AGREEMENT_SIGNED = _event(
    "agreement.signed",
    subject="consortium.signature",
    doc="An institution's approver signed a published version.",
    fields=(
        _AGREEMENT_ID,
        _VERSION,
        F("content_digest", STRING, "The digest of the terms signed."),
        F("typed_name", STRING, "The name the signer typed."),
    ),
)
CONSENT_WITHDRAWN = _event(
    "consent.withdrawn",
    subject="consortium.withdrawal",
    doc="An institution withdrew its consent under an agreement.",
    fields=(_AGREEMENT_ID, _REASON),
)

# --- Data sets, jobs and approvals (training.jobs) -----------------------------------------

DATASET_REGISTERED = _event(
    "dataset.registered",
    subject="training.sitedataset",
    doc="A site registered a local data set (its description only; the data stays on site).",
    fields=(
        F("key", STRING, "The data set's key at the site."),
        F("modality", STRING, "Its modality."),
        F("num_records", INTEGER, "How many records it holds."),
        F("n_classes", INTEGER, "How many classes its labels take."),
        F("input_shape", ARRAY, "The shape of one record."),
        F("schema", OBJECT, "Its declared schema."),
    ),
)
DATASET_UPDATED = _event(
    "dataset.updated",
    subject="training.sitedataset",
    doc="A data set's description changed.",
    fields=(F("key", STRING, "The data set's key."), F("changed", OBJECT, "Old and new values.")),
)
DATASET_REMOVED = _event(
    "dataset.removed",
    subject="training.sitedataset",
    doc="A data set was withdrawn from future jobs.",
    fields=(F("key", STRING, "The data set's key."),),
)
VALIDATION_SET_UPLOADED = _event(
    "validation_set.uploaded",
    subject="training.centralvalidationset",
    doc="An institution's data steward sent records to the consortium's server as the central "
    "validation set of a data set key, under an agreement version that allows it.",
    fields=(
        F("key", STRING, "The data set key it validates."),
        F("institution", STRING, "The uploading institution's slug."),
        F("digest", STRING, "The stored records' artifact digest (the tensors x and y)."),
        F("upload_sha256", STRING, "SHA-256 of the file as uploaded."),
        F("file_format", STRING, "csv or npz."),
        F("records", INTEGER, "How many records it holds."),
        F("modality", STRING, "tabular, image or segmentation."),
        F("input_shape", ARRAY, "The shape of one record."),
        F("n_classes", INTEGER, "The classes its labels show (largest + 1)."),
        _AGREEMENT_ID,
        _VERSION,
        F("replaces", STRING.or_null(), "The digest of the set it replaces, or null."),
    ),
)
JOB_DRAFTED = _event(
    "job.drafted",
    subject="training.trainingjob",
    doc="A job was saved as a draft.",
    fields=(_JOB_ID, _TITLE, _SPEC_DIGEST),
)
JOB_PROPOSED = _event(
    "job.proposed",
    subject="training.trainingjob",
    doc="A job was proposed: it complies with the agreement in force and awaits approvals.",
    fields=(
        _JOB_ID,
        _TITLE,
        _SPEC_DIGEST,
        F("agreement_version", INTEGER, "The agreement version it is bound to."),
        F("agreement_digest", STRING, "That version's content digest."),
        F("participants", ARRAY, "The participating institutions' slugs."),
        _PROJECTED,
        F("approval_deadline", STRING, "When approvals expire (ISO 8601)."),
    ),
)
JOB_PROPOSAL_REFUSED = _event(
    "job.proposal_refused",
    subject="",
    doc="A proposal or spec change was refused: it would break the agreement.",
    fields=(
        F("job_id", INTEGER.or_null(), "The job, or null for a new proposal."),
        _TITLE,
        _SPEC_DIGEST,
        F("problems", ARRAY, "Each broken term, with the institution concerned."),
        F(
            "agreement_version",
            INTEGER,
            "The agreement version it was checked against (absent from older entries, and when "
            "no agreement was in force).",
            optional=True,
        ),
        F(
            "agreement_digest",
            STRING,
            "That version's content digest (absent where agreement_version is).",
            optional=True,
        ),
    ),
)
JOB_SPEC_CHANGED = _event(
    "job.spec_changed",
    subject="training.trainingjob",
    doc="A job's spec changed before it started; earlier approvals are void.",
    fields=(
        _JOB_ID,
        _TITLE,
        _SPEC_DIGEST,
        F("old_spec_digest", STRING, "The digest before the change."),
        F("approvals_voided", INTEGER, "How many approvals the change voided."),
        _PROJECTED,
    ),
)
JOB_AGREEMENT_REBOUND = _event(
    "job.agreement_rebound",
    subject="training.trainingjob",
    doc="A job awaiting approval was bound to the agreement version in force (a newer version "
    "of its agreement, or a version of another agreement).",
    fields=(
        _JOB_ID,
        F("old_version", INTEGER, "The version before."),
        F("new_version", INTEGER, "The version after."),
        F(
            "old_agreement_id",
            INTEGER,
            "The agreement of the version before (absent from older entries).",
            optional=True,
        ),
        F(
            "new_agreement_id",
            INTEGER,
            "The agreement of the version after, which may be another agreement: the newest "
            "in force (absent from older entries, which stayed within one agreement).",
            optional=True,
        ),
    ),
)
JOB_DECISION = _event(
    "job.decision",
    subject="training.trainingjob",
    doc="An institution's approver approved or rejected a job.",
    fields=(
        _JOB_ID,
        F("decision", STRING, "approved or rejected."),
        _REASON,
        _SPEC_DIGEST,
        F("agreement_version", INTEGER, "The agreement version decided under."),
    ),
)
JOB_STATE_CHANGED = _event(
    "job.state_changed",
    subject="training.trainingjob",
    doc="A job moved from one state to another.",
    fields=(
        _JOB_ID,
        F("from_state", STRING, "The state before."),
        F("to_state", STRING, "The state after."),
        _REASON,
    ),
)
JOB_PARTICIPANT_REMOVED = _event(
    "job.participant_removed",
    subject="training.trainingjob",
    doc="An institution was taken out of an unfinished job (consent withdrawn, or removed).",
    fields=(_JOB_ID, _REASON),
)

# --- Personal API tokens (consortium.governance.services.api_tokens) ---------------------------

API_TOKEN_CREATED = _event(
    "account.api_token_created",
    subject="consortium.apitoken",
    doc="A person created a personal API token (its secret is never kept).",
    fields=(
        F("user_id", INTEGER, "The owner's user id."),
        F("username", STRING, "The owner's username at the time."),
        F("name", STRING, "The token's name."),
        F("scope", STRING, "read or act."),
        F("token_prefix", STRING, "The token's public prefix."),
        F("expires_at", STRING, "When it expires (ISO 8601)."),
    ),
)
API_TOKEN_REVOKED = _event(
    "account.api_token_revoked",
    subject="consortium.apitoken",
    doc="A person revoked one of their personal API tokens.",
    fields=(
        F("user_id", INTEGER, "The owner's user id."),
        F("username", STRING, "The owner's username at the time."),
        F("name", STRING, "The token's name."),
        F("token_prefix", STRING, "The token's public prefix."),
    ),
)

# --- Second factor (consortium.governance.services.second_factor) ------------------------------

SECOND_FACTOR_ENABLED = _event(
    "account.second_factor_enabled",
    subject="otp_totp.totpdevice",
    doc="A person confirmed an authenticator app as their second factor (and got backup codes).",
    fields=(
        F("user_id", INTEGER, "The owner's user id."),
        F("username", STRING, "The owner's username at the time."),
        F("device", STRING, "The authenticator's name."),
    ),
)
SECOND_FACTOR_REMOVED = _event(
    "account.second_factor_removed",
    subject="otp_totp.totpdevice",
    doc="A person removed their authenticator app and backup codes (no second factor left).",
    fields=(
        F("user_id", INTEGER, "The owner's user id."),
        F("username", STRING, "The owner's username at the time."),
        F("device", STRING, "The authenticator's name."),
    ),
)

# --- Site credentials, rounds and updates (training.rounds) --------------------------------

CREDENTIAL_CREATED = _event(
    "site.credential_created",
    subject="training.sitecredential",
    doc="A site worker credential (API token) was created for an institution.",
    fields=(
        F("label", STRING, "Its label."),
        F("token_prefix", STRING, "The token's public prefix (the token itself is never kept)."),
        F("key_fingerprint", STRING, "Fingerprint of the worker key it signs with."),
    ),
)
CREDENTIAL_REVOKED = _event(
    "site.credential_revoked",
    subject="training.sitecredential",
    doc="A site worker credential was revoked.",
    fields=(F("label", STRING, "Its label."), F("token_prefix", STRING, "Its token prefix.")),
)
MODEL_INITIALISED = _event(
    "model.initialised",
    subject="training.globalmodel",
    doc="A job's initial global model was built and stored.",
    fields=(
        _JOB_ID,
        _ROUND,
        F("model", STRING, "The model's registry name."),
        F("class_path", STRING, "The model class's dotted path."),
        F("seed", INTEGER, "The seed it was initialised with."),
        F("digest", STRING, "SHA-256 of the stored model state."),
        F("size_bytes", INTEGER, "Its size."),
        _LINEAGE,
    ),
)
ROUND_OPENED = _event(
    "round.opened",
    subject="training.round",
    doc="A round was opened and its sites asked to train.",
    fields=(
        _JOB_ID,
        _ROUND,
        F("topology", STRING, "server-client or cyclic."),
        F("global_digest", STRING, "The global model sites start from."),
        _LINEAGE,
        F("sites", ARRAY, "The sites asked to train."),
        F("skipped", ARRAY, "The sites left out (budget), see round.site_skipped."),
        F("deadline", STRING, "When the round times out (ISO 8601)."),
    ),
)
ROUND_SITE_SKIPPED = _event(
    "round.site_skipped",
    subject="training.trainingjob",
    doc="A site was left out of a round: training it would pass its privacy cap.",
    fields=(
        _JOB_ID,
        _ROUND,
        _SITE,
        _REASON,
        F("projected_epsilon", NUMBER, "The ε it would have reached."),
        F("cap", NUMBER, "Its ε cap."),
    ),
)
ROUND_SITE_SENT = _event(
    "round.site_sent",
    subject="training.trainingjob",
    doc="In a cyclic round, the next site was sent the model to train.",
    fields=(_JOB_ID, _ROUND, _SITE, F("start_digest", STRING, "The model it starts from.")),
)
UPDATE_ACCEPTED = _event(
    "round.update_accepted",
    subject="training.siteupdate",
    doc="A site's signed update was verified and accepted for its round.",
    fields=(
        *_UPDATE_SITE_FIELDS,
        F("samples", INTEGER, "How many records it trained on (its FedAvg weight)."),
        F("update_digest", STRING, "SHA-256 of the uploaded update."),
        F("signature", STRING, "The site's Ed25519 signature of the update message."),
        F("size_bytes", INTEGER, "The update's size."),
        F("pipeline", ARRAY, "The privacy pipeline the site applied, with its parameters."),
        F("privacy_events", ARRAY, "The privacy events to account for this update."),
        F("metrics", OBJECT, "The site's training metrics."),
    ),
)
UPDATE_REJECTED = _event(
    "round.update_rejected",
    subject="training.siteupdate",
    doc="A site's upload was refused (and its round slot spent): the reason says why.",
    fields=(
        *_UPDATE_SITE_FIELDS,
        F("code", STRING, "The refusal's code."),
        _REASON,
        F("update_digest", STRING, "SHA-256 of what was uploaded, or '' if unreadable."),
        F("size_bytes", INTEGER, "The upload's size."),
    ),
)
ROUND_CLOSED = _event(
    "round.closed",
    subject="training.round",
    doc="A round closed: its updates were aggregated into a new global model.",
    fields=(
        _JOB_ID,
        _ROUND,
        F("topology", STRING, "server-client or cyclic."),
        F("global_digest", STRING, "The new global model's digest."),
        F("parent_digest", STRING, "The model the round started from."),
        F("parent_lineage_hash", STRING, "That model's lineage hash."),
        _LINEAGE,
        F("updates", ARRAY, "Each aggregated update's digest and FedAvg weight."),
        F("sites", OBJECT, "Per site slug, the digest of its aggregated update."),
        F("rejected", OBJECT, "Per site slug, why its update was rejected."),
        F("stragglers", ARRAY, "The sites that did not report in time."),
        F("metrics", OBJECT, "The new model's validation metrics."),
    ),
)
ROUND_FAILED = _event(
    "round.failed",
    subject="training.round",
    doc="A round failed (too few sites reported in time); the job fails with it.",
    fields=(_JOB_ID, _ROUND, _REASON, F("stragglers", ARRAY, "The sites that did not report.")),
)
SITE_ABSENT = _event(
    "site.absent",
    subject="training.trainingjob",
    doc="A site of a running job missed FL_ABSENT_ROUNDS_ALERT rounds in a row (asked, never "
    "reported); the job's proposer and the administrators were told. One entry per streak.",
    fields=(
        _JOB_ID,
        _SITE,
        F("rounds_missed", INTEGER, "How many rounds in a row it missed."),
        F("rounds", ARRAY, "The rounds it missed, oldest first."),
        F("threshold", INTEGER, "The number of rounds in a row that makes a site absent."),
    ),
)
EVALUATION_REQUESTED = _event(
    "evaluation.requested",
    subject="training.round",
    doc="The sites were asked to evaluate a closed round's model and its coalition models on "
    "their own validation shares.",
    fields=(
        _JOB_ID,
        _ROUND,
        F("global_digest", STRING, "The round's model."),
        F("models", ARRAY, "Each model asked: its digest and the sites it was built from."),
        F("plan", OBJECT, "The contribution method and parameters the coalitions serve."),
        F("sites", ARRAY, "The sites asked to evaluate."),
        F("deadline", STRING, "When the evaluation closes without the missing reports."),
    ),
)
EVALUATION_REPORTED = _event(
    "evaluation.reported",
    subject="training.round",
    doc="A site's signed evaluation report of a round's models, verified centrally.",
    fields=(
        _JOB_ID,
        _ROUND,
        F("site", STRING, "The reporting site's slug."),
        F("records", INTEGER, "The records of its validation share."),
        F("report", STRING, "The report's canonical text, exactly the signed bytes."),
        F("report_digest", STRING, "The report text's SHA-256."),
        F("signature", STRING, "The site's Ed25519 signature of the report (base64)."),
        F(
            "public_key",
            STRING,
            "The site's registered public key (PEM) the signature verified against; its "
            "fingerprint is that of the site's site.credential_created entry.",
        ),
    ),
)
PRIVACY_AUDIT_REQUESTED = _event(
    "privacy_audit.requested",
    subject="training.trainingjob",
    doc="The sites were asked to audit their own updates under a proposed job's pipeline before "
    "its approvers decide (the spec's privacy_audit).",
    fields=(
        _JOB_ID,
        _SPEC_DIGEST,
        F("sites", ARRAY, "The sites asked."),
        F("records", INTEGER, "How many of its records each site attacks."),
        F("seed", INTEGER, "The seed that fixes the records, the step, the noise and the attacks."),
    ),
)
PRIVACY_AUDIT_REPORTED = _event(
    "privacy_audit.reported",
    subject="training.trainingjob",
    doc="A site's signed privacy audit of its own update under a proposed job's pipeline, "
    "verified centrally: figures only, never a record.",
    fields=(
        _JOB_ID,
        _SPEC_DIGEST,
        F("site", STRING, "The reporting site's slug."),
        F("outcome", STRING, "measured, or out_of_reach (the audit cannot attack this model)."),
        F(
            "summary",
            OBJECT.or_null(),
            "The audit's summary figures (median SSIM, PSNR or distance, the share of records "
            "rebuilt, label inference), whether the result is conclusive; null when out of reach.",
        ),
        F("report", STRING, "The report's canonical text, exactly the signed bytes."),
        F("report_digest", STRING, "The report text's SHA-256."),
        F("signature", STRING, "The site's Ed25519 signature of the report (base64)."),
        F(
            "public_key",
            STRING,
            "The site's registered public key (PEM) the signature verified against.",
        ),
    ),
)
ROUND_EVALUATED = _event(
    "round.evaluated",
    subject="training.round",
    doc="A round's model was valued by the sites' evaluation reports (record-weighted).",
    fields=(
        _JOB_ID,
        _ROUND,
        F("global_digest", STRING, "The round's model."),
        F("metrics", OBJECT, "Its validation metrics, weighted by each site's records."),
        F("site_records", OBJECT, "Per site slug that reported, its records."),
        F("missing", ARRAY, "The sites asked that did not report in time."),
    ),
)
CONTRIBUTION_SCORED = _event(
    "contribution.scored",
    subject="training.round",
    doc="A closed round's contributions were scored; every coalition value is included so "
    "anyone can recompute the scores.",
    fields=(
        _JOB_ID,
        _ROUND,
        F("method", STRING, "leave_one_out, shapley_exact or shapley_sampled."),
        F("params", OBJECT, "The method's parameters (samples, seed...)."),
        F("metric", STRING, "The validation metric the coalitions were valued by."),
        F("sites", ARRAY, "The players."),
        F("coalitions", ARRAY, "Each coalition evaluated and its value."),
        F("scores", OBJECT, "Per site slug, its score."),
        F("evaluations", INTEGER, "How many models were evaluated."),
        F(
            "evaluated_at",
            STRING,
            "'sites' when the coalitions were valued by the sites' signed evaluation reports "
            "(absent: on the consortium's validation set).",
            optional=True,
        ),
        F(
            "site_records",
            OBJECT,
            "Per site slug that reported, the records it evaluated on (the values' weights).",
            optional=True,
        ),
        F("missing", ARRAY, "The sites asked to evaluate that did not report.", optional=True),
        F(
            "validation_set",
            STRING,
            "The digest of the uploaded central validation set the coalitions were valued on "
            "(absent: the bundled set, or the sites).",
            optional=True,
        ),
    ),
)
CONTRIBUTION_UNAVAILABLE = _event(
    "contribution.unavailable",
    subject="training.round",
    doc="A closed round's contributions could not be scored; the reason says why.",
    fields=(_JOB_ID, _ROUND, _REASON),
)
CONTRIBUTION_JOB_SCORED = _event(
    "contribution.job_scored",
    subject="training.trainingjob",
    doc="A completed job's per-site totals of its rounds' scores.",
    fields=(
        _JOB_ID,
        F("method", STRING, "The rounds' method, or 'mixed'."),
        F("metric", STRING, "The rounds' metric, or 'mixed'."),
        F("scores", OBJECT, "Per site slug, the sum of its round scores."),
        F("rounds", OBJECT, "Per site slug, how many rounds were scored."),
    ),
)

# --- Reports (audit.reports) -----------------------------------------------------------------

REPORT_EXPORTED = _event(
    "report.exported",
    subject="training.trainingjob",
    doc="An auditor exported a contribution report (subject: the job, or the institution).",
    fields=(
        F("format", STRING, "csv, json or pdf."),
        F("schema_version", INTEGER, "The report's schema version."),
        F("scope", OBJECT, "What the report covers (a job or an institution)."),
        F("ledger_head", OBJECT, "The ledger head the report was built at."),
        F("filename", STRING, "The file's name."),
        F("sha256", STRING, "SHA-256 of the file's bytes."),
        F("size_bytes", INTEGER, "The file's size."),
    ),
)
COMPLIANCE_EXPORTED = _event(
    "report.compliance_exported",
    subject="consortium.agreementversion",
    doc="An auditor exported the compliance report of an agreement version.",
    fields=(
        F("format", STRING, "csv, json or pdf."),
        F("schema_version", INTEGER, "The compliance report's schema version."),
        F("scope", OBJECT, "The agreement version the report covers."),
        F("ledger_head", OBJECT, "The ledger head the report was built at."),
        F("filename", STRING, "The file's name."),
        F("sha256", STRING, "SHA-256 of the file's bytes."),
        F("size_bytes", INTEGER, "The file's size."),
    ),
)
MODEL_DOWNLOADED = _event(
    "model.downloaded",
    subject="training.trainingjob",
    doc="Someone took a copy of one of a job's global models from the server.",
    fields=(
        _JOB_ID,
        _ROUND,
        F("digest", STRING, "SHA-256 of the model file handed out."),
        F("size_bytes", INTEGER, "Its size."),
    ),
)
