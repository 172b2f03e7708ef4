"""Clusterers and curation on controlled data: none is told the number of clusters."""

from __future__ import annotations

import numpy as np
import pytest

from inference.cluster import CLUSTERERS, ClusterParams, cluster_by_region, cluster_features, make_regions
from inference.curation import CurationParams, EventSet, curate, merge_clusters, reject_noise, split_clusters


def _blobs(k=5, n_per=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=12.0, size=(k, d))
    X = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centers])
    y = np.repeat(np.arange(k), n_per)
    return X, y


@pytest.mark.parametrize("method", CLUSTERERS)
def test_clusterers_find_the_number_of_clusters(method):
    from sklearn.metrics import adjusted_rand_score

    X, y = _blobs()
    labels = cluster_features(X, ClusterParams(method=method, max_components=12, standardize=True))
    assert labels.shape == y.shape
    ok = labels >= 0
    assert ok.mean() > 0.8  # hdbscan may leave a few points as noise
    assert adjusted_rand_score(y[ok], labels[ok]) > 0.9
    n_found = len(np.unique(labels[ok]))
    if method == "hdbscan":
        # leaf selection errs towards more, purer clusters; curation's merge re-joins them
        assert 5 <= n_found <= 8
    else:
        assert n_found == 5



def test_hdbscan_events_left_as_noise_are_kept_or_reclustered():
    """Leaf HDBSCAN keeps only the dense cores of two big Gaussian clusters and calls half of
    their events noise: 'keep' leaves them unassigned, 'recluster' clusters them once more (and
    no cluster spans the two blobs)."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(scale=0.5, size=(3000, 4)), rng.normal(scale=0.5, size=(3000, 4)) + [8, 0, 0, 0]])
    blob = np.repeat([0, 1], 3000)
    kept = cluster_features(X, ClusterParams(hdbscan_noise="keep"))
    assert (kept < 0).mean() > 0.3
    again = cluster_features(X, ClusterParams(hdbscan_noise="recluster"))
    assert np.all(again[kept >= 0] == kept[kept >= 0])
    assert (again < 0).sum() < (kept < 0).sum()
    for u in np.unique(again[again >= 0]):
        assert len(np.unique(blob[again == u])) == 1
    with pytest.raises(ValueError, match="hdbscan_noise must be"):
        ClusterParams(hdbscan_noise="assign")


def test_hdbscan_keeps_a_lone_unit():
    """A region holding one unit is one cluster, not noise. HDBSCAN's leaf selection returns no
    cluster at all when its tree never splits, allow_single_cluster notwithstanding
    (scikit-learn-contrib/hdbscan#476); the static benchmark lost a 28 uV neuron that way."""
    rng = np.random.default_rng(0)
    lone = rng.normal(size=(300, 12))
    assert np.all(cluster_features(lone, ClusterParams(method="hdbscan")) == 0)
    # beside a region of two units, by region
    X = np.concatenate([lone, rng.normal(size=(300, 12)) + 20.0, rng.normal(size=(300, 12)) - 20.0])
    depth = np.repeat([100.0, 600.0, 600.0], 300)
    labels, _ = cluster_by_region(X, depth, ClusterParams(method="hdbscan", region_um=200.0, min_region_events=100))
    assert len(np.unique(labels[:300])) == 1 and labels[0] >= 0
    found = labels[300:]
    assert (found >= 0).mean() > 0.8 and len(np.unique(found[found >= 0])) >= 2


def test_cluster_params_validation_names_the_flag():
    with pytest.raises(ValueError, match="clusterer must be one of"):
        ClusterParams(method="dbscan")
    with pytest.raises(ValueError, match="max_components"):
        ClusterParams(max_components=0)


def test_regions_and_parallel_region_clustering():
    X, y = _blobs(k=4, n_per=250)
    depth = np.where(y < 2, 100.0, 600.0) + np.random.default_rng(1).normal(scale=5, size=len(y))
    region = make_regions(depth, region_um=200.0, min_region_events=100)
    assert len(np.unique(region)) == 2
    labels, reg = cluster_by_region(X, depth, ClusterParams(method="gmm", region_um=200.0), n_jobs=2)
    assert np.array_equal(reg, region)
    # no cluster spans two regions and the four blobs are found
    for u in np.unique(labels[labels >= 0]):
        assert len(np.unique(reg[labels == u])) == 1
    assert len(np.unique(labels[labels >= 0])) == 4
    # the worker processes give what one process gives
    for method in ("gmm", "hdbscan"):
        params = ClusterParams(method=method, region_um=200.0)
        assert np.array_equal(cluster_by_region(X, depth, params, n_jobs=2)[0],
                              cluster_by_region(X, depth, params, n_jobs=1)[0])


def _event_set(seed=0, n=400):
    """Two 'units' on a 4-channel line: same peak channel, different shapes."""
    rng = np.random.default_rng(seed)
    T, K, C = 40, 4, 4
    t = np.arange(T)
    shape_a = -100 * np.exp(-0.5 * ((t - 12) / 2.0) ** 2)
    shape_b = -100 * np.exp(-0.5 * ((t - 12) / 2.0) ** 2) + 60 * np.exp(-0.5 * ((t - 20) / 3.0) ** 2)
    spatial = np.array([1.0, 0.6, 0.3, 0.1])
    wf = np.concatenate([shape_a[None, :, None] * spatial + rng.normal(scale=5, size=(n, T, K)),
                         shape_b[None, :, None] * spatial + rng.normal(scale=5, size=(n, T, K))]).astype(np.float16)
    ev_ch = np.tile(np.arange(K), (2 * n, 1))
    loc = np.stack([np.zeros(C), np.arange(C) * 20.0], axis=1)
    truth = np.repeat([0, 1], n)
    return EventSet(wf, ev_ch, loc, np.full(C, 5.0)), truth


def test_split_pca_is_scikit_learns_in_float64():
    """The split test's PCA (its top components only, in float64) gives scikit-learn's PCA of the
    same float64 data: the same components, signs included, and the same projections."""
    from sklearn.decomposition import PCA

    from inference.curation import _SplitPCA

    rng = np.random.default_rng(0)
    scales = np.linspace(5.0, 0.5, 40)
    rotation = np.linalg.qr(rng.standard_normal((40, 40)))[0]
    X = (rng.standard_normal((600, 40)) * scales @ rotation + 3.0).astype(np.float32)
    ours = _SplitPCA(6).fit(X)
    theirs = PCA(6, svd_solver="covariance_eigh").fit(X.astype(np.float64))
    np.testing.assert_allclose(ours.components_, theirs.components_, atol=1e-8)
    np.testing.assert_allclose(ours.transform(X), theirs.transform(X.astype(np.float64)), atol=1e-7)


@pytest.mark.parametrize("n,k", [(336, 6), (40, 6), (12, 12), (1, 1)])
def test_top_eigenvectors_are_scipys_bit_for_bit_and_threads_run_together(n, k):
    """The split test's eigensolver (LAPACK's dsyevr through ctypes, without the interpreter lock)
    gives SciPy's ``eigh(subset_by_index=...)`` exactly, also from threads running at once."""
    from concurrent.futures import ThreadPoolExecutor

    from scipy.linalg import eigh

    from inference.curation import top_eigenvectors

    rng = np.random.default_rng(n)
    matrices = []
    for _ in range(6):
        X = rng.standard_normal((n + 30, n)) * rng.uniform(0.1, 10.0, n)
        matrices.append(X.T @ X / len(X))
    expected = [eigh(C, subset_by_index=[n - k, n - 1], driver="evr")[1] for C in matrices]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda C: top_eigenvectors(C, k), matrices))
    for e, g in zip(expected, got):
        assert g.shape == (n, k)
        np.testing.assert_array_equal(g, e)
    with pytest.raises(ValueError, match="square matrix"):
        top_eigenvectors(np.zeros((3, 4)), 1)


