"""What the consortium dashboard and the action buttons say and offer must be true (issue 14,
defects 2, 3, 5 and 6), through the pages (Django test client).

- The institutions table's links to a hospital's page are plain links: only the table's search,
  sort links and pager are boosted by htmx (a boosted link to a page without the table swapped in
  nothing). The browser journey is ``tests/web/test_browser_dashboard.py``.
- An approver's *Waiting on you* lists the jobs awaiting their decision, from the approval
  inbox's own selector.
- "Worker key" is the truth of the site's worker credentials, whose keys uploads are verified
  against, not of the key on file on the institution.
- A user is offered "Sign", "Withdraw consent…" and "Review and decide" only when the form would
  have an institution to act for; a superuser who approves for none is refused the forms (404:
  being a superuser grants nothing inside a consortium), and an approver of an institution no
  longer taking part in a job is told on its review form that there is nothing to decide.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from tests.support.agreements import publish_agreement
from tests.support.keys import ed25519_pem
from tests.support.training_fixtures import make_scene
from training.rounds.credentials import site_credential_create, site_credential_revoke


def u(name: str, **kwargs) -> str:
    return reverse(f"consortium:{name}", kwargs=kwargs)


def dashboard(cast, who: str) -> str:
    response = cast.client_for(who).get(u("consortium-detail", slug=cast.consortium.slug))
    assert response.status_code == 200
    return response.content.decode()


def waiting_on_you(page: str) -> str:
    """The *Waiting on you* card's HTML."""
    return page.split('id="pending-h"', 1)[1].split("</section>", 1)[0]


def institutions_row(page: str, name: str) -> str:
    """The institutions table's row of ``name``."""
    table = page.split('id="institutions"', 1)[1].split("</table>", 1)[0]
    return next(row for row in table.split("<tr") if f">{name}</a>" in row)


def worker_key_badge(row: str) -> str:
    """The "Worker key" column's word in a row: ``registered`` or ``missing``."""
    found = re.findall(r'<span class="badge \w+"[^>]*>(registered|missing)</span>', row)
    assert len(found) == 1, row
    return found[0]


