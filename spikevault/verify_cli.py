"""``spikevault verify DIR`` (checksums, counts, schema) and ``spikevault info DIR`` (summary table)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def verify_corpus(corpus_dir: str | Path, *, deep: bool = True, progress: bool = False) -> list[str]:
    """Check every shard of a corpus against its manifest; return the problems (empty: all good).

    Checks: the manifest's schema is readable by this spikevault; each shard exists, has the
    recorded byte size and sha256; with ``deep``, every block decodes, matches the schema, and
    the event counts per shard, per block and per recording agree with the manifest.
    """
    from tqdm.auto import tqdm

    from .manifest import load_manifest, manifest_schema
    from .schema import SchemaMismatchError
    from .shards import CorruptShardError, ShardReader, sha256_file

    corpus_dir = Path(corpus_dir)
    manifest = load_manifest(corpus_dir)
    try:
        schema = manifest_schema(manifest)
    except SchemaMismatchError as err:
        return [f"manifest: {err}"]
    problems: list[str] = []
    per_recording: dict[tuple[str, str], int] = {}
    for sh in tqdm(manifest["shards"], desc="verify", unit="shard", disable=not progress):
        path = corpus_dir / sh["path"]
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != sh["bytes"]:
            problems.append(f"{path}: {size} bytes, manifest says {sh['bytes']} (truncated or modified)")
            continue
        digest = sha256_file(path)
        if digest != sh["sha256"]:
            problems.append(f"{path}: sha256 {digest[:12]}... does not match the manifest ({sh['sha256'][:12]}...): corrupt")
            continue
        if not deep:
            continue
        try:
            with ShardReader(path, sh["format"], schema) as r:
                sizes = []
                for i in range(r.num_blocks):
                    block = r.read_block(i)
                    schema.validate_block(block, where=f"{path} block {i}")
                    sizes.append(len(block["waveform"]))
                    for rid in set(block["recording_id"].tolist()):
                        key = (sh["format"], rid)
                        per_recording[key] = per_recording.get(key, 0) + int((block["recording_id"] == rid).sum())
        except (CorruptShardError, SchemaMismatchError) as err:
            problems.append(str(err))
            continue
        if sizes != list(sh["blocks"]) or sum(sizes) != sh["num_events"]:
            problems.append(f"{path}: {sum(sizes)} events in blocks {sizes[:8]}..., manifest says "
                            f"{sh['num_events']} in {list(sh['blocks'])[:8]}...")
    if deep and not problems:
        for src in manifest["sources"]:
            for fmt in manifest.get("formats", []):
                got = per_recording.get((fmt, src["recording_id"]), 0)
                if got != src.get("num_events", got):
                    problems.append(f"recording {src['recording_id']!r}: {got} {fmt} events, manifest says {src['num_events']}")
    return problems


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="corpus directory")
    parser.add_argument("--quick", action="store_true", help="sizes and checksums only (do not decode blocks)")


def main(args: argparse.Namespace) -> int:
    problems = verify_corpus(args.dir, deep=not args.quick, progress=True)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        print(f"{args.dir}: {len(problems)} problem(s); rebuild the named shards (delete their recording's "
              "record in _work/done/ and rerun spikevault build)")
        return 1
    from .manifest import load_manifest

    m = load_manifest(args.dir)
    n = sum(v["events"] for v in m["summary"].values())
    print(f"{args.dir}: OK ({len(m['shards'])} shards, {n:,} events, schema v{m['schema']['version']})")
    return 0


def summary_table(manifest: dict[str, Any]) -> str:
    """Markdown table: per split recordings, probes, events, units, bytes."""
    rows = ["| split | recordings | probes | events | units | shards | bytes |", "|---|---|---|---|---|---|---|"]
    tot = {"recordings": 0, "events": 0, "units": 0, "shards": 0, "bytes": 0}
    for split, v in manifest["summary"].items():
        nbytes = sum(v["bytes"].values())
        nshards = sum(v["shards"].values())
        rows.append(f"| {split} | {v['recordings']} | {', '.join(v['probes']) or '-'} | {v['events']:,} | "
                    f"{v['units']:,} | {nshards} | {_human(nbytes)} |")
        for k, x in (("recordings", v["recordings"]), ("events", v["events"]), ("units", v["units"]),
                     ("shards", nshards), ("bytes", nbytes)):
            tot[k] += x
    probes = sorted({p for v in manifest["summary"].values() for p in v["probes"]})
    rows.append(f"| total | {tot['recordings']} | {', '.join(probes) or '-'} | {tot['events']:,} | {tot['units']:,} | "
                f"{tot['shards']} | {_human(tot['bytes'])} |")
    return "\n".join(rows)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def print_summary(manifest: dict[str, Any], corpus_dir: str | Path) -> None:
    s = manifest["schema"]
    print(f"corpus {corpus_dir}: formats {', '.join(manifest.get('formats', []))}; event schema v{s['version']} "
          f"(T={s['num_samples']}, K={s['num_channels']}, {s['sampling_rate_hz']:g} Hz)")
    print(summary_table(manifest))
    if manifest.get("skipped"):
        print(f"skipped {len(manifest['skipped'])} recording(s):")
        for sk in manifest["skipped"]:
            print(f"  {sk['recording_id']}: {sk['error']}")


def configure_info_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="corpus directory")


def info_main(args: argparse.Namespace) -> int:
    from .manifest import load_manifest

    print_summary(load_manifest(args.dir), args.dir)
    return 0
