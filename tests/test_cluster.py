"""The job on a cluster: the launcher config, `ray job submit` to a real head, and a
simulated multi-node cluster that loses a worker node mid-job."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml

from pipeline.job import JobConfig, run
from tiny import good_rows, write_parquet

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def test_cluster_config_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))
    assert any("pip install -q -e" in c for c in config["setup_commands"])
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"]
    config["available_node_types"]["gpu_worker"]["min_workerz"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_job_submit_to_a_head_started_here(model_dir, tmp_path):
    rows = good_rows(6)
    write_parquet(rows, tmp_path / "data.parquet")
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}  # a local head, no token
    subprocess.run([RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
                    "--include-dashboard=true", "--disable-usage-stats"], check=True, env=env,
                   capture_output=True, timeout=120)
    try:
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT), "--",
             sys.executable, "jobs/caption.py", "--model", model_dir, "--input", str(tmp_path / "data.parquet"),
             "--output", str(tmp_path / "out"), "--id-column", "key", "--keep", "8", "--max-new-tokens", "3"],
            capture_output=True, text=True, timeout=300, env=env)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    got = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["id"] for r in got) == sorted(r["key"] for r in rows)


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
