"""A multi-node Ray cluster on one machine: a head and worker nodes, each its own `ray start`.

Every node is a separate `ray start --block` process started in a new session, with its own
temp dir, ports, CPU count and a `node_tag:<name>` custom resource (so tasks can be pinned to
it). That makes a node a real unit: `kill_node` SIGKILLs its whole session (raylet, agents,
workers), which the head sees as a node death, and `stop` tears down exactly these sessions and
nothing else (`ray stop` would stop every Ray on the machine, other users' included).

Token authentication is on (`RAY_AUTH_MODE=token`): each cluster gets its own random token in a
0600 file under the cluster directory; clients point `RAY_AUTH_TOKEN_PATH` at it. The token is
generated here rather than with `ray get-auth-token --generate`, which writes the user-wide
~/.ray/auth_token that every other local Ray on the machine would then pick up.

    cluster/local/start.sh --workers 2     # = python -m tools.local_cluster start ...
    cluster/local/stop.sh
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from reclora_ray.runtime import write_private_token

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
HEAD = "head"


class ClusterError(RuntimeError):
    """A node failed to start, or the cluster did not come up in time."""


@dataclass
class NodeInfo:
    name: str
    pid: int  # the `ray start --block` process: leader of the node's session
    num_cpus: int
    resources: dict[str, float]
    temp_dir: str
    log_file: str


@dataclass
class ClusterInfo:
    root: str
    gcs_address: str  # for ray.init(address=...) and `ray start --address`
    dashboard_url: str  # for `ray job submit --address` / RAY_ADDRESS of the job CLI
    token_file: str
    failure_detection_s: int | None = None
    nodes: list[NodeInfo] = field(default_factory=list)


class LocalCluster:
    """Start, inspect, break and stop a local multi-node Ray cluster rooted at `root`.

    Use as a context manager (`with LocalCluster(dir, n_workers=1) as cluster:`) or call
    `start()` / `stop()`; `LocalCluster.attach(dir)` reconnects to one started by another process.
    """

    def __init__(
        self,
        root: str | Path,
        n_workers: int = 1,
        cpus_per_node: int = 1,
        object_store_mb: int = 256,
        failure_detection_s: int | None = None,
        ray_bin: str | None = None,
        head_cpus: int | None = None,
        autoscale: dict[str, dict] | None = None,
        idle_timeout_s: float = 60.0,
    ):
        self.root = Path(root).resolve()
        self.n_workers = n_workers
        self.cpus_per_node = cpus_per_node
        self.head_cpus = cpus_per_node if head_cpus is None else head_cpus  # 0: a head that only coordinates
        self.object_store_mb = object_store_mb
        self.failure_detection_s = failure_detection_s  # None: Ray's default (about 15 s)
        self.ray_bin = ray_bin or str(Path(sys.executable).with_name("ray"))
        # Worker node types the head's autoscaler launches on this machine (Ray's fake_multinode
        # provider) as demand needs them, and stops after idle_timeout_s without work.
        self.autoscale = autoscale
        self.idle_timeout_s = idle_timeout_s
        self.info: ClusterInfo | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 180.0) -> ClusterInfo:
        if (self.root / STATE_FILE).exists():
            raise ClusterError(f"{self.root} already holds a cluster; stop it first")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        token_file = self._write_token()
        gcs_port, dash_port = free_ports(2)
        self.info = ClusterInfo(
            root=str(self.root),
            gcs_address=f"127.0.0.1:{gcs_port}",
            dashboard_url=f"http://127.0.0.1:{dash_port}",
            token_file=str(token_file),
            failure_detection_s=self.failure_detection_s,
        )
        deadline = time.monotonic() + timeout_s
        head_args, head_env = [], {}
        if self.autoscale:
            config = self.root / "autoscaler.json"
            config.write_text(
                json.dumps(
                    fake_autoscaler_config(self.info.gcs_address, self.head_cpus, self.autoscale, self.idle_timeout_s),
                    indent=2,
                )
            )
            head_args = [f"--autoscaling-config={config}"]
            head_env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        try:
            self._start_node(
                HEAD,
                [
                    "--head",
                    f"--port={gcs_port}",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash_port}",
                    f"--ray-client-server-port={free_ports(1)[0]}",
                    *head_args,
                ],
                deadline,
                self.head_cpus,
                head_env,
            )
            self._wait_dashboard(deadline)
            for i in range(1, self.n_workers + 1):
                self.add_worker(f"worker{i}", deadline=deadline)
        except BaseException:
            self.stop()
            raise
        return self.info

    def add_worker(self, name: str, num_cpus: int | None = None, deadline: float | None = None) -> NodeInfo:
        """Join one more worker node (e.g. to replace a killed one) and wait until it is alive."""
        deadline = deadline or time.monotonic() + 60
        node = self._start_node(name, [f"--address={self.info.gcs_address}"], deadline, num_cpus)
        tag = next(iter(node.resources))
        while not any(tag in n["resources_total"] for n in self.alive_nodes()):
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} started but never joined; see {node.log_file}")
            time.sleep(0.5)
        return node

    def stop(self) -> None:
        """Stop this cluster's nodes (workers first) and delete its token; logs stay under root."""
        if self.info is not None:
            for node in reversed(self.info.nodes):
                stop_session(node.pid, grace_s=10)
                Path(node.temp_dir).unlink(missing_ok=True)
        for name in (STATE_FILE, TOKEN_FILE):
            (self.root / name).unlink(missing_ok=True)

    def remove_node(self, name: str) -> None:
        """Scale down: stop one node the way `ray stop` would (its work is rescheduled elsewhere)."""
        node = self.node(name)
        stop_session(node.pid, grace_s=10)
        Path(node.temp_dir).unlink(missing_ok=True)
        self.info.nodes.remove(node)
        self._save()

    def kill_node(self, name: str) -> None:
        """A node death: SIGKILL every process of the node at once, no shutdown path."""
        node = self.node(name)
        kill_session(node.pid)
        Path(node.temp_dir).unlink(missing_ok=True)
        self.info.nodes.remove(node)
        self._save()

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @classmethod
    def attach(cls, root: str | Path) -> "LocalCluster":
        """The cluster started under `root` by another process (e.g. cluster/local/start.sh)."""
        state = Path(root) / STATE_FILE
        if not state.is_file():
            raise ClusterError(f"no cluster state at {state}: was the cluster started with this --dir?")
        raw = json.loads(state.read_text())
        raw["nodes"] = [NodeInfo(**n) for n in raw["nodes"]]
        cluster = cls(root, n_workers=len(raw["nodes"]) - 1, failure_detection_s=raw["failure_detection_s"])
        cluster.info = ClusterInfo(**raw)
        return cluster

    # ------------------------------------------------------------------ using it

    def node(self, name: str) -> NodeInfo:
        for node in self.info.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r}; nodes: {[n.name for n in self.info.nodes]}")

    def client_env(self) -> dict[str, str]:
        """Environment for Ray clients (`ray job ...`, ray.init) talking to this cluster."""
        return {
            "RAY_ADDRESS": self.info.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.info.token_file,
        }

    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {Path(self.info.token_file).read_text().strip()}"}

    def alive_nodes(self) -> list[dict]:
        """The cluster's ALIVE nodes as the head's state API reports them."""
        body = self.get_json("/api/v0/nodes?limit=1000&detail=true")
        return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def get_json(self, path: str, auth: bool = True) -> dict:
        request = urllib.request.Request(self.info.dashboard_url + path, headers=self.auth_header() if auth else {})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def describe(self) -> str:
        """What a user needs to use the cluster, printed by start.sh."""
        info = self.info
        nodes = "\n".join(f"  {n.name:<8} pid {n.pid:<8} {n.num_cpus} CPU  log {n.log_file}" for n in info.nodes)
        return (
            f"Ray cluster under {info.root}\n{nodes}\n"
            f"GCS address (ray.init / ray start --address): {info.gcs_address}\n"
            f"Dashboard (local only):                        {info.dashboard_url}\n"
            f"Token auth is on; the token is in {info.token_file} (0600). To submit jobs:\n"
            f"  export RAY_ADDRESS={info.dashboard_url} RAY_AUTH_MODE=token "
            f"RAY_AUTH_TOKEN_PATH={info.token_file}\n"
            f"  ray job submit --working-dir . -- python jobs/cluster_check.py --out {info.root}/check\n"
            f"Stop it with: cluster/local/stop.sh --dir {info.root}"
        )

    # ------------------------------------------------------------------ internals

    def _write_token(self) -> Path:
        return write_private_token(self.root / TOKEN_FILE)

    def _node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=self.info.token_file,
            # State-API calls inside Ray (e.g. Ray Train's placement-group cleaner) find this
            # cluster's dashboard, not some other Ray running on the same machine.
            RAY_API_SERVER_ADDRESS=self.info.dashboard_url,
        )
        if self.failure_detection_s:  # the GCS declares a node dead after this many missed 1 s checks
            env.update(
                RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold=str(self.failure_detection_s)
            )
        # `python` in job entrypoints must be this interpreter (the one with the project installed).
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _start_node(
        self,
        name: str,
        role_args: list[str],
        deadline: float,
        num_cpus: int | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> NodeInfo:
        num_cpus = self.cpus_per_node if num_cpus is None else num_cpus
        node_dir = self.root / name
        node_dir.mkdir(exist_ok=True)
        (node_dir / "ray").mkdir(exist_ok=True)
        temp_dir = short_alias(node_dir / "ray")
        log_file = node_dir / "ray-start.log"
        resources = {f"node_tag:{name}": 1.0}
        agent_listen, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
        cmd = [
            self.ray_bin,
            "start",
            "--block",
            *role_args,
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={temp_dir}",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]
        log.info("starting %s node: %s", name, " ".join(cmd))
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self._node_env(), **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        node = NodeInfo(name, proc.pid, num_cpus, resources, str(temp_dir), str(log_file))
        self.info.nodes.append(node)
        self._save()
        while "Ray runtime started." not in log_file.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_file.read_text(errors="replace")[-3000:]
                raise ClusterError(f"{name} node did not start (see {log_file}):\n{tail}")
            time.sleep(0.25)
        return node

    def _wait_dashboard(self, deadline: float) -> None:
        while True:
            try:
                self.alive_nodes()
                return
            except (urllib.error.URLError, ConnectionError, KeyError):
                if time.monotonic() > deadline:
                    raise ClusterError(f"dashboard {self.info.dashboard_url} not up; see {self.root}") from None
                time.sleep(0.5)

    def _save(self) -> None:
        state = self.root / STATE_FILE
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.info), indent=2))
        tmp.replace(state)


