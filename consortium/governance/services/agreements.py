"""Agreements: drafting one, editing and amending its versions' terms, publishing a version
(freezing it under the digest a signature binds to) and signing the version in force for an
institution.

The digested terms (:func:`version_terms`) are a format that signatures already made depend
on: a version's ``content_digest`` is recorded in its signatures and in the ledger, and is
recomputed from the row whenever anyone checks it. A term added later must therefore leave
the terms of every version written before it unchanged. The rule, for
``allows_central_validation_set``, ``final_model_access``, the privacy audit's terms and any
later term with a default: the term enters the terms only when it differs from its default
(:data:`LATER_TERMS`), which is exactly what every earlier version means by not naming it. So
an old version's digest stays what was signed, and a version that allows a central validation
set, narrows who may download the final model or requires the privacy audit has a digest that
says so (the signer signs that too). A version-number field for the format was the alternative;
it would have changed every old digest unless itself left out by default, which is this rule.

The privacy audit's maxima (``audit_max_median_ssim``, ``audit_max_success_rate``) are read
at each institution's approval from that institution's audit (``training.jobs.audit_gate``),
so a maximum without ``privacy_audit_required`` would cap a figure nobody is asked to measure:
such terms are refused rather than silently completed, so that what the signer reads is what
is enforced.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.canonical import canonical_json, sha256_hex
from consortium.core.errors import ActNotAllowedError, ConflictError, ServiceError
from consortium.governance.models import (
    Agreement,
    AgreementVersion,
    Consortium,
    DPMechanism,
    FinalModelAccess,
    Institution,
    ModelFamily,
    Purpose,
    Role,
    Signature,
    Withdrawal,
    all_purposes,
)
from consortium.governance.permissions import has_institution_role
from consortium.governance.selectors import current_version
from consortium.governance.services.recording import record_governance_event

TERM_FIELDS = (
    "purpose",
    "permitted_purposes",
    "permitted_model_families",
    "max_shared_fraction",
    "required_dp_mechanism",
    "epsilon_cap",
    "delta",
    "allows_central_validation_set",
    "final_model_access",
    "privacy_audit_required",
    "audit_max_median_ssim",
    "audit_max_success_rate",
    "valid_from",
    "valid_until",
    "text",
)

#: Terms added after versions were signed, with the default that earlier versions mean by
#: leaving them out: :func:`version_terms` names them only when they differ from it.
#: ``final_model_access``'s default is the rule the product applied before agreements had the
#: term (the participating institutions' members and the consortium's administrators).
#: The privacy audit's terms default to what every earlier version meant: no audit asked, no
#: maximum.
LATER_TERMS: dict[str, Any] = {
    "allows_central_validation_set": False,
    "final_model_access": FinalModelAccess.PARTICIPANTS_AND_ADMINS.value,
    "privacy_audit_required": False,
    "audit_max_median_ssim": None,
    "audit_max_success_rate": None,
}

#: Terms that may be empty (no maximum). On an edit, ``None`` for one of them clears it (the
#: other terms read ``None`` as "unchanged"): the web form always posts them, and the API sends
#: them only when they change (``null`` to remove the maximum).
NULLABLE_TERMS = ("audit_max_median_ssim", "audit_max_success_rate")

#: The privacy audit's maxima, with their bounds: (name, lowest, lowest allowed?, highest).
_AUDIT_MAXIMA = (
    ("audit_max_median_ssim", Decimal(0), False, Decimal(1)),
    ("audit_max_success_rate", Decimal(0), True, Decimal(1)),
)

#: Why a maximum needs the audit required (the API's and the form's words).
MAXIMUM_NEEDS_AUDIT = "A maximum risk needs the audit: require the privacy audit too."


def _clean_terms(terms: dict[str, Any]) -> dict[str, Any]:
    """Validate agreement terms; raise ValidationError naming each bad field."""
    errors: dict[str, str] = {}
    unknown = set(terms) - set(TERM_FIELDS)
    if unknown:
        errors["__all__"] = f"Unknown terms: {', '.join(sorted(unknown))}."
    families = terms.get("permitted_model_families")
    if families is not None:
        families = list(dict.fromkeys(families))
        bad = [f for f in families if f not in ModelFamily.values]
        if bad or not families:
            errors["permitted_model_families"] = (
                f"Choose at least one of {', '.join(ModelFamily.values)}"
                + (f" (unknown: {', '.join(map(str, bad))})." if bad else ".")
            )
        terms["permitted_model_families"] = sorted(families)
    purposes = terms.get("permitted_purposes")
    if purposes is not None:
        purposes = list(dict.fromkeys(purposes))
        bad = [p for p in purposes if p not in Purpose.values]
        if bad or not purposes:
            errors["permitted_purposes"] = f"Choose at least one of {', '.join(Purpose.values)}" + (
                f" (unknown: {', '.join(map(str, bad))})." if bad else "."
            )
        terms["permitted_purposes"] = sorted(purposes)
    mechanism = terms.get("required_dp_mechanism")
    if mechanism is not None and mechanism not in DPMechanism.values:
        errors["required_dp_mechanism"] = f"Unknown mechanism '{mechanism}'."
    for name, low, high in (
        ("max_shared_fraction", 0, 1),
        ("epsilon_cap", 0, 10**5),
        ("delta", 0, Decimal("0.1")),
    ):
        if terms.get(name) is None:
            continue
        try:
            value = Decimal(str(terms[name]))
        except ArithmeticError:
            errors[name] = "Enter a number."
            continue
        if not value.is_finite() or not (
            low < value <= high if name != "delta" else low < value < high
        ):
            errors[name] = f"Must be above {low} and at most {high}."
        terms[name] = value
    allows = terms.get("allows_central_validation_set")
    if allows is not None and not isinstance(allows, bool):
        errors["allows_central_validation_set"] = "Answer yes or no (true or false)."
    access = terms.get("final_model_access")
    if access is not None and access not in FinalModelAccess.values:
        errors["final_model_access"] = f"Choose one of {', '.join(FinalModelAccess.values)}."
    required = terms.get("privacy_audit_required")
    if required is not None and not isinstance(required, bool):
        errors["privacy_audit_required"] = "Answer yes or no (true or false)."
    for name, lowest, lowest_allowed, highest in _AUDIT_MAXIMA:
        if terms.get(name) is None:
            continue
        maximum = _decimal(terms[name])
        if maximum is None or not maximum.is_finite():
            errors[name] = "Enter a number, or leave it empty for no maximum."
            continue
        if not ((lowest <= maximum if lowest_allowed else lowest < maximum) and maximum <= highest):
            bounds = (
                f"from {lowest} to {highest}"
                if lowest_allowed
                else f"above {lowest} and at most {highest}"
            )
            errors[name] = f"Must be {bounds} (or empty for no maximum)."
            continue
        if -int(maximum.normalize().as_tuple().exponent) > 3:
            errors[name] = "Give at most three decimals."
            continue
        terms[name] = maximum
        # Both keys are there in a whole set of terms (a new version, the merged terms of an
        # edit, a publication); a partial edit is checked again once merged.
        if "privacy_audit_required" in terms and required is not True:
            errors[name] = MAXIMUM_NEEDS_AUDIT
    start, end = terms.get("valid_from"), terms.get("valid_until")
    if start and end and end < start:
        errors["valid_until"] = "The agreement cannot end before it starts."
    for name in ("purpose", "text"):
        if name in terms and not str(terms[name]).strip():
            errors[name] = "This cannot be empty."
    if errors:
        raise ValidationError(errors)
    return terms


def _decimal(value: Any) -> Decimal | None:
    try:
        return value if isinstance(value, Decimal) else Decimal(str(value))
    except ArithmeticError:
        return None


def _canonical_later(value: Any) -> Any:
    """A later term's value as the digested terms spell it: a number as its shortest decimal
    string (``0.3``, as the other numeric terms), anything else as it is."""
    if isinstance(value, Decimal | float) and not isinstance(value, bool):
        return str(Decimal(str(value)).normalize())
    return value


def version_terms(version: AgreementVersion) -> dict[str, Any]:
    """The version's terms as canonical, JSON-ready values: what its digest is taken over.

    A term of :data:`LATER_TERMS` is named only when it differs from its default, so the terms
    (and the digest) of a version written before the term existed are unchanged (module
    docstring)."""
    later = {
        name: _canonical_later(getattr(version, name))
        for name, default in LATER_TERMS.items()
        if getattr(version, name) != default
    }
    return {
        "agreement_id": version.agreement_id,
        "number": version.number,
        "purpose": version.purpose,
        "permitted_purposes": sorted(version.permitted_purposes),
        "permitted_model_families": sorted(version.permitted_model_families),
        "max_shared_fraction": str(Decimal(version.max_shared_fraction).normalize()),
        "required_dp_mechanism": version.required_dp_mechanism,
        "epsilon_cap": str(Decimal(version.epsilon_cap).normalize()),
        "delta": str(Decimal(version.delta).normalize()),
        "valid_from": version.valid_from.isoformat(),
        "valid_until": version.valid_until.isoformat(),
        "text": version.text,
        **later,
    }


def version_digest(version: AgreementVersion) -> str:
    """SHA-256 over the canonical terms and full text: what a signature binds to."""
    return sha256_hex(canonical_json(version_terms(version)))


def agreement_create(
    *, acting_user, consortium: Consortium, title: str, **terms: Any
) -> AgreementVersion:
    """Start a new agreement with its first draft version."""
    title = (title or "").strip()
    if not title:
        raise ValidationError({"title": "An agreement needs a title."})
    # Older clients do not send permitted purposes: every purpose is permitted then.
    if terms.get("permitted_purposes") is None:
        terms["permitted_purposes"] = all_purposes()
    # Nor do they know the later terms: each takes the default an older version means.
    for name, default in LATER_TERMS.items():
        if terms.get(name) is None:
            terms[name] = default
    missing = [f for f in TERM_FIELDS if f not in NULLABLE_TERMS and terms.get(f) in (None, "")]
    if missing:
        raise ValidationError({f: "This term is required." for f in missing})
    terms = _clean_terms(dict(terms))
    with transaction.atomic():
        agreement = Agreement.objects.create(
            consortium=consortium, title=title, created_by=acting_user
        )
        version = AgreementVersion.objects.create(
            agreement=agreement, number=1, created_by=acting_user, **terms
        )
        record_governance_event(
            ledger_events.AGREEMENT_DRAFTED,
            actor=acting_user,
            subject=version,
            consortium=consortium,
            agreement_id=agreement.pk,
            title=title,
            version=1,
        )
    return version


def agreement_version_update(
    *, acting_user, version: AgreementVersion, **terms: Any
) -> AgreementVersion:
    """Edit a draft. Published versions are immutable: amend instead."""
    terms = _clean_terms({k: v for k, v in terms.items() if v is not None or k in NULLABLE_TERMS})
    with transaction.atomic():
        version = AgreementVersion.objects.select_for_update().get(pk=version.pk)
        if version.is_published:
            raise ConflictError(
                f"Version {version.number} is published and cannot change: draft an "
                "amendment instead.",
                code="version_immutable",
            )
        merged = {f: terms.get(f, getattr(version, f)) for f in TERM_FIELDS}
        _clean_terms(dict(merged))
        changed = [f for f in terms if terms[f] != getattr(version, f)]
        for name in changed:
            setattr(version, name, terms[name])
        if changed:
            version.save(update_fields=changed)
            record_governance_event(
                ledger_events.AGREEMENT_DRAFT_EDITED,
                actor=acting_user,
                subject=version,
                consortium=version.agreement.consortium,
                agreement_id=version.agreement_id,
                version=version.number,
                changed=sorted(changed),
            )
    return version


def agreement_amend(*, acting_user, agreement: Agreement) -> AgreementVersion:
    """Open a new draft version, starting from the current published terms."""
    with transaction.atomic():
        agreement = Agreement.objects.select_for_update().get(pk=agreement.pk)
        if agreement.versions.filter(status=AgreementVersion.Status.DRAFT).exists():
            raise ConflictError(
                "A draft amendment is already open: edit or publish it.", code="draft_exists"
            )
        base = current_version(agreement)
        if base is None:
            raise ConflictError("Publish the first version before amending it.")
        last_number = agreement.versions.order_by("-number").values_list("number", flat=True)[0]
        version = AgreementVersion.objects.create(
            agreement=agreement,
            number=last_number + 1,
            created_by=acting_user,
            **{f: getattr(base, f) for f in TERM_FIELDS},
        )
        record_governance_event(
            ledger_events.AGREEMENT_DRAFTED,
            actor=acting_user,
            subject=version,
            consortium=agreement.consortium,
            agreement_id=agreement.pk,
            title=agreement.title,
            version=version.number,
            amends_version=base.number,
        )
    return version


def agreement_version_publish(*, acting_user, version: AgreementVersion) -> AgreementVersion:
    """Freeze a draft: record its digest and make it the version to sign."""
    with transaction.atomic():
        version = (
            AgreementVersion.objects.select_for_update()
            .select_related("agreement__consortium")
            .get(pk=version.pk)
        )
        if version.is_published:
            raise ConflictError(
                f"Version {version.number} is already published.", code="already_published"
            )
        _clean_terms({f: getattr(version, f) for f in TERM_FIELDS})
        version.status = AgreementVersion.Status.PUBLISHED
        version.published_at = timezone.now()
        version.published_by = acting_user
        version.content_digest = version_digest(version)
        version.save(update_fields=["status", "published_at", "published_by", "content_digest"])
        record_governance_event(
            ledger_events.AGREEMENT_PUBLISHED,
            actor=acting_user,
            subject=version,
            consortium=version.agreement.consortium,
            agreement_id=version.agreement_id,
            version=version.number,
            content_digest=version.content_digest,
            terms={k: v for k, v in version_terms(version).items() if k != "text"},
        )
    return version


def _normalise_name(name: str) -> str:
    return " ".join((name or "").split()).casefold()


def agreement_sign(
    *,
    acting_user,
    version: AgreementVersion,
    institution: Institution,
    typed_name: str,
    confirmed: bool,
    expected_digest: str = "",
) -> Signature:
    """An institution's approver signs the current published version.

    ``expected_digest`` is the digest the signer was shown; if the version in
    force has changed since (an amendment was published), the signature is
    refused as stale rather than silently applied to terms not read.
    """
    if not confirmed:
        raise ValidationError(
            {
                "confirmed": "Confirm that you have read the agreement and sign on behalf of "
                "your institution."
            }
        )
    expected_names = {
        _normalise_name(acting_user.get_full_name()),
        _normalise_name(acting_user.get_username()),
    } - {""}
    if _normalise_name(typed_name) not in expected_names:
        raise ValidationError(
            {
                "typed_name": "Type your full name exactly as it appears on your account "
                f"({acting_user.get_full_name() or acting_user.get_username()})."
            }
        )
    if not has_institution_role(acting_user, institution, Role.APPROVER):
        raise ActNotAllowedError(
            f"Only an approver of {institution} can sign for it.", code="not_approver"
        )
    with transaction.atomic():
        version = (
            AgreementVersion.objects.select_for_update()
            .select_related("agreement__consortium")
            .get(pk=version.pk)
        )
        agreement = version.agreement
        if institution.consortium_id != agreement.consortium_id:
            raise ServiceError(f"{institution} is not a member of {agreement.consortium}.")
        if not version.is_published:
            raise ConflictError("A draft cannot be signed; wait until it is published.")
        latest = current_version(agreement)
        if latest is None or latest.pk != version.pk:
            raise ConflictError(
                f"Version {version.number} has been superseded by version "
                f"{latest.number if latest else '?'}: read and sign the current one.",
                code="stale_version",
            )
        if expected_digest and expected_digest != version.content_digest:
            raise ConflictError(
                "The agreement's text changed since you opened it: read it again.",
                code="stale_version",
            )
        if Withdrawal.objects.filter(agreement=agreement, institution=institution).exists():
            raise ConflictError(
                f"{institution} has withdrawn its consent under this agreement.",
                code="withdrawn",
            )
        if Signature.objects.filter(version=version, institution=institution).exists():
            raise ConflictError(
                f"{institution} has already signed version {version.number}.",
                code="already_signed",
            )
        signature = Signature.objects.create(
            version=version,
            institution=institution,
            signer=acting_user,
            signer_repr=str(typed_name).strip(),
            typed_name=str(typed_name).strip(),
            content_digest=version.content_digest,
        )
        record_governance_event(
            ledger_events.AGREEMENT_SIGNED,
            actor=acting_user,
            subject=signature,
            consortium=agreement.consortium,
            institution=institution,
            agreement_id=agreement.pk,
            version=version.number,
            content_digest=version.content_digest,
            typed_name=signature.typed_name,
        )
    return signature
