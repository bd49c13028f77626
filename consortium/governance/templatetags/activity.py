"""Ledger entries in words on the pages (:mod:`audit.ledger.words`): ``{{ name|event_words }}``
for an event's name, ``{% entry_sentence entry %}`` for what one entry says happened, with the
institutions named by name (looked up once per page render, not per entry)."""

from __future__ import annotations

import json

from django import template

from audit.ledger import words
from consortium.governance.models import Institution

register = template.Library()


@register.filter
def event_words(name: str) -> str:
    return words.event_words(name)


@register.simple_tag(takes_context=True)
def entry_sentence(context, entry) -> str:
    names = context.render_context.get("_institution_names")
    if names is None:
        names = dict(Institution.objects.values_list("slug", "name"))
        context.render_context["_institution_names"] = names
    try:
        payload = json.loads(entry.payload_text)
    except (TypeError, ValueError):
        payload = {}
    slug = entry.institution_slug or None
    return words.entry_sentence(
        entry.event,
        payload,
        institution=names.get(slug, slug) if slug else None,
        name_of=lambda s: names.get(s, s),
    )
