"""Who may call what on the training API: every endpoint and action against each
persona, with the exact status code. Anonymous requests are refused before
anything is looked up (403). A missing object, a hidden one and a visible one
the user may not act on all give the same 404; lists show only what the user
may see."""

from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest

from consortium.governance.models import Notification
from consortium.governance.services.institutions import consortium_create, institution_create
from tests.support.api_client import client_for
from tests.support.factories import UserFactory
from tests.support.job_api import (
    DATASET,
    agreement_and_datasets_in_force,
    decide_body,
    logistic_spec,
    propose_logistic,
)
from tests.support.permission_matrix import (
    BASE_PERSONAS,
    answered_as,
    api_codes,
    assert_api_answer,
)
from training.jobs.datasets import dataset_register
from training.jobs.notifications import notify
from training.jobs.proposals import job_create_draft
from training.models import SiteDataset, TrainingJob

PERSONAS = [*BASE_PERSONAS, "steward", "researcher"]


@dataclass
class Scene:
    cast: Any
    dataset: SiteDataset  # "tumours" at hospital A, used by ``awaiting``
    spare: SiteDataset  # at hospital A, used by no job
    awaiting: TrainingJob  # proposed by the researcher, awaiting both approvals
    draft: TrainingJob  # the researcher's draft

    def user(self, who):
        return None if who == "anonymous" else getattr(self.cast, who)


@pytest.fixture
def scene(cast):
    agreement_and_datasets_in_force(cast)
    spare = dataset_register(
        acting_user=cast.steward, institution=cast.hospital_a, **{**DATASET, "key": "spare"}
    )
    awaiting = propose_logistic(cast)
    draft = job_create_draft(
        acting_user=cast.researcher, consortium=cast.consortium, title="Draft", spec=logistic_spec()
    )
    dataset = SiteDataset.objects.get(institution=cast.hospital_a, key="tumours")
    return Scene(cast, dataset, spare, awaiting, draft)


#: ``expect(default, *, anonymous=401, outsider=None, **overrides)``: codes for PERSONAS.
expect = partial(api_codes, PERSONAS)


def job_body(s, draft):
    return {
        "consortium": s.cast.consortium.slug,
        "title": "Another",
        "spec": logistic_spec(rounds=4),
        "draft": draft,
    }


# (name, method, url(scene), body(scene) or None, expected codes)
CASES = [
    ("datasets-list", "get", lambda s: "/api/datasets/", None, expect(200)),
    (
        "datasets-retrieve",
        "get",
        lambda s: f"/api/datasets/{s.dataset.pk}/",
        None,
        expect(200, outsider=404),
    ),
    (
        "datasets-create",
        "post",
        lambda s: "/api/datasets/",
        lambda s: {**DATASET, "institution": s.cast.hospital_a.slug, "key": "new-set"},
        # The outsider cannot see the institution the body names: a field error.
        expect(404, steward=201),
    ),
    (
        "datasets-partial_update",
        "patch",
        lambda s: f"/api/datasets/{s.spare.pk}/",
        lambda s: {"num_records": 2000},
        expect(404, steward=200),
    ),
    (
        "datasets-destroy",
        "delete",
        lambda s: f"/api/datasets/{s.spare.pk}/",
        None,
        expect(404, steward=204),
    ),
    (
        "datasets-put-not-routed",
        "put",
        lambda s: f"/api/datasets/{s.spare.pk}/",
        lambda s: {"num_records": 2000},
        expect(405),
    ),
    ("jobs-list", "get", lambda s: "/api/jobs/", None, expect(200)),
    (
        "jobs-retrieve",
        "get",
        lambda s: f"/api/jobs/{s.awaiting.pk}/",
        None,
        expect(200, outsider=404),
    ),
    (
        # Administrators and researchers (of either hospital) propose.
        "jobs-create",
        "post",
        lambda s: "/api/jobs/",
        lambda s: job_body(s, draft=False),
        expect(404, admin=201, researcher=201, other_member=201),
    ),
    (
        "jobs-create-draft",
        "post",
        lambda s: "/api/jobs/",
        lambda s: job_body(s, draft=True),
        expect(404, admin=201, researcher=201, other_member=201),
    ),
    (
        "jobs-partial_update",
        "patch",
        lambda s: f"/api/jobs/{s.draft.pk}/",
        lambda s: {"title": "Renamed"},
        expect(404, admin=200, researcher=200),
    ),
    (
        "jobs-put-not-routed",
        "put",
        lambda s: f"/api/jobs/{s.draft.pk}/",
        lambda s: {"title": "Renamed"},
        expect(405),
    ),
    (
        "jobs-delete-not-routed",
        "delete",
        lambda s: f"/api/jobs/{s.draft.pk}/",
        None,
        expect(405),
    ),
    (
        "jobs-submit",
        "post",
        lambda s: f"/api/jobs/{s.draft.pk}/submit/",
        None,
        expect(404, admin=200, researcher=200),
    ),
    (
        "jobs-cancel",
        "post",
        lambda s: f"/api/jobs/{s.awaiting.pk}/cancel/",
        lambda s: {"reason": "No longer needed."},
        expect(404, admin=200, researcher=200),
    ),
    (
        "jobs-decide",
        "post",
        lambda s: f"/api/jobs/{s.awaiting.pk}/decide/",
        lambda s: decide_body(s.awaiting, s.cast.hospital_a),
        expect(404, approver=201),
    ),
    (
        "jobs-approvals",
        "get",
        lambda s: f"/api/jobs/{s.awaiting.pk}/approvals/",
        None,
        expect(200, outsider=404),
    ),
    ("approvals-inbox", "get", lambda s: "/api/approvals/inbox/", None, expect(200)),
    ("notifications-list", "get", lambda s: "/api/notifications/", None, expect(200)),
    (
        "notifications-mark-read",
        "post",
        lambda s: "/api/notifications/mark-read/",
        lambda s: {},
        expect(200),
    ),
]


