"""Cost and quality of pruning methods and budgets on a sample, through the real job.

Every setting (unpruned once, then each method x keep) is one `pipeline.job.run` over the
first `limit` rows into `OUTPUT/runs/<setting>/`. A rerun reuses a setting whose stored run
covers those rows with the same configuration, extends one that covers fewer, and reruns
one whose configuration changed. Every figure of the report comes from the per-row outputs
of the same rows in every setting (the first `limit` input rows that all settings have):

* quality: accuracy against a ground-truth column (normalized exact match) and agreement
  with the unpruned answers (the same match), in %; the drop from unpruned, judged row by
  row on the same rows, with its standard error and one-sided 95 % upper bound;
* cost: image tokens kept, FLOPs per sample (the project's own counting and the paper
  convention, both labelled), throughput of one model replica (rows over the rows' summed
  model-stage seconds), speedup over unpruned, and the projected price of 1M rows;
* the recommendation: among the settings whose drop's upper bound is within
  `max_quality_drop` points, the one with the fewest FLOPs (then the higher agreement with
  unpruned, then the name). Measured throughput never decides it: on a small sample its
  noise is as large as the differences between budgets, and a rerun must not change the
  answer.

The tables, plots and prose of the report are rendered by `pipeline.compare.report`.
"""
from __future__ import annotations

import glob
import json
import math
import posixpath
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pruner.methods import get_method

from .. import job
from .. import schema as col
from .answers import answers_match
from ..common import filesystem, saved_pct
from ..config import JobConfig, JobError
from ..demo import EVAL_PARQUET
from ..manifest import changed, configuration, read_rows
from ..output import SUMMARY, Folder
from .report import setting_label, write_report

DEFAULT_METHODS = ("vlm-pruner", "fastv", "dart", "divprune")
DEFAULT_KEEPS = (192, 128, 64)
DEFAULT_ANSWER_COLUMN = "answer_gt"  # used when the input has it and --answer-column is not given
DEFAULT_GROUP_COLUMN = "question_type"
REFERENCE = "none"
TIMING = "_compare.json"  # per setting: the end-to-end timing of the run that did all its rows
Z_ONE_SIDED_95 = 1.645  # a drop qualifies when drop + Z x its standard error is within the allowed drop


@dataclass
class CompareConfig:
    input: str = str(EVAL_PARQUET)
    output: str = "out/compare"
    model: str | None = None  # None: the bundled demo model
    limit: int = 300
    methods: tuple[str, ...] = DEFAULT_METHODS
    keeps: tuple[int, ...] = DEFAULT_KEEPS
    answer_column: str | None = None  # None: DEFAULT_ANSWER_COLUMN where the input has it
    group_column: str | None = None  # None: DEFAULT_GROUP_COLUMN where the input has it
    gpu_hour_price: float = 2.0  # $ per hour of one model replica's device
    max_quality_drop: float = 1.0  # points (of %)
    method_params: dict = field(default_factory=dict)  # each method's run gets those it takes
    job: JobConfig = field(default_factory=JobConfig)  # everything else of the runs (batch size, ...)


@dataclass(frozen=True)
class CompareSetting:
    """One run of the comparison: a pruning method at one keep, or the unpruned reference."""

    method: str
    keep: int | None  # None for the unpruned reference

    @property
    def name(self) -> str:
        return REFERENCE if self.method == REFERENCE else f"{self.method}-k{self.keep}"

    @property
    def label(self) -> str:
        return setting_label(self.method, self.keep)


# ---------------------------------------------------------------------- arguments


def parse_list(text: str, flag: str, kind: type = str) -> tuple:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise JobError(f"{flag} is empty")
    try:
        return tuple(kind(s) for s in items)
    except ValueError:
        raise JobError(f"{flag} must be a comma list of {kind.__name__}s, got {text!r}") from None


def settings(cfg: CompareConfig) -> list[CompareSetting]:
    """The reference first, then each method x keep in the order given."""
    out = [CompareSetting(REFERENCE, None)]
    for m in dict.fromkeys(cfg.methods):
        if m != REFERENCE:
            out += [CompareSetting(m, k) for k in dict.fromkeys(cfg.keeps)]
    return out


def job_config(cfg: CompareConfig, s: CompareSetting) -> JobConfig:
    """The setting's job, resolved; raises JobError."""
    takes = get_method(s.method).params
    params = {k: v for k, v in cfg.method_params.items() if k in takes}
    return replace(cfg.job, input=cfg.input, model=cfg.model, method=s.method, keep=s.keep, rate=None,
                   method_params=params, limit=cfg.limit, overwrite=False,
                   output=posixpath.join(cfg.output, "runs", s.name)).resolved()