def test_split_separates_two_units_in_one_cluster():
    events, truth = _event_set()
    labels, n_split = split_clusters(events, np.zeros(len(truth), dtype=np.int64), CurationParams())
    assert n_split >= 1
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, labels) > 0.95


def test_merge_joins_halves_of_one_unit_and_keeps_distinct_units():
    events, truth = _event_set()
    # unit 0 cut in two arbitrary halves, unit 1 intact
    labels = truth.copy() * 2
    labels[: len(truth) // 4] = 1
    merged, n_merge = merge_clusters(events, labels, CurationParams())
    assert n_merge == 1
    assert len(np.unique(merged)) == 2
    assert len(np.unique(merged[truth == 0])) == 1 and len(np.unique(merged[truth == 1])) == 1


def test_curate_merges_a_fragment_and_rejects_noise_clusters():
    events, truth = _event_set()
    labels = truth.copy()
    labels[:10] = 7  # a fragment of unit 0: merged back, not a unit of its own
    out, reason, stats = curate(events, labels, duration_s=10.0, nbefore=12, params=CurationParams())
    assert stats["final_clusters"] == 2
    assert len(np.unique(out[truth == 0])) == 1 and np.all(reason == 0)
    # pure-noise events form a cluster with no spike in its template: rejected as low SNR
    rng = np.random.default_rng(3)
    noise = EventSet(rng.normal(scale=5, size=(300, 40, 4)).astype(np.float16), np.tile(np.arange(4), (300, 1)),
                     events.channel_locations, events.noise_levels_uv)
    out, reason, _ = curate(noise, np.zeros(300, dtype=np.int64), 10.0, 12, CurationParams())
    assert np.all(out == -1) and np.all(reason == 3)
    # too few events: rejected as a small cluster
    out, reason, _ = curate(events, np.where(np.arange(len(truth)) < 15, 0, -1), 10.0, 12,
                            CurationParams(min_cluster_size=20))
    assert np.all(out == -1) and set(np.unique(reason[:15])) <= {1, 2}


def test_curation_threads_give_the_same_labels_as_one():
    """Split and merge tests run in threads, each with its own seeded generator: the labels do
    not depend on n_jobs (a cluster to split, halves to merge, a fragment)."""
    events, truth = _event_set()
    cut = truth * 2
    cut[: len(truth) // 4] = 1
    cut[-10:] = 9
    for labels in (np.zeros(len(truth), dtype=np.int64), cut):
        one = curate(events, labels, duration_s=10.0, nbefore=12, params=CurationParams())
        two = curate(events, labels, duration_s=10.0, nbefore=12, params=CurationParams(), n_jobs=2)
        assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1]) and one[2] == two[2]
        assert one[2]["final_clusters"] == 2


