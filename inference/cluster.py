"""Clustering of spike features: GMM, DPGMM, HDBSCAN and KMeans, each choosing its own number of units.

None of the clusterers is ever told how many units a recording holds: the Gaussian mixtures pick
their number of components by the Bayesian information criterion (BIC), the Dirichlet-process
mixture prunes its own components and picks its concentration prior by BIC, HDBSCAN finds dense
regions, and KMeans picks k by the BIC of the equivalent spherical Gaussian model (X-means).

:func:`cluster_by_region` splits a probe into depth regions and clusters them in parallel, so a
384-channel probe is many small problems instead of one big one; clusters cut in two by a region
border are re-joined by the template merge of :mod:`inference.curation`.

Labels are ``int64``; ``-1`` marks events a clusterer left unassigned (HDBSCAN noise).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np

logger = logging.getLogger(__name__)

CLUSTERERS = ("hdbscan", "gmm", "dpgmm", "kmeans")


@dataclass
class ClusterParams:
    """Settings of the clusterers (one place, typed, validated)."""

    method: str = "hdbscan"
    """Clusterer: 'hdbscan', 'gmm', 'dpgmm' or 'kmeans'."""
    max_components: int = 12
    """Upper bound of the number of clusters searched *per region* by gmm/dpgmm/kmeans (not a
    number of units: the criterion chooses below it, and curation splits further if needed)."""
    min_cluster_size: int = 20
    """HDBSCAN ``min_cluster_size``; smaller clusters of any method go to curation's noise test."""
    hdbscan_noise: str = "keep"
    """What becomes of the events HDBSCAN leaves as noise: 'keep' (they stay unassigned; the
    template matching still finds their spikes) or 'recluster' (HDBSCAN once more on them alone:
    its density is relative, and beside a dense neuron a sparser one, small or smeared by drift,
    reads as noise). 'recluster' measured: drift64 0.820 -> 0.817 (1 -> 3 false positives) and
    0.821 -> 0.816 at seed 1; static32 and a noisy 25 kHz probe unchanged; four 6-unit
    tetrodes 0.657 -> 0.764, 0.944 -> 0.936, 0.648 -> 0.640, 0.360 -> 0.583 (with the final merge's
    0.2 threshold on tetrodes, since lowered)."""
    max_fit_events: int = 15_000
    """Fit on at most this many events per region (random subset); the rest are assigned by the
    fitted model (nearest neighbours of the fit set for HDBSCAN)."""
    region_um: float = 160.0
    """Height of the depth regions clustered independently (and in parallel)."""
    min_region_events: int = 200
    """Regions with fewer events are joined with their neighbour."""
    standardize: bool = False
    """Scale every feature column to unit variance first. Off in the pipeline, which weighs
    embedding against position itself (see ``inference.sort.clustering_features``)."""
    seed: int = 0
    """Seed of subsampling and of the mixture/k-means initialisations."""

    def __post_init__(self) -> None:
        problems = []
        if self.method not in CLUSTERERS:
            problems.append(f"clusterer must be one of {', '.join(CLUSTERERS)}, got {self.method!r}")
        if self.max_components < 1:
            problems.append(f"max_components must be >= 1, got {self.max_components}")
        if self.min_cluster_size < 2:
            problems.append(f"min_cluster_size must be >= 2, got {self.min_cluster_size}")
        if self.hdbscan_noise not in ("keep", "recluster"):
            problems.append(f"hdbscan_noise must be 'keep' or 'recluster', got {self.hdbscan_noise!r}")
        if self.max_fit_events < 100:
            problems.append(f"max_fit_events must be >= 100, got {self.max_fit_events}")
        if not self.region_um > 0:
            problems.append(f"region_um must be > 0, got {self.region_um}")
        if problems:
            raise ValueError("invalid clustering parameters: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------- clusterers
def _subsample(n: int, max_n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= max_n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_n, replace=False))


