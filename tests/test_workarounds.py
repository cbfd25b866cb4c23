"""Each workaround for a library's internals (`pipeline.workarounds`, `pruner.workarounds`)
against the library installed: these fail when Ray, Ray Data, `datasets` or transformers
change the shape a workaround relies on."""
import dataclasses
import inspect

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy

import tiny
from pipeline import workarounds as wa
from pruner.runtime import ATTENTION
from pruner.workarounds import register_attention

pytestmark = pytest.mark.timeout(120)


def same() -> type:
    class Same:  # an actor stage, defined in a function: Ray pickles it whole
        def __call__(self, batch):
            return batch

    return Same


# ---------------------------------------------------------------- Ray: key-value store


def test_without_ray_the_key_value_store_drops_puts_and_finds_nothing():
    if ray.is_initialized():
        pytest.skip("Ray runs in this process")
    wa.kv_put(b"wa-test:none", b"1")
    assert wa.kv_get(b"wa-test:none") is None and wa.kv_take(b"wa-test:") == []
    wa.kv_delete(b"wa-test:none")


def test_the_key_value_store_puts_gets_lists_and_deletes(local_ray):
    wa.kv_put(b"wa-test:a:1", b"1.5")
    wa.kv_put(b"wa-test:a:2", b"2")
    wa.kv_put(b"wa-test:b", b"x")
    assert wa.kv_get(b"wa-test:b") == b"x"
    assert sorted(wa.kv_take(b"wa-test:a:")) == [b"1.5", b"2"]
    assert wa.kv_take(b"wa-test:a:") == [] and wa.kv_get(b"wa-test:b") == b"x"  # taken keys only
    wa.kv_delete(b"wa-test:b")
    assert wa.kv_get(b"wa-test:b") is None


# ---------------------------------------------------------------- Ray Data: reading


def test_the_older_parquet_reader_is_chosen_by_the_context_flag_alone(local_ray, tmp_path, monkeypatch):
    assert {"use_datasource_v2", "enable_progress_bars"} <= {f.name for f in dataclasses.fields(ray.data.DataContext)}
    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "a.parquet")
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "use_datasource_v2", True)
    newer = ray.data.read_parquet([str(tmp_path / "a.parquet")])
    older = wa.read_parquet_footers_here([str(tmp_path / "a.parquet")])
    assert ctx.use_datasource_v2  # restored
    assert type(older._logical_plan.dag.datasource).__name__ == "ParquetDatasource"
    assert type(getattr(newer._logical_plan.dag, "datasource", None)).__name__ != "ParquetDatasource"
    assert older.take_all() == [{"x": 1}, {"x": 2}, {"x": 3}]


def test_an_iterable_dataset_is_read_by_rays_own_datasource(local_ray):
    import datasets

    stream = datasets.Dataset.from_dict({"q": ["a", "b", "c"]}).to_iterable_dataset()
    assert [r["q"] for r in wa.read_iterable_dataset(stream).take_all()] == ["a", "b", "c"]


def test_a_datasets_fingerprint_follows_its_content():
    import datasets

    a = datasets.Dataset.from_dict({"q": ["a", "b"]})
    assert isinstance(wa.dataset_fingerprint(a), str)
    assert wa.dataset_fingerprint(a) != wa.dataset_fingerprint(a.map(lambda r: {"q": r["q"] + "!"}))


# ---------------------------------------------------------------- Ray Data: execution


def test_the_writers_seconds_are_read_from_the_stats_text(local_ray, tmp_path):
    ds = ray.data.range(8, override_num_blocks=2).map_batches(same(), num_cpus=0.5, compute=ActorPoolStrategy(size=1))
    ds.write_parquet(str(tmp_path / "out"))
    seconds = wa.write_seconds(ds)
    assert seconds is not None and 0 < seconds < 60, ds.stats()


def test_a_stages_compute_strategy_is_read_off_the_plan(local_ray):
    ds = ray.data.range(4).map_batches(same(), compute=ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1))
    assert wa.stage_compute(ds, "MapBatches(Same)").max_tasks_in_flight_per_actor == 1
    with pytest.raises(KeyError, match="no stage 'MapBatches"):
        wa.stage_compute(ds, "MapBatches(Other)")


def test_execution_callbacks_have_the_hooks_and_executor_state_progress_reads():
    """The shape only; tests/test_progress.py runs a write through them."""
    from ray.data._internal.execution.interfaces.op_runtime_metrics import OpRuntimeMetrics
    from ray.data._internal.execution.streaming_executor import StreamingExecutor
    import ray.data._internal.progress as ray_progress

    for hook in ("on_execution_step", "after_execution_succeeds"):
        assert callable(getattr(wa.ExecutionCallback, hook))
    assert "custom_execution_callback_classes" in {f.name for f in dataclasses.fields(ray.data.DataContext)}
    ctx = ray.data.DataContext.get_current().copy()
    executor = StreamingExecutor(ctx)
    assert wa.executor_context(executor) is ctx and executor._output_node is None  # set when it runs
    assert "rows_task_outputs_generated" in {f.name for f in dataclasses.fields(OpRuntimeMetrics)}
    assert '"ray_data_progress_manager_disabled"' in inspect.getsource(ray_progress)


# ---------------------------------------------------------------- transformers: attention


@pytest.mark.parametrize("name", sorted(tiny.FAMILIES))
def test_registered_attention_is_transformers_own_and_reaches_only_the_llm(name):
    """Our attention names compute exactly transformers' sdpa and eager given the same mask.
    Set on the text config (as PrunedVLM does), a name routes every LLM layer through it and
    leaves the vision tower's; each layer passes `scaling` by keyword (FastV's row reads it).
    Transformers makes no mask for a name it does not know (the runtime passes its own), so
    through its forward an unpadded batch equals sdpa's."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from pruner.models import adapter_class

    model, _ = tiny.FAMILIES[name]()
    calls = []

    def probe(inner):
        def attention(module, query, key, value, mask, **kwargs):
            calls.append((mask, kwargs["scaling"]))
            return inner(module, query, key, value, mask, **kwargs)

        return attention

    probed = register_attention(probe, prefix="probe")
    ids = torch.randint(3, 20, (2, 7))

    def logits(attention: str) -> torch.Tensor:
        model.set_attn_implementation({"text_config": attention})
        assert model.config.vision_config._attn_implementation == "sdpa"
        with torch.no_grad():
            return model(input_ids=ids).logits

    expected = logits("sdpa")
    assert torch.equal(logits(ATTENTION["sdpa"]), expected)
    calls.clear()
    assert torch.equal(logits(probed["sdpa"]), expected)
    assert len(calls) == model.config.text_config.num_hidden_layers
    assert all(mask is None and isinstance(scaling, float) for mask, scaling in calls)

    module = adapter_class(model.config.model_type)(model).layers[0].self_attn
    heads, kv_heads = model.config.text_config.num_attention_heads, model.config.text_config.num_key_value_heads
    q, k, v = torch.randn(2, heads, 5, 8), torch.randn(2, kv_heads, 5, 8), torch.randn(2, kv_heads, 5, 8)
    mask = torch.zeros(2, 1, 5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -1e9)
    mask[0, :, :, :2] = -1e9  # padding
    for plain, function in (("sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"]), ("eager", eager_attention_forward)):
        want, _ = function(module, q, k, v, mask, scaling=0.3, dropout=0.0)
        got, _ = ALL_ATTENTION_FUNCTIONS[ATTENTION[plain]](module, q, k, v, mask, scaling=0.3, dropout=0.0)
        assert torch.equal(got, want), plain
