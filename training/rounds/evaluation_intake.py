"""Taking a site's evaluation report (``POST /api/site/.../rounds/<index>/evaluation/``): the
intake of :mod:`training.rounds.site_evaluation`, as ``training.rounds.intake`` is for updates.

A report is taken only if it can count: the site was asked to evaluate the round and has not
reported something else, the evaluation is still collecting, the report is canonical and names
exactly the models asked, its record count is no larger than the site's registered data set,
and its signature verifies with the site's registered key. The checks that need no lock run
first; then, under the ledger's lock (the project's lock order), the state is read again and the
report and its ``evaluation.reported`` entry (the text verbatim, its signature and the public
key it verified against) are written together. Each report taken asks the coordinator to close
the evaluation if it was the last (``training.round_evaluation_maybe_close``).
"""

from __future__ import annotations

import hashlib

from django.db import transaction
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry, lock_chain
from consortium.core.errors import ServiceError
from training import outbox, queues
from training.fl.evaluation_report import ReportError, parse_report
from training.fl.signing import BadSignature, verify_update
from training.models import RoundEvaluation, SiteCredential, SiteDataset, SiteEvaluation
from training.rounds.credentials import site_actor_repr
from training.rounds.lookups import one_or_none

__all__ = ["EvaluationRefused", "evaluation_asked_of", "evaluation_receive"]


class EvaluationRefused(ServiceError):
    """A site's evaluation report that was not taken; ``status`` is the HTTP status to answer
    and ``code`` says why (the site worker reads ``already_reported``, ``evaluation_closed``
    and ``not_asked`` as "nothing to do")."""

    code = "evaluation_refused"

    def __init__(self, message: str, *, code: str, status: int):
        super().__init__(message, code=code)
        self.status = status


def _site_row(credential: SiteCredential, job_id: int, round_index: int) -> SiteEvaluation:
    row = one_or_none(
        SiteEvaluation.objects.select_related(
            "evaluation__round__job__consortium", "institution"
        ).filter(
            evaluation__round__job_id=job_id,
            evaluation__round__index=round_index,
            institution_id=credential.institution_id,
        )
    )
    if row is None:
        raise EvaluationRefused(
            f"No evaluation of round {round_index} of job #{job_id} is asked of "
            f"{credential.institution.slug}.",
            code="not_asked",
            status=409,
        )
    return row


def evaluation_asked_of(credential: SiteCredential, job_id: int, round_index: int) -> dict:
    """What the site is asked to evaluate now: ``{"models": [digests], "spec_digest",
    "deadline", "surrogate"}`` (``surrogate``: what it needs to make contribution estimator 3's
    surrogate, or None when it is not asked for one); :class:`EvaluationRefused` (409) when
    nothing is asked of it now."""
    row = _site_row(credential, job_id, round_index)
    evaluation = row.evaluation
    if row.status == SiteEvaluation.Status.REPORTED:
        raise EvaluationRefused(
            f"{row.institution.slug} already reported its evaluation of round {round_index}.",
            code="already_reported",
            status=409,
        )
    if evaluation.state != RoundEvaluation.State.COLLECTING:
        raise EvaluationRefused(
            f"The evaluation of round {round_index} of job #{job_id} is closed.",
            code="evaluation_closed",
            status=409,
        )
    return {
        "job": job_id,
        "round": round_index,
        "spec_digest": evaluation.round.job.spec_digest,
        "models": evaluation.digests,
        "deadline": evaluation.deadline,
        "surrogate": evaluation.plan.get("surrogate"),
    }


def _check_surrogate(evaluation: RoundEvaluation, parsed) -> None:
    """A report's surrogate, when it carries one, must have been asked for and cover every
    coalition of the round's players; a report without one is taken (the scores then rest on
    the sample alone)."""
    if parsed.surrogate is None:
        return
    asked = evaluation.plan.get("surrogate")
    if asked is None:
        raise EvaluationRefused(
            "the report carries a surrogate, but none was asked for this round",
            code="bad_surrogate",
            status=400,
        )
    coalitions = 2 ** len(asked["players"])
    if len(parsed.surrogate) != coalitions:
        raise EvaluationRefused(
            f"the report's surrogate holds {len(parsed.surrogate)} values; the round's "
            f"{len(asked['players'])} sites have {coalitions} coalitions",
            code="bad_surrogate",
            status=400,
        )


