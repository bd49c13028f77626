"""The site worker: what runs at a hospital, on its own queue ``site.<slug>``.

A site worker holds no central database credentials (docs/architecture.md, section 2) and never
uses the ORM:
it is configured from its environment and talks to the central server only through the site
REST API (``training.rounds.site_api``), authenticated as its site, with its client
(:mod:`training.site.client`). Its task message carries ids and digests only; everything else
it fetches and checks:

0. the centre's ledger (:mod:`training.site.ledger_witness`), asked for with the model (1.,
   ``?ledger_since=``): its newest signed checkpoint must verify with the centre's key and
   extend, by a consistency proof, the last checkpoint this site saw, before anything of the
   answer is used. A ledger rewritten at the centre raises
   :class:`~training.site.ledger_witness.LedgerRefused` and the site does not train. The
   site's cosignature of the checkpoint (its witness) travels with the upload (4.), or on its
   own when no upload carried it, and not at all when the centre already said it holds it
   (an earlier task checked the same checkpoint);
1. the model the site starts from (``GET /api/site/v1/jobs/<id>/rounds/<index>/model/``), which
   the central server sends only while the round still asks this site for an update: a 409
   (the update was already received, e.g. a second delivery of the task; the round closed;
   the job stopped) ends the task with nothing to do. The model must be the task's
   ``start_digest`` (its header, and its SHA-256), and the job's spec digest (its
   ``X-Spec-Digest`` header) the task's ``spec_digest``: the round's global model, or in a
   cyclic round the previous site's result. The update is the delta from that model;
2. the job (``GET /api/site/v1/jobs/<id>/``), once per spec digest: the canonical spec must hash
   to the task's ``spec_digest`` (so the site trains exactly what its approver approved).
   A spec is immutable for its digest, so it is kept in memory (:func:`job_spec`, per
   credential, job and digest) and every later round costs one request before training,
   not two; a task with another digest fetches and checks the job again;
3. local data (``training.fl.data.load_site_data`` under ``DATA_ROOT``; when the job evaluates
   at the sites, less the validation share the site keeps aside, :func:`training_share`), local
   training
   (``training.fl.local.train_local``; DP-SGD happens there), the privacy pipeline on the
   update (``training.fl.filters.apply_pipeline``), all on site;
4. the update packed in its wire format (``training.fl.update.pack_update``), signed with the
   site's Ed25519 key
   over ``training.fl.signing.update_message(...)`` and uploaded
   (``POST .../rounds/<index>/update/``). Uploading the same update twice is harmless.
   Its metrics carry the site's local training time (``train_seconds``), and the log line
   of each task the seconds spent in each phase.

With ``momentum_restart`` off, the optimizer state is kept on site under
``DATA_ROOT/.fl-state/<job id>/`` between rounds; it never leaves the site.

Configuration (environment, read by :class:`training.site.client.WorkerConfig`): ``SITE_SLUG``,
``CENTRAL_URL``, ``SITE_TOKEN``, ``SITE_SIGNING_KEY`` (path to the PEM private key) and
``DATA_ROOT``. A task for another slug is refused. ``FL_TEST_SLEEP_BEFORE_UPLOAD`` (seconds)
makes the worker wait before it uploads; it exists for the fault tests (a worker killed
mid-task) and is ignored unless set.

torch (and the engine's modules that load it) is imported inside the functions that train,
never when this module is imported: the site's Celery worker imports this module in its parent
process, and CUDA must not be initialised there before it forks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from training.fl.holdout import holdout_seed
from training.fl.signing import sign_update, update_message
from training.fl.update import pack_update
from training.jobs.registry import model_registry
from training.jobs.spec import EVALUATION_SITES, canonical_spec_text, evaluation_settings
from training.jobs.spec import spec_digest as digest_of_spec
from training.site.client import CentralClient, CentralError, RoundModel, WorkerConfig
from training.site.ledger_witness import (
    CheckedCheckpoint,
    check_ledger_alongside,
    cosignature_body,
    post_witness,
    witness_answered,
    witness_held,
)

log = logging.getLogger(__name__)

__all__ = [
    "IntegrityFailure",
    "JobSpec",
    "WrongSite",
    "conflict_code",
    "holdout_of",
    "job_spec",
    "run_site_round",
    "site_model",
    "skipped_when",
    "training_share",
]

SLEEP_BEFORE_UPLOAD_ENV = "FL_TEST_SLEEP_BEFORE_UPLOAD"
#: The metric in which a site reports its local training time (seconds, ``train_local``).
TRAIN_SECONDS_METRIC = "train_seconds"


class _PhaseClock:
    """Seconds spent in each phase of a site task, for the log and the round benchmark."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now
        return self.laps[name]

    def summary(self) -> str:
        return " ".join(f"{name}={seconds:.4f}" for name, seconds in self.laps.items())


