from django.apps import AppConfig


class GovernanceConfig(AppConfig):
    """The governance app. Its label stays ``consortium`` (the package it grew up in), so its
    tables, migrations, content types and permission names (``consortium.<rule>``) are
    unchanged."""

    name = "consortium.governance"
    label = "consortium"
    verbose_name = "Consortium governance"
