"""What the pages show of a job's privacy audit before approval (the spec's ``privacy_audit``,
:mod:`training.jobs.privacy_audits`): each institution's audit in words, the agreement's maxima
against its figures (read with the approval gate, :func:`training.jobs.audit_gate.approval_refusal`,
so that the page and the gate never disagree), and the picture drawn from public data.

Read-only, like :mod:`training.web.presenters`, whose review reads these.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.utils import timezone

from consortium.governance.models import AgreementVersion, Institution
from training.fl.audit_report import summary_words
from training.jobs.audit_gate import approval_refusal
from training.jobs.privacy_audits import audits_for
from training.jobs.selectors import active_participants
from training.jobs.spec import privacy_audit_settings
from training.models import AuditPicture, JobState, PrivacyAudit, TrainingJob

# --- the privacy audit (the spec's ``privacy_audit``; training.jobs.privacy_audits) -----------

AUDIT_NOT_ASKED = "not_asked"
AUDIT_PENDING = "pending"  # the spec asks, but no request reached this site yet
AUDIT_ASKED = "asked"
AUDIT_MEASURED = "measured"
AUDIT_OUT_OF_REACH = "out_of_reach"


@dataclass
class AuditLimit:
    """One maximum of the agreement's risk terms, against this audit's figure."""

    name: str  # "median SSIM", "success rate"
    maximum: float
    figure: float | None
    words: str
    within: bool | None  # None: the audit gave no such figure (yet)


@dataclass
class AuditStatus:
    """One institution's privacy audit of a job, for its current spec digest, in words."""

    institution: Institution
    state: str
    words: str
    audit: PrivacyAudit | None = None
    conclusive: bool | None = None
    limits: list[AuditLimit] = field(default_factory=list)
    #: The agreement makes the approval wait on this audit, and says so.
    required_words: str = ""
    #: Whether the agreement's terms refuse this institution's approval on this audit now.
    refuses_approval: bool = False

    @property
    def badge(self) -> str:
        """The badge's style: ``ok`` (within every maximum the agreement sets), ``warn``
        (waiting, or inconclusive), ``bad`` (the agreement refuses the approval on it) or
        ``""``: a measured figure with no maximum to hold it to is not called good or bad."""
        if self.state in (AUDIT_ASKED, AUDIT_PENDING):
            return "warn"
        if self.refuses_approval:
            return "bad"
        if self.conclusive is False:
            return "warn"
        if self.limits and all(limit.within is not False for limit in self.limits):
            return "ok"
        return ""

    @property
    def label(self) -> str:
        return {
            AUDIT_NOT_ASKED: "not asked",
            AUDIT_PENDING: "not asked yet",
            AUDIT_ASKED: "waiting",
            AUDIT_MEASURED: "measured" if self.conclusive is not False else "inconclusive",
            AUDIT_OUT_OF_REACH: "out of reach",
        }[self.state]


@dataclass
class AuditPictureView:
    """What the page says of the picture drawn from public data (never a site's records)."""

    state: str  # "drawn", "being_drawn", "none"
    note: str = ""
    dataset_key: str = ""
    caption: str = ""
    alt: str = ""
    figure_words: str = ""


def _maximum(version: AgreementVersion | None, name: str) -> float | None:
    # getattr: the agreement's risk terms are later terms (``LATER_TERMS``).
    value = getattr(version, name, None) if version is not None else None
    return float(value) if value is not None else None


def _shown(figure: float, maximum: float, *, as_percent: bool) -> tuple[str, str]:
    """``(figure, maximum)`` as text, with one more decimal where a figure above the maximum
    would otherwise read as equal to it (0.304 against 0.30)."""
    scale, unit, places = (100.0, "%", 0) if as_percent else (1.0, "", 2)
    while places < 5 and round(figure * scale, places) <= maximum * scale < figure * scale:
        places += 1
    return (
        f"{figure * scale:.{places}f}{unit}",
        f"{maximum * scale:.{max(places, 0 if as_percent else 2)}f}{unit}",
    )


def _limit(name: str, figure: float | None, maximum: float, *, as_percent: bool) -> AuditLimit:
    """One maximum against the audit's figure, in the gate's terms
    (``training.jobs.audit_gate``): no SSIM (tabular records) leaves the SSIM maximum
    unapplied; no success rate refuses."""
    if figure is None:
        top = f"{maximum:.0%}" if as_percent else f"{maximum:.2f}"
        if name == "median SSIM":
            words = (
                f"The agreement's maximum median SSIM of {top} applies to image records; this "
                "audit measured no SSIM."
            )
            return AuditLimit(name, maximum, None, words, None)
        words = f"The agreement's maximum {name} is {top}; this audit reports none."
        return AuditLimit(name, maximum, None, words + " Approval is refused.", False)
    measured, top = _shown(float(figure), maximum, as_percent=as_percent)
    within = float(figure) <= maximum
    words = f"{name[:1].upper()}{name[1:]} {measured}: " + (
        f"within the agreement's maximum of {top}."
        if within
        else f"above the agreement's maximum of {top}: approval is refused."
    )
    return AuditLimit(name, maximum, float(figure), words, within)


