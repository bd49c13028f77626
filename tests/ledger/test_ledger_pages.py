"""The auditor's ledger page and its verify button, as every persona."""

import datetime as dt
import html
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from audit.ledger.chain import append_entry
from audit.ledger.selectors import consortium_entries
from audit.models import LedgerEntry
from consortium.core.keyset import keyset_page
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


def own_seqs(cast, **filters) -> list[int]:
    """The consortium's entries (matching ``filters``), newest first: what paging must show."""
    entries = LedgerEntry.objects.filter(consortium_slug=cast.consortium.slug, **filters)
    return list(entries.order_by("-seq").values_list("seq", flat=True))


def link(response, label: str) -> str | None:
    """The query string of the pager's link named ``label`` (Newer, Older...), unescaped ("" for
    the page's own URL without one); None when the page has no such link."""
    path = response.wsgi_request.path
    found = re.search(rf'<a href="{path}(\?[^"]*)?"[^>]*>{label}</a>', response.content.decode())
    if found is None:
        return None
    query = html.unescape(found.group(1) or "")
    return "" if query == "?" else query


def append_bulk(cast, count: int, *, every_other_elsewhere: bool = False) -> None:
    for i in range(count):
        event = "bulk.odd" if i % 2 else "bulk.even"
        append_entry(event=event, consortium_slug=cast.consortium.slug, payload={"i": i})
        if every_other_elsewhere and i % 2:
            append_entry(event="bulk.odd", consortium_slug="someone-else", payload={"i": i})


def test_paging_older_then_newer_shows_every_entry_once_in_order(cast):
    append_bulk(cast, 120, every_other_elsewhere=True)
    client = cast.client_for("auditor")
    expected = own_seqs(cast)
    assert len(expected) == 123  # 120 + the cast's 3 entries
    response, seen, pages = client.get(ledger_url(cast)), [], []
    while True:
        assert response.status_code == 200
        pages.append(seqs_on(response))
        seen += pages[-1]
        older = link(response, "Older")
        if older is None:
            break
        response = client.get(ledger_url(cast) + older)
    assert seen == expected  # every entry exactly once, newest first
    assert [len(p) for p in pages] == [50, 50, 23]
    body = response.content.decode()
    assert f"Entries #{expected[100]} to #{expected[-1]}, the oldest." in body
    assert link(response, "Newest") == ""  # back to the newest, no position
    # And back up through the Newer links: the same pages, in reverse.
    back = []
    while (newer := link(response, "Newer")) is not None:
        response = client.get(ledger_url(cast) + newer)
        back.append(seqs_on(response))
    assert back == pages[-2::-1]
    assert link(response, "Newer") is None and link(response, "Older") is not None
    first = client.get(ledger_url(cast))
    assert f"Entries #{expected[0]} to #{expected[49]}, the newest." in first.content.decode()
    assert link(first, "Newer") is None and link(first, "Newest") is None
    assert link(first, "Older") == f"?before={expected[49]}"
    # The oldest page: the first fifty entries, from ?after=0.
    assert link(first, "Oldest") == "?after=0"
    oldest = client.get(ledger_url(cast, after=0))
    assert seqs_on(oldest) == expected[-50:]
    assert link(oldest, "Older") is None and link(oldest, "Newer") == f"?after={expected[-50]}"


def test_a_small_ledger_has_no_pager(cast):
    response = cast.client_for("auditor").get(ledger_url(cast))
    body = response.content.decode()
    seqs = own_seqs(cast)
    assert f"Entries #{seqs[0]} to #{seqs[-1]} (all of them)." in body
    assert 'aria-label="Ledger pages"' not in body


def test_filters_and_keyset_together(cast):
    append_bulk(cast, 130)
    client = cast.client_for("admin")
    expected = own_seqs(cast, event="bulk.odd")  # 65 of them
    first = client.get(ledger_url(cast, event="bulk.odd"))
    assert seqs_on(first) == expected[:50]
    older = link(first, "Older")
    assert older == f"?event=bulk.odd&before={expected[49]}"  # the filter is kept
    second = client.get(ledger_url(cast) + older)
    assert seqs_on(second) == expected[50:]
    assert '<option value="bulk.odd" selected>' in second.content.decode()
    assert link(second, "Newer") == f"?event=bulk.odd&after={expected[50]}"
    assert seqs_on(client.get(ledger_url(cast) + link(second, "Newer"))) == expected[:50]
    # A position between two matching entries: the page starts at the next match.
    assert (
        seqs_on(client.get(ledger_url(cast, event="bulk.odd", before=expected[49] + 1)))
        == (expected[49:99])
    )
    # The date filters too: none of the entries is from tomorrow.
    tomorrow = dt.date.today() + dt.timedelta(days=1)
    empty = client.get(ledger_url(cast, date_from=tomorrow, before=expected[0]))
    assert seqs_on(empty) == []
    assert f"No entries before #{expected[0]} match these filters." in empty.content.decode()


