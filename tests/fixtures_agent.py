"""Fixtures for the device runtime and agent tests: the bundle they run and a batch of raw inputs.

``agent_bundle`` is ``tiny_bundle`` (tests/fixtures_bundles.py): a real export of a 3-exit residual CNN with
calibrated int8 boundary parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def agent_bundle(tiny_bundle) -> Path:
    return Path(tiny_bundle)


def input_shape(bundle: Path) -> tuple[int, ...]:
    from edgeexit.bundle import Bundle

    return tuple(int(d) for d in Bundle.load(bundle, verify=False).manifest.input.shape[1:])


@pytest.fixture
def raw_batch(agent_bundle) -> np.ndarray:
    """Raw [0, 1] pixels shaped for the bundle input (8 rows)."""
    return np.random.default_rng(1).random((8, *input_shape(agent_bundle)), dtype=np.float32)


@pytest.fixture(scope="module")
def cloud(agent_bundle):
    """A real in-process `edgeexit serve` of the agent bundle on a free loopback port (one per test module)."""
    from edgeexit.runtime.oip_server import ServerOptions, build_server
    from edgeexit.runtime.service import build_handlers

    handle = build_server(build_handlers(agent_bundle), ServerOptions()).start()
    yield handle
    handle.stop(1.0)
