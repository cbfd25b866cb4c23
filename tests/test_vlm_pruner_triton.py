"""VLM-Pruner's Triton backend (`pruner.methods.vlm_pruner_triton`) keeps the torch backend's
tokens, and reads the host a constant number of times a call.

Triton's interpreter runs the kernel on CPU tensors but is switched on by TRITON_INTERPRET=1
before triton is imported, so the kernel runs in subprocesses: this file as a script, which
saves the Triton results of every case for the tests here to compare with the torch path, and
pytest on the known-answer tests with the Triton backend as the default. Nothing else in the
test session sees the interpreter.

Inputs avoid near-ties: two candidates whose scores agree to float rounding (near-copies
1e-3 apart) can go either way, since the kernel sums dot products in another order than
torch's matmul (as torch's own result flips when the channels are permuted).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pruner.methods import vlm_pruner

ROOT = Path(__file__).resolve().parents[1]


def _inputs(seed: int, kinds: str, n: int, dk: int = 16, d: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample a letter of `kinds`: r random; u uniform regions (half the tokens near-copies
    5 % apart: they fail tau for several rounds); f flat (every token the same: nothing passes
    until tau exceeds the buffered similarity, so the official mode stops at the pivots)."""
    g = torch.Generator().manual_seed(seed)
    keys, hidden = torch.randn(len(kinds), n, dk, generator=g), torch.randn(len(kinds), n, d, generator=g)
    for i, kind in enumerate(kinds):
        if kind == "u":
            hidden[i, : n // 2] = hidden[i, :1] + 0.05 * torch.randn(n // 2, d, generator=g)
        elif kind == "f":
            hidden[i] = 1.0
    return keys, hidden


# name: (grid, keep, params, sample kinds, extra); extra: d (hidden width), bf16, gpu_tiles
CASES = {
    "image": ((12, 12), 40, {}, "ru", {}),
    "image official": ((12, 12), 40, {"official": True}, "ru", {}),
    "llava-next tiles": ([(4, 4), (8, 8)], 20, {}, "ru", {}),
    "onevision tiles official": ([(5, 5), (6, 10)], 25, {"official": True}, "ur", {}),
    "video": ((3, 6, 6), 30, {"temporal_scale": 0.5}, "ru", {}),
    "video frames overlaid": ((2, 5, 5), 12, {"temporal_scale": 0.0}, "u", {}),
    "video far frames official": ((4, 4, 4), 20, {"temporal_scale": 3.0, "official": True}, "r", {}),
    "chunk 1": ((8, 8), 20, {"chunk": 1}, "ru", {}),
    "chunk 1 official": ((8, 8), 20, {"chunk": 1, "official": True}, "u", {}),
    "chunk 32": ((12, 12), 50, {"chunk": 32}, "ru", {}),
    "keep within the first chunk": ((10, 10), 7, {}, "r", {}),
    "lam 0": ((9, 9), 30, {"lam": 0.0}, "ru", {}),
    "lam 2": ((9, 9), 30, {"lam": 2.0}, "r", {}),
    "tau 0.2 official": ((10, 10), 30, {"tau": 0.2, "official": True}, "ru", {}),
    "tau below 0": ((8, 8), 16, {"tau": -0.25}, "r", {}),
    "tau 1.6": ((8, 8), 16, {"tau": 1.6}, "r", {}),
    "pivots 1": ((8, 8), 20, {"pivots": 1}, "ru", {}),
    "pivots 7 above keep": ((8, 8), 5, {"pivots": 7}, "r", {}),
    "pivots 7 above keep official": ((8, 8), 5, {"pivots": 7, "official": True}, "r", {}),
    "channels below D": ((8, 8), 20, {"channels": 16}, "ru", {}),
    "channels above D": ((8, 8), 20, {"channels": 256}, "r", {"d": 100}),
    "alpha": ((8, 8), 20, {"alpha": 0.9}, "r", {}),
    "keep N": ((6, 6), 36, {}, "r", {}),
    "keep above N": ((6, 6), 40, {"official": True}, "r", {}),
    "rounds end apart": ((12, 12), 80, {}, "ur", {}),
    "rounds end apart official": ((12, 12), 40, {"official": True}, "fur", {}),
    "bf16": ((8, 8), 16, {}, "ru", {"bf16": True}),
    "gpu tiles": ((12, 12), 40, {}, "ru", {"d": 100, "gpu_tiles": True}),
    "gpu tiles tiles and chunk 1": ([(4, 4), (9, 9)], 24, {"chunk": 1}, "u", {"gpu_tiles": True}),
}


def _case(name: str):
    grid, keep, params, kinds, extra = CASES[name]
    n = sum(h * w for h, w in grid) if isinstance(grid, list) else int(torch.tensor(grid).prod())
    keys, hidden = _inputs(list(CASES).index(name), kinds, n, d=extra.get("d", 48))
    if extra.get("bf16"):
        keys, hidden = keys.bfloat16(), hidden.bfloat16()
    return keys, hidden, grid, keep, params


def _interpreted(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)


@pytest.fixture(scope="module")
def on_triton(tmp_path_factory) -> dict:
    """Every case's selection on the Triton backend, from one interpreter subprocess."""
    out = tmp_path_factory.mktemp("triton") / "selections.pt"
    proc = _interpreted([__file__, str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_triton_keeps_the_torch_tokens(name, on_triton):
    keys, hidden, grid, keep, params = _case(name)
    want = vlm_pruner.select_batch(keys, hidden, grid, keep, backend="torch", **params)
    got = on_triton[name]
    assert len(got) == len(want)
    for (got_idx, got_merged), (want_idx, want_merged) in zip(got, want):
        assert torch.equal(got_idx, want_idx)
        assert got_merged.dtype == want_merged.dtype
        torch.testing.assert_close(got_merged, want_merged, rtol=1e-5, atol=1e-5)


class _Rounds(TorchFunctionMode):
    """Counts the torch path's rounds: each ranks the N tokens with one sort."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.count = n, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.Tensor.sort and args[0].shape[-1] == self.n
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
def test_the_mixed_batches_end_their_rounds_at_different_times(on_triton):
    """What the "rounds end apart" cases are for: in the official mode the flat sample stops
    at its pivots while the others fill up; in the exact-k mode the uniform sample needs four
    rounds and the random one one. (A flat sample in the exact-k mode is left out: its tokens
    tie exactly, so rounding picks among them.)"""
    assert [len(idx) for idx, _ in on_triton["rounds end apart official"]] == [4, 40, 40]
    keys, hidden, grid, keep, params = _case("rounds end apart")
    rounds = []
    for k, h in zip(keys, hidden):
        with _Rounds(len(h)) as counter:
            vlm_pruner.select(k, h, grid, keep, backend="torch", **params)
        rounds.append(counter.count)
    assert rounds == [4, 1]


@pytest.mark.slow
def test_known_answer_tests_pass_on_the_triton_backend():
    """tests/test_methods.py and tests/test_vlm_pruner_batch.py (against the sequential
    reference) with backend="triton" as the default. Left out: the largest grids with
    chunk 1, slow in the interpreter (the cases above cover chunk 1 on small grids), and the
    1e-3 near-copies case whose last token is decided by rounding (fp64 picks the kernel's)."""
    batch = "tests/test_vlm_pruner_batch.py::test_batch_equals_each_sample_alone_and_the_sequential_reference"
    slow = [f"{batch}[{u}-grid{g}-{k}-params{g}]" for u in ("False", "True") for g, k in ((0, 64), (1, 192))]
    slow += [f"tests/test_methods.py::test_default_mode_keeps_exactly_k[{s}]" for s in (0, 4, 6, 10)]
    args = ["-m", "pytest", "-q", "-p", "vlm_pruner_on_triton", "-p", "no:cacheprovider",
            "tests/test_methods.py", "tests/test_vlm_pruner_batch.py", "-k", "not dart and not divprune and not fastv"]
    for test in slow + [f"{batch}[True-grid3-62-params3]"]:
        args += ["--deselect", test]
    proc = _interpreted(args)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.slow
def test_the_gpu_selection_benchmark_runs_both_backends_here(model_dir, tmp_path):
    """`jobs/benchmark.py selection --backend torch,triton` with the tiny model (the GPU
    script's command, small): both backends side by side, the kernel's tokens equal the
    torch backend's, and the selection's share of a real pruned prefill for each."""
    out = tmp_path / "selection.json"
    proc = _interpreted(["jobs/benchmark.py", "selection", "--device", "cpu", "--n", "36", "--dim", "24",
                         "--keeps", "9", "--repeats", "1", "--batches", "1,2", "--backend", "torch,triton",
                         "--model", model_dir, "--share-keep", "9", "--share-repeats", "1", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["alone"] if r["method"].startswith("vlm")] == [
        "vlm-pruner backend=torch", "vlm-pruner backend=triton",
        "vlm-pruner chunk=1 backend=torch", "vlm-pruner chunk=1 backend=triton"]
    assert [(r["backend"], r["batch"], r["same"]) for r in report["batches"]] == [
        ("torch", 1, 1), ("triton", 1, 1), ("torch", 2, 2), ("triton", 2, 2)]
    assert [(r["backend"], r["batch"], r["keep"], r["image_tokens"]) for r in report["share"]] == [
        ("torch", 1, 9, 36), ("triton", 1, 9, 36), ("torch", 2, 9, 36), ("triton", 2, 9, 36)]
    assert all(0 < r["share"] < 1 and r["prefill_ms"] > r["selection_ms"] > 0 for r in report["share"])
    assert "| triton | 2 | 9 of 36 |" in proc.stdout


class _HostReads(TorchFunctionMode):
    """Counts the calls that bring a tensor's value to the host (a sync on a GPU)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grid, keep, params, reads", [
    ((24, 24), 64, {}, 0), ((24, 24), 400, {"chunk": 1}, 0), ((12, 12), 100, {"tau": -1.0}, 0),
    ((24, 24), 64, {"official": True}, 1), ((12, 12), 100, {"tau": -1.0, "official": True}, 1),
])
def test_triton_path_reads_the_host_a_constant_number_of_times(grid, keep, params, reads, monkeypatch):
    """None in the exact-k mode, once (the kept counts) in the official mode, whatever N, keep
    and the rounds; the torch path reads after every chunk. The kernel is replaced by a
    stand-in that selects the first `keep` tokens: what is counted is select_batch around it."""
    from pruner.methods import vlm_pruner_triton

    launches, names = [], vlm_pruner_triton._bss_kernel.arg_names

    class Kernel:
        def __getitem__(self, programs):
            def launch(*args, **kwargs):
                launches.append(programs)
                arg = dict(zip(names, args))
                order, keep = arg["order_ptr"], arg["keep"]
                order.fill_(order.shape[1])
                order[:, :keep] = torch.arange(keep, dtype=order.dtype)
            return launch

    monkeypatch.setattr(vlm_pruner_triton, "_bss_kernel", Kernel())
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the backend check only: the kernel does not run
    keys, hidden = _inputs(0, "ru", grid[0] * grid[1], d=300)
    with _HostReads() as triton_reads:
        got = vlm_pruner.select_batch(keys, hidden, grid, keep, backend="triton", **params)
    assert [len(idx) for idx, _ in got] == [keep, keep] and launches == [(2,)]
    assert triton_reads.count == reads
    with _HostReads() as torch_reads:
        vlm_pruner.select_batch(keys, hidden, grid, keep, backend="torch", **params)
    assert torch_reads.count > reads + 2


def test_auto_is_triton_on_cuda_and_torch_elsewhere(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert vlm_pruner._on_triton("auto", torch.device("cuda", 0))
    assert not vlm_pruner._on_triton("auto", torch.device("cpu"))
    assert not vlm_pruner._on_triton("torch", torch.device("cuda", 0))
    keys, hidden = _inputs(1, "r", 64)
    auto = vlm_pruner.select_batch(keys, hidden, (8, 8), 10)  # no interpreter here: torch ran
    assert torch.equal(auto[0][0], vlm_pruner.select_batch(keys, hidden, (8, 8), 10, backend="torch")[0][0])


@pytest.mark.parametrize("backend, env, message", [
    ("cuda", None, "backend must be one of 'auto', 'torch', 'triton', got 'cuda'"),
    ("triton", None, "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got cpu tensors"),
])
def test_bad_backend_fails_fast_with_one_line(backend, env, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    keys, hidden = _inputs(2, "r", 16)
    with pytest.raises(ValueError) as err:
        vlm_pruner.select_batch(keys, hidden, (4, 4), 99, backend=backend)  # checked even when keep >= N
    assert str(err.value) == message


def main(out: str) -> None:
    """Run every case on the Triton backend (under TRITON_INTERPRET=1) and save the results."""
    from pruner.methods import vlm_pruner_triton

    results = {}
    for name, (_, _, _, _, extra) in CASES.items():
        keys, hidden, grid, keep, params = _case(name)
        vlm_pruner_triton.WHOLE_TILES = not extra.get("gpu_tiles") and os.environ.get("TRITON_INTERPRET") == "1"
        results[name] = vlm_pruner.select_batch(keys, hidden, grid, keep, backend="triton", **params)
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
