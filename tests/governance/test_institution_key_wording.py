"""The institution's page and its edit form say what the form changes (issue 14, defect 5): the
form edits the key *on file for new worker credentials*, while the keys updates are verified
against are the worker credentials' own, managed on the worker credentials page. Nothing calls
the key on file "the worker key".
"""

from __future__ import annotations

import pytest
from django.urls import reverse

pytestmark = pytest.mark.django_db


def urls(cast) -> dict[str, str]:
    kwargs = {"slug": cast.consortium.slug, "inst_slug": cast.hospital_a.slug}
    return {
        "detail": reverse("consortium:institution-detail", kwargs=kwargs),
        "edit": reverse("consortium:institution-edit", kwargs=kwargs),
        "credentials": reverse("training:credential-list", kwargs=kwargs),
        "new": reverse("consortium:institution-create", kwargs={"slug": cast.consortium.slug}),
    }


def test_the_edit_button_and_form_name_the_key_on_file_and_point_to_the_credentials(cast):
    where = urls(cast)
    client = cast.client_for("inst_admin")
    detail = client.get(where["detail"]).content.decode()
    assert "Edit details and worker key" not in detail
    assert ">Edit details and key on file</a>" in detail
    assert f'id="credentials-link" href="{where["credentials"]}"' in detail

    form = client.get(where["edit"]).content.decode()
    assert "Key on file for new worker credentials (PEM)" in form
    assert "Worker public key (PEM)" not in form
    assert "The site worker&#x27;s Ed25519 public key" not in form
    assert "It does not let a worker upload by itself" in form
    note = form.split('id="worker-keys-note"', 1)[1].split("</p>", 1)[0]
    assert f'href="{where["credentials"]}"' in note


def test_someone_who_cannot_manage_credentials_is_told_who_can(cast):
    where = urls(cast)
    form = cast.client_for("admin").get(where["edit"])
    assert form.status_code == 200
    note = form.content.decode().split('id="worker-keys-note"', 1)[1].split("</p>", 1)[0]
    # A consortium administrator edits the details but does not manage a site's credentials.
    assert "href=" not in note
    assert "administrators and data stewards" in note


def test_the_add_form_says_the_same(cast):
    page = cast.client_for("admin").get(urls(cast)["new"]).content.decode()
    assert "Key on file for new worker credentials (PEM)" in page
    assert "created on the institution's worker credentials page once it is added" in page