class WrongSite(RuntimeError):
    """A task for another site reached this worker."""


class IntegrityFailure(RuntimeError):
    """What the central server sent does not match the task's digests."""


@dataclass(frozen=True)
class JobSpec:
    """A job's spec as its approvers approved it (checked against its digest), and this
    site's description of the job's data set as the central server gave it."""

    spec_text: str
    input_shape: tuple[int, ...] | None
    n_classes: int | None

    @property
    def spec(self) -> dict:
        return json.loads(self.spec_text)  # a fresh dict each time: the cache stays intact


#: Verified job specs, per (worker configuration, job id, spec digest); least recently used
#: out first. A spec never changes for its digest, so an entry never goes stale.
_SPECS: OrderedDict[tuple, JobSpec] = OrderedDict()
_SPECS_LOCK = threading.Lock()
_SPECS_KEPT = 16


def job_spec(client, config: WorkerConfig, job_id: int, spec_digest: str) -> JobSpec:
    """The job's spec for a task that carries ``spec_digest``: fetched (``GET
    .../jobs/<id>/``) and checked the first time, from memory afterwards.

    The canonical spec text must hash to ``spec_digest``, the server must name the same
    digest, and the text must be the canonical form of the spec it encodes; otherwise
    :class:`IntegrityFailure` (the job changed since the task was sent). Only a spec that
    passed is kept, under the digest it was checked against, so a task with another digest
    never uses it. The key holds the worker's configuration (its central server and token),
    so two credentials never share an entry."""
    key = (config, int(job_id), spec_digest)
    with _SPECS_LOCK:
        known = _SPECS.get(key)
        if known is not None:
            _SPECS.move_to_end(key)
            return known
    job = client.job(job_id)
    spec_text = job.get("spec_text", "")
    spec = json.loads(spec_text)
    if (
        hashlib.sha256(spec_text.encode("utf-8")).hexdigest() != spec_digest
        or job.get("spec_digest") != spec_digest
        or digest_of_spec(spec) != spec_digest
        or canonical_spec_text(spec) != spec_text
    ):
        raise IntegrityFailure(
            f"job #{job_id}'s spec does not match the digest this task carries "
            f"({spec_digest[:12]}…): the job changed since the task was sent"
        )
    dataset = job.get("dataset") or {}
    shape = dataset.get("input_shape")
    known = JobSpec(
        spec_text=spec_text,
        input_shape=tuple(shape) if shape else None,
        n_classes=dataset.get("n_classes") or None,
    )
    with _SPECS_LOCK:
        _SPECS[key] = known
        while len(_SPECS) > _SPECS_KEPT:
            _SPECS.popitem(last=False)
    return known


#: The codes of a 409 from the round-model request that mean the task has nothing left to
#: do (a second delivery, a closed round, a stopped job), not that anything is wrong.
_NOTHING_TO_DO = frozenset(
    {"already_received", "round_closed", "job_not_running", "not_dispatched"}
)


