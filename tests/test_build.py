"""The corpus build end to end: CLI, both formats, resume after SIGKILL, ranks + merge, Dask, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spikevault.build import BuildConfig, RecordingError, resolve_rank, run_build
from spikevault.cli import main as cli
from spikevault.reader import load_events

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three tiny saved ground-truth recordings and a sources file listing them."""
    from spikevault.synth import generate_recording

    root = tmp_path_factory.mktemp("recs")
    entries = []
    for i, (probe, dur) in enumerate([("linear32", 2.0), ("tetrode", 2.0), ("linear32", 3.0)]):
        rec, sorting = generate_recording(probe=probe, duration_s=dur, num_units=4, seed=10 + i)
        rec.save(folder=root / f"rec{i}", n_jobs=1, verbose=False)
        sorting.save(folder=root / f"sort{i}")
        entries.append({"recording_id": f"rec{i}", "path": f"rec{i}", "probe": probe, "lab": "synth-lab",
                        "licence": "CC-BY-4.0", "sorting": f"sort{i}", "label_source": "ground_truth"})
    (root / "sources.yaml").write_text(json.dumps({"version": 1, "sources": entries}))  # JSON is YAML
    bad = root / "broken.dat"
    bad.write_bytes(b"not a recording at all")
    return root


def shard_sums(corpus):
    m = json.loads((Path(corpus) / "manifest.json").read_text())
    return sorted((s["path"], s["num_events"], s["sha256"]) for s in m["shards"]), m


@pytest.fixture(scope="module")
def single(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "corpus"
    assert cli(["build", str(sources / "sources.yaml"), "--out", str(out), "--format", "both",
                "--val-fraction", "0.4", "--no-progress"]) == 0
    return out


def test_build_both_formats_verify_info_and_idempotent_rerun(single, sources, capsys):
    sums, m = shard_sums(single)
    assert {s["format"] for s in m["shards"]} == {"webdataset", "parquet"}
    assert m["schema"]["num_samples"] == 60 and m["build"]["extract_params"]["detect_threshold"] == 5.0
    assert {s["recording_id"] for s in m["sources"]} == {"rec0", "rec1", "rec2"}
    assert all(s["lab"] == "synth-lab" and s["num_events"] > 0 for s in m["sources"])
    assert "spikeinterface" in m["software"] and (single / "README.md").exists() and (single / "build.log").exists()
    ev = load_events(single, fields=["unit_label", "label_source", "recording_id"])
    assert (ev["unit_label"] >= 0).mean() > 0.5 and set(ev["label_source"]) == {"ground_truth"}
    assert len(ev["unit_label"]) == sum(s["num_events"] for s in m["sources"])
    assert cli(["verify", str(single)]) == 0
    assert cli(["info", str(single)]) == 0
    assert "| total | 3 |" in capsys.readouterr().out
    # rerun: everything is done, nothing is rewritten, same manifest
    before = (single / "manifest.json").read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in single.rglob("*.tar")}
    assert cli(["build", str(sources / "sources.yaml"), "--out", str(single), "--format", "both",
                "--val-fraction", "0.4", "--no-progress"]) == 0
    assert (single / "manifest.json").read_bytes() == before
    assert mtimes == {p: p.stat().st_mtime_ns for p in single.rglob("*.tar")}
    # other settings on the same directory are refused
    assert cli(["build", str(sources / "sources.yaml"), "--out", str(single), "--format", "parquet",
                "--no-progress"]) == 2


def test_ranks_then_merge_equal_a_single_build(single, sources, tmp_path):
    out = tmp_path / "ranked"
    args = ["build", str(sources / "sources.yaml"), "--out", str(out), "--format", "both", "--val-fraction", "0.4",
            "--no-progress", "--world-size", "2"]
    assert cli(args + ["--rank", "1"]) == 0
    assert not (out / "manifest.json").exists()
    assert cli(["merge", str(out)]) == 2  # rank 0 missing: clear error, not a partial manifest
    assert cli(args + ["--rank", "0"]) == 0
    assert cli(["merge", str(out)]) == 0
    assert shard_sums(out)[0] == shard_sums(single)[0]
    assert (out / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes()


def test_dask_executor(single, sources, tmp_path):
    pytest.importorskip("dask.distributed")
    from spikevault.sources import resolve_sources

    cfg = BuildConfig(formats=("webdataset", "parquet"), val_fraction=0.4)
    srcs = [s.to_dict() for s in resolve_sources([sources / "sources.yaml"])]
    run_build(srcs, tmp_path / "dask", cfg, executor="dask", workers=1, progress=False)
    assert shard_sums(tmp_path / "dask")[0] == shard_sums(single)[0]


def test_bad_recording_raise_or_skip(sources, tmp_path):
    srcs = [str(sources / "rec0"), str(sources / "broken.dat")]
    with pytest.raises(RecordingError, match="broken.dat"):
        run_build(srcs, tmp_path / "raise", BuildConfig(on_error="raise"), progress=False)
    # nothing already written is lost: rec0 (sorted before 'broken') is recorded
    from spikevault.sources import resolve_sources

    m = run_build([s.to_dict() for s in resolve_sources(srcs)], tmp_path / "skip",
                  BuildConfig(on_error="skip"), progress=False)
    assert [s["recording_id"] for s in m["skipped"]] == ["broken"]
    assert "broken.dat" in m["skipped"][0]["error"]
    assert [s["recording_id"] for s in m["sources"]] == ["rec0"] and m["shards"]


def test_rank_from_scheduler_variables():
    assert resolve_rank(env={"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
                             "SLURM_ARRAY_TASK_COUNT": "3"}) == (1, 3)
    assert resolve_rank(env={"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}) == (2, 4)
    assert resolve_rank(env={"RANK": "0", "WORLD_SIZE": "2"}) == (0, 2)
    assert resolve_rank(env={}) == (0, 1)
    with pytest.raises(ValueError, match="--rank"):
        resolve_rank(3, 2)


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_corpus(single, sources, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "spikevault.cli", "build", str(sources / "sources.yaml"), "--out", str(out),
           "--format", "both", "--val-fraction", "0.4", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / "_work" / "done"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (done.is_dir() and any(done.glob("*.json"))):
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert 1 <= len(list(done.glob("*.json"))) < 3
    assert cli(cmd[3:]) == 0  # rerun in process: resumes
    assert shard_sums(out)[0] == shard_sums(single)[0]
    assert not list(out.rglob("*.tmp"))
    a, b = load_events(out), load_events(single)
    assert all(np.array_equal(a[k], b[k]) for k in a)
