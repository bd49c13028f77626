"""The jobs domain: what a consortium trains, on what, under which agreement and budget.

Writes (services, keyword-only, with an explicit ``acting_user``; each writes its ledger entry
in the same transaction):

- :mod:`~training.jobs.datasets`: the data sets a site offers (register, update, remove);
- :mod:`~training.jobs.proposals`: drafting, proposing, submitting, changing and cancelling a
  job, with its compliance check and budget reservations;
- :mod:`~training.jobs.approvals`: the approvers' decisions, settling a job, rebinding it to a
  newer agreement version, expiring overdue jobs, removing a withdrawn institution;
- :mod:`~training.jobs.transitions`: the job's state machine (``TRANSITIONS``), the job lock,
  and ``job_transition``, the engine's entry point;
- :mod:`~training.jobs.notifications`: in-app notifications and their emails.

Reads and rules: :mod:`~training.jobs.selectors`, :mod:`~training.jobs.permissions`,
:mod:`~training.jobs.compliance` (does a job fit the agreement and the budgets),
:mod:`~training.jobs.accounting` (the privacy accountant), :mod:`~training.jobs.spec` and
:mod:`~training.jobs.registry` (pure: the site worker imports them too).

This package imports neither ``training.rounds`` nor ``training.web``.
"""
