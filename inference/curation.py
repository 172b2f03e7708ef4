"""Split and merge clusters until each is unimodal and every template distinct; reject noise.

The tests follow isosplit (Magland & Barnett 2015): a cluster is *split* when its events, projected
on the discriminant (LDA) axis between the two halves of a 2-means partition of its local waveform
features, are not unimodal (SpikeInterface's ``isocut`` dip score above a threshold); two clusters
are *merged* when their templates are similar and their events, projected on the axis joining the
two templates, form one unimodal distribution -- or when their templates differ by less than the
noise, where no projection could separate them.

Everything works on the events' own ``[T, K]`` waveforms: :class:`EventSet` maps each event's K
channels to the probe's channels, so templates and tests live on absolute channels and clusters
whose events peak on neighbouring channels compare correctly. Channels an event does not carry
(far from its peak) are filled with the cluster's template for that channel, which neither helps
nor hinders a split.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

#: Reasons an event ends up in the rejected set (codes saved in ``rejected_events.npz``).
REJECT_REASONS = {
    1: "unclustered",       # left as noise by the clusterer
    2: "small_cluster",     # too few events / firing rate too low
    3: "low_snr",           # template peak amplitude below min_snr x noise
    4: "not_spike_like",    # template has no clear trough/peak at the detection sample
}


@dataclass
class CurationParams:
    """Settings of the split / merge / noise-rejection loop."""

    split_dipscore: float = 3.0
    """Split a cluster when the isocut dip score along its discriminant axis exceeds this."""
    merge_dipscore: float = 2.0
    """Merge two similar clusters when the dip score along the template-difference axis is below this."""
    merge_min_similarity: float = 0.6
    """Only pairs whose templates have at least this cosine similarity are tested for a merge."""
    merge_radius_um: float = 60.0
    """Only pairs whose template peak channels are at most this far apart are tested."""
    merge_noise_ratio: float = 1.5
    """Merge without a test when the templates' largest difference is below this many noise SDs."""
    merge_sure_similarity: float = 1.0
    """Merge without the unimodality test when the templates' cosine similarity (all channels,
    best shift) is at least this, their peak channels are within ``merge_radius_um``, their
    peak amplitudes within ``merge_sure_amplitude_ratio`` and their spike trains pass the
    refractory check (``merge_max_refractory_ratio``): for units split by the sub-pitch phase of
    a motion-corrected displacement, or by amplitude. 1.0 (the default) turns it off: the sort's
    final merge after matching now joins those pairs (drift64 0.820 off vs 0.821 at 0.95;
    static32 0.874 vs 0.898), and at 0.95 two neurons of a tetrode, where every unit sits at the
    same place, were merged even with the refractory check (tetrode 0.657 off vs 0.414)."""
    merge_sure_amplitude_ratio: float = 0.8
    """Smaller / larger template peak amplitude of a pair merged by ``merge_sure_similarity``."""
    merge_time_similarity: float = 0.85
    """Pairs with at least this template similarity whose firing over time is complementary
    (see ``merge_time_overlap``) are merged without the unimodality test: one unit whose
    waveform changed with the probe's drift (near the probe's ends, where motion correction
    extrapolates) is cut in time, not in waveform space."""
    merge_time_overlap: float = 0.4
    """Complementary firing: the overlap of the two clusters' spike-count histograms over
    ``merge_time_bins`` time bins (sum of the bin-wise minimum of the two normalised
    histograms: 1 for two clusters firing alike over time, 0 for two that never fire in the
    same bin) is below this."""
    merge_max_refractory_ratio: float = 0.3
    """Refractory check of the merges made without the unimodality test (``merge_sure_*`` and
    ``merge_time_*``): the pair is not merged when the two clusters' events fall within
    ``refractory_ms`` of each other more than this fraction of the times two independent trains
    would. Parts of one neuron almost never do; two neurons firing independently do, by chance."""
    refractory_ms: float = 1.5
    """Refractory period of the check above (coincidences within ``censor_ms`` are not counted)."""
    censor_ms: float = 0.2
    """Coincidences closer than this are one spike seen twice, not a refractory violation."""
    merge_time_bins: int = 12
    """Time bins of the firing-overlap test (needs at least 5 events per bin in each cluster)."""
    max_rounds: int = 6
    """Split/merge rounds (each: split every cluster recursively, then merge until stable)."""
    max_split_depth: int = 4
    """Recursion depth of the split of one cluster in one round."""
    min_cluster_size: int = 20
    """Clusters with fewer events are rejected as noise (and never split below this)."""
    min_rate_hz: float = 0.05
    """Clusters firing less than this are rejected as noise."""
    min_snr: float = 3.5
    """Clusters whose template peak amplitude is below this many noise SDs are rejected."""
    split_pca_components: int = 6
    """Local PCA components of a cluster's waveforms used by the split test."""
    local_channels: int = 6
    """Channels (largest template energy) used in split and merge tests."""
    max_shift: int = 2
    """Events are realigned on their cluster's template by up to this many samples before tests."""
    max_test_events: int = 2000
    """Events per cluster used in one test (random subset; all events are then assigned)."""
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("split_dipscore", "merge_dipscore", "merge_radius_um", "merge_noise_ratio", "min_snr",
                     "refractory_ms"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("merge_min_similarity", "merge_sure_similarity", "merge_sure_amplitude_ratio",
                     "merge_time_similarity", "merge_time_overlap", "merge_max_refractory_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("max_rounds", "min_cluster_size", "split_pca_components", "local_channels", "max_test_events",
                     "merge_time_bins"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid curation parameters: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------ events
class EventSet:
    """Events of one recording with their channels on the probe.

    Parameters
    ----------
    waveforms : ndarray [N, T, K]
        Event waveforms (float16 or float32, microvolts).
    event_channels : ndarray [N, K] int
        Probe channel index of each of an event's K channels, ``-1`` where masked.
    channel_locations : ndarray [C, 2]
        Probe channel positions in micrometres.
    noise_levels_uv : ndarray [C]
        Noise SD of each probe channel.
    times_s : ndarray [N], optional
        Time of each event in seconds (segments laid end to end); enables the merge of clusters
        that are one unit at different times (see ``CurationParams.merge_time_overlap``).
    """

    def __init__(self, waveforms, event_channels, channel_locations, noise_levels_uv, times_s=None):
        self.times_s = None if times_s is None else np.asarray(times_s, dtype=np.float64)
        self.waveforms = waveforms
        self.event_channels = np.asarray(event_channels, dtype=np.int64)
        self.channel_locations = np.asarray(channel_locations, dtype=float)
        self.noise_levels_uv = np.asarray(noise_levels_uv, dtype=float)
        self.num_events, self.num_samples, self.num_event_channels = waveforms.shape
        self.num_channels = len(self.channel_locations)

    def dense(self, idx: np.ndarray, channels: np.ndarray, fill: np.ndarray | float = np.nan) -> np.ndarray:
        """Waveforms of events ``idx`` on probe ``channels`` -> ``[n, T, len(channels)]`` float32.

        Channels an event does not carry take ``fill`` (a ``[T, M]`` array or a scalar).
        """
        idx = np.asarray(idx)
        channels = np.asarray(channels)
        n, T, M = len(idx), self.num_samples, len(channels)
        where = np.full(self.num_channels + 1, -1, dtype=np.int64)
        where[channels] = np.arange(M)
        ev_ch = self.event_channels[idx]
        col = where[np.where(ev_ch >= 0, ev_ch, self.num_channels)]  # [n, K]
        out = np.empty((n, T, M), dtype=np.float32)
        out[:] = fill
        rows, ks = np.nonzero(col >= 0)
        out[rows, :, col[rows, ks]] = self.waveforms[idx[rows], :, ks]
        return out

    def template(self, idx: np.ndarray, channels: np.ndarray | None = None, min_coverage: float = 0.0) -> np.ndarray:
        """Mean waveform ``[T, M]`` of events ``idx`` on ``channels`` (all by default); channels
        carried by no event, or by fewer than ``min_coverage`` of the events, are 0."""
        from scipy.sparse import csr_matrix

        idx = np.asarray(idx)
        ev_ch = self.event_channels[idx]
        carried = ev_ch >= 0
        rows = ev_ch[carried]
        # per-channel sums as a sparse [C, n_carried] x [n_carried, T] product: no dense
        # [n, T, C] array of NaNs to average (twice as fast; np.add.at is slower than either)
        onehot = csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, np.arange(len(rows)))),
                            shape=(self.num_channels, len(rows)))
        sums = onehot @ self.waveforms[idx].transpose(0, 2, 1)[carried].astype(np.float32)
        counts = np.bincount(rows, minlength=self.num_channels)
        keep = (counts > 0) & (counts >= min_coverage * len(idx))
        t = np.zeros((self.num_channels, self.num_samples), dtype=np.float32)
        t[keep] = sums[keep] / counts[keep, None]
        t = t.T
        return t if channels is None else np.ascontiguousarray(t[:, np.asarray(channels)])


