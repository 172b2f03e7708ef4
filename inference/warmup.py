"""``spikevault warmup``: compile the sort's numba kernels once, on small generated recordings.

Numba compiles a kernel on its first call; with its on-disk cache on (ours, and SpikeInterface's
through :mod:`spikevault.jit`) later processes load it instead. On a fresh install the first sort
therefore pays every compilation: the 32-channel benchmark recording took 26 s against 10 s once
warm on this project's 2-core machine, 9 s of it SpikeInterface's ``isocut`` (the curation's
unimodality test). ``scripts/bootstrap.sh`` runs this once, so that the first real sort (and the
first timed one) runs at its usual speed.

Two short sorts cover the kernels: a static 32-channel recording (the whitened wobble pass and
its amplitude refit) and a drifting 64-channel one with motion correction on (the motion
estimate, the interpolated re-extraction and wobble with drifting templates). A kernel compiles
once per type signature, not per probe or length, so these cover larger recordings too.
"""

from __future__ import annotations

import argparse
import logging
import time

logger = logging.getLogger(__name__)


def warm_up(model: str = "default") -> float:
    """Run the two warm-up sorts in this process; returns the seconds they took."""
    from inference.sort import sort
    from spikevault.synth import generate_recording

    t0 = time.perf_counter()
    static, _ = generate_recording(probe="linear32", duration_s=10.0, num_units=4, seed=4242)
    sort(static, model=model, report=False, job_kwargs={"n_jobs": 1})
    drifting, _ = generate_recording(probe="dense64", duration_s=40.0, num_units=6, seed=4243,
                                     drift_amplitude_um=15.0)
    sort(drifting, model=model, motion_correction=True, report=False, job_kwargs={"n_jobs": 1})
    return time.perf_counter() - t0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="model to load while warming up (default: default)")


def main(args: argparse.Namespace) -> int:
    seconds = warm_up(args.model)
    print(f"numba kernels compiled or loaded from numba's cache in {seconds:.1f} s")
    return 0
