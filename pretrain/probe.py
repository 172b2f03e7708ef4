"""The clustering probe: does the embedding separate units better than PCA features?

For each recording of a labelled validation set (events with ``unit_label >= 0``; labels are only
comparable *within* a recording), embed the events with the model and, for comparison, take PCA
features of the same events (PCA of the flattened, masked waveforms, same dimensionality as the
latent). On each feature set:

* **clustering**: a Gaussian mixture whose number of components is chosen by BIC (or HDBSCAN),
  never told the true number of units; reported as Hungarian-matched accuracy and adjusted Rand
  index (ARI) against the labels;
* **kNN accuracy**: cross-validated k-nearest-neighbour classification of the labels, an upper
  bound of how separable the units are in that space.

Metrics are averaged over recordings (each recording counts once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

CLUSTER_METHODS = ("gmm", "hdbscan")


@dataclass
class ProbeConfig:
    """Settings of the clustering probe run at validation."""

    max_events_per_recording: int = 1500
    """Labelled events used per recording (random subset, fixed seed)."""
    min_units: int = 2
    """Recordings with fewer labelled units than this are skipped."""
    min_events_per_unit: int = 10
    """Units with fewer labelled events than this are left out of the probe."""
    method: str = "gmm"
    """Clustering: 'gmm' (Gaussian mixture, number of components by BIC) or 'hdbscan'."""
    max_components: int = 30
    """GMM: largest number of components tried (BIC picks among 1..max in steps of components_step)."""
    components_step: int = 1
    """GMM: step between the numbers of components tried."""
    hdbscan_min_cluster_size: int = 20
    """HDBSCAN: minimum cluster size (noise points count as wrong)."""
    knn_k: int = 5
    """Neighbours of the kNN classifier (5-fold cross-validated)."""
    seed: int = 0
    """Seed of the subsampling and of the clusterers."""

    def problems(self, prefix: str = "") -> list[str]:
        p = []
        if self.method not in CLUSTER_METHODS:
            p.append(f"{prefix}method must be one of {CLUSTER_METHODS}, got {self.method!r}")
        for name in ("max_events_per_recording", "min_units", "min_events_per_unit", "max_components",
                     "components_step", "hdbscan_min_cluster_size", "knn_k"):
            if getattr(self, name) < 1:
                p.append(f"{prefix}{name} must be >= 1, got {getattr(self, name)}")
        return p


# ------------------------------------------------------------------------------------ metrics
def hungarian_accuracy(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Fraction of events whose cluster is matched (one-to-one, Hungarian) to their true unit."""
    from scipy.optimize import linear_sum_assignment

    t_ids, t = np.unique(labels_true, return_inverse=True)
    p_ids, p = np.unique(labels_pred, return_inverse=True)
    confusion = np.zeros((len(t_ids), len(p_ids)), dtype=np.int64)
    np.add.at(confusion, (t, p), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    return float(confusion[rows, cols].sum() / len(labels_true))


def cluster_features(features: np.ndarray, config: ProbeConfig) -> np.ndarray:
    """Cluster features without knowing the number of units; returns a label per event (-1 noise)."""
    x = np.asarray(features, dtype=np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    if config.method == "hdbscan":
        import hdbscan

        return hdbscan.HDBSCAN(min_cluster_size=config.hdbscan_min_cluster_size).fit_predict(x)
    from sklearn.mixture import GaussianMixture

    best, best_bic = None, np.inf
    max_k = max(1, min(config.max_components, len(x) // 10))
    for k in range(1, max_k + 1, config.components_step):
        gmm = GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=config.seed, max_iter=200)
        gmm.fit(x)
        bic = gmm.bic(x)
        if bic < best_bic:
            best, best_bic = gmm, bic
    return best.predict(x)


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5, seed: int = 0) -> float:
    """5-fold stratified cross-validated kNN accuracy (standardised features)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_splits = int(min(5, np.bincount(np.unique(labels, return_inverse=True)[1]).min()))
    if n_splits < 2:
        return float("nan")
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    clf = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k))
    return float(cross_val_score(clf, features, labels, cv=cv).mean())


def pca_features(waveform: np.ndarray, mask: np.ndarray, n_components: int) -> np.ndarray:
    """PCA of the flattened waveforms (microvolts, padded channels zero) of one recording."""
    from sklearn.decomposition import PCA

    x = (np.asarray(waveform, dtype=np.float32) * np.asarray(mask, dtype=np.float32)[:, None, :]).reshape(len(waveform), -1)
    n = min(n_components, x.shape[0], x.shape[1])
    return PCA(n_components=n, random_state=0).fit_transform(x)


def score_features(features: np.ndarray, labels: np.ndarray, config: ProbeConfig) -> dict[str, float]:
    """Clustering accuracy, ARI and kNN accuracy of one feature set against the labels."""
    from sklearn.metrics import adjusted_rand_score

    pred = cluster_features(features, config)
    return {
        "cluster_acc": hungarian_accuracy(labels, pred),
        "ari": float(adjusted_rand_score(labels, pred)),
        "knn_acc": knn_accuracy(features, labels, config.knn_k, config.seed),
        "n_clusters": float(len(np.unique(pred[pred >= 0]))),
    }


# ------------------------------------------------------------------------------------ the probe
def select_probe_events(block: dict[str, np.ndarray], config: ProbeConfig) -> list[tuple[str, np.ndarray]]:
    """Per recording, indices of the labelled events the probe uses (``[(recording_id, idx), ...]``)."""
    rng = np.random.default_rng(config.seed)
    labels = np.asarray(block["unit_label"])
    recs = np.asarray(block["recording_id"]) if "recording_id" in block else np.zeros(len(labels), "U1")
    out = []
    for rec in np.unique(recs):
        idx = np.flatnonzero((recs == rec) & (labels >= 0))
        units, counts = np.unique(labels[idx], return_counts=True)
        idx = idx[np.isin(labels[idx], units[counts >= config.min_events_per_unit])]
        if len(np.unique(labels[idx])) < config.min_units:
            continue
        if len(idx) > config.max_events_per_recording:
            idx = np.sort(rng.choice(idx, config.max_events_per_recording, replace=False))
        out.append((str(rec), idx))
    return out


def embed_block(model, block: dict[str, np.ndarray], batch_size: int = 1024, device="cpu") -> np.ndarray:
    """Latent means of a block of events, ``[N, latent_dim]`` float32 (no gradients)."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(block["waveform"]), batch_size):
            w = torch.as_tensor(np.asarray(block["waveform"][s:s + batch_size], dtype=np.float32), device=device)
            o = torch.as_tensor(np.asarray(block["channel_offsets_um"][s:s + batch_size], dtype=np.float32), device=device)
            m = torch.as_tensor(np.asarray(block["channel_mask"][s:s + batch_size], dtype=bool), device=device)
            out.append(model.embed(w, o, m).float().cpu().numpy())
    model.train(was_training)
    if not out:
        return np.zeros((0, model.config.latent_dim), dtype=np.float32)
    return np.concatenate(out)


def run_probe(model, block: dict[str, np.ndarray], config: ProbeConfig | None = None, device="cpu",
              with_pca: bool = True, embeddings: np.ndarray | None = None) -> dict:
    """Embed + cluster the labelled events of each recording, and the same with PCA features.

    Parameters
    ----------
    model : SpikeVAE
        The encoder (its ``embed`` gives the features).
    block : dict
        An event block (``waveform``, ``channel_offsets_um``, ``channel_mask``, ``unit_label``,
        ``recording_id``), e.g. ``spikevault.reader.load_events(corpus, split="val")``.
    config : ProbeConfig
        Probe settings.
    with_pca : bool
        Also score PCA features of the same events.
    embeddings : np.ndarray, optional
        Precomputed ``[N, latent_dim]`` embeddings of every event of ``block`` (then ``model`` is
        not used and may be None).

    Returns
    -------
    result : dict
        ``{"model": {metric: mean}, "pca": {...}, "per_recording": [{recording_id, n_events,
        n_units, model: {...}, pca: {...}}, ...], "n_recordings": int}``; the means are NaN
        when no recording has at least ``min_units`` labelled units.
    """
    config = config or ProbeConfig()
    per_rec = []
    for rec, idx in select_probe_events(block, config):
        sub = {k: np.asarray(block[k])[idx] for k in ("waveform", "channel_offsets_um", "channel_mask", "unit_label")}
        labels = sub["unit_label"]
        entry = {"recording_id": rec, "n_events": int(len(idx)), "n_units": int(len(np.unique(labels)))}
        emb = embeddings[idx] if embeddings is not None else embed_block(model, sub, device=device)
        entry["model"] = score_features(emb, labels, config)
        if with_pca:
            entry["pca"] = score_features(pca_features(sub["waveform"], sub["channel_mask"], emb.shape[1]), labels, config)
        per_rec.append(entry)
        logger.info("probe %s: %s", rec, entry)
    result = {"n_recordings": len(per_rec), "per_recording": per_rec}
    for key in ("model", "pca") if with_pca else ("model",):
        metrics = ("cluster_acc", "ari", "knn_acc", "n_clusters")
        result[key] = {m: float(np.nanmean([e[key][m] for e in per_rec])) if per_rec else float("nan") for m in metrics}
    return result
