"""Hugging Face dataset card (README.md with YAML front matter) generated from a corpus manifest.

Built offline with ``huggingface_hub.DatasetCard`` / ``DatasetCardData`` (``card.validate()``
calls the network and is not used). The YAML declares the Parquet (and/or WebDataset) files per
split as ``configs`` so ``datasets.load_dataset`` and the Hub viewer find them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_TEMPLATE = """---
{{ card_data }}
---

# {{ pretty_name }}

Spike events extracted by [SpikeVault](https://github.com/) (`spikevault build`): one row per
detected spike, {{ T }} samples x {{ K }} channels at {{ rate }} Hz (event schema v{{ version }}),
waveforms in microvolts, nearest channels first with their offsets and a mask for small probes.

## Summary

| split | recordings | events | units | probes | bytes |
|---|---|---|---|---|---|
{{ split_rows }}

## Sources

| recording | split | probe | sampling rate (Hz) | channels | events | units | lab | subject | region | licence |
|---|---|---|---|---|---|---|---|---|---|---|
{{ source_rows }}
{{ skipped }}
## Event schema

```json
{{ schema_json }}
```

## Build parameters

```json
{{ build_json }}
```

Software: {{ software }}.

Splits are by recording (never by event), deterministic in the recording id and the seed.
Every shard's sha256 is in `manifest.json`; check a copy with `spikevault verify DIR`.
"""


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                        (1_000_000_000, "100M<n<1B")):
        if n < limit:
            return name
    return "1B<n<10B"


def make_dataset_card(manifest: dict[str, Any], pretty_name: str = "SpikeVault spike-event corpus"):
    """A ``huggingface_hub.DatasetCard`` describing the corpus of ``manifest``."""
    import json

    from huggingface_hub import DatasetCard, DatasetCardData

    schema = manifest["schema"]
    sources = manifest["sources"]
    summary = manifest.get("summary", {})
    total = sum(v["events"] for v in summary.values()) if summary else 0
    licences = sorted({str(s["licence"]) for s in sources if s.get("licence")}) or ["other"]
    configs = []
    for fmt, pattern in (("parquet", "parquet/*.parquet"), ("webdataset", "webdataset/*.tar")):
        files = [s for s in manifest["shards"] if s["format"] == fmt]
        if not files:
            continue
        data_files = [{"split": sp, "path": sorted(s["path"] for s in files if s["split"] == sp)}
                      for sp in ("train", "val", "test") if any(s["split"] == sp for s in files)]
        configs.append({"config_name": "default" if fmt == "parquet" or not configs else fmt,
                        "data_files": data_files})
    if len(configs) == 2:
        configs[1]["config_name"] = "webdataset"
    data = DatasetCardData(
        license=licences[0] if len(licences) == 1 else licences,
        pretty_name=pretty_name,
        size_categories=_size_category(total),
        task_categories=["feature-extraction"],
        tags=["neuroscience", "electrophysiology", "spike-sorting", "spikevault",
              f"event-schema-v{schema['version']}"],
        configs=configs,
        spikevault_schema=schema,
    )

    def num(x):
        return f"{x:,}" if isinstance(x, int) else str(x)

    split_rows = "\n".join(
        f"| {sp} | {v['recordings']} | {num(v['events'])} | {num(v['units'])} | {', '.join(v['probes']) or '-'} | "
        f"{', '.join(f'{f}: {b / 1e6:.1f} MB' for f, b in v['bytes'].items())} |"
        for sp, v in summary.items()
    )
    source_rows = "\n".join(
        f"| {s['recording_id']} | {s.get('split', '')} | {s.get('probe', '-')} | "
        f"{s.get('recording_info', {}).get('sampling_rate_hz', '-')} | {s.get('recording_info', {}).get('num_channels', '-')} | "
        f"{num(s.get('num_events', 0))} | {num(s.get('num_units', 0))} | {s.get('lab', '-')} | {s.get('subject', '-')} | "
        f"{s.get('region', '-')} | {s.get('licence', '-')} |"
        for s in sources
    ) or "| (none) | | | | | | | | | | |"
    skipped = ""
    if manifest.get("skipped"):
        skipped = "\nSkipped recordings (not in the corpus):\n\n" + "\n".join(
            f"- `{s['recording_id']}`: {s['error']}" for s in manifest["skipped"]) + "\n"
    return DatasetCard.from_template(
        data, template_str=_TEMPLATE, pretty_name=pretty_name,
        T=schema["num_samples"], K=schema["num_channels"], rate=schema["sampling_rate_hz"], version=schema["version"],
        split_rows=split_rows, source_rows=source_rows, skipped=skipped,
        schema_json=json.dumps(schema, indent=1, sort_keys=True),
        build_json=json.dumps(manifest.get("build", {}), indent=1, sort_keys=True),
        software=", ".join(f"{k} {v}" for k, v in sorted(manifest.get("software", {}).items())),
    )


def write_dataset_card(manifest: dict[str, Any], path: str | Path, **kwargs) -> Path:
    """Write the card of ``manifest`` to ``path`` (usually ``<corpus>/README.md``)."""
    card = make_dataset_card(manifest, **kwargs)
    path = Path(path)
    path.write_text(str(card))
    return path
