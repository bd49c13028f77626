"""Governance pages, one module per job (as the services): institutions, members and
invitations, agreements, withdrawal of consent.

Each view is thin: it loads its object through a selector scoped to the user (the page bases
in ``consortium.core.pages`` check the declared permission and answer a forbidden object with
the same 404 as a missing one), validates a form, calls one service with
``acting_user=request.user``, shows a message and redirects.

The pages that show other apps' records beside governance's (the overview, the consortium
dashboard, an institution's page) are in :mod:`consortium.dashboard`, above every app.
"""