def _sample(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return idx if len(idx) <= n else np.sort(rng.choice(idx, n, replace=False))


def _top_channels(template: np.ndarray, m: int) -> np.ndarray:
    energy = np.ptp(template, axis=0)
    return np.sort(np.argsort(energy)[::-1][:m])


@functools.cache
def _get_isocut():
    """SpikeInterface's numba ``isocut``, with numba's on-disk cache on (compiling it costs
    ~10 s in every new process)."""
    from spikeinterface.sortingcomponents.clustering.isosplit_isocut import isocut

    from spikevault.jit import cache_spikeinterface_kernels

    cache_spikeinterface_kernels()
    return isocut


def _isocut(x: np.ndarray) -> tuple[float, float]:
    isocut = _get_isocut()
    x = np.ascontiguousarray(x, dtype=np.float64)
    if len(x) < 8 or np.ptp(x) == 0:
        return 0.0, float(np.median(x)) if len(x) else 0.0
    dip, cut = isocut(x)
    return float(dip), float(cut)


# ------------------------------------------------------------------------------------ templates
def compute_templates(events: EventSet, labels: np.ndarray, max_per_unit: int = 300, seed: int = 0,
                      min_coverage: float = 0.0, pool: ThreadPoolExecutor | None = None):
    """Templates of every cluster on all probe channels (0 on channels carried by fewer than
    ``min_coverage`` of the cluster's events).

    Returns
    -------
    unit_labels : ndarray [U]
        The cluster labels (``>= 0``), sorted.
    templates : ndarray [U, T, C] float32
    counts : ndarray [U] int
        Events per cluster.
    """
    rng = np.random.default_rng(seed)
    units = np.unique(labels[labels >= 0])
    templates = np.zeros((len(units), events.num_samples, events.num_channels), dtype=np.float32)
    counts = np.zeros(len(units), dtype=np.int64)
    samples = []  # drawn in the units' order from the one generator, then averaged (in threads)
    for i, u in enumerate(units):
        idx = np.flatnonzero(labels == u)
        counts[i] = len(idx)
        samples.append(_sample(idx, max_per_unit, rng))
    for i, t in enumerate(_map(pool, lambda idx: events.template(idx, min_coverage=min_coverage), samples)):
        templates[i] = t
    return units, templates, counts


# ------------------------------------------------------------------------------------ split
def _aligned(events: EventSet, idx: np.ndarray, channels: np.ndarray, template: np.ndarray, max_shift: int) -> np.ndarray:
    """Events ``idx`` on ``channels``, each shifted by up to ``max_shift`` samples to best match
    ``template`` (``[T, M]`` on those channels); returns the central ``[n, T - 2 max_shift, M]``.

    Detection aligns an event on its own peak channel's extremum, so a unit whose peak channel
    alternates between neighbours comes in two alignments; realigning on the cluster template
    keeps the split and merge tests about shape, not about which channel peaked.
    """
    d = events.dense(idx, channels, template)
    T = d.shape[1]
    L = T - 2 * max_shift
    core = template[max_shift: max_shift + L]
    M = d.shape[2]
    out = np.empty((len(idx), L, M), dtype=d.dtype)
    rows = d.reshape(len(idx), T * M)  # a shift's window is a slice of each row: one matrix-vector product
    for _ in range(3):
        # re-estimating the core from the realigned events breaks the tie of a unit whose trough
        # falls between two samples (half its events detected one sample early)
        c = np.ascontiguousarray(core).ravel()
        scores = np.stack([rows[:, k * M: (k + L) * M] @ c for k in range(2 * max_shift + 1)], axis=1)
        best = np.argmax(scores, axis=1)
        for k in range(2 * max_shift + 1):  # one slice per shift (a gather per sample was 4x slower)
            chosen = best == k
            out[chosen] = d[chosen, k: k + L]
        core = out.mean(axis=0)
    return out


class _SplitPCA:
    """The split test's PCA: scikit-learn's ``PCA(k, svd_solver="covariance_eigh")`` in float64,
    computing only the ``k`` eigenvectors it keeps.

    In float32 the covariance (formed as X'X - n mean mean') carries enough rounding that two
    eigensolvers gave a cluster of drift64 seed 3001 dip scores of 2.40 and 3.28 on either side
    of the split threshold, from the same events and the same 2-means partition; in float64
    every solver gives 2.42 (BENCHMARKS.md, twentieth session). A split decided by float32
    rounding would also change with the machine's LAPACK. scikit-learn's solver takes every
    eigenpair (``numpy.linalg.eigh``: 8.6 ms for a test's 336 features in float32); LAPACK's
    ``syevr`` on the top k alone takes 3.6 ms in float64 (:func:`top_eigenvectors`: SciPy's
    ``eigh(subset_by_index=...)``, with the threads' interpreter lock released). The rest is
    scikit-learn's: the components' signs (``svd_flip``), the transform.
    """

    def __init__(self, n_components: int):
        self.n_components = int(n_components)

    def fit(self, X: np.ndarray) -> "_SplitPCA":
        from sklearn.utils.extmath import svd_flip

        X = np.asarray(X, dtype=np.float64)
        n, f = X.shape
        self.mean_ = X.mean(axis=0)
        C = X.T @ X
        C -= n * self.mean_[:, None] * self.mean_[None, :]
        C /= n - 1
        vecs = top_eigenvectors(C, self.n_components)
        _, self.components_ = svd_flip(None, np.ascontiguousarray(vecs[:, ::-1].T), u_based_decision=False)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return X @ self.components_.T - self.mean_ @ self.components_.T


def top_eigenvectors(C: np.ndarray, k: int) -> np.ndarray:
    """The eigenvectors ``[n, k]`` of the ``k`` largest eigenvalues of the symmetric float64 ``C``,
    in increasing order of eigenvalue: ``scipy.linalg.eigh(C, subset_by_index=[n - k, n - 1],
    driver="evr")[1]``, the same values bit for bit, computed without the interpreter lock.

    SciPy's LAPACK wrappers keep the lock while LAPACK runs, so curation's threads took turns in
    their split tests' eigensolver (two threads solving 336 x 336 matrices took as long as one).
    The same routine (LAPACK's ``dsyevr``, SciPy's build, through its Cython API) is called here
    through ``ctypes``, which releases the lock, with SciPy's arguments and workspace.
    """
    C = np.asarray(C, dtype=np.float64)
    n = C.shape[0]
    k = int(k)
    if not (C.ndim == 2 and C.shape[1] == n and 0 < k <= n):
        raise ValueError(f"top_eigenvectors needs a square matrix and 0 < k <= n (got {C.shape}, k={k})")
    syevr = _dsyevr()
    if syevr is None:  # no Cython LAPACK to call: SciPy's own call
        from scipy.linalg import eigh

        return eigh(C, subset_by_index=[n - k, n - 1], driver="evr")[1]
    lwork, liwork = _syevr_workspace(n)
    a = np.array(C, order="F")  # overwritten, as SciPy's copy is
    w = np.empty(n)
    z = np.empty((n, k), order="F")
    isuppz = np.empty(2 * n, dtype=np.intc)
    work = np.empty(lwork)
    iwork = np.empty(liwork, dtype=np.intc)
    ints = np.array([n, n, n - k + 1, n, 0, n, lwork, liwork, 0], dtype=np.intc)  # n lda il iu m ldz lwork liwork info
    reals = np.zeros(3)  # vl, vu, abstol (0: LAPACK's default tolerance, as SciPy's)

    def at(array, i=0):
        return array.ctypes.data + i * array.itemsize

    syevr(b"V", b"I", b"L", at(ints, 0), at(a), at(ints, 1), at(reals, 0), at(reals, 1), at(ints, 2), at(ints, 3),
          at(reals, 2), at(ints, 4), at(w), at(z), at(ints, 5), at(isuppz), at(work), at(ints, 6), at(iwork),
          at(ints, 7), at(ints, 8))
    if ints[8] != 0 or ints[4] != k:
        raise np.linalg.LinAlgError(f"LAPACK dsyevr failed (info={int(ints[8])}, {int(ints[4])} of {k} eigenvalues)")
    return z


@functools.cache
def _dsyevr():
    """LAPACK's ``dsyevr`` from SciPy's Cython LAPACK as a ``ctypes`` function (called without the
    interpreter lock), or None where that API is not there."""
    import ctypes

    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__["dsyevr"]
    except (ImportError, AttributeError, KeyError):
        return None
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    signature = get_name(capsule)
    # the signature this call is written for: 32-bit C ints (an ILP64 build would differ)
    if signature is None or signature.count(b"int *") != 11 or signature.count(b"*") != 21:
        return None
    address = get_pointer(capsule, signature)
    return ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, *[ctypes.c_void_p] * 18)(address)


