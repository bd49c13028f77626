"""The demo: a seeded consortium of four hospitals, and one job run through the whole platform.

``manage.py seed_demo`` and ``manage.py demo`` are thin commands over this package:

- :mod:`training.demo.seed`: the demo consortium (hospitals, users, data sets, an agreement in
  force), created through the governance and job services;
- :mod:`training.demo.sites`: each hospital's site-worker files (signing key, token) and the
  credential registered for them;
- :mod:`training.demo.scenario`: the job the demo proposes (its spec and privacy pipeline), its
  approval by every hospital, and the clean-up of an earlier run's job;
- :mod:`training.demo.processes`: the processes the demo starts (Daphne, the coordinator, one
  site worker per hospital), each in its own process group.

It drives every layer (governance, jobs, rounds, the site workers), so it sits at the top,
beside the management commands and the pages; nothing below imports it.
"""