def message_texts(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


# --- 2. the hospital links leave the dashboard ---------------------------------------------------


class _BoostedLinks(HTMLParser):
    """Each link's href and whether htmx boosts it (the nearest hx-boost on it or above)."""

    VOID = {"input", "br", "img", "meta", "link", "hr", "col", "source", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []
        self.links: dict[str, bool] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            boosts = [b for _t, b in [*self.stack, (tag, attrs.get("hx-boost"))] if b is not None]
            self.links[attrs["href"]] = bool(boosts) and boosts[-1] == "true"
        if tag not in self.VOID:
            self.stack.append((tag, attrs.get("hx-boost")))

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break


@pytest.mark.parametrize("who", ["admin", "auditor", "steward"])
def test_the_hospital_links_on_the_dashboard_are_not_boosted_but_the_table_controls_are(cast, who):
    parser = _BoostedLinks()
    parser.feed(dashboard(cast, who))
    for institution in (cast.hospital_a, cast.hospital_b):
        href = u("institution-detail", slug=cast.consortium.slug, inst_slug=institution.slug)
        assert parser.links[href] is False, f"{href} is boosted: it would swap in nothing"
    sort_links = [href for href in parser.links if "sort=" in href]
    assert sort_links and all(parser.links[href] for href in sort_links)


# --- 3. the jobs awaiting the approver's decision ------------------------------------------------


def test_an_approvers_dashboard_lists_the_job_awaiting_their_decision(cast):
    scene = make_scene(cast)
    job = scene.propose(user=cast.researcher, title="Tumour classifier")
    review = reverse("training:job-review", args=[cast.consortium.slug, job.pk])

    card = waiting_on_you(dashboard(cast, "approver"))
    assert "Nothing waits on you." not in card
    assert review in card
    assert f"job #{job.pk} “Tumour classifier”" in card and "Hospital A" in card

    # Someone who approves for no participant is not asked; once decided, it is gone.
    assert review not in waiting_on_you(dashboard(cast, "researcher"))
    scene.decide(job, cast.hospital_a)
    assert review not in waiting_on_you(dashboard(cast, "approver"))
    assert review in waiting_on_you(dashboard(cast, "approver_b"))


# --- 5. the worker key is the site's worker credentials -------------------------------------------


def test_worker_key_is_registered_when_an_active_worker_credential_has_one(cast):
    # Hospital A's steward creates its worker's credential with the worker's key, as the demo
    # and the docs do; no key is on file on the institution itself.
    assert not cast.hospital_a.worker_public_key
    credential, _token = site_credential_create(
        acting_user=cast.steward,
        institution=cast.hospital_a,
        label="gpu-node-1",
        public_key=ed25519_pem(),
    )

    page = dashboard(cast, "admin")
    assert worker_key_badge(institutions_row(page, "Hospital A")) == "registered"
    assert worker_key_badge(institutions_row(page, "Hospital B")) == "missing"
    # The consortium's administrator cannot create a site's credentials: not asked to.
    assert "worker credentials" not in waiting_on_you(page).lower()
    assert "Register the worker key" not in page

    steward_card = waiting_on_you(dashboard(cast, "steward"))
    assert "Hospital A" not in steward_card

    detail = cast.client_for("admin").get(
        u("institution-detail", slug=cast.consortium.slug, inst_slug=cast.hospital_a.slug)
    )
    text = detail.content.decode()
    assert "no worker key registered" not in text
    assert detail.context["worker_keys"].signing_keys[0].fingerprint in text
    assert "gpu-node-1" in text

    # Revoked, the site has no key its uploads verify against: missing, and its steward asked.
    site_credential_revoke(acting_user=cast.steward, credential=credential)
    page = dashboard(cast, "admin")
    assert worker_key_badge(institutions_row(page, "Hospital A")) == "missing"
    steward_card = waiting_on_you(dashboard(cast, "steward"))
    credentials = reverse(
        "training:credential-list", args=[cast.consortium.slug, cast.hospital_a.slug]
    )
    assert credentials in steward_card and "Hospital A" in steward_card
    assert "no worker key registered" in (
        cast.client_for("admin")
        .get(u("institution-detail", slug=cast.consortium.slug, inst_slug=cast.hospital_a.slug))
        .content.decode()
    )


# --- 6. offered only what the user can do ---------------------------------------------------------


@pytest.fixture
def superuser_admin(cast):
    """The consortium's admin made a superuser too (as the demo's ``admin`` once was),
    approving for none."""
    cast.admin.is_superuser = True
    cast.admin.save(update_fields=["is_superuser"])
    return cast.admin


def test_a_superuser_who_approves_for_none_is_not_offered_to_sign_or_withdraw(
    cast, superuser_admin
):
    version = publish_agreement(cast)
    agreement = version.agreement
    slug = cast.consortium.slug
    detail = u("agreement-detail", slug=slug, pk=agreement.pk)
    sign = u("version-sign", slug=slug, pk=agreement.pk, number=version.number)
    withdraw = u("agreement-withdraw", slug=slug, pk=agreement.pk)
    admin = cast.client_for("admin")

    page = admin.get(detail).content.decode()
    assert sign not in page and "Sign version" not in page
    assert withdraw not in page and "Withdraw consent" not in page
    version_page = admin.get(
        u("version-detail", slug=slug, pk=agreement.pk, number=version.number)
    ).content.decode()
    assert sign not in version_page
    assert "Sign version" not in waiting_on_you(dashboard(cast, "admin"))

    # The forms, reached directly, are not theirs: being a superuser grants no right to act
    # for an institution (consortium.core.access), so the same 404 as for any non-approver.
    for url in (sign, withdraw):
        for response in (admin.get(url), admin.post(url, {})):
            assert response.status_code == 404
    assert not version.signatures.exists() and not agreement.withdrawals.exists()

    # Whoever approves for an institution is still offered both.
    approver_page = cast.client_for("approver").get(detail).content.decode()
    assert sign in approver_page and withdraw in approver_page
    assert cast.client_for("approver").get(sign).status_code == 200


def test_sign_is_no_longer_offered_once_every_institution_of_the_approver_signed(cast):
    from tests.support.agreements import sign as sign_version

    version = publish_agreement(cast)
    detail = u("agreement-detail", slug=cast.consortium.slug, pk=version.agreement.pk)
    sign_version(version, cast.approver, cast.hospital_a)
    assert "Sign version" not in cast.client_for("approver").get(detail).content.decode()
    assert "Sign version" in cast.client_for("approver_b").get(detail).content.decode()


def test_a_superuser_who_approves_for_none_is_not_offered_to_review_a_job(cast, superuser_admin):
    scene = make_scene(cast)
    job = scene.propose(user=cast.researcher)
    slug = cast.consortium.slug
    detail = reverse("training:job-detail", args=[slug, job.pk])
    review = reverse("training:job-review", args=[slug, job.pk])
    admin = cast.client_for("admin")

    page = admin.get(detail).content.decode()
    assert review not in page and "Review and decide" not in page
    for response in (admin.get(review), admin.post(review, {"decision": "approved"})):
        assert response.status_code == 404
    assert not job.approvals.exists()

    # An approver of an institution no longer taking part passes the rule (it admits every
    # participant's approvers) but has nothing to decide: told so, not shown an empty form.
    job.participants.filter(institution=cast.hospital_b).update(status="removed")
    approver_b = cast.client_for("approver_b")
    for response in (approver_b.get(review), approver_b.post(review, {"decision": "approved"})):
        assert response.status_code == 302 and response.url == detail
        assert any("nothing for you to decide" in m for m in message_texts(response))
    assert not job.approvals.exists()

    # The approver is offered it until they decided.
    assert review in cast.client_for("approver").get(detail).content.decode()
    scene.decide(job, cast.hospital_a)
    assert "Review and decide" not in cast.client_for("approver").get(detail).content.decode()