@functools.cache
def _syevr_workspace(n: int) -> tuple[int, int]:
    """``dsyevr``'s workspace sizes for order ``n``, as SciPy's ``eigh`` asks LAPACK for them."""
    from scipy.linalg.lapack import _compute_lwork, get_lapack_funcs

    query = get_lapack_funcs("syevr_lwork", (np.zeros(0),))
    lwork, liwork = _compute_lwork(query, n=n, lower=True)
    return int(lwork), int(liwork)


def _split_once(events: EventSet, idx: np.ndarray, p: CurationParams, rng) -> np.ndarray | None:
    """Return a boolean mask over ``idx`` (the two sides) or None when the cluster is unimodal."""
    from sklearn.cluster import KMeans
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    if len(idx) < 2 * p.min_cluster_size:
        return None
    test = _sample(idx, p.max_test_events, rng)
    tmpl = events.template(test)
    channels = _top_channels(tmpl, p.local_channels)
    X = _aligned(events, test, channels, tmpl[:, channels], p.max_shift).reshape(len(test), -1)
    n_comp = min(p.split_pca_components, X.shape[1], len(test) - 1)
    pca = _SplitPCA(n_comp).fit(X)
    Z = pca.transform(X)
    km = KMeans(2, n_init=3, random_state=p.seed).fit(Z)
    if np.min(np.bincount(km.labels_, minlength=2)) < p.min_cluster_size // 2:
        return None
    lda = LinearDiscriminantAnalysis(n_components=1).fit(Z, km.labels_)
    proj = lda.transform(Z)[:, 0]
    dip, cut = _isocut(proj)
    if dip < p.split_dipscore:
        return None
    side_test = proj > cut
    if min(side_test.sum(), (~side_test).sum()) < p.min_cluster_size // 2:
        return None
    if len(test) == len(idx):
        return side_test
    # assign every event of the cluster with the same projection
    Xall = _aligned(events, idx, channels, tmpl[:, channels], p.max_shift).reshape(len(idx), -1)
    return lda.transform(pca.transform(Xall))[:, 0] > cut