def test_a_curation_cycle_ends_where_the_rounds_would_have_stopped():
    """When a round's labels are those of two rounds before, the rounds to come repeat the last
    two: the loop's end is found from their counts (a ping-pong round, a round with neither, or
    the last round), and its parity picks which of the two labellings it ends on."""
    from inference.curation import _end_of_cycle

    # drift64's rounds: (1, 39), (4, 4), (3, 2), (1, 2), cycling from the fourth round (index 3)
    # no rule fires: the last round (index 5), which has the fourth round's labels (5 - 3 is even)
    assert _end_of_cycle([(1, 39), (4, 4), (3, 2), (1, 2)], 6) == 5
    assert _end_of_cycle([(1, 39), (4, 4), (3, 2), (1, 2)], 7) == 6
    # rounds alternating (2, 3), (2, 1) from the third: the repeat of (2, 3) after (2, 1) is a
    # ping-pong round, and the loop would stop there, on the second round's labels
    assert _end_of_cycle([(5, 9), (2, 3), (2, 1)], 8) == 3
    assert _end_of_cycle([(5, 9), (2, 3), (2, 1)], 3) == 2  # no round left: the last one


def test_merge_window_passes_over_pairs_whose_cluster_merged_earlier_in_it():
    """Threads decide MERGE_WINDOW pairs at a time; pairs sharing a cluster with an earlier merge
    in the window are passed over, as one at a time: a unit in four pieces merges alike."""
    from concurrent.futures import ThreadPoolExecutor

    from inference.curation import MERGE_WINDOW

    events, truth = _event_set()
    pieces = truth * 4
    pieces[truth == 0] = np.arange(int(np.sum(truth == 0))) % 4  # unit 0 in four pieces: six pairs
    assert MERGE_WINDOW > 1
    one = merge_clusters(events, pieces, CurationParams())
    with ThreadPoolExecutor(2) as pool:
        two = merge_clusters(events, pieces, CurationParams(), pool)
    assert np.array_equal(one[0], two[0]) and one[1] == two[1] == 3
    assert len(np.unique(one[0][truth == 0])) == 1 and len(np.unique(one[0])) == 2


