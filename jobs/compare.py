"""How much does pruning save on your data and model, and what does it cost in quality?

Runs a sample of --input through the unpruned model and each method x keep, through the same
Ray pipeline as jobs/caption.py, and writes a report to --output: report.md, report.html
(self-contained), the plots as PNG and results.parquet (one row per setting).

    python jobs/compare.py                                   # demo data and model, 300 rows, all settings
    python jobs/compare.py --input s3://bucket/sample/ --model llava-hf/llava-1.5-7b-hf \\
        --answer-column label --methods vlm-pruner,dart --keeps 128,64 --gpu-hour-price 2.5

Re-running with the same --output reuses the settings already done (each is a job in
OUTPUT/runs/<setting>/): one that covers fewer rows is extended, one whose configuration
changed is run again. Every figure is over the same rows in every setting. A --method-param
goes to each method that takes it (tau: vlm-pruner's runs only).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.compare.sweep import (DEFAULT_ANSWER_COLUMN, DEFAULT_GROUP_COLUMN, DEFAULT_KEEPS,  # noqa: E402
                              DEFAULT_METHODS, CompareConfig, compare, parse_list)
from pipeline.config import JobConfig, JobError, add_job_arguments, job_kwargs  # noqa: E402


def parse(argv: list[str] | None = None) -> CompareConfig:
    d = CompareConfig
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=d.output, help="report directory (default: %(default)s)")
    p.add_argument("--limit", type=int, default=d.limit, help="first N input rows (default: %(default)s)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma list; the unpruned model always runs as the reference (default: %(default)s)")
    p.add_argument("--keeps", default=",".join(map(str, DEFAULT_KEEPS)),
                   help="comma list of image tokens kept per image (default: %(default)s)")
    p.add_argument("--answer-column", help=f"ground-truth answers for accuracy (default: {DEFAULT_ANSWER_COLUMN!r} "
                                           "when the input has it; without one, quality is agreement with unpruned)")
    p.add_argument("--group-column", help=f"break quality down by this column (default: {DEFAULT_GROUP_COLUMN!r} "
                                          "when the input has it)")
    p.add_argument("--gpu-hour-price", type=float, default=d.gpu_hour_price,
                   help="$ per hour of one model replica's device, for the projected cost (default: %(default)s)")
    p.add_argument("--max-quality-drop", type=float, default=d.max_quality_drop,
                   help="points of quality the recommendation may lose against unpruned, counting the drop's "
                        "uncertainty: its one-sided 95 %% upper bound on the same rows (default: %(default)s)")
    add_job_arguments(p, skip=("output", "limit", "method", "keep", "rate", "overwrite"))
    a = p.parse_args(argv)
    given = job_kwargs(a)
    top = {k: given.pop(k) for k in ("input", "model", "method_params") if k in given}
    return CompareConfig(
        output=a.output, limit=a.limit, methods=parse_list(a.methods, "--methods"),
        keeps=parse_list(a.keeps, "--keeps", int), answer_column=a.answer_column, group_column=a.group_column,
        gpu_hour_price=a.gpu_hour_price, max_quality_drop=a.max_quality_drop, job=JobConfig(**given), **top)


def main(argv: list[str] | None = None) -> int:
    try:
        summary = compare(parse(argv))
    except JobError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
