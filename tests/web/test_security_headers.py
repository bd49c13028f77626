"""Every page carries the Content-Security-Policy and the Permissions-Policy, and none needs
the policy to allow inline code: no ``<script>`` without ``src`` (other than the
``application/json`` data of ``json_script``), no ``<style>`` element, no ``on*=`` handler, no
``style=`` attribute, no ``javascript:`` link (``consortium.core.security_headers``).

The pages are found by following links, as each role, from the pages they start on (one page
of each route per role, so every page type is visited without reading every round of every
job), plus the pages no link reaches by itself (the job comparison, the API docs, the admin
site, a 404)."""

from __future__ import annotations

from collections import deque
from html.parser import HTMLParser
from urllib.parse import urldefrag, urlsplit

import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.urls import Resolver404, resolve, reverse

from tests.support.fl_harness import use_artifact_folder
from tests.support.job_page_fixtures import job_with_rounds
from tests.support.training_fixtures import make_scene

#: What the policy must say, whatever else it says (the settings' policy is the site's).
EXPECTED_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws://testserver; font-src 'self'; object-src 'none'; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
#: Never followed: they act (sign out) or are not pages.
SKIP_PREFIXES = ("/static/", "/accounts/logout/", "/media/", "/metrics", "/ws/")
PER_ROUTE = 1
MAX_PAGES = 400


class _InlineCode(HTMLParser):
    """Collects what a strict CSP refuses, and the page's links."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.links: list[str] = []
        self._script_inline = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"<{tag} {name}=...> (an inline event handler)")
            if name == "style":
                self.problems.append(f"<{tag} style={value!r}> (an inline style)")
            url = (value or "").strip().lower()
            if name in ("href", "src", "action", "formaction") and url.startswith("javascript:"):
                self.problems.append(f"<{tag} {name}={value!r}> (a javascript: URL)")
        if tag == "script":
            kind = (a.get("type") or "").strip().lower()
            self._script_inline = "src" not in a and kind != "application/json"
            if self._script_inline:
                self.problems.append(f"<script {a}> without src (an inline script)")
        if tag == "style":
            self.problems.append("<style> element (an inline style sheet)")
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])


def inline_code(html: str) -> tuple[list[str], list[str]]:
    """``(problems, links)`` of a page's HTML."""
    parser = _InlineCode()
    parser.feed(html)
    return parser.problems, parser.links


def _route_of(path: str) -> str | None:
    try:
        match = resolve(path)
    except Resolver404:
        return None
    return f"{match.namespace}:{match.url_name}:{match.route}"


def _crawl(client: Client, seeds: list[str]) -> dict[str, object]:
    """The HTML pages reached from ``seeds``, one per route (path -> response)."""
    seen_routes: dict[str, int] = {}
    visited: set[str] = set()
    pages: dict[str, object] = {}
    queue = deque(seeds)
    while queue and len(pages) < MAX_PAGES:
        url = urldefrag(queue.popleft())[0]
        parts = urlsplit(url)
        if parts.scheme or parts.netloc or not parts.path.startswith("/"):
            continue
        if url in visited or parts.path.startswith(SKIP_PREFIXES):
            continue
        visited.add(url)
        route = _route_of(parts.path)
        if url not in seeds and (route is None or seen_routes.get(route, 0) >= PER_ROUTE):
            continue
        seen_routes[route or url] = seen_routes.get(route or url, 0) + 1
        response = client.get(url)
        if not response.get("Content-Type", "").startswith("text/html"):
            _assert_headers(url, response)
            continue
        pages[url] = response
        _problems, links = inline_code(response.content.decode())
        queue.extend(links)
    return pages


def _assert_headers(url: str, response) -> None:
    assert response["Content-Security-Policy"] == EXPECTED_CSP, url
    policy = response["Permissions-Policy"]
    for feature in ("camera=()", "microphone=()", "geolocation=()", "payment=()", "usb=()"):
        assert feature in policy, (url, policy)


