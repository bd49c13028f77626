"""Reads: what a user may see, and the derived state of agreements.

Each ``*_visible_to(user)`` applies the same scope as the predicates in
``permissions``, so lists never show what a detail page would refuse.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from django.db.models import Prefetch, QuerySet
from django.utils import timezone

from consortium.governance.models import (
    Agreement,
    AgreementVersion,
    APIToken,
    Consortium,
    Institution,
    Invitation,
    Membership,
    Role,
    Signature,
    Withdrawal,
)
from consortium.governance.permissions import grants_of


def consortium_ids_of(user) -> set[int]:
    return {g.consortium_id for g in grants_of(user)}


def consortia_visible_to(user) -> QuerySet[Consortium]:
    return Consortium.objects.filter(pk__in=consortium_ids_of(user))


def institutions_visible_to(user) -> QuerySet[Institution]:
    return Institution.objects.filter(consortium_id__in=consortium_ids_of(user)).select_related(
        "consortium"
    )


def memberships_visible_to(user) -> QuerySet[Membership]:
    return Membership.objects.filter(consortium_id__in=consortium_ids_of(user)).select_related(
        "user", "institution", "consortium"
    )


def invitations_visible_to(user) -> QuerySet[Invitation]:
    return Invitation.objects.filter(consortium_id__in=consortium_ids_of(user)).select_related(
        "institution", "invited_by", "consortium"
    )


def agreements_visible_to(user) -> QuerySet[Agreement]:
    return Agreement.objects.filter(consortium_id__in=consortium_ids_of(user)).select_related(
        "consortium"
    )


def versions_visible_to(user) -> QuerySet[AgreementVersion]:
    return AgreementVersion.objects.filter(
        agreement__consortium_id__in=consortium_ids_of(user)
    ).select_related("agreement", "agreement__consortium")


def user_institutions_with_role(user, consortium: Consortium, *roles: str) -> QuerySet[Institution]:
    """Institutions of ``consortium`` where the user holds one of ``roles``."""
    ids = {
        g.institution_id
        for g in grants_of(user)
        if g.consortium_id == consortium.pk and g.institution_id and g.role in roles
    }
    return Institution.objects.filter(pk__in=ids).order_by("name")


def institutions_user_signs_for(user, consortium: Consortium) -> QuerySet[Institution]:
    """The institutions of ``consortium`` the user may sign an agreement for: those they
    approve for. The signing form's choices, and the condition of every "Sign" offer: the
    offer names the institutions still to sign, which the rule alone does not."""
    return user_institutions_with_role(user, consortium, Role.APPROVER)


def institutions_user_withdraws_for(user, consortium: Consortium) -> QuerySet[Institution]:
    """The institutions of ``consortium`` whose consent the user may withdraw (the rule
    ``consortium.withdraw_consent``: their approvers and administrators). The withdrawal
    form's choices, and the condition of its offer."""
    return user_institutions_with_role(user, consortium, Role.APPROVER, Role.INSTITUTION_ADMIN)


def current_version(agreement: Agreement) -> AgreementVersion | None:
    """The latest published version: the terms in effect."""
    return (
        agreement.versions.filter(status=AgreementVersion.Status.PUBLISHED)
        .order_by("-number")
        .first()
    )


def draft_version(agreement: Agreement) -> AgreementVersion | None:
    return agreement.versions.filter(status=AgreementVersion.Status.DRAFT).first()


@dataclass
class AgreementStatus:
    """Who has signed the current version, who has not, who withdrew, and why the
    agreement is or is not in force."""

    agreement: Agreement
    version: AgreementVersion | None
    signed: list[Signature] = field(default_factory=list)
    unsigned: list[Institution] = field(default_factory=list)
    withdrawn: list[Withdrawal] = field(default_factory=list)
    in_force: bool = False
    reasons: list[str] = field(default_factory=list)

    @property
    def eligible_institution_ids(self) -> set[int]:
        """Institutions that signed the current version and have not withdrawn."""
        withdrawn = {w.institution_id for w in self.withdrawn}
        return {s.institution_id for s in self.signed} - withdrawn


