"""``manage.py demo --port N``: every link the demo writes names port N (or ``SITE_URL`` when it
is set): the server's, the coordinator's and the demo's own mail, the dashboard it prints, and
the site workers' ``CENTRAL_URL``. Checked without starting a process: the demo's run is given a
supervisor that records what it would start.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from consortium.governance.services.members import invitation_url
from training.demo.processes import demo_env, demo_site_url
from training.demo.sites import SiteFiles
from training.jobs.notifications import notify
from training.management.commands.demo import Command


class Recorded(Exception):
    """Raised where the demo would wait for its processes: the test has what it needs."""


class RecordingSupervisor:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: dict[str, dict] = {}

    def start(self, name, argv, env):
        self.started[name] = {"argv": argv, "env": env}
        return object()


def start_demo(port: int, tmp_path: Path) -> tuple[RecordingSupervisor, str]:
    """Run the demo's start-up on ``port`` (``--no-job``) up to where it would serve; (what it
    started, what it printed)."""
    command = Command(stdout=StringIO(), stderr=StringIO())
    command.var = tmp_path
    command.started = 0.0
    command.sup = RecordingSupervisor(tmp_path)

    def stop(*args, **kwargs):
        raise Recorded

    command._wait = lambda *args, **kwargs: None
    command._seed_logins = lambda: "Logins: (not seeded here)"
    command._serve_forever = stop
    site = SiteFiles(
        slug="barts",
        folder=tmp_path,
        key_path=tmp_path / "signing-key.pem",
        token="fls_x",
        data_root=tmp_path / "data",
        created=False,
    )
    with pytest.raises(Recorded):
        command._run(None, [site], port, {"no_job": True})
    return command.sup, command.stdout.getvalue()


def test_the_site_url_follows_the_port_unless_set():
    assert demo_site_url(8101, {}) == "http://127.0.0.1:8101"
    assert demo_site_url(8101, {"SITE_URL": ""}) == "http://127.0.0.1:8101"
    assert demo_site_url(8101, {"SITE_URL": "https://demo.example.org/"}) == (
        "https://demo.example.org"
    )
    assert demo_env("http://127.0.0.1:8101")["SITE_URL"] == "http://127.0.0.1:8101"


def test_every_process_and_link_of_the_demo_names_its_port(tmp_path, settings, monkeypatch):
    monkeypatch.delenv("SITE_URL", raising=False)
    settings.SITE_URL = "http://127.0.0.1:8000"  # the default; restored after the test
    sup, output = start_demo(8101, tmp_path)
    assert sup.started["server"]["argv"][-3:-1] == ["-p", "8101"]
    for name in ("server", "central-worker", "scoring-worker", "site-barts"):
        assert sup.started[name]["env"]["SITE_URL"] == "http://127.0.0.1:8101", name
    assert sup.started["site-barts"]["env"]["CENTRAL_URL"] == "http://127.0.0.1:8101"
    assert "Starting the central server on http://127.0.0.1:8101" in output
    assert "Dashboard: http://127.0.0.1:8101/ — no job proposed" in output
    # The demo's own process (its proposal and approvals mail the approvers) too.
    assert django_settings.SITE_URL == "http://127.0.0.1:8101"
    assert invitation_url("t0ken").startswith("http://127.0.0.1:8101/invitations/t0ken/")
    assert "8000" not in output + repr([started["argv"] for started in sup.started.values()])


def test_an_explicit_site_url_wins_and_the_workers_stay_local(tmp_path, settings, monkeypatch):
    monkeypatch.setenv("SITE_URL", "https://demo.example.org")
    settings.SITE_URL = "https://demo.example.org"
    sup, output = start_demo(8101, tmp_path)
    assert sup.started["server"]["env"]["SITE_URL"] == "https://demo.example.org"
    assert "Dashboard: https://demo.example.org/" in output
    # The site workers reach the server they were started beside.
    assert sup.started["site-barts"]["env"]["CENTRAL_URL"] == "http://127.0.0.1:8101"
    assert django_settings.SITE_URL == "https://demo.example.org"


@pytest.mark.django_db
def test_notification_mail_links_name_the_site_url(
    cast, settings, mailoutbox, django_capture_on_commit_callbacks
):
    settings.SITE_URL = demo_site_url(8101, {})
    with django_capture_on_commit_callbacks(execute=True):
        notify(users=[cast.approver], consortium=cast.consortium, message="A job.", url="/j/1/")
    assert mailoutbox[0].body.endswith("http://127.0.0.1:8101/j/1/")
