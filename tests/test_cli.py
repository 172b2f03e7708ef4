import subprocess
import sys

from spikevault.cli import COMMANDS, main


def test_help_lists_every_subcommand(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_every_subcommand_has_help():
    for name in COMMANDS:
        r = subprocess.run([sys.executable, "-m", "spikevault.cli", name, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert "usage:" in r.stdout


def test_sort_cli_does_not_import_training_stack():
    code = (
        "import sys; from spikevault.cli import build_parser; build_parser(['sort']);"
        "import inference.sort;"
        "bad = [m for m in ('lightning_fabric', 'lightning', 'webdataset', 'datasets') if m in sys.modules];"
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_warmup_compiles_the_sorts_kernels_with_numbas_cache_on(capsys):
    """`spikevault warmup` runs its two short sorts; afterwards the curation's unimodality test
    (SpikeInterface's isocut, the slowest kernel to compile) and the filter are compiled, with
    numba's disk cache on, so later processes load them."""
    from numba.core.caching import NullCache

    from inference.curation import _get_isocut
    from spikevault.filters import _COMPILED, _sosfiltfilt_py

    assert main(["warmup"]) == 0
    assert "numba kernels compiled" in capsys.readouterr().out
    for kernel in (_get_isocut(), _COMPILED[_sosfiltfilt_py, False]):
        assert kernel.signatures and not isinstance(kernel._cache, NullCache)
