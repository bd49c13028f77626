"""``{% may "app.rule" user obj as name %}``: the pages' offers ask the same question as the
views that serve them (:func:`consortium.core.access.may`), in place of ``rules``'
``{% has_perm %}``, which goes through ``user.has_perm`` and so lets a superuser pass every
rule: a page would offer a superuser an act the view then refuses."""

from __future__ import annotations

from django import template

from consortium.core.access import may as may_act

register = template.Library()


@register.simple_tag
def may(perm: str, user, obj=None) -> bool:
    return may_act(user, perm, obj)
