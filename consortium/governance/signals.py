"""Signals the governance app sends so that apps above it can react without
``consortium`` importing them (docs/architecture.md, section 6: nothing imports upward).

Both are sent inside the service's transaction, after its ledger entry, so a
receiver's writes commit or roll back with the governance change.
"""

from django.dispatch import Signal

# kwargs: withdrawal (consortium.Withdrawal), acting_user
consent_withdrawn = Signal()
