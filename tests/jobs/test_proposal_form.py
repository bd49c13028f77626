"""The proposal form starts from a job the agreement in force accepts, shows the agreement's
terms beside it, and projects each participant's privacy budget before anything is proposed.

Issue 14, defect 4: the form's pre-filled pipeline used Gaussian noise whatever the agreement
required, so under the demo's agreement (DP-SGD required) a new administrator who proposed
the form as it came was refused. Each test here posts the form exactly as a browser would send
it, with the values the page rendered.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from consortium.governance.models import Consortium
from tests.support.agreements import agreement_in_force
from tests.support.training_pages import steward_registers_datasets
from training.demo.scenario import propose_demo_job
from training.demo.seed import DEMO_SLUG, seed_demo_consortium
from training.jobs.compliance import check_job_compliance
from training.jobs.proposal_guidance import (
    pipeline_for_terms,
    proposal_budget_preview,
    proposal_defaults,
)
from training.jobs.spec import dp_mechanisms, shared_fraction, validate_spec
from training.models import JobState, TrainingJob

pytestmark = pytest.mark.django_db


class _FormValues(HTMLParser):
    """The name/value pairs a browser submits for each POST form of the page, without any
    submit button (the test adds the one it presses)."""

    def __init__(self):
        super().__init__()
        self.forms: list[list[tuple[str, str]]] = []
        self.pairs: list[tuple[str, str]] = []
        self._in_form = False
        self._select: str | None = None
        self._option: str | None = None
        self._option_selected = False
        self._textarea: str | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and (a.get("method") or "").lower() == "post":
            self._in_form, self.pairs = True, []
            self.forms.append(self.pairs)
        if not self._in_form:
            return
        if tag == "input" and a.get("name"):
            kind = (a.get("type") or "text").lower()
            if kind in ("submit", "button", "image", "reset"):
                return
            if kind in ("checkbox", "radio"):
                if "checked" in a:
                    self.pairs.append((a["name"], a.get("value", "on")))
                return
            self.pairs.append((a["name"], a.get("value") or ""))
        elif tag == "select":
            self._select = a.get("name")
        elif tag == "option" and self._select:
            self._option = a.get("value", "")
            if "selected" in a:
                self.pairs.append((self._select, self._option))
        elif tag == "textarea":
            self._textarea, self._text = a.get("name"), ""

    def handle_data(self, data):
        if self._textarea is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "textarea" and self._textarea is not None:
            text = self._text[1:] if self._text.startswith("\n") else self._text
            self.pairs.append((self._textarea, text))
            self._textarea = None
        elif tag == "select":
            self._select = None
        elif tag == "form" and self._in_form:
            self._in_form = False


def form_values(response) -> dict[str, list[str]]:
    import html

    parser = _FormValues()
    parser.feed(response.content.decode())
    values: dict[str, list[str]] = {}
    # The page's largest form is the job form (the top bar's "Sign out" is one too).
    for name, value in max(parser.forms, key=len):
        values.setdefault(name, []).append(html.unescape(value))
    return values


def text_of(response) -> str:
    import html

    body = re.sub(r"<(script|style)\b.*?</\1>", " ", response.content.decode(), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


def propose_form_as_it_comes(client, create_url):
    """GET the form, POST what it rendered, pressing "Propose for approval"."""
    page = client.get(create_url)
    assert page.status_code == 200
    values = form_values(page)
    assert values.get("title") and values["title"] != [""], "the form starts without a title"
    return values, client.post(create_url, {**values, "action": "propose"})


def assert_proposed(response, consortium):
    assert response.status_code == 302, text_of(response)[:3000]
    job = TrainingJob.objects.get(consortium=consortium)
    assert job.state == JobState.AWAITING_APPROVAL
    assert response.url == reverse("training:job-detail", args=[consortium.slug, job.pk])
    return job


# --- defect 4: the form as it comes is accepted -------------------------------------------


def test_demo_administrators_first_proposal_with_the_forms_defaults_is_accepted():
    """The demo's agreement requires DP-SGD: the form's pipeline has it, and the job the form
    offers is proposed (awaiting the hospitals' approvers), not refused."""
    seed_demo_consortium(password="demo-pass-123")
    consortium = Consortium.objects.get(slug=DEMO_SLUG)
    client = Client()
    client.force_login(get_user_model().objects.get(username="admin"))
    create_url = reverse("training:job-create", args=[consortium.slug])

    _values, response = propose_form_as_it_comes(client, create_url)

    job = assert_proposed(response, consortium)
    assert "dp_sgd" in dp_mechanisms(job.spec)
    assert shared_fraction(job.spec) <= 0.4
    assert sorted(job.spec["participants"]) == sorted(
        ["st-thomas", "kings-regional", "maudsley", "barts"]
    )


def test_demo_proposal_keeping_the_prefilled_privacy_pipeline_is_accepted():
    """What the issue saw: an administrator types the job (title, hospitals, data set, model,
    rounds) and keeps the privacy pipeline the form offers. It used to hold Gaussian noise
    where the demo's agreement requires DP-SGD, and the proposal was refused."""
    seed_demo_consortium(password="demo-pass-123")
    consortium = Consortium.objects.get(slug=DEMO_SLUG)
    client = Client()
    client.force_login(get_user_model().objects.get(username="admin"))
    create_url = reverse("training:job-create", args=[consortium.slug])
    values = form_values(client.get(create_url))
    typed = {
        "title": "My first digits job",
        "participants": ["st-thomas", "kings-regional", "maudsley", "barts"],
        "dataset_key": "digits",
        "purpose": "classification",
        "model": "logistic_regression",
        "topology": "fedavg",
        "rounds": "5",
    }

    response = client.post(create_url, {**values, **typed, "action": "propose"})

    assert "breaks the agreement" not in text_of(response)
    job = assert_proposed(response, consortium)
    assert job.spec["privacy_pipeline"][0]["filter"] == "dp_sgd"


def test_the_forms_defaults_still_fit_after_the_demo_job_spent_budget():
    """``manage.py demo`` has already reserved ε for its own job: the defaults fit what is
    left, by the same accountant the proposal meets."""
    seed_demo_consortium(password="demo-pass-123")
    consortium = Consortium.objects.get(slug=DEMO_SLUG)
    propose_demo_job(consortium, dataset="digits", rounds=5, noise_multiplier=2.5)
    client = Client()
    client.force_login(get_user_model().objects.get(username="admin"))

    page = client.get(reverse("training:job-create", args=[consortium.slug]))
    values = form_values(page)
    response = client.post(page.request["PATH_INFO"], {**values, "action": "propose"})

    assert response.status_code == 302, text_of(response)[:3000]
    assert TrainingJob.objects.filter(consortium=consortium).count() == 2


AGREEMENT_SHAPES = {
    # tests/support/agreements.TERMS: Gaussian noise required, 40% shared.
    "gaussian-required": {},
    "dp-sgd-required": {"required_dp_mechanism": "dp_sgd"},
    "laplace-required": {"required_dp_mechanism": "laplace", "max_shared_fraction": "0.25"},
    "svt-required": {"required_dp_mechanism": "svt", "max_shared_fraction": "0.1"},
    "nothing-required-everything-shared": {
        "required_dp_mechanism": "none",
        "max_shared_fraction": "1",
    },
    "linear-models-only-small-cap": {
        "permitted_model_families": ["linear"],
        "epsilon_cap": "1",
    },
}


@pytest.mark.parametrize("terms", AGREEMENT_SHAPES.values(), ids=AGREEMENT_SHAPES.keys())
def test_the_forms_defaults_keep_any_agreements_terms(cast, terms):
    version = agreement_in_force(cast, **terms)
    steward_registers_datasets(cast)
    create_url = reverse("training:job-create", args=[cast.consortium.slug])

    _values, response = propose_form_as_it_comes(cast.client_for("admin"), create_url)

    job = assert_proposed(response, cast.consortium)
    required = version.required_dp_mechanism
    if required != "none":
        assert required in dp_mechanisms(job.spec)
    assert shared_fraction(job.spec) <= float(version.max_shared_fraction)
    assert sorted(job.spec["participants"]) == sorted([cast.hospital_a.slug, cast.hospital_b.slug])


def test_without_a_data_set_the_form_says_what_is_missing(cast):
    agreement_in_force(cast)
    page = cast.client_for("admin").get(reverse("training:job-create", args=[cast.consortium.slug]))
    assert page.status_code == 200
    assert "a data steward registers one first" in text_of(page)


def noise_of(spec) -> list[float]:
    return [f["noise_multiplier"] for f in spec["privacy_pipeline"] if "noise_multiplier" in f]


def test_defaults_add_noise_until_a_spent_budget_fits(cast):
    """Most of hospital A's budget is reserved by an earlier job: the defaults add noise
    rather than offer a job its cap refuses."""
    agreement_in_force(cast, epsilon_cap="3")
    steward_registers_datasets(cast)
    first = proposal_defaults(consortium=cast.consortium)
    assert first.complies
    client = cast.client_for("admin")
    create_url = reverse("training:job-create", args=[cast.consortium.slug])
    assert_proposed(propose_form_as_it_comes(client, create_url)[1], cast.consortium)

    second = proposal_defaults(consortium=cast.consortium)

    assert second.complies, second.notes
    assert noise_of(second.spec) > noise_of(first.spec)
    report = check_job_compliance(consortium=cast.consortium, spec=validate_spec(second.spec))
    assert report.ok, [p.message for p in report.problems]


@pytest.mark.parametrize("mechanism", ["none", "laplace", "gaussian", "svt", "dp_sgd"])
def test_pipeline_for_terms_meets_the_privacy_floor(mechanism):
    pipeline = pipeline_for_terms(required_mechanism=mechanism, max_shared_fraction="0.3")
    spec = {"privacy_pipeline": pipeline}
    assert shared_fraction(spec) <= 0.3
    assert dp_mechanisms(spec) == {"gaussian" if mechanism == "none" else mechanism}


# --- a. the agreement's terms beside the form ------------------------------------------


def test_the_agreements_terms_are_shown_beside_the_form(cast):
    version = agreement_in_force(cast, title="Tumour DUA")
    page = cast.client_for("admin").get(reverse("training:job-create", args=[cast.consortium.slug]))
    text = text_of(page)
    assert 'id="proposal-terms"' in page.content.decode()
    assert f"Tumour DUA, version {version.number}" in text
    assert "Required DP mechanism Gaussian noise" in text
    assert "ε cap per institution 8" in text
    assert "Permitted purposes classification" in text
    assert "Institutions that may take part Hospital A, Hospital B" in text


def test_without_an_agreement_the_form_says_none_is_in_force(cast):
    page = cast.client_for("admin").get(reverse("training:job-create", args=[cast.consortium.slug]))
    assert page.status_code == 200
    assert "No data-use agreement is in force" in text_of(page)


# --- b. the projected budget before proposing --------------------------------------------


def test_budget_preview_is_the_compliance_checks_projection(cast):
    agreement_in_force(cast)
    steward_registers_datasets(cast)
    spec = proposal_defaults(consortium=cast.consortium).spec

    preview = proposal_budget_preview(consortium=cast.consortium, spec=spec)

    report = check_job_compliance(consortium=cast.consortium, spec=validate_spec(spec))
    assert preview.ok
    assert [(r.institution, r.projected, r.cap, r.fits) for r in preview.rows] == sorted(
        (report.institutions[slug].name, p.projected, p.cap, p.fits)
        for slug, p in report.projections.items()
    )


def test_budget_preview_names_an_institution_over_its_cap(cast):
    agreement_in_force(cast)
    steward_registers_datasets(cast)
    spec = proposal_defaults(consortium=cast.consortium).spec
    for f in spec["privacy_pipeline"]:
        if f["filter"] == "gaussian_noise":
            f["noise_multiplier"] = 0.3
    spec["rounds"] = 50

    preview = proposal_budget_preview(consortium=cast.consortium, spec=spec)

    assert not preview.ok
    assert {r.institution for r in preview.rows if not r.fits} == {"Hospital A", "Hospital B"}
    assert {p.term for p in preview.problems} == {"budget"}


def test_budget_preview_of_an_invalid_spec_says_what_is_wrong(cast):
    agreement_in_force(cast)
    preview = proposal_budget_preview(
        consortium=cast.consortium, spec={"participants": [], "rounds": 0}
    )
    assert preview.spec_errors and not preview.rows


def test_the_form_opens_with_each_institutions_projection(cast):
    agreement_in_force(cast)
    steward_registers_datasets(cast)
    page = cast.client_for("admin").get(reverse("training:job-create", args=[cast.consortium.slug]))
    text = text_of(page)
    assert 'id="proposal-budget-table"' in page.content.decode()
    assert re.search(r"Hospital A [\d.]+ [\d.]+ [\d.]+ 8\.00 fits", text), text
    assert "This job keeps the agreement's terms and every participant's budget." in text


def test_check_button_shows_the_budget_and_proposes_nothing(cast):
    """Without JavaScript: "Check privacy budget" re-renders the form, as typed, with the
    projection; nothing is created."""
    agreement_in_force(cast)
    steward_registers_datasets(cast)
    client = cast.client_for("admin")
    create_url = reverse("training:job-create", args=[cast.consortium.slug])
    values = form_values(client.get(create_url))
    values["rounds"] = ["400"]

    response = client.post(create_url, {**values, "action": "check"})

    assert response.status_code == 200
    assert not TrainingJob.objects.exists()
    text = text_of(response)
    assert "exceeds the cap" in text
    assert "Proposed as it is, this job would be refused" in text
    assert form_values(response)["rounds"] == ["400"]


def test_htmx_endpoint_renders_the_budget_table(cast):
    agreement_in_force(cast)
    steward_registers_datasets(cast)
    client = cast.client_for("admin")
    create_url = reverse("training:job-create", args=[cast.consortium.slug])
    values = form_values(client.get(create_url))
    budget_url = reverse("training:job-create-budget", args=[cast.consortium.slug])
    assert f'hx-post="{budget_url}"' in client.get(create_url).content.decode()

    response = client.post(budget_url, values, HTTP_HX_REQUEST="true")

    assert response.status_code == 200
    body = response.content.decode()
    assert "<html" not in body
    assert 'id="proposal-budget-table"' in body
    assert not TrainingJob.objects.exists()

    incomplete = client.post(budget_url, {**values, "title": "", "rounds": "x"})
    assert incomplete.status_code == 200
    assert "Rounds" in text_of(incomplete)


def test_the_budget_check_warns_that_svt_at_a_full_share_leaves_coordinates_unshared(cast):
    """Issue 15: SVT at a share of 100% shares far from everything and charges every pass; the
    proposer reads it before proposing, beside the projected budget."""
    agreement_in_force(cast)
    steward_registers_datasets(cast)
    client = cast.client_for("admin")
    values = form_values(client.get(reverse("training:job-create", args=[cast.consortium.slug])))
    budget_url = reverse("training:job-create-budget", args=[cast.consortium.slug])
    svt = {"filter": "svt", "epsilon": 0.5, "threshold": 0.01, "fraction": 1.0, "max_passes": 3}
    pipeline = [{"filter": "dp_sgd", "noise_multiplier": 1.5, "max_grad_norm": 1.0}, svt]
    response = client.post(
        budget_url, {**values, "privacy_pipeline": json.dumps(pipeline)}, HTTP_HX_REQUEST="true"
    )
    body = response.content.decode()
    assert 'id="proposal-budget-advice"' in body
    assert "does not share every coordinate" in text_of(response)
    assert "12.5%" in text_of(response)  # 0.5 ** 3 of the coordinates stay unshared
    plain = client.post(budget_url, values, HTTP_HX_REQUEST="true")
    assert 'id="proposal-budget-advice"' not in plain.content.decode()


def test_edit_budget_leaves_the_jobs_own_reservation_out(cast):
    """Editing a job awaiting approval: its own reservation is replaced, not added to."""
    agreement_in_force(cast, epsilon_cap="3")
    steward_registers_datasets(cast)
    client = cast.client_for("admin")
    create_url = reverse("training:job-create", args=[cast.consortium.slug])
    job = assert_proposed(propose_form_as_it_comes(client, create_url)[1], cast.consortium)
    edit_budget = reverse("training:job-edit-budget", args=[cast.consortium.slug, job.pk])
    values = form_values(
        client.get(reverse("training:job-edit", args=[cast.consortium.slug, job.pk]))
    )

    response = client.post(edit_budget, values)

    assert response.status_code == 200
    assert "exceeds the cap" not in text_of(response)
    assert re.search(r"Hospital A 0\.00 ", text_of(response)), text_of(response)


@pytest.mark.parametrize(
    ("persona", "expected"),
    [("outsider", 404), ("auditor", 404), ("approver", 404), ("researcher", 200)],
)
def test_budget_endpoint_answers_only_proposers(cast, persona, expected):
    agreement_in_force(cast)
    budget_url = reverse("training:job-create-budget", args=[cast.consortium.slug])
    assert cast.client_for(persona).post(budget_url, {}).status_code == expected


def test_budget_endpoint_sends_anonymous_to_login(cast):
    budget_url = reverse("training:job-create-budget", args=[cast.consortium.slug])
    response = cast.client_for(None).post(budget_url, {})
    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


# --- Enter in a field proposes (issue 14: offer only what a user can do) ------------------


class _SubmitButtons(HTMLParser):
    """Each POST form's submit buttons in DOM order, as (name, value, text, attributes): the
    first is the form's default button, the one a browser presses when Enter is typed in a
    field (HTML's implicit submission)."""

    def __init__(self):
        super().__init__()
        self.forms: list[list[dict]] = []
        self._buttons: list[dict] | None = None
        self._button: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and (a.get("method") or "").lower() == "post":
            self._buttons = []
            self.forms.append(self._buttons)
        elif self._buttons is not None and tag == "button":
            if (a.get("type") or "submit").lower() == "submit":
                self._button = {**a, "text": ""}
                self._buttons.append(self._button)
        elif (
            self._buttons is not None
            and tag == "input"
            and (a.get("type") or "").lower() in ("submit", "image")
        ):
            self._buttons.append({**a, "text": a.get("value", "")})

    def handle_data(self, data):
        if self._button is not None:
            self._button["text"] += data

    def handle_endtag(self, tag):
        if tag == "button":
            self._button = None
        elif tag == "form":
            self._buttons = None


def submit_buttons(response) -> list[dict]:
    """The job form's submit buttons in DOM order (the page's form with the most buttons)."""
    parser = _SubmitButtons()
    parser.feed(response.content.decode())
    return max(parser.forms, key=len)


def test_enter_in_a_field_proposes_rather_than_checking_the_budget(cast):
    """The form's first submit button (what Enter presses) proposes the job, as "Propose for
    approval" does; "Check privacy budget" comes later and still only checks."""
    agreement_in_force(cast)
    steward_registers_datasets(cast)
    client = cast.client_for("admin")
    create_url = reverse("training:job-create", args=[cast.consortium.slug])
    page = client.get(create_url)
    buttons = submit_buttons(page)

    default = buttons[0]
    assert (default["name"], default["value"]) == ("action", "propose")
    assert default["text"].strip() == "Propose for approval"
    # Out of sight and out of the tab order: the visible buttons are the ones to press.
    assert "visually-hidden" in default["class"].split()
    assert default["tabindex"] == "-1" and default["aria-hidden"] == "true"
    values = [(b.get("name"), b.get("value")) for b in buttons]
    assert values.index(("action", "check")) > 0
    assert ("action", "propose") in values[1:], "the visible primary button is still there"

    # What Enter sends (the default button's name and value) proposes the job.
    response = client.post(create_url, {**form_values(page), default["name"]: default["value"]})
    assert_proposed(response, cast.consortium)


def test_enter_in_the_edit_form_saves(cast):
    agreement_in_force(cast)
    steward_registers_datasets(cast)
    client = cast.client_for("admin")
    create_url = reverse("training:job-create", args=[cast.consortium.slug])
    job = assert_proposed(propose_form_as_it_comes(client, create_url)[1], cast.consortium)
    edit_url = reverse("training:job-edit", args=[cast.consortium.slug, job.pk])
    page = client.get(edit_url)
    default = submit_buttons(page)[0]
    assert (default["name"], default["value"]) == ("action", "save")
    assert default["text"].strip() == "Save changes"

    values = form_values(page)
    values["title"] = ["Renamed by pressing Enter"]
    response = client.post(edit_url, {**values, default["name"]: default["value"]})
    assert response.status_code == 302, text_of(response)[:2000]
    job.refresh_from_db()
    assert job.title == "Renamed by pressing Enter"


def test_defaults_ask_for_the_audit_the_agreement_requires(cast):
    """Under an agreement that requires each site's privacy audit, the form starts from a job
    that asks for it, so the defaults comply as they come."""
    agreement_in_force(cast, privacy_audit_required=True)
    steward_registers_datasets(cast)
    defaults = proposal_defaults(consortium=cast.consortium)
    assert defaults.complies, defaults.notes
    assert validate_spec(defaults.spec)["privacy_audit"] == {"records": 8, "seed": 0}
