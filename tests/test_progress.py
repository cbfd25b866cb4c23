"""Progress without a terminal: one line every few seconds, counting the rows that reach the
writer, in place of Ray Data's bars and its block of lines."""
import io
import logging
import re
import sys
import time
import types

import pyarrow.parquet as pq
import pytest
import ray.data
from ray.data import ActorPoolStrategy

from pipeline.progress import Lines, _RowsToSink, report_progress

pytestmark = pytest.mark.timeout(300)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_at_most_every_interval_and_one_at_close():
    clock, out = Clock(), io.StringIO()
    lines = Lines(100, every=5.0, file=out, clock=clock)
    clock.now = 104.0
    lines.update(8)  # the first rows, 4 s after the start (Ray and the model starting)
    assert out.getvalue() == ""
    clock.now = 110.0
    lines.update(32)
    clock.now = 112.0
    lines.update(40)  # within 5 s of the last line: no line
    lines.close()
    lines.close()
    lines.update(50)  # after close: nothing
    # the rate counts from the first rows: (32 - 8) rows in 6 s, then (40 - 8) in 8 s
    assert out.getvalue().splitlines() == [
        "answered: 32/100 rows (32%) [00:10<00:17,  4.00 rows/s]",
        "answered: 40/100 rows (40%) [00:12<00:15,  4.00 rows/s]",
    ]


def test_unknown_total_and_no_rows_yet():
    clock, out = Clock(), io.StringIO()
    lines = Lines(None, every=5.0, file=out, clock=clock)
    clock.now = 106.0
    lines.update(0)
    clock.now = 108.0
    lines.update(10)
    clock.now = 111.0
    lines.update(22)
    lines.close()
    assert out.getvalue().splitlines() == [
        "answered: 0 rows [00:06, ? rows/s]",
        "answered: 22 rows [00:11,  4.00 rows/s]",
    ]


def test_a_terminal_keeps_ray_datas_bars(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    monkeypatch.setattr(sys, "stderr", Tty())
    ds = types.SimpleNamespace(context=ray.data.DataContext.get_current().copy())  # no Ray needed
    with report_progress(ds, total=4) as lines:
        assert lines is None
        assert ds.context.enable_progress_bars and ds.context.print_on_execution_start
        assert _RowsToSink not in ds.context.custom_execution_callback_classes


class Shown(logging.Handler):
    """What Ray Data's console handler would print: its records from INFO up, but hidden ones."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, "hide", False):
            self.messages.append(record.getMessage())


@pytest.mark.slow
def test_a_write_reports_rows_in_lines_and_ray_data_prints_no_block(local_ray, tmp_path):
    class Slow:  # an actor stage before the writer, as the job's model actors (defined here: Ray pickles it whole)
        def __call__(self, batch):
            time.sleep(0.3)
            return batch

    ds = ray.data.range(48, override_num_blocks=6).map_batches(Slow, batch_size=8, num_cpus=0.5,
                                                              compute=ActorPoolStrategy(size=1))
    out, shown = io.StringIO(), Shown()
    ray_data = logging.getLogger("ray.data")
    ray_data.addHandler(shown)
    start = time.monotonic()
    try:
        with report_progress(ds, total=48, every=0.5, file=out, force=True):
            ds.write_parquet(str(tmp_path / "out"))
    finally:
        ray_data.removeHandler(shown)
    elapsed = time.monotonic() - start

    assert pq.read_table(tmp_path / "out").num_rows == 48
    got = out.getvalue().splitlines()
    counts = [int(re.match(r"answered: (\d+)/48 rows \(\d+%\) \[", line).group(1)) for line in got]
    assert counts == sorted(counts) and counts[-1] == 48 and got[-1].startswith("answered: 48/48 rows (100%)")
    assert 2 <= len(got) <= elapsed / 0.5 + 2  # periodic lines (6 batches of 0.3 s), not one per step
    shown = "\n".join(shown.messages)
    assert "Data sink Parquet finished" in shown  # Ray Data's console lines do reach this handler
    for ray_data_line in ("Running Dataset", "Total Progress", "Progress bars disabled", "Starting execution",
                          "Execution plan"):
        assert ray_data_line not in shown
    # the dataset's context is as it was
    assert ds.context.enable_progress_bars and ds.context.print_on_execution_start
    assert _RowsToSink not in ds.context.custom_execution_callback_classes
