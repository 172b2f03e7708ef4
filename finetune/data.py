"""Events to fine-tune on, and the held-out events to judge the result on.

A source is a recording (anything SpikeInterface reads, or an in-memory ``BaseRecording``) or a
``spikevault`` corpus folder. Recordings go through the one extraction code path
(:mod:`spikevault.extract`) with the *model's* event schema, so the tuned model sees exactly the
events it will see at sorting time. Unit labels come from any SpikeInterface sorting (a phy folder,
a saved sorting, NWB, an in-memory ``BaseSorting``), checked against the recording first.

Every source is split *by time*: the tuning part is ``--train-window-s START END`` (or the first
``1 - holdout_fraction`` of the recording) and the held-out part is everything else. Held-out events
never reach the optimiser nor the DeepCluster clustering; they are only embedded for the
before/after evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spikevault.schema import EventSchema, concat_blocks, slice_block

logger = logging.getLogger(__name__)


@dataclass
class TuningData:
    """Tuning and held-out events plus a description of where they came from.

    Attributes
    ----------
    train : dict of np.ndarray
        Event block used for tuning.
    heldout : dict of np.ndarray
        Event block used only for evaluation (outside the tuning window).
    schema : EventSchema
        Event schema of both blocks (the model's).
    sources : list of dict
        Per source: id, kind, path, probe, channels, rate, duration, label source, windows and counts.
    """

    train: dict
    heldout: dict
    schema: EventSchema
    sources: list = field(default_factory=list)

    @property
    def num_train(self) -> int:
        return int(len(self.train["waveform"]))

    @property
    def num_heldout(self) -> int:
        return int(len(self.heldout["waveform"]))

    def train_labels(self) -> np.ndarray:
        return np.asarray(self.train["unit_label"])

    def has_heldout_labels(self) -> bool:
        return bool((np.asarray(self.heldout["unit_label"]) >= 0).any())


# ----------------------------------------------------------------------------------- labels
def load_sorting(source) -> Any:
    """Read a sorting: a ``BaseSorting`` is returned as is; a phy folder (``params.py`` +
    ``spike_times.npy``) goes through ``spikeinterface.extractors.read_phy``; anything else through
    ``spikeinterface.load`` (saved sorting folders, ``.npz``, ...).

    Raises
    ------
    FileNotFoundError, ValueError
        When the path is missing or is not a sorting, with the formats accepted.
    """
    from spikeinterface.core import BaseSorting

    if isinstance(source, BaseSorting):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"--labels {path}: no such file or folder")
    if path.is_dir() and (path / "spike_times.npy").exists() and (path / "params.py").exists():
        from spikeinterface.extractors import read_phy

        return read_phy(path)
    try:
        import spikeinterface as si

        obj = si.load(path)
    except Exception as err:  # noqa: BLE001 - re-raised with the formats we accept
        raise ValueError(
            f"--labels {path}: could not read a sorting ({type(err).__name__}: {err}). Give a phy folder "
            "(params.py + spike_times.npy), a sorting saved with sorting.save(folder=...), or a .npz sorting."
        ) from err
    if not isinstance(obj, BaseSorting):
        raise ValueError(f"--labels {path}: this is a {type(obj).__name__}, not a sorting")
    return obj


def check_labels(recording, sorting, where: str = "--labels") -> None:
    """Check that a sorting labels this recording: same rate, same segments, spikes inside it.

    Raises ``ValueError`` naming the mismatch and what to do.
    """
    fs_rec, fs_sort = float(recording.get_sampling_frequency()), float(sorting.get_sampling_frequency())
    if abs(fs_rec - fs_sort) > 1e-6 * fs_rec:
        raise ValueError(
            f"{where}: the sorting's sampling rate is {fs_sort:g} Hz but the recording's is {fs_rec:g} Hz; "
            "these labels were made for another recording (or a resampled copy). Pass the sorting of this "
            "recording, made at its native rate."
        )
    if sorting.get_num_segments() != recording.get_num_segments():
        raise ValueError(
            f"{where}: the sorting has {sorting.get_num_segments()} segment(s), the recording "
            f"{recording.get_num_segments()}; pass the sorting of this recording"
        )
    if len(sorting.unit_ids) == 0:
        raise ValueError(f"{where}: the sorting has no units; pass a sorting with labelled units")
    for seg in range(recording.get_num_segments()):
        n = recording.get_num_samples(seg)
        last = -1
        first = 0
        for u in sorting.unit_ids:
            st = sorting.get_unit_spike_train(u, segment_index=seg)
            if len(st):
                last = max(last, int(st.max()))
                first = min(first, int(st.min()))
        if first < 0:
            raise ValueError(f"{where}: segment {seg} has spikes at negative sample indices; the sorting is corrupt")
        if last >= n:
            raise ValueError(
                f"{where}: segment {seg} has spikes up to sample {last} ({last / fs_rec:.3f} s) but the recording "
                f"ends at sample {n} ({n / fs_rec:.3f} s); these labels belong to a longer recording. Pass the "
                "sorting of this recording (or slice it with sorting.frame_slice)."
            )


# ------------------------------------------------------------------------------------ sources
def _is_corpus(source) -> bool:
    return isinstance(source, (str, Path)) and (Path(source) / "manifest.json").is_file()


def _source_id(source, index: int, used: set) -> str:
    if isinstance(source, (str, Path)):
        base = Path(source).name or f"recording{index}"
    else:
        base = f"recording{index}"
    rid, n = base, 1
    while rid in used:
        n += 1
        rid = f"{base}-{n}"
    used.add(rid)
    return rid


def describe_source(source) -> str:
    """A short human-readable name for a source (path, or the class of an in-memory object)."""
    if isinstance(source, (str, Path)):
        return str(source)
    name = type(source).__name__
    try:
        return f"{name}({source.get_num_channels()} ch, {source.get_sampling_frequency():g} Hz, " \
               f"{source.get_total_duration():.1f} s, in memory)"
    except Exception:  # noqa: BLE001
        return f"{name}(in memory)"


def _time_masks(t_s: np.ndarray, duration_s: float, train_window_s, holdout_fraction: float, where: str):
    if train_window_s is not None:
        start, end = map(float, train_window_s)
        if start >= duration_s:
            raise ValueError(
                f"--train-window-s {start:g} {end:g}: {where} lasts only {duration_s:.3f} s; choose a window "
                "inside the recording"
            )
        window = (start, min(end, duration_s))
    else:
        window = (0.0, duration_s * (1.0 - holdout_fraction))
    train = (t_s >= window[0]) & (t_s < window[1])
    return train, ~train, window


def load_tuning_data(
    sources: list,
    schema: EventSchema,
    *,
    labels: list | None = None,
    extract_params: dict | None = None,
    train_window_s: tuple[float, float] | None = None,
    holdout_fraction: float = 0.3,
    max_events: int = 50_000,
    eval_max_events: int = 20_000,
    seed: int = 0,
    job_kwargs: dict | None = None,
) -> TuningData:
    """Extract (or read) the events of every source and split them into tuning and held-out parts.

    Parameters
    ----------
    sources : list
        Recording paths, in-memory recordings, or spikevault corpus folders.
    schema : EventSchema
        The model's event schema; recordings are extracted with it, corpora must match it.
    labels : list or None
        One sorting (path or ``BaseSorting``) per source, or a single one when there is one source;
        ``None`` for unlabelled sources (corpus events keep the labels they were built with).
    extract_params : dict or None
        ``ExtractParams.to_dict()`` of the model (filter band, reference, threshold); defaults otherwise.
    train_window_s : (float, float) or None
        Tuning window in seconds; everything outside it is held out.
    holdout_fraction : float
        Without a window: the last fraction of each recording is held out.
    max_events, eval_max_events : int
        Caps on tuning / held-out events (deterministic subsample by ``seed``).
    seed : int
        Seed of the subsampling.
    job_kwargs : dict or None
        SpikeInterface job kwargs for extraction.

    Returns
    -------
    TuningData
    """
    if labels is not None and len(labels) not in (1, len(sources)):
        raise ValueError(f"--labels: give one sorting per --data source ({len(sources)}), got {len(labels)}")
    if labels is not None and len(labels) == 1 and len(sources) > 1:
        raise ValueError("--labels: one sorting was given for several --data sources; give one per source")
    trains, helds, described, used = [], [], [], set()
    for i, source in enumerate(sources):
        sorting_src = labels[i] if labels is not None else None
        if _is_corpus(source):
            if sorting_src is not None:
                raise ValueError(f"--labels: {source} is a spikevault corpus, whose events carry their labels; "
                                 "--labels applies to recordings only")
            block, info = _corpus_events(Path(source), schema)
            t_s = block["sample_index"] / block["sampling_rate_hz"].astype(np.float64)
            tr = np.zeros(len(t_s), bool)
            windows = {}
            for rid in np.unique(block["recording_id"]):
                sel = block["recording_id"] == rid
                dur = float(t_s[sel].max()) + 1e-3
                m_tr, _, win = _time_masks(t_s[sel], dur, train_window_s, holdout_fraction, f"recording {rid} of {source}")
                tr[np.flatnonzero(sel)[m_tr]] = True
                windows[str(rid)] = list(win)
            info["train_window_s"] = windows
        else:
            block, info, dur = _recording_events(source, schema, sorting_src, extract_params, job_kwargs,
                                                 _source_id(source, i, used))
            t_s = block["sample_index"] / float(info["sampling_rate_hz"])
            tr, _, win = _time_masks(t_s, dur, train_window_s, holdout_fraction, describe_source(source))
            info["train_window_s"] = list(win)
            info["heldout"] = "outside the tuning window"
        info["num_train_events"], info["num_heldout_events"] = int(tr.sum()), int((~tr).sum())
        if not tr.any():
            raise ValueError(
                f"{info['source']}: no events in the tuning window {info['train_window_s']}; widen --train-window-s "
                "or lower --holdout-fraction"
            )
        trains.append(slice_block(block, tr))
        helds.append(slice_block(block, ~tr))
        described.append(info)
    train = _subsample(concat_blocks(trains, schema), max_events, seed)
    held = _subsample(concat_blocks(helds, schema), eval_max_events, seed + 1)
    if len(held["waveform"]) == 0:
        raise ValueError(
            "no held-out events: the tuning window covers every event, so the before/after evaluation has nothing "
            "to measure. Shorten --train-window-s or raise --holdout-fraction."
        )
    logger.info("tuning on %d events, %d held out, from %d source(s)", len(train["waveform"]),
                len(held["waveform"]), len(described))
    return TuningData(train=train, heldout=held, schema=schema, sources=described)


def _subsample(block: dict, max_events: int, seed: int) -> dict:
    n = len(block["waveform"])
    if n <= max_events:
        return block
    keep = np.sort(np.random.default_rng(seed).choice(n, size=max_events, replace=False))
    return slice_block(block, keep)


def _recording_events(source, schema, sorting_src, extract_params, job_kwargs, recording_id):
    from spikevault import extract

    recording = extract.load_recording(source)
    params = extract.ExtractParams.from_dict(extract_params) if extract_params else extract.ExtractParams()
    where = describe_source(source)
    try:
        extract.check_recording(recording, schema, params)
    except ValueError as err:
        raise ValueError(
            f"--data {where}: this recording does not fit the model's event schema "
            f"({schema.sampling_rate_hz:g} Hz canonical, K={schema.num_channels}, "
            f"{schema.ms_before}+{schema.ms_after} ms): {err}"
        ) from err
    sorting, label_source = None, "none"
    if sorting_src is not None:
        sorting = load_sorting(sorting_src)
        check_labels(recording, sorting, where=f"--labels {describe_source(sorting_src)} for {where}")
        label_source = "curated"
    probe_name = recording.get_annotation("probe_name") if "probe_name" in recording.get_annotation_keys() else None
    block = extract.extract_events(
        recording, schema=schema, params=params, recording_id=recording_id, probe_name=probe_name,
        sorting=sorting, label_source=label_source, job_kwargs=dict(job_kwargs or {"n_jobs": 1, "progress_bar": False}),
    )
    schema.validate_block(block, where=f"events of {where}")
    if len(block["waveform"]) == 0:
        raise ValueError(f"--data {where}: no spikes detected; check the recording (units, gain) or the model's "
                         "detection threshold")
    duration = float(recording.get_total_duration())
    labelled = block["unit_label"] >= 0
    info = {
        "source": where,
        "kind": "recording",
        "recording_id": recording_id,
        "probe": probe_name or "unknown",
        "num_channels": int(recording.get_num_channels()),
        "sampling_rate_hz": float(recording.get_sampling_frequency()),
        "duration_s": duration,
        "labels": describe_source(sorting_src) if sorting_src is not None else None,
        "num_units_labelled": int(len(np.unique(block["unit_label"][labelled]))),
        "num_events": int(len(block["waveform"])),
    }
    return block, info, duration


def _corpus_events(folder: Path, schema: EventSchema):
    import json

    from spikevault.reader import load_events

    manifest = json.loads((folder / "manifest.json").read_text())
    if "schema" in manifest:
        schema.check_compatible(EventSchema.from_dict(manifest["schema"]), what=f"corpus {folder}",
                                expected_by="the model being fine-tuned")
    block = load_events(folder)
    schema.validate_block(block, where=f"corpus {folder}")
    if len(block["waveform"]) == 0:
        raise ValueError(f"--data {folder}: the corpus holds no events")
    labelled = block["unit_label"] >= 0
    info = {
        "source": str(folder),
        "kind": "corpus",
        "recording_ids": sorted(map(str, np.unique(block["recording_id"]))),
        "probe": sorted(map(str, np.unique(block["probe"]))),
        "sampling_rate_hz": sorted(float(x) for x in np.unique(block["sampling_rate_hz"])),
        "labels": "from the corpus" if labelled.any() else None,
        "num_units_labelled": int(len(np.unique(
            np.char.add(block["recording_id"][labelled], block["unit_label"][labelled].astype(str))))),
        "num_events": int(len(block["waveform"])),
    }
    return block, info
