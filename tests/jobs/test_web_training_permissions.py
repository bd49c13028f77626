"""Who may open which training page: the full matrix, and pinned query counts.

Every page (GET, and POST for the actions) runs as every persona. Anonymous
users are sent to the login page; a persona without the permission gets 404,
exactly like a missing object; an allowed one gets the page (200) or the
redirect after acting (302).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from consortium.governance.services.institutions import consortium_create
from tests.support.agreements import agreement_in_force
from tests.support.factories import UserFactory
from tests.support.permission_matrix import (
    BASE_PERSONAS,
    LOGIN,
    ask_page,
    assert_page_answer,
    permission_cases,
    same_404_page,
)
from tests.support.training_fixtures import DATASET_KEY
from tests.support.training_pages import (
    AGREEMENT_TITLE,
    dataset_data,
    default_pipeline_spec,
    job_data,
    steward_registers_datasets,
)
from training.jobs.approvals import approval_decide
from training.jobs.datasets import dataset_register
from training.jobs.proposals import job_create_draft, job_propose
from training.models import TrainingJob
from training.web.views import approvals as approval_pages

pytestmark = pytest.mark.django_db

PERSONAS = [*BASE_PERSONAS, "inst_admin", "steward", "researcher"]
MEMBERS = {"other_member", "approver", "auditor", "admin", "inst_admin", "steward", "researcher"}
SIGNED_IN = MEMBERS | {"outsider"}
DATA_KEEPERS = {"steward", "inst_admin"}  # training.manage_datasets at hospital A
PROPOSERS = {"admin", "researcher", "other_member"}  # admins and any researcher
JOB_OWNERS = {"admin", "researcher"}  # the consortium admin and the job's proposer
APPROVERS = {"approver"}  # hospital A's approver (hospital A takes part)


@dataclass
class Scene:
    cast: object
    awaiting: TrainingJob
    draft: TrainingJob


@pytest.fixture
def scene(cast):
    agreement_in_force(cast, title=AGREEMENT_TITLE)
    steward_registers_datasets(cast)
    dataset_register(
        acting_user=cast.steward,
        institution=cast.hospital_a,
        key="spare",
        description="Unused by any job",
        modality="tabular",
        num_records=100,
        input_shape=[30],
        n_classes=2,
    )
    awaiting = job_propose(
        acting_user=cast.researcher,
        consortium=cast.consortium,
        title="Awaiting",
        spec=default_pipeline_spec(cast),
    )
    draft = job_create_draft(
        acting_user=cast.researcher,
        consortium=cast.consortium,
        title="Draft",
        spec=default_pipeline_spec(cast),
    )
    return Scene(cast=cast, awaiting=awaiting, draft=draft)


# kwargs builders: scene -> URL kwargs.
def consortium(s):
    return {"slug": s.cast.consortium.slug}


def hospital_a(s):
    return {**consortium(s), "inst_slug": s.cast.hospital_a.slug}


def dataset(s):
    return {**hospital_a(s), "key": DATASET_KEY}


def spare(s):
    return {**hospital_a(s), "key": "spare"}


def awaiting(s):
    return {**consortium(s), "pk": s.awaiting.pk}


def draft(s):
    return {**consortium(s), "pk": s.draft.pk}


def nothing(s):
    return {}


# POST data builders: (scene, persona) -> form data that succeeds for an allowed persona.
def new_dataset_data(s, who):
    return dataset_data(key="new-set")


def edit_dataset_data(s, who):
    return dataset_data(num_records="900")


def propose_data(s, who):
    return job_data(s.cast, title="New job")


def edit_job_data(s, who):
    return job_data(s.cast, rounds="6", action="save")


def cancel_data(s, who):
    return {"reason": "No longer needed."}


def decide_data(s, who):
    job = s.awaiting
    return {
        "institution": s.cast.hospital_a.pk,
        "decision": "approved",
        "spec_digest": job.spec_digest,
        "agreement_version_id": job.agreement_version_id,
    }


# (url name, kwargs builder, method, personas allowed, status when allowed, POST data)
ROUTES = [
    ("dataset-list", hospital_a, "get", MEMBERS, 200, None),
    ("dataset-create", hospital_a, "get", DATA_KEEPERS, 200, None),
    ("dataset-create", hospital_a, "post", DATA_KEEPERS, 302, new_dataset_data),
    ("dataset-edit", dataset, "get", DATA_KEEPERS, 200, None),
    ("dataset-edit", dataset, "post", DATA_KEEPERS, 302, edit_dataset_data),
    ("dataset-remove", spare, "get", DATA_KEEPERS, 200, None),
    ("dataset-remove", spare, "post", DATA_KEEPERS, 302, None),
    ("job-list", consortium, "get", MEMBERS, 200, None),
    ("job-create", consortium, "get", PROPOSERS, 200, None),
    ("job-create", consortium, "post", PROPOSERS, 302, propose_data),
    ("job-detail", awaiting, "get", MEMBERS, 200, None),
    ("job-detail", draft, "get", MEMBERS, 200, None),
    ("job-edit", awaiting, "get", JOB_OWNERS, 200, None),
    ("job-edit", awaiting, "post", JOB_OWNERS, 302, edit_job_data),
    ("job-submit", draft, "post", JOB_OWNERS, 302, None),
    ("job-submit", draft, "get", JOB_OWNERS, 405, None),
    ("job-cancel", awaiting, "get", JOB_OWNERS, 200, None),
    ("job-cancel", awaiting, "post", JOB_OWNERS, 302, cancel_data),
    ("job-review", awaiting, "get", APPROVERS, 200, None),
    ("job-review", awaiting, "post", APPROVERS, 302, decide_data),
    ("job-review", draft, "get", set(), 200, None),  # a draft has no participants yet
    ("approval-inbox", consortium, "get", MEMBERS, 200, None),
    ("notification-list", nothing, "get", SIGNED_IN, 200, None),
    ("notification-list", nothing, "post", SIGNED_IN, 302, None),
]


@pytest.mark.parametrize(
    ("url_name", "kwargs", "method", "persona", "expected", "data"),
    list(permission_cases(ROUTES, PERSONAS)),
)
def test_permission_matrix(scene, url_name, kwargs, method, persona, expected, data):
    url, response = ask_page(scene, "training", url_name, kwargs, method, persona, data)
    assert_page_answer(response, url, method, expected)


MISSING = [
    ("dataset-list", lambda s: {**consortium(s), "inst_slug": "no-such-site"}),
    ("dataset-create", lambda s: {**consortium(s), "inst_slug": "no-such-site"}),
    ("dataset-edit", lambda s: {**hospital_a(s), "key": "no-such-key"}),
    ("dataset-remove", lambda s: {**hospital_a(s), "key": "no-such-key"}),
    ("job-list", lambda s: {"slug": "no-such-consortium"}),
    ("job-create", lambda s: {"slug": "no-such-consortium"}),
    ("job-detail", lambda s: {**consortium(s), "pk": 999_999}),
    ("job-edit", lambda s: {**consortium(s), "pk": 999_999}),
    ("job-cancel", lambda s: {**consortium(s), "pk": 999_999}),
    ("job-review", lambda s: {**consortium(s), "pk": 999_999}),
    ("approval-inbox", lambda s: {"slug": "no-such-consortium"}),
]


@pytest.mark.parametrize(("url_name", "kwargs"), MISSING, ids=[m[0] for m in MISSING])
@pytest.mark.parametrize("persona", ["admin", "approver", "steward"])
def test_a_missing_object_is_the_same_404(scene, url_name, kwargs, persona):
    response = scene.cast.client_for(persona).get(
        reverse(f"training:{url_name}", kwargs=kwargs(scene))
    )
    assert response.status_code == 404


@pytest.mark.parametrize("action", ["job-submit", "job-cancel", "job-review"])
def test_posting_to_a_missing_job_is_404(scene, action):
    kwargs = {**consortium(scene), "pk": 999_999}
    response = scene.cast.client_for("admin").post(reverse(f"training:{action}", kwargs=kwargs))
    assert response.status_code == 404


def test_forbidden_and_missing_pages_are_indistinguishable(scene):
    """Same status and same body: nothing tells a probe that the id or key exists."""
    client = scene.cast.client_for("approver")
    pairs = [
        (
            reverse("training:job-edit", kwargs=awaiting(scene)),
            reverse("training:job-edit", kwargs={**consortium(scene), "pk": 999_999}),
        ),
        (
            reverse("training:dataset-edit", kwargs=dataset(scene)),
            reverse("training:dataset-edit", kwargs={**hospital_a(scene), "key": "nothing"}),
        ),
    ]
    for forbidden_url, missing_url in pairs:
        forbidden, missing = client.get(forbidden_url), client.get(missing_url)
        assert same_404_page(forbidden, missing), (forbidden_url, missing_url)


def test_jobs_of_another_consortium_are_404_even_for_its_admin(scene):
    other_admin = UserFactory(username="other_admin")
    other = consortium_create(acting_user=other_admin, name="Other Consortium")
    client = scene.cast.client_for(None)
    client.force_login(other_admin)
    for name, kwargs in [
        ("job-detail", awaiting(scene)),
        ("job-detail", {"slug": other.slug, "pk": scene.awaiting.pk}),
        ("job-list", consortium(scene)),
        ("approval-inbox", consortium(scene)),
        ("dataset-list", hospital_a(scene)),
    ]:
        assert client.get(reverse(f"training:{name}", kwargs=kwargs)).status_code == 404, name
    # Our admin under the other consortium's slug: 404 as well.
    response = scene.cast.client_for("admin").get(
        reverse("training:job-detail", kwargs={"slug": other.slug, "pk": scene.awaiting.pk})
    )
    assert response.status_code == 404


def test_actions_are_shown_only_to_those_permitted(scene):
    detail = reverse("training:job-detail", kwargs=awaiting(scene))
    edit = reverse("training:job-edit", kwargs=awaiting(scene))
    cancel = reverse("training:job-cancel", kwargs=awaiting(scene))
    review = reverse("training:job-review", kwargs=awaiting(scene))
    for persona, shown in [
        ("researcher", {edit, cancel}),
        ("admin", {edit, cancel}),
        ("approver", {review}),
        ("auditor", set()),
        ("other_member", set()),
    ]:
        html = scene.cast.client_for(persona).get(detail).content.decode()
        for link in (edit, cancel, review):
            assert (f'href="{link}"' in html) == (link in shown), (persona, link)


# --- pinned query counts ----------------------------------------------------------------


def _queries(client, url) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200
    return len(ctx.captured_queries)


def _more_jobs(cast, n):
    for i in range(n):
        job_propose(
            acting_user=cast.admin,
            consortium=cast.consortium,
            title=f"Extra {i}",
            spec=default_pipeline_spec(cast, privacy_pipeline=_cheap_pipeline()),
        )


def _cheap_pipeline():
    """Plenty of noise: many jobs fit the ε cap together."""
    return [
        {"filter": "partial_sharing", "fraction": 0.4},
        {"filter": "gaussian_noise", "noise_multiplier": 50.0, "clip_norm": 1.0},
    ]


@pytest.fixture
def one_job(cast):
    agreement_in_force(cast, title=AGREEMENT_TITLE)
    steward_registers_datasets(cast)
    _more_jobs(cast, 1)
    return cast


@pytest.mark.parametrize("who", ["approver", "admin"])
def test_job_list_queries_do_not_grow_with_jobs(one_job, who):
    cast = one_job
    client = cast.client_for(who)
    url = reverse("training:job-list", kwargs={"slug": cast.consortium.slug})
    with_one = _queries(client, url)
    _more_jobs(cast, 4)
    assert TrainingJob.objects.count() == 5
    assert _queries(client, url) == with_one
    assert _queries(client, url + "?state=awaiting_approval") == with_one


def test_approver_inbox_queries_do_not_grow_with_jobs(one_job):
    cast = one_job
    client = cast.client_for("approver")
    url = reverse("training:approval-inbox", kwargs={"slug": cast.consortium.slug})
    first = client.get(url)
    assert len(first.context["pending"]) == 1
    with_one = _queries(client, url)
    _more_jobs(cast, 4)
    assert len(client.get(url).context["pending"]) == 5
    assert _queries(client, url) == with_one


def test_the_approver_inbox_pages_and_drops_decided_jobs(one_job, settings):
    cast = one_job
    settings.DEBUG = False
    approval_pages.INBOX_PER_PAGE, saved = 3, approval_pages.INBOX_PER_PAGE
    try:
        _more_jobs(cast, 4)  # five jobs wait on hospital A's approver
        client = cast.client_for("approver")
        url = reverse("training:approval-inbox", kwargs={"slug": cast.consortium.slug})
        first, second = client.get(url), client.get(url + "?page=2")
        ids = [r.job.pk for r in first.context["pending"]]
        ids += [r.job.pk for r in second.context["pending"]]
        assert sorted(ids) == sorted(TrainingJob.objects.values_list("pk", flat=True))
        assert first.context["page_obj"].paginator.count == 5
        assert "Page 1 of 2" in first.content.decode()
        job = TrainingJob.objects.order_by("pk").first()
        approval_decide(
            acting_user=cast.approver,
            job=job,
            institution=cast.hospital_a,
            decision="approved",
            reason="",
            spec_digest=job.spec_digest,
            agreement_version_id=job.agreement_version_id,
        )
        left = client.get(url).context["page_obj"].paginator.count
        assert left == 4
    finally:
        approval_pages.INBOX_PER_PAGE = saved


def test_the_unread_count_is_one_query(one_job):
    """The top bar's count is one COUNT query, whatever the number of notifications."""
    cast = one_job
    client = cast.client_for("approver")
    url = reverse("training:notification-list")
    with CaptureQueriesContext(connection) as ctx:
        client.get(url)
    counts = [q["sql"] for q in ctx.captured_queries if "COUNT(" in q["sql"].upper()]
    unread = [q for q in counts if "read_at" in q and "IS NULL" in q.upper()]
    assert len(unread) == 1


