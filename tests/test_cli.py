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
