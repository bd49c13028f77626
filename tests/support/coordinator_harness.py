"""Drive the coordinator round by round without a broker or a worker process (the coordinator
tests, tests/rounds/test_coordinator.py and test_contribution_coordinator.py).

Messages the code sends (``current_app.send_task``) are caught by :class:`InMemoryBroker` and
delivered by hand: central tasks call the coordinator, the scoring queue's task the scorer
(``contributions.round_score_claimed``, in order with the rest), site tasks run the real site worker
code (``training.site.worker.run_site_round``) against the site API through Django's test
client (:class:`InProcessClient`). The fixtures ``c3`` (three hospitals, an artifact folder of
the test's own) and ``broker`` reach the tests through tests/rounds/conftest.py.
"""

from __future__ import annotations

import json

import pytest
from django.test import Client

from audit.models import LedgerEntry
from consortium.celery import app
from tests.support.fl_harness import make_consortium3, use_artifact_folder
from training import queues
from training.rounds import contributions, coordinator
from training.rounds.audit_pictures import draw_audit_picture
from training.site.audit import run_site_audit
from training.site.client import CentralError, RoundModel
from training.site.evaluation import run_site_evaluation
from training.site.protocol import (
    LEDGER_CHECKPOINT_HEADER,
    LEDGER_SINCE_PARAMETER,
    SITE_PROTOCOL,
    encode_ledger_header,
)
from training.site.worker import run_site_round


class InProcessClient:
    """The site API through Django's test client (no sockets), as the real worker's client:
    models too come through ``GET .../rounds/<index>/model/`` (in a cyclic round, the previous
    site's result, served to the site it was sent to)."""

    def __init__(self, token: str):
        self.client = Client()
        self.auth = {
            "HTTP_AUTHORIZATION": f"Site {token}",
            "HTTP_X_SITE_PROTOCOL": str(SITE_PROTOCOL),
        }

    def _answer(self, response):
        if response.status_code >= 400:
            raise CentralError(
                response.content.decode(), status=response.status_code, body=response.json()
            )
        return response.status_code, response.json()

    def ledger_checkpoint(self, since):
        response = self.client.get(f"/api/site/v1/ledger/checkpoint/?since={since}", **self.auth)
        return self._answer(response)[1]

    def ledger_witness(self, body):
        response = self.client.post(
            "/api/site/v1/ledger/checkpoint/witness/",
            data=json.dumps(body),
            content_type="application/json",
            **self.auth,
        )
        return self._answer(response)

    def audit_request(self, job_id):
        response = self.client.get(f"/api/site/v1/jobs/{job_id}/audit/", **self.auth)
        return self._answer(response)[1]

    def upload_audit(self, job_id, *, report, signature):
        response = self.client.post(
            f"/api/site/v1/jobs/{job_id}/audit/",
            data=json.dumps({"report": report, "signature": signature}),
            content_type="application/json",
            **self.auth,
        )
        return self._answer(response)

    def job(self, job_id):
        response = self.client.get(f"/api/site/v1/jobs/{job_id}/", **self.auth)
        assert response.status_code == 200, response.content
        return response.json()

    def model(self, job_id, digest):
        response = self.client.get(f"/api/site/v1/jobs/{job_id}/models/{digest}/", **self.auth)
        if response.status_code >= 400:
            raise CentralError(response.content.decode(), status=response.status_code)
        return response.content

    def round_model(self, job_id, round_index, *, ledger_since=None):
        query = "" if ledger_since is None else f"?{LEDGER_SINCE_PARAMETER}={ledger_since}"
        response = self.client.get(
            f"/api/site/v1/jobs/{job_id}/rounds/{round_index}/model/{query}", **self.auth
        )
        if response.status_code >= 400:
            raise CentralError(
                response.content.decode(), status=response.status_code, body=response.json()
            )
        return RoundModel(
            data=response.content,
            digest=response["X-Content-SHA256"],
            spec_digest=response["X-Spec-Digest"],
            ledger_header=response.headers.get(LEDGER_CHECKPOINT_HEADER),
        )

    def upload(
        self, job_id, round_index, *, data, digest, signature, samples, witness=None, **meta
    ):
        if witness is not None:
            meta_headers = {"HTTP_X_LEDGER_WITNESS": encode_ledger_header(witness)}
        else:
            meta_headers = {}
        response = self.client.post(
            f"/api/site/v1/jobs/{job_id}/rounds/{round_index}/update/",
            data=data,
            content_type="application/octet-stream",
            HTTP_X_UPDATE_DIGEST=digest,
            HTTP_X_UPDATE_SIGNATURE=signature,
            HTTP_X_UPDATE_SAMPLES=str(samples),
            HTTP_X_UPDATE_METRICS=json.dumps(meta["metrics"]),
            HTTP_X_UPDATE_PRIVACY_EVENTS=json.dumps(meta["privacy_events"]),
            HTTP_X_UPDATE_PIPELINE=json.dumps(meta["pipeline"]),
            **meta_headers,
            **self.auth,
        )
        if response.status_code >= 400:
            raise CentralError(
                response.content.decode(), status=response.status_code, body=response.json()
            )
        return response.status_code, response.json()

    def evaluation_request(self, job_id, round_index):
        response = self.client.get(
            f"/api/site/v1/jobs/{job_id}/rounds/{round_index}/evaluation/", **self.auth
        )
        if response.status_code >= 400:
            raise CentralError(
                response.content.decode(), status=response.status_code, body=response.json()
            )
        return response.json()

    def upload_evaluation(self, job_id, round_index, *, report, signature):
        response = self.client.post(
            f"/api/site/v1/jobs/{job_id}/rounds/{round_index}/evaluation/",
            data=json.dumps({"report": report, "signature": signature}),
            content_type="application/json",
            **self.auth,
        )
        if response.status_code >= 400:
            raise CentralError(
                response.content.decode(), status=response.status_code, body=response.json()
            )
        return response.status_code, response.json()


