"""The live pages' websockets: who may open them, and that committed changes reach them.

These drive the consumers through Channels' in-process communicator (the ASGI application with
its session authentication, or the URL router with a user put in the scope). The same sockets
over a real server, with a real worker, are exercised by the browser journeys.
"""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.db import connection
from django.test.utils import CaptureQueriesContext

from audit.ledger import live
from consortium.governance.services.members import membership_remove
from consortium.routing import websocket_urlpatterns
from tests.support.training_fixtures import make_scene
from training.jobs.proposals import job_cancel
from training.models import JobState
from training.rounds.live import consortium_live_state, job_live_state

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def scene(cast):
    return make_scene(cast)


@pytest.fixture(autouse=True)
def _fast_poll(settings):
    settings.LIVE_POLL_SECONDS = 0.2


def job_path(job) -> str:
    return f"/ws/consortia/{job.consortium.slug}/jobs/{job.pk}/"


async def _open(path: str, user):
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    communicator.scope["user"] = user
    connected, code = await communicator.connect(timeout=20)
    return communicator, connected, code


async def _next_with(communicator, predicate, timeout: float = 20.0):
    """The first message matching ``predicate`` within ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        assert left > 0, "no matching message arrived"
        message = await communicator.receive_json_from(timeout=left)
        if predicate(message):
            return message


# --- Who may open a socket -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "allowed"),
    [
        ("anonymous", False),
        ("outsider", False),
        ("approver", True),
        ("other_member", True),
        ("auditor", True),
        ("admin", True),
    ],
)
def test_the_job_socket_applies_the_job_pages_rule(cast, scene, who, allowed):
    from django.contrib.auth.models import AnonymousUser

    job = scene.propose()
    user = AnonymousUser() if who == "anonymous" else getattr(cast, who)
    page = cast.client_for(who).get(f"/consortia/{cast.consortium.slug}/jobs/{job.pk}/")
    assert (page.status_code == 200) is allowed  # the page's own rule, for comparison

    async def go():
        communicator, connected, code = await _open(job_path(job), user)
        try:
            assert connected is allowed
            if allowed:
                first = await communicator.receive_json_from(timeout=20)
                assert first["type"] == "state"
                assert first["state"]["job"]["id"] == job.pk
                assert first["state"]["job"]["state"] == JobState.AWAITING_APPROVAL
            else:
                assert code == 4403
        finally:
            await communicator.disconnect()

    asyncio.run(go())


def test_a_job_of_another_consortium_or_a_missing_one_is_refused(cast, scene):
    job = scene.propose()

    async def go():
        for path in (
            f"/ws/consortia/elsewhere/jobs/{job.pk}/",
            f"/ws/consortia/{cast.consortium.slug}/jobs/{job.pk + 999}/",
        ):
            communicator, connected, code = await _open(path, cast.admin)
            assert not connected and code == 4403, path
            await communicator.disconnect()

    asyncio.run(go())


def test_the_session_cookie_authenticates_through_the_asgi_application(cast, scene):
    from consortium.asgi import application

    job = scene.propose()
    client = cast.client_for("approver")
    name = django_settings.SESSION_COOKIE_NAME
    cookie = f"{name}={client.cookies[name].value}"
    headers = [(b"cookie", cookie.encode()), (b"origin", b"http://localhost")]

    async def go():
        signed_in = WebsocketCommunicator(application, job_path(job), headers=headers)
        connected, _ = await signed_in.connect(timeout=20)
        assert connected
        await signed_in.disconnect()
        anonymous = WebsocketCommunicator(
            application, job_path(job), headers=[(b"origin", b"http://localhost")]
        )
        connected, _ = await anonymous.connect(timeout=20)
        assert not connected
        await anonymous.disconnect()

    asyncio.run(go())


# --- Changes reach the page ------------------------------------------------------------------


def test_a_decision_reaches_an_open_job_page_with_its_entry_and_new_state(cast, scene):
    job = scene.propose()

    async def go():
        communicator, connected, _ = await _open(job_path(job), cast.researcher)
        assert connected
        first = await communicator.receive_json_from(timeout=20)
        head = first["head"]
        await sync_to_async(scene.decide)(job, cast.hospital_a)
        message = await _next_with(communicator, lambda m: m["entries"])
        assert [e["event"] for e in message["entries"]] == ["job.decision"]
        assert message["entries"][0]["seq"] > head
        assert message["entries"][0]["institution"] == cast.hospital_a.slug
        await sync_to_async(scene.decide)(job, cast.hospital_b)
        message = await _next_with(
            communicator, lambda m: m["state"]["job"]["state"] != JobState.AWAITING_APPROVAL
        )
        assert "job.state_changed" in [e["event"] for e in message["entries"]]
        assert message["state"]["job"]["state"] == JobState.APPROVED
        await communicator.disconnect()

    asyncio.run(go())


def test_without_the_wake_up_the_poll_still_delivers_in_order(cast, scene, monkeypatch):
    """The embedded default's in-memory layer does not cross processes: the coordinator's
    entries reach the page by polling. Simulate it by dropping every wake-up."""
    monkeypatch.setattr(live, "announce", lambda groups, seq: None)
    job = scene.propose()

    async def go():
        communicator, connected, _ = await _open(job_path(job), cast.researcher)
        assert connected
        await communicator.receive_json_from(timeout=20)
        await sync_to_async(scene.decide)(job, cast.hospital_a)
        await sync_to_async(scene.decide)(
            job, cast.hospital_b, decision="rejected", reason="The cohort is too small this year."
        )
        seen = []
        while "job.state_changed" not in seen:
            message = await _next_with(communicator, lambda m: m["entries"], timeout=20)
            seen += [e["event"] for e in message["entries"]]
        assert seen == ["job.decision", "job.decision", "job.state_changed"]
        await communicator.disconnect()

    asyncio.run(go())


def test_entries_of_other_jobs_do_not_reach_the_page(cast, scene):
    job = scene.propose(title="Watched")
    other = scene.propose(title="Other")

    async def go():
        communicator, connected, _ = await _open(job_path(job), cast.researcher)
        assert connected
        await communicator.receive_json_from(timeout=20)
        await sync_to_async(scene.decide)(other, cast.hospital_a)
        await sync_to_async(scene.decide)(job, cast.hospital_a)
        message = await _next_with(communicator, lambda m: m["entries"])
        assert len(message["entries"]) == 1
        assert message["state"]["job"]["id"] == job.pk
        await communicator.disconnect()

    asyncio.run(go())


def test_a_member_removed_while_the_page_is_open_is_disconnected(cast, scene):
    job = scene.propose()
    membership = cast.other_member.memberships.get()

    async def go():
        communicator, connected, _ = await _open(job_path(job), cast.other_member)
        assert connected
        await communicator.receive_json_from(timeout=20)
        await sync_to_async(membership_remove)(acting_user=cast.admin, membership=membership)
        await sync_to_async(scene.decide)(job, cast.hospital_a)
        closed = await communicator.receive_output(timeout=20)
        while closed["type"] != "websocket.close":
            closed = await communicator.receive_output(timeout=20)
        assert closed["code"] == 4403
        await communicator.disconnect()

    asyncio.run(go())


def test_the_consortium_socket_lists_entries_only_to_those_who_may_read_the_ledger(cast, scene):
    path = f"/ws/consortia/{cast.consortium.slug}/"

    async def go():
        auditor, ok_a, _ = await _open(path, cast.auditor)
        researcher, ok_r, _ = await _open(path, cast.researcher)
        outsider, ok_o, code = await _open(path, cast.outsider)
        assert ok_a and ok_r and not ok_o and code == 4403
        for c in (auditor, researcher):
            await c.receive_json_from(timeout=20)
        job = await sync_to_async(scene.propose)()
        seen = await _next_with(auditor, lambda m: m["entries"])
        assert "job.proposed" in [e["event"] for e in seen["entries"]]
        counts = {s["state"]: s["count"] for s in seen["state"]["jobs_by_state"]}
        assert counts == {JobState.AWAITING_APPROVAL: 1}
        owed = {o["institution"]: o["count"] for o in seen["state"]["approvals_owed"]}
        assert owed == {cast.hospital_a.name: 1, cast.hospital_b.name: 1}
        plain = await _next_with(researcher, lambda m: m["state"]["jobs_by_state"])
        assert plain["entries"] == []
        assert job.pk
        for c in (auditor, researcher, outsider):
            await c.disconnect()

    asyncio.run(go())


# --- The state itself ------------------------------------------------------------------------


def test_job_live_state_needs_the_same_queries_whatever_the_sites(cast, scene):
    from tests.support.agreements import add_institution

    job = scene.propose()
    job_live_state(job)  # warm caches (content types, RDP curves)
    with CaptureQueriesContext(connection) as two:
        job_live_state(job)
    state = job_live_state(job)
    assert state["job"]["rounds_total"] == job.spec["rounds"]
    assert state["round"] is None and state["series"]["rounds"] == []
    assert [p["institution"] for p in state["series"]["privacy"]] == sorted(
        [cast.hospital_a.name, cast.hospital_b.name]
    )
    add_institution(cast, "Hospital C")
    with CaptureQueriesContext(connection) as again:
        consortium_live_state(cast.consortium)
    assert len(again) <= 6
    assert len(two) <= 12


def test_a_cancelled_job_shows_its_reason(cast, scene):
    job = scene.propose()
    job_cancel(acting_user=cast.admin, job=job, reason="Superseded by job 2.")
    state = job_live_state(job)
    assert state["job"]["state"] == JobState.CANCELLED
    assert "Superseded" in state["job"]["end_reason"]


# --- The pages ---------------------------------------------------------------------------------


def test_the_job_page_renders_the_live_section_and_its_state(cast, scene):
    import json
    import re

    job = scene.propose()
    page = cast.client_for("researcher").get(f"/consortia/{cast.consortium.slug}/jobs/{job.pk}/")
    html = page.content.decode()
    assert f'data-live-url="/ws/consortia/{cast.consortium.slug}/jobs/{job.pk}/"' in html
    assert "/static/vendor/plotly.min.js" in html and "/static/js/live.js" in html
    found = re.search(r'<script id="live-state" type="application/json">(.*?)</script>', html)
    state = json.loads(found.group(1))
    assert state["job"]["id"] == job.pk and state["job"]["rounds_total"] == job.spec["rounds"]
    for section in ("job-heading", "participants", "history", "contributions"):
        assert re.search(
            rf'id="{section}"[^>]*data-live-refresh|data-live-refresh[^>]*id="{section}"', html
        ), section


def test_plotly_is_served_from_the_installed_package():
    from django.contrib.staticfiles import finders

    from consortium.staticfinders import plotly_bundle

    found = finders.find("vendor/plotly.min.js")
    assert found == str(plotly_bundle())
    with open(found, "rb") as f:
        assert b"plotly" in f.read(4096).lower()
    assert finders.find("vendor/widgetbundle.js") is None  # only the one file is exposed


def test_the_consortium_page_lists_recent_entries_only_to_ledger_readers(cast, scene):
    scene.propose(title="Listed")
    url = f"/consortia/{cast.consortium.slug}/"
    auditor = cast.client_for("auditor").get(url).content.decode()
    researcher = cast.client_for("researcher").get(url).content.decode()
    assert 'id="recent-entries"' in auditor and "job.proposed" in auditor
    assert 'id="recent-entries"' not in researcher and "job.proposed" not in researcher
    for html in (auditor, researcher):
        assert 'id="jobs-by-state"' in html and "Awaiting approval: <strong>1</strong>" in html


def test_the_wake_up_alone_delivers_without_waiting_for_the_poll(cast, scene, settings):
    """With the poll far away, a change still arrives at once: through the in-memory layer in
    this process on the embedded default, through Redis (and the background sender) when the
    suite runs with CHANNEL_LAYER_URL."""
    settings.LIVE_POLL_SECONDS = 60
    job = scene.propose()

    async def go():
        communicator, connected, _ = await _open(job_path(job), cast.researcher)
        assert connected
        await communicator.receive_json_from(timeout=20)
        started = asyncio.get_running_loop().time()
        await sync_to_async(scene.decide)(job, cast.hospital_a)
        message = await _next_with(communicator, lambda m: m["entries"], timeout=10)
        assert [e["event"] for e in message["entries"]] == ["job.decision"]
        assert asyncio.get_running_loop().time() - started < 10
        await communicator.disconnect()

    asyncio.run(go())


def test_a_site_near_its_cap_shows_a_budget_warning(cast, scene):
    """Privacy spent is replayed from the accepted updates' recorded events; at 80% of the
    agreement's cap the job page warns (live, like everything in the state)."""
    from django.utils import timezone

    from training.models import GlobalModel, Round, SiteUpdate

    job = scene.propose()
    model = GlobalModel.objects.create(job=job, round_index=0, digest="0" * 64, lineage_hash="1")
    rnd = Round.objects.create(job=job, index=1, global_model_in=model, deadline=timezone.now())
    heavy = {"mechanism": "gaussian", "params": {"noise_multiplier": 0.6}, "count": 1}
    light = {"mechanism": "gaussian", "params": {"noise_multiplier": 50.0}, "count": 1}
    for institution, event in ((cast.hospital_a, heavy), (cast.hospital_b, light)):
        SiteUpdate.objects.create(
            round=rnd,
            institution=institution,
            status=SiteUpdate.Status.ACCEPTED,
            samples=10,
            privacy_events=[{**event, "source": "gaussian_noise"}],
        )
    state = job_live_state(job)
    spent = {p["institution"]: p["spent"] for p in state["series"]["privacy"]}
    assert spent[cast.hospital_a.name] >= 0.8 * 8 > spent[cast.hospital_b.name]
    assert len(state["budget_warnings"]) == 1
    assert state["budget_warnings"][0].startswith(f"{cast.hospital_a.name} has spent ε")
    assert state["round"]["reported"] == 2 and state["round"]["percent"] == 100
