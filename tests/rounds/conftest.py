"""The coordinator tests' fixtures, from tests/support/coordinator_harness.py: ``c3`` (three
hospitals with data, credentials and keys; the artifact store in the test's folder) and
``broker`` (the in-memory broker the coordinator's messages go to).

test_worker_integration.py declares its own ``c3`` and ``broker`` (a real broker, real worker
processes), which take the place of these there.
"""

from tests.support.coordinator_harness import broker, c3  # noqa: F401 - fixtures for this folder