def split_clusters(events: EventSet, labels: np.ndarray, p: CurationParams,
                   pool: ThreadPoolExecutor | None = None, memo: dict | None = None) -> tuple[np.ndarray, int]:
    """Split every cluster recursively until unimodal. Returns (new labels, number of splits).

    Clusters are tested level by level (every cluster, then both sides of each split...), the
    tests of a level in ``pool``'s threads when given. Each test draws its random subsets from
    its own generator, seeded by the seed, the cluster's label and the level, so the result does
    not depend on the threads.

    A test's result depends only on the cluster's events, label and level: ``memo`` (a dict kept
    across calls) records each one, and a cluster that comes back unchanged in a later round (no
    merge touched it, or a split was merged back) is not tested again.
    """
    labels = labels.copy()
    next_label = int(labels.max()) + 1 if (labels >= 0).any() else 0
    n_splits = 0
    memo = {} if memo is None else memo
    level = [int(u) for u in np.unique(labels[labels >= 0])]
    for depth in range(p.max_split_depth):
        if not level:
            break
        members = [np.flatnonzero(labels == u) for u in level]
        keys = [(u, depth, idx.tobytes()) for u, idx in zip(level, members)]
        todo = [k for k, key in enumerate(keys) if key not in memo]
        rngs = [np.random.default_rng([p.seed, level[k], depth]) for k in todo]
        found = _map(pool, lambda idx, rng: _split_once(events, idx, p, rng), [members[k] for k in todo], rngs)
        memo.update({keys[k]: side for k, side in zip(todo, found)})
        sides = [memo[key] for key in keys]
        tested, level = level, []
        for u, idx, side in zip(tested, members, sides):
            if side is None:
                continue
            labels[idx[side]] = next_label
            n_splits += 1
            level += [u, next_label]
            next_label += 1
    return labels, n_splits