@pytest.mark.parametrize(
    "query",
    [
        "before=abc",
        "before=-1",
        "after=1.5",
        "before=99999999999999999999999",
        f"after={2**63}",
        "before=5&after=2",
    ],
)
def test_a_bad_position_is_an_error_above_the_newest_entries(cast, query):
    append_bulk(cast, 60)
    response = cast.client_for("auditor").get(f"{ledger_url(cast)}?event=bulk.odd&{query}")
    assert response.status_code == 200
    body = response.content.decode()
    assert 'id="position-errors"' in body
    assert "The newest entries are shown." in body
    if "&" in query:
        assert "Give “before” or “after”, not both." in body
    else:
        name = query.split("=")[0]
        assert f"“{name}” must be an entry number, a whole number from 0 to" in body
    assert seqs_on(response) == own_seqs(cast, event="bulk.odd")  # the filter still applies


def test_a_position_past_either_end_shows_an_empty_page(cast):
    client = cast.client_for("auditor")
    seqs = own_seqs(cast)
    before_all = client.get(ledger_url(cast, before=seqs[-1]))
    assert seqs_on(before_all) == []
    assert f"No entries before #{seqs[-1]}." in before_all.content.decode()
    assert link(before_all, "Newest") == ""
    after_all = client.get(ledger_url(cast, after=seqs[0]))
    assert seqs_on(after_all) == []
    assert f"No entries after #{seqs[0]}." in after_all.content.decode()
    assert link(after_all, "Newest") == ""
    assert seqs_on(client.get(ledger_url(cast, before=2**63 - 1))) == seqs  # the largest allowed


def test_keyset_page_reads_either_side_of_a_key(cast):
    append_bulk(cast, 10)
    entries = consortium_entries(cast.consortium.slug)
    seqs = own_seqs(cast)  # 13, newest first
    newest = keyset_page(entries, key="seq", size=5)
    assert [e.seq for e in newest.items] == seqs[:5]
    assert (newest.has_newer, newest.has_older, newest.positioned) == (False, True, False)
    assert (newest.newest_key, newest.oldest_key) == (seqs[0], seqs[4])
    older = keyset_page(entries, key="seq", size=5, before=newest.oldest_key)
    assert [e.seq for e in older.items] == seqs[5:10]
    assert (older.has_newer, older.has_older) == (True, True)
    back = keyset_page(entries, key="seq", size=5, after=older.newest_key)
    assert [e.seq for e in back.items] == seqs[:5] and not back.has_newer and back.has_older
    last = keyset_page(entries, key="seq", size=5, before=older.oldest_key)
    assert [e.seq for e in last.items] == seqs[10:] and last.has_newer and not last.has_older
    with pytest.raises(ValueError):
        keyset_page(entries, key="seq", size=5, before=3, after=1)


def entries_page_queries(cast, client, url) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return [q["sql"] for q in queries.captured_queries]


def test_each_page_makes_the_same_queries_whatever_the_ledgers_length_and_no_count(cast):
    client = cast.client_for("auditor")

    def positions() -> dict[str, str]:
        seqs = own_seqs(cast)
        return {
            "newest": ledger_url(cast),
            "older": ledger_url(cast, before=seqs[50]),
            "newer": ledger_url(cast, after=seqs[-50]),
            "oldest": ledger_url(cast, after=0),
            "filtered": ledger_url(cast, event="bulk.odd", before=seqs[10]),
        }

    append_bulk(cast, 60)
    client.get(ledger_url(cast))  # the event names are remembered after the first view
    small = {name: entries_page_queries(cast, client, url) for name, url in positions().items()}
    append_bulk(cast, 540)
    client.get(ledger_url(cast))
    large = {name: entries_page_queries(cast, client, url) for name, url in positions().items()}
    for name in small:
        assert len(large[name]) == len(small[name]), (name, large[name])
        # No count of the entries (the header's unread-notifications badge counts the user's).
        counts = [sql for sql in large[name] if "COUNT(" in sql.upper() and "ledgerentry" in sql]
        assert not counts, (name, counts)
    # The page itself: one query for the newest entries, one more (an EXISTS) elsewhere.
    assert len(small["older"]) == len(small["newest"]) + 1


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


def test_verify_keeps_the_filters_and_the_position(cast):
    client = cast.client_for("auditor")
    response = client.post(
        verify_url(cast), {"next_query": "event=institution.created&evil=1&page=2&before=3"}
    )
    assert response["Location"] == ledger_url(cast, event="institution.created", before=3)
    response = client.post(verify_url(cast), {"next_query": "after=0"})
    assert response["Location"] == ledger_url(cast, after=0)


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
