"""Fine-tuning objectives that are not the pretraining objective.

- ``contrastive``: labels from a sorting; a supervised-contrastive (SupCon, Khosla et al. 2020) or
  batch-hard triplet loss on the encoder's embedding pulls the spikes of one unit together and pushes
  different units apart. Batches are drawn P units x M spikes so every batch has positives.
- ``deepcluster``: no labels; alternate (1) clustering the embeddings of the tuning events into more
  clusters than there can be units (k-means or a GMM; the true unit count is never used) and (2)
  training a freshly initialised linear head on the cluster ids as pseudo-labels, sampling clusters
  uniformly (Caron et al. 2018), so one giant cluster cannot swallow the others.

Everything here is plain torch/numpy/sklearn; the training loop lives in ``finetune.train``.
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- losses
def _pairwise_similarity(z, metric: str):
    import torch
    import torch.nn.functional as F

    if metric == "cosine":
        zn = F.normalize(z, dim=1)
        return zn @ zn.T
    if metric == "euclidean":
        return -torch.cdist(z, z).pow(2)
    raise ValueError(f"unknown similarity metric {metric!r}; use 'cosine' or 'euclidean'")


def supervised_contrastive_loss(z, labels, temperature: float = 0.1, metric: str = "cosine"):
    """Supervised contrastive loss over a batch.

    Parameters
    ----------
    z : torch.Tensor
        Embeddings ``[B, D]``.
    labels : torch.Tensor
        Unit ids ``[B]`` (int). Every anchor with at least one positive contributes.
    temperature : float
        Softmax temperature applied to the similarities.
    metric : {"cosine", "euclidean"}
        Cosine similarity of L2-normalised embeddings, or negative squared Euclidean distance (keeps
        clusters compact in the space k-means/GMM cluster in).

    Returns
    -------
    torch.Tensor
        Scalar loss: mean over anchors of ``-mean_{p in P(i)} log softmax_{a != i}(s_ia / T)_p``.
    """
    import torch

    B = z.shape[0]
    sim = _pairwise_similarity(z, metric) / temperature
    eye = torch.eye(B, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = positives.sum(1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        raise ValueError("supervised contrastive loss: no anchor in the batch has a positive (same-unit) partner")
    pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)
    return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()


def batch_hard_triplet_loss(z, labels, margin: float = 1.0):
    """Batch-hard triplet loss (Hermans et al. 2017) on Euclidean distances.

    For every anchor: the farthest same-unit spike and the nearest other-unit spike of the batch;
    loss ``relu(d(a, p) - d(a, n) + margin)`` averaged over anchors that have both.
    """
    import torch

    d = torch.cdist(z, z)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    pos_mask, neg_mask = same & ~eye, ~same
    valid = pos_mask.any(1) & neg_mask.any(1)
    if not bool(valid.any()):
        raise ValueError("triplet loss: the batch needs spikes of at least two units, two of one unit")
    hardest_pos = torch.where(pos_mask, d, torch.zeros_like(d)).max(1).values
    hardest_neg = torch.where(neg_mask, d, torch.full_like(d, float("inf"))).min(1).values
    return torch.relu(hardest_pos - hardest_neg + margin)[valid].mean()


def contrastive_loss(z, labels, *, loss: str = "supcon", temperature: float = 0.1, metric: str = "cosine",
                     margin: float = 1.0):
    """Dispatch to :func:`supervised_contrastive_loss` or :func:`batch_hard_triplet_loss`."""
    if loss == "supcon":
        return supervised_contrastive_loss(z, labels, temperature=temperature, metric=metric)
    if loss == "triplet":
        return batch_hard_triplet_loss(z, labels, margin=margin)
    raise ValueError(f"unknown contrastive loss {loss!r}; use --contrastive-loss supcon or triplet")


# ---------------------------------------------------------------------------------------- samplers
class UnitBalancedSampler:
    """Draw batches of ``units_per_batch`` units x ``spikes_per_unit`` spikes (P x M sampling).

    The batch of a step is a pure function of ``(seed, step)``, so a resumed run draws the same
    batches without any sampler state.

    Parameters
    ----------
    labels : np.ndarray
        Unit id of every tuning event; events with label ``-1`` (unknown) are never drawn.
    batch_size : int
        Events per batch; split into ``units_per_batch`` units of ``batch_size // units_per_batch``.
    units_per_batch : int or None
        P; defaults to ``min(n_units, 8)``.
    seed : int
        Random seed.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, units_per_batch: int | None = None, seed: int = 0):
        labels = np.asarray(labels)
        units, counts = np.unique(labels[labels >= 0], return_counts=True)
        if len(units) < 2:
            raise ValueError(
                f"contrastive fine-tuning needs spikes of at least 2 units in the tuning window; the labels give "
                f"{len(units)} unit(s) ({units.tolist()}). Pass a sorting with more units (--labels), widen "
                "--train-window-s, or use --mode self-supervised / deepcluster which need no labels."
            )
        self.units = units
        self.index = {int(u): np.flatnonzero(labels == u) for u in units}
        self.units_per_batch = int(min(units_per_batch or 8, len(units)))
        self.spikes_per_unit = max(2, batch_size // self.units_per_batch)
        self.seed = seed

    def indices(self, step: int) -> np.ndarray:
        """Event indices of the batch of ``step`` (a pure function of seed and step)."""
        rng = np.random.default_rng([self.seed, int(step)])
        chosen = rng.choice(self.units, size=self.units_per_batch, replace=False)
        out = [rng.choice(self.index[int(u)], size=self.spikes_per_unit,
                          replace=len(self.index[int(u)]) < self.spikes_per_unit) for u in chosen]
        return np.concatenate(out)


class ClusterBalancedSampler:
    """Draw batches with every pseudo-label cluster equally likely (DeepCluster's re-balancing).

    Sampling weight of an event is ``1 / size(its cluster)``, so small clusters are seen as often as
    large ones and the head cannot win by predicting the biggest cluster.
    """

    def __init__(self, pseudo_labels: np.ndarray, batch_size: int, seed: int = 0, round_index: int = 0):
        pseudo_labels = np.asarray(pseudo_labels)
        _, inverse, counts = np.unique(pseudo_labels, return_inverse=True, return_counts=True)
        w = 1.0 / counts[inverse]
        self.p = w / w.sum()
        self.batch_size = batch_size
        self.seed, self.round_index = seed, round_index

    def indices(self, step: int) -> np.ndarray:
        """Event indices of the batch of ``step`` (a pure function of seed, clustering round and step)."""
        rng = np.random.default_rng([self.seed, 7919, self.round_index, int(step)])
        return rng.choice(len(self.p), size=self.batch_size, replace=True, p=self.p)


# ------------------------------------------------------------------------------------ deepcluster
def auto_num_clusters(n_events: int, num_channels: int = 4, minimum: int = 10, maximum: int = 100) -> int:
    """Over-clustering size for DeepCluster when the user gives none.

    ``max(sqrt(n_events) / 2, 3 * channels)`` clipped to ``[minimum, maximum]``, never more than a
    tenth of the events. It only depends on the data size and probe, never on the true unit count:
    over-clustering splits units (harmless for a pseudo-label target) instead of merging them.
    """
    k = max(math.sqrt(n_events) / 2.0, 3 * num_channels)
    k = int(np.clip(round(k), minimum, maximum))
    return max(2, min(k, n_events // 10))


def cluster_embeddings(embeddings: np.ndarray, num_clusters: int, method: str = "kmeans", seed: int = 0) -> np.ndarray:
    """Pseudo-labels: cluster standardised embeddings into ``num_clusters`` groups.

    Parameters
    ----------
    embeddings : np.ndarray
        ``[N, D]`` embeddings of the tuning events (held-out events must not be passed).
    num_clusters : int
        Number of clusters (an over-clustering; see :func:`auto_num_clusters`).
    method : {"kmeans", "gmm"}
        scikit-learn ``KMeans`` or a diagonal ``GaussianMixture`` initialised by k-means.
    seed : int
        Random state.

    Returns
    -------
    np.ndarray
        ``[N]`` int pseudo-labels, renumbered ``0..k'-1`` over the non-empty clusters.
    """
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(np.asarray(embeddings, dtype=np.float64))
    if method == "kmeans":
        labels = KMeans(n_clusters=num_clusters, n_init=3, random_state=seed).fit_predict(x)
    elif method == "gmm":
        labels = GaussianMixture(n_components=num_clusters, covariance_type="diag", reg_covar=1e-4,
                                 random_state=seed).fit_predict(x)
    else:
        raise ValueError(f"unknown deepcluster clusterer {method!r}; use --deepcluster-clusterer kmeans or gmm")
    _, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int64)


def new_linear_head(latent_dim: int, num_clusters: int, seed: int):
    """A freshly initialised linear classifier (re-created at every re-clustering: cluster ids permute)."""
    import torch

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    head = torch.nn.Linear(latent_dim, num_clusters)
    torch.random.set_rng_state(gen_state)
    return head