@pytest.fixture
def world(cast, settings, tmp_path):
    use_artifact_folder(settings, tmp_path / "artifacts")
    scene = make_scene(cast)
    proposed = scene.propose(title="Waiting for approvals")
    done = job_with_rounds(scene, rounds=3)
    return cast, proposed, done


def test_every_page_type_carries_the_policies_and_no_inline_code(world, django_user_model):
    cast, proposed, done = world
    c = cast.consortium.slug
    compare = reverse("training:job-compare", args=[c]) + f"?jobs={proposed.pk}&jobs={done.pk}"
    seeds = {
        "admin": ["/", f"/consortia/{c}/", f"/consortia/{c}/jobs/", compare],
        "auditor": ["/", f"/consortia/{c}/ledger/"],
        "approver": ["/", f"/consortia/{c}/approvals/"],
        "steward": ["/"],
        "researcher": ["/", f"/consortia/{c}/jobs/{done.pk}/"],
        "outsider": ["/", f"/consortia/{c}/"],  # the latter a 404, in the app's layout
        None: ["/accounts/login/", "/api/docs/", "/no-such-page/", "/accounts/password/reset/"],
    }
    checked: dict[str, list[str]] = {}
    for who, starts in seeds.items():
        pages = _crawl(cast.client_for(who), starts)
        for url, response in pages.items():
            _assert_headers(url, response)
            problems, _links = inline_code(response.content.decode())
            assert problems == [], (who, url, problems)
        checked[str(who)] = list(pages)
    # The superuser's admin site (Django's own templates).
    root = django_user_model.objects.create_superuser("root", "root@example.org", "x" * 12)
    operator = Client()
    operator.force_login(root)
    admin_pages = _crawl(
        operator, ["/admin/", "/admin/auth/user/", f"/admin/auth/user/{root.pk}/change/"]
    )
    for url, response in admin_pages.items():
        _assert_headers(url, response)
        problems, _links = inline_code(response.content.decode())
        assert problems == [], ("superuser", url, problems)

    every = {url for urls in checked.values() for url in urls} | set(admin_pages)
    # The crawl reached the pages whose scripts were moved out, and the error page.
    for must in (
        f"/consortia/{c}/jobs/{done.pk}/",  # live page, charts
        f"/consortia/{c}/jobs/new/",  # the job form
        compare,  # the comparison's chart
        f"/consortia/{c}/",  # the consortium's live panel
        "/no-such-page/",
        "/api/docs/",
    ):
        assert must in every, (must, sorted(every))
    assert len(every) >= 30, sorted(every)


def test_the_scan_finds_what_the_policy_refuses():
    problems, _ = inline_code(
        '<script>alert(1)</script><script type="application/json">{}</script>'
        '<script src="/static/x.js"></script><a href="javascript:void(0)" onclick="f()">x</a>'
        '<div style="color:red"></div><style>p{}</style>'
    )
    assert len(problems) == 5, problems
    assert inline_code('<script src="/static/a.js" defer></script>')[0] == []


def test_a_response_with_its_own_policy_keeps_it(rf):
    """A view that sets its own header keeps it; the other header is still added."""
    from django.http import HttpResponse

    from consortium.core.security_headers import SecurityHeadersMiddleware

    def view(request):
        response = HttpResponse("x")
        response["Content-Security-Policy"] = "default-src 'none'"
        return response

    response = SecurityHeadersMiddleware(view)(rf.get("/x/"))
    assert response["Content-Security-Policy"] == "default-src 'none'"
    assert response["Permissions-Policy"].startswith("accelerometer=()")


def test_the_websocket_origin_follows_the_scheme(rf, settings):
    from django.http import HttpResponse

    from consortium.core.security_headers import SecurityHeadersMiddleware

    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    middleware = SecurityHeadersMiddleware(lambda request: HttpResponse("x"))
    secure = middleware(rf.get("/", HTTP_X_FORWARDED_PROTO="https", SERVER_PORT="443"))
    assert "connect-src 'self' wss://testserver;" in secure["Content-Security-Policy"]
    assert django_settings.CONTENT_SECURITY_POLICY["frame-ancestors"] == ["'none'"]
