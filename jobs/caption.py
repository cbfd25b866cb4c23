"""Answer a question about every image of a dataset, pruning visual tokens, into Parquet.

    python jobs/caption.py                         # bundled demo data and model, VLM-Pruner keep 64
    ray job submit --working-dir . -- python jobs/caption.py --input s3://bucket/data/ --output s3://bucket/out/

Re-running with the same --output skips rows already written (resume).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.images import DEFAULT_MAX_PIXELS  # noqa: E402
from pipeline.job import JobConfig, JobError, run  # noqa: E402
from pipeline.stages import DEFAULT_QUESTION  # noqa: E402
from pruner.methods import METHODS  # noqa: E402


def parse(argv: list[str] | None = None) -> JobConfig:
    d = JobConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=d.input,
                   help="Parquet file, directory or glob (local or s3://...), a datasets.save_to_disk "
                        "directory, a Hugging Face dataset name, or a folder of images (default: demo eval split)")
    p.add_argument("--split", help="split of a Hugging Face dataset or DatasetDict")
    p.add_argument("--output", default=d.output, help="output directory (default: %(default)s)")
    p.add_argument("--model", help="checkpoint path or name (default: the bundled demo model)")
    p.add_argument("--method", default=d.method, choices=list(METHODS))
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, help="image tokens kept per image (default 64)")
    budget.add_argument("--rate", type=float, help="fraction of image tokens pruned, per image")
    p.add_argument("--prune-layer", type=int, default=d.prune_layer, help="K: prune after layer K-1")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--question", default=DEFAULT_QUESTION,
                   help="prompt for rows without a question (default: %(default)r)")
    p.add_argument("--image-column", help="default: 'image' ('bytes' for a folder of images)")
    p.add_argument("--question-column", help="default: 'question' when the input has it")
    p.add_argument("--id-column", help="stable row id; default: the input's 'id' column, else a hash of image and question")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="model actors")
    p.add_argument("--num-gpus-per-actor", type=float,
                   help="default: 1 when the cluster has GPUs, else 0 (CPU)")
    p.add_argument("--threads-per-actor", type=int,
                   help="torch threads of a CPU model actor (default: the node's CPUs / --concurrency)")
    p.add_argument("--limit", type=int, help="only the first N input rows")
    p.add_argument("--no-resume", action="store_true", help="start over: delete earlier output first")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="larger images become error rows (default: %(default)s)")
    p.add_argument("--rows-per-file", type=int, default=d.rows_per_file,
                   help="rows buffered per output file (a kill loses at most these)")
    a = p.parse_args(argv)
    return JobConfig(
        input=a.input, output=a.output, model=a.model, method=a.method, keep=a.keep, rate=a.rate,
        prune_layer=a.prune_layer, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
        question=a.question, split=a.split, image_column=a.image_column, question_column=a.question_column,
        id_column=a.id_column, concurrency=a.concurrency, num_gpus_per_actor=a.num_gpus_per_actor,
        threads_per_actor=a.threads_per_actor, limit=a.limit, resume=not a.no_resume,
        max_image_pixels=a.max_image_pixels, rows_per_file=a.rows_per_file,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    try:
        summary = run(cfg)
    except JobError as e:
        print(f"caption.py: error: {e}", file=sys.stderr)
        return 2
    summary.pop("config", None)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