# --- Contribution reports (audit namespace): the same matrix ----------------------------------

REPORT_READERS = {"auditor", "admin"}  # audit.export_job_report
# audit.export_institution_report on hospital A: auditors, admins, and hospital A's approver and
# administrator; not hospital B's member ("other_member"), nor A's steward or researcher.
INSTITUTION_REPORT_READERS = {"auditor", "admin", "approver", "inst_admin"}


def export_csv(s, who):
    return {"format": "csv"}


def export_pdf(s, who):
    return {"format": "pdf"}


REPORT_ROUTES = [
    ("job-report", awaiting, "get", REPORT_READERS, 200, None),
    ("job-report", awaiting, "post", REPORT_READERS, 200, export_csv),
    ("job-report", draft, "get", REPORT_READERS, 200, None),
    ("institution-report", hospital_a, "get", INSTITUTION_REPORT_READERS, 200, None),
    ("institution-report", hospital_a, "post", INSTITUTION_REPORT_READERS, 200, export_pdf),
]


@pytest.mark.parametrize(
    ("url_name", "kwargs", "method", "persona", "expected", "data"),
    list(permission_cases(REPORT_ROUTES, PERSONAS)),
)
def test_report_permission_matrix(scene, url_name, kwargs, method, persona, expected, data):
    from audit.models import LedgerEntry

    before = LedgerEntry.objects.filter(event="report.exported").count()
    url, response = ask_page(scene, "audit", url_name, kwargs, method, persona, data)
    exported = LedgerEntry.objects.filter(event="report.exported").count() - before
    if expected == LOGIN:
        assert response.status_code == 302
        assert response.url == f"{reverse('login')}?next={url}"
        assert exported == 0
        return
    assert response.status_code == expected
    if method == "post":
        # Only an allowed export writes its ledger entry; a refused one writes nothing.
        assert exported == (1 if expected == 200 else 0)
        if expected == 200:
            assert response["Content-Disposition"].startswith("attachment;")


@pytest.mark.parametrize(
    ("url_name", "kwargs"),
    [
        ("job-report", lambda s: {**consortium(s), "pk": 999_999}),
        ("institution-report", lambda s: {**consortium(s), "inst_slug": "no-such-site"}),
        ("job-report", lambda s: {"slug": "no-such-consortium", "pk": s.awaiting.pk}),
    ],
    ids=["job", "institution", "consortium"],
)
@pytest.mark.parametrize("persona", ["admin", "auditor"])
def test_a_missing_report_subject_is_the_same_404(scene, url_name, kwargs, persona):
    client = scene.cast.client_for(persona)
    url = reverse(f"audit:{url_name}", kwargs=kwargs(scene))
    assert client.get(url).status_code == 404
    assert client.post(url, {"format": "csv"}).status_code == 404
