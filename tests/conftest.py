import pytest

import tiny  # tests/ is on the path through pytest's `pythonpath` setting


def _saved(tmp_path_factory, name: str, builder) -> str:
    path = tmp_path_factory.mktemp(name)
    model, proc = builder()
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A tiny random-weight LLaVA checkpoint on disk (84 px: 36 image tokens)."""
    return _saved(tmp_path_factory, "tiny-llava", tiny.llava)


@pytest.fixture(scope="session")
def onevision_dir(tmp_path_factory) -> str:
    """A tiny random-weight LLaVA-OneVision checkpoint on disk (takes video)."""
    return _saved(tmp_path_factory, "tiny-onevision", tiny.llava_onevision)


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local Ray for one test module."""
    import ray

    ray.init(num_cpus=2, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()
