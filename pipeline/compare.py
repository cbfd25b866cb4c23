"""Cost and quality of pruning methods and budgets on a sample, through the real job.

Every setting (unpruned once, then each method x keep) is one `pipeline.job.run` over the
first `limit` rows into `OUTPUT/runs/<setting>/`. A rerun reuses a setting whose stored run
covers those rows with the same configuration, extends one that covers fewer, and reruns
one whose configuration changed. Every figure of the report comes from the per-row outputs
of the same rows in every setting (the first `limit` input rows that all settings have):

* quality: accuracy against a ground-truth column (normalized exact match) and agreement
  with the unpruned answers (the same match), in %;
* cost: image tokens kept, FLOPs per sample (the project's own counting and the paper
  convention, both labelled), throughput of one model replica (rows over the rows' summed
  model-stage seconds), speedup over unpruned, and the projected price of 1M rows;
* the recommendation: the cheapest setting whose quality is within `max_quality_drop`
  points of unpruned.
"""
from __future__ import annotations

import base64
import glob
import html
import json
import math
import os
import posixpath
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pruner.flops import LLMShape, full_layers
from pruner.methods import METHODS, get_method

from . import job
from .config import JobConfig, JobError
from .demo import EVAL_PARQUET, MODEL_DIR
from .output import SUMMARY

DEFAULT_METHODS = ("vlm-pruner", "fastv", "dart", "divprune")
DEFAULT_KEEPS = (192, 128, 64)
DEFAULT_ANSWER_COLUMN = "answer_gt"  # used when the input has it and --answer-column is not given
DEFAULT_GROUP_COLUMN = "question_type"
REFERENCE = "none"
TIMING = "_compare.json"  # per setting: the end-to-end timing of the run that did all its rows


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
    job: JobConfig = field(default_factory=JobConfig)  # everything else of the runs (batch size, ...)


@dataclass(frozen=True)
class Setting:
    method: str
    keep: int | None  # None for the unpruned reference

    @property
    def name(self) -> str:
        return REFERENCE if self.method == REFERENCE else f"{self.method}-k{self.keep}"

    @property
    def label(self) -> str:
        return "unpruned" if self.method == REFERENCE else f"{self.method} keep {self.keep}"


# ---------------------------------------------------------------------- answers


_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # as the VQA evaluation maps them
_ARTICLES = {"a", "an", "the"}


def normalize(text: str | None) -> str | None:
    """VQA-style: lower-case, drop punctuation (apostrophes join, others separate; a decimal
    point or a thousands comma between digits stays meaningful), drop articles, number words
    to digits, single spaces."""
    if text is None:
        return None
    t = text.lower()
    t = re.sub(r"(?<=\d),(?=\d{3})", "", t)  # 1,000 -> 1000
    t = re.sub(r"['\u2019]", "", t)  # don't -> dont
    t = re.sub(r"(?!(?<=\d)\.(?=\d))[^\w\s]", " ", t)  # every other punctuation mark, but 2.5 stays
    words = [_NUMBERS.get(w, w) for w in t.replace("_", " ").split() if w not in _ARTICLES]
    return " ".join(words)


def matches(a: str | None, b: str | None) -> bool:
    """Normalized exact match; a missing answer matches nothing."""
    return a is not None and b is not None and normalize(a) == normalize(b)


# ---------------------------------------------------------------------- arguments


def parse_list(text: str, flag: str, kind: type = str) -> tuple:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise JobError(f"{flag} is empty")
    try:
        return tuple(kind(s) for s in items)
    except ValueError:
        raise JobError(f"{flag} must be a comma list of {kind.__name__}s, got {text!r}") from None


def settings(cfg: CompareConfig) -> list[Setting]:
    """The reference first, then each method x keep in the order given."""
    out = [Setting(REFERENCE, None)]
    for m in dict.fromkeys(cfg.methods):
        if m != REFERENCE:
            out += [Setting(m, k) for k in dict.fromkeys(cfg.keeps)]
    return out


def job_config(cfg: CompareConfig, s: Setting) -> JobConfig:
    return replace(cfg.job, input=cfg.input, model=cfg.model, method=s.method, keep=s.keep, rate=None,
                   limit=cfg.limit, overwrite=False, output=posixpath.join(cfg.output, "runs", s.name))


def check(cfg: CompareConfig) -> tuple[list[Setting], list[str] | None]:
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
        fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), os.path.abspath(uri))
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


