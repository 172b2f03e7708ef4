"""Copy a finished `default` pretraining run into inference/models/default, with its cards.

Called by scripts/build_default_model.sh; reads the run's weights-only export (run/final), the
corpus manifest and card, and the synth sources file (for the probes and sampling rates the model
was trained on), and writes model.safetensors + config.json + README.md through
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
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--sources", type=Path, required=True)
    parser.add_argument("--dest", type=Path, default=Path("inference/models/default"))
    parser.add_argument("--card-dest", type=Path, default=Path("data_cards/spikevault-synth-default"))
    args = parser.parse_args()

    import spikeinterface as si

    from inference.checkpoint import load_config, load_model, save_pretrained
    from spikevault.sources import load_sources

    info = load_config(str(args.run / "final"))
    model = load_model(str(args.run / "final"))
    sources = load_sources(args.sources)
    probes = sorted({PROBE_TYPE.get(s.probe or "", s.probe or "unknown") for s in sources})
    rates = sorted({float(si.load(s.path).get_sampling_frequency()) for s in sources})
    labs = sorted({s.lab or "unknown" for s in sources})
    licences = sorted({s.licence or "unknown" for s in sources})
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    corpus_card = (args.corpus / "README.md").read_text()
    # The model card quotes the corpus card's body (its YAML header belongs to the dataset card).
    corpus_body = corpus_card.split("\n---\n", 1)[1] if corpus_card.startswith("---\n") else corpus_card

    config = dict(info.config)
    extra = {k: config[k] for k in ("training", "step", "metrics", "corpus") if k in config}
    extra["corpus"] = {"name": "spikevault-synth-default", "summary": manifest.get("summary", {}),
                       "labs": labs, "licences": licences, "num_recordings": len(sources)}
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
                "The embedded default spike encoder of SpikeVault, pretrained self-supervised "
                f"(`configs/pretrain/default.yaml`) on {len(sources)} generated ground-truth recordings "
                "(`spikevault synth --seed 100`): single wires, tetrodes, 32-channel linear and 64-channel "
                "dense probes at 20-40 kHz, half of them hybrid from real templates of the Kilosort eMouse "
                "and Kampff ultra-dense surveys. Rebuild with `bash scripts/build_default_model.sh`."
            ),
            "license": licence,
            "datasets": ["spikevault-synth-default"],
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
    print(f"default model written to {args.dest} (probes {probes}, rates {rates}); corpus card in {args.card_dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
