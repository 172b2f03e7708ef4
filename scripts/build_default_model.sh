#!/usr/bin/env bash
# Rebuild the embedded default model (inference/models/default) from nothing, on a CPU.
#   bash scripts/build_default_model.sh [WORKDIR]        (about 30 minutes on 2 cores)
# 1. synth: 24 ground-truth recordings (wire, tetrode, 32-ch linear, dense 64-ch; 20-40 kHz;
#    half hybrid from the real templates in ../shared/data when present), seed 100 — disjoint
#    from the seeds that tests, the demo and the benchmarks evaluate on.
# 2. build: a WebDataset corpus, 20% of the recordings held out for validation (by recording).
# 3. pretrain: the `default` preset (configs/pretrain/default.yaml).
# 4. finalize: copy the weights-only export, with probes, rates, metrics and both cards, into
#    inference/models/default and the corpus card into data_cards/.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-work/default-model}"
sv=".venv/bin/spikevault"
[ -x "$sv" ] || { echo "run 'bash scripts/bootstrap.sh test' first" >&2; exit 2; }
mkdir -p "$work"
"$sv" synth --out "$work/sources" --num-recordings 24 --duration-s 60 --seed 100 \
    --probes single tetrode linear32 dense64
"$sv" build "$work/sources/sources.yaml" --out "$work/corpus" --format webdataset \
    --val-fraction 0.2 --test-fraction 0 --seed 100 --workers 2
"$sv" info "$work/corpus"
"$sv" pretrain --config configs/pretrain/default.yaml --data.corpus "$work/corpus" --out "$work/run"
.venv/bin/python scripts/finalize_default_model.py --run "$work/run" --corpus "$work/corpus" \
    --sources "$work/sources/sources.yaml"