def test_template_similarities_are_each_pairs_best_shifted_cosine():
    """Every pair's best cosine over shifts, from one matrix product per shift: the per-pair
    definition (t1[s:] against t2[:-s] for s > 0), to float32 rounding; a zero template is
    similar to nothing."""
    from inference.curation import _similarities

    rng = np.random.default_rng(0)
    templates = rng.standard_normal((6, 20, 5)).astype(np.float32)
    templates[3] = np.roll(templates[1], 2, axis=0)  # unit 1 two samples later
    templates[4] = 0.0
    sims, shifts = _similarities(templates, max_shift=2)
    for i in range(6):
        for j in range(6):
            best, best_s = -1.0, 0
            for s in range(-2, 3):
                a = templates[i][max(0, s): 20 + min(0, s)].astype(np.float64)
                b = templates[j][max(0, -s): 20 + min(0, -s)].astype(np.float64)
                den = np.linalg.norm(a) * np.linalg.norm(b)
                if den > 0 and np.sum(a * b) / den > best:
                    best, best_s = np.sum(a * b) / den, s
            assert abs(sims[i, j] - best) < 1e-6 and shifts[i, j] == best_s
    assert shifts[3, 1] == 2 and sims[3, 1] > 0.8  # t1[2:] matches t2[:-2]
    assert np.all(sims[4] == -1.0) and np.all(sims[:, 4] == -1.0)


def test_cluster_templates_in_threads_are_those_of_one():
    """Cluster templates are averaged in threads from subsets drawn in order from one
    generator: the same as in one thread."""
    from concurrent.futures import ThreadPoolExecutor

    from inference.curation import compute_templates

    events, truth = _event_set()
    labels = truth * 3 + np.arange(len(truth)) % 3
    one = compute_templates(events, labels, max_per_unit=20, seed=1)
    with ThreadPoolExecutor(2) as pool:
        two = compute_templates(events, labels, max_per_unit=20, seed=1, pool=pool)
    assert all(np.array_equal(a, b) for a, b in zip(one, two)) and len(one[0]) == 6


def test_noise_rejection_reads_the_channels_most_events_carry():
    """A unit whose trough reaches a far channel earlier (a propagating spike) is kept: that channel
    is carried only by the tenth of its events detected nearest to it, and its mean there, though
    the largest, does not decide whether the unit is spike-like."""
    rng = np.random.default_rng(5)
    n, T, C = 400, 40, 5
    t = np.arange(T)
    near = -100 * np.exp(-0.5 * ((t - 12) / 2.0) ** 2)
    far = -250 * np.exp(-0.5 * ((t - 3) / 2.0) ** 2)  # 9 samples early, carried by 10% of events
    wf = rng.normal(scale=5, size=(n, T, 4))
    wf[:, :, 0] += near
    wf[:, :, 1:3] += near[:, None] * 0.5
    ev_ch = np.tile(np.array([0, 1, 2, -1]), (n, 1))
    few = np.arange(n) < n // 10
    ev_ch[few, 3] = 4
    wf[few, :, 3] += far
    loc = np.stack([np.zeros(C), np.arange(C) * 20.0], axis=1)
    events = EventSet(wf.astype(np.float16), ev_ch, loc, np.full(C, 5.0))
    out, reason = reject_noise(events, np.zeros(n, dtype=np.int64), 10.0, 12, CurationParams())
    assert np.all(out == 0) and np.all(reason == 0)
    # the same far channel carried by most events does make the template misaligned: rejected
    ev_ch[:, 3] = 4
    wf[:, :, 3] = rng.normal(scale=5, size=(n, T)) + far
    events = EventSet(wf.astype(np.float16), ev_ch, loc, np.full(C, 5.0))
    out, reason = reject_noise(events, np.zeros(n, dtype=np.int64), 10.0, 12, CurationParams())
    assert np.all(out == -1) and np.all(reason == 4)

