"""Pretraining throughput: model step vs reader on this CPU, FLOPs per event, GPU-hours on paper.

    PYTHONPATH=. python benchmarks/bench_pretrain.py [--corpus CORPUS] [--preset default] [--steps 30] [--utilisation 0.1]

Measures, in one process and on the same corpus:

* the training step of a preset (augment two views, forward, backward, AdamW step: exactly
  :func:`pretrain.train.pretrain_loss` as the loop runs it), in events/s;
* the reader (:class:`spikevault.reader.EventStream`, same batch size, in-process) in events/s,
  which must be at least 5x the step so the loader never starves the model;
* FLOPs per training event (``torch.utils.flop_counter.FlopCounterMode``: matmuls and
  convolutions, forward + backward, both views), and from it the events/s one GPU could reach and
  the GPU-hours for one epoch of a 255-million-event corpus at an assumed throughput.

Without ``--corpus`` a small corpus is generated and built first (spikevault.synth + build).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EPOCH_EVENTS = 255_000_000
GPU_TFLOPS = {"A100 (bf16 dense 312 TFLOP/s)": 312.0, "H100 SXM (bf16 dense 989 TFLOP/s)": 989.0}
UTILISATION = 0.10  # small convs + attention over 12 tokens are launch/memory bound: assume 10% of dense bf16 peak


def build_corpus(folder: Path) -> Path:
    from spikevault.build import BuildConfig, build_from_blocks
    from spikevault.extract import extract_events
    from spikevault.synth import generate_recording

    recordings = {}
    for i, probe in enumerate(("linear32", "dense64")):
        rec, sorting = generate_recording(probe=probe, duration_s=20.0, num_units=10, seed=100 + i)
        rid = f"bench-{probe}"
        recordings[rid] = [extract_events(rec, recording_id=rid, sorting=sorting, label_source="ground_truth",
                                          job_kwargs=dict(n_jobs=1))]
    build_from_blocks(folder, recordings, BuildConfig(val_fraction=0.0, block_size=1024))
    return folder


def measure_reader(corpus: Path, batch_size: int, n_batches: int) -> float:
    from spikevault.reader import EventStream

    stream = EventStream(corpus, split="train", batch_size=batch_size, shuffle_buffer=8192, seed=1)
    seen, t0, epoch = 0, time.perf_counter(), 0
    while seen < n_batches:
        stream.set_epoch(epoch)
        for batch in stream:
            seen += 1
            if seen >= n_batches:
                break
        epoch += 1
    return n_batches * batch_size / (time.perf_counter() - t0)


def main(argv=None) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from inference.model import SpikeVAE
    from pretrain.augment import Augmenter
    from pretrain.config import load_config
    from pretrain.train import pretrain_loss
    from spikevault.reader import EventStream

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=None, help="corpus folder (default: generate a small one)")
    p.add_argument("--preset", default="default", help="pretraining preset")
    p.add_argument("--steps", type=int, default=30, help="timed training steps (after 3 warm-up steps)")
    p.add_argument("--utilisation", type=float, default=UTILISATION, help="assumed fraction of GPU peak FLOP/s")
    args = p.parse_args(argv)
    util = args.utilisation

    tmp = None
    corpus = Path(args.corpus) if args.corpus else None
    if corpus is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-pretrain-")
        corpus = build_corpus(Path(tmp.name) / "corpus")
    cfg = load_config(args.preset, {"data.corpus": str(corpus)})
    B = cfg.data.batch_size
    stream = EventStream(corpus, split="train", batch_size=B, shuffle_buffer=cfg.data.shuffle_buffer, seed=0)
    cfg.model.schema = stream.schema.to_dict()
    model = SpikeVAE(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    aug = Augmenter(cfg.augment)

    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) >= 4:
            break

    def step(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        loss, _ = pretrain_loss(model, batches[i % len(batches)], cfg, aug, g, 1000 + i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    train_eps = args.steps * B / (time.perf_counter() - t0)
    reader_eps = measure_reader(corpus, B, n_batches=max(args.steps, 50))

    with FlopCounterMode(display=False) as counter:
        step(0)
    flops_per_event = counter.get_total_flops() / B
    with FlopCounterMode(display=False) as counter:  # (FlopCounterMode's module tracker needs grad mode)
        w = batches[0]
        model.embed(w["waveform"], w["channel_offsets_um"], w["channel_mask"].bool())
    embed_flops = counter.get_total_flops() / B

    n_params = model.num_parameters()
    print(f"## Pretraining throughput ({args.preset} preset, batch {B}, {n_params:,} parameters, "
          f"torch threads {torch.get_num_threads()})\n")
    print("| quantity | value |")
    print("|---|---|")
    print(f"| training step on this CPU (2 views, fwd+bwd+AdamW) | {train_eps:,.0f} events/s |")
    print(f"| reader (EventStream, in-process, same run) | {reader_eps:,.0f} events/s |")
    print(f"| reader / training step | {reader_eps / train_eps:.1f}x (needs >= 5x) |")
    print(f"| FLOPs per training event (matmul+conv, fwd+bwd, 2 views) | {flops_per_event / 1e6:.1f} MFLOP |")
    print(f"| FLOPs per embedded event (inference, encoder only) | {embed_flops / 1e6:.2f} MFLOP |")
    print(f"| CPU time for one epoch of {EPOCH_EVENTS / 1e6:.0f}M events at this rate | "
          f"{EPOCH_EVENTS / train_eps / 3600:,.0f} h |")
    for gpu, tflops in GPU_TFLOPS.items():
        eps = tflops * 1e12 * util / flops_per_event
        print(f"| on paper, {gpu} at {util:.0%} utilisation | {eps:,.0f} events/s/GPU; "
              f"{EPOCH_EVENTS / eps / 3600:.2f} GPU-hours per {EPOCH_EVENTS / 1e6:.0f}M-event epoch |")
    print(f"\nA {EPOCH_EVENTS / 1e6:.0f}M-event epoch on 8 GPUs needs the loader to deliver "
          f"{8 * GPU_TFLOPS['A100 (bf16 dense 312 TFLOP/s)'] * 1e12 * util / flops_per_event:,.0f} events/s "
          f"(A100s): about {8 * GPU_TFLOPS['A100 (bf16 dense 312 TFLOP/s)'] * 1e12 * util / flops_per_event / reader_eps:.0f} "
          "reader processes at the measured in-process rate.")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