def _json_safe(value):
    """Metrics as JSON takes them (the API refuses NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _load_optimizer_state(path: Path):
    import torch  # lazy torch: see the module docstring

    if not path.is_file():
        return None
    # Written by this worker only, on its own disk; weights_only refuses arbitrary pickles.
    return torch.load(path, map_location="cpu", weights_only=True)


def _save_optimizer_state(path: Path, state) -> None:
    import torch  # lazy torch: see the module docstring

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def conflict_code(exc: CentralError) -> str | None:
    """The ``code`` of a 409 answer of the central server, else None."""
    if exc.status != 409 or not isinstance(exc.body, dict):
        return None
    return exc.body.get("code")


def skipped_when(
    exc: CentralError, codes: frozenset, *, what: str, job_id: int, round_index: int, site: str
) -> dict | None:
    """The task's summary when the central server answered that nothing is asked of this site
    now (a 409 with one of ``codes``: a second delivery, a closed round...), logged; else None
    (the caller raises)."""
    code = conflict_code(exc)
    if code not in codes:
        return None
    log.info(
        "job #%s round %s: no %s is asked of %s now (%s); nothing to do",
        job_id,
        round_index,
        what,
        site,
        exc.body.get("detail", code),
    )
    return {"status": "skipped", "job_id": job_id, "round": round_index, "site": site}


def site_model(job: JobSpec, data):
    """The job's model for this site: the architecture its spec names, shaped by the job's data
    set as the central server described it (else by the site's data). Loads torch."""
    from training.fl.models import build_model  # lazy torch: see the module docstring

    spec = job.spec
    return build_model(
        model_registry()[spec["model"]["name"]].class_path,
        input_shape=list(job.input_shape) if job.input_shape else data.input_shape,
        n_classes=job.n_classes or data.n_classes,
        params=spec["model"].get("params") or {},
    )


def holdout_of(data, *, spec: dict, spec_digest: str, site: str):
    """``(training part, x_val, y_val)`` when the job evaluates at the sites (the site keeps
    its validation share aside: :mod:`training.fl.holdout`), else ``None``."""
    settings = evaluation_settings(spec)
    if settings["where"] != EVALUATION_SITES:
        return None
    from training.fl.data import split_holdout  # lazy torch: see the module docstring

    return split_holdout(
        data,
        fraction=settings["validation_fraction"],
        seed=holdout_seed(spec_digest, site),
    )


def training_share(data, *, spec: dict, spec_digest: str, site: str):
    """The records this site trains on in the job: all, or all but its validation share."""
    split = holdout_of(data, spec=spec, spec_digest=spec_digest, site=site)
    return data if split is None else split[0]


def run_site_round(
    *,
    job_id: int,
    round_index: int,
    site: str,
    spec_digest: str,
    start_digest: str,
    config: WorkerConfig | None = None,
    client: CentralClient | None = None,
) -> dict:
    """Train this site's update for one round and upload it; returns a summary.

    ``start_digest`` is the model the site was sent (its update is the delta from it).
    ``{"status": "accepted" | "duplicate" | "skipped", ...}``: ``skipped`` when the round no
    longer asks this site for an update (a second delivery, a closed round). Raises
    :class:`WrongSite`, :class:`~training.site.ledger_witness.LedgerRefused` (the centre's
    ledger is not the one this site saw: nothing is trained), :class:`IntegrityFailure`,
    :class:`CentralError` or ``ValueError`` (local data or model problems) otherwise.
    """
    config = config or WorkerConfig.from_env()
    if site != config.site_slug:
        raise WrongSite(f"this worker serves site {config.site_slug!r}, not {site!r}")
    client = client or CentralClient(config)
    clock = _PhaseClock()
    try:
        # One request: the round's model, with the ledger's checkpoint alongside; nothing
        # of the answer is used before the checkpoint passed this site's check.
        checked, sent = check_ledger_alongside(
            client,
            config,
            lambda since: _round_model_with_ledger(client, job_id, round_index, since),
        )
    except CentralError as exc:
        skipped = skipped_when(
            exc, _NOTHING_TO_DO, what="update", job_id=job_id, round_index=round_index, site=site
        )
        if skipped:
            return skipped
        if conflict_code(exc) == "not_sent":
            raise IntegrityFailure(
                f"job #{job_id} round {round_index}: the task starts from {start_digest[:12]}…, "
                "but the central server has sent this site nothing yet"
            ) from None
        raise
    # A checkpoint the centre already holds this site's cosignature of (an earlier task
    # checked the same one) is not cosigned again: nothing to carry, nothing to post.
    witness = _Witness(checked, answered=witness_held(config, checked))
    try:
        return _train_and_upload(
            client,
            config,
            clock,
            sent,
            witness,
            job_id=job_id,
            round_index=round_index,
            site=site,
            spec_digest=spec_digest,
            start_digest=start_digest,
        )
    finally:
        # The check passed, whatever came after it, so the site witnesses the checkpoint it
        # checked: with its upload, or on its own when no upload carried it (training
        # failed, the upload was refused before it was read, or an older centre).
        if not witness.answered:
            post_witness(client, config, checked)


def _round_model_with_ledger(
    client: CentralClient, job_id: int, round_index: int, since: int
) -> tuple[str | None, RoundModel]:
    sent = client.round_model(job_id, round_index, ledger_since=since)
    return sent.ledger_header, sent


@dataclass
class _Witness:
    """The checkpoint a task checked, and whether an answer of the centre said what became
    of the site's cosignature of it (the upload carries it), or an earlier one said the
    centre holds it already (then nothing is sent)."""

    checked: CheckedCheckpoint
    answered: bool = False


def _train_and_upload(
    client: CentralClient,
    config: WorkerConfig,
    clock: _PhaseClock,
    sent: RoundModel,
    witness: _Witness,
    *,
    job_id: int,
    round_index: int,
    site: str,
    spec_digest: str,
    start_digest: str,
) -> dict:
    """:func:`run_site_round` once the centre's ledger passed this site's check and the
    round's model came."""
    if sent.spec_digest != spec_digest:
        raise IntegrityFailure(
            f"job #{job_id}'s spec digest is {sent.spec_digest[:12]}… on the central server, "
            f"not the {spec_digest[:12]}… this task carries: the job changed since the task "
            "was sent"
        )
    if sent.digest != start_digest:
        raise IntegrityFailure(
            f"job #{job_id} round {round_index}: the task starts from {start_digest[:12]}…, "
            f"but the central server sent this site {(sent.digest or 'nothing')[:12]}…"
        )
    model_bytes = sent.data
    if hashlib.sha256(model_bytes).hexdigest() != start_digest:
        raise IntegrityFailure(f"the start model does not hash to {start_digest}")
    clock.lap("model")
    job = job_spec(client, config, job_id, spec_digest)
    spec = job.spec
    clock.lap("job")

    # Lazy torch (see the module docstring): these engine modules load it.
    import torch

    from training.fl.data import load_site_data
    from training.fl.filters import apply_pipeline
    from training.fl.local import pick_device, train_local
    from training.fl.serialization import unpack_tensors

    data = training_share(
        load_site_data(data_root=config.data_root, dataset_key=spec["dataset_key"], site_slug=site),
        spec=spec,
        spec_digest=spec_digest,
        site=site,
    )
    model = site_model(job, data)
    model.load_state_dict(unpack_tensors(model_bytes))

    restart = bool(spec.get("momentum_restart", True))
    state_path = config.state_dir(job_id) / "optimizer.pt"
    optimizer_state = None if restart else _load_optimizer_state(state_path)
    dp_sgd = next((f for f in spec["privacy_pipeline"] if f["filter"] == "dp_sgd"), None)
    seed = int(hashlib.sha256(f"{job_id}:{round_index}:{site}".encode()).hexdigest()[:15], 16)
    clock.lap("prepare")
    result = train_local(
        model,
        data,
        epochs=spec["local_epochs"],
        batch_size=spec["batch_size"],
        optimizer=spec["optimizer"],
        momentum_restart=restart,
        optimizer_state=optimizer_state,
        dp_sgd=dp_sgd,
        seed=seed,
        device=pick_device(),
        loss=spec.get("loss", "cross_entropy"),
    )
    train_seconds = clock.lap("train")
    if not restart and result.optimizer_state is not None:
        _save_optimizer_state(state_path, result.optimizer_state)

    update_filters = [f for f in spec["privacy_pipeline"] if f["filter"] != "dp_sgd"]
    # The privacy noise must be unpredictable: an unseeded torch.Generator starts
    # from the same default seed every time, so seed it from the OS.
    noise = torch.Generator()
    noise.manual_seed(secrets.randbits(63))
    filtered = apply_pipeline(result.delta, update_filters, generator=noise)
    packed = pack_update(result.delta, filtered.delta, filtered.mask)
    digest = hashlib.sha256(packed).hexdigest()
    events = list(result.privacy_events) + [
        e.to_json() if hasattr(e, "to_json") else e for e in filtered.events
    ]
    message = update_message(
        job_id=job_id,
        round_index=round_index,
        site=site,
        update_digest=digest,
        samples=result.samples,
    )
    signature = sign_update(config.signing_key_path.read_bytes(), message)
    clock.lap("filter_sign")

    pause = float(os.environ.get(SLEEP_BEFORE_UPLOAD_ENV) or 0)
    if pause > 0:
        log.warning("%s: sleeping %.1f s before the upload", SLEEP_BEFORE_UPLOAD_ENV, pause)
        time.sleep(pause)

    try:
        status, body = client.upload(
            job_id,
            round_index,
            data=packed,
            digest=digest,
            signature=signature,
            samples=result.samples,
            # The site's own training time, so that the round's critical path can be told
            # from the platform's overhead (docs/performance.md, "Round overhead").
            metrics=_json_safe({**result.metrics, TRAIN_SECONDS_METRIC: round(train_seconds, 6)}),
            privacy_events=events,
            pipeline=spec["privacy_pipeline"],
            witness=None if witness.answered else cosignature_body(config, witness.checked.signed),
        )
    except CentralError as exc:
        witness.answered = witness.answered or witness_answered(exc.body, config, witness.checked)
        raise
    witness.answered = witness.answered or witness_answered(body, config, witness.checked)
    clock.lap("upload")
    outcome = "duplicate" if body.get("duplicate") else "accepted"
    log.info(
        "job #%s round %s: update %s… %s (HTTP %s); seconds: %s",
        job_id,
        round_index,
        digest[:12],
        outcome,
        status,
        clock.summary(),
    )
    return {
        "status": outcome,
        "job_id": job_id,
        "round": round_index,
        "site": site,
        "update_digest": digest,
        "samples": result.samples,
    }
