#!/usr/bin/env bash
# Rebuild the embedded default model (inference/models/default) from nothing, on a CPU.
#   bash scripts/build_default_model.sh [WORKDIR]        (about 60 minutes on 2 cores)
# 1. synth: 24 ground-truth recordings (wire, tetrode, 32-ch linear, dense 64-ch; 20-40 kHz;
#    half hybrid from the real templates in ../shared/data when present), seed 100 — disjoint
#    from the seeds that tests, the demo and the benchmarks evaluate on.
# 2. build: a WebDataset corpus, 20% of the recordings held out for validation (by recording).
# 3. pretrain: the `default` preset (configs/pretrain/default.yaml), self-supervised.
# 4. synth + build a second labelled set for tuning: 40 recordings, seed 101, tetrodes twice as
#    often, half of the synthetic linear/dense recordings drifting (zigzag 10-30 um).
# 5. finetune: supervised contrastive on the simulated units of both corpora (SimSort's recipe:
#    learn what separates neurons from simulated ground truth), the pretraining objective kept as a
#    regulariser. The last 15% of each recording is held out for the before/after figures.
# 6. finalize: copy the tuned model, with probes, rates, metrics and cards, into
#    inference/models/default and the corpus cards into data_cards/.
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
"$sv" synth --out "$work/tune-sources" --num-recordings 40 --duration-s 60 --seed 101 \
    --probes single tetrode tetrode linear32 dense64 --drift-fraction 0.5
"$sv" build "$work/tune-sources/sources.yaml" --out "$work/tune-corpus" --format webdataset \
    --val-fraction 0 --test-fraction 0 --seed 101 --workers 2
"$sv" finetune --model "$work/run/final" --data "$work/tune-corpus" "$work/corpus" --mode contrastive \
    --steps 1200 --batch-size 256 --units-per-batch 16 --holdout-fraction 0.15 --max-events 200000 \
    --n-jobs 1 --out "$work/tuned"
.venv/bin/python scripts/finalize_default_model.py --run "$work/run" --corpus "$work/corpus" \
    --sources "$work/sources/sources.yaml" --tuned "$work/tuned" --tune-corpus "$work/tune-corpus" \
    --tune-sources "$work/tune-sources/sources.yaml"