def audit_status(
    job: TrainingJob,
    institution: Institution,
    audit: PrivacyAudit | None,
    *,
    whose: str,
) -> AuditStatus:
    """``institution``'s audit of ``job`` (its current spec digest) in words; ``whose`` names
    its records ("a record of yours" on its approver's page). With the agreement's maximum
    risk, each figure against it; ``refuses_approval`` is the approval gate's own answer
    (:func:`training.jobs.audit_gate.approval_refusal`), so the page and the gate agree."""
    version = job.agreement_version
    name = institution.name
    max_ssim = _maximum(version, "audit_max_median_ssim")
    max_rate = _maximum(version, "audit_max_success_rate")
    has_maximum = max_ssim is not None or max_rate is not None
    required = bool(getattr(version, "privacy_audit_required", False)) or has_maximum
    required_words = ""
    if required:
        required_words = f"The agreement requires this audit before {name} may approve" + (
            ": reported, measured, conclusive and within its maximum risk." if has_maximum else "."
        )
    refused = job.state == JobState.AWAITING_APPROVAL and approval_refusal(job, institution, audit)

    def status(state: str, words: str, **more: Any) -> AuditStatus:
        return AuditStatus(
            institution,
            state,
            words,
            required_words=required_words,
            refuses_approval=bool(refused),
            **more,
        )

    if privacy_audit_settings(job.spec) is None:
        words = "This job asks for no privacy audit before approval."
        if required:
            words += " The agreement requires one, so no institution may approve it."
        return status(AUDIT_NOT_ASKED, words)
    if audit is None:
        words = (
            f"The audit has not been asked of {name}'s worker: it is asked when the job is "
            "proposed, and again when its spec changes."
        )
        return status(AUDIT_PENDING, words)
    if audit.status == PrivacyAudit.Status.ASKED:
        at = timezone.localtime(audit.asked_at)
        words = f"Asked at {at:%H:%M} on {at:%Y-%m-%d}, waiting for {name}'s worker."
        return status(AUDIT_ASKED, words, audit=audit)
    if audit.outcome == PrivacyAudit.Outcome.OUT_OF_REACH:
        reason = audit.reason.strip().rstrip(".") or "no reason was given"
        words = f"This model is beyond the audit's reach at {name}: {reason}."
        if has_maximum:
            words += (
                " Without a measured figure the agreement's maximum risk cannot be shown to hold."
            )
        return status(AUDIT_OUT_OF_REACH, words, audit=audit)
    summary = audit.summary or {}
    conclusive = summary.get("conclusive")
    limits = []
    if has_maximum and conclusive is False:
        words = (
            "Inconclusive, so the agreement's maximum risk cannot be shown to hold: approval "
            "is refused."
        )
        limits.append(AuditLimit("conclusive", 0.0, None, words, False))
    else:
        if max_ssim is not None:
            limits.append(
                _limit("median SSIM", summary.get("median_ssim"), max_ssim, as_percent=False)
            )
        if max_rate is not None:
            limits.append(
                _limit("success rate", summary.get("success_rate"), max_rate, as_percent=True)
            )
    return status(
        AUDIT_MEASURED,
        summary_words(summary, whose=whose),
        audit=audit,
        conclusive=conclusive,
        limits=limits,
    )


def job_audit_statuses(job: TrainingJob, *, own_ids: Iterable[int] = ()) -> list[AuditStatus]:
    """Every active participant's audit of ``job`` (its current spec digest), in words;
    the institutions in ``own_ids`` are told "a record of yours"."""
    audits = {a.institution_id: a for a in audits_for(job)}
    own = set(own_ids)
    return [
        audit_status(
            job,
            p.institution,
            audits.get(p.institution_id),
            whose="a record of yours"
            if p.institution_id in own
            else f"a record of {p.institution}",
        )
        for p in active_participants(job)
    ]


def _figure_words(figures: dict[str, Any]) -> str:
    parts = []
    if figures.get("ssim") is not None:
        parts.append(f"SSIM {figures['ssim']:.2f} out of 1")
    if figures.get("dice") is not None:
        parts.append(f"its mask's Dice {figures['dice']:.2f}")
    if figures.get("relative_error") is not None:
        parts.append(f"relative error {figures['relative_error']:.2f}")
    return ", ".join(parts)


def audit_picture_view(job: TrainingJob) -> AuditPictureView | None:
    """The picture for the job's current spec digest, as the page words it; ``None`` when the
    spec asks for no audit."""
    if privacy_audit_settings(job.spec) is None:
        return None
    picture = AuditPicture.objects.filter(job=job, spec_digest=job.spec_digest).defer("png").first()
    if picture is None or picture.drawn_at is None:
        return AuditPictureView(
            "being_drawn",
            note="The picture of what the attack rebuilds from public data is being drawn; "
            "reload the page in a minute.",
        )
    if picture.note or not picture.figures:
        return AuditPictureView("none", note=picture.note or "No picture was drawn.")
    figures = picture.figures
    key = picture.dataset_key
    figure_words = _figure_words(figures)
    layout = {
        "lesions": "an image above its lesion mask",
        "breast-cancer": "a strip of its standardised features (dark: low, light: high)",
    }.get(key, "")
    what = f" ({layout})" if layout else ""
    caption = (
        f"Left: a record of the bundled public data set {key}{what}. Right: what the attack "
        "rebuilt from that record's update under this job's pipeline"
        + (f" ({figure_words})" if figure_words else "")
        + ". Public data, never your records: your sites' records never leave them."
    )
    alt = (
        f"Two pictures side by side: a record of the public data set {key}, and the attack's "
        "reconstruction of it from one update under this job's pipeline"
        + (f", {figure_words}" if figure_words else "")
        + "."
    )
    return AuditPictureView(
        "drawn", dataset_key=key, caption=caption, alt=alt, figure_words=figure_words
    )