class InMemoryBroker:
    """An in-memory stand-in for the broker: what was sent, delivered on demand."""

    def __init__(self, consortium3, capture):
        self.c3 = consortium3
        self.capture = capture
        self.messages: list[dict] = []
        self.lost: list[dict] = []
        self.log: list[dict] = []

    def send_task(self, name, args=None, kwargs=None, queue=None, **_options):
        message = {
            "name": name,
            "args": list(args or []),
            "kwargs": dict(kwargs or {}),
            "queue": queue,
        }
        self.messages.append(message)
        self.log.append(message)

    def site_tasks(self):
        return [m for m in self.log if m["name"] == queues.SITE_TRAIN.name]

    def run(self, fn, *args, **kwargs):
        """Run ``fn`` and send what it queued on commit."""
        with self.capture(execute=True):
            return fn(*args, **kwargs)

    def scoring_tasks(self):
        return [m for m in self.log if m["name"] == queues.ROUND_SCORE.name]

    def deliver(
        self,
        *,
        drop_sites=(),
        drop_evaluations=(),
        only_central=False,
        drop_scoring=False,
        limit=1000,
    ):
        """Deliver every queued message (and what delivering queues) until none is left.
        Site tasks (training and evaluation) for ``drop_sites`` are lost (the worker never runs
        them), and the evaluation tasks of ``drop_evaluations``; with ``drop_scoring`` the
        scoring queue's messages are (no scoring worker, or one that died with them)."""
        for _ in range(limit):
            if not self.messages:
                return
            message = self.messages.pop(0)
            if message["name"] == queues.ROUND_SCORE.name:
                if drop_scoring:
                    self.lost.append(message)
                else:
                    self.run(contributions.round_score_claimed, *message["args"])
                continue
            if message["name"] == queues.SITE_TRAIN.name:
                if only_central or message["kwargs"]["site"] in drop_sites:
                    self.lost.append(message)
                    continue
                site = self.c3.site(message["kwargs"]["site"])
                self.run(
                    run_site_round,
                    **message["kwargs"],
                    config=site.config(),
                    client=InProcessClient(site.token),
                )
            elif message["name"] == queues.SITE_EVALUATE.name:
                site_slug = message["kwargs"]["site"]
                if only_central or site_slug in drop_sites or site_slug in drop_evaluations:
                    self.lost.append(message)
                    continue
                site = self.c3.site(message["kwargs"]["site"])
                self.run(
                    run_site_evaluation,
                    **message["kwargs"],
                    config=site.config(),
                    client=InProcessClient(site.token),
                )
            elif message["name"] == queues.SITE_AUDIT.name:
                if only_central or message["kwargs"]["site"] in drop_sites:
                    self.lost.append(message)
                    continue
                site = self.c3.site(message["kwargs"]["site"])
                self.run(
                    run_site_audit,
                    **message["kwargs"],
                    config=site.config(),
                    client=InProcessClient(site.token),
                )
            elif message["name"] == queues.AUDIT_PICTURE.name:
                self.run(draw_audit_picture, **message["kwargs"])
            elif message["name"] == queues.ROUND_EVALUATION_MAYBE_CLOSE.name:
                self.run(contributions.evaluation_close_and_score, **message["kwargs"])
            elif message["name"] == "training.round_maybe_close":
                self.run(coordinator.round_maybe_close, *message["args"])
            elif message["name"] == "training.job_start":
                self.run(coordinator.job_start, *message["args"])
            else:  # pragma: no cover
                raise AssertionError(f"unexpected task {message}")
        raise AssertionError("the messages never ran out")


@pytest.fixture
def c3(cast, tmp_path, settings):
    """Three hospitals with data, credentials and keys (``make_consortium3``), and the
    artifact store in this test's folder."""
    use_artifact_folder(settings, tmp_path / "artifacts")
    return make_consortium3(cast, tmp_path)


@pytest.fixture
def broker(c3, monkeypatch, django_capture_on_commit_callbacks):
    """An :class:`InMemoryBroker` in place of the Celery app's ``send_task``."""
    b = InMemoryBroker(c3, django_capture_on_commit_callbacks)
    monkeypatch.setattr(app, "send_task", b.send_task)
    return b


def job_payloads(event, job):
    """The payloads of ``job``'s ledger entries of ``event``, oldest first."""
    return [
        json.loads(e.payload_text)
        for e in LedgerEntry.objects.filter(event=event).order_by("seq")
        if json.loads(e.payload_text).get("job_id") == job.pk
    ]


def propose_and_start(c3, broker, **spec):
    """Propose a job over the three sites (``spec`` overrides), have all three approve, and
    deliver its ``job_start``: the job is running, its first round's site tasks queued."""
    job = broker.run(c3.propose_and_approve, **spec)
    # Approval queued the start on "central"; deliver it.
    assert broker.messages[-1] == {
        "name": "training.job_start",
        "args": [job.pk],
        "kwargs": {},
        "queue": "central",
    }
    broker.deliver(only_central=True)
    broker.messages = list(broker.lost)
    broker.lost = []
    job.refresh_from_db()
    return job