def check(cfg: CompareConfig) -> tuple[list[CompareSetting], list[str] | None]:
    """Everything that can be wrong before Ray starts. Returns the settings and the input's
    columns (None where they cannot be read without Ray)."""
    if "://" in cfg.output:
        raise JobError(f"--output must be a local directory (the report is written there), got {cfg.output}")
    if cfg.limit is None or cfg.limit < 1:
        raise JobError(f"--limit must be >= 1, got {cfg.limit}")
    if not cfg.gpu_hour_price > 0:
        raise JobError(f"--gpu-hour-price must be > 0, got {cfg.gpu_hour_price}")
    if not cfg.max_quality_drop >= 0:
        raise JobError(f"--max-quality-drop must be >= 0 (points), got {cfg.max_quality_drop}")
    for m in cfg.methods:
        try:
            get_method(m)
        except ValueError as e:
            raise JobError(f"--methods: {e}") from None
    for name in cfg.method_params:
        if not any(name in get_method(m).params for m in cfg.methods):
            raise JobError(f"--method-param {name}: no method of --methods ({', '.join(cfg.methods)}) takes it")
    for k in cfg.keeps:
        if isinstance(k, bool) or k < 1:  # a keep above a sample's image tokens applies all (the row says so)
            raise JobError(f"--keeps {k} is out of range: keep must be >= 1")
    chosen = settings(cfg)
    for s in chosen:
        job_config(cfg, s)  # each setting's configuration checks itself as it is made
    names = input_columns(cfg.input)
    resolve_columns(cfg, names)
    return chosen, names


def input_columns(uri: str) -> list[str] | None:
    """Column names of a Parquet input (file, directory or glob), read with pyarrow alone;
    None for other kinds of input (checked once the runs have them)."""
    try:
        fs, path = filesystem(uri)
        if any(c in path for c in "*?["):
            files = sorted(glob.glob(path)) if isinstance(fs, pafs.LocalFileSystem) else []
            return pq.read_schema(files[0]).names if files else None
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return pq.read_schema(path, filesystem=fs).names
        if info.type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(path))
            if {"state.json", "dataset_dict.json"} & {e.base_name for e in entries}:
                return None
            files = sorted(e.path for e in entries if e.base_name.endswith(".parquet"))
            return pq.read_schema(files[0], filesystem=fs).names if files else None
    except (OSError, pa.ArrowException, ValueError):
        return None
    return None


def resolve_columns(cfg: CompareConfig, names: list[str] | None) -> tuple[str | None, str | None]:
    """The answer and group columns: as given (which must exist), else the defaults where present."""
    chosen = []
    for flag, given, default in (("--answer-column", cfg.answer_column, DEFAULT_ANSWER_COLUMN),
                                 ("--group-column", cfg.group_column, DEFAULT_GROUP_COLUMN)):
        if given is not None and names is not None and given not in names:
            raise JobError(f"{flag} {given!r} is not a column of {cfg.input}; columns: {', '.join(names)}")
        chosen.append(given if given is not None else (default if names and default in names else None))
    return chosen[0], chosen[1]


# ---------------------------------------------------------------------- runs


def run_all(cfg: CompareConfig, chosen: list[CompareSetting], log=print) -> dict[str, str]:
    """Run every setting not finished yet; returns what happened to each ("reused", "ran")."""
    import ray

    what = {}
    for i, s in enumerate(chosen, 1):
        jc = job_config(cfg, s)
        diff = changed(Folder(jc.output), configuration(jc))
        summary = _read_json(Path(jc.output) / SUMMARY)
        if not diff and covers(summary, cfg.limit):
            log(f"[{i}/{len(chosen)}] {s.label}: reused ({summary['rows']} rows in {jc.output})")
            what[s.name] = "reused"
            continue
        if diff:
            log(f"[{i}/{len(chosen)}] {s.label}: configuration changed ({'; '.join(diff)}): starting over")
            jc = replace(jc, overwrite=True)
        if not ray.is_initialized():
            ray.init(logging_level="ERROR", log_to_driver=False)
        log(f"[{i}/{len(chosen)}] {s.label}: running the first {cfg.limit} rows ...")
        summary = job.run(jc)
        timing = Path(jc.output, TIMING)
        if summary["processed"] == summary["rows"] and summary["skipped"] == 0:  # one run did every row
            resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            timing.write_text(json.dumps({
                "job_rows_per_second": summary["rows_per_second"], "job_wall_seconds": summary["wall_seconds"],
                "rows": summary["rows"], "resources": resources}, indent=1))
        else:  # finished across several runs: no end-to-end figure
            timing.unlink(missing_ok=True)
        log(f"[{i}/{len(chosen)}] {s.label}: done, {summary['processed']} rows in {summary['wall_seconds']:.1f} s"
            + (f", {summary['errors']} error rows" if summary["errors"] else ""))
        what[s.name] = "ran"
    return what


