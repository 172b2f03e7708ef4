"""Model cards: the README.md of a checkpoint, generated from its config and training run.

Built with huggingface_hub's ``ModelCard`` / ``ModelCardData`` entirely offline (the YAML front
matter the hub indexes: ``library_name: spikevault``, tags, licence, datasets, base model). Never
calls ``card.validate()``, which needs the network.
"""

from __future__ import annotations

import json
from typing import Any

BASE_TAGS = ("spikevault", "spike-sorting", "electrophysiology", "neuroscience", "variational-autoencoder")
DEFAULT_LICENSE = "apache-2.0"


def _get(card_info: dict[str, Any], config: dict[str, Any], key: str, default: Any = None) -> Any:
    """card_info wins over config.json; both may be absent."""
    if card_info.get(key) is not None:
        return card_info[key]
    if config.get(key) is not None:
        return config[key]
    return default


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return list(value)
    return [value]


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value).replace("|", "\\|")


def _table(d: dict[str, Any], header: tuple[str, str] = ("key", "value")) -> str:
    rows = _flatten(d)
    if not rows:
        return ""
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def _json_block(d: Any) -> str:
    return "```json\n" + json.dumps(d, indent=2, sort_keys=True, default=str) + "\n```"


def _hub_repo_of(model_id: str | None) -> str | None:
    """'hf-hub:ORG/NAME@REV' -> 'ORG/NAME' (for base_model); None for local folders / names."""
    if model_id and model_id.startswith("hf-hub:"):
        return model_id[len("hf-hub:"):].partition("@")[0]
    return None