def _drifted_unit(seed=0, n=600, delta=0.25):
    """One unit whose waveform has two states (its trough 'delta' sharper in the second), split
    into two clusters by state; a third, different unit. Times: the states alternate in blocks."""
    rng = np.random.default_rng(seed)
    T, K = 40, 4
    t = np.arange(T)
    base = -100 * np.exp(-0.5 * ((t - 12) / 2.0) ** 2)
    other = -100 * np.exp(-0.5 * ((t - 12) / 2.0) ** 2) + 70 * np.exp(-0.5 * ((t - 20) / 3.0) ** 2)
    spatial = np.array([1.0, 0.6, 0.3, 0.1])
    state_b = base * (1 + delta * np.exp(-0.5 * ((t - 12) / 1.0) ** 2))
    wf = np.concatenate([base[None, :, None] * spatial + rng.normal(scale=3, size=(n, T, K)),
                         state_b[None, :, None] * spatial + rng.normal(scale=3, size=(n, T, K)),
                         other[None, :, None] * spatial + rng.normal(scale=3, size=(n, T, K))]).astype(np.float16)
    # states alternate every 10 s over 120 s; the other unit fires throughout
    block = rng.uniform(0, 10, size=2 * n) + 20 * rng.integers(0, 6, size=2 * n)
    times = np.concatenate([block[:n], block[n:] + 10, rng.uniform(0, 120, size=n)])
    loc = np.stack([np.zeros(K), np.arange(K) * 20.0], axis=1)
    return wf, np.tile(np.arange(K), (3 * n, 1)), loc, times, np.repeat([0, 1, 2], n)


def test_merge_joins_one_unit_split_in_time_but_not_distinct_units():
    wf, ch, loc, times, labels = _drifted_unit()
    noise = np.full(4, 3.0)
    # without event times the two states are bimodal: kept apart (the test is about shape)
    p = CurationParams(merge_sure_similarity=1.0)
    split, _ = merge_clusters(EventSet(wf, ch, loc, noise), labels, p)
    assert len(np.unique(split)) == 3
    # with times: the states never fire together -> one unit; the other unit stays distinct
    merged, n = merge_clusters(EventSet(wf, ch, loc, noise, times_s=times), labels, p)
    assert n == 1 and len(np.unique(merged[labels < 2])) == 1 and len(np.unique(merged)) == 2
    # two units firing at the same times are not merged by the time rule however similar
    same_time = times.copy()
    same_time[labels == 1] = np.random.default_rng(1).uniform(0, 120, size=np.sum(labels == 1))
    kept, _ = merge_clusters(EventSet(wf, ch, loc, noise, times_s=same_time), labels, p)
    assert len(np.unique(kept)) == 3
    # near-identical templates of similar amplitude merge without the unimodality test
    sure, _ = merge_clusters(EventSet(wf, ch, loc, noise), labels,
                             CurationParams(merge_sure_similarity=0.95, merge_sure_amplitude_ratio=0.75))
    assert len(np.unique(sure[labels < 2])) == 1 and len(np.unique(sure)) == 2


def test_refractory_check_separates_one_neuron_from_two():
    """Two parts of one refractory train pass the check; two independent trains do not."""
    from inference.curation import CurationParams, EventSet, _refractory_ok

    rng = np.random.default_rng(0)
    # one neuron: 4 ms refractory, ~20 Hz for 60 s; a second, independent one
    isi = 0.004 + rng.exponential(0.05, 1500)
    one = np.cumsum(isi)[np.cumsum(isi) < 60.0]
    other = np.sort(rng.uniform(0, 60.0, len(one)))
    p = CurationParams()

    def check(ta, tb):
        t = np.concatenate([ta, tb])
        ev = EventSet(np.zeros((len(t), 2, 1), np.float32), np.zeros((len(t), 1), int), np.zeros((1, 2)),
                      np.ones(1), times_s=t)
        return _refractory_ok(ev, np.arange(len(ta)), np.arange(len(ta), len(t)), p)

    assert check(one[0::2], one[1::2])  # one neuron split in two (by amplitude, or by drift phase)
    assert not check(one, other)  # two neurons


def test_forked_region_workers_survive_an_openmp_pool_in_the_parent():
    """An OpenMP runtime that ran a parallel region with two threads before the fork left its
    pool behind in the parent: the forked region workers must not wait for it (they hung in
    scikit-learn's KMeans before the workers limited themselves to one thread). Run in a fresh
    interpreter, with a timeout, so a hang fails the test instead of the suite."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits
from inference.cluster import ClusterParams, cluster_by_region
X = np.random.default_rng(0).normal(size=(4000, 8))
with threadpool_limits(limits=2, user_api="openmp"):
    KMeans(5, n_init=2, random_state=0).fit(X)
y = np.where(np.arange(len(X)) < 2000, 100.0, 600.0)
labels, _ = cluster_by_region(X, y, ClusterParams(method="gmm", region_um=200.0), n_jobs=2)
print("regions clustered", labels.max() + 1)
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "regions clustered" in out.stdout
