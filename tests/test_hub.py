"""The Hub download path, for real: a local Hub-compatible server (olah, serving a git repo offline) and
`huggingface_hub` pointed at it with HF_ENDPOINT, as a user would point it at a mirror."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import tiny_model
from test_lowrank import fitted

from kvcompress.hub import shipped_repository

REPO_ID = "kvtest/tiny-pca"
SHIPPED_ID = "kvcompress/smollm2-135m-instruct-pca-2x"  # the server also serves a repository that ships with kvcompress

LOADER = """
import json, sys, torch
from kvcompress.lowrank import PCACache
cache = PCACache.from_pretrained(sys.argv[1], cache_dir=sys.argv[2])
report = {"sum": float(sum(t.double().sum() for t in cache.compressor.tensors.values())), "window": cache.settings.window}
for bad in ("kvtest/no-such-repo",):
    try:
        PCACache.from_pretrained(bad, cache_dir=sys.argv[2])
    except FileNotFoundError as error:
        report["missing"] = str(error)
print(json.dumps(report))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    """An olah server on localhost serving `REPO_ID` from a local git repo; yields (endpoint, the saved compressor)."""
    pytest.importorskip("olah", reason="the local Hub server comes with the test extra: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("hub")
    compressor = fitted(tiny_model("llama"), 6)
    compressor.save_pretrained(root / "mirrors" / "models" / REPO_ID)
    shutil.copytree(shipped_repository(SHIPPED_ID), root / "mirrors" / "models" / SHIPPED_ID)
    for repo in (root / "mirrors" / "models" / REPO_ID, root / "mirrors" / "models" / SHIPPED_ID):
        git = ["git", "-C", str(repo), "-c", "user.name=kvcompress", "-c", "user.email=tests@kvcompress"]
        subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
        subprocess.run(git + ["add", "."], check=True)
        subprocess.run(git + ["commit", "-q", "-m", "compressor"], check=True)
    port = _free_port()
    config = root / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{root / "repos"}"\nmirrors-path = ["{root / "mirrors"}"]\n'
        f'mirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n\n[accessibility]\noffline = true\n'
    )
    server = subprocess.Popen([sys.executable, "-m", "olah.server", "-c", str(config)], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the local olah server did not start within 30 s")
        yield f"http://127.0.0.1:{port}", compressor, root
    finally:
        server.terminate()
        server.wait(timeout=10)


def load_through(endpoint: str, repo_id: str, root) -> subprocess.CompletedProcess:
    """Run `LOADER` for `repo_id` in a fresh process whose `huggingface_hub` talks to the server at `endpoint` (online even
    where the shell running the tests set HF_HUB_OFFLINE=1)."""
    env = os.environ | {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-c", LOADER, repo_id, str(root / "download")], env=env, capture_output=True, text=True, timeout=300)


def test_from_pretrained_downloads_a_compressor_from_a_hub_server(local_hub):
    endpoint, compressor, root = local_hub
    result = load_through(endpoint, REPO_ID, root)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sum"] == pytest.approx(float(sum(t.double().sum() for t in compressor.tensors.values())), rel=1e-12)
    assert "No Hub repo 'kvtest/no-such-repo'" in report["missing"]
    assert list((root / "download").glob("models--kvtest--tiny-pca/snapshots/*/model.safetensors"))  # really went through the Hub cache


def test_a_shipped_id_downloads_from_the_hub_when_the_hub_has_it(local_hub):
    endpoint, _, root = local_hub
    result = load_through(endpoint, SHIPPED_ID, root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ships with kvcompress" not in result.stderr  # no fallback: the server answered
    downloaded = list((root / "download").glob("models--kvcompress--smollm2-135m-instruct-pca-2x/snapshots/*/model.safetensors"))
    assert len(downloaded) == 1 and downloaded[0].read_bytes() == (shipped_repository(SHIPPED_ID) / "model.safetensors").read_bytes()
