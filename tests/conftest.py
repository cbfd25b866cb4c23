import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import the `tiny` model builders

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A tiny random-weight LLaVA checkpoint on disk (84 px: 36 image tokens)."""
    path = tmp_path_factory.mktemp("tiny-llava")
    model, proc = tiny.llava()
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local Ray for one test module."""
    import ray

    ray.init(num_cpus=2, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()