def run_all(cfg: CompareConfig, chosen: list[Setting], log=print) -> dict[str, str]:
    """Run every setting not finished yet; returns what happened to each ("reused", "ran")."""
    import ray

    what = {}
    for i, s in enumerate(chosen, 1):
        jc = job_config(cfg, s)
        diff = job.changed(jc)
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


def rows_of(cfg: CompareConfig, chosen: list[Setting]) -> dict[str, list[dict]]:
    """Per setting, its rows for the same input rows: the first `limit` that every setting has."""
    tables = {s.name: job.read_rows(job_config(cfg, s)) for s in chosen}
    tables = {k: t.filter(pc.less(t.column("input_row"), cfg.limit)) for k, t in tables.items()}
    common = set.intersection(*(set(t.column("input_row").to_pylist()) for t in tables.values()))
    return {k: sorted((r for r in t.to_pylist() if r["input_row"] in common), key=lambda r: r["input_row"])
            for k, t in tables.items()}


# ---------------------------------------------------------------------- metrics


def _pct(num: int, den: int) -> float | None:
    return 100 * num / den if den else None


def quality(rows: list[dict], ref: dict[str, str | None], answer: str | None) -> dict:
    """Accuracy (rows with a ground truth) and agreement with the reference (rows in both), in %."""
    gt = [r for r in rows if answer is not None and r.get(answer) is not None]
    both = [r for r in rows if r["input_row"] in ref]
    return {
        "rows": len(rows),
        "accuracy_pct": _pct(sum(matches(r["answer"], r[answer]) for r in gt), len(gt)) if answer else None,
        "agreement_pct": _pct(sum(matches(r["answer"], ref[r["input_row"]]) for r in both), len(both)),
    }


def paper_prefill(config, stage: str, prune_layer: int, n: int, n_kept: int) -> int:
    """PAPER CONVENTION: LLM prefill, F(n) = 4nd^2 + 2n^2d + 2ndm per layer (pruner.flops)."""
    llm = LLMShape.of(config.get_text_config())
    return llm.paper_prefill(full_layers(stage, prune_layer, llm.layers), n, n_kept)


