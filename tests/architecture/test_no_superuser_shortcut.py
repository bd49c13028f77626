"""No product code or template asks ``user.has_perm``: Django's answers yes to an active
superuser for any permission without asking the rules, so one call of it is a door a superuser
walks through to act for a consortium or an institution it is no member of. Every check goes
through :func:`consortium.core.access.may` (``{% may %}`` in the templates), which asks the rule
alone. Read from the source, so a page no test opens is covered too.

The Django admin asks ``has_perm`` for Django's own model permissions; that is its business,
and the admin classes of the product override what it may do (read-only), never call it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_PACKAGES = ("consortium", "training", "audit")
#: ``rules``' own template tags (``{% has_perm %}``, ``{% test_rule %}``) go through
#: ``user.has_perm`` too.
TEMPLATE_SHORTCUTS = re.compile(r"{%\s*(load\s+rules|has_perm|test_rule)\b")


def shortcut_lines(tree: ast.AST) -> list[int]:
    """The lines of ``tree`` that call ``.has_perm``/``.has_perms`` on anything but ``rules``
    (``rules.has_perm(name, user, obj)`` asks the rule itself: that is ``may``'s)."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in {"has_perm", "has_perms"}:
            continue
        owner = node.func.value
        if isinstance(owner, ast.Name) and owner.id == "rules":
            continue
        lines.append(node.lineno)
    return lines


def test_no_product_module_calls_has_perm():
    calls = []
    for package in PRODUCT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            calls += [f"{path.relative_to(ROOT)}:{line}" for line in shortcut_lines(tree)]
    assert calls == [], (
        "user.has_perm lets a superuser pass every rule; ask consortium.core.access.may: "
        + ", ".join(calls)
    )


def test_no_template_uses_rules_tags():
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in sorted((ROOT / "templates").rglob("*.html"))
        for match in TEMPLATE_SHORTCUTS.finditer(path.read_text())
    ]
    assert found == [], "use {% load access %}{% may ... %} instead: " + ", ".join(found)


def test_the_guard_sees_what_it_forbids():
    source = "ok = rules.has_perm(p, user, obj)\nif request.user.has_perm(p, obj): pass\n"
    assert shortcut_lines(ast.parse(source)) == [2]
    assert TEMPLATE_SHORTCUTS.search('{% has_perm "audit.view_ledger" user c as x %}')
    assert TEMPLATE_SHORTCUTS.search("{% load rules %}")
    assert not TEMPLATE_SHORTCUTS.search('{% load access %}{% may "a.b" user c as x %}')
