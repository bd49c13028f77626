"""The pages that show several apps at once: the overview, a consortium's dashboard and an
institution's page. Governance's own records sit beside training's jobs and live state and the
ledger's recent entries, so these pages live above every app (docs/architecture.md, section 6):
they may import governance, training and the ledger, and nothing below imports them.

Their URLs share governance's namespace (``consortium``): :mod:`consortium.dashboard.urls` is
the one URLconf of that namespace and adds these pages to governance's.
"""