def short_alias(directory: Path) -> Path:
    """A short symlink to `directory`, used as a node's Ray temp dir.

    Ray puts unix sockets under `<temp dir>/session_<date>_<pid>/sockets/`, and a socket path
    must stay under 108 bytes: a temp dir deep in a user's or pytest's tree would not fit.
    """
    while True:
        alias = Path(tempfile.gettempdir()) / f"rclu-{secrets.token_hex(4)}"
        try:
            alias.symlink_to(directory, target_is_directory=True)
            return alias
        except FileExistsError:
            continue


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def fake_autoscaler_config(
    gcs_address: str, head_cpus: int, worker_types: dict[str, dict], idle_timeout_s: float
) -> dict:
    """An autoscaling config for Ray's fake_multinode provider: the head's autoscaler starts and
    stops worker nodes (raylets) on this machine, inside the head's session, as a cloud provider
    would start and stop instances."""
    return {
        "cluster_name": "reclora-local",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **{name: {"node_config": {}, "min_workers": 0, **spec} for name, spec in worker_types.items()},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def session_processes(sid: int) -> list[psutil.Process]:
    procs = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                procs.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return procs


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session and wait until they are gone (reaped if ours)."""
    procs = session_processes(sid)
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def stop_session(sid: int, grace_s: float) -> None:
    """SIGTERM the node's `ray start --block` (it shuts its node down), then SIGKILL leftovers."""
    try:
        os.kill(sid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    psutil.wait_procs(session_processes(sid), timeout=grace_s)
    kill_session(sid)


# ---------------------------------------------------------------------- command line


def default_dir() -> str:
    return os.environ.get("RECLORA_CLUSTER_DIR") or f"/tmp/reclora-cluster-{getpass.getuser()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.local_cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="start a head and worker nodes, print how to use them")
    dir_help = "cluster directory: token, state, per-node logs (default $RECLORA_CLUSTER_DIR or %(default)s)"
    start.add_argument("--dir", default=default_dir(), help=dir_help)
    start.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    start.add_argument("--cpus-per-node", type=int, default=1)
    start.add_argument("--head-cpus", type=int, help="CPUs of the head (default --cpus-per-node; 0 keeps work off it)")
    start.add_argument("--object-store-mb", type=int, default=256)
    start.add_argument(
        "--failure-detection-s", type=int, help="declare a silent node dead after this many seconds (default: Ray's)"
    )
    start.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every node")
    for name, text in (("stop", "stop the cluster under --dir"), ("status", "print the cluster under --dir")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--dir", default=default_dir(), help=dir_help)
    kill = sub.add_parser("kill-node", help="SIGKILL one node's processes (simulate a node failure)")
    kill.add_argument("--dir", default=default_dir(), help=dir_help)
    kill.add_argument("name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.action == "start":
            cluster = LocalCluster(
                args.dir,
                args.workers,
                args.cpus_per_node,
                args.object_store_mb,
                args.failure_detection_s,
                head_cpus=args.head_cpus,
            )
            cluster.start(args.timeout)
        else:
            cluster = LocalCluster.attach(args.dir)
        if args.action == "stop":
            cluster.stop()
            print(f"stopped the cluster under {args.dir} (logs kept there)")
            return 0
        if args.action == "kill-node":
            cluster.kill_node(args.name)
        print(cluster.describe())
        return 0
    except ClusterError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
