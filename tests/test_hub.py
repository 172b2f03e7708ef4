"""Hub publishing and downloading.

Downloads go through a real hub-compatible server on loopback: ``olah`` (a Hugging Face hub
mirror) in offline mode, serving local git repositories as hub repos. Every load runs in a fresh
Python process with ``HF_ENDPOINT`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` set in its
environment, exactly as a user's would be (huggingface_hub reads them at import time).

Uploads are tested up to the call of huggingface_hub's upload API (``HfApi.upload_folder``) with
the exact folder it is handed; those files are then committed to a mirror repository and
downloaded back through the server, closing the round trip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.checkpoint import CHECKPOINT_FILES, CheckpointError, publish, save_pretrained
from inference.model import ModelConfig, SpikeVAE

pytest.importorskip("olah")

REPO_ROOT = Path(__file__).resolve().parents[1]
ORG = "spikevault-test"

LOADER = r'''
import json, sys
import numpy as np, torch
from inference.checkpoint import load_model

requests, inputs = json.loads(sys.argv[1]), np.load(sys.argv[2])
results = []
for req in requests:
    if req.get("registry"):  # a lab's registry file instead of the shipped one
        import inference.registry
        inference.registry.REGISTRY_PATH = req["registry"]
    try:
        model = load_model(req["id"], **req.get("kwargs", {}))
    except Exception as err:
        results.append({"error": type(err).__name__, "message": str(err),
                        "bases": [c.__name__ for c in type(err).__mro__]})
        continue
    with torch.inference_mode():
        mu = model.embed(torch.from_numpy(inputs["waveform"]), torch.from_numpy(inputs["offsets"]),
                         torch.from_numpy(inputs["mask"]))
    info = model.model_info
    results.append({"mu": mu.tolist(), "revision": info.revision, "folder": str(info.folder),
                    "source": info.source, "training": model.training})
print("RESULTS" + json.dumps(results))
'''


def tiny_model(seed: int) -> SpikeVAE:
    torch.manual_seed(seed)
    return SpikeVAE(ModelConfig(latent_dim=4, conv_channels=(4, 8), channel_dim=16, attention_heads=2, decoder_hidden=16))


def make_inputs(n: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    wf = (rng.standard_normal((n, 60, 12)) * 30).astype(np.float32)
    wf[:, 24, 0] -= 120
    offsets = (rng.standard_normal((n, 12, 2)) * 40).astype(np.float32)
    mask = np.ones((n, 12), dtype=bool)
    mask[::2, 4:] = False
    return {"waveform": wf, "offsets": offsets, "mask": mask}


def embed(model: SpikeVAE, inputs: dict[str, np.ndarray]) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return model.embed(*(torch.from_numpy(inputs[k]) for k in ("waveform", "offsets", "mask"))).numpy()


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def commit_folder(repo: Path, files: Path, message: str, branch: str = "main") -> str:
    """Replace the repo's files by those of ``files`` on ``branch`` and commit; return the SHA."""
    if not (repo / ".git").exists():
        repo.mkdir(parents=True, exist_ok=True)
        git(repo, "init", "-q", "-b", "main")
    elif git(repo, "rev-parse", "--abbrev-ref", "HEAD") != branch:
        git(repo, "checkout", "-q", "-B", branch)
    for old in repo.iterdir():
        if old.name != ".git":
            old.unlink()
    for f in files.iterdir():
        shutil.copy2(f, repo / f.name)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Hub:
    root: Path
    mirrors: Path
    endpoint: str
    inputs_path: Path
    inputs: dict
    shas: dict
    expected: dict  # name -> embedding of the model committed under that name

    def repo(self, name: str) -> Path:
        return self.mirrors / "models" / ORG / name

    def load(self, requests: list[dict], *, cache: Path, offline: bool = False, endpoint: str | None = None) -> list[dict]:
        """Run load_model for each request in a fresh process with the hub environment."""
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_ENDPOINT": endpoint or self.endpoint,
               "HF_HUB_CACHE": str(cache), "HF_HOME": str(self.root / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_HUB_OFFLINE": "1" if offline else "0"}
        env.pop("HF_TOKEN", None)
        script = self.root / "loader.py"
        script.write_text(LOADER)
        res = subprocess.run([sys.executable, str(script), json.dumps(requests), str(self.inputs_path)],
                             capture_output=True, text=True, env=env, cwd=self.root, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        line = next(li for li in res.stdout.splitlines() if li.startswith("RESULTS"))
        return json.loads(line[len("RESULTS"):])


def _broken(folder: Path, kind: str) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    if kind == "bad-version":
        cfg["schema"]["version"] = 2
    elif kind == "bad-k":
        cfg["schema"]["num_channels"] = 32
    elif kind == "bad-rate":
        cfg["schema"].update(sampling_rate_hz=40000.0, num_samples=80, nbefore=32)
    elif kind == "bad-t":  # a consistent schema whose window does not fit the weights
        for s in (cfg["schema"], cfg["model"]["schema"]):
            s.update(ms_after=1.5, num_samples=69)
    elif kind == "no-config":
        (folder / "config.json").unlink()
        return
    elif kind == "pickled":
        torch.save(tiny_model(0).state_dict(), folder / "model.safetensors")
        return
    (folder / "config.json").write_text(json.dumps(cfg))


BROKEN = {
    "bad-version": "event schema version 2 is not supported",
    "bad-k": r"num_channels=32 \(expected 12\)",
    "bad-rate": r"sampling_rate_hz=40000.0 \(expected 30000.0\)",
    "bad-t": r"shape mismatches \[backbone\.out\.weight: file \(16, 240\) vs model \(16, 280\)",
    "no-config": r"config\.json: missing.*found \['README\.md', 'model\.safetensors'\]",
    "pickled": r"zip/pickle file \(torch\.save\), cannot be read as safetensors.*never unpickled",
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    mirrors = root / "mirrors"
    inputs = make_inputs()
    inputs_path = root / "inputs.npz"
    np.savez(inputs_path, **inputs)
    shas, expected = {}, {}

    # org/tiny: commit 1 (seed 1) is branch 'stable'; commit 2 (seed 2) is 'main'.
    v1, v2 = tiny_model(1), tiny_model(2)
    repo = mirrors / "models" / ORG / "tiny"
    shas["v1"] = commit_folder(repo, save_pretrained(v1, root / "v1", card_info={"repo_id": f"{ORG}/tiny"}), "v1")
    git(repo, "branch", "stable")
    shas["v2"] = commit_folder(repo, save_pretrained(v2, root / "v2", card_info={"repo_id": f"{ORG}/tiny"}), "v2")
    expected["v1"], expected["v2"] = embed(v1, inputs), embed(v2, inputs)
    for kind in BROKEN:
        folder = save_pretrained(tiny_model(0), root / kind)
        _broken(folder, kind)
        commit_folder(mirrors / "models" / ORG / kind, folder, kind)

    port = free_port()
    config = root / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{root / "olah-cache"}"\n'
        f'mirrors-path = ["{mirrors}"]\n'
        "[accessibility]\noffline = true\n"
    )
    log = open(root / "olah.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "olah.server", "--config", str(config), "--log-path",
                             str(root / "olah-logs")], cwd=root, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/api/models/{ORG}/tiny/revision/main", timeout=2) as r:
                if json.load(r)["sha"] == shas["v2"]:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("olah did not start:\n" + (root / "olah.out").read_text()[-3000:])
        time.sleep(0.3)
    try:
        yield Hub(root, mirrors, endpoint, inputs_path, inputs, shas, expected)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_round_trip_and_revision_pinning(hub, tmp_path):
    cache = tmp_path / "hf-cache"
    sha1, sha2 = hub.shas["v1"], hub.shas["v2"]
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"format_version": 1, "models": [
        {"name": "tiny-v1", "id": f"hf-hub:{ORG}/tiny@{sha1}", "description": "registered, pinned hub model"}]}))
    moving = hub.repo("moving")
    first = commit_folder(moving, save_pretrained(tiny_model(11), tmp_path / "a"), "a")
    main, by_sha, by_branch, by_kwarg, by_name, moving_a = hub.load([
        {"id": f"hf-hub:{ORG}/tiny"},
        {"id": f"hf-hub:{ORG}/tiny@{sha1}"},
        {"id": f"hf-hub:{ORG}/tiny@stable"},
        {"id": f"hf-hub:{ORG}/tiny", "kwargs": {"revision": sha1}},
        {"id": "tiny-v1", "registry": str(registry)},
        {"id": f"hf-hub:{ORG}/moving"},
    ], cache=cache)
    for r in (main, by_sha, by_branch, by_kwarg, by_name):
        assert "error" not in r, r
        assert r["training"] is False
    assert by_name["source"] == "registry" and by_name["revision"] == sha1 and main["source"] == "hub"
    # identical outputs to the models that were saved, per revision
    np.testing.assert_array_equal(np.array(main["mu"], dtype=np.float32), hub.expected["v2"])
    for r in (by_sha, by_branch, by_kwarg, by_name):
        np.testing.assert_array_equal(np.array(r["mu"], dtype=np.float32), hub.expected["v1"])
    assert not np.allclose(hub.expected["v1"], hub.expected["v2"])
    assert (main["revision"], by_sha["revision"], by_branch["revision"]) == (sha2, sha1, sha1)
    # the real huggingface_hub cache layout
    repo_cache = cache / f"models--{ORG}--tiny"
    assert (repo_cache / "refs" / "main").read_text() == sha2
    assert (repo_cache / "refs" / "stable").read_text() == sha1
    for sha in (sha1, sha2):
        snap = repo_cache / "snapshots" / sha
        assert sorted(p.name for p in snap.iterdir()) == sorted(CHECKPOINT_FILES)
        assert Path(main["folder"] if sha == sha2 else by_sha["folder"]) == snap

    # A new commit on main: an unpinned id follows it (the cached main is revalidated), a SHA does not.
    second = commit_folder(moving, save_pretrained(tiny_model(12), tmp_path / "b"), "b")
    moving_b, moving_pinned, lfo = hub.load([
        {"id": f"hf-hub:{ORG}/moving"},
        {"id": f"hf-hub:{ORG}/moving@{first}"},
        {"id": f"hf-hub:{ORG}/tiny@{sha1}", "kwargs": {"local_files_only": True}},  # cache only
    ], cache=cache)
    assert (moving_a["revision"], moving_b["revision"], moving_pinned["revision"]) == (first, second, first)
    np.testing.assert_array_equal(np.array(moving_b["mu"], dtype=np.float32), embed(tiny_model(12), hub.inputs))
    np.testing.assert_array_equal(np.array(moving_pinned["mu"], dtype=np.float32), embed(tiny_model(11), hub.inputs))
    np.testing.assert_array_equal(np.array(lfo["mu"], dtype=np.float32), hub.expected["v1"])

    # Offline from the cache: HF_HUB_OFFLINE=1 and the endpoint pointing at a port nothing listens on.
    dead = f"http://127.0.0.1:{free_port()}"
    off_main, off_sha, off_branch, off_missing = hub.load([
        {"id": f"hf-hub:{ORG}/tiny"},
        {"id": f"hf-hub:{ORG}/tiny@{sha1}"},
        {"id": f"hf-hub:{ORG}/tiny@stable"},
        {"id": f"hf-hub:{ORG}/bad-k"},  # never downloaded
    ], cache=cache, offline=True, endpoint=dead)
    np.testing.assert_array_equal(np.array(off_main["mu"], dtype=np.float32), hub.expected["v2"])
    np.testing.assert_array_equal(np.array(off_sha["mu"], dtype=np.float32), hub.expected["v1"])
    np.testing.assert_array_equal(np.array(off_branch["mu"], dtype=np.float32), hub.expected["v1"])
    assert off_main["revision"] == sha2 and off_branch["revision"] == sha1
    assert off_missing["error"] == "CheckpointError"
    assert "not in the local hub cache and offline mode is on" in off_missing["message"]


