"""End-to-end zero-shot sorting: the Python call, the CLI and run_sorter on generated recordings,
scored against their ground truth; every clusterer; the output folder; bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

JOB = {"n_jobs": 1}


def _accuracy(gt, sorting) -> float:
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    return float(compare_sorter_to_ground_truth(gt, sorting).get_performance()["accuracy"].mean())


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    """A saved (serialisable) 15 s, 32-channel recording with 8 units, and its ground truth."""
    from spikevault.synth import generate_recording

    folder = tmp_path_factory.mktemp("easy")
    rec, gt = generate_recording(probe="linear32", duration_s=15.0, num_units=8, seed=3)
    return rec.save(folder=folder / "rec"), gt


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny (untrained) SpikeVAE saved as a checkpoint folder."""
    import torch

    from inference.checkpoint import save_pretrained
    from inference.model import ModelConfig, SpikeVAE

    torch.manual_seed(0)
    net = SpikeVAE(ModelConfig(latent_dim=6, conv_channels=(8, 16), channel_dim=16, attention_heads=2,
                               decoder_hidden=32))
    return save_pretrained(net, tmp_path_factory.mktemp("model") / "tiny")


def test_sort_python_pca_writes_the_output_folder(easy, tmp_path):
    from inference import sort

    rec, gt = easy
    out = tmp_path / "out"
    sorting = sort(rec, model=None, features="pca", out=out, job_kwargs=JOB, detect_threshold=4.5)
    assert _accuracy(gt, sorting) > 0.8
    for name in ("sorting", "rejected_events.npz", "events.npz", "params.json", "sort.log", "report.html",
                 "report/embedding.png", "report/waveforms.png", "report/isi.png", "report/amplitudes.png"):
        assert (out / name).exists(), name
    params = json.loads((out / "params.json").read_text())
    assert params["params"]["clusterer"] == "hdbscan" and params["versions"]["spikeinterface"]
    assert params["preprocessing"]["detect_threshold"] == 4.5  # the override is what ran
    assert params["num_units"] == len(sorting.unit_ids)
    rejected = np.load(out / "rejected_events.npz")
    assert len(rejected["sample_index"]) == params["num_rejected_events"]
    assert rejected["waveform"].shape[1:] == (60, 12) and set(rejected["reason"]) <= {1, 2, 3, 4}
    assert "sorted" in (out / "sort.log").read_text()
    # an existing output folder is refused unless overwrite
    with pytest.raises(FileExistsError, match="overwrite"):
        sort(rec, model=None, features="pca", out=out, job_kwargs=JOB)



@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="POSIX shared memory listed in /dev/shm (Linux)")
def test_sort_releases_its_shared_memory_and_the_collectors_frozen_objects(easy):
    """The traces cached in shared memory are gone when sort returns (not left to a later
    collection, nor to the resource tracker's cleanup and warning at exit), the objects frozen
    out of the collector's reach during the sort are given back, and SpikeInterface's global job
    settings are as they were."""
    import gc
    import os

    from spikeinterface.core import get_global_job_kwargs

    from inference import sort

    def owners():
        return {id(r) for r in gc.get_objects() if type(r).__name__ == "SharedMemoryRecording" and r.main_shm_owner}

    rec, _ = easy
    before, owned = set(os.listdir("/dev/shm")), owners()
    frozen = gc.get_freeze_count()
    job_defaults = get_global_job_kwargs()
    sort(rec, report=False, job_kwargs={"n_jobs": 2})
    assert get_global_job_kwargs() == job_defaults  # its workers' thread setting is given back too
    assert set(os.listdir("/dev/shm")) - before == set()
    assert gc.get_freeze_count() == frozen == 0 and gc.isenabled()
    # unlinked by the sort itself, before any collection: no recording of its own still owns a block
    assert owners() - owned == set()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="POSIX shared memory listed in /dev/shm (Linux)")
@pytest.mark.parametrize("cache", ["none", "memory"])
def test_sort_leaves_the_callers_shared_memory_recording_alone(cache):
    """A recording the caller holds in shared memory keeps its block (and owns it) after a sort,
    whether the sort caches the traces or reads them lazily through it (on a tetrode the
    preprocessing's last step, the filter, reads the caller's recording directly)."""
    import os

    from inference import sort
    from spikevault.synth import generate_recording

    rec, _ = generate_recording(probe="tetrode", duration_s=10.0, num_units=2, seed=5)
    theirs = rec.save(format="memory", sharedmem=True, n_jobs=1, progress_bar=False)
    names = [block.name.lstrip("/") for block in theirs.shms]
    sort(theirs, model=None, features="pca", report=False, cache_preprocessing=cache, job_kwargs=JOB)
    assert theirs.main_shm_owner and all(name in os.listdir("/dev/shm") for name in names)
    assert theirs.get_traces(start_frame=0, end_frame=10).shape == (10, rec.get_num_channels())


def _thread_counts_init():
    return {}


def _thread_counts(segment_index, start_frame, end_frame, worker):
    from threadpoolctl import threadpool_info

    return sorted({(info["internal_api"], info["num_threads"]) for info in threadpool_info()})


@pytest.mark.skipif(sys.platform != "linux", reason="SpikeInterface forks its workers on Linux only")
def test_forked_workers_keep_one_thread_without_a_limit_per_chunk(easy):
    """During a sort, SpikeInterface's workers apply no thread limit of their own around each
    chunk (threadpoolctl's inspection of every library cost more than some chunks); forked from
    the sort's single-threaded process, every library in them still runs one thread."""
    import spikeinterface.core.globals as si_globals
    from spikeinterface.core.job_tools import TimeSeriesChunkExecutor, fix_job_kwargs
    from threadpoolctl import threadpool_limits

    from inference.sort import _workers_inherit_thread_limits

    rec, _ = easy
    before, was_set = si_globals.get_global_job_kwargs(), si_globals.is_set_global_job_kwargs_set()
    with threadpool_limits(limits=1), _workers_inherit_thread_limits({"n_jobs": 2}):
        jk = fix_job_kwargs({"n_jobs": 2, "chunk_duration": "1s", "progress_bar": False})
        assert jk["max_threads_per_worker"] is None
        counts = TimeSeriesChunkExecutor(rec, _thread_counts, _thread_counts_init, (), handle_returns=True,
                                         job_name="thread counts", **jk).run()
    assert len(counts) == int(rec.get_num_samples() / rec.get_sampling_frequency())
    assert all(count == 1 for chunk in counts for _, count in chunk) and counts[0]
    assert si_globals.get_global_job_kwargs() == before and si_globals.is_set_global_job_kwargs_set() == was_set
    # spawned workers would start without the sort's limit: they keep SpikeInterface's
    with _workers_inherit_thread_limits({"n_jobs": 2, "mp_context": "spawn"}):
        assert fix_job_kwargs({"n_jobs": 2})["max_threads_per_worker"] == before["max_threads_per_worker"]


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_pipeline_runs_its_hook_once_while_the_workers_compute(easy, n_jobs):
    """``_run_pipeline`` gives SpikeInterface's ``run_node_pipeline`` output, and calls its hook
    once, in this process, after the first chunk: with workers, once they have all started."""
    import multiprocessing
    import os

    from spikeinterface.core import get_noise_levels
    from spikeinterface.core.node_pipeline import run_node_pipeline
    from spikeinterface.preprocessing import bandpass_filter
    from spikeinterface.sortingcomponents.peak_detection.method_list import detect_peak_methods

    from inference.sort import _run_pipeline

    rec = bandpass_filter(easy[0], 300, 6000)
    noise = get_noise_levels(rec, random_slices_kwargs={"seed": 0})
    jk = {"n_jobs": n_jobs, "chunk_duration": "1s", "progress_bar": False}
    detector = detect_peak_methods["locally_exclusive"](rec, noise_levels=noise, detect_threshold=5,
                                                        return_output=True)
    calls = []

    def hook():
        calls.append((os.getpid(), len(multiprocessing.active_children())))

    got = _run_pipeline(rec, [detector], jk, job_name="peaks", squeeze_output=True, while_running=hook)
    expected = run_node_pipeline(rec, [detector], jk, job_name="peaks", squeeze_output=True)
    assert len(got) > 100 and np.array_equal(got, expected)
    assert calls == [(os.getpid(), n_jobs if n_jobs > 1 else 0)]


