"""The report a person looks at after a sort: figures in ``out/report/`` and ``out/report.html``.

* ``embedding.png``: the clustering features projected on their first two principal components,
  coloured by unit (rejected events in grey), beside the spikes' estimated positions on the probe;
* ``waveforms.png``: every unit's template drawn at its channels' positions on the probe;
* ``isi.png``: inter-spike-interval histograms (0-50 ms) with the refractory-violation rate;
* ``amplitudes.png``: peak amplitude of each unit's detected events over time (drift, bursts).

Matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

REFRACTORY_MS = 1.5
MAX_POINTS = 20_000


def _colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def make_report(out, *, sorting, recording, events, features, labels, positions, templates=None,
                info: dict | None = None) -> Path:
    """Write the figures and ``report.html`` into ``out``; returns the HTML path.

    Parameters
    ----------
    out : path
        The sort's output folder.
    sorting : BaseSorting
        The final sorting (after matching).
    recording : BaseRecording
        The preprocessed recording (channel locations, sampling rate).
    events : dict
        The detected event block.
    features : ndarray [N, D]
        Clustering features of the events.
    labels : ndarray [N]
        Curated cluster of each event (``-1`` rejected); matches the sorting's unit ids.
    positions : ndarray [N, 2]
        Estimated x, y of each event (um).
    templates : spikeinterface Templates, optional
        The matching templates (drawn on the probe).
    info : dict, optional
        Run summary (params.json content) shown at the top.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out)
    fig_dir = out / "report"
    fig_dir.mkdir(parents=True, exist_ok=True)
    fs = sorting.get_sampling_frequency()
    units = list(sorting.unit_ids)
    colors = dict(zip(units, _colors(len(units))))
    rng = np.random.default_rng(0)
    n = len(labels)
    show = np.sort(rng.choice(n, min(n, MAX_POINTS), replace=False)) if n else np.zeros(0, int)

    # ---- embedding + positions
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    if n > 2:
        from sklearn.decomposition import PCA

        xy = PCA(2).fit_transform(np.asarray(features[show], dtype=np.float64))
    else:
        xy = np.zeros((len(show), 2))
    lab = labels[show]
    for ax, pts, title in ((axes[0], xy, "clustering features (PC1, PC2)"),
                           (axes[1], positions[show], "estimated position on the probe (um)")):
        rej = lab < 0
        ax.scatter(pts[rej, 0], pts[rej, 1], s=2, c="0.75", label="rejected", rasterized=True)
        for u in units:
            m = lab == u
            if m.any():
                ax.scatter(pts[m, 0], pts[m, 1], s=2, color=colors[u], rasterized=True)
        ax.set_title(title)
    if len(recording.get_channel_locations()):
        loc = recording.get_channel_locations()
        axes[1].scatter(loc[:, 0], loc[:, 1], marker="s", s=10, facecolors="none", edgecolors="k", lw=0.5)
    fig.tight_layout()
    fig.savefig(fig_dir / "embedding.png", dpi=90)
    plt.close(fig)

    # ---- templates on the probe
    fig, ax = plt.subplots(figsize=(7, 10))
    loc = recording.get_channel_locations()[:, :2]
    ax.scatter(loc[:, 0], loc[:, 1], marker="s", s=6, c="0.8")
    if templates is not None and len(templates.unit_ids):
        dense = templates.get_dense_templates()
        T = dense.shape[1]
        pitch = _pitch(loc)
        xscale = 0.8 * pitch / T
        yscale = 0.8 * pitch / max(float(np.abs(dense).max()), 1e-9)
        t = np.arange(T) * xscale
        for ui, u in enumerate(templates.unit_ids):
            mask = templates.sparsity.mask[ui] if templates.sparsity is not None else np.ones(len(loc), bool)
            for c in np.flatnonzero(mask):
                ax.plot(loc[c, 0] + t - T * xscale / 2, loc[c, 1] + dense[ui, :, c] * yscale,
                        color=colors.get(u, "k"), lw=0.8)
    ax.set_title("unit templates on the probe")
    ax.set_xlabel("x (um)")
    ax.set_ylabel("y (um)")
    fig.tight_layout()
    fig.savefig(fig_dir / "waveforms.png", dpi=90)
    plt.close(fig)

    # ---- ISI and amplitudes
    rows = []
    ncol = 5
    nrow = max(1, int(np.ceil(len(units) / ncol)))
    fig_isi, axs_isi = plt.subplots(nrow, ncol, figsize=(3 * ncol, 2.2 * nrow), squeeze=False)
    fig_amp, ax_amp = plt.subplots(figsize=(12, 5))
    duration = float((info or {}).get("recording", {}).get("duration_s") or recording.get_total_duration())
    for i, u in enumerate(units):
        ax = axs_isi[i // ncol, i % ncol]
        isis_ms = np.concatenate([np.diff(sorting.get_unit_spike_train(u, segment_index=s)) / fs * 1000
                                  for s in range(sorting.get_num_segments())])
        n_spk = sum(len(sorting.get_unit_spike_train(u, segment_index=s)) for s in range(sorting.get_num_segments()))
        viol = float(np.mean(isis_ms < REFRACTORY_MS)) if len(isis_ms) else 0.0
        ax.hist(isis_ms[isis_ms < 50], bins=np.arange(0, 51, 1), color=colors[u])
        ax.axvline(REFRACTORY_MS, color="r", lw=0.8)
        ax.set_title(f"unit {u}: {viol * 100:.1f}% < {REFRACTORY_MS} ms", fontsize=8)
        ax.tick_params(labelsize=7)
        m = labels == u
        if m.any():
            ts = events["sample_index"][m] / fs
            ax_amp.scatter(ts, events["amplitude_uv"][m], s=2, color=colors[u], rasterized=True)
        amp = float(np.median(events["amplitude_uv"][m])) if m.any() else float("nan")
        rate = n_spk / duration if duration else float("nan")
        rows.append((u, n_spk, rate, viol * 100, amp))
    for j in range(len(units), nrow * ncol):
        axs_isi[j // ncol, j % ncol].axis("off")
    fig_isi.suptitle("inter-spike intervals (ms)")
    fig_isi.tight_layout()
    fig_isi.savefig(fig_dir / "isi.png", dpi=80)
    plt.close(fig_isi)
    ax_amp.set_xlabel("time (s)")
    ax_amp.set_ylabel("event peak amplitude (uV)")
    ax_amp.set_title("amplitudes of each unit's detected events over time")
    fig_amp.tight_layout()
    fig_amp.savefig(fig_dir / "amplitudes.png", dpi=80)
    plt.close(fig_amp)

    # ---- html
    info = info or {}
    rec = info.get("recording", {})
    head = (f"{html.escape(str(rec.get('name', 'recording')))}: {rec.get('num_channels', '?')} channels, "
            f"{rec.get('duration_s', 0):.1f} s at {rec.get('sampling_rate_hz', 0):g} Hz &mdash; "
            f"{len(units)} units, {info.get('num_events', n)} detected events, "
            f"{info.get('num_rejected_events', int(np.sum(labels < 0)))} rejected as noise; "
            f"model {html.escape(str((info.get('model') or {}).get('id')))}")
    table = "".join(
        f"<tr><td>{html.escape(str(u))}</td><td>{k}</td><td>{r:.2f}</td><td>{v:.2f}</td><td>{a:.1f}</td></tr>"
        for u, k, r, v, a in rows
    )
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>SpikeVault sort report</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 10px;text-align:right}}
img{{max-width:100%;border:1px solid #ddd;margin:1em 0}}</style></head><body>
<h1>SpikeVault sort report</h1>
<p>{head}</p>
<h2>Units</h2>
<table><tr><th>unit</th><th>spikes</th><th>rate (Hz)</th><th>ISI &lt; {REFRACTORY_MS} ms (%)</th>
<th>median event amplitude (uV)</th></tr>{table}</table>
<h2>Embedding and positions</h2><img src="report/embedding.png">
<h2>Templates on the probe</h2><img src="report/waveforms.png">
<h2>Inter-spike intervals</h2><img src="report/isi.png">
<h2>Amplitudes over time</h2><img src="report/amplitudes.png">
</body></html>
"""
    path = out / "report.html"
    path.write_text(doc, encoding="utf-8")
    logger.info("report written to %s", path)
    return path


def _pitch(loc: np.ndarray) -> float:
    if len(loc) < 2:
        return 20.0
    d = np.linalg.norm(loc[:, None] - loc[None], axis=2)
    d[d == 0] = np.inf
    return float(np.median(d.min(axis=1)))
