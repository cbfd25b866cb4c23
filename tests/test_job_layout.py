"""Where the job preprocesses: with GPUs, in a pool of CPU workers ahead of the model actors
(the GPU must not wait on decoding); on CPUs, in the model actor itself. Both layouts give
the same rows. A Ray that advertises a GPU on a machine without CUDA runs the GPU layout on
the CPU, so it is tested here too."""
import pyarrow.parquet as pq
import pytest
import ray

from tiny import good_rows, png, write_parquet
from pipeline.config import JobConfig
from pipeline.job import columns, pipeline, run
from pipeline.inputs import plan_inputs
from pipeline.sources import open_source

pytestmark = pytest.mark.timeout(300)
COMPARED = ["id", "input_row", "answer", "error", "image_tokens_kept", "generated_tokens", "flops_total"]


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    ray.init(num_cpus=4, num_gpus=1, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


def operators(cfg: JobConfig) -> str:
    source = open_source(cfg.input)
    return repr(pipeline(cfg, source, plan_inputs(source, None), columns(cfg, source), "not-read"))


def test_gpu_and_cpu_layouts_give_the_same_rows(ray_with_a_gpu, model_dir, tmp_path):
    from PIL import Image

    rows = good_rows(6) + [{"key": "broken", "image": png(Image.new("RGB", (9, 9)))[:30], "question": "what ?",
                            "label": -1}]
    data = tmp_path / "data.parquet"
    write_parquet(rows, data)
    base = dict(model=model_dir, input=str(data), id_column="key", keep=8, max_new_tokens=4, batch_size=4)
    gpu = JobConfig(output=str(tmp_path / "gpu"), **base)  # one GPU per model actor: Ray advertises one
    cpu = JobConfig(output=str(tmp_path / "cpu"), num_gpus_per_actor=0, **base)
    assert "Preparer" in operators(gpu) and "Preparer" not in operators(cpu)

    assert run(gpu)["rows"] == run(cpu)["rows"] == len(rows)
    got = {name: pq.read_table(tmp_path / name).select(COMPARED).sort_by("input_row").to_pylist()
           for name in ("gpu", "cpu")}
    assert got["gpu"] == got["cpu"]
    assert [r["error"] is not None for r in got["cpu"]] == [False] * 6 + [True]