def make_model_card(config_dict: dict[str, Any], card_info: dict[str, Any] | None = None):
    """Build the model card of a checkpoint.

    Parameters
    ----------
    config_dict : dict
        The checkpoint's ``config.json`` content (model, schema, preprocessing, and optionally
        ``training``, ``metrics``, ``lineage``, ``corpus``, ``intended_probes``,
        ``sampling_rates_hz``).
    card_info : dict, optional
        Card-only content, overriding config entries of the same name: ``model_name``,
        ``description``, ``license``, ``datasets`` (hub dataset ids of the corpus), ``tags``,
        ``corpus_card`` (markdown of the corpus dataset card, or a summary), ``limitations``
        (str or list), ``repo_id`` (for the usage snippet), ``intended_probes``,
        ``sampling_rates_hz``, ``metrics``, ``training``, ``lineage``.

    Returns
    -------
    huggingface_hub.ModelCard
    """
    from huggingface_hub import ModelCard, ModelCardData

    info = dict(card_info or {})
    config = config_dict
    schema = config.get("schema", {})
    model_cfg = config.get("model", {})
    preprocessing = config.get("preprocessing", {})
    probes = [str(p) for p in _as_list(_get(info, config, "intended_probes"))]
    rates = _as_list(_get(info, config, "sampling_rates_hz"))
    metrics = _get(info, config, "metrics", {}) or {}
    training = _get(info, config, "training", {}) or {}
    lineage = _get(info, config, "lineage", {}) or {}
    corpus = _get(info, config, "corpus", {}) or {}
    repo_id = info.get("repo_id")
    name = info.get("model_name") or (repo_id.split("/")[-1] if repo_id else "SpikeVault spike encoder")
    parent = lineage.get("parent") if isinstance(lineage, dict) else None

    tags = list(dict.fromkeys([*BASE_TAGS, *(f"probe-{p}" for p in probes), *_as_list(info.get("tags"))]))
    data = ModelCardData(
        library_name="spikevault",
        license=_get(info, config, "license", DEFAULT_LICENSE),
        tags=tags,
        datasets=_as_list(_get(info, config, "datasets")) or None,
        base_model=_hub_repo_of(parent),
        model_name=name,
    )

    T = schema.get("num_samples")
    K = schema.get("num_channels")
    rate = schema.get("sampling_rate_hz")
    model_ref = info.get("model_ref") or (f"hf-hub:{repo_id}" if repo_id else "CHECKPOINT_FOLDER")
    s: list[str] = [f"# {name}", ""]
    s.append(
        info.get("description")
        or "A self-supervised spike-waveform encoder (variational autoencoder) for zero-shot spike sorting "
        "with SpikeVault. It maps each detected spike (K channels around its peak, "
        "with the channels' positions) to a latent vector; clustering those vectors sorts the recording."
    )
    s += ["", "## How to use", "", "```bash", f"spikevault sort RECORDING --model {model_ref} --out sorted/", "```", "",
          "```python", "from inference.checkpoint import load_model", "", f'model = load_model("{model_ref}")  # eval mode, verified',
          "mu = model.embed(waveform, channel_offsets_um, channel_mask)  # [B,T,K], [B,K,2], [B,K]", "```", ""]
    if model_ref == "CHECKPOINT_FOLDER":
        s += ["`CHECKPOINT_FOLDER` is this folder, or `hf-hub:ORG/NAME` once published (`spikevault publish`).", ""]
    elif repo_id:
        s += ["Pin a revision for reproducible results: `--model hf-hub:" + repo_id + "@<full commit sha>`.", ""]

    s += ["## Training corpus", ""]
    if info.get("corpus_card"):
        s += [str(info["corpus_card"]).strip(), ""]
    if corpus:
        s += [_table(corpus), ""]
    if not info.get("corpus_card") and not corpus:
        s += ["Not recorded for this checkpoint.", ""]

    s += ["## Intended probes and sampling rates", ""]
    s.append(f"- Probe types seen in training: {', '.join(probes) if probes else 'not recorded'}.")
    s.append(
        "- Original sampling rates of the training recordings (Hz): "
        + (", ".join(_fmt(r) for r in rates) if rates else "not recorded")
        + f". Events are resampled to the canonical {_fmt(rate)} Hz on extraction."
    )
    s += ["", "## Event schema and preprocessing (the input contract)", "",
          f"Each event is a `[T={T}, K={K}]` waveform in microvolts at {_fmt(rate)} Hz "
          f"({schema.get('ms_before')} ms before, {schema.get('ms_after')} ms after the peak), the K channels "
          "nearest the peak channel with their offsets (µm) and a mask for probes with fewer channels. "
          "`spikevault sort` extracts events with exactly these parameters; other tools must do the same.", "",
          _table({"schema": schema, "preprocessing": preprocessing}), "",
          "## Architecture", "", _table(model_cfg) if model_cfg else "Not recorded.", ""]

    s += ["## Training configuration", ""]
    s += [_json_block(training) if training else "Not recorded.", ""]

    s += ["## Metrics", ""]
    if metrics:
        s += [_table(metrics, ("metric", "value")), "",
              "Embedding-vs-PCA entries compare clustering on this model's embedding with clustering on PCA "
              "features of the same detected events, on held-out ground-truth recordings.", ""]
    else:
        s += ["No evaluation recorded for this checkpoint.", ""]

    s += ["## Lineage", ""]
    if parent:
        s += [f"Fine-tuned from `{parent}`.", ""]
        rest = {k: v for k, v in lineage.items() if k != "parent"}
        if rest:
            s += [_table(rest), ""]
    else:
        s += ["Pretrained from scratch (no parent model).", ""]

    s += ["## Limitations", ""]
    lims = [str(x) for x in _as_list(info.get("limitations"))]
    lims += [
        f"Reads only events of event schema v{schema.get('version')} (T={T}, K={K}, {_fmt(rate)} Hz); "
        "loading checks this and refuses other schemas.",
        "Embeddings are features for clustering, not unit identities; sorting quality depends on the "
        "clustering, merging and template-matching stages around the encoder.",
        "Performance on probe types, species or brain regions absent from the training corpus is not measured.",
    ]
    s += [f"- {x}" for x in lims] + [""]
    s += ["## Versions", "", f"- spikevault {config.get('spikevault_version')}, checkpoint format "
          f"v{config.get('format_version')}, architecture `{config.get('architecture')}`", ""]

    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(s)
    return ModelCard(content, ignore_metadata_errors=False)
