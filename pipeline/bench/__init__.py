"""Measurement, kept apart from inference: the runtime and selection benchmarks (`runtime`),
their meters, random-weight models and workloads (`profiling`), the per-phase roofline
(`roofline`), the job-level benchmarks (`job`: pipeline, resume, compile, read) and the
large-corpus tools (`scale`). `jobs/benchmark.py` is their command line. Nothing in `pruner/`
or the job imports this package; the runtime's one seam for it is `prefill(observer=)`."""
