"""Shared fixtures: session-scoped tiny random Gemma 4 checkpoints built by tests/oracle.py."""

import os
import signal

import pytest


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """`oracle.Checkpoints`: `.target(geometry, ...)` / `.assistant(target_path, ...)` build once per session.

    torch and transformers (the oracle's dependencies) come with the `test` extra; without
    them this fixture fails loudly rather than skipping.
    """
    from tests import oracle

    return oracle.Checkpoints(tmp_path_factory.mktemp("checkpoints"))


def pytest_configure(config):
    # The policy cache would carry measurements from one test's model to the next (and into
    # the user's ~/.cache); tests that exercise it pass their own folder.
    os.environ["MLX_SPECDEC_CACHE"] = "off"
    # The one-line slow-BLAS hint depends on the machine; test_cli checks it on its own.
    os.environ["MLX_SPECDEC_BLAS_HINT"] = "off"
    # Ctrl-C tests send SIGINT to the programs they start, which inherit an ignored SIGINT from a
    # suite run in the background (`nohup pytest &`): chat then never answers Ctrl-C at its
    # prompt, and a sharded server exits 0 instead of 130. A handler is reset at exec.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
