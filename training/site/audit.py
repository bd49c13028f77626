"""The site's privacy audit of a proposed job, before its approvers decide (runs at the hospital).

When a job's spec asks for a privacy audit (``privacy_audit``:
:func:`training.jobs.spec.privacy_audit_settings`), the central server asks every participating
site, while the job awaits approval, what an attacker could rebuild of its records from one
local update under the job's privacy pipeline. An approver reads the answer for *their own*
records before deciding. The task (``training.site_audit`` on ``site.<slug>``) carries ids and
the spec digest only; the site:

1. asks what is asked of it (``GET .../jobs/<id>/audit/``): a 409 (no audit asked of this site,
   its report already in, the job decided or ended) ends the task with nothing to do. The
   answer must name the task's spec digest, and its ``records`` and ``seed`` must be those of
   the spec itself, so the site audits exactly the proposal its approver will read;
2. checks the job's spec against the digest (:func:`training.site.worker.job_spec`);
3. loads its data and takes the records the job would train on
   (:func:`training.site.worker.training_share`: all, or all but the validation share it keeps
   aside), and rebuilds the job's *initial* model, the one round 1 starts from: the spec's
   model built under the seed the coordinator uses (:func:`initial_seed`, the spec digest's
   first 15 hex digits; ``training.rounds.states.initial_state``), so its weights are the very
   ones the sites will be sent;
4. runs the audit (:func:`training.fl.inversion.run_audit`): one local step per audited record
   with the spec's optimizer (and loss), the spec's pipeline on the update, the attacks on what
   the pipeline lets through. A model beyond the audit's reach (too many parameters, records
   too large) is reported as ``out_of_reach`` with the reason in words: the approver must read
   why there are no figures;
5. signs the canonical report (:mod:`training.fl.audit_report`) with the site's key and posts
   it (``POST .../jobs/<id>/audit/``).

What leaves the site is figures only: similarity, error and success rates per audited record
and their summary, never a record or a reconstruction (the report's parser refuses anything
else). The log says the outcome and the summary in words, no record either.

torch is imported inside :func:`run_site_audit`, never when this module is imported (the same
rule as :mod:`training.site.worker`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from training.fl.audit_report import (
    MEASURED,
    OUT_OF_REACH,
    report_text,
    summary_of,
    summary_words,
)
from training.fl.signing import sign_update
from training.jobs.spec import privacy_audit_settings
from training.site.client import CentralClient, CentralError, WorkerConfig
from training.site.ledger_witness import witness_ledger
from training.site.worker import (
    IntegrityFailure,
    JobSpec,
    WrongSite,
    conflict_code,
    job_spec,
    site_model,
    training_share,
)

if TYPE_CHECKING:  # torch only for the types: see the module docstring
    from torch import nn

    from training.fl.data import SiteData

log = logging.getLogger(__name__)

__all__ = ["initial_model", "initial_seed", "run_site_audit"]

#: The codes of a 409 from the audit request that mean there is nothing to do.
_NOTHING_TO_DO = frozenset({"not_asked", "already_reported", "not_awaiting_approval"})


def initial_seed(spec_digest: str) -> int:
    """The seed of the job's initial weights, from its spec digest: the same number as
    ``training.rounds.states.initial_seed`` (which the site cannot import: it reads the job
    from the central database)."""
    return int(spec_digest[:15], 16)


def initial_model(job: JobSpec, data: SiteData, spec_digest: str) -> nn.Module:
    """The job's initial model (round 0), as the coordinator builds it: the spec's model,
    shaped as the job's data set, built under :func:`initial_seed` without touching the
    process's global random state. Loads torch."""
    import torch  # lazy torch: see the module docstring

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(initial_seed(spec_digest))
        model: nn.Module = site_model(job, data)
    return model


def _asked_settings(
    asked: dict[str, Any], spec: dict[str, Any], *, job_id: int, site: str
) -> dict[str, int]:
    """The audit's ``records`` and ``seed``: the central server's answer must agree with the
    spec the site checked against its digest (and name this job and site)."""
    settings = privacy_audit_settings(spec)
    if settings is None:
        raise IntegrityFailure(
            f"job #{job_id}'s spec asks for no privacy audit, yet one was asked of {site}"
        )
    if asked.get("job", job_id) != job_id or asked.get("site", site) != site:
        raise IntegrityFailure(
            f"the audit asked names job #{asked.get('job')} at {asked.get('site')!r}, not "
            f"job #{job_id} at {site!r}"
        )
    answered = {key: asked.get(key) for key in settings}
    if answered != settings:
        raise IntegrityFailure(
            f"job #{job_id}: the central server asks for an audit of {answered}, but the "
            f"job's spec says {settings}"
        )
    return settings