def test_sort_with_a_model_checkpoint(easy, tiny_model, tmp_path):
    from inference.sort import sort

    rec, gt = easy
    sorting = sort(rec, model=str(tiny_model), out=tmp_path / "out", report=False, job_kwargs=JOB)
    assert _accuracy(gt, sorting) > 0.6
    params = json.loads((tmp_path / "out" / "params.json").read_text())
    assert params["model"]["id"] == str(tiny_model)
    assert params["embedding_events_per_s"] > 0
    assert params["model"]["config"]["latent_dim"] == 6


def test_embedding_in_threads_gives_the_values_of_one_thread():
    """The encoder embeds blocks of whole batches in threads: the same batches, so the same
    values bit for bit as one thread, in the events' order, the last block short."""
    import torch

    from inference.model import ModelConfig, SpikeVAE
    from inference.sort import EMBED_BLOCK_BATCHES, _torch_threads, embed_events
    from spikevault.schema import DEFAULT_SCHEMA

    torch.manual_seed(0)
    net = SpikeVAE(ModelConfig(latent_dim=6, conv_channels=(8, 16), channel_dim=16, attention_heads=2,
                               decoder_hidden=32))
    rng = np.random.default_rng(0)
    n, batch = 3 * EMBED_BLOCK_BATCHES * 16 + 37, 16
    K = DEFAULT_SCHEMA.num_channels
    events = {"waveform": (20 * rng.standard_normal((n, DEFAULT_SCHEMA.num_samples, K))).astype(np.float16),
              "channel_offsets_um": rng.uniform(-60, 60, (n, K, 2)).astype(np.float32),
              "channel_mask": rng.random((n, K)) > 0.1}
    one, rate = embed_events(net, events, batch_size=batch, n_threads=1)
    two, _ = embed_events(net, events, batch_size=batch, n_threads=2)
    assert one.shape == (n, 6) and rate > 0
    assert np.array_equal(one, two)
    with _torch_threads(1), torch.inference_mode():  # the first batch alone, on one torch thread
        first = net.embed(torch.from_numpy(events["waveform"][:batch].astype(np.float32)),
                          torch.from_numpy(events["channel_offsets_um"][:batch]),
                          torch.from_numpy(events["channel_mask"][:batch])).float().numpy()
    assert np.array_equal(one[:batch], first)


