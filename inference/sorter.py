"""SpikeVault as a SpikeInterface sorter: ``run_sorter("spikevault", recording, folder=...)``.

SpikeInterface (0.105) has no plugin hook for third-party sorters: the class below is appended to
``spikeinterface.sorters.sorterlist.sorter_full_list`` and ``sorter_dict`` when this module is
imported, which is all ``run_sorter`` / ``get_default_sorter_params`` / ``installed_sorters`` look
at. So::

    import inference.sorter  # registers "spikevault"
    from spikeinterface.sorters import run_sorter
    sorting = run_sorter("spikevault", recording, folder="sv_output", model="default")

``run_sorter`` stores the recording in the folder (JSON or pickle) and reloads it, so the
recording must be serialisable: ``recording.save(folder=...)`` a generated or in-memory one first.
The sort's own output (report, rejected events, params, log) lands in
``folder/sorter_output/spikevault``; the sorting in ``folder/sorter_output/sorting``.
"""

from __future__ import annotations

from pathlib import Path

from spikeinterface.core import load
from spikeinterface.sorters import BaseSorter

SORTER_NAME = "spikevault"


class SpikeVaultSorter(BaseSorter):
    """Zero-shot sorting with a pretrained spike encoder (:func:`inference.sort.sort`)."""

    sorter_name = SORTER_NAME
    requires_locations = True
    handle_multi_segment = True
    gpu_capability = "not-supported"
    sorter_description = (
        "SpikeVault: pretrained probe-agnostic spike encoder, clustering with position, iterative "
        "split/merge curation, template matching (wobble on whitened traces) and a final auto-merge."
    )

    _default_params = {
        "model": "default",
        "features": "model",
        "clusterer": "hdbscan",
        "matching": True,
        "matching_method": "wobble",
        "reject_noise_fits": True,
        "final_merge": True,
        "final_merge_drift_splits": True,
        "motion_correction": "auto",
        "drifting_templates": True,
        "position_scale_um": 12.0,
        "detect_threshold": None,
        "max_contamination": 0.5,
        "min_unit_spikes": 20,
        "report": True,
        "export_phy": False,
        "seed": 0,
        "job_kwargs": {"n_jobs": 1},
    }

    _params_description = {
        "model": "Model id: 'default', a registry name, a checkpoint folder or hf-hub:ORG/NAME@REV",
        "features": "'model' (encoder embedding) or 'pca' (PCA of the same events)",
        "clusterer": "'hdbscan', 'gmm', 'dpgmm' or 'kmeans' (each chooses its number of units)",
        "matching": "Final template-matching pass over the recording",
        "matching_method": "SpikeInterface matching engine ('wobble', 'circus-omp', 'tdc-peeler', 'nearest')",
        "reject_noise_fits": "After wobble or circus-omp, remove the fits of low-amplitude templates that their amplitude "
                             "distribution says are noise",
        "final_merge": "Merge units split in two after matching (SpikeInterface auto_merge_units: similar templates, close, low cross-contamination)",
        "final_merge_drift_splits": "On a motion-corrected recording, also merge pairs of units that fire each at its "
                                    "own displacements with templates a little less alike (one neuron cut by the drift)",
        "motion_correction": "'auto' (when drift is detected), True or False",
        "drifting_templates": "With drift correction (rigid motion, wobble): move the templates with the motion over the "
                              "recorded traces; False matches the interpolated traces",
        "position_scale_um": "Weight of spike position vs embedding in clustering (um per embedding SD)",
        "detect_threshold": "Detection threshold in MAD noise units (None: the model's own)",
        "max_contamination": "Units whose ISI-violation ratio (1.5 ms) exceeds this are multi-unit activity and "
                             "leave the sorting (None keeps every unit)",
        "min_unit_spikes": "Units with fewer spikes after matching leave the sorting (0 keeps every unit)",
        "report": "Write the PNG/HTML report",
        "export_phy": "Also export a phy folder",
        "seed": "Seed of every random choice",
        "job_kwargs": "SpikeInterface job kwargs (n_jobs, progress_bar, ...)",
    }

    @classmethod
    def is_installed(cls) -> bool:
        return True

    @classmethod
    def get_sorter_version(cls) -> str:
        import spikevault

        return spikevault.__version__

    @classmethod
    def _check_apply_filter_in_params(cls, params) -> bool:
        return False

    @classmethod
    def _setup_recording(cls, recording, sorter_output_folder, params, verbose) -> None:
        pass  # run_sorter already stored the recording; _run_from_folder reloads it

    @classmethod
    def _run_from_folder(cls, sorter_output_folder, params, verbose) -> None:
        from .sort import sort

        sorter_output_folder = Path(sorter_output_folder)
        recording = cls.load_recording_from_folder(sorter_output_folder.parent, with_warnings=False)
        params = dict(params)
        job_kwargs = dict(params.pop("job_kwargs", None) or {})
        job_kwargs.setdefault("progress_bar", bool(verbose))
        model = params.pop("model")
        sorting = sort(recording, model=model, out=sorter_output_folder / "spikevault", overwrite=True,
                       job_kwargs=job_kwargs, **params)
        sorting.save(folder=sorter_output_folder / "sorting", overwrite=True)

    @classmethod
    def _get_result_from_folder(cls, sorter_output_folder):
        return load(Path(sorter_output_folder) / "sorting")


def register() -> None:
    """Add :class:`SpikeVaultSorter` to SpikeInterface's sorter registry (idempotent)."""
    from spikeinterface.sorters import sorterlist

    if SORTER_NAME not in sorterlist.sorter_dict:
        sorterlist.sorter_full_list.append(SpikeVaultSorter)
        sorterlist.sorter_dict[SORTER_NAME] = SpikeVaultSorter


register()
