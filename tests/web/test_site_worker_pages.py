"""Whether a site's worker is online, where people look: the institution's page, the
consortium dashboard's institutions table and a job's review page (before an approver decides);
and the worker's environment block on the credentials page (broker, CA bundle, central URL).
"""

from __future__ import annotations

import datetime as dt
import html as html_lib
import re

import pytest
from django.urls import reverse
from django.utils import timezone

from tests.support.training_fixtures import make_scene
from training.fl.signing import generate_keypair
from training.models import SiteCredential, SiteWorkerStatus
from training.rounds import credentials
from training.rounds.heartbeats import worker_heartbeat_record
from training.site.protocol import SITE_PROTOCOL

pytestmark = pytest.mark.django_db


def text_of(response) -> str:
    """The page's visible text with tags dropped and whitespace collapsed."""
    assert response.status_code == 200, response.status_code
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", response.content.decode(), flags=re.S)
    return re.sub(r"\s+", " ", html_lib.unescape(re.sub(r"<[^>]+>", " ", html)))


def credential_for(cast, institution, label="gpu-node-1"):
    credential, _token = credentials.site_credential_create(
        acting_user=cast.admin,
        institution=institution,
        label=label,
        public_key=generate_keypair()[1],
    )
    return credential


def beat(credential, *, ago: float = 0, device="cuda:NVIDIA H200", hostname="gpu-a1"):
    worker_heartbeat_record(
        credential=credential,
        protocol=SITE_PROTOCOL,
        version="0.1.0",
        device=device,
        hostname=hostname,
        interval_seconds=30,
    )
    if ago:
        SiteWorkerStatus.objects.filter(credential=credential).update(
            last_seen_at=timezone.now() - dt.timedelta(seconds=ago)
        )


def institution_page(cast, institution, who="researcher"):
    return cast.client_for(who).get(
        reverse("consortium:institution-detail", args=[cast.consortium.slug, institution.slug])
    )


def test_the_institution_page_shows_its_worker_online_then_offline(cast):
    credential = credential_for(cast, cast.hospital_a)
    text = text_of(institution_page(cast, cast.hospital_a))
    assert "Site worker never seen worker “gpu-node-1”" in text
    assert "its worker has never reported" in text

    beat(credential)
    text = text_of(institution_page(cast, cast.hospital_a))
    assert "Site worker online worker “gpu-node-1”" in text
    assert "release 0.1.0 (site protocol 1), device cuda:NVIDIA H200 on gpu-a1" in text

    beat(credential, ago=2 * 3600 + 60)
    text = text_of(institution_page(cast, cast.hospital_a))
    assert "Site worker offline worker “gpu-node-1”" in text
    assert "last seen 2 hours, 1 minute ago" in text
    # The time once said its zone twice ("14:54 UTC UTC").
    assert re.search(r"ago \(\d{4}-\d\d-\d\d \d\d:\d\d UTC\), release", text), text

    credentials.site_credential_revoke(acting_user=cast.admin, credential=credential)
    text = text_of(institution_page(cast, cast.hospital_a))
    assert "no worker credentials" in text


def test_the_dashboard_lists_each_sites_worker(cast):
    beat(credential_for(cast, cast.hospital_a), device="cpu")
    page = cast.client_for("auditor").get(
        reverse("consortium:consortium-detail", args=[cast.consortium.slug])
    )
    html = page.content.decode()
    assert "Site worker" in text_of(page)
    rows = {
        name: row
        for row in re.findall(r"<tr\b.*?</tr>", html, flags=re.S)
        for name in ("Hospital A", "Hospital B")
        if name in row
    }
    assert 'data-worker-status="online"' in rows["Hospital A"]
    assert "CPU, v0.1.0" in rows["Hospital A"]
    assert 'data-worker-status="no worker credentials"' in rows["Hospital B"]

    SiteWorkerStatus.objects.update(last_seen_at=timezone.now() - dt.timedelta(minutes=10))
    html = (
        cast.client_for("auditor")
        .get(reverse("consortium:consortium-detail", args=[cast.consortium.slug]))
        .content.decode()
    )
    assert 'data-worker-status="offline"' in html
    assert "last seen 10\xa0minutes ago" in html


def test_the_approver_sees_the_sites_workers_before_deciding(cast):
    scene = make_scene(cast)
    job = scene.propose()
    beat(credential_for(cast, cast.hospital_a))
    credential_for(cast, cast.hospital_b)  # never started
    page = cast.client_for("approver").get(
        reverse("training:job-review", args=[cast.consortium.slug, job.pk])
    )
    text = text_of(page)
    assert "The sites' workers now" in text
    section = text.split("The sites' workers now", 1)[1].split("Your decision", 1)[0]
    assert "Hospital A online worker “gpu-node-1”" in section
    assert "device cuda:NVIDIA H200" in section
    assert "Hospital B never seen worker “gpu-node-1”" in section
    assert "gpu-a1" not in section  # host names stay on the institution's page
    assert "Your decision" in text


# --- The credentials page's environment block -------------------------------------------------


def created_block(cast, settings_, **overrides) -> tuple[str, str]:
    for name, value in overrides.items():
        setattr(settings_, name, value)
    response = cast.client_for("steward").post(
        reverse("training:credential-list", args=[cast.consortium.slug, cast.hospital_a.slug]),
        {"label": f"node-{SiteCredential.objects.count()}", "public_key": generate_keypair()[1]},
    )
    assert response.status_code == 200
    block = re.search(
        r'<pre class="mono" id="worker-env">(.*?)</pre>', response.content.decode(), re.S
    )
    return html_lib.unescape(block.group(1)), text_of(response)


def test_the_environment_block_names_the_servers_url_broker_and_ca(cast, settings):
    block, text = created_block(
        cast,
        settings,
        SITE_URL="https://fl.example.org",
        CELERY_BROKER_URL="amqp://central:s3cret-central@rabbit.example.org:5671/fl",
    )
    lines = block.splitlines()
    assert "CENTRAL_URL=https://fl.example.org" in lines
    assert (
        "CELERY_BROKER_URL=amqp://site-hospital-a:<password of site-hospital-a>"
        "@rabbit.example.org:5671/fl" in lines
    )
    assert "SITE_CA_BUNDLE=/path/to/the/consortium-ca.pem" in lines
    assert "s3cret-central" not in block and "central:" not in block
    assert "run_site_worker --check" in text
    assert "may consume only the queue site.hospital-a" in text


def test_the_environment_block_on_the_embedded_broker(cast, settings):
    block, text = created_block(
        cast, settings, SITE_URL="http://127.0.0.1:8101", CELERY_BROKER_URL="filesystem://"
    )
    assert "CENTRAL_URL=http://127.0.0.1:8101" in block.splitlines()
    assert "CELERY_BROKER_URL=" not in block
    assert "# CELERY_BROKER_URL unset: the embedded broker" in block
    assert "SITE_CA_BUNDLE" not in block
    assert "refuses to start until CELERY_BROKER_URL names a shared broker" in text


def test_the_environment_block_with_redis_hides_its_password(cast, settings):
    block, _text = created_block(
        cast, settings, CELERY_BROKER_URL="redis://:hunter2@redis.example.org:6379/0"
    )
    assert "CELERY_BROKER_URL=redis://:<redis password>@redis.example.org:6379/0" in block
    assert "hunter2" not in block