def agreement_status(
    agreement: Agreement,
    *,
    on: dt.date | None = None,
    institutions: Sequence[Institution] | None = None,
) -> AgreementStatus:
    """An agreement is in force when it has a published version within its dates
    and every member institution that has not withdrawn has signed that version.
    A withdrawn institution is out of every future job, but does not stop the
    others from working under the agreement.

    ``institutions``: the consortium's institutions by name, when the caller has read them
    already (the dashboard, for each of its agreements); read here otherwise."""
    today = on or timezone.localdate()
    version = current_version(agreement)
    status = AgreementStatus(agreement=agreement, version=version)
    status.withdrawn = list(agreement.withdrawals.select_related("institution"))
    if version is None:
        status.reasons.append("no version has been published")
        return status
    withdrawn_ids = {w.institution_id for w in status.withdrawn}
    signatures = {s.institution_id: s for s in version.signatures.select_related("institution")}
    if institutions is None:
        institutions = list(agreement.consortium.institutions.order_by("name"))
    status.signed = [signatures[i.pk] for i in institutions if i.pk in signatures]
    status.unsigned = [
        i for i in institutions if i.pk not in signatures and i.pk not in withdrawn_ids
    ]
    if not version.is_within_dates(today):
        status.reasons.append(
            f"version {version.number} is valid from {version.valid_from} to "
            f"{version.valid_until}, not on {today}"
        )
    if status.unsigned:
        names = ", ".join(i.name for i in status.unsigned)
        status.reasons.append(f"version {version.number} is not yet signed by {names}")
    if not status.eligible_institution_ids:
        status.reasons.append("no institution is left under the agreement")
    status.in_force = not status.reasons
    return status


def institutions_left_to_sign(user, status: AgreementStatus) -> list[Institution]:
    """The user's institutions (those they sign for) that have yet to sign the agreement's
    current version and have not withdrawn: what a "Sign version n" offer (the dashboard's
    *Waiting on you*, the agreement's page) is for. Empty when nothing is left to sign."""
    if status.version is None:
        return []
    mine = set(
        institutions_user_signs_for(user, status.agreement.consortium).values_list("pk", flat=True)
    )
    return [i for i in status.unsigned if i.pk in mine]


def institutions_still_consenting(user, agreement: Agreement) -> QuerySet[Institution]:
    """The user's institutions (those whose consent they may withdraw) that have not yet
    withdrawn under ``agreement``: what a "Withdraw consent…" offer is for."""
    return institutions_user_withdraws_for(user, agreement.consortium).exclude(
        withdrawals__agreement=agreement
    )


def agreements_with_versions(user) -> QuerySet[Agreement]:
    """Agreements for list pages, with their versions prefetched (one query more)."""
    return agreements_visible_to(user).prefetch_related(
        Prefetch("versions", queryset=AgreementVersion.objects.order_by("-number"))
    )


def agreement_in_force(consortium: Consortium) -> AgreementStatus | None:
    """The consortium's agreement in force now, if any (the newest one that is)."""
    for agreement in consortium.agreements.order_by("-created_at"):
        status = agreement_status(agreement)
        if status.in_force:
            return status
    return None


@dataclass
class PendingAction:
    """Something the user can do now; ``kind`` picks the wording and link."""

    kind: str  # "sign", "publish", "worker_key", "invitations"
    agreement: Agreement | None = None
    version: AgreementVersion | None = None
    institution: Institution | None = None
    count: int = 0


@dataclass
class ConsortiumDashboard:
    consortium: Consortium
    institutions: list[Institution]
    statuses: list[AgreementStatus]
    my_memberships: list[Membership]
    pending: list[PendingAction]

    @property
    def in_force(self) -> AgreementStatus | None:
        return next((s for s in self.statuses if s.in_force), None)


