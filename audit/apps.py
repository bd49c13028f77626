from django.apps import AppConfig


class AuditConfig(AppConfig):
    name = "audit"
    verbose_name = "Audit ledger"

    def ready(self) -> None:
        # Imported once the apps are loaded: the rules read governance's predicates, whose module
        # imports governance's models (Django app-loading order, not a cycle).
        from audit import permissions  # noqa: F401 - registers the ledger's and reports' rules