def _already_reported(row: SiteEvaluation, report: str, *, slug: str, round_index: int) -> bool:
    """True when the site already reported exactly this report (a harmless repeat); raises
    :class:`EvaluationRefused` (409) when it reported another; False when it has not yet."""
    if row.status != SiteEvaluation.Status.REPORTED:
        return False
    if row.report_text == report:
        return True
    raise EvaluationRefused(
        f"{slug} already reported a different evaluation of round {round_index}.",
        code="already_reported",
        status=409,
    )


def evaluation_receive(
    *,
    credential: SiteCredential,
    job_id: int,
    round_index: int,
    report: str,
    signature: str,
) -> tuple[SiteEvaluation, bool]:
    """Verify and record a site's signed evaluation report; returns ``(row, duplicate)``.

    Raises :class:`EvaluationRefused`: 400 for a report that is malformed, names other models
    than those asked, carries a surrogate not asked for or of the wrong size, claims more
    records than the site's data set has, or does not verify with the site's key; 409 when
    nothing is asked of the site (or it reported something else already, or the evaluation
    closed)."""
    row = _site_row(credential, job_id, round_index)
    evaluation = row.evaluation
    job = evaluation.round.job
    slug = credential.institution.slug
    if _already_reported(row, report, slug=slug, round_index=round_index):
        return row, True
    try:
        parsed = parse_report(report)
    except ReportError as exc:
        raise EvaluationRefused(f"bad report: {exc}", code="bad_report", status=400) from None
    if (parsed.job_id, parsed.round_index, parsed.site) != (job.pk, round_index, slug):
        raise EvaluationRefused(
            f"the report is for job #{parsed.job_id} round {parsed.round_index} site "
            f"'{parsed.site}', not job #{job.pk} round {round_index} site '{slug}'",
            code="bad_report",
            status=400,
        )
    asked = set(evaluation.digests)
    if set(parsed.results) != asked:
        missing = sorted(asked - set(parsed.results))
        extra = sorted(set(parsed.results) - asked)
        raise EvaluationRefused(
            f"the report must name exactly the {len(asked)} model(s) asked"
            + (f"; missing {', '.join(d[:12] + '…' for d in missing)}" if missing else "")
            + (f"; not asked {', '.join(d[:12] + '…' for d in extra)}" if extra else ""),
            code="wrong_models",
            status=400,
        )
    _check_surrogate(evaluation, parsed)
    dataset = one_or_none(
        SiteDataset.objects.filter(
            institution_id=credential.institution_id, key=job.spec["dataset_key"]
        )
    )
    if dataset is None or parsed.records > dataset.num_records:
        raise EvaluationRefused(
            f"{parsed.records} records is more than {slug} registered for "
            f"'{job.spec['dataset_key']}'",
            code="bad_records",
            status=400,
        )
    try:
        verify_update(credential.public_key, report.encode("utf-8"), signature)
    except BadSignature as exc:
        raise EvaluationRefused(
            f"the signature does not verify with the key of credential '{credential.label}' "
            f"({credential.token_prefix}…): {exc}",
            code="bad_signature",
            status=400,
        ) from None
    digest = hashlib.sha256(report.encode("utf-8")).hexdigest()
    with transaction.atomic():
        lock_chain()
        fresh = SiteEvaluation.objects.select_related("evaluation").get(pk=row.pk)
        if _already_reported(fresh, report, slug=slug, round_index=round_index):
            return fresh, True
        if fresh.evaluation.state != RoundEvaluation.State.COLLECTING:
            raise EvaluationRefused(
                f"The evaluation of round {round_index} of job #{job.pk} closed before this "
                "report arrived.",
                code="evaluation_closed",
                status=409,
            )
        now = timezone.now()
        SiteEvaluation.objects.filter(pk=row.pk).update(
            status=SiteEvaluation.Status.REPORTED,
            records=parsed.records,
            report_text=report,
            report_digest=digest,
            signature=signature,
            reported_at=now,
        )
        append_entry(
            event=ledger_events.EVALUATION_REPORTED,
            actor_repr=site_actor_repr(credential),
            subject=evaluation.round,
            consortium_slug=job.consortium.slug,
            institution_slug=slug,
            payload={
                "job_id": job.pk,
                "round": round_index,
                "site": slug,
                "records": parsed.records,
                "report": report,
                "report_digest": digest,
                "signature": signature,
                "public_key": credential.public_key,
            },
        )
        outbox.send_after_commit(
            queues.ROUND_EVALUATION_MAYBE_CLOSE, kwargs={"round_id": evaluation.round_id}
        )
    fresh.refresh_from_db()
    return fresh, False
