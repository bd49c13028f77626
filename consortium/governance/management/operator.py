"""What the operator's management commands share (``create_consortium``, ``add_institution``,
``invite_member``, and training's ``create_site_credentials``): who acts, the objects named by
slug, and the services' errors as a ``CommandError`` that says what is wrong.

The acting person. Every command takes ``--actor USERNAME``, an existing active account (for
``create_consortium``, the superuser made by ``manage.py createsuperuser``), and there is no
default: a
governance act is a ledger entry that names the person who did it, and "whoever had a shell on
the server" names nobody. The command asks the same permission the web page asks, of that
account, through :func:`consortium.core.access.may`: a superuser, the operator, starts a
consortium with its first administrator (``create_consortium``) and holds no other right by
being one; adding institutions, inviting people and creating a site's worker credentials are
the acts of the consortium's or the institution's own people, so ``--actor`` names one of them
(for a new platform, the first administrator ``create_consortium`` made). The command calls the
same service as the page, so the ledger holds the same entries, with the actor as their author.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from consortium.core.access import may
from consortium.core.errors import ServiceError
from consortium.governance.models import Consortium, Institution

#: How many known slugs an "unknown slug" error lists.
LISTED_SLUGS = 20


def add_actor_argument(parser) -> None:
    parser.add_argument(
        "--actor",
        required=True,
        metavar="USERNAME",
        help="The account acting (the superuser made by 'createsuperuser' for create_consortium; "
        "a member with the role the act needs for the others); the ledger names it as the "
        "author of what this command does.",
    )


def actor_named(username: str):
    """The active account ``username``, or a CommandError saying why it cannot act."""
    user = get_user_model().objects.filter(username=(username or "").strip()).first()
    if user is None:
        raise CommandError(
            f"--actor: there is no account named '{username}'. Name an existing account (for a "
            "new platform, create one with 'manage.py createsuperuser'): the ledger records "
            "who acted."
        )
    if not user.is_active:
        raise CommandError(f"--actor: the account '{username}' is deactivated.")
    return user


def require_permission(actor, perm: str, obj, *, doing: str, who: str) -> None:
    """Refuse, as the page would, an actor without ``perm`` on ``obj``."""
    if not may(actor, perm, obj):
        raise CommandError(
            f"{actor.get_username()} may not {doing}: only {who} may (being a superuser is "
            "not enough: a superuser acts for a consortium or an institution only through a "
            "membership). Pass another --actor."
        )


def _known(slugs) -> str:
    slugs = list(slugs[: LISTED_SLUGS + 1])
    if not slugs:
        return "there are none yet"
    more = ", …" if len(slugs) > LISTED_SLUGS else ""
    return "known: " + ", ".join(slugs[:LISTED_SLUGS]) + more


def consortium_by_slug(slug: str) -> Consortium:
    consortium = Consortium.objects.filter(slug=slug).first()
    if consortium is None:
        known = Consortium.objects.order_by("slug").values_list("slug", flat=True)
        raise CommandError(
            f"--consortium: there is no consortium with the slug '{slug}' ({_known(known)})."
        )
    return consortium


def institution_by_slug(slug: str, *, consortium: Consortium | None = None) -> Institution:
    """The institution ``slug`` (inside ``consortium`` when given)."""
    institutions = Institution.objects.select_related("consortium")
    if consortium is not None:
        institutions = institutions.filter(consortium=consortium)
    institution = institutions.filter(slug=slug).first()
    if institution is None:
        where = f" in {consortium.slug}" if consortium is not None else ""
        known = institutions.order_by("slug").values_list("slug", flat=True)
        raise CommandError(
            f"--institution: there is no institution with the slug '{slug}'{where} "
            f"({_known(known)})."
        )
    return institution


def read_public_key(value: str, *, option: str) -> str:
    """A public key given as its PEM text or as the path of a file holding it."""
    value = (value or "").strip()
    if not value or value.startswith("-----BEGIN"):
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise CommandError(
            f"{option}: no file {path} (give the path of the worker's public key in PEM, or "
            "the PEM text itself)."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{option}: cannot read {path} as a PEM public key: {exc}") from None


def _option(field: str) -> str:
    return "" if field == "__all__" else "--" + field.replace("_", "-") + ": "


@contextmanager
def service_errors() -> Iterator[None]:
    """A service's ValidationError (per field: named by its option) or ServiceError (a
    sentence) becomes a CommandError with the same words.

    Inside, standard output goes to standard error: the console mail backend (the development
    default) prints the mail it "sends" on standard output, where the commands print only the
    one thing to keep (a link, a token), for a script to capture."""
    try:
        with redirect_stdout(sys.stderr):
            yield
    except ValidationError as exc:
        if hasattr(exc, "error_dict"):
            lines = [
                _option(field) + " ".join(messages) for field, messages in exc.message_dict.items()
            ]
            raise CommandError("\n".join(lines)) from None
        raise CommandError(" ".join(exc.messages)) from None
    except ServiceError as exc:
        raise CommandError(str(exc)) from None
