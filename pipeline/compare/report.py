"""The comparison's report: Markdown and self-contained HTML tables, the recommendation in
words, the two plots and results.parquet, all rendered from the per-setting result dicts
that `pipeline.compare.sweep` measures (results[0] is the unpruned reference, keep None).

Rendering only: nothing here runs a setting or reads a run's rows.
"""
from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from .sweep import CompareConfig


def setting_label(method: str, keep: int | None) -> str:
    """How a setting is named for people: "unpruned" for the reference, else "<method> keep <keep>"."""
    return "unpruned" if keep is None else f"{method} keep {keep}"


def headline_quality(res: dict, answer: str | None) -> float | None:
    """The quality figure a setting is judged by: accuracy (%) where a ground-truth column is
    given, else agreement with unpruned (%)."""
    return res["accuracy_pct"] if answer is not None else res["agreement_pct"]


# (header, key, decimals or "sig": 4 significant digits); the report's main table
COLUMNS = [
    ("setting", "label", None),
    ("rows", "rows", 0),
    ("accuracy %", "accuracy_pct", 1),
    ("agreement w/ unpruned %", "agreement_pct", 1),
    ("drop (points)", "quality_drop_points", 1),
    ("drop, 95 % upper bound (points)", "quality_drop_bound_points", 1),
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
        label = setting_label(r["method"], r["keep"]) + (" **(recommended)**" if r["recommended"] else "")
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
        rows.append([setting_label(r["method"], r["keep"])] + [fmt(cells.get(g), 1) for g in groups])
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
    within = (f"within {cfg.max_quality_drop:g} points of unpruned with its uncertainty counted "
              f"(the drop's one-sided 95 % upper bound, on the same rows)")
    if r is base:
        text = (f"**Recommendation: unpruned.** No pruned setting with fewer FLOPs keeps {what} {within}: "
                f"unpruned {fmt(headline_quality(base, answer), 1)} %.")
        judged = [x for x in results[1:] if x["quality_drop_bound_points"] is not None]
        if judged:
            near = min(judged, key=lambda x: (x["quality_drop_bound_points"], x["setting"]))
            text += f" Closest: {setting_label(near['method'], near['keep'])}, {_quality(near, answer)}."
        return text
    return (f"**Recommendation: {setting_label(r['method'], r['keep'])}.** Of the settings whose {what} stays "
            f"{within}, it has the fewest FLOPs: {_quality(r, answer)} vs {fmt(headline_quality(base, answer), 1)} % "
            f"unpruned, {fmt(r['image_tokens_kept_mean'], 1)} image tokens kept, "
            f"{fmt(r['gflops_per_sample'], 'sig')} GFLOPs/sample "
            f"(own counting, {fmt(r['flops_saved_pct'], 1)} % saved; paper-convention prefill reduction "
            f"{fmt(r['paper_prefill_reduction_pct'], 1)} %), {fmt(r['rows_per_second'], 2)} rows/s "
            f"({fmt(r['speedup'], 2)}x unpruned), ${fmt(r['cost_per_million_rows'], 2)} per 1M rows "
            f"vs ${fmt(base['cost_per_million_rows'], 2)} unpruned.")


def _quality(r: dict, answer: str | None) -> str:
    """A setting's quality in words: accuracy beside agreement with unpruned, and the drop."""
    drop = f"drop {fmt(r['quality_drop_points'], 1)} points, upper bound {fmt(r['quality_drop_bound_points'], 1)}"
    agreement = f"agreement with unpruned {fmt(r['agreement_pct'], 1)} %"
    if answer is None:
        return f"{agreement} ({drop})"
    return f"accuracy {fmt(r['accuracy_pct'], 1)} % with {agreement} ({drop})"


def plots(results: list[dict], cfg: CompareConfig, answer: str | None, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results[0]
    pruned = [r for r in results if r["keep"] is not None]
    methods = list(dict.fromkeys(r["method"] for r in pruned))
    ylabel = f"accuracy vs {answer} (%)" if answer else "agreement with unpruned (%)"
    q0 = headline_quality(base, answer)

    fig, ax = plt.subplots(figsize=(7.5, 5))
    if q0 is not None:
        ax.axhspan(q0 - cfg.max_quality_drop, q0, color="0.9", label=f"within {cfg.max_quality_drop:g} points")
        ax.axhline(q0, color="0.4", ls=":", lw=1)
    ax.plot([base["gflops_per_sample"]], [q0], "k*", ms=14, label="unpruned")
    for m in methods:
        rs = sorted((r for r in pruned if r["method"] == m), key=lambda r: r["gflops_per_sample"] or 0)
        ax.plot([r["gflops_per_sample"] for r in rs], [headline_quality(r, answer) for r in rs], "o-", label=m)
        for r in rs:
            ax.annotate(f"{r['keep']}", (r["gflops_per_sample"], headline_quality(r, answer)),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    rec = next(r for r in results if r["recommended"])
    ax.plot([rec["gflops_per_sample"]], [headline_quality(rec, answer)], "o", ms=16, mfc="none", mec="red", mew=2,
            label="recommended")
    ax.set_xlabel("GFLOPs per sample (own counting: vision + prefill + decode)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"Quality vs compute ({base['rows']} rows; labels: image tokens kept)")
    quality_png = _save(fig, ax, out / "quality_vs_flops.png")

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
    speed_png = _save(fig, ax, out / "throughput_vs_keep.png")
    return [quality_png, speed_png]


def _save(fig, ax, path: Path) -> Path:
    """Grid, legend and layout as both plots have them; write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


NOTES = [  # how the figures are made, all from the per-row outputs in runs/<setting>/
    "accuracy: normalized exact match (VQA-style: lower case, no punctuation or articles, number words "
    "as digits) against the ground-truth column, over rows that have one; error rows count as wrong.",
    "agreement: the same match against the unpruned answer of the same row.",
    "drop: unpruned quality minus this setting's, in points, where quality is accuracy when a ground "
    "truth is given, else agreement; judged on the same rows in both (paired). Its standard error is "
    "McNemar's, sqrt(b + c - (b - c)^2 / n) / n, with b rows right only unpruned and c rows right only in "
    "this setting, out of n; the upper bound is drop + 1.645 standard errors (one-sided 95 %).",
    "recommendation: among unpruned and the settings whose upper bound is at most the allowed drop, the "
    "fewest GFLOPs/sample (own), then the higher agreement with unpruned, then the name. Measured rows/s "
    "and $ never decide it, so a rerun over the same rows recommends the same setting.",
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
                 what: dict[str, str], wall: float, resources: dict[str, float] | None = None) -> dict[str, Path]:
    """Write results.parquet, the plots, report.md and report.html into ``cfg.output``.

    ``what``: per setting name, "ran" or "reused" in this invocation; ``wall``: its seconds;
    ``resources``: the cluster the unpruned run had (CPU, GPU), where known."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(results, cfg, answer, out)
    pq.write_table(pa.Table.from_pylist(results), out / "results.parquet")

    head, rows = main_table(results, answer)
    ran = sum(v == "ran" for v in what.values())
    intro = [
        f"Input: `{cfg.input}`: {results[0]['rows']} rows, the first {cfg.limit} input rows that every setting "
        f"has answered (every figure is over these same rows); model: `{cfg.model or 'demo'}`; "
        f"prune layer K = {cfg.job.prune_layer}; max new tokens {cfg.job.max_new_tokens}; "
        f"batch size {cfg.job.batch_size}.",
        f"Quality: {f'accuracy against `{answer}`' if answer else 'agreement with unpruned (no ground-truth column)'}; "
        f"max quality drop {cfg.max_quality_drop:g} points (one row of {results[0]['rows']} is "
        f"{100 / max(results[0]['rows'], 1):.2g} points); price ${cfg.gpu_hour_price:g} per device hour.",
        f"This invocation: {ran} settings run, {len(what) - ran} reused, {wall:.0f} s wall"
        + ("; the unpruned run's cluster: " + ", ".join(f"{v:g} {k}" for k, v in resources.items())
           + "." if resources else "."),
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