@pytest.mark.slow
def test_mismatched_checkpoints_fail_clearly(hub, tmp_path):
    names = sorted(BROKEN)
    results = hub.load([{"id": f"hf-hub:{ORG}/{n}"} for n in names] + [
        {"id": f"hf-hub:{ORG}/does-not-exist"},
        {"id": f"hf-hub:{ORG}/tiny@no-such-branch"},
    ], cache=tmp_path / "hf-cache")
    for name, r in zip(names, results):
        assert r.get("error") in ("CheckpointError", "CheckpointSchemaError"), (name, r)
        assert "ValueError" in r["bases"]
        import re

        assert re.search(BROKEN[name], r["message"], flags=re.S), (name, r["message"])
        assert f"models--{ORG}--{name}" in r["message"]  # names the downloaded file
    missing_repo, missing_rev = results[-2:]
    assert missing_repo["error"] == "CheckpointError" and "repository not found" in missing_repo["message"]
    # The hub answers RevisionNotFound; olah's mirror mode answers RepoNotFound for an unknown revision.
    assert missing_rev["error"] == "CheckpointError" and "revision 'no-such-branch'" in missing_rev["message"]


# --------------------------------------------------------------------------------- publish
class FakeHubApi:
    """Records what publish hands to huggingface_hub's API; keeps a copy of the uploaded folder."""

    def __init__(self, store: Path):
        self.store = store
        self.calls: list[tuple[str, dict]] = []

    def install(self, monkeypatch):
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import CommitInfo, RepoUrl

        def create_repo(api, repo_id, **kw):
            self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, **kw):
            self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

        def upload_folder(api, **kw):
            folder = Path(kw["folder_path"])
            self.calls.append(("upload_folder", {**kw, "files": sorted(p.name for p in folder.rglob("*") if p.is_file())}))
            self.sent = self.store / f"upload{len(self.calls)}"
            shutil.copytree(folder, self.sent)
            return CommitInfo(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/{'c' * 40}",
                              commit_message=kw.get("commit_message") or "", commit_description="", oid="c" * 40)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


