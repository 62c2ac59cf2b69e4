"""Shared fixtures: session-scoped tiny random Gemma 4 checkpoints built by tests/oracle.py."""

import pytest


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """`oracle.Checkpoints`: `.target(geometry, ...)` / `.assistant(target_path, ...)` build once per session.

    Skips the requesting test when torch/transformers (the oracle's dependencies) are missing.
    """
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests import oracle

    return oracle.Checkpoints(tmp_path_factory.mktemp("checkpoints"))
