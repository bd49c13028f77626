"""The test suite. The helpers under tests/support/ assert too (the ledger checks, the
permission matrices, the coordinator harness): pytest rewrites their asserts as it does the
test modules', so a failing check there shows the values it compared."""

import pytest

pytest.register_assert_rewrite("tests.support")
