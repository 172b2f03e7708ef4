"""``spikevault pretrain``: self-supervised pretraining of the spike encoder.

    spikevault pretrain --config configs/pretrain/default.yaml --data.corpus CORPUS --out runs/default
    spikevault pretrain --config debug --data.corpus CORPUS --max_steps 50 --optim.lr 3e-4 --out /tmp/run
    torchrun --nproc-per-node 4 -m spikevault.cli pretrain --config large --devices 4 --strategy ddp ...

Every setting of :class:`pretrain.config.PretrainConfig` is a ``--section.key`` flag (see
``--help``); flags override the YAML preset, which overrides the defaults.
"""

from __future__ import annotations

import argparse

_CFG = "cfg:"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .config import leaf_fields

    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--config", default=None,
                        help="YAML config or preset name (debug, default, large); flags override it")
    parser.add_argument("--out", required=True, help="output folder: checkpoints, logs, final export")
    parser.add_argument("--resume", default="auto",
                        help="'auto' continues from the newest out/step-* folder, 'none' starts fresh (refuses "
                             "a folder with checkpoints), or a step-* folder")
    run = parser.add_argument_group("devices (aliases of the fabric.* keys)")
    run.add_argument("--devices", dest=f"{_CFG}fabric.devices", default=argparse.SUPPRESS, metavar="N",
                     help="devices (processes) per node")
    run.add_argument("--num-nodes", dest=f"{_CFG}fabric.num_nodes", default=argparse.SUPPRESS, metavar="N",
                     help="number of nodes")
    run.add_argument("--strategy", dest=f"{_CFG}fabric.strategy", default=argparse.SUPPRESS,
                     choices=("auto", "ddp", "fsdp"), help="distributed strategy")
    run.add_argument("--precision", dest=f"{_CFG}fabric.precision", default=argparse.SUPPRESS,
                     choices=("32-true", "bf16-mixed"), help="numeric precision")
    run.add_argument("--accelerator", dest=f"{_CFG}fabric.accelerator", default=argparse.SUPPRESS, metavar="NAME",
                     help="cpu, gpu, cuda, mps or auto")

    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, (tp, default, doc) in leaf_fields().items():
        section = key.split(".")[0] if "." in key else "run"
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} settings")
        default_text = list(default) if isinstance(default, tuple) else default
        help_text = f"{doc} (default: {default_text!r})".replace("%", "%%")
        groups[section].add_argument(f"--{key}", dest=f"{_CFG}{key}", default=argparse.SUPPRESS,
                                     metavar=_metavar(tp), help=help_text)


def _metavar(tp) -> str:
    import typing

    if typing.get_origin(tp) is tuple:
        return "A,B"
    return getattr(tp, "__name__", "VALUE").upper()


def main(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import setup

    overrides = {k[len(_CFG):]: v for k, v in vars(args).items() if k.startswith(_CFG)}
    config = load_config(args.config, overrides)
    metrics = setup(config, args.out, resume=args.resume)
    probe = (metrics or {}).get("probe") or {}
    if probe.get("n_recordings"):
        print(
            f"probe on {probe['n_recordings']} validation recordings: model cluster acc "
            f"{probe['model']['cluster_acc']:.3f} (ARI {probe['model']['ari']:.3f}, kNN {probe['model']['knn_acc']:.3f}) "
            f"vs PCA {probe['pca']['cluster_acc']:.3f} (ARI {probe['pca']['ari']:.3f}, kNN {probe['pca']['knn_acc']:.3f})"
        )
    return 0
