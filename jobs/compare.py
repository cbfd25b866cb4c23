"""How much does pruning save on your data and model, and what does it cost in quality?

Runs a sample of --input through the unpruned model and each method x keep, through the same
Ray pipeline as jobs/caption.py, and writes a report to --output: report.md, report.html
(self-contained), the plots as PNG and results.parquet (one row per setting).

    python jobs/compare.py                                   # demo data and model, 300 rows, all settings
    python jobs/compare.py --input s3://bucket/sample/ --model llava-hf/llava-1.5-7b-hf \\
        --answer-column label --methods vlm-pruner,dart --keeps 128,64 --gpu-hour-price 2.5

Re-running with the same --output reuses the settings already done (each is a resumable job
in OUTPUT/runs/<setting>/).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.compare import (DEFAULT_ANSWER_COLUMN, DEFAULT_GROUP_COLUMN, DEFAULT_KEEPS,  # noqa: E402
                              DEFAULT_METHODS, CompareConfig, compare, parse_list)
from pipeline.job import JobConfig, JobError  # noqa: E402


def parse(argv: list[str] | None = None) -> CompareConfig:
    d, j = CompareConfig(), JobConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=d.input,
                   help="as in jobs/caption.py: Parquet, datasets directory, Hugging Face name or image folder "
                        "(default: demo eval split)")
    p.add_argument("--split", help="split of a Hugging Face dataset or DatasetDict")
    p.add_argument("--model", help="checkpoint path or name (default: the bundled demo model)")
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
                   help="points of quality the recommendation may lose against unpruned (default: %(default)s)")
    p.add_argument("--prune-layer", type=int, default=j.prune_layer, help="K: prune after layer K-1")
    p.add_argument("--batch-size", type=int, default=j.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=j.max_new_tokens)
    p.add_argument("--image-column", help="default: 'image' ('bytes' for a folder of images)")
    p.add_argument("--question-column", help="default: 'question' when the input has it")
    p.add_argument("--id-column", help="stable row id; default: the input's 'id' column, else a content hash")
    p.add_argument("--concurrency", type=int, default=j.concurrency, help="model actors")
    p.add_argument("--num-gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0 (CPU)")
    a = p.parse_args(argv)
    job = JobConfig(prune_layer=a.prune_layer, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                    split=a.split, image_column=a.image_column, question_column=a.question_column,
                    id_column=a.id_column, concurrency=a.concurrency, num_gpus_per_actor=a.num_gpus_per_actor)
    return CompareConfig(
        input=a.input, output=a.output, model=a.model, limit=a.limit,
        methods=parse_list(a.methods, "--methods"), keeps=parse_list(a.keeps, "--keeps", int),
        answer_column=a.answer_column, group_column=a.group_column, gpu_hour_price=a.gpu_hour_price,
        max_quality_drop=a.max_quality_drop, job=job,
    )


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
