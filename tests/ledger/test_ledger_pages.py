"""The auditor's ledger page and its verify button, as every persona."""

import datetime as dt
import re

import pytest
from django.db import connection
from django.urls import reverse

from audit.ledger.chain import append_entry
from audit.models import LedgerEntry
from tests.support.ledger_checks import with_ledger_guard_off

pytestmark = pytest.mark.django_db

ALLOWED = ["auditor", "admin"]
REFUSED = ["outsider", "other_member", "approver"]


def ledger_url(cast, **query):
    url = reverse("audit:ledger", kwargs={"slug": cast.consortium.slug})
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return url


def verify_url(cast):
    return reverse("audit:ledger-verify", kwargs={"slug": cast.consortium.slug})


def seqs_on(response) -> list[int]:
    return [int(s) for s in re.findall(r'<tr id="entry-(\d+)">', response.content.decode())]


def tamper_payload(seq: int) -> None:
    with with_ledger_guard_off(), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE audit_ledgerentry SET payload_text = %s WHERE seq = %s", ['{"x":1}', seq]
        )


@pytest.mark.parametrize("who", ALLOWED)
def test_ledger_page_lists_the_consortiums_entries(cast, who):
    append_entry(event="other.thing", consortium_slug="someone-else", payload={"secret": 1})
    response = cast.client_for(who).get(ledger_url(cast))
    assert response.status_code == 200
    body = response.content.decode()
    own = list(
        LedgerEntry.objects.filter(consortium_slug=cast.consortium.slug)
        .order_by("-seq")
        .values_list("seq", flat=True)
    )
    assert seqs_on(response) == own  # newest first, only this consortium's
    assert "consortium.created" in body and "institution.created" in body
    assert "someone-else" not in body and "secret" not in body
    entry = LedgerEntry.objects.get(event="consortium.created")
    assert f'title="{entry.entry_hash}"' in body
    assert f"{entry.entry_hash[:12]}…" in body
    assert "&quot;slug&quot;: &quot;test-consortium&quot;" in body  # pretty-printed payload
    for label in ("Event", "Institution", "From (date)", "To (date)"):
        assert f">{label}</label>" in body
    assert "Verify the ledger" in body


def test_filters_narrow_the_list(cast):
    client = cast.client_for("auditor")
    slug_a = cast.hospital_a.slug
    response = client.get(ledger_url(cast, event="institution.created"))
    assert len(seqs_on(response)) == 2
    response = client.get(ledger_url(cast, institution=slug_a))
    entries = LedgerEntry.objects.filter(institution_slug=slug_a)
    assert seqs_on(response) == sorted(entries.values_list("seq", flat=True), reverse=True)
    assert f'<option value="{slug_a}" selected>' in response.content.decode()
    today = dt.date.today()
    response = client.get(ledger_url(cast, date_from=today - dt.timedelta(days=1), date_to=today))
    assert len(seqs_on(response)) == 3
    response = client.get(ledger_url(cast, date_to=today - dt.timedelta(days=1)))
    assert seqs_on(response) == []
    response = client.get(ledger_url(cast, event="not-an-event"))
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()


def test_pagination_keeps_filters(cast):
    for i in range(60):
        append_entry(event="bulk.item", consortium_slug=cast.consortium.slug, payload={"i": i})
    client = cast.client_for("admin")
    first = client.get(ledger_url(cast, event="bulk.item"))
    assert len(seqs_on(first)) == 50
    body = first.content.decode()
    assert "page 1 of 2" in body
    assert "?event=bulk.item&amp;page=2" in body
    second = client.get(ledger_url(cast, event="bulk.item", page=2))
    assert len(seqs_on(second)) == 10
    assert set(seqs_on(first)).isdisjoint(seqs_on(second))
    unfiltered = client.get(ledger_url(cast, page=2))
    assert len(seqs_on(unfiltered)) == 13  # 60 + the cast's 3 entries


