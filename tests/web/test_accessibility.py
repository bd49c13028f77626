"""Every field of every form page has a label: a ``<label for>``, a wrapping ``<label>``, or an
``aria-label`` (screen readers announce it; Playwright's ``get_by_label`` finds it)."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from tests.support.training_fixtures import make_scene

UNLABELLED_TYPES = {"hidden", "submit", "button", "reset", "image"}


class _Fields(HTMLParser):
    def __init__(self):
        super().__init__()
        self.label_for: set[str] = set()
        self.fields: list[tuple[str, dict, bool]] = []  # (tag, attrs, inside a <label>)
        self._in_label = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "label":
            self._in_label += 1
            if a.get("for"):
                self.label_for.add(a["for"])
        elif tag in ("input", "select", "textarea"):
            if tag == "input" and (a.get("type") or "text") in UNLABELLED_TYPES:
                return
            self.fields.append((tag, a, self._in_label > 0))

    def handle_endtag(self, tag):
        if tag == "label" and self._in_label:
            self._in_label -= 1


def unlabelled(html: str) -> list[str]:
    parser = _Fields()
    parser.feed(html)
    return [
        f"<{tag} name={a.get('name')!r} id={a.get('id')!r}>"
        for tag, a, wrapped in parser.fields
        if not wrapped and not a.get("aria-label") and a.get("id") not in parser.label_for
    ]


@pytest.fixture
def scene(cast):
    return make_scene(cast)


def test_every_field_of_the_form_pages_has_a_label(cast, scene):
    job = scene.propose()
    c = cast.consortium.slug
    version = scene.version
    pages = {
        "admin": [
            f"/consortia/{c}/",
            f"/consortia/{c}/jobs/",
            f"/consortia/{c}/jobs/new/",
            f"/consortia/{c}/jobs/{job.pk}/edit/",
            f"/consortia/{c}/jobs/{job.pk}/cancel/",
            f"/consortia/{c}/institutions/new/",
            f"/consortia/{c}/members/invite/",
            f"/consortia/{c}/agreements/new/",
            f"/consortia/{c}/ledger/",
            f"/consortia/{c}/jobs/{job.pk}/report/",
        ],
        "approver": [
            f"/consortia/{c}/jobs/{job.pk}/review/",
            f"/consortia/{c}/approvals/",
            f"/consortia/{c}/agreements/{version.agreement_id}/withdraw/",
        ],
        "steward": [f"/consortia/{c}/institutions/{cast.hospital_a.slug}/datasets/new/"],
        None: ["/accounts/login/"],
    }
    checked = 0
    for who, urls in pages.items():
        client = cast.client_for(who)
        for url in urls:
            response = client.get(url)
            assert response.status_code == 200, (who, url, response.status_code)
            assert unlabelled(response.content.decode()) == [], (who, url)
            checked += 1
    assert checked == sum(len(u) for u in pages.values())


def test_the_check_finds_an_unlabelled_field():
    assert unlabelled('<input name="q" id="q">') == ["<input name='q' id='q'>"]
    assert unlabelled('<label for="q">Find</label><input name="q" id="q">') == []
    assert unlabelled('<label>Find <select name="s"></select></label>') == []
    assert unlabelled('<input type="hidden" name="csrf">') == []