def run_site_audit(
    *,
    job_id: int,
    site: str,
    spec_digest: str,
    config: WorkerConfig | None = None,
    client: CentralClient | None = None,
) -> dict[str, Any]:
    """Audit the job's initial model on this site's training records under the job's privacy
    pipeline, and report the figures, signed.

    Returns ``{"status": "reported" | "duplicate" | "skipped", ...}`` (with ``outcome``
    ``measured`` or ``out_of_reach`` when reported); raises :class:`WrongSite`,
    :class:`IntegrityFailure`, :class:`CentralError` or ``ValueError`` (local data or model
    problems)."""
    config = config or WorkerConfig.from_env()
    if site != config.site_slug:
        raise WrongSite(f"this worker serves site {config.site_slug!r}, not {site!r}")
    client = client or CentralClient(config)
    # The centre's ledger first, as before training: nothing is done for a centre whose
    # ledger was rewritten (LedgerRefused).
    witness_ledger(client, config)
    try:
        asked = client.audit_request(job_id)
    except CentralError as exc:
        code = conflict_code(exc)
        if code not in _NOTHING_TO_DO:
            raise
        log.info(
            "job #%s: no privacy audit is asked of %s now (%s); nothing to do",
            job_id,
            site,
            exc.body.get("detail", code) if isinstance(exc.body, dict) else code,
        )
        return {"status": "skipped", "job_id": job_id, "site": site, "code": code}
    if asked.get("spec_digest") != spec_digest:
        raise IntegrityFailure(
            f"job #{job_id}'s spec digest is {str(asked.get('spec_digest'))[:12]}… on the "
            f"central server, not the {spec_digest[:12]}… this task carries: the job changed "
            "since the task was sent"
        )
    job = job_spec(client, config, job_id, spec_digest)
    spec = job.spec
    settings = _asked_settings(asked, spec, job_id=job_id, site=site)

    # Lazy torch (module docstring).
    from training.fl.data import load_site_data
    from training.fl.inversion import AuditOutOfReach, AuditSettings, run_audit

    data = training_share(
        load_site_data(data_root=config.data_root, dataset_key=spec["dataset_key"], site_slug=site),
        spec=spec,
        spec_digest=spec_digest,
        site=site,
    )
    if data.num_records < 1:
        raise ValueError(f"site {site} has no record of '{spec['dataset_key']}' to audit")
    # Fewer records than asked: audit every one there is.
    records = min(settings["records"], data.num_records)
    model = initial_model(job, data, spec_digest)
    result: dict[str, Any] | None = None
    reason = ""
    try:
        audited = run_audit(
            model,
            data.x_train,
            data.y_train,
            modality=data.modality,
            optimizer=spec["optimizer"],
            pipeline=spec["privacy_pipeline"],
            settings=AuditSettings(records=records, seed=settings["seed"]),
            # Images come as [N, C, H, W] and give their own shape; flat records are tabular.
            # The value range is the training records' own (run_audit's default).
            image_shape=None,
            value_range=None,
            step_options={"loss": spec["loss"]} if "loss" in spec else None,
        )
        outcome, result = MEASURED, audited.to_json()
    except AuditOutOfReach as exc:
        outcome, reason = OUT_OF_REACH, str(exc)
    text = report_text(
        job_id=int(job_id),
        site=site,
        spec_digest=spec_digest,
        outcome=outcome,
        result=result,
        reason=reason,
    )
    signature = sign_update(config.signing_key_path.read_bytes(), text.encode("utf-8"))
    status, body = client.upload_audit(job_id, report=text, signature=signature)
    sent = "duplicate" if body.get("duplicate") or status == 200 else "reported"
    words = summary_words(summary_of(result)) if result is not None else reason
    log.info(
        "job #%s: privacy audit of %d record(s) at %s %s, report %s (HTTP %s): %s",
        job_id,
        records,
        site,
        outcome,
        sent,
        status,
        words,
    )
    return {
        "status": sent,
        "job_id": job_id,
        "site": site,
        "spec_digest": spec_digest,
        "outcome": outcome,
        "records": records,
    }
