"""The local Ray a stage starts: loopback only, token auth with a 0600 token file of its own."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, psutil, ray
from reclora_ray.config import load_config
from reclora_ray.runtime import init_ray
init_ray(load_config("tiny", ["run.num_cpus=1"]))
me = psutil.Process()
listening = sorted({c.laddr.ip for p in [me, *me.children(recursive=True)]
                    for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN})
print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "listening": listening,
                  "square": ray.get(ray.remote(lambda x: x * x).remote(7))}))
ray.shutdown()
"""


@pytest.mark.ray
def test_local_ray_listens_on_loopback_with_a_private_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("RECLORA_RAY_TOKEN_FILE", None)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["square"] == 49
    assert report["node_ip"] == "127.0.0.1"
    assert report["listening"] and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in report["listening"]), report
    token = tmp_path / ".config" / "reclora" / "ray_auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    assert not (tmp_path / ".ray" / "auth_token").exists()  # Ray's world-readable default is never written


def test_a_loose_token_file_is_rewritten_private(tmp_path, monkeypatch):
    from reclora_ray.runtime import secure_local_ray

    token = tmp_path / "tok"
    token.write_text("old")
    token.chmod(0o644)
    monkeypatch.setenv("RECLORA_RAY_TOKEN_FILE", str(token))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.delenv(name, raising=False)
    import ray._private.ray_constants as ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    secure_local_ray()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() != "old"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(token) and os.environ["RAY_AUTH_MODE"] == "token"