def covers(summary: dict | None, limit: int) -> bool:
    """A summary is written when a run has done all of its first `limit` rows (fewer where the
    input has fewer); one from a run with at least this limit needs no rerun."""
    if not summary or "limit" not in summary:
        return False
    done = summary["limit"]
    return done is None or done >= limit


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rows_of(cfg: CompareConfig, chosen: list[CompareSetting]) -> dict[str, list[dict]]:
    """Per setting, its rows for the same input rows: the first `limit` that every setting has."""
    tables = {s.name: read_rows(job_config(cfg, s)) for s in chosen}
    tables = {k: t.filter(pc.less(t.column(col.INPUT_ROW), cfg.limit)) for k, t in tables.items()}
    common = set.intersection(*(set(t.column(col.INPUT_ROW).to_pylist()) for t in tables.values()))
    return {k: sorted((r for r in t.to_pylist() if r[col.INPUT_ROW] in common), key=lambda r: r[col.INPUT_ROW])
            for k, t in tables.items()}


# ---------------------------------------------------------------------- metrics


def _pct(num: int, den: int) -> float | None:
    return 100 * num / den if den else None


def judged(rows: list[dict], ref: dict[int, str | None], answer: str | None) -> dict[int, bool]:
    """Per input row, whether its answer counts as right: against the ground truth where
    `answer` names a column (rows that have one), else against the reference's answer."""
    if answer is not None:
        return {r[col.INPUT_ROW]: answers_match(r[col.ANSWER], r[answer]) for r in rows if r.get(answer) is not None}
    return {r[col.INPUT_ROW]: answers_match(r[col.ANSWER], ref[r[col.INPUT_ROW]])
            for r in rows if r[col.INPUT_ROW] in ref}


def accuracy_and_agreement(rows: list[dict], ref: dict[int, str | None], answer: str | None) -> dict:
    """Accuracy (rows with a ground truth) and agreement with the reference (rows in both), in %."""
    agree = judged(rows, ref, None)
    right = judged(rows, ref, answer) if answer is not None else None
    return {"rows": len(rows), "accuracy_pct": _pct(sum(right.values()), len(right)) if right is not None else None,
            "agreement_pct": _pct(sum(agree.values()), len(agree))}


def paired_drop(ref_right: dict[int, bool], right: dict[int, bool]) -> tuple[float | None, float | None]:
    """The quality drop from the reference in points, over the rows both were judged on, and
    its standard error. Paired, because the same rows answered by both differ far less than
    two independent samples would: with b rows only the reference got right and c rows only
    the setting got right out of n, the per-row difference has mean (b - c) / n and standard
    error sqrt(b + c - (b - c)^2 / n) / n (McNemar's). A setting that changes many answers
    has a wide error even when its right and wrong answers cancel out in the mean."""
    shared = ref_right.keys() & right.keys()
    n = len(shared)
    if n == 0:
        return None, None
    b = sum(ref_right[i] and not right[i] for i in shared)
    c = sum(right[i] and not ref_right[i] for i in shared)
    return 100 * (b - c) / n, 100 * math.sqrt(max(0.0, b + c - (b - c) ** 2 / n)) / n


