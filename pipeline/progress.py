"""A job's progress as one line every few seconds where no terminal shows Ray Data's bars.

Ray Data draws bars only when stdout is a terminal. Otherwise (a log file, `| tee`, CI, `ray
job submit`) it logs a block of about fifteen lines every 10 s: every operator's tasks,
actors and queues, under a total that counts the writer's output, which is 0 rows for a
Parquet write. A log wants one line: rows answered of rows to do, time spent, time left.

    with report_progress(ds, total=rows_to_do):
        ds.write_parquet(...)
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import IO, Callable, Iterator

import ray.data
from tqdm import tqdm

from .workarounds import ExecutionCallback, executor_context, rows_into_sink, silence_bars_off_warning

EVERY = 5.0  # seconds between two lines
LINE = "{desc}: {n_fmt}/{total_fmt} rows ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]"


def terminal() -> bool:
    """Whether Ray Data's bars reach a terminal: it draws them on stderr, and only where stdout
    is a terminal (it logs its block of lines otherwise)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class Lines:
    """Rows done of `total` (None: unknown), as one line at most every `every` seconds, and at
    `close` a last one unless the last line says it already. `update` may be called as often
    as wanted, from any thread.

    The rate counts from the first row done, so that start-up (Ray, loading the model) does
    not stretch the time left; the elapsed time counts from the start."""

    def __init__(self, total: int | None, every: float = EVERY, file: IO[str] | None = None,
                 desc: str = "answered", clock: Callable[[], float] = time.monotonic):
        self.total, self.every, self.file, self.desc, self.clock = total, every, file, desc, clock
        self.start = self.last = clock()
        self.done = 0
        self.shown: int | None = None  # rows in the last line written
        self.first: tuple[float, int] | None = None  # (time, rows) when rows were first seen
        self.closed = False
        self.lock = threading.Lock()

    def update(self, done: int) -> None:
        now = self.clock()
        with self.lock:
            if self.closed:
                return
            if done > 0 and self.first is None:
                self.first = (now, done)
            self.done = done
            if now - self.last >= self.every:
                self._write(now)

    def close(self) -> None:
        with self.lock:
            if not self.closed and self.shown != self.done:
                self._write(self.clock())
            self.closed = True

    def line(self, now: float) -> str:
        rate = None
        if self.first is not None and now > self.first[0] and self.done > self.first[1]:
            rate = (self.done - self.first[1]) / (now - self.first[0])
        if self.total is None:
            return tqdm.format_meter(self.done, None, now - self.start, prefix=self.desc, unit=" rows", rate=rate)
        return tqdm.format_meter(self.done, self.total, now - self.start, prefix=self.desc, unit=" rows", rate=rate,
                                 unit_scale=self.total >= 10_000, bar_format=LINE)

    def _write(self, now: float) -> None:
        self.last, self.shown = now, self.done
        print(self.line(now), file=self.file or sys.stderr, flush=True)


# Ray Data builds its execution callbacks from classes, without arguments, and runs a write on
# a deep copy of the dataset's context: the context carries a key, and the callback finds its
# Lines here by it. The counts are the operators' own metrics, which Ray Data's bars show
# (Ray Data internals: `pipeline.workarounds`).
_REPORTS: dict[str, Lines] = {}
_KEY = "pipeline.progress"


class _RowsToSink(ExecutionCallback):
    """Ray Data calls this at every step of its scheduling loop (many times a second): the
    rows that the operators feeding the sink (the writer) have put out so far."""

    def _lines(self, executor) -> Lines | None:
        return _REPORTS.get(executor_context(executor).get_config(_KEY))

    def on_execution_step(self, executor) -> None:
        lines = self._lines(executor)
        if lines is not None:
            lines.update(rows_into_sink(executor))

    def after_execution_succeeds(self, executor) -> None:
        self.on_execution_step(executor)
        lines = self._lines(executor)
        if lines is not None:
            lines.close()


@contextlib.contextmanager
def report_progress(ds: ray.data.Dataset, total: int | None, every: float = EVERY,
                    file: IO[str] | None = None, force: bool = False) -> Iterator[Lines | None]:
    """Around the consumption of `ds` (its write): where no terminal shows Ray Data's bars (or
    with `force`), print one line every `every` seconds instead of Ray Data's bars, its block
    of lines and its two lines on starting. Yields the Lines, or None where the bars are kept."""
    if terminal() and not force:
        yield None
        return
    ctx = ds.context  # the dataset's own: it is the one its execution reads
    before = ctx.enable_progress_bars, ctx.print_on_execution_start
    key = f"{id(ctx):x}-{time.monotonic_ns():x}"
    _REPORTS[key] = lines = Lines(total, every, file)
    silence_bars_off_warning()  # here they are replaced, not lost
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    ctx.set_config(_KEY, key)
    ctx.custom_execution_callback_classes.append(_RowsToSink)
    try:
        yield lines
    finally:
        ctx.custom_execution_callback_classes.remove(_RowsToSink)
        ctx.remove_config(_KEY)
        ctx.enable_progress_bars, ctx.print_on_execution_start = before
        del _REPORTS[key]