def _standardize(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    std = X.std(axis=0)
    std[std == 0] = 1.0
    return (X - X.mean(axis=0)) / std


def _scan_k_by_bic(fit, kmax: int, name: str, patience: int = 3):
    """Fit ``fit(k) -> (model, bic)`` for k = 1, 2, ... and return the model of lowest BIC; the scan
    stops ``patience`` steps past the minimum (or at ``kmax``)."""
    best, best_bic, since_best = None, np.inf, 0
    for k in range(1, kmax + 1):
        model, bic = fit(k)
        logger.debug("%s k=%d bic=%.1f", name, k, bic)
        if bic < best_bic:
            best, best_bic, since_best = model, bic, 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    return best


def _gmm(X: np.ndarray, fit_idx: np.ndarray, p: ClusterParams) -> np.ndarray:
    """Gaussian mixture, number of components chosen by BIC (scan stops 3 steps past the minimum)."""
    from sklearn.mixture import GaussianMixture

    Xf = X[fit_idx]
    kmax = int(min(p.max_components, max(1, len(Xf) // p.min_cluster_size)))

    def fit(k):
        gm = GaussianMixture(k, covariance_type="full", reg_covar=1e-4, n_init=1, random_state=p.seed).fit(Xf)
        return gm, gm.bic(Xf)

    return _scan_k_by_bic(fit, kmax, "gmm").predict(X)


def _dpgmm(X: np.ndarray, fit_idx: np.ndarray, p: ClusterParams) -> np.ndarray:
    """Dirichlet-process mixture (truncated at ``max_components``); the concentration prior is
    chosen by BIC over the components the fit actually uses."""
    from sklearn.mixture import BayesianGaussianMixture

    Xf = X[fit_idx]
    n, d = Xf.shape
    kmax = int(min(p.max_components, max(1, n // p.min_cluster_size)))
    n_free_per_comp = d + d * (d + 1) / 2 + 1
    best_labels, best_bic = None, np.inf
    for prior in (1e-3, 1e-1, 10.0):
        bgm = BayesianGaussianMixture(
            n_components=kmax, weight_concentration_prior_type="dirichlet_process",
            weight_concentration_prior=prior, covariance_type="full", reg_covar=1e-4,
            max_iter=300, init_params="k-means++", random_state=p.seed,
        )
        bgm.fit(Xf)
        counts = np.bincount(bgm.predict(Xf), minlength=kmax)
        used = max(int(np.sum(counts >= p.min_cluster_size / 2)), 1)
        loglik = bgm.score(Xf) * n
        bic = -2.0 * loglik + used * n_free_per_comp * np.log(n)
        logger.debug("dpgmm prior=%g used=%d bic=%.1f", prior, used, bic)
        if bic < best_bic:
            best_bic, best_labels = bic, bgm.predict(X)
    _, labels = np.unique(best_labels, return_inverse=True)
    return labels


def _kmeans(X: np.ndarray, fit_idx: np.ndarray, p: ClusterParams) -> np.ndarray:
    """KMeans with k chosen by BIC: each partition is scored as a mixture of diagonal Gaussians
    (weights, means and per-dimension variances from the partition, soft likelihood), so elongated
    clusters are not split just because they are not spheres (X-means with a richer model)."""
    from sklearn.cluster import KMeans

    Xf = X[fit_idx]
    n, d = Xf.shape
    kmax = int(min(p.max_components, max(1, n // p.min_cluster_size)))
    def fit(k):
        km = KMeans(k, n_init=3, random_state=p.seed).fit(Xf)
        logp = np.full((n, k), -np.inf)
        for c in range(k):
            xc = Xf[km.labels_ == c]
            if len(xc) == 0:
                continue
            var = np.maximum(xc.var(axis=0), 1e-6)
            logp[:, c] = (np.log(len(xc) / n) - 0.5 * np.sum(np.log(2 * np.pi * var))
                          - 0.5 * np.sum((Xf - xc.mean(axis=0)) ** 2 / var, axis=1))
        m = logp.max(axis=1, keepdims=True)
        loglik = float(np.sum(m[:, 0] + np.log(np.exp(logp - m).sum(axis=1))))
        n_params = (k - 1) + k * 2 * d
        return km, -2.0 * loglik + n_params * np.log(n)

    return _scan_k_by_bic(fit, kmax, "kmeans").predict(X)


def _hdbscan(X: np.ndarray, fit_idx: np.ndarray, p: ClusterParams) -> np.ndarray:
    """HDBSCAN on the fit set (what it leaves as noise: see ``ClusterParams.hdbscan_noise``); other
    events take the label of their nearest fitted neighbours."""
    import hdbscan

    Xf = X[fit_idx]
    min_size = int(min(p.min_cluster_size, max(2, len(Xf) // 4)))

    def fit(Z):
        clusterer = hdbscan.HDBSCAN(
            min_cluster_size=min_size, min_samples=min(10, min_size), cluster_selection_method="leaf",
            allow_single_cluster=True, core_dist_n_jobs=1,
        )
        labels = clusterer.fit_predict(Z).astype(np.int64)
        if (labels < 0).all() and len(Z) >= min_size and _single_root(clusterer):
            # The condensed tree is one cluster (its root) that never splits. Leaf selection then
            # returns no cluster at all, allow_single_cluster notwithstanding
            # (scikit-learn-contrib/hdbscan#476), which would throw away a region holding one
            # unit. The root is the cluster: curation splits it if it is several units and
            # rejects it if it is noise.
            labels[:] = 0
        return labels

    fit_labels = fit(Xf)
    noise = fit_labels < 0
    if p.hdbscan_noise == "recluster" and noise.sum() >= 2 * min_size:
        again = fit(Xf[noise])
        found = np.flatnonzero(noise)[again >= 0]
        fit_labels[found] = again[again >= 0] + fit_labels.max() + 1
    if len(fit_idx) == len(X):
        return fit_labels
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.full(len(X), -1, dtype=np.int64)
    labels[fit_idx] = fit_labels
    rest = np.setdiff1d(np.arange(len(X)), fit_idx)
    if len(np.unique(fit_labels)) == 1:
        labels[rest] = fit_labels[0]
    else:
        knn = KNeighborsClassifier(n_neighbors=5).fit(Xf, fit_labels)
        labels[rest] = knn.predict(X[rest])
    return labels


def _single_root(clusterer) -> bool:
    """The fitted HDBSCAN condensed tree has no cluster below its root."""
    tree = clusterer.condensed_tree_.to_numpy()
    return not np.any(tree["child_size"] > 1)


_METHODS = {"gmm": _gmm, "dpgmm": _dpgmm, "kmeans": _kmeans, "hdbscan": _hdbscan}


def cluster_features(X: np.ndarray, params: ClusterParams | None = None, **overrides) -> np.ndarray:
    """Cluster one feature matrix.

    Parameters
    ----------
    X : ndarray [N, D]
        Features (used as given, centred; ``standardize=True`` scales each column to unit variance).
    params : ClusterParams, optional
        Method and settings; keyword ``overrides`` replace single fields (``method="gmm"``).

    Returns
    -------
    labels : ndarray [N] int64
        Cluster labels ``0..n-1``, ``-1`` for unassigned events.
    """
    p = params or ClusterParams()
    if overrides:
        p = ClusterParams(**{**p.to_dict(), **overrides})
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"features must be a 2-D array [events, dims], got shape {X.shape}")
    n = len(X)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n < 2 * p.min_cluster_size:
        return np.zeros(n, dtype=np.int64)
    Xs = _standardize(X) if p.standardize else np.asarray(X, dtype=np.float64) - np.mean(X, axis=0)
    rng = np.random.default_rng(p.seed)
    fit_idx = _subsample(n, p.max_fit_events, rng)
    labels = np.asarray(_METHODS[p.method](Xs, fit_idx, p), dtype=np.int64)
    # relabel 0..n-1 keeping -1
    out = np.full(n, -1, dtype=np.int64)
    valid = labels >= 0
    if valid.any():
        _, out[valid] = np.unique(labels[valid], return_inverse=True)
    return out


# --------------------------------------------------------------------------------- regions
def make_regions(y_um: np.ndarray, region_um: float, min_region_events: int) -> np.ndarray:
    """Assign each event to a depth region of height ``region_um``; sparse regions join a neighbour.

    Returns ``region`` ids ``0..R-1`` (int64) ordered by depth.
    """
    y = np.asarray(y_um, dtype=float)
    if len(y) == 0:
        return np.zeros(0, dtype=np.int64)
    edges = np.arange(y.min(), y.max() + region_um, region_um)
    if len(edges) < 2:
        edges = np.array([y.min(), y.max() + 1.0])
    edges[-1] = y.max() + 1.0
    counts, _ = np.histogram(y, bins=edges)
    # merge sparse bins into the following (or, for the last, the previous) bin
    keep = list(edges)
    changed = True
    while changed and len(keep) > 2:
        changed = False
        counts, _ = np.histogram(y, bins=np.asarray(keep))
        for i, c in enumerate(counts):
            if c < min_region_events:
                # remove the edge between bin i and its neighbour
                del keep[i + 1 if i + 1 < len(keep) - 1 else i]
                changed = True
                break
    region = np.searchsorted(np.asarray(keep)[1:-1], y, side="right")
    return region.astype(np.int64)


def cluster_by_region(
    X: np.ndarray,
    y_um: np.ndarray,
    params: ClusterParams | None = None,
    n_jobs: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster each depth region of the probe independently, in parallel.

    Parameters
    ----------
    X : ndarray [N, D]
        Features (embedding and scaled position).
    y_um : ndarray [N]
        Estimated depth of each event, in micrometres.
    params : ClusterParams
    n_jobs : int
        Regions clustered at once (forked worker processes where the platform forks).

    Returns
    -------
    labels : ndarray [N] int64
        Global cluster labels (``-1`` unassigned).
    region : ndarray [N] int64
        Region of each event.
    """
    p = params or ClusterParams()
    region = make_regions(y_um, p.region_um, p.min_region_events)
    groups = [np.flatnonzero(region == r) for r in np.unique(region)]
    logger.info("clustering %d events in %d regions with %s", len(X), len(groups), p.method)
    if n_jobs > 1 and len(groups) > 1:
        results = _in_processes(partial(cluster_features, params=p), [X[g] for g in groups], n_jobs)
    else:
        results = [cluster_features(X[g], p) for g in groups]
    labels = np.full(len(X), -1, dtype=np.int64)
    offset = 0
    for g, lab in zip(groups, results):
        ok = lab >= 0
        labels[g[ok]] = lab[ok] + offset
        offset += int(lab.max()) + 1 if ok.any() else 0
    return labels, region


def _in_processes(fn, items: list, n_jobs: int) -> list:
    """``[fn(item) for item in items]`` in up to ``n_jobs`` worker processes, forked where the
    platform can (started in milliseconds, inheriting the loaded modules: joblib's default
    workers, started fresh, took 1.5-2 s before the first region, more than clustering all the
    regions of the benchmarks in one process, 0.3-1.3 s).

    Each worker first limits its BLAS and OpenMP pools to one thread, as SpikeInterface's forked
    workers do. An OpenMP runtime that ran a parallel region before the fork has a thread pool
    the child does not have: without the limit, scikit-learn's KMeans (in the GMM's set-up)
    waited for those threads forever in the child.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import hdbscan  # noqa: F401 - loaded once here, inherited by the forked workers

    context = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=min(n_jobs, len(items)), mp_context=context,
                             initializer=_one_thread) as pool:
        return list(pool.map(fn, items))


def _one_thread() -> None:
    """Worker initializer: one BLAS and one OpenMP thread for the worker's lifetime."""
    from threadpoolctl import threadpool_limits

    global _WORKER_LIMITS
    _WORKER_LIMITS = threadpool_limits(limits=1)


_WORKER_LIMITS = None  # a worker's thread limits, kept for its lifetime
