"""Copy the finished default model into inference/models/default, with its cards.

Called by scripts/build_default_model.sh; reads the model (the contrastive fine-tune of the
pretraining run, ``--tuned``, or the pretraining run's weights-only export ``run/final``), the corpus
manifests and cards, and the synth sources files (for the probes and sampling rates the model was
trained on), and writes model.safetensors + config.json + README.md through
inference.checkpoint.save_pretrained, so the embedded model is exactly what `load_model` verifies.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

PROBE_TYPE = {"single": "single", "tetrode": "tetrode", "linear32": "linear", "dense64": "dense",
              "neuropixels": "dense"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, default=None, help="pretraining run folder (its final/ is shipped without --tuned)")
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--sources", type=Path, required=True)
    parser.add_argument("--tuned", type=Path, default=None,
                        help="fine-tuned model folder (spikevault finetune --out) to ship instead of run/final")
    parser.add_argument("--tune-corpus", type=Path, default=None, help="corpus of the fine-tuning stage")
    parser.add_argument("--tune-sources", type=Path, default=None, help="sources.yaml of the fine-tuning stage")
    parser.add_argument("--dest", type=Path, default=Path("inference/models/default"))
    parser.add_argument("--card-dest", type=Path, default=Path("data_cards/spikevault-synth-default"))
    parser.add_argument("--tune-card-dest", type=Path, default=Path("data_cards/spikevault-synth-tune"))
    args = parser.parse_args()
    if args.tuned is None and args.run is None:
        parser.error("give --run (ship the pretrained model) or --tuned (ship its fine-tune)")
    if args.tuned is not None and (args.tune_corpus is None or args.tune_sources is None):
        parser.error("--tuned needs --tune-corpus and --tune-sources")

    import spikeinterface as si

    from inference.checkpoint import load_config, load_model, save_pretrained
    from spikevault.sources import load_sources

    folder = args.tuned if args.tuned is not None else args.run / "final"
    info = load_config(str(folder))
    model = load_model(str(folder))
    sources = load_sources(args.sources)
    tune_sources = load_sources(args.tune_sources) if args.tuned is not None else []
    every = sources + tune_sources
    probes = sorted({PROBE_TYPE.get(s.probe or "", s.probe or "unknown") for s in every})
    rates = sorted({float(si.load(s.path).get_sampling_frequency()) for s in every})
    labs = sorted({s.lab or "unknown" for s in every})
    licences = sorted({s.licence or "unknown" for s in every})
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    corpus_card = (args.corpus / "README.md").read_text()
    # The model card quotes the corpus card's body (its YAML header belongs to the dataset card).
    corpus_body = corpus_card.split("\n---\n", 1)[1] if corpus_card.startswith("---\n") else corpus_card

    config = dict(info.config)
    extra = {k: config[k] for k in ("training", "step", "metrics", "corpus") if k in config}
    extra["corpus"] = {"name": "spikevault-synth-default", "summary": manifest.get("summary", {}),
                       "labs": labs, "licences": licences, "num_recordings": len(sources)}
    datasets = ["spikevault-synth-default"]
    stages = (f"pretrained self-supervised (`configs/pretrain/default.yaml`) on {len(sources)} generated "
              "ground-truth recordings (`spikevault synth --seed 100`)")
    if args.tuned is not None:
        tune_manifest = json.loads((args.tune_corpus / "manifest.json").read_text())
        extra["tuning_corpus"] = {"name": "spikevault-synth-tune", "summary": tune_manifest.get("summary", {}),
                                  "num_recordings": len(tune_sources)}
        datasets.append("spikevault-synth-tune")
        stages += (f", then fine-tuned with a supervised contrastive loss on the simulated units of those and "
                   f"{len(tune_sources)} more recordings (`spikevault synth --seed 101 --drift-fraction 0.5`, "
                   "tetrodes twice as often, half of the synthetic linear and dense probes drifting) "
                   "(`spikevault finetune --mode contrastive`, the pretraining objective kept as a regulariser), "
                   "as SimSort trains on simulated ground truth")
    extra["intended_probes"] = probes
    extra["sampling_rates_hz"] = rates
    licence = "gpl-2.0" if any("GPL" in lic for lic in licences) else "cc-by-4.0"
    if args.dest.exists():
        shutil.rmtree(args.dest)
    save_pretrained(
        model, args.dest,
        card_info={
            "model_name": "spikevault default",
            "model_ref": "default",
            "description": (
                f"The embedded default spike encoder of SpikeVault, {stages}: single wires, tetrodes, "
                "32-channel linear and 64-channel dense probes at 20-40 kHz, half of the recordings hybrid "
                "from real templates of the Kilosort eMouse and Kampff ultra-dense surveys. None of the "
                "recordings that tests, the demo or the benchmarks score it on was among them. Rebuild with "
                "`bash scripts/build_default_model.sh`."
            ),
            "license": licence,
            "datasets": datasets,
            "corpus_card": corpus_body[:4000],
            "limitations": (
                "Trained on generated and hybrid data only; evaluate on your own ground truth or fine-tune "
                "(`spikevault finetune`) for a new probe, species or rate. See BENCHMARKS.md for held-out "
                "accuracy against PCA features and established sorters."
            ),
        },
        extra_config=extra,
        preprocessing=info.preprocessing,
    )
    args.card_dest.mkdir(parents=True, exist_ok=True)
    (args.card_dest / "README.md").write_text(corpus_card)
    if args.tuned is not None:
        args.tune_card_dest.mkdir(parents=True, exist_ok=True)
        (args.tune_card_dest / "README.md").write_text((args.tune_corpus / "README.md").read_text())
    print(f"default model written to {args.dest} (probes {probes}, rates {rates}); corpus card in {args.card_dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