def consortium_dashboard(
    user,
    consortium: Consortium,
    *,
    institutions_with_worker_key: Collection[int],
    institutions: Sequence[Institution] | None = None,
) -> ConsortiumDashboard:
    """What the consortium's front page shows ``user``: institutions, every
    agreement's status, the user's own roles and what waits on them.

    ``institutions``: the consortium's institutions by name when the caller has read them
    already (the dashboard, which needs them first for their worker keys); read here
    otherwise, once for every agreement's status too.

    ``institutions_with_worker_key`` are the ids of the institutions whose site worker has a
    signing key it can upload with (an active worker credential). Those credentials are
    training's (governance imports none of it), so the dashboard, which composes both, reads
    them and passes them here: an institution is asked for a worker key only when it has
    none, and only of the people who can create one (its administrators and data stewards,
    the rule ``training.manage_site_credentials``)."""
    if institutions is None:
        institutions = list(consortium.institutions.order_by("name"))
    else:
        institutions = list(institutions)
    agreements = list(consortium.agreements.order_by("-created_at"))
    statuses = [agreement_status(a, institutions=institutions) for a in agreements]
    grants = [g for g in grants_of(user) if g.consortium_id == consortium.pk]
    roles_at = {}
    for g in grants:
        roles_at.setdefault(g.institution_id, set()).add(g.role)
    pending: list[PendingAction] = []
    for status in statuses:
        for institution in institutions_left_to_sign(user, status):
            pending.append(
                PendingAction(
                    "sign",
                    agreement=status.agreement,
                    version=status.version,
                    institution=institution,
                )
            )
    is_admin = Role.CONSORTIUM_ADMIN in roles_at.get(None, set())
    if is_admin:
        for draft in AgreementVersion.objects.filter(
            agreement__consortium=consortium, status=AgreementVersion.Status.DRAFT
        ).select_related("agreement"):
            pending.append(PendingAction("publish", agreement=draft.agreement, version=draft))
    keepers = {
        i
        for i, roles in roles_at.items()
        if i and roles & {Role.INSTITUTION_ADMIN, Role.DATA_STEWARD}
    }
    with_key = set(institutions_with_worker_key)
    for institution in institutions:
        if institution.pk in keepers and institution.pk not in with_key:
            pending.append(PendingAction("worker_key", institution=institution))
    return ConsortiumDashboard(
        consortium=consortium,
        institutions=institutions,
        statuses=statuses,
        my_memberships=list(
            Membership.objects.filter(user=user, consortium=consortium).select_related(
                "institution"
            )
        ),
        pending=pending,
    )


@dataclass(frozen=True)
class ActiveCredential:
    """One active (unrevoked) worker credential of a site: its label, its token's prefix and
    the Ed25519 public key (PEM) its worker signs updates with."""

    label: str
    token_prefix: str
    public_key: str


def active_credentials_of(
    institution_ids: Collection[int],
) -> dict[int, tuple[ActiveCredential, ...]]:
    """Per institution id (every one given, ``()`` when none), its site workers' active
    credentials, newest first. One query.

    Why this is the truth for "has a worker key": the central side verifies an upload against
    the key of the worker credential that sends it, never against
    ``Institution.worker_public_key`` (only the key a new credential takes when none is
    pasted). The credentials are training's rows; governance imports none of training (its
    layer rule) and reads them only through the ``site_credentials`` relation Django sets on
    ``Institution``, so the dashboard's pages (``consortium.dashboard.worker_keys``) and
    governance's API (``InstitutionSerializer.signing_keys``) read the same rows alike."""
    found: dict[int, list[ActiveCredential]] = {pk: [] for pk in institution_ids}
    rows = (
        # Both conditions in one filter(): the same credential row, and one that exists.
        Institution.objects.filter(
            pk__in=list(found),
            site_credentials__isnull=False,
            site_credentials__revoked_at__isnull=True,
        )
        .order_by("pk", "-site_credentials__created_at", "-site_credentials__pk")
        .values_list(
            "pk",
            "site_credentials__label",
            "site_credentials__token_prefix",
            "site_credentials__public_key",
        )
    )
    for institution_id, label, prefix, public_key in rows:
        found[institution_id].append(
            ActiveCredential(label=label, token_prefix=prefix, public_key=public_key)
        )
    return {pk: tuple(credentials) for pk, credentials in found.items()}


def api_tokens_of(user) -> QuerySet[APIToken]:
    """A person's own API tokens, newest first: nobody else's, whatever their roles (a token
    acts as its owner, so only its owner lists and revokes it)."""
    if not getattr(user, "is_authenticated", False):
        return APIToken.objects.none()
    return APIToken.objects.filter(user=user).order_by("-created_at", "-pk")