def request(scene, who, method, url_fn, body_fn):
    client = client_for(scene, who)
    body = body_fn(scene) if body_fn else None
    return getattr(client, method)(url_fn(scene), body, format="json")


@pytest.mark.parametrize("who", PERSONAS)
@pytest.mark.parametrize("name, method, url_fn, body_fn, codes", CASES, ids=[c[0] for c in CASES])
def test_matrix(scene, who, name, method, url_fn, body_fn, codes):
    assert_api_answer(request(scene, who, method, url_fn, body_fn), codes[who])


def test_an_approver_of_another_participant_cannot_decide_for_hospital_a(scene):
    """approver_b may decide on the job, but only for hospital B."""
    response = client_for(scene, "approver_b").post(
        f"/api/jobs/{scene.awaiting.pk}/decide/",
        decide_body(scene.awaiting, scene.cast.hospital_a),
        format="json",
    )
    assert response.status_code == 403 and response.json()["code"] == "not_approver"
    assert not scene.awaiting.approvals.exists()


def test_an_approver_of_a_non_participant_gets_404(scene):
    """An approver whose institution takes no part in the job cannot decide on it."""
    job = propose_logistic(scene.cast, participants=["hospital-b"], rounds=3)
    response = client_for(scene, "approver").post(
        f"/api/jobs/{job.pk}/decide/", decide_body(job, scene.cast.hospital_a), format="json"
    )
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}


DETAIL_ROUTES = [
    ("get", "/api/datasets/{}/", None),
    ("patch", "/api/datasets/{}/", {"num_records": 5}),
    ("delete", "/api/datasets/{}/", None),
    ("get", "/api/jobs/{}/", None),
    ("patch", "/api/jobs/{}/", {"title": "x"}),
    ("post", "/api/jobs/{}/submit/", None),
    ("post", "/api/jobs/{}/cancel/", {"reason": "Because."}),
    ("post", "/api/jobs/{}/decide/", {"institution": "hospital-a", "decision": "approved"}),
    ("get", "/api/jobs/{}/approvals/", None),
]


@pytest.mark.parametrize("method, template, body", DETAIL_ROUTES)
@pytest.mark.parametrize("missing", ["999999", "not-a-number"])
def test_a_missing_object_looks_like_a_forbidden_one(scene, method, template, body, missing):
    """The admin asking for an id that does not exist gets the same answer as the
    outsider asking for one that does."""
    existing = scene.spare.pk if template.startswith("/api/datasets/") else scene.draft.pk
    forbidden = getattr(client_for(scene, "outsider"), method)(
        template.format(existing), body, format="json"
    )
    missing_response = getattr(client_for(scene, "admin"), method)(
        template.format(missing), body, format="json"
    )
    assert forbidden.status_code == missing_response.status_code == 404
    assert forbidden.json() == missing_response.json() == {"detail": "Not found."}