def _map(pool: ThreadPoolExecutor | None, fn, *iterables) -> list:
    """``list(map(fn, *iterables))``, in ``pool``'s threads when given (results in order)."""
    return list(pool.map(fn, *iterables) if pool is not None else map(fn, *iterables))


# ------------------------------------------------------------------------------------ merge
def _similarities(templates: np.ndarray, max_shift: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Best cosine similarity over time shifts of every pair of ``[U, T, C]`` templates, and that
    shift: ``[U, U]`` arrays, entry ``[i, j]`` for ``t1 = templates[i]``, ``t2 = templates[j]``,
    where shift s > 0 compares ``t1[s:]`` with ``t2[:-s]`` (-1 and shift 0 when every shift has a
    zero norm). One matrix product per shift, in float64 (a product and two norms per pair and
    shift in float32 took 0.24 s for drift64's 3,000 pairs)."""
    units, T = templates.shape[:2]
    flat = templates.astype(np.float64)
    best = np.full((units, units), -1.0)
    best_shift = np.zeros((units, units), dtype=np.int64)
    for s in range(-max_shift, max_shift + 1):
        a = flat[:, max(0, s): T + min(0, s)].reshape(units, -1)
        b = flat[:, max(0, -s): T + min(0, -s)].reshape(units, -1)
        den = np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            sim = np.where(den > 0, (a @ b.T) / den, -np.inf)
        better = sim > best
        best[better], best_shift[better] = sim[better], s
    return best, best_shift


def _merge_test(events: EventSet, ia: np.ndarray, ib: np.ndarray, ta, tb, shift: int, p: CurationParams,
                rng) -> tuple[bool, float]:
    """Are clusters a and b one unit? (templates equal within noise, or unimodal along ta - tb).

    Both clusters' events are realigned on the mean of the two (shift-matched) templates first.
    """
    channels = np.union1d(_top_channels(ta, p.local_channels), _top_channels(tb, p.local_channels))
    noise = events.noise_levels_uv[channels]
    T = ta.shape[0]
    # shift-matched mean template on the test channels, full length (edges from ta)
    tb_shifted = ta.copy()
    a0, a1 = max(0, shift), T + min(0, shift)
    tb_shifted[a0:a1] = tb[max(0, -shift): T + min(0, -shift)]
    mid_full = ((ta + tb_shifted) / 2)[:, channels]
    sa = _sample(ia, p.max_test_events // 2, rng)
    sb = _sample(ib, p.max_test_events // 2, rng)
    xa = _aligned(events, sa, channels, mid_full, p.max_shift)
    xb = _aligned(events, sb, channels, mid_full, p.max_shift)
    ma, mb = xa.mean(axis=0), xb.mean(axis=0)
    diff = ma - mb
    if np.max(np.abs(diff) / noise[None, :]) < p.merge_noise_ratio:
        return True, 0.0
    w = (diff / noise[None, :] ** 2).ravel()  # discriminant axis under a diagonal noise model
    mid = (ma + mb) / 2
    pa = (xa - mid).reshape(len(sa), -1) @ w
    pb = (xb - mid).reshape(len(sb), -1) @ w
    # balance the two sides so a big cluster does not swamp a small one's mode
    n = min(len(pa), len(pb))
    x = np.concatenate([rng.choice(pa, n, replace=False), rng.choice(pb, n, replace=False)])
    dip, _ = _isocut(x)
    return dip < p.merge_dipscore, dip


def _time_overlap(events: EventSet, ia: np.ndarray, ib: np.ndarray, p: CurationParams) -> float:
    """Overlap (0..1) of two clusters' normalised spike-count histograms over time; 1 (no
    evidence of complementary firing) without event times or with too few events."""
    if events.times_s is None or min(len(ia), len(ib)) < 5 * p.merge_time_bins:
        return 1.0
    t = events.times_s
    return histogram_overlap(t[ia], t[ib], np.linspace(t.min(), t.max() + 1e-9, p.merge_time_bins + 1))


def histogram_overlap(a: np.ndarray, b: np.ndarray, edges: np.ndarray) -> float:
    """Overlap (0..1) of two samples' histograms over ``edges``, each normalised by its own size:
    the sum of the bin-wise minimum (1 for the same distribution, 0 for disjoint ones)."""
    ha = np.histogram(a, edges)[0] / len(a)
    hb = np.histogram(b, edges)[0] / len(b)
    return float(np.minimum(ha, hb).sum())


def _coincidences(ta: np.ndarray, tb: np.ndarray, window_s: float) -> int:
    """Pairs (a, b) of two sorted trains with |a - b| <= window_s."""
    return int(np.sum(np.searchsorted(tb, ta + window_s, "right") - np.searchsorted(tb, ta - window_s, "left")))


def _refractory_ok(events: EventSet, ia: np.ndarray, ib: np.ndarray, p: CurationParams) -> bool:
    """True when two clusters' trains violate each other's refractory period no more than
    ``merge_max_refractory_ratio`` times what two independent trains would (True without times)."""
    if events.times_s is None or p.censor_ms >= p.refractory_ms:
        return True
    t = events.times_s
    ta, tb = np.sort(t[ia]), np.sort(t[ib])
    r, c = p.refractory_ms / 1000.0, p.censor_ms / 1000.0
    # pairs (a, b) with c < |ta - tb| <= r: b within r of some a, minus b within c of it
    violations = _coincidences(ta, tb, r) - _coincidences(ta, tb, c)
    span = max(float(t.max() - t.min()), 1e-9)
    expected = len(ta) * len(tb) * 2.0 * (r - c) / span
    return violations <= p.merge_max_refractory_ratio * expected


#: Candidate pairs decided at a time in :func:`merge_clusters`' threads (some are passed over
#: when a merge earlier in the window took one of their clusters: 8 was slower than 4 on drift64).
MERGE_WINDOW = 4


def merge_clusters(events: EventSet, labels: np.ndarray, p: CurationParams,
                   pool: ThreadPoolExecutor | None = None, memo: dict | None = None) -> tuple[np.ndarray, int]:
    """Merge similar clusters whose union is unimodal, until no pair merges. Returns (labels, merges).

    Each round goes down the candidate pairs from the most similar, merging a pair when neither
    cluster merged earlier in the round. A pair's decision depends only on the round's clusters
    and its own generator (seeded by the seed and the pair's labels), so with ``pool`` the next
    ``MERGE_WINDOW`` pairs still to decide are decided together in its threads, and a pair one
    of whose clusters merged earlier in the window is then passed over, as it would have been
    one at a time: the same merges. (Deciding only runs of pairs with no cluster in common, as
    before, gave runs of 1-4 pairs: drift64's merge rounds took 1.7 s, 1.3 s now.)

    A decision depends only on the two clusters' labels, events and templates: ``memo`` (a dict
    kept across calls) records each one under those, and a pair that comes back in a later
    curation round is not tested again (drift64's last three rounds re-tested the same pairs).
    """
    labels = labels.copy()
    total = 0
    tested: dict[tuple, bool] = {}
    memo = {} if memo is None else memo
    window = MERGE_WINDOW if pool is not None else 1
    while True:
        units, templates, counts = compute_templates(events, labels, seed=p.seed, pool=pool)
        if len(units) < 2:
            break
        peak_ch = np.argmax(np.ptp(templates, axis=1), axis=1)
        peak_xy = events.channel_locations[peak_ch]
        peak_amp = np.ptp(templates, axis=1).max(axis=1)
        sims, shifts = _similarities(templates, p.max_shift)
        pairs = []
        for i in range(len(units)):
            for j in range(i + 1, len(units)):
                if np.linalg.norm(peak_xy[i] - peak_xy[j]) > p.merge_radius_um:
                    continue
                if sims[i, j] >= min(p.merge_min_similarity, p.merge_time_similarity):
                    pairs.append((float(sims[i, j]), i, j, int(shifts[i, j])))
        pairs.sort(reverse=True)
        members = {k: np.flatnonzero(labels == units[k]) for k in sorted({k for _, i, j, _ in pairs for k in (i, j)})}

        def decide(pair) -> tuple[bool, float]:
            i, j = pair[1], pair[2]
            key = (int(units[i]), int(units[j]), _digest(members[i]), _digest(members[j]), _digest(templates[i]),
                   _digest(templates[j]))
            if key not in memo:
                memo[key] = _decide(pair)
            return memo[key]

        def _decide(pair) -> tuple[bool, float]:
            sim, i, j, shift = pair
            ia, ib = members[i], members[j]
            ratio = min(peak_amp[i], peak_amp[j]) / max(peak_amp[i], peak_amp[j], 1e-9)
            if (sim >= p.merge_sure_similarity and ratio >= p.merge_sure_amplitude_ratio
                    and _refractory_ok(events, ia, ib, p)):
                return True, 0.0
            if (sim >= p.merge_time_similarity and _time_overlap(events, ia, ib, p) < p.merge_time_overlap
                    and _refractory_ok(events, ia, ib, p)):
                return True, 0.0
            if sim < p.merge_min_similarity:
                return False, np.inf
            rng = np.random.default_rng([p.seed + 1, int(units[i]), int(units[j])])
            return _merge_test(events, ia, ib, templates[i], templates[j], shift, p, rng)

        used: set[int] = set()
        merged = 0
        k = 0
        while k < len(pairs):
            batch = []  # the next pairs still to decide
            while k < len(pairs) and len(batch) < window:
                _, i, j, _ = pairs[k]
                k += 1
                if not (i in used or j in used or _key(units, counts, i, j) in tested):
                    batch.append(pairs[k - 1])
            for pair, (ok, dip) in zip(batch, _map(pool, decide, batch)):
                sim, i, j, _ = pair
                if i in used or j in used:  # a merge earlier in the batch took one of the two
                    continue
                tested[_key(units, counts, i, j)] = ok
                logger.debug("merge test %d+%d sim=%.2f dip=%.2f -> %s", units[i], units[j], sim, dip, ok)
                if ok:
                    labels[members[j]] = units[i]
                    used.update((i, j))
                    merged += 1
        total += merged
        if merged == 0:
            break
    return labels, total


def _digest(a: np.ndarray) -> bytes:
    """A 16-byte digest of an array's bytes (a memo key for arrays of any size)."""
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()


def _key(units: np.ndarray, counts: np.ndarray, i: int, j: int) -> tuple[int, int, int, int]:
    """A pair's key in the merge loop's record of decided pairs: labels and sizes (a cluster
    that grew is a new cluster)."""
    return int(units[i]), int(counts[i]), int(units[j]), int(counts[j])


# ------------------------------------------------------------------------------------ noise
def reject_noise(
    events: EventSet,
    labels: np.ndarray,
    duration_s: float,
    nbefore: int,
    p: CurationParams,
) -> tuple[np.ndarray, np.ndarray]:
    """Reject noise clusters.

    Returns
    -------
    labels : ndarray
        Labels with rejected events set to ``-1``.
    reason : ndarray [N] int8
        0 for kept events, else a key of :data:`REJECT_REASONS`.
    """
    labels = labels.copy()
    reason = np.zeros(len(labels), dtype=np.int8)
    reason[labels < 0] = 1
    # the tests read the template on channels most of the cluster's events carry: a channel at the
    # edge of the events' neighbourhoods is carried only by the events detected nearest to it, and
    # its mean is a biased estimate (it made a drift benchmark neuron of SNR 36, whose trough
    # travels 0.3 ms along the probe, look misaligned on a channel 1 in 10 of its events carry)
    units, templates, counts = compute_templates(events, labels, seed=p.seed, min_coverage=0.5)
    for u, t, c in zip(units, templates, counts):
        idx = np.flatnonzero(labels == u)
        ch = int(np.argmax(np.ptp(t, axis=0)))
        snr = float(np.max(np.abs(t[:, ch])) / events.noise_levels_uv[ch])
        extreme_at = int(np.argmax(np.abs(t[:, ch])))
        if c < p.min_cluster_size or c / max(duration_s, 1e-9) < p.min_rate_hz:
            code = 2
        elif snr < p.min_snr:
            code = 3
        elif abs(extreme_at - nbefore) > max(2, nbefore // 4):
            code = 4
        else:
            continue
        logger.debug("rejecting cluster %d (%d events, snr %.1f): %s", u, c, snr, REJECT_REASONS[code])
        reason[idx] = code
        labels[idx] = -1
    return labels, reason


def _round_stops(counts: list[tuple[int, int]], q: int) -> bool:
    """Whether :func:`curate`'s loop stops after round ``q`` on the rounds' (splits, merges)
    alone: a round with neither, or split/merge ping-pong (no more splits than merges, as many
    splits as the round before: stable enough)."""
    splits, merges = counts[q]
    return (splits == 0 and merges == 0) or (q > 0 and splits <= merges and splits == counts[q - 1][0])


def _end_of_cycle(counts: list[tuple[int, int]], max_rounds: int) -> int:
    """The round at which :func:`curate`'s loop would stop when its last round's labels are
    those of two rounds before: each round to come repeats the round two before it (its splits
    and merges), and the loop stops at a round with neither, at a ping-pong round (no more splits
    than merges, as many splits as the round before), or at its last round. (A round that
    changes nothing cannot come: the two labellings of the cycle differ.)"""
    counts = list(counts)
    for q in range(len(counts), max_rounds):
        counts.append(counts[q - 2])
        if _round_stops(counts, q):
            return q
    return max_rounds - 1


def curate(
    events: EventSet,
    labels: np.ndarray,
    duration_s: float,
    nbefore: int,
    params: CurationParams | None = None,
    n_jobs: int = 1,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Split and merge until stable, then reject noise clusters.

    Parameters
    ----------
    events : EventSet
    labels : ndarray [N] int
        Initial cluster labels (``-1`` unassigned).
    duration_s : float
        Recording duration (for firing rates).
    nbefore : int
        Samples before the peak in the event window (the detection sample).
    params : CurationParams
    n_jobs : int
        Threads for the split and merge tests (the result does not depend on it).

    Returns
    -------
    labels : ndarray [N] int64
        Final labels ``0..U-1`` (``-1`` rejected).
    reason : ndarray [N] int8
        Rejection reason code per event (0 = kept), see :data:`REJECT_REASONS`.
    stats : dict
        Numbers of splits, merges and rejected clusters per round.
    """
    p = params or CurationParams()
    labels = np.asarray(labels, dtype=np.int64).copy()
    stats = {"initial_clusters": int(len(np.unique(labels[labels >= 0]))), "rounds": []}
    # tiny clusters first: they only make the split/merge tests noisier
    units, counts = np.unique(labels[labels >= 0], return_counts=True)
    for u in units[counts < p.min_cluster_size // 2]:
        labels[labels == u] = -1
    split_memo: dict = {}
    merge_memo: dict = {}
    history = [labels]  # the labels before the first round, then after each
    with ThreadPoolExecutor(n_jobs) if n_jobs > 1 else nullcontext() as pool:
        for r in range(p.max_rounds):
            labels, n_split = split_clusters(events, labels, p, pool, memo=split_memo)
            labels, n_merge = merge_clusters(events, labels, p, pool, memo=merge_memo)
            stats["rounds"].append({"splits": n_split, "merges": n_merge})
            history.append(labels)
            logger.info("curation round %d: %d splits, %d merges", r + 1, n_split, n_merge)
            counts = [(x["splits"], x["merges"]) for x in stats["rounds"]]
            if _round_stops(counts, r):
                break
            if np.array_equal(labels, history[-2]):
                break  # every split merged back: each further round would repeat this one
            if r > 0 and np.array_equal(labels, history[-3]):
                # the labels of two rounds ago again (a split undone by a merge each other round):
                # a round is a function of its labels (its tests are seeded by them), so the
                # rounds to come would repeat the last two; the loop ends on the labels where its
                # rules would have stopped it
                stop = _end_of_cycle(counts, p.max_rounds)
                labels = labels if (stop - r) % 2 == 0 else history[-2]
                stats["cycle_from_round"] = r  # rounds r - 1 and r repeat to round `stop`
                break
    before = labels.copy()
    labels, reason = reject_noise(events, labels, duration_s, nbefore, p)
    out = np.full(len(labels), -1, dtype=np.int64)
    ok = labels >= 0
    if ok.any():
        _, out[ok] = np.unique(labels[ok], return_inverse=True)
    stats["final_clusters"] = int(out.max() + 1) if ok.any() else 0
    stats["rejected_clusters"] = int(len(np.unique(before[reason > 1])))
    return out, reason, stats
