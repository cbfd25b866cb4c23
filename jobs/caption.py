"""Answer a question about every image of a dataset, pruning visual tokens, into Parquet.

    python jobs/caption.py                         # bundled demo data and model, VLM-Pruner keep 64
    RAY_AUTH_MODE=token ray job submit --address http://localhost:8265 --working-dir . -- \
        python jobs/caption.py --input s3://bucket/data/ --output s3://bucket/out/   # a cluster (README)

--output belongs to one configuration: a rerun with the same one resumes (rows already
written are skipped, rows that ended in error are retried, files added to the input are
answered); a rerun with another exits 2 naming what differs, unless --overwrite. Files in
--output that the job did not write are never read, moved or deleted. Ctrl-C writes the rows
in flight and exits 130; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.config import JobConfig, JobError, add_job_arguments, job_kwargs  # noqa: E402
from pipeline.job import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p)
    try:
        summary = run(JobConfig(**job_kwargs(p.parse_args(argv))))
    except JobError as e:
        print(f"caption.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopped at once; rows in flight were not written, rerun the same command to resume",
              file=sys.stderr)
        return 130
    summary.pop("config", None)
    print(json.dumps(summary, indent=1))
    if summary["interrupted"]:
        print(f"interrupted: {summary['processed']} rows written this run, {summary['rows']} in all; "
              f"rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
