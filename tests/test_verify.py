"""verify / info / dataset card on a corpus made from in-memory events."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from spikevault.build import BuildConfig, build_from_blocks
from spikevault.shards import random_block
from spikevault.verify_cli import info_main, main as verify_main, verify_corpus


@pytest.fixture
def corpus(tmp_path):
    recs = {f"r{i}": [random_block(600 + 100 * i, seed=i, recording_id=f"r{i}")] for i in range(4)}
    meta = {f"r{i}": {"probe": "linear32", "lab": "lab-a", "licence": "CC-BY-4.0"} for i in range(4)}
    cfg = BuildConfig(formats=("webdataset", "parquet"), val_fraction=0.3, block_size=256, row_group_size=512,
                      events_per_shard=512, extract_params={"freq_min_hz": 300.0})
    build_from_blocks(tmp_path / "c", recs, cfg, metadata=meta)
    return tmp_path / "c"


def test_verify_passes_and_info_prints_the_table(corpus, capsys):
    assert verify_corpus(corpus) == []
    assert verify_main(argparse.Namespace(dir=str(corpus), quick=False)) == 0
    assert info_main(argparse.Namespace(dir=str(corpus))) == 0
    out = capsys.readouterr().out
    assert "| total | 4 | linear32 | 3,000 |" in out
    m = json.loads((corpus / "manifest.json").read_text())
    assert m["summary"]["train"]["recordings"] + m["summary"]["val"]["recordings"] == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_verify_names_a_damaged_shard(corpus, damage, capsys):
    m = json.loads((corpus / "manifest.json").read_text())
    victim = corpus / m["shards"][1]["path"]
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(data[:-1000]))
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    problems = verify_corpus(corpus)
    assert len(problems) == 1 and victim.name in problems[0]
    assert verify_main(argparse.Namespace(dir=str(corpus), quick=True)) == 1
    assert victim.name in capsys.readouterr().out


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a spikevault corpus"):
        verify_corpus(tmp_path)


def test_dataset_card_front_matter(corpus):
    text = (corpus / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["license"] == "CC-BY-4.0"
    assert front["spikevault_schema"]["num_channels"] == 12
    names = {c["config_name"] for c in front["configs"]}
    assert names == {"default", "webdataset"}
    parquet_files = [p for c in front["configs"] if c["config_name"] == "default" for d in c["data_files"] for p in d["path"]]
    m = json.loads((corpus / "manifest.json").read_text())
    assert sorted(parquet_files) == sorted(s["path"] for s in m["shards"] if s["format"] == "parquet")
    assert "| r0 |" in text and "lab-a" in text