@pytest.mark.parametrize(
    "who, method, template, body",
    [
        ("approver", "patch", "/api/datasets/{dataset}/", {"num_records": 5}),
        ("admin", "delete", "/api/datasets/{dataset}/", None),
        ("other_member", "patch", "/api/jobs/{job}/", {"title": "x"}),
        ("auditor", "post", "/api/jobs/{job}/cancel/", {"reason": "Because."}),
        ("steward", "post", "/api/jobs/{job}/submit/", None),
    ],
)
def test_a_visible_object_without_the_right_is_404_too(scene, who, method, template, body):
    client = client_for(scene, who)
    ids = {"dataset": scene.spare.pk, "job": scene.draft.pk}
    denied = getattr(client, method)(template.format(**ids), body, format="json")
    missing = getattr(client, method)(
        template.format(dataset=999999, job=999999), body, format="json"
    )
    detail = "/api/datasets/{dataset}/" if "datasets" in template else "/api/jobs/{job}/"
    assert client.get(detail.format(**ids)).status_code == 200
    assert denied.status_code == missing.status_code == 404
    assert denied.json() == missing.json()


# --- Lists stop at what the user may see ------------------------------------------------


@pytest.fixture
def elsewhere(db):
    """A second consortium with its own data set, draft job and notification."""
    boss = UserFactory(username="boss")
    other = consortium_create(acting_user=boss, name="Elsewhere")
    hospital = institution_create(acting_user=boss, consortium=other, name="Hospital X")
    dataset_register(acting_user=boss, institution=hospital, **DATASET)
    job = job_create_draft(
        acting_user=boss,
        consortium=other,
        title="Elsewhere job",
        spec=logistic_spec(participants=["hospital-x"]),
    )
    notify(users=[boss], consortium=other, message="Elsewhere news")
    return other, hospital, job


LISTS = ["/api/datasets/", "/api/jobs/", "/api/approvals/inbox/", "/api/notifications/"]


@pytest.mark.parametrize("url", LISTS)
@pytest.mark.parametrize("who", ["outsider", "superuser"])
def test_an_outsider_lists_nothing(scene, elsewhere, url, who):
    """Nor does the operator: a superuser sees no consortium it is not a member of."""
    body = client_for(scene, who).get(url).json()
    assert body["count"] == 0 and body["results"] == []


@pytest.mark.parametrize("who", PERSONAS[1:])
def test_lists_stop_at_the_consortium(scene, elsewhere, who):
    client = client_for(scene, who)
    for url in LISTS:
        text = str(client.get(url).json()["results"])
        assert "elsewhere" not in text and "hospital-x" not in text, url
        assert "Elsewhere" not in text, url
    if answered_as(who) != "outsider":
        assert client.get("/api/jobs/").json()["count"] == 2
        assert client.get("/api/datasets/").json()["count"] == 3


def test_filters_cannot_widen_the_scope(scene, elsewhere):
    other, hospital, _job = elsewhere
    client = client_for(scene, "admin")
    assert client.get("/api/jobs/", {"consortium": other.slug}).json()["count"] == 0
    assert client.get("/api/datasets/", {"institution": hospital.slug}).json()["count"] == 0


def test_each_user_sees_only_their_own_notifications(scene, elsewhere):
    for who in ["approver", "researcher", "admin", "auditor"]:
        user = scene.user(who)
        body = client_for(scene, who).get("/api/notifications/").json()
        mine = set(Notification.objects.filter(user=user).values_list("pk", flat=True))
        assert {n["id"] for n in body["results"]} == mine, who
    assert client_for(scene, "approver").get("/api/notifications/").json()["count"] == 1


def test_the_inbox_is_the_approvers(scene):
    approver = client_for(scene, "approver").get("/api/approvals/inbox/").json()
    assert [i["job"] for i in approver["results"]] == [scene.awaiting.pk]
    for who in ["admin", "auditor", "steward", "researcher", "other_member"]:
        assert client_for(scene, who).get("/api/approvals/inbox/").json()["count"] == 0, who