def test_cli_sort(easy, tmp_path, capsys):
    from spikeinterface.core import load

    from spikevault.cli import main

    rec, gt = easy
    out = tmp_path / "cli"
    argv = ["sort", str(rec._kwargs.get("folder_path", "")) or "", "--model", "none", "--features", "pca",
            "--out", str(out), "--export-phy", "--no-report"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "units from" in printed and "phy" in printed
    assert (out / "phy" / "spike_times.npy").exists() and (out / "phy" / "params.py").exists()
    assert _accuracy(gt, load(out / "sorting")) > 0.8
    # second run: clear error (exit code 2), --overwrite replaces it
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--no-matching", "--clusterer", "gmm"]) == 0
    assert json.loads((out / "params.json").read_text())["params"]["matching"] is False


def test_run_sorter_spikevault(easy, tmp_path):
    import inference.sorter  # noqa: F401 - registers "spikevault"
    from spikeinterface.sorters import available_sorters, get_default_sorter_params, run_sorter

    rec, gt = easy
    assert "spikevault" in available_sorters()
    assert get_default_sorter_params("spikevault")["clusterer"] == "hdbscan"
    sorting = run_sorter("spikevault", rec, folder=tmp_path / "rs", model=None, features="pca", report=False)
    assert _accuracy(gt, sorting) > 0.8
    assert (tmp_path / "rs" / "sorter_output" / "spikevault" / "params.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("clusterer", ["gmm", "dpgmm", "kmeans"])
def test_each_clusterer_sorts(small_recording, clusterer):
    from inference.sort import sort

    rec, gt = small_recording
    sorting = sort(rec, model=None, features="pca", clusterer=clusterer, job_kwargs=JOB)
    assert _accuracy(gt, sorting) > 0.6



@pytest.mark.slow
@pytest.mark.parametrize("method", ["circus-omp", "tdc-peeler", "nearest"])
def test_each_matching_engine_sorts(easy, method):
    """Every engine --matching-method offers besides the default (wobble) runs (those needing
    noise levels get ours)."""
    from inference.sort import sort

    rec, gt = easy
    sorting = sort(rec, model=None, features="pca", matching_method=method, job_kwargs=JOB, report=False)
    assert _accuracy(gt, sorting) > 0.6

def test_wobble_on_whitened_traces_finds_the_spikes_and_fits_their_amplitudes(easy):
    """Wobble with the true templates: it finds the neurons' spikes, and the amplitudes it
    returns are scalings of the template (refitted: wobble itself reports the peak voltage),
    ~1 for a neuron's own spikes."""
    from spikeinterface.core import NumpySorting, Templates
    from spikeinterface.core.sparsity import ChannelSparsity
    from spikeinterface.core.waveform_tools import estimate_templates

    from inference.sort import WHITEN_RADIUS_UM, _noise_levels, _wobble
    from spikevault.extract import preprocess
    from spikevault.filters import local_whitening_matrix

    rec, gt = easy
    pre = preprocess(rec)

    nbefore, nafter = 30, 60
    arr = estimate_templates(pre, gt.to_spike_vector(), np.arange(len(gt.unit_ids)), nbefore, nafter,
                             return_in_uV=False, n_jobs=1, chunk_duration="1s", progress_bar=False)
    mask = np.ptp(arr, axis=1) > 0.1 * np.ptp(arr, axis=1).max(axis=1, keepdims=True)
    templates = Templates(arr.astype(np.float32), pre.sampling_frequency, nbefore, is_in_uV=True,
                          channel_ids=pre.channel_ids, unit_ids=gt.unit_ids, probe=pre.get_probe()
                          ).to_sparse(ChannelSparsity(mask, gt.unit_ids, pre.channel_ids))
    whitening = local_whitening_matrix(pre, WHITEN_RADIUS_UM).astype(np.float32)
    spikes = _wobble(pre, templates, {"n_jobs": 1, "chunk_duration": "1s"}, 45, _noise_levels(pre, JOB), whitening)
    assert np.all(np.diff(spikes["sample_index"]) >= 0)
    found = NumpySorting.from_samples_and_labels([spikes["sample_index"]], [gt.unit_ids[spikes["cluster_index"]]],
                                                 pre.sampling_frequency)
    assert _accuracy(gt, found) > 0.9
    for k in range(len(gt.unit_ids)):
        assert 0.85 < np.median(spikes["amplitude"][spikes["cluster_index"] == k]) < 1.15


# ----------------------------------------------------------------------------------- bad input
def test_bad_parameters_name_the_flag(easy):
    from inference.sort import sort

    rec, _ = easy
    with pytest.raises(ValueError, match="clusterer must be one of"):
        sort(rec, model=None, features="pca", clusterer="dbscan")
    with pytest.raises(ValueError, match="features must be one of"):
        sort(rec, model=None, features="raw")
    with pytest.raises(ValueError, match="needs a model"):
        sort(rec, model=None, features="model")
    with pytest.raises(ValueError, match="unknown job_kwargs"):
        sort(rec, model=None, features="pca", job_kwargs={"n_workers": 2})
    with pytest.raises(ValueError, match="detect_threshold must be > 0"):
        sort(rec, model=None, features="pca", detect_threshold=0)


def test_no_detectable_spikes_is_a_clear_error():
    from spikeinterface.core import generate_recording

    from inference.sort import sort

    noise = generate_recording(num_channels=8, durations=[3.0], sampling_frequency=30_000.0, seed=0)
    with pytest.raises(ValueError, match="spikes detected"):
        sort(noise, model=None, features="pca", job_kwargs=JOB)


def test_refuses_to_overwrite_a_folder_it_did_not_write(easy, tmp_path):
    from inference.sort import sort

    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not written by spikevault"):
        sort(easy[0], model=None, features="pca", out=tmp_path, overwrite=True)
    assert (tmp_path / "mine.txt").exists()


def test_model_with_unsupported_schema_is_a_clear_error(tiny_model, tmp_path, easy):
    import shutil

    from inference.sort import sort

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["schema"]["version"] = 99
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="schema"):
        sort(easy[0], model=str(bad), job_kwargs=JOB)


@pytest.mark.slow
def test_other_sampling_rate_is_resampled(tiny_model):
    """A 20 kHz recording sorts with a 30 kHz model: events are resampled by the extraction and
    spike times stay at the recording's rate."""
    from spikevault.synth import generate_recording

    from inference.sort import sort

    rec, gt = generate_recording(probe="linear32", duration_s=10.0, num_units=6, sampling_rate_hz=20_000.0, seed=5)
    sorting = sort(rec, model=str(tiny_model), job_kwargs=JOB)
    assert sorting.get_sampling_frequency() == 20_000.0
    assert _accuracy(gt, sorting) > 0.6


@pytest.mark.slow
def test_single_channel_recording(tiny_recording_factory):
    """One wire: no common reference, K-1 masked channels, position is the wire; still sorts."""
    from inference.sort import sort

    rec, gt = tiny_recording_factory(probe="single", duration_s=10.0, num_units=2, seed=1)
    sorting = sort(rec, model=None, features="pca", job_kwargs=JOB)
    assert len(sorting.unit_ids) >= 1
    assert _accuracy(gt, sorting) > 0.3


def test_matched_spikes_go_to_the_same_shape_unit_their_amplitude_fits():
    """circus-omp picks templates by cosine: a neuron with the shape of a bigger one has its
    spikes matched to the bigger template at amplitude ~0.67. They move back, unless that unit
    fired within the refractory period (an overlap both were fitted to), and never to a unit of
    another shape."""
    from inference.sort import reassign_by_amplitude

    t = np.arange(60)
    shape = -np.exp(-0.5 * ((t - 20) / 2.0) ** 2)[:, None] * np.array([1.0, 0.5, 0.2, 0.1])
    other = np.roll(shape, 8, axis=0) * 1.2
    templates = np.stack([100 * shape, 150 * shape, 120 * other]).astype(np.float32)
    spikes = np.zeros(6, dtype=[("sample_index", "int64"), ("cluster_index", "int64"), ("amplitude", "float32")])
    spikes["sample_index"] = [1000, 2000, 3000, 4000, 4020, 5000]
    spikes["cluster_index"] = [1, 1, 1, 1, 0, 2]
    spikes["amplitude"] = [0.67, 1.0, 0.7, 0.66, 1.0, 0.7]
    moved = reassign_by_amplitude(spikes, templates, refractory_samples=45)
    # 0.67 x 150 = 100: unit 0; 1.0 x 150 stays; 0.7 x 150 = 105: unit 0; the spike at 4000 has
    # unit 0 firing 20 samples later: stays; unit 2's shape differs: stays
    assert moved == 2
    assert spikes["cluster_index"].tolist() == [0, 1, 0, 1, 0, 2]
    np.testing.assert_allclose(spikes["amplitude"][[0, 2]], [1.005, 1.05], rtol=1e-5)


def test_residual_fits_of_a_small_template_beside_a_large_one_are_removed():
    """A small template fitted within 0.5 ms of a large fit on its channels at an amplitude its
    own spikes do not have is a residual fit: removed. Its spikes that coincide with the large
    neuron at their usual amplitude stay, and so does a small fit beside a large neuron on other
    channels."""
    from inference.sort import residual_fits

    t = np.arange(60)
    bump = -np.exp(-0.5 * ((t - 20) / 2.0) ** 2)[:, None]
    big = 200 * bump * np.array([1.0, 0.6, 0.2, 0.0, 0.0, 0.0])
    small = 30 * bump * np.array([0.5, 1.0, 0.4, 0.0, 0.0, 0.0])
    far = 200 * bump * np.array([0.0, 0.0, 0.0, 0.0, 0.6, 1.0])
    templates = np.stack([big, small, far]).astype(np.float32)
    rng = np.random.default_rng(0)
    own = 1000 + 3000 * np.arange(100)  # the small neuron alone, amplitudes ~1
    rows = [(s, 1, a) for s, a in zip(own, rng.normal(1.0, 0.08, len(own)))]
    rows += [(500_000, 0, 1.0), (500_005, 1, 0.45)]   # residual: beside the big fit, amplitude 0.45
    rows += [(600_000, 0, 1.0), (600_010, 1, 1.02)]   # a coincidence at the neuron's own amplitude
    rows += [(650_000, 0, 1.0), (650_006, 1, 0.75)]   # a coincidence, amplitude blurred: 3 SDs, < 0.3
    rows += [(700_000, 2, 1.0), (700_004, 1, 0.4)]    # beside a large fit on other channels
    rows.sort()
    spikes = np.zeros(len(rows), dtype=[("sample_index", "int64"), ("cluster_index", "int64"),
                                        ("amplitude", "float32"), ("segment_index", "int64")])
    for name, column in zip(("sample_index", "cluster_index", "amplitude"), zip(*rows)):
        spikes[name] = column
    flagged = residual_fits(spikes, templates, window_samples=15)
    assert spikes["sample_index"][flagged].tolist() == [500_005]


def test_residual_fits_need_more_coincidences_than_chance():
    """Two independent neurons coincide by chance, and a collision blurs the small one's amplitude
    fits: those stay. The same small template fitted beside most of the large neuron's spikes (far
    more often than chance) is a residual: those go."""
    from inference.sort import residual_fits

    t = np.arange(60)
    bump = -np.exp(-0.5 * ((t - 20) / 2.0) ** 2)[:, None]
    big = 200 * bump * np.array([1.0, 0.6, 0.2, 0.0])
    small = 30 * bump * np.array([0.5, 1.0, 0.4, 0.0])
    templates = np.stack([big, small]).astype(np.float32)
    rng = np.random.default_rng(1)
    num_samples = 3_000_000
    big_times = np.sort(rng.choice(num_samples - 100, 1500, replace=False))
    small_times = np.sort(rng.choice(num_samples - 100, 1500, replace=False))

    def spikes_of(rows):
        rows.sort()
        out = np.zeros(len(rows), dtype=[("sample_index", "int64"), ("cluster_index", "int64"),
                                         ("amplitude", "float32"), ("segment_index", "int64")])
        for name, column in zip(("sample_index", "cluster_index", "amplitude"), zip(*rows)):
            out[name] = column
        return out

    rows = [(int(s), 0, 1.0) for s in big_times] + [(int(s), 1, float(rng.normal(1.0, 0.05))) for s in small_times]
    independent = spikes_of(list(rows))
    near = np.abs(independent["sample_index"][:, None] - big_times[None, :]).min(axis=1) <= 15
    blurred = (independent["cluster_index"] == 1) & near
    assert blurred.sum() >= 5  # chance coincidences, about 1500 * 1500 * 31 / 3e6 = 23
    independent["amplitude"][blurred] = 0.3  # what a collision does to the amplitude fit
    assert not residual_fits(independent, templates, window_samples=15, num_samples=num_samples).any()

    residuals = [(int(s) + 4, 1, float(rng.uniform(0.1, 0.5))) for s in big_times[::2]]
    with_residuals = spikes_of(rows + residuals)
    flagged = residual_fits(with_residuals, templates, window_samples=15, num_samples=num_samples)
    is_residual = np.isin(with_residuals["sample_index"], [r[0] for r in residuals]) & (
        with_residuals["cluster_index"] == 1)
    assert flagged[is_residual].mean() > 0.95
    assert flagged[~is_residual].sum() <= 3


def test_crowded_fits_are_those_with_another_fit_within_the_window_in_their_segment():
    """The noise test leaves wobble's fits that sit beside another fit to the residual rule."""
    from inference.sort import _crowded

    spikes = np.zeros(6, dtype=[("sample_index", "int64"), ("segment_index", "int64")])
    spikes["sample_index"] = [100, 110, 200, 400, 5, 408]
    spikes["segment_index"] = [0, 0, 0, 0, 1, 1]
    spikes = spikes[np.lexsort((spikes["sample_index"], spikes["segment_index"]))]
    assert _crowded(spikes, 15).tolist() == [True, True, False, False, False, False]
    assert _crowded(spikes, 10).tolist() == [True, True, False, False, False, False]
    assert _crowded(spikes, 9).tolist() == [False] * 6


def test_amplitude_noise_sd_is_noise_over_template_norm_on_white_noise():
    """On white noise of SD s the amplitude fitted to template t has SD s / ||t||."""
    from spikeinterface.core import NumpyRecording, Templates

    from inference.sort import amplitude_noise_sd

    rng = np.random.default_rng(0)
    traces = (10.0 * rng.standard_normal((300_000, 4))).astype(np.float32)
    rec = NumpyRecording([traces], sampling_frequency=30_000.0)
    t = np.arange(60)
    shape = -np.exp(-0.5 * ((t - 20) / 2.0) ** 2)[:, None] * np.array([1.0, 0.5, 0.2, 0.0])
    arr = np.stack([30.0 * shape, 300.0 * shape]).astype(np.float32)
    templates = Templates(arr, 30_000.0, 20, is_in_uV=True, channel_ids=rec.channel_ids, unit_ids=np.array([0, 1]))
    sd = amplitude_noise_sd(rec, templates, num_chunks=5)
    expected = 10.0 / np.linalg.norm(arr.reshape(2, -1), axis=1)
    np.testing.assert_allclose(sd, expected, rtol=0.05)
    # given the channels' noise, the 300 uV template is not measured: its bound already stays
    # >= 6 SDs away; the 30 uV one is measured as before
    screened = amplitude_noise_sd(rec, templates, noise_levels=np.full(4, 10.0), num_chunks=5)
    assert screened[0] == sd[0] and 0.6 / screened[1] >= 6 and screened[1] > sd[1]


def test_noise_fits_are_told_from_a_small_neurons_spikes():
    """A 30 uV neuron on 10 uV noise: circus-omp's 0.6 bound is ~3 noise SDs, so noise alone is
    fitted hundreds of times just above it. The mixture removes most of those fits and few
    spikes; a neuron far above the noise is never tested."""
    from scipy.stats import truncnorm

    from inference.sort import noise_fits

    rng = np.random.default_rng(1)
    sd = 0.18
    spikes = truncnorm.rvs((0.6 - 0.95) / 0.15, np.inf, loc=0.95, scale=0.15, size=400, random_state=rng)
    noise = truncnorm.rvs(0.6 / sd, np.inf, loc=0.0, scale=sd, size=250, random_state=rng)
    out = noise_fits(np.concatenate([spikes, noise]), sd)
    assert out[400:].mean() > 0.7 and out[:400].mean() < 0.08  # the spikes below ~0.7 are ambiguous
    # spikes alone, whose amplitudes reach down to the bound (a template biased high): kept
    low = truncnorm.rvs((0.6 - 0.8) / 0.15, np.inf, loc=0.8, scale=0.15, size=500, random_state=rng)
    assert noise_fits(low, sd).mean() < 0.05
    assert not noise_fits(np.concatenate([spikes, noise]), 0.02).any()  # bound 30 SDs away: untested


@pytest.mark.slow
def test_noise_fits_of_a_small_neurons_template_are_removed_end_to_end(tmp_path):
    """static32's seed 3001: a 28 uV neuron on 10 uV noise, whose template circus-omp also fits
    to noise ~200 times above its 0.6 bound. The sort removes most of those fits (listed in
    params.json); ``--keep-noise-fits`` keeps them and the unit's precision drops. (Wobble, the
    default engine, fits few of them here: its threshold is 5 noise SDs along the template.)"""
    from spikeinterface.comparison import compare_sorter_to_ground_truth
    from spikeinterface.core import load

    from inference.sort import sort
    from spikevault.cli import main
    from spikevault.synth import generate_recording

    rec, gt = generate_recording(probe="linear32", duration_s=120.0, num_units=15, seed=3001)
    rec = rec.save(folder=tmp_path / "rec", n_jobs=2, progress_bar=False)
    cleaned = sort(rec, model=None, features="pca", matching_method="circus-omp", out=tmp_path / "clean",
                   report=False, job_kwargs={"n_jobs": 2})
    removed = json.loads((tmp_path / "clean" / "params.json").read_text())["matching"]["noise_fits_removed"]
    assert sum(removed.values()) > 50
    argv = ["sort", str(tmp_path / "rec"), "--model", "none", "--features", "pca", "--out", str(tmp_path / "kept"),
            "--no-report", "--matching-method", "circus-omp", "--keep-noise-fits", "--no-drift-split-merge",
            "--n-jobs", "2"]
    assert main(argv) == 0
    info = json.loads((tmp_path / "kept" / "params.json").read_text())
    assert info["params"]["reject_noise_fits"] is False and "noise_fits_removed" not in info["matching"]
    assert info["params"]["final_merge_drift_splits"] is False
    small = "4"  # the 28 uV neuron
    perf = {name: compare_sorter_to_ground_truth(gt, sorting).get_performance()
            for name, sorting in (("clean", cleaned), ("kept", load(tmp_path / "kept" / "sorting")))}
    assert perf["clean"].loc[small, "precision"] > perf["kept"].loc[small, "precision"] + 0.1
    assert perf["clean"]["accuracy"].mean() >= perf["kept"]["accuracy"].mean()


@pytest.mark.slow
def test_single_wire_two_neurons_of_one_shape():
    """On one wire two neurons (120 and 179 uV) have nearly one shape. Clustering separates them
    by amplitude; template matching must not give the smaller one's spikes to the bigger one
    (it did: accuracy 0.34)."""
    from inference.sort import sort
    from spikevault.synth import generate_recording

    rec, gt = generate_recording(probe="single", duration_s=60.0, num_units=2, noise_level_uv=8.0, seed=7051)
    sorting = sort(rec, job_kwargs=JOB)
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    perf = compare_sorter_to_ground_truth(gt, sorting).get_performance()
    assert perf["accuracy"].min() > 0.95


@pytest.mark.slow
def test_drift_is_detected_estimated_and_corrected(tmp_path):
    """A drifting dense probe: 'auto' finds the drift (close to the generator's +-20 um) and sorts
    it well, with templates that follow the motion and with interpolated traces; the static twin
    (same units, no drift) is left alone, and the cheap screening estimate alone says so."""
    from spikevault.extract import ExtractParams, extract_events, preprocess
    from spikevault.synth import generate_recording

    from inference.sort import _channel_index, estimate_drift, localize_events, sort

    kw = dict(probe="dense64", duration_s=30.0, num_units=5, seed=11, amplitude_range_uv=(250.0, 500.0))
    rec, gt = generate_recording(drift_amplitude_um=20.0, drift_period_s=20.0, **kw)
    sorting = sort(rec, model=None, features="pca", out=tmp_path / "drift", report=False, job_kwargs=JOB)
    motion = json.loads((tmp_path / "drift" / "params.json").read_text())["motion"]
    assert motion["mode"] == "auto" and motion["applied"] and not motion["screened_out"]
    assert 12.0 < motion["max_displacement_um"] < 30.0  # zigzag +-20 um; the estimate is centred
    assert motion["drifting_templates"]  # rigid motion, wobble: the templates follow the motion
    # the final merge looked for parts of a neuron cut by the drift (each merge listed)
    final_merge = json.loads((tmp_path / "drift" / "params.json").read_text())["final_merge"]
    assert isinstance(final_merge["drift_splits_merged"], list)
    assert _accuracy(gt, sorting) > 0.8
    # the interpolated traces (the path of non-rigid motion and the other engines) sort it too
    interpolated = sort(rec, model=None, features="pca", out=tmp_path / "interp", report=False, job_kwargs=JOB,
                        drifting_templates=False, final_merge_drift_splits=False)
    info = json.loads((tmp_path / "interp" / "params.json").read_text())
    assert not info["motion"]["drifting_templates"] and "drift_splits_merged" not in info["final_merge"]
    assert _accuracy(gt, interpolated) > 0.8

    static, _ = generate_recording(**kw)
    prep = preprocess(static, ExtractParams())
    events = extract_events(prep, params=ExtractParams(), recording_id="static", preprocessed=True, job_kwargs=JOB)
    _, max_disp = estimate_drift(prep, events, _channel_index(events, prep), JOB)
    assert max_disp < 10.0  # below SortParams.drift_threshold_um: 'auto' does not correct it
    channel_index = _channel_index(events, prep)
    motion, screened = estimate_drift(prep, events, channel_index, JOB, screen_below_um=5.0)
    assert motion is None and screened < 5.0  # the cheap screen alone settles it
    # the sort's screen: the events' own centre-of-mass positions, no pass over the traces
    positions = localize_events(events, prep.get_channel_locations(), channel_index)
    motion, screened = estimate_drift(prep, events, channel_index, JOB, screen_below_um=5.0, positions=positions)
    assert motion is None and screened < 5.0


def test_final_merge_joins_a_split_unit_and_keeps_distinct_units(easy):
    """A unit cut in two (alternate spikes to two labels) is merged back after matching; the
    other units, each a different neuron, are left alone."""
    from spikeinterface.core import NumpySorting, estimate_templates
    from spikeinterface.core import Templates
    from spikeinterface.core.sparsity import ChannelSparsity
    from spikeinterface.preprocessing import bandpass_filter, common_reference

    from inference.sort import SortParams, _noise_levels, merge_units

    rec, gt = easy
    prep = common_reference(bandpass_filter(rec, 300, 6000))
    spikes = gt.to_spike_vector().copy()
    big = int(np.argmax(gt.count_num_spikes_per_unit(outputs="array")))
    split_label = len(gt.unit_ids)
    of_big = np.flatnonzero(spikes["unit_index"] == big)
    spikes["unit_index"][of_big[1::2]] = split_label  # the same neuron, cut in two
    unit_ids = np.arange(split_label + 1)
    sorting = NumpySorting(spikes, rec.get_sampling_frequency(), unit_ids)
    arr = estimate_templates(prep, spikes, unit_ids, 30, 60, n_jobs=1, progress_bar=False)
    noise = _noise_levels(prep, JOB)
    # sparse as the sort's own templates: channels within 100 um of the peak where ptp >= noise
    loc = rec.get_channel_locations()
    peak = loc[np.argmax(np.ptp(arr, axis=1), axis=1)]
    mask = (np.linalg.norm(peak[:, None] - loc[None], axis=2) <= 100) & (np.ptp(arr, axis=1) >= noise)
    templates = Templates(arr.astype(np.float32), rec.get_sampling_frequency(), 30, is_in_uV=True,
                          channel_ids=rec.channel_ids, unit_ids=unit_ids, probe=rec.get_probe())
    templates = templates.to_sparse(ChannelSparsity(mask, unit_ids, rec.channel_ids))
    merged, merged_templates = merge_units(prep, sorting, templates, noise, SortParams(), JOB)
    assert len(merged.unit_ids) == len(gt.unit_ids)
    assert list(merged_templates.unit_ids) == list(merged.unit_ids)
    assert _accuracy(gt, merged) > 0.95




def test_final_merge_joins_the_parts_of_a_neuron_cut_by_the_drift(easy):
    """Two parts of one neuron whose templates differ more than the final merge allows (0.2) but
    within the drift-split bound, each firing at its own displacements, are merged when the
    motion is given; the same two parts firing at the same displacements (alternate spikes),
    or without the motion, are not."""
    from spikeinterface.core import NumpySorting, Templates, estimate_templates
    from spikeinterface.core.motion import Motion
    from spikeinterface.core.sparsity import ChannelSparsity
    from spikeinterface.preprocessing import bandpass_filter, common_reference

    from inference.sort import SortParams, _displacement_overlap, _noise_levels, merge_units

    rec, gt = easy
    prep = common_reference(bandpass_filter(rec, 300, 6000))
    fs, duration = rec.get_sampling_frequency(), rec.get_total_duration()
    bins = np.arange(0.0, duration, 0.5) + 0.25
    depth = float(np.median(rec.get_channel_locations()[:, 1]))
    motion = Motion([(15.0 * np.sin(2 * np.pi * 3 * bins / duration))[:, None]], [bins], np.array([depth]))
    spikes = gt.to_spike_vector()
    big = int(np.argmax(gt.count_num_spikes_per_unit(outputs="array")))
    of_big = np.flatnonzero(spikes["unit_index"] == big)
    displacement = np.ravel(motion.get_displacement_at_time_and_depth(spikes["sample_index"][of_big] / fs,
                                                                      np.full(len(of_big), depth)))
    split = len(gt.unit_ids)
    unit_ids = np.arange(split + 1)
    base = estimate_templates(prep, spikes, np.arange(split), 30, 60, n_jobs=1, progress_bar=False)
    # the second part's template: the first's at 0.55 of its amplitude (an L1 difference of 0.29)
    arr = np.concatenate([base, 0.55 * base[big: big + 1]]).astype(np.float32)
    noise = _noise_levels(prep, JOB)
    loc = rec.get_channel_locations()
    peak = loc[np.argmax(np.ptp(arr, axis=1), axis=1)]
    mask = (np.linalg.norm(peak[:, None] - loc[None], axis=2) <= 100) & (np.ptp(arr, axis=1) >= noise)
    mask[split] = mask[big]
    templates = Templates(arr, fs, 30, is_in_uV=True, channel_ids=rec.channel_ids, unit_ids=unit_ids,
                          probe=rec.get_probe()).to_sparse(ChannelSparsity(mask, unit_ids, rec.channel_ids))

    def cut(parts):
        cut_spikes = spikes.copy()
        cut_spikes["unit_index"][of_big[parts]] = split
        return NumpySorting(cut_spikes, fs, unit_ids)

    by_drift = cut(displacement > 0)
    units = (big, split)
    assert _displacement_overlap(prep, by_drift, units, motion, (depth, depth)) < 0.05
    stats = {}
    merged, merged_templates = merge_units(prep, by_drift, templates, noise, SortParams(), JOB, motion=motion,
                                           stats=stats)
    assert len(merged.unit_ids) == len(gt.unit_ids)
    assert list(merged_templates.unit_ids) == list(merged.unit_ids)
    assert [sorted(m["units"]) for m in stats["drift_splits_merged"]] == [sorted([str(big), str(split)])]
    bound = SortParams().final_merge_drift_split_max_template_diff
    assert 0.2 < stats["drift_splits_merged"][0]["template_diff"] <= bound
    assert _accuracy(gt, merged) > 0.95
    # without the motion the pair stays apart: its templates differ by more than the final merge allows
    assert len(merge_units(prep, by_drift, templates, noise, SortParams(), JOB)[0].unit_ids) == split + 1
    # two parts present at every displacement are not parts of a drifting neuron
    alternate = cut(np.arange(len(of_big)) % 2 == 1)
    assert _displacement_overlap(prep, alternate, units, motion, (depth, depth)) > 0.7
    stats = {}
    assert len(merge_units(prep, alternate, templates, noise, SortParams(), JOB, motion=motion,
                           stats=stats)[0].unit_ids) == split + 1
    assert stats["drift_splits_merged"] == []


def test_final_merge_is_stricter_on_a_compact_probe(easy, tmp_path):
    """On a tetrode every unit sits at one place: the final merge's threshold is the compact one,
    recorded in params.json; a 32-channel probe keeps the wider one."""
    from spikevault.synth import generate_recording

    from inference.sort import SortParams, _is_compact, sort

    tetrode, gt = generate_recording(probe="tetrode", duration_s=20.0, num_units=3, seed=11)
    assert _is_compact(tetrode, 50.0) and not _is_compact(easy[0], 50.0)
    out = tmp_path / "tet"
    sorting = sort(tetrode, model=None, features="pca", out=out, job_kwargs=JOB, report=False)
    info = json.loads((out / "params.json").read_text())
    assert len(sorting.unit_ids) > 1
    assert info["final_merge"]["max_template_diff"] == SortParams().final_merge_max_template_diff_compact
    assert _accuracy(gt, sorting) > 0.5

def test_multi_unit_activity_leaves_the_sorting(easy, tmp_path):
    """Noise whose threshold crossings come in bursts (an ISI-violation ratio above 1, as the noise
    units of the drift benchmark) is moved out; a neuron with a refractory period stays, and so
    does a small unit whose one violation is a chance coincidence (a large ratio, but too few
    violations to prove anything)."""
    from spikeinterface.core import NumpySorting, load

    from inference.sort import SortParams, sort, split_multi_unit

    fs, duration = 30000.0, 60.0
    rng = np.random.default_rng(0)
    neuron = np.cumsum(rng.uniform(0.004, 0.1, size=1000))  # refractory: no ISI below 4 ms
    neuron = neuron[neuron < duration]
    crossings = rng.uniform(0, duration, size=800)
    again = crossings[rng.random(800) < 0.4]
    noise = np.sort(np.concatenate([crossings, again + rng.uniform(0.0003, 0.0014, size=len(again))]))
    small = np.sort(np.concatenate([rng.uniform(0, duration - 1, size=60)[::2], [10.0, 10.001]]))
    trains = {0: neuron, 1: noise, 2: np.unique(small)}
    samples = np.concatenate([np.round(t * fs).astype(np.int64) for t in trains.values()])
    labels = np.concatenate([np.full(len(t), u) for u, t in trains.items()])
    order = np.argsort(samples, kind="stable")
    sorting = NumpySorting.from_samples_and_labels([samples[order]], [labels[order]], fs)
    kept, multi, ratio = split_multi_unit(sorting, duration, SortParams())
    assert list(kept.unit_ids) == [0, 2] and list(multi.unit_ids) == [1]
    assert ratio[0] == 0 and ratio[1] > 1 and ratio[2] > 0.5
    assert list(split_multi_unit(sorting, duration, SortParams(max_contamination=10.0))[1].unit_ids) == []
    with pytest.raises(ValueError, match="max_contamination must be > 0"):
        SortParams(max_contamination=0)
    # end to end: the decision and every unit's ratio are in params.json, removed units are saved.
    # A 50 ms "refractory period" makes every busy neuron look like multi-unit activity.
    rec, gt = easy
    out = tmp_path / "out"
    sorting = sort(rec, model=None, features="pca", out=out, job_kwargs=JOB, report=False, refractory_ms=50.0,
                   max_contamination=0.1)
    info = json.loads((out / "params.json").read_text())["multi_unit"]
    removed = info["removed_units"]
    assert removed and not set(removed) & {str(u) for u in sorting.unit_ids}
    assert set(info["isi_violations_ratio"]) == set(removed) | {str(u) for u in sorting.unit_ids}
    assert sorted(map(str, load(out / "multi_unit").unit_ids)) == sorted(removed)


def test_units_with_too_few_spikes_leave_the_sorting(easy, tmp_path):
    """A unit its template barely matched is dropped and listed with its spike count; 0 keeps all."""
    from inference.sort import SortParams, sort

    rec, _ = easy
    out = tmp_path / "out"
    kept = sort(rec, model=None, features="pca", out=out, job_kwargs=JOB, report=False, min_unit_spikes=0)
    counts = kept.count_num_spikes_per_unit(outputs="dict")
    assert json.loads((out / "params.json").read_text()).get("dropped_units") is None
    cut = int(np.median(list(counts.values())))  # about half the units have fewer spikes than this
    sorting = sort(rec, model=None, features="pca", out=out, overwrite=True, job_kwargs=JOB, report=False,
                   min_unit_spikes=cut)
    dropped = json.loads((out / "params.json").read_text())["dropped_units"]
    assert dropped == {str(u): n for u, n in counts.items() if n < cut} and dropped
    assert sorted(map(str, sorting.unit_ids)) == sorted(str(u) for u, n in counts.items() if n >= cut)
    with pytest.raises(ValueError, match="min_unit_spikes must be >= 0"):
        SortParams(min_unit_spikes=-1)


def test_preprocessing_cache_is_int16_in_noise_steps_for_microvolts_and_volts(easy):
    from spikeinterface.core import NumpyRecording, get_noise_levels
    from spikeinterface.preprocessing import bandpass_filter, scale

    from inference.sort import _cache

    rec, _ = easy
    prep = bandpass_filter(rec, 300, 6000).frame_slice(0, 30_000)
    exact = prep.get_traces()
    noise = float(np.median(get_noise_levels(prep, return_in_uV=False, random_slices_kwargs={"seed": 0})))
    for factor in (1.0, 1e-6):  # microvolts, volts: the step follows the noise
        traces = scale(prep, gain=factor, dtype="float32")
        cached = _cache(traces, "memory", JOB)
        assert cached.get_dtype() == np.float32
        assert cached.get_traces().dtype == np.float32
        err = cached.get_traces() - exact * factor
        assert np.max(np.abs(err)) <= 0.6 * noise * factor / 64  # about half a step of noise/64
        assert 0 < np.std(err) < noise * factor / 100
        # two worker processes fill the shared memory chunk by chunk
        # (the same chunks in one process: the filter's chunk margins make chunking matter)
        chunks = {"chunk_duration": "250ms", "progress_bar": False}
        two = _cache(traces, "memory", {"n_jobs": 2, **chunks})
        assert np.array_equal(two.get_traces(), _cache(traces, "memory", {"n_jobs": 1, **chunks}).get_traces())
    big = np.zeros_like(exact)
    big[100, 0] = 1000 * noise  # far beyond the +-500 noise range: clipped, not wrapped around
    with_artifact = NumpyRecording(exact + big, prep.get_sampling_frequency())
    got = _cache(with_artifact, "memory", JOB).get_traces()
    # clipped at 32000 of the cache's steps; its step comes from its own noise estimate (a few
    # seeded chunks), within a few percent of this one (an unseeded estimate here made the test flaky)
    step = got[100, 0] / 32_000
    assert 0.95 * 500 * noise < got[100, 0] < 1.05 * 500 * noise
    assert np.allclose(got / step, np.round(got / step), atol=1e-3)  # every sample is a whole step
    assert got[100, 0] == got.max()
    assert _cache(prep, "none", JOB) is prep
    timed = NumpyRecording(exact, prep.get_sampling_frequency())
    timed.set_times(100.0 + np.arange(len(exact)) / prep.get_sampling_frequency())  # a recording's own clock
    cached = _cache(timed, "memory", {"n_jobs": 2, "chunk_duration": "250ms", "progress_bar": False})
    assert cached.has_time_vector() and np.array_equal(cached.get_times(), timed.get_times())
    assert np.abs(cached.get_traces() - exact).max() <= 0.6 * noise / 64


def test_templates_keep_the_copy_the_median_reference_spreads_over_a_short_probe():
    """A neuron whose spike covers most of a 64-contact probe moves the contacts' median: after
    the common median reference every far contact carries the same inverted copy of its spike.
    The template mask keeps every contact, so matching subtracts the copy with the spike; a small
    neuron's weak copy stays out, and so do the far contacts of a noisy template, each over the
    threshold by chance but with no common copy (a 28 uV neuron's template did that: circus-omp
    then fitted it to noise)."""
    from spikeinterface.core import NumpyRecording

    from inference.sort import TEMPLATE_FAR_SNR, _template_mask
    from spikevault.filters import common_median_reference
    from spikevault.synth import make_probe

    fs, width, noise_uv = 30_000.0, 90, 4.0
    probe = make_probe("dense64")
    locations = probe.contact_positions.astype(np.float64)
    t = (np.arange(width) - 30) / fs * 1e3
    shape = -np.exp(-(t / 0.15) ** 2) + 0.4 * np.exp(-((t - 0.5) / 0.3) ** 2)

    def field(y, amplitude, z=30.0):  # a neuron at depth y, z um off the probe's face
        dist = np.sqrt((locations[:, 0] - 24.0) ** 2 + (locations[:, 1] - y) ** 2 + z ** 2)
        return shape[:, None] * (amplitude / (1.0 + (dist / 20.0) ** 2))[None, :]

    rng = np.random.default_rng(0)
    starts = np.arange(200, 200 + 400 * 300, 300)
    templates, raw = [], []
    for amplitude in (400.0, 60.0):  # large and small neuron at the same place, low on the probe
        traces = rng.normal(0.0, noise_uv, (starts[-1] + 2 * width, 64)).astype(np.float32)
        for s in starts:
            traces[s: s + width] += field(80.0, amplitude).astype(np.float32)
        rec = NumpyRecording(traces, fs)
        rec.set_probe(probe, in_place=True)
        referenced = common_median_reference(rec).get_traces()
        templates.append(np.mean([referenced[s: s + width] for s in starts], axis=0))
        raw.append(np.mean([traces[s: s + width] for s in starts], axis=0))
    arr = np.stack(templates)
    mask = _template_mask(arr, locations, np.full(64, noise_uv), radius_um=100.0)
    far = np.abs(locations[:, 1] - 80.0) > 200.0
    # the large neuron's own field on the far contacts is under the threshold; with the reference's
    # copy, the far contacts are over it
    assert np.ptp(raw[0][:, far], axis=0).max() < TEMPLATE_FAR_SNR * noise_uv
    assert np.ptp(arr[0][:, far], axis=0).min() > TEMPLATE_FAR_SNR * noise_uv
    assert mask[0].all()  # every channel kept for the large neuron
    assert not mask[1, far].any()  # not for the small one
    assert mask[1, np.argmax(np.ptp(arr[1], axis=0))]
    peak = locations[np.argmax(np.ptp(arr[1], axis=0))]
    beyond = np.linalg.norm(locations - peak, axis=1) > 100.0
    noisy = arr[1] + np.where(beyond, rng.normal(0.0, 0.45 * noise_uv, arr[1].shape), 0.0).astype(np.float32)
    assert np.median(np.ptp(noisy[:, beyond], axis=0)) > TEMPLATE_FAR_SNR * noise_uv  # most far channels over it
    assert np.ptp(noisy[:, beyond], axis=0).max() < np.ptp(arr[1], axis=0).max()  # the peak stays put
    assert not _template_mask(noisy[None], locations, np.full(64, noise_uv), radius_um=100.0)[0, beyond].any()


def test_event_centre_of_mass_is_the_same_in_threads():
    """localize_events: the centre of mass of each event's peak-to-peak amplitudes on its channels
    within the radius; by blocks in threads, the same positions as in one."""
    from inference.sort import LOCALIZE_BLOCK_EVENTS, localize_events

    rng = np.random.default_rng(5)
    n, k = 2 * LOCALIZE_BLOCK_EVENTS + 123, 6
    offsets = rng.uniform(-60, 60, size=(n, k, 2)).astype(np.float32)
    offsets[:, 0] = 0.0  # the peak channel
    events = {"waveform": (rng.standard_normal((n, 30, k)) * 20).astype(np.float16),
              "channel_offsets_um": offsets, "channel_mask": rng.random((n, k)) > 0.2}
    locations = rng.uniform(0, 500, size=(40, 2))
    channel_index = rng.integers(0, 40, n)
    one = localize_events(events, locations, channel_index)
    np.testing.assert_array_equal(localize_events(events, locations, channel_index, n_threads=2), one)
    # event 0 by hand: peak-to-peak weights on the channels it carries within 75 um
    w = events["waveform"][0].astype(np.float32)
    ptp = (w.max(axis=0) - w.min(axis=0)).astype(np.float64)
    ptp *= events["channel_mask"][0] & (np.linalg.norm(offsets[0].astype(np.float64), axis=1) <= 75.0)
    expected = locations[channel_index[0]] + (ptp[:, None] * offsets[0]).sum(axis=0) / ptp.sum()
    np.testing.assert_allclose(one[0], expected, rtol=1e-5)


def test_vectorised_grid_localisation_gives_spikeinterfaces_positions():
    """The motion estimate's grid_convolution localisation, its percentile step vectorised and its
    weights computed where nonzero, returns SpikeInterface's positions bit for bit, on a drifting
    dense probe."""
    import warnings

    from spikeinterface.postprocessing import localization_tools
    from spikeinterface.sortingcomponents.peak_detection import detect_peaks
    from spikeinterface.sortingcomponents.peak_localization import localize_peaks

    from inference.grid_localization import _their_convolution_weights, localize_grid_convolution, rows_nanpercentile
    from spikevault.extract import preprocess
    from spikevault.synth import generate_recording

    rng = np.random.default_rng(0)
    scores = rng.standard_normal((500, 24)).astype(np.float32)
    scores[scores < 0.3] = np.nan
    scores[:3] = np.nan  # rows with nothing valid
    scores[3, 1:] = np.nan  # one valid value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.array_equal(rows_nanpercentile(scores, 95.0), np.nanpercentile(scores, 95.0, axis=1), equal_nan=True)

    rec, _ = generate_recording(probe="dense64", duration_s=6.0, num_units=5, seed=3, drift_amplitude_um=15.0,
                                drift_period_s=4.0)
    prep = preprocess(rec)
    peaks = detect_peaks(prep, method="locally_exclusive", method_kwargs=dict(detect_threshold=5.0), job_kwargs=JOB)
    assert len(peaks) > 100
    theirs = localize_peaks(prep, peaks, method="grid_convolution", seed=0, job_kwargs=JOB)
    ours = localize_grid_convolution(prep, peaks, JOB, seed=0)
    for axis in ("x", "y", "z"):
        assert np.array_equal(ours[axis], theirs[axis])
    # its grid weights were ours (inference.grid_localization.convolution_weights), swapped in
    # for the call only
    assert localization_tools.get_convolution_weights is _their_convolution_weights


def test_grid_localisation_from_the_cache_windows_gives_the_pass_positions():
    """The motion estimate reads each peak's window from the sort's in-memory cache instead of
    a pass over the recording: the cache's own values (its chunks' bit for bit, zeros beyond the
    ends), SpikeInterface's prototype bit for bit, and the pass's positions to float32 rounding,
    with one thread or two."""
    from spikeinterface.core.core_tools import ms_to_samples
    from spikeinterface.sortingcomponents.peak_detection import detect_peaks
    from spikeinterface.sortingcomponents.tools import get_prototype_and_waveforms_from_peaks

    from inference.grid_localization import (GRID_MS_AFTER, GRID_MS_BEFORE, localize_grid_convolution,
                                             prototype_from_windows)
    from inference.sort import _cache, _cache_windows
    from spikevault.extract import preprocess
    from spikevault.synth import generate_recording

    rec, _ = generate_recording(probe="dense64", duration_s=6.0, num_units=5, seed=3, drift_amplitude_um=15.0,
                                drift_period_s=4.0)
    prep = preprocess(rec)
    assert _cache_windows(prep) is None  # not the cache: the pass
    cached = _cache(prep, "memory", JOB)
    windows = _cache_windows(cached)
    traces = cached.get_traces()
    frames = np.array([0, 3, 500, len(traces) - 2])
    got = windows(0, frames, 5, 7, np.array([3, 0, 40]))
    padded = np.concatenate([np.zeros((5, 64), np.float32), traces, np.zeros((7, 64), np.float32)])
    assert got.dtype == np.float32
    assert np.array_equal(got, np.stack([padded[f: f + 12][:, [3, 0, 40]] for f in frames]))

    peaks = detect_peaks(cached, method="locally_exclusive", method_kwargs=dict(detect_threshold=5.0), job_kwargs=JOB)
    assert len(peaks) > 100
    fs = cached.get_sampling_frequency()
    nbefore, nafter = ms_to_samples(GRID_MS_BEFORE, fs), ms_to_samples(GRID_MS_AFTER, fs)
    theirs, _, _ = get_prototype_and_waveforms_from_peaks(cached, peaks, ms_before=GRID_MS_BEFORE,
                                                          ms_after=GRID_MS_AFTER, seed=0, job_kwargs=JOB)
    assert np.array_equal(prototype_from_windows(cached, peaks, windows, nbefore, nafter, seed=0), theirs,
                          equal_nan=True)
    by_pass = localize_grid_convolution(cached, peaks, JOB, seed=0)
    for n_jobs in (1, 2):
        ours = localize_grid_convolution(cached, peaks, {**JOB, "n_jobs": n_jobs}, seed=0, windows=windows)
        for axis in ("x", "y", "z"):
            assert np.allclose(ours[axis], by_pass[axis], rtol=0, atol=1e-3)
        assert np.mean(ours["y"] == by_pass["y"]) > 0.3  # most equal bit for bit


@pytest.mark.filterwarnings("ignore:The extractor is not serializable")
def test_templates_from_the_cache_windows_are_spikeinterfaces_averages(easy):
    """Templates are averaged from the cache's windows, not by a pass over the recording:
    SpikeInterface's ``estimate_templates`` to float32 rounding, on two segments, with a unit
    of no spikes, in one thread or two."""
    from spikeinterface.core import append_recordings
    from spikeinterface.core.waveform_tools import estimate_templates

    from inference.sort import _cache, average_spikes
    from spikevault.extract import preprocess

    rec, _ = easy
    prep = preprocess(rec)
    two = append_recordings([prep.frame_slice(0, 150_000), prep.frame_slice(150_000, 300_000)])
    cached = _cache(two, "memory", JOB)
    rng = np.random.default_rng(0)
    n = 700
    spikes = np.zeros(n, dtype=[("sample_index", "int64"), ("unit_index", "int64"), ("segment_index", "int64")])
    spikes["segment_index"] = rng.integers(0, 2, n)
    spikes["sample_index"] = rng.integers(100, 150_000 - 100, n)
    spikes["unit_index"] = rng.choice([0, 1, 3], n)  # unit 2 has none
    spikes = spikes[np.lexsort((spikes["sample_index"], spikes["segment_index"]))]
    theirs = estimate_templates(cached, spikes, np.arange(4), 30, 60, return_in_uV=False, **JOB)
    ours = average_spikes(cached, spikes, 4, 30, 60, JOB)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())
    assert not ours[2].any()
    # blocks of spikes in two threads: the int16 sums are exact, so the same values
    assert np.array_equal(average_spikes(cached, spikes, 4, 30, 60, {"n_jobs": 2}), ours)
    assert np.array_equal(average_spikes(prep, spikes[spikes["segment_index"] == 0], 4, 30, 60, JOB),
                          estimate_templates(prep, spikes[spikes["segment_index"] == 0], np.arange(4), 30, 60,
                                             return_in_uV=False, **JOB))  # not the cache: SpikeInterface's