def metrics(cfg: CompareConfig, chosen: list[Setting], answer: str | None, group: str | None) -> list[dict]:
    """One dict per setting, every figure from the per-row outputs (and the stored job timing)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model or str(MODEL_DIR))
    k = cfg.job.prune_layer
    by_setting = rows_of(cfg, chosen)
    ref = {r["input_row"]: r["answer"] for r in by_setting[REFERENCE]}
    results = []
    for s in chosen:
        rows = by_setting[s.name]
        ok = [r for r in rows if r["error"] is None]
        counted = [r for r in ok if r["flops_total"] is not None]
        stage = METHODS[s.method].stage
        paper = sum(paper_prefill(config, stage, k, r["prompt_tokens"], r["prompt_tokens_kept"]) for r in ok)
        paper_full = sum(paper_prefill(config, "none", k, r["prompt_tokens"], r["prompt_tokens"]) for r in ok)
        seconds = sum(r["seconds"] for r in rows)
        timing = _read_json(Path(job_config(cfg, s).output) / TIMING) or {}
        res = {"setting": s.name, "method": s.method, "keep": s.keep, **quality(rows, ref, answer),
               "errors": len(rows) - len(ok),
               "image_tokens_kept_mean": _mean([r["image_tokens_kept"] for r in ok]),
               "gflops_per_sample": _mean([r["flops_total"] / 1e9 for r in counted]),
               "flops_saved_pct": (100 * (1 - sum(r["flops_total"] for r in counted)
                                          / sum(r["flops_total_unpruned"] for r in counted))) if counted else None,
               "paper_prefill_gflops_per_sample": paper / 1e9 / len(ok) if ok else None,
               "paper_prefill_reduction_pct": 100 * (1 - paper / paper_full) if paper_full else None,
               "rows_per_second": len(rows) / seconds if seconds > 0 else None,
               "job_rows_per_second": timing.get("job_rows_per_second"),
               "job_wall_seconds": timing.get("job_wall_seconds"),
               "by_group": []}
        if group is not None:
            groups = sorted({str(r.get(group)) for r in rows})
            res["by_group"] = [{"group": g, **quality([r for r in rows if str(r.get(group)) == g], ref, answer)}
                               for g in groups]
        results.append(res)
    base = results[0]
    for res in results:
        rps = res["rows_per_second"]
        res["speedup"] = rps / base["rows_per_second"] if rps and base["rows_per_second"] else None
        res["cost_per_million_rows"] = 1e6 / rps / 3600 * cfg.gpu_hour_price if rps else None
        q, q0 = _quality(res, answer), _quality(base, answer)
        res["quality_drop_points"] = q0 - q if q is not None and q0 is not None else None
    rec = recommend(results, cfg.max_quality_drop)
    for res in results:
        res["recommended"] = res["setting"] == rec["setting"]
    return results


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _quality(res: dict, answer: str | None) -> float | None:
    return res["accuracy_pct"] if answer is not None else res["agreement_pct"]


def recommend(results: list[dict], max_quality_drop: float) -> dict:
    """The cheapest (projected $/1M rows, then FLOPs) setting whose quality drop from the
    reference (results[0]) is at most `max_quality_drop` points; the reference always qualifies."""
    eligible = [r for r in results
                if r is results[0] or (r["quality_drop_points"] is not None
                                       and r["quality_drop_points"] <= max_quality_drop + 1e-9)]
    inf = float("inf")
    return min(eligible, key=lambda r: (r["cost_per_million_rows"] if r["cost_per_million_rows"] is not None else inf,
                                        r["gflops_per_sample"] if r["gflops_per_sample"] is not None else inf))


# ---------------------------------------------------------------------- report


# (header, key, decimals or "sig": 4 significant digits); the report's main table
COLUMNS = [
    ("setting", "label", None),
    ("rows", "rows", 0),
    ("accuracy %", "accuracy_pct", 1),
    ("drop (points)", "quality_drop_points", 1),
    ("agreement w/ unpruned %", "agreement_pct", 1),
    ("image tokens kept", "image_tokens_kept_mean", 1),
    ("GFLOPs/sample (own)", "gflops_per_sample", "sig"),
    ("FLOPs saved % (own)", "flops_saved_pct", 1),
    ("prefill GFLOPs/sample (paper conv.)", "paper_prefill_gflops_per_sample", "sig"),
    ("prefill reduction % (paper conv.)", "paper_prefill_reduction_pct", 1),
    ("rows/s", "rows_per_second", 2),
    ("speedup", "speedup", 2),
    ("$ per 1M rows", "cost_per_million_rows", 2),
    ("job rows/s (end to end)", "job_rows_per_second", 2),
]


def fmt(value, decimals: int | str | None) -> str:
    if value is None:
        return "n/a"
    if decimals is None:
        return str(value)
    if decimals == "sig":
        decimals = max(0, 3 - math.floor(math.log10(abs(value)))) if value else 0
    return f"{value:,.{decimals}f}"


def main_table(results: list[dict], answer: str | None) -> tuple[list[str], list[list[str]]]:
    cols = [c for c in COLUMNS if answer is not None or c[1] != "accuracy_pct"]
    rows = []
    for r in results:
        label = Setting(r["method"], r["keep"]).label + (" **(recommended)**" if r["recommended"] else "")
        rows.append([fmt({**r, "label": label}[key], d) for _, key, d in cols])
    return [c[0] for c in cols], rows


def group_table(results: list[dict], answer: str | None, group: str) -> tuple[list[str], list[list[str]]]:
    key = "accuracy_pct" if answer is not None else "agreement_pct"
    groups = [g["group"] for g in results[0]["by_group"]]
    counts = {g["group"]: g["rows"] for g in results[0]["by_group"]}
    head = ["setting"] + [f"{g} (n={counts[g]})" for g in groups]
    rows = []
    for r in results:
        cells = {g["group"]: g[key] for g in r["by_group"]}
        rows.append([Setting(r["method"], r["keep"]).label] + [fmt(cells.get(g), 1) for g in groups])
    return head, rows


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def html_table(head: list[str], rows: list[list[str]]) -> str:
    def cell(tag: str, text: str) -> str:
        bold = text.endswith(" **(recommended)**")
        text = html.escape(text.removesuffix(" **(recommended)**"))
        return f"<{tag}>{text}{' <b>(recommended)</b>' if bold else ''}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", h) for h in head) + "</tr>"]
    out += ["<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in rows]
    return "\n".join(out + ["</table>"])


def recommendation_text(results: list[dict], cfg: CompareConfig, answer: str | None) -> str:
    r = next(r for r in results if r["recommended"])
    base = results[0]
    what = f"accuracy against `{answer}`" if answer else "agreement with the unpruned answers"
    q, q0 = _quality(r, answer), _quality(base, answer)
    if r is base:
        return (f"**Recommendation: unpruned.** No pruned setting keeps {what} within "
                f"{cfg.max_quality_drop:g} points of unpruned ({fmt(q0, 1)} %) at a lower projected cost.")
    return (f"**Recommendation: {Setting(r['method'], r['keep']).label}.** It is the cheapest setting whose "
            f"{what} stays within {cfg.max_quality_drop:g} points of unpruned: {fmt(q, 1)} % vs {fmt(q0, 1)} % "
            f"(drop {fmt(r['quality_drop_points'], 1)} points), agreement with unpruned "
            f"{fmt(r['agreement_pct'], 1)} %, {fmt(r['image_tokens_kept_mean'], 1)} image tokens kept, "
            f"{fmt(r['gflops_per_sample'], 'sig')} GFLOPs/sample "
            f"(own counting, {fmt(r['flops_saved_pct'], 1)} % saved; paper-convention prefill reduction "
            f"{fmt(r['paper_prefill_reduction_pct'], 1)} %), {fmt(r['rows_per_second'], 2)} rows/s "
            f"({fmt(r['speedup'], 2)}x unpruned), ${fmt(r['cost_per_million_rows'], 2)} per 1M rows "
            f"vs ${fmt(base['cost_per_million_rows'], 2)} unpruned.")


def plots(results: list[dict], cfg: CompareConfig, answer: str | None, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results[0]
    pruned = [r for r in results if r["method"] != REFERENCE]
    methods = list(dict.fromkeys(r["method"] for r in pruned))
    ylabel = f"accuracy vs {answer} (%)" if answer else "agreement with unpruned (%)"
    q0 = _quality(base, answer)

    fig, ax = plt.subplots(figsize=(7.5, 5))
    if q0 is not None:
        ax.axhspan(q0 - cfg.max_quality_drop, q0, color="0.9", label=f"within {cfg.max_quality_drop:g} points")
        ax.axhline(q0, color="0.4", ls=":", lw=1)
    ax.plot([base["gflops_per_sample"]], [q0], "k*", ms=14, label="unpruned")
    for m in methods:
        rs = sorted((r for r in pruned if r["method"] == m), key=lambda r: r["gflops_per_sample"] or 0)
        ax.plot([r["gflops_per_sample"] for r in rs], [_quality(r, answer) for r in rs], "o-", label=m)
        for r in rs:
            ax.annotate(f"{r['keep']}", (r["gflops_per_sample"], _quality(r, answer)), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    rec = next(r for r in results if r["recommended"])
    ax.plot([rec["gflops_per_sample"]], [_quality(rec, answer)], "o", ms=16, mfc="none", mec="red", mew=2,
            label="recommended")
    ax.set_xlabel("GFLOPs per sample (own counting: vision + prefill + decode)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"Quality vs compute ({base['rows']} rows; labels: image tokens kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    quality_png = out / "quality_vs_flops.png"
    fig.savefig(quality_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 5))
    if base["rows_per_second"]:
        ax.axhline(base["rows_per_second"], color="k", ls="--", lw=1, label="unpruned")
    for m in methods:
        rs = sorted((r for r in pruned if r["method"] == m), key=lambda r: r["keep"])
        ax.plot([r["keep"] for r in rs], [r["rows_per_second"] for r in rs], "o-", label=m)
    ax.set_xticks(sorted({r["keep"] for r in pruned}))
    ax.set_xlabel("image tokens kept (keep)")
    ax.set_ylabel("rows/s of one model replica (model stage)")
    ax.set_title("Measured throughput vs budget")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    speed_png = out / "throughput_vs_keep.png"
    fig.savefig(speed_png, dpi=110)
    plt.close(fig)
    return [quality_png, speed_png]


NOTES = [  # how the figures are made, all from the per-row outputs in runs/<setting>/
    "accuracy: normalized exact match (VQA-style: lower case, no punctuation or articles, number words "
    "as digits) against the ground-truth column, over rows that have one; error rows count as wrong.",
    "agreement: the same match against the unpruned answer of the same row.",
    "drop: unpruned quality minus this setting's, in points, where quality is accuracy when a ground "
    "truth is given, else agreement.",
    "GFLOPs/sample (own): the rows' `flops_total` (vision tower + projector + LLM prefill + decode, 2 FLOPs "
    "per multiply-add of every matmul, `pruner.flops`); FLOPs saved against the same rows' `flops_total_unpruned`.",
    "paper convention: LLM prefill only, per layer F(n) = 4nd^2 + 2n^2d + 2ndm, layers before K on the whole "
    "prompt and the rest on the kept one; for comparison with published tables only.",
    "rows/s: rows over their summed model-stage seconds (the `seconds` column), i.e. one model replica's "
    "steady-state throughput on the hardware this ran on; speedup against unpruned; $ per 1M rows = "
    "1e6 / rows/s / 3600 x the price of one replica's device hour.",
    "job rows/s (end to end): rows over the wall time of the job that wrote them, including Ray and model "
    "start-up, which a small sample does not amortize; n/a where a setting was finished across several runs.",
]


def write_report(results: list[dict], cfg: CompareConfig, answer: str | None, group: str | None,
                 what: dict[str, str], wall: float) -> dict[str, Path]:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(results, cfg, answer, out)
    pq.write_table(pa.Table.from_pylist(results), out / "results.parquet")

    head, rows = main_table(results, answer)
    ran = sum(v == "ran" for v in what.values())
    timing = _read_json(Path(job_config(cfg, Setting(REFERENCE, None)).output) / TIMING) or {}
    intro = [
        f"Input: `{cfg.input}`: {results[0]['rows']} rows, the first {cfg.limit} input rows that every setting "
        f"has answered (every figure is over these same rows); model: `{cfg.model or 'demo'}`; "
        f"prune layer K = {cfg.job.prune_layer}; max new tokens {cfg.job.max_new_tokens}; "
        f"batch size {cfg.job.batch_size}.",
        f"Quality: {f'accuracy against `{answer}`' if answer else 'agreement with unpruned (no ground-truth column)'}; "
        f"max quality drop {cfg.max_quality_drop:g} points (one row of {results[0]['rows']} is "
        f"{100 / max(results[0]['rows'], 1):.2g} points); price ${cfg.gpu_hour_price:g} per device hour.",
        f"This invocation: {ran} settings run, {len(what) - ran} reused, {wall:.0f} s wall"
        + ("; the unpruned run's cluster: " + ", ".join(f"{v:g} {k}" for k, v in timing["resources"].items())
           + "." if timing.get("resources") else "."),
    ]
    sections_md = ["# Pruning cost and quality report", "\n\n".join(intro),
                   recommendation_text(results, cfg, answer), "## All settings", md_table(head, rows)]
    sections_html = ["<h1>Pruning cost and quality report</h1>", *(f"<p>{_inline(p)}</p>" for p in intro),
                     f"<p>{_inline(recommendation_text(results, cfg, answer))}</p>",
                     "<h2>All settings</h2>", html_table(head, rows)]
    if group is not None:
        gh, gr = group_table(results, answer, group)
        title = f"## {'Accuracy' if answer else 'Agreement with unpruned'} (%) by `{group}`"
        sections_md += [title, md_table(gh, gr)]
        sections_html += [f"<h2>{_inline(title[3:])}</h2>", html_table(gh, gr)]
    sections_md += ["## Plots"] + [f"![{p.stem}]({p.name})" for p in pngs]
    sections_md += ["## Notes", "How the figures are made, all from the per-row outputs in `runs/<setting>/`:\n"
                    + "\n".join(f"- {line}" for line in NOTES)]
    sections_html += ["<h2>Plots</h2>"] + [
        f'<p><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"></p>'
        for p in pngs]
    sections_html += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{_inline(line)}</li>" for line in NOTES) + "</ul>"]
    (out / "report.md").write_text("\n\n".join(sections_md) + "\n")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}")
    (out / "report.html").write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>Pruning report</title>"
                                     f"<style>{style}</style></head><body>\n" + "\n".join(sections_html)
                                     + "\n</body></html>\n")
    return {"report_md": out / "report.md", "report_html": out / "report.html", "results": out / "results.parquet",
            **{p.stem: p for p in pngs}}


def _inline(text: str) -> str:
    """The little markdown the report's prose uses (`code`, **bold**) as HTML."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


# ---------------------------------------------------------------------- all of it


def compare(cfg: CompareConfig, log=None) -> dict:
    """Check, run what is missing, measure, report. Returns the recommendation and the paths."""
    log = log or (lambda msg: print(f"compare: {msg}", file=sys.stderr, flush=True))
    start = time.perf_counter()
    chosen, names = check(cfg)
    what = run_all(cfg, chosen, log)
    if names is None:  # not a Parquet input: the runs' rows carry the input's columns
        names = job.read_rows(job_config(cfg, chosen[0])).column_names
    answer, group = resolve_columns(cfg, names)
    results = metrics(cfg, chosen, answer, group)
    paths = write_report(results, cfg, answer, group, what, time.perf_counter() - start)
    rec = next(r for r in results if r["recommended"])
    log(f"wrote {paths['report_md']}; recommended: {Setting(rec['method'], rec['keep']).label}")
    return {"recommended": rec["setting"], "settings": len(chosen), "ran": sum(v == "ran" for v in what.values()),
            "wall_seconds": round(time.perf_counter() - start, 1), **{k: str(v) for k, v in paths.items()}}
