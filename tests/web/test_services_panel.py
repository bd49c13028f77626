"""The consortium dashboard's *Services* panel (``consortium.dashboard.services``): for the
operators and the consortium's administrators, the coordinator, the periodic tick, the outbox
relay and each site worker, red when down, how long in words, with hosts; for nobody else."""

from __future__ import annotations

import datetime as dt
import html
import re

import pytest
from django.utils import timezone

from consortium.dashboard.services import can_see_services
from tests.support.factories import UserFactory
from tests.support.liveness_fixtures import worker_heard
from training.models import OutboxMessage, ServiceHeartbeat

pytestmark = pytest.mark.django_db


def dashboard(cast, who) -> str:
    response = cast.client_for(who).get(f"/consortia/{cast.consortium.slug}/")
    assert response.status_code == 200
    return re.sub(r"\s+", " ", html.unescape(response.content.decode()))


def panel(shown: str) -> str:
    start = shown.index('id="services"')
    return shown[start : shown.index("</section>", start)]


def row(part: str, marker: str) -> str:
    start = part.index(marker)
    return part[start : part.index("</tr>", start)]


def beat(component, *, ago, hostname, interval=5.0):
    now = timezone.now()
    ServiceHeartbeat.objects.create(
        component=component,
        instance=f"{hostname}:101",
        hostname=hostname,
        pid=101,
        started_at=now - dt.timedelta(hours=2),
        last_seen_at=now - ago,
        interval_seconds=interval,
    )


def test_an_administrator_sees_what_is_down_in_words_and_red(cast):
    beat("coordinator", ago=dt.timedelta(minutes=4), hostname="central-1")
    beat("tick", ago=dt.timedelta(seconds=3), hostname="central-1", interval=10)
    OutboxMessage.objects.create(
        task="training.round_maybe_close",
        queue="central",
        created_at=timezone.now() - dt.timedelta(minutes=3),
    )
    worker_heard(cast, cast.hospital_a, ago=dt.timedelta(minutes=7), hostname="gpu-a.internal")
    worker_heard(cast, cast.hospital_b, ago=dt.timedelta(seconds=5), hostname="gpu-b.internal")

    part = panel(dashboard(cast, "admin"))
    assert 'data-down="3"' in part and "3 down" in part  # coordinator, relay, hospital A

    coordinator = row(part, 'data-service="coordinator"')
    assert 'class="down"' in coordinator and 'badge bad">down' in coordinator
    assert "4 min" in coordinator  # the summary is training.liveness's, in words
    assert "central-1:101" in coordinator and "silent" in coordinator

    tick = row(part, 'data-service="tick"')
    assert 'class="up"' in tick and "alive" in tick

    relay = row(part, 'data-service="relay"')
    assert 'class="down"' in relay
    assert "3 min" in relay

    a = row(part, '<th scope="row">Hospital A</th>')
    assert "offline for 7 min (last heard" in a and "gpu-a.internal" in a
    b = row(part, '<th scope="row">Hospital B</th>')
    assert 'badge ok">online' in b and "gpu-b.internal" in b


def test_all_up_reads_so(cast):
    beat("coordinator", ago=dt.timedelta(seconds=1), hostname="central-1")
    beat("tick", ago=dt.timedelta(seconds=1), hostname="central-1", interval=10)
    worker_heard(cast, cast.hospital_a, ago=dt.timedelta(seconds=5))
    worker_heard(cast, cast.hospital_b, ago=dt.timedelta(seconds=5))
    part = panel(dashboard(cast, "admin"))
    assert 'data-down="0"' in part and "all up" in part
    assert 'class="down"' not in part


def test_never_heard_services_and_sites_without_workers_are_down(cast):
    part = panel(dashboard(cast, "admin"))
    coordinator = row(part, 'data-service="coordinator"')
    assert 'class="down"' in coordinator and "heard from" in coordinator
    assert 'data-site-worker="no worker credentials"' in part


@pytest.mark.parametrize("who", ["approver", "researcher", "auditor", "inst_admin"])
def test_others_see_no_panel_and_no_host(cast, who):
    beat("coordinator", ago=dt.timedelta(minutes=4), hostname="central-1")
    worker_heard(cast, cast.hospital_b, ago=dt.timedelta(minutes=7), hostname="gpu-b.internal")
    shown = dashboard(cast, who)
    assert 'id="services"' not in shown
    assert "central-1" not in shown and "gpu-b.internal" not in shown


def test_who_sees_the_panel(cast):
    root = UserFactory(username="root", is_superuser=True, is_staff=True)
    assert can_see_services(root, cast.consortium)
    staff = UserFactory(username="ops", is_staff=True)
    assert can_see_services(staff, cast.consortium)
    staff.is_active = False
    assert not can_see_services(staff, cast.consortium)
    assert can_see_services(cast.admin, cast.consortium)
    for user in (cast.approver, cast.auditor, cast.inst_admin, cast.outsider):
        assert not can_see_services(user, cast.consortium)