def test_grid_sub_weights_are_spikeinterfaces_array():
    """A peak channel's grid weights, gathered directly, are SpikeInterface's
    ``weights[:, channel_mask, :][:, :, nearest_mask]``: the same values with the same strides
    (numpy's products follow the memory layout, so the positions stay the same bit for bit)."""
    from inference.grid_localization import sub_weights

    rng = np.random.default_rng(0)
    for channels, positions in [(384, 2000), (64, 300), (4, 40)]:
        weights = rng.random((5, channels, positions)).astype(np.float32)
        channel_mask, nearest_mask = rng.random(channels) > 0.6, rng.random(positions) > 0.8
        theirs = weights[:, channel_mask, :][:, :, nearest_mask]
        ours = sub_weights(weights, channel_mask, nearest_mask)
        assert np.array_equal(ours, theirs) and ours.strides == theirs.strides
        products = rng.random((7, int(channel_mask.sum()))).astype(np.float32)
        assert all(np.array_equal(np.dot(products, ours[k]), np.dot(products, theirs[k])) for k in range(5))


@pytest.mark.parametrize("probe", ["neuropixels", "dense64", "tetrode"])
def test_grid_convolution_weights_are_spikeinterfaces(probe):
    """The grid's weights, computed only where they can be nonzero, are SpikeInterface's bit for
    bit (its default mode, other thresholds and decays, and the other mode, which is
    SpikeInterface's own)."""
    from spikeinterface.postprocessing import localization_tools
    from spikeinterface.postprocessing.localization_tools import get_grid_convolution_templates_and_weights

    from inference.grid_localization import convolution_weights
    from spikevault.synth import make_probe

    original = localization_tools.get_convolution_weights
    contacts = make_probe(probe).contact_positions
    positions, _, _, _ = get_grid_convolution_templates_and_weights(contacts, 40.0, 5.0, 50.0, {})
    distances = np.linalg.norm(contacts[:, None, :2] - positions[None, :, :2], axis=2)
    for kwargs in ({}, {"sparsity_threshold": 0.1}, {"sigma_3d": 5.0}, {"mode": "gaussian_2d"}):
        theirs, their_z = original(distances, **kwargs)
        ours, our_z = convolution_weights(distances, **kwargs)
        assert ours.dtype == theirs.dtype and np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), kwargs
        assert np.array_equal(our_z, their_z)
