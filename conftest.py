"""Shared by tests, property tests and doctests: a signing key of the test session's own.

nnh signs every checkpoint with the user's key (``nnh.checkpoint.signing``); the suite must
neither read nor create the key in the real home folder, and its subprocesses (torchrun,
resume scripts) must recognise the files the test process wrote, so the key path goes into
the environment they inherit.
"""

import os
import tempfile

os.environ["NNH_KEY_FILE"] = os.path.join(tempfile.mkdtemp(prefix="nnh-test-key-"), "signing.key")


import pytest


@pytest.fixture(autouse=True)
def _each_test_sees_nnh_warnings_afresh():
    """nnh shows each warning once per process (``nnh.warn``); every test starts afresh, as a
    new user's process would."""
    from nnh.warn import reset

    reset()
    yield
