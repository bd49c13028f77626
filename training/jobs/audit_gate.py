"""The privacy audit's gate on an institution's approval: what the agreement's audit terms
(``privacy_audit_required``, ``audit_max_median_ssim``, ``audit_max_success_rate`` on the
agreement version the job is bound to) ask of that institution's own audit before it may
approve. Rejecting is never gated.

- The agreement requires the audit: the institution's audit of the job's *current* spec digest
  must be reported (a changed spec asks again, so an audit of the old spec does not count).
- With a maximum set, the audit must also have measured something (an audit that cannot attack
  the model shows nothing), be conclusive (attacks that rebuild nothing even from an unfiltered
  update prove nothing by a low figure) and be within each maximum. The median SSIM maximum
  applies where the audit measured an SSIM (image and segmentation records); a tabular audit
  measures none, so for tabular records only the success-rate maximum applies.
- The spec asks for the audit but the agreement is silent: nothing is gated. The approver
  decides, reading the audit on the review page when it is in.

The institution's audit is read with ``training.jobs.privacy_audits.audit_of`` (its audit of
the job's current spec digest), the selector the pages read too.
"""

from __future__ import annotations

from decimal import Decimal
from typing import cast

from consortium.core.errors import ConflictError
from consortium.governance.models import Institution
from training.jobs.privacy_audits import audit_of
from training.jobs.spec import privacy_audit_settings
from training.models import PrivacyAudit, TrainingJob

#: What an approver can do about a figure above the agreement's maximum.
_ABOVE_ADVICE = "Reject the job or ask the proposer for a stronger pipeline."


def _pair(measured: float, maximum: Decimal, *, scale: int = 1) -> tuple[str, str]:
    """``(measured, maximum)`` as text (``scale`` 100: in percent), with the decimals the
    maximum is written with (at least two for an SSIM: ``0.30``), and more where a figure above
    the maximum would otherwise read as equal to it (0.304 against 0.30 is "0.304")."""
    top = maximum * scale
    places = max(0, -int(top.normalize().as_tuple().exponent))
    if scale == 1:
        places = max(places, 2)
    shown = measured * scale
    while places < 6 and round(shown, places) <= float(top) < shown:
        places += 1
    return f"{shown:.{places}f}", f"{float(top):.{places}f}"


def _maxima_words(version) -> str:
    names = []
    if version.audit_max_median_ssim is not None:
        names.append("median SSIM")
    if version.audit_max_success_rate is not None:
        names.append("success rate")
    return " and ".join(names)


#: ``approval_refusal``'s ``audit`` when the caller has not read it (None means "none asked").
_READ_IT = object()


def approval_refusal(
    job: TrainingJob, institution: Institution, audit: PrivacyAudit | None | object = _READ_IT
) -> ConflictError | None:
    """Why ``institution`` may not approve ``job`` now under the agreement's audit terms, or
    None when it may. Read in :func:`training.jobs.approvals.approval_decide`'s transaction,
    after the job was rebound to the agreement in force; the pages read it too, passing the
    institution's audit of the current spec (:func:`audit_of`) they already hold, so that a page
    of several institutions does not read each audit twice."""
    version = job.agreement_version
    if version is None or not version.privacy_audit_required:
        return None
    audit = audit_of(job, institution) if audit is _READ_IT else cast(PrivacyAudit | None, audit)
    terms = f"version {version.number} of the agreement"
    if privacy_audit_settings(job.spec) is None:
        # Compliance refuses such a spec at proposal and at a rebinding; said for completeness.
        return ConflictError(
            f"{terms.capitalize()} requires each site's privacy audit before approval, and job "
            f"#{job.pk} does not ask for one: the proposer must add it (privacy_audit).",
            code="audit_pending",
        )
    if audit is None or audit.status != PrivacyAudit.Status.REPORTED:
        return ConflictError(
            f"{institution} has not reported its privacy audit of job #{job.pk} yet, and "
            f"{terms} requires it before {institution} approves. {institution}'s site worker "
            "runs the audit and must be online to do it; decide once its figures are shown "
            "here (you may reject now).",
            code="audit_pending",
        )
    maxima = _maxima_words(version)
    if not maxima:
        return None
    if audit.outcome != PrivacyAudit.Outcome.MEASURED:
        return ConflictError(
            f"{terms.capitalize()} caps the privacy audit's {maxima}, but {institution}'s audit "
            f"could not attack this job's model: {audit.reason or 'no reason was given'}. "
            "Without a measured figure the maximum cannot be shown to hold: reject the job or "
            "ask the proposer for a model within the audit's reach.",
            code="audit_out_of_reach",
        )
    summary = audit.summary or {}
    if summary.get("conclusive") is False:
        return ConflictError(
            f"{terms.capitalize()} caps the privacy audit's {maxima}, but {institution}'s audit "
            "is inconclusive: its attacks rebuilt none of "
            f"{summary.get('calibration_records') or 0} records even from an unfiltered update "
            "of this model, so a low figure proves nothing here. Reject the job or ask the "
            "proposer for a model the audit can attack.",
            code="audit_inconclusive",
        )
    above = []
    ssim_max, ssim = version.audit_max_median_ssim, summary.get("median_ssim")
    if ssim_max is not None and ssim is not None and float(ssim) > float(ssim_max):
        measured, cap = _pair(float(ssim), ssim_max)
        above.append(
            f"The agreement caps the privacy audit's median SSIM at {cap}; {institution}'s "
            f"audit measured {measured} under this pipeline (1 is an exact copy)."
        )
    rate_max, rate = version.audit_max_success_rate, summary.get("success_rate")
    if rate_max is not None:
        if rate is None:
            above.append(
                f"The agreement caps the privacy audit's success rate, and {institution}'s "
                "audit reports none."
            )
        elif float(rate) > float(rate_max):
            measured, cap = _pair(float(rate), rate_max, scale=100)
            above.append(
                "The agreement caps the privacy audit's success rate (the share of audited "
                f"records its attacks rebuild) at {cap}%; {institution}'s audit measured "
                f"{measured}% under this pipeline."
            )
    if above:
        return ConflictError(" ".join([*above, _ABOVE_ADVICE]), code="audit_above_maximum")
    return None
