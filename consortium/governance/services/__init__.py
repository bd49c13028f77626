"""Governance writes, one module per job:

- :mod:`~consortium.governance.services.institutions`: consortia and institutions, and the
  workers' public keys (validation, fingerprint);
- :mod:`~consortium.governance.services.members`: invitations and memberships;
- :mod:`~consortium.governance.services.agreements`: agreements, their versions and terms,
  publishing and signing;
- :mod:`~consortium.governance.services.withdrawals`: an institution's withdrawal of consent;
- :mod:`~consortium.governance.services.bootstrap`: the operator starting a consortium with its
  first administrator;
- :mod:`~consortium.governance.services.recording`: the ledger entry every one of them writes.

Each service checks its own preconditions, changes rows and appends its ledger entry in one
transaction: the change and its record commit together or not at all.

Services take keyword-only arguments and an explicit ``acting_user``. They do not check *who*
may call them (views and viewsets do that through ``consortium.governance.permissions``),
except where the rule is part of the act itself (only an institution's approver can sign for
it; only a superuser, the operator, can start a consortium).
"""