def metrics(cfg: CompareConfig, chosen: list[CompareSetting], answer: str | None, group: str | None) -> list[dict]:
    """One dict per setting, every figure from the per-row outputs (and the stored job timing)."""
    by_setting = rows_of(cfg, chosen)
    ref = {r[col.INPUT_ROW]: r[col.ANSWER] for r in by_setting[REFERENCE]}
    ref_right = judged(by_setting[REFERENCE], ref, answer)
    results = []
    for s in chosen:
        rows = by_setting[s.name]
        ok = [r for r in rows if r[col.ERROR] is None]
        counted = [r for r in ok if r[col.FLOPS_TOTAL] is not None]
        paper = sum(r[col.PAPER_PREFILL_FLOPS] for r in ok)
        paper_full = sum(r[col.PAPER_PREFILL_FLOPS_UNPRUNED] for r in ok)
        seconds = sum(r[col.SECONDS] for r in rows)
        timing = _read_json(Path(job_config(cfg, s).output) / TIMING) or {}
        drop, se = paired_drop(ref_right, judged(rows, ref, answer))
        res = {"setting": s.name, "method": s.method, "keep": s.keep, **accuracy_and_agreement(rows, ref, answer),
               "quality_drop_points": drop, "quality_drop_se_points": se,
               "quality_drop_bound_points": drop + Z_ONE_SIDED_95 * se if drop is not None else None,
               "errors": len(rows) - len(ok),
               "image_tokens_kept_mean": _mean([r[col.IMAGE_TOKENS_KEPT] for r in ok]),
               "gflops_per_sample": _mean([r[col.FLOPS_TOTAL] / 1e9 for r in counted]),
               "flops_saved_pct": saved_pct(sum(r[col.FLOPS_TOTAL] for r in counted),
                                            sum(r[col.FLOPS_TOTAL_UNPRUNED] for r in counted)),
               "paper_prefill_gflops_per_sample": paper / 1e9 / len(ok) if ok else None,
               "paper_prefill_reduction_pct": saved_pct(paper, paper_full),
               "rows_per_second": len(rows) / seconds if seconds > 0 else None,
               "job_rows_per_second": timing.get("job_rows_per_second"),
               "job_wall_seconds": timing.get("job_wall_seconds"),
               "by_group": []}
        if group is not None:
            groups = sorted({str(r.get(group)) for r in rows})
            res["by_group"] = [
                {"group": g, **accuracy_and_agreement([r for r in rows if str(r.get(group)) == g], ref, answer)}
                for g in groups]
        results.append(res)
    base = results[0]
    for res in results:
        rps = res["rows_per_second"]
        res["speedup"] = rps / base["rows_per_second"] if rps and base["rows_per_second"] else None
        res["cost_per_million_rows"] = 1e6 / rps / 3600 * cfg.gpu_hour_price if rps else None
    rec = recommend(results, cfg.max_quality_drop)
    for res in results:
        res["recommended"] = res["setting"] == rec["setting"]
    return results


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def qualifies(res: dict, max_quality_drop: float) -> bool:
    """Is the drop within `max_quality_drop` points with its uncertainty counted: its one-sided
    95 % upper bound (drop + 1.645 standard errors) at most the allowed drop?"""
    bound = res["quality_drop_bound_points"]
    return bound is not None and bound <= max_quality_drop + 1e-9


def recommend(results: list[dict], max_quality_drop: float) -> dict:
    """Among the reference (results[0], always in) and the settings that qualify, the one with
    the fewest FLOPs per sample (own counting), then the higher agreement with the reference,
    then the name. Only figures that a rerun reproduces decide: never measured throughput."""
    eligible = [results[0]] + [r for r in results[1:] if qualifies(r, max_quality_drop)]

    def key(r: dict) -> tuple:
        gflops, agree = r["gflops_per_sample"], r["agreement_pct"]
        return (math.inf if gflops is None else gflops, math.inf if agree is None else -agree, r["setting"])

    return min(eligible, key=key)


# ---------------------------------------------------------------------- all of it


def compare(cfg: CompareConfig, log=None) -> dict:
    """Check, run what is missing, measure, report. Returns the recommendation and the paths."""
    log = log or (lambda msg: print(f"compare: {msg}", file=sys.stderr, flush=True))
    start = time.perf_counter()
    chosen, names = check(cfg)
    what = run_all(cfg, chosen, log)
    if names is None:  # not a Parquet input: the runs' rows carry the input's columns
        names = read_rows(job_config(cfg, chosen[0])).column_names
    answer, group = resolve_columns(cfg, names)
    results = metrics(cfg, chosen, answer, group)
    timing = _read_json(Path(job_config(cfg, chosen[0]).output) / TIMING) or {}  # the unpruned run's
    paths = write_report(results, cfg, answer, group, what, time.perf_counter() - start, timing.get("resources"))
    rec = next(r for r in results if r["recommended"])
    log(f"wrote {paths['report_md']}; recommended: {CompareSetting(rec['method'], rec['keep']).label}")
    return {"recommended": rec["setting"], "settings": len(chosen), "ran": sum(v == "ran" for v in what.values()),
            "wall_seconds": round(time.perf_counter() - start, 1), **{k: str(v) for k, v in paths.items()}}
