"""Measurements that take too long for the test suite; the procedures are in
`pipeline.bench.runtime` (runtime, selection) and `pipeline.bench.job` (resume, pipeline).

    python jobs/benchmark.py runtime [--shape llava-1.5-7b --layers 4 | --model PATH] [--out DIR]
    python jobs/benchmark.py runtime --shape llava-video-7b --layers 4 --frames 32 --random-features \
        --methods vlm-pruner --rates 0.889 --batches 1 --new-tokens 0
    python jobs/benchmark.py runtime --methods vlm-pruner --keeps 64 --batches 8 --new-tokens 32 --compile on
    python jobs/benchmark.py selection [--n 576 --dim 4096 --keeps 192,128,64 --repeats 7 --batches 1,8,32]
    python jobs/benchmark.py selection --device cuda --backend torch,triton --shape llava-1.5-7b
    python jobs/benchmark.py compile --rows 400 --modes off,auto,on --repeats 3

`runtime` (the default when no subcommand is given): what pruning saves in the real runtime,
each method x budget against unpruned at each batch size, in interleaved rounds (a warm-up,
then `--repeats`; medians, spread = max - min): prefill and end-to-end seconds per sample and
speedups next to the FLOPs-predicted and the roofline-predicted ones (per phase, the larger of
FLOPs over a measured matmul rate and bytes over the measured copy bandwidth), the selection's
share of the pruned prefill, peak memory, KV-cache bytes, and VLM-Pruner's selection at chunk
16 vs 1 on the model's real layer K-1 signals; decode ms a step against its floor (the bytes
it reads over the bandwidth). `--compile on` measures every setting twice in the same
rounds, eager and compiled (the decode step; on CUDA also the prefill's layers after the
selection), and reports the compile seconds; `auto`: on where `PrunedVLM` compiles by default
(CUDA). The prepared GPU run is docs/gpu-run.sh. `--new-tokens 128` is the captioning case.
Prints Markdown; writes runtime.json + runtime.md under --out (folder or pyarrow
URI). `--shape S --layers L`: random weights at checkpoint S's widths, LLM cut to L layers, no
download. `--frames T`: random T-frame clips for images. `--random-features`: random tower
outputs for the tower (SigLIP on 32 frames is too slow on CPU); the timed prefill is unchanged.

`selection` times each method's token selection alone on random inputs shaped like
LLaVA-1.5-7B's layer-2 signals, and VLM-Pruner with chunk 16 vs chunk 1; then VLM-Pruner's
`select_batch` at each of `--batches`, ms per batch, on each `--backend` (comma-separated:
side by side in the same interleaved rounds, each checked against the torch backend's
tokens). With `--shape S` (random weights, `--layers` to cut the LLM) or `--model PATH`, also
VLM-Pruner's selection inside the real prefill at `--share-keep`: ms per batch, its share of
the pruned prefill, and the pruned prefill's speedup over the unpruned one. The prepared GPU
run (LLaVA-1.5-7B's widths, all 32 LLM layers, bf16; not yet run on a GPU):

    python jobs/benchmark.py selection --device cuda --backend torch,triton --shape llava-1.5-7b \
        --keeps 64 --json out/selection-gpu.json > out/selection-gpu.md

`compile` runs the caption job (demo data and model, VLM-Pruner keep 64) with each
`--compile` mode in turn, rounds of one cold-start run a mode: rows/s, wall seconds and the
model actor's compile seconds side by side, and each mode's rows/s over the first's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from pipeline.bench.job import (bench_compile, bench_pipeline, bench_read, bench_resume, load_model,  # noqa: E402
                                 scene_images, write_report)
from pipeline.bench import runtime as benchmark  # noqa: E402
from pruner.flops import SHAPES  # noqa: E402
from pipeline.bench.profiling import random_clips  # noqa: E402
from pruner.vlm import compiles  # noqa: E402


def run_runtime(args: argparse.Namespace) -> dict:
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda msg: None)
    start = time.perf_counter()
    model, processor, name = load_model(args.shape, args.layers, args.model, args.dtype, args.device, args.seed,
                                        args.random_features)
    log(f"model ready in {time.perf_counter() - start:.1f} s: {name}")
    methods, rates = benchmark.parse_methods(args.methods), [float(r) for r in (args.rates or "").split(",") if r]
    budgets = [(int(k), None) for k in (args.keeps or ("" if rates else "192,128,64")).split(",") if k]
    budgets += [(None, r) for r in rates]
    images = (lambda n: random_clips(n, args.frames, seed=args.seed)) if args.frames else scene_images
    settings = [benchmark.Setting("none")] + [benchmark.Setting(m, k, p, r) for m, p in methods for k, r in budgets]
    device = next(model.parameters()).device
    if args.new_tokens > 0 and compiles({"on": True, "off": False}.get(args.compile, "auto"), device):
        settings += [dataclasses.replace(s, compiled=True) for s in settings]  # side by side, same rounds
    report, text = benchmark.run(
        model, processor, name, images, target_rate=rates[0] if rates else None, settings=settings,
        batches=[int(b) for b in args.batches.split(",")], prune_layer=args.prune_layer, repeats=args.repeats,
        warmup=args.warmup, new_tokens=args.new_tokens, question_tokens=args.question_tokens,
        chunks=[int(c) for c in args.chunks.split(",") if c], selection_repeats=args.selection_repeats,
        target_keep=args.target_keep, log=log, started=start,
        save=(lambda report, text: write_report(args.out, report, text)) if args.out else None)
    print(text)
    return report


def run_selection(args: argparse.Namespace) -> None:
    from pruner.vlm import placement

    if args.layers is not None and not args.shape:
        raise SystemExit("--layers needs --shape")
    backends = tuple(b for b in args.backend.split(",") if b)
    if not backends or set(backends) - {"auto", "torch", "triton"}:
        raise SystemExit(f"--backend takes auto, torch or triton, comma-separated; got {args.backend!r}")
    device, dtype = placement(args.device, args.dtype and getattr(torch, args.dtype))
    keeps = [int(k) for k in args.keeps.split(",")]
    where = dict(device=device, dtype=dtype, backends=backends)
    rows = benchmark.bench_selection(args.n, args.dim, keeps, args.repeats, **where)
    batch_rows = benchmark.bench_selection_batches(args.n, args.dim, keeps, [int(b) for b in args.batches.split(",") if b],
                                                   args.repeats, **where)
    share_rows, name = [], ""
    if args.shape or args.model:
        model, processor, name = load_model(args.shape, args.layers, args.model, args.dtype, str(device), args.seed, False)
        share_rows = benchmark.selection_share(model, processor, scene_images, args.share_keep,
                                               [int(b) for b in args.batches.split(",") if b] or [1],
                                               backends=backends, repeats=args.share_repeats)
    label = "CPU" if device.type == "cpu" else f"{torch.cuda.get_device_name(device)}, {str(dtype).removeprefix('torch.')}"
    print(benchmark.selection_markdown(rows, args.n, args.dim, args.repeats, label, batch_rows, share_rows, name))
    if args.json:
        Path(args.json).write_text(json.dumps({"alone": rows, "batches": batch_rows, "share": share_rows}, indent=1))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    rt = sub.add_parser("runtime", help="measured speed, memory and selection overhead against the FLOPs limit")
    source = rt.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint path or name (default: the bundled demo model)")
    source.add_argument("--shape", choices=sorted(SHAPES), help="random weights at this checkpoint's widths")
    rt.add_argument("--layers", type=int, help="with --shape: LLM layers (default: the checkpoint's)")
    rt.add_argument("--methods", default="vlm-pruner,fastv,dart,divprune",
                    help="comma-separated; parameters after colons, e.g. vlm-pruner:chunk=1 (default: %(default)s)")
    rt.add_argument("--keeps", help="image tokens kept, comma-separated (default: 192,128,64 unless --rates)")
    rt.add_argument("--rates", help="pruning rates, e.g. 0.889 (kept = round(N * (1 - rate))); targets at the first")
    rt.add_argument("--frames", type=int, help="random clips of this many frames (384 px) in place of images")
    rt.add_argument("--random-features", action="store_true", help="random tower outputs in place of the tower")
    rt.add_argument("--batches", default="1,8")
    rt.add_argument("--prune-layer", type=int, default=2, help="K: in-LLM methods prune after layer K-1")
    rt.add_argument("--repeats", type=int, default=5, help="timed rounds (median and spread)")
    rt.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the first measures memory)")
    rt.add_argument("--new-tokens", type=int, default=16,
                    help="generated per sample (EOS ignored; 0: prefill only; 128: a caption)")
    rt.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="on: each setting also with the compiled decode step, side by side; auto: on on CUDA")
    rt.add_argument("--question-tokens", type=int, default=60, help="question length (LLaVA-1.5: ~646-token prompt)")
    rt.add_argument("--chunks", default="16,1", help="VLM-Pruner chunk sizes to compare ('' to skip)")
    rt.add_argument("--selection-repeats", type=int, default=7)
    rt.add_argument("--target-keep", type=int, default=64, help="keep the targets are checked at")
    rt.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on CUDA, fp32 on CPU")
    rt.add_argument("--device", help="default: cuda when available, else cpu")
    rt.add_argument("--seed", type=int, default=0)
    rt.add_argument("--out", help="write runtime.json and runtime.md here (folder or URI, e.g. s3://...)")
    rt.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    sel = sub.add_parser("selection", help="time token selection alone, per method and budget")
    sel.add_argument("--n", type=int, default=576, help="image tokens (a square grid)")
    sel.add_argument("--dim", type=int, default=4096, help="key and hidden width")
    sel.add_argument("--keeps", default="192,128,64")
    sel.add_argument("--repeats", type=int, default=7)
    sel.add_argument("--device", help="default: cuda when available, else cpu")
    sel.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on CUDA, fp32 on CPU")
    sel.add_argument("--backend", default="auto",
                     help="VLM-Pruner's backend(s), comma-separated: auto, torch, triton (default: %(default)s)")
    sel.add_argument("--batches", default="1,8,32", help="VLM-Pruner's select_batch at these batch sizes ('' to skip)")
    share = sel.add_mutually_exclusive_group()
    share.add_argument("--shape", choices=sorted(SHAPES), help="the share of the prefill, random weights at these widths")
    share.add_argument("--model", help="the share of the prefill on this checkpoint (path or name)")
    sel.add_argument("--layers", type=int, help="with --shape: LLM layers (default: the checkpoint's)")
    sel.add_argument("--share-keep", type=int, default=64, help="keep for the share of the prefill")
    sel.add_argument("--share-repeats", type=int, default=5, help="interleaved prefill rounds after a warm-up")
    sel.add_argument("--seed", type=int, default=0)
    sel.add_argument("--json", help="also write the rows here")

    rd = sub.add_parser("read", help="rows/s and driver memory of reading + decoding + numbering a corpus (no model)")
    rd.add_argument("--rows", type=int, default=100_000)
    rd.add_argument("--format", choices=["parquet", "webdataset"], default="parquet")
    rd.add_argument("--rows-per-file", type=int, default=10_000)
    rd.add_argument("--output", help="the corpus's folder, kept (default: a new temporary one); reused if not empty")
    res = sub.add_parser("resume", help="driver memory and seconds of resume + summary at N finished rows (no model)")
    res.add_argument("--rows", type=int, default=10_000_000)
    res.add_argument("--rows-per-file", type=int, default=65_536)
    res.add_argument("--output", help="folder for the synthetic output (default: a new temporary folder)")
    pipe = sub.add_parser("pipeline", help="the caption job's rows/s vs a plain PrunedVLM.generate loop (demo data)")
    pipe.add_argument("--rows", type=int, default=400)
    pipe.add_argument("--batch-size", type=int, default=8)
    pipe.add_argument("--max-new-tokens", type=int, default=32)
    pipe.add_argument("--output", default="out/bench-pipeline")
    pipe.add_argument("--threads-per-actor", type=int, help="default: the job's (the node's CPUs)")
    pipe.add_argument("--repeats", type=int, default=3, help="job runs, each between two loop runs")
    comp = sub.add_parser("compile", help="the caption job's rows/s with each --compile mode, side by side (demo data)")
    comp.add_argument("--modes", default="off,auto,on", help="--compile modes, comma-separated; ratios to the first")
    comp.add_argument("--rows", type=int, default=400)
    comp.add_argument("--batch-size", type=int, default=8)
    comp.add_argument("--max-new-tokens", type=int, default=32)
    comp.add_argument("--output", default="out/bench-compile")
    comp.add_argument("--repeats", type=int, default=3, help="rounds of one run a mode")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "runtime")  # runtime is the default mode
    args = parser().parse_args(argv)
    if args.what == "selection":
        run_selection(args)
    elif args.what == "read":
        print(json.dumps(bench_read(args.rows, args.format, args.rows_per_file, args.output), indent=1))
    elif args.what == "resume":
        print(json.dumps(bench_resume(args.rows, args.rows_per_file, args.output), indent=1))
    elif args.what == "compile":
        modes = [m for m in args.modes.split(",") if m]
        if not modes or set(modes) - {"auto", "on", "off"}:
            raise SystemExit(f"--modes takes auto, on and off, comma-separated; got {args.modes!r}")
        print(json.dumps(bench_compile(args.rows, args.batch_size, args.max_new_tokens, args.output, modes,
                                       args.repeats), indent=1))
    elif args.what == "pipeline":
        print(json.dumps(bench_pipeline(args.rows, args.batch_size, args.max_new_tokens, args.output,
                                        args.threads_per_actor, args.repeats), indent=1))
    else:
        if args.layers is not None and not args.shape:
            raise SystemExit("--layers needs --shape")
        if args.warmup < 1 or args.repeats < 1:
            raise SystemExit("--warmup and --repeats must be >= 1 (the warm-up measures memory)")
        run_runtime(args)


if __name__ == "__main__":
    main()