@pytest.mark.parametrize("who", ALLOWED)
def test_verify_intact_then_tampered(cast, who):
    client = cast.client_for(who)
    response = client.post(verify_url(cast))
    assert response.status_code == 302
    assert response["Location"] == ledger_url(cast)
    page = client.get(response["Location"])
    body = page.content.decode()
    head = LedgerEntry.objects.order_by("-seq").first()
    assert "Intact" in body
    assert f"{head.seq} entries verified" in body
    assert head.entry_hash in body
    assert "msg-success" in body
    # The result is shown once (Post/Redirect/Get), not on every later visit.
    assert "Intact" not in client.get(ledger_url(cast)).content.decode()

    bad = LedgerEntry.objects.get(event="institution.created", institution_slug="hospital-a")
    tamper_payload(bad.seq)
    page = client.post(verify_url(cast), follow=True)
    body = page.content.decode()
    assert page.redirect_chain[-1][1] == 302
    assert "Broken" in body
    assert f"First bad entry: <strong>#{bad.seq}</strong>" in body
    assert "altered" in body
    assert "msg-error" in body


def test_verify_keeps_the_filters(cast):
    client = cast.client_for("auditor")
    response = client.post(
        verify_url(cast), {"next_query": "event=institution.created&evil=1&page=1"}
    )
    assert response["Location"] == ledger_url(cast, event="institution.created", page=1)


def test_verify_needs_csrf(cast):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(cast.auditor)
    assert client.post(verify_url(cast)).status_code == 403


def test_anonymous_is_sent_to_login(cast):
    client = cast.client_for("anonymous")
    for response in (client.get(ledger_url(cast)), client.post(verify_url(cast))):
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))


@pytest.mark.parametrize("who", REFUSED)
def test_others_get_404(cast, who):
    client = cast.client_for(who)
    assert client.get(ledger_url(cast)).status_code == 404
    assert client.post(verify_url(cast)).status_code == 404


@pytest.mark.parametrize("who", ["auditor", "outsider"])
def test_unknown_consortium_is_the_same_404(cast, who):
    client = cast.client_for(who)
    missing = reverse("audit:ledger", kwargs={"slug": "no-such-consortium"})
    assert client.get(missing).status_code == 404
    missing_verify = reverse("audit:ledger-verify", kwargs={"slug": "no-such-consortium"})
    assert client.post(missing_verify).status_code == 404


def test_admin_is_read_only(cast, client, django_user_model):
    # Not pytest-django's admin_client: the cast already has a (non-staff) "admin".
    operator = django_user_model.objects.create_superuser("operator", "op@example.org", "x")
    admin_client = client
    admin_client.force_login(operator)
    entry = LedgerEntry.objects.order_by("seq").first()
    assert admin_client.get(reverse("admin:audit_ledgerentry_changelist")).status_code == 200
    page = admin_client.get(reverse("admin:audit_ledgerentry_change", args=[entry.pk]))
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    assert admin_client.get(reverse("admin:audit_ledgerentry_add")).status_code == 403
    assert (
        admin_client.get(reverse("admin:audit_ledgerentry_delete", args=[entry.pk])).status_code
        == 403
    )
    assert admin_client.get(reverse("admin:audit_ledgerhead_changelist")).status_code == 200
    assert admin_client.post(
        reverse("admin:audit_ledgerentry_change", args=[entry.pk]), {"event": "x"}
    ).status_code in (302, 403)
    entry.refresh_from_db()
    assert entry.event != "x"


def test_the_event_filter_offers_every_event_and_reads_only_new_entries(cast):
    from django.test.utils import CaptureQueriesContext

    from audit.ledger import selectors

    slug = cast.consortium.slug
    first = selectors.ledger_event_names(slug)
    assert "consortium.created" in first and "bench.never" not in first
    append_entry(event="bench.never", consortium_slug=slug)
    append_entry(event="bench.never", consortium_slug="elsewhere")
    assert selectors.ledger_event_names(slug) == sorted({*first, "bench.never"})
    assert "consortium.created" not in selectors.ledger_event_names("elsewhere")
    # A remembered head that is no longer in the ledger (a reset database) starts again.
    seq, _hash, names = selectors._events_seen[slug]
    selectors._events_seen[slug] = (seq, "0" * 64, frozenset({"stale.event"}))
    assert "stale.event" not in selectors.ledger_event_names(slug)
    # Unchanged ledger: a few indexed queries, whatever its length.
    with CaptureQueriesContext(connection) as queries:
        selectors.ledger_event_names(slug)
    assert len(queries) <= 2, [q["sql"] for q in queries.captured_queries]
