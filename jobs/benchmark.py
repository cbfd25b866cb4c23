"""Measurements that take too long for the test suite.

    python jobs/benchmark.py selection [--n 576 --dim 4096 --keeps 192,128,64 --repeats 7]

`selection` times each method's token selection alone on random inputs shaped like
LLaVA-1.5-7B's layer-2 signals, and VLM-Pruner with chunk 16 vs chunk 1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from pruner.methods import METHODS, Signals


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median and spread (max - min) of `repeats` runs after one warm-up, in seconds."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), max(runs) - min(runs)


def bench_selection(n: int, dim: int, keeps: list[int], repeats: int, text: int = 60) -> list[dict]:
    side = int(n**0.5)
    if side * side != n:
        raise SystemExit(f"--n must be a square number of tokens (a grid), got {n}")
    g = torch.Generator().manual_seed(0)
    signals = Signals(
        grid=(side, side),
        keys=torch.randn(n, dim, generator=g), hidden=torch.randn(n, dim, generator=g),
        hidden_normed=torch.randn(n, dim, generator=g), attn_last=torch.rand(n, generator=g).softmax(0),
        text_keys=torch.randn(text, dim, generator=g), text_hidden_normed=torch.randn(text, dim, generator=g),
        features=torch.randn(n, dim, generator=g),
    )
    settings = [(name, {}) for name, m in METHODS.items() if m.run is not None]
    settings.append(("vlm-pruner", {"chunk": 1}))
    rows = []
    for name, params in settings:
        for keep in keeps:
            median, spread = _time(lambda: METHODS[name].run(signals, keep, **params), repeats)
            label = name + "".join(f" {k}={v}" for k, v in params.items())
            rows.append({"method": label, "keep": keep, "ms": median * 1e3, "spread_ms": spread * 1e3})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sel = sub.add_parser("selection", help="time token selection alone, per method and budget")
    sel.add_argument("--n", type=int, default=576, help="image tokens (a square grid)")
    sel.add_argument("--dim", type=int, default=4096, help="key and hidden width")
    sel.add_argument("--keeps", default="192,128,64")
    sel.add_argument("--repeats", type=int, default=7)
    sel.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    keeps = [int(k) for k in args.keeps.split(",")]
    rows = bench_selection(args.n, args.dim, keeps, args.repeats)
    print(f"Selection time, N={args.n}, D={args.dim}, CPU threads={torch.get_num_threads()} "
          f"(cores={os.cpu_count()}), median of {args.repeats} after a warm-up\n")
    print("| method | " + " | ".join(f"keep {k} (ms)" for k in keeps) + " |")
    print("|---|" + "---|" * len(keeps))
    for label in dict.fromkeys(r["method"] for r in rows):
        cells = [f"{r['ms']:.2f} ± {r['spread_ms'] / 2:.2f}" for r in rows if r["method"] == label]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