@pytest.mark.slow
def test_publish_sends_only_the_export_and_it_downloads_back(hub, tmp_path, monkeypatch):
    model = tiny_model(21)
    folder = save_pretrained(model, tmp_path / "ckpt", card_info={"repo_id": f"{ORG}/published"},
                             extra_config={"intended_probes": ["linear"]})
    (folder / "training_state.pt").write_bytes(b"optimizer + rng state")  # must never be uploaded
    (folder / "logs").mkdir()
    (folder / "logs" / "train.log").write_text("step 1\n")
    api = FakeHubApi(tmp_path / "sent").install(monkeypatch)

    info = publish(folder, f"{ORG}/published", revision="dev", private=True, commit_message="first upload")

    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (kw for _, kw in api.calls)
    assert create["repo_id"] == f"{ORG}/published" and create["private"] is True and create["exist_ok"] is True
    assert branch["repo_id"] == f"{ORG}/published" and branch["branch"] == "dev"
    assert upload["repo_id"] == f"{ORG}/published" and upload["revision"] == "dev"
    assert upload["commit_message"] == "first upload" and upload["repo_type"] == "model"
    assert upload["files"] == sorted(CHECKPOINT_FILES)
    for name in CHECKPOINT_FILES:
        assert (api.sent / name).read_bytes() == (folder / name).read_bytes()
    assert info.oid == "c" * 40

    # What was sent is what the hub serves: commit it on branch 'dev' and download it back.
    repo = hub.repo("published")
    commit_folder(repo, save_pretrained(tiny_model(0), tmp_path / "initial"), "initial")
    sha = commit_folder(repo, api.sent, "first upload", branch="dev")
    (r,) = hub.load([{"id": f"hf-hub:{ORG}/published@dev"}], cache=tmp_path / "hf-cache")
    assert r["revision"] == sha
    np.testing.assert_array_equal(np.array(r["mu"], dtype=np.float32), embed(model, hub.inputs))


def test_publish_cli_and_refusals(tmp_path, monkeypatch, capsys):
    from spikevault.cli import main

    folder = save_pretrained(tiny_model(3), tmp_path / "ckpt")
    api = FakeHubApi(tmp_path / "sent").install(monkeypatch)
    assert main(["publish", str(folder), "--repo-id", f"{ORG}/cli"]) == 0
    out = capsys.readouterr().out
    assert f"--model hf-hub:{ORG}/cli@{'c' * 40}" in out
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]  # main: no branch to create
    assert api.calls[0][1]["private"] is False and api.calls[1][1]["revision"] is None

    api.calls.clear()
    (folder / "README.md").unlink()
    with pytest.raises(CheckpointError, match="missing model card"):
        publish(folder, f"{ORG}/cli")
    (folder / "config.json").unlink()
    assert main(["publish", str(folder), "--repo-id", f"{ORG}/cli"]) == 2
    assert "config.json: missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--repo-id takes ORG/NAME"):
        publish(folder, f"{ORG}/cli@dev")
    assert api.calls == []  # nothing reaches the hub API for a bad folder or id
