"""Shared pytest fixtures: small seeded ground-truth recordings (generated, never downloaded)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_recording():
    """(recording, sorting): 10 s, 32-channel linear probe, 30 kHz, 8 units, seeded, in microvolts."""
    from spikevault.synth import generate_recording

    return generate_recording(probe="linear32", duration_s=10.0, num_units=8, sampling_rate_hz=30_000.0,
                              noise_level_uv=10.0, seed=42)


@pytest.fixture(scope="session")
def tiny_recording_factory():
    """A cached factory ``make(probe="linear32", duration_s=3.0, num_units=5, seed=0, **kwargs)``.

    Returns (recording, sorting) from :func:`spikevault.synth.generate_recording`; the same
    arguments return the same (lazily generated) objects within a test session.
    """
    from spikevault.synth import generate_recording

    cache = {}

    def make(probe: str = "linear32", duration_s: float = 3.0, num_units: int = 5, seed: int = 0, **kwargs):
        key = (probe, float(duration_s), int(num_units), int(seed), tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = generate_recording(probe=probe, duration_s=duration_s, num_units=num_units, seed=seed,
                                            **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def shared_data_dir():
    """The folder of real templates (``../shared/data`` or $SPIKEVAULT_SHARED_DATA); skips when absent."""
    from spikevault.synth import find_shared_data

    folder = find_shared_data()
    if folder is None:
        pytest.skip("real templates (../shared/data) not available")
    return folder
