"""The job on a cluster: the launcher config (token authentication, a private dashboard),
`ray job submit` to a real head that requires the token, and a simulated multi-node cluster
that loses a worker node mid-job."""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml

from pipeline.job import JobConfig, run
from tiny import good_rows, write_parquet

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def ray_start(command: str) -> tuple[dict[str, str], list[str]]:
    """A `VAR=value ray start ...` line of the launcher config: its environment and its flags."""
    words = shlex.split(command)
    i = words.index("ray")
    assert words[i + 1] == "start", command
    return dict(w.split("=", 1) for w in words[:i]), words[i + 2:]


def start_line(commands: list[str]) -> str:
    (line,) = [c for c in commands if "ray start" in c]
    return line


def test_cluster_config_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = cluster_config()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))
    assert any("pip install -q -e" in c for c in config["setup_commands"])
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"]
    config["available_node_types"]["gpu_worker"]["min_workerz"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def test_cluster_config_requires_a_token_everywhere_and_keeps_the_dashboard_private(tmp_path, monkeypatch):
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    config = cluster_config()
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        env, _ = ray_start(start_line(commands))
        assert env == {"RAY_AUTH_MODE": "token"}  # the mode only: the token itself is never in the file
    _, head_flags = ray_start(start_line(config["head_start_ray_commands"]))
    assert "--dashboard-host=127.0.0.1" in head_flags
    assert "0.0.0.0" not in (ROOT / "ray_cluster.yaml").read_text()

    # The token file that `ray get-auth-token --generate` writes here lands on Ray's default
    # token path on every node (the home of the user the launcher logs in as).
    monkeypatch.setenv("HOME", str(tmp_path))
    node_home = Path("/home") / config["auth"]["ssh_user"]
    sources = {dst: os.path.expanduser(src) for dst, src in config["file_mounts"].items()}
    assert sources[str(node_home / ".ray" / "auth_token")] == str(_get_default_token_path())

    # No security group of our own and no rules added to the launcher's, which admits SSH from
    # anywhere and other ports from the cluster's nodes only (ray.autoscaler's AWS config).
    assert "security_group" not in config["provider"]
    assert not any("SecurityGroupIds" in t["node_config"] for t in config["available_node_types"].values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ip() -> str | None:
    """This machine's address on its network (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") else ip


def refuses_connection(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((host, port)) != 0


@pytest.fixture
def ray_temp_dir():
    """Ray's temp folder for a head started here; short, as Ray's socket paths must fit in 107 bytes."""
    path = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_job_submit_needs_the_clusters_token(model_dir, tmp_path, ray_temp_dir):
    """The README's submit against a head started with ray_cluster.yaml's environment and flags.
    Without the token, or with another one, the Jobs API refuses the job and nothing runs; with
    it, the job runs, and neither the token nor a secret in the job's environment ends up in
    its output folder, its log or Ray's logs."""
    rows = good_rows(6)
    write_parquet(rows, tmp_path / "data.parquet")
    home, stranger = tmp_path / "home", tmp_path / "stranger"  # the user's and someone else's
    home.mkdir(), stranger.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    env = {**base, "HOME": str(home), "RAY_ADDRESS": ""}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    token = (home / ".ray" / "auth_token").read_text()
    cloud_secret = "canary-" + os.urandom(12).hex()

    head_env, flags = ray_start(start_line(cluster_config()["head_start_ray_commands"]))
    flags = [f for f in flags if not f.startswith(("--port=", "--autoscaling-config="))]
    ports = {name: free_port() for name in (  # none of Ray's fixed defaults: another Ray may be running here
        "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")}
    # `--block` keeps the head's processes children of this one: stopping it stops them, and
    # nothing else (`ray stop` would stop every Ray on the machine).
    with open(tmp_path / "head.log", "w") as log:
        head = subprocess.Popen(
            [RAY, "start", *flags, "--block", "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
             f"--temp-dir={ray_temp_dir}", *(f"--{name}={port}" for name, port in ports.items())],
            env={**env, **head_env, "AWS_SECRET_ACCESS_KEY": cloud_secret},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    marker = tmp_path / "ran-without-token"
    try:
        status = None
        deadline = time.time() + 120
        while status is None and time.time() < deadline and head.poll() is None:
            try:
                status = urllib.request.urlopen(f"{dashboard}/api/version", timeout=5).status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                time.sleep(0.5)
        assert status == 401, f"dashboard answered {status}; head exited {head.poll()}"
        ip = node_ip()
        if ip is not None:
            assert refuses_connection(ip, ports["dashboard-port"])  # bound to localhost only

        # The attack: a job posted to the Jobs API, with no token.
        post = urllib.request.Request(f"{dashboard}/api/jobs/", method="POST", headers={"Content-Type": "application/json"},
                                      data=json.dumps({"entrypoint": f"touch {marker}"}).encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(post, timeout=30)
        assert refused.value.code == 401

        submit = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(ROOT), "--",
                  sys.executable, "jobs/caption.py", "--model", model_dir, "--input", str(tmp_path / "data.parquet"),
                  "--output", str(tmp_path / "out"), "--id-column", "key", "--keep", "8", "--max-new-tokens", "3"]
        for who, extra, says in (
                ("no token", {"HOME": str(stranger)}, "Missing authentication token"),
                ("another token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex()},
                 "Invalid authentication token")):
            out = subprocess.run(submit, capture_output=True, text=True, timeout=120, env={**env, **extra})
            assert out.returncode != 0 and says in out.stderr, (who, out.stdout[-2000:] + out.stderr[-2000:])

        ok = subprocess.run(submit, capture_output=True, text=True, timeout=300, env={**env, "RAY_AUTH_MODE": "token"})
        assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
        assert "succeeded" in ok.stdout
        jobs = subprocess.run([RAY, "job", "list", "--address", dashboard], capture_output=True, text=True,
                              timeout=60, env={**env, "RAY_AUTH_MODE": "token"})
        assert jobs.stdout.count("submission_id='raysubmit_") == 1, jobs.stdout  # the refused ones never ran
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
    assert not marker.exists()
    got = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["id"] for r in got) == sorted(r["key"] for r in rows)

    written = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert {"_job.json", "_summary.json"} <= {p.name for p in written}
    written.update({p: p.read_bytes() for p in ray_temp_dir.rglob("*") if p.is_file() and not p.is_symlink()})
    written["submit output"] = (ok.stdout + ok.stderr).encode()
    written["head output"] = (tmp_path / "head.log").read_bytes()
    for secret in (token, cloud_secret):
        assert not [str(p) for p, data in written.items() if secret.encode() in data]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_worker_node_lost_mid_job_loses_and_doubles_nothing(model_dir, tmp_path):
    from ray.cluster_utils import Cluster

    rows = good_rows(48)
    write_parquet(rows, tmp_path / "data.parquet")
    out = tmp_path / "out"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]  # fake GPUs: actors spread
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        cfg = JobConfig(model=model_dir, input=str(tmp_path / "data.parquet"), output=str(out), id_column="key",
                        keep=8, max_new_tokens=16, batch_size=2, rows_per_file=2, concurrency=2,
                        num_gpus_per_actor=1)
        result: dict = {}
        job = threading.Thread(target=lambda: result.update(summary=run(cfg)))
        job.start()
        deadline = time.time() + 250
        while time.time() < deadline and len(list(out.glob("*.parquet"))) < 2:
            time.sleep(0.1)
        cluster.remove_node(workers[1])  # a GPU node goes away with its actor
        cluster.add_node(num_cpus=1, num_gpus=1)  # and the autoscaler would bring another
        job.join(timeout=300)
        assert "summary" in result, "the job did not finish"
    finally:
        ray.shutdown()
        cluster.shutdown()
    got = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in got) == sorted(r["key"] for r in rows)  # each row exactly once
    assert all(r["error"] is None for r in got)
