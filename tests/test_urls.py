"""Image URLs: fetched in the CPU stage, concurrently, with bounded time and size; every
failure an error row naming the HTTP status or reason. A local HTTP server on 127.0.0.1
stands in for the web: good images, a 404, an HTML page, redirects, oversized and
truncated bodies, a flaky server, a trickling one and one that never answers."""
import argparse
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny
from tiny import png
from pipeline.config import JobConfig, JobError, add_job_arguments, job_kwargs
from pipeline.images import image_bytes
from pipeline.job import run
from pipeline.manifest import read_rows
from pipeline.schema import PREP_ERROR, PREPARED
from pipeline.stages import Preparer
from pipeline.urls import FetchError, MAX_REDIRECTS, fetch
from pipeline.videos import video_bytes
from pruner import Preprocessor, PrunedVLM

pytestmark = pytest.mark.timeout(120)
IMAGES = {i: png(tiny.image(i)) for i in range(4)}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def send(self, status: int, body: bytes = b"", content_type: str = "application/octet-stream",
             length: int | None = None, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        server = self.server
        with server.lock:
            server.hits[self.path] = server.hits.get(self.path, 0) + 1
            hits = server.hits[self.path]
        if m := re.fullmatch(r"/img/(\d+)\.png", self.path):
            self.send(200, IMAGES[int(m.group(1))], "image/png")
        elif m := re.fullmatch(r"/redirect/(\d+)", self.path):
            self.send(302, Location=f"/img/{m.group(1)}.png")
        elif self.path == "/loop":
            self.send(302, Location="/loop")
        elif self.path == "/page.html":
            self.send(200, b"<html><body>please log in</body></html>", "text/html")
        elif self.path == "/big-declared":
            self.send(200, b"", "image/png", length=100 << 20)  # refused from its header: nothing is sent
        elif self.path == "/big-streamed":  # no Content-Length: the body ends when the connection closes
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(IMAGES[0][:8] + bytes(1 << 16))
            except OSError:  # the client stopped reading
                pass
        elif self.path == "/truncated":
            self.send(200, IMAGES[0][:100], "image/png", length=len(IMAGES[0]))
        elif self.path.startswith("/flaky"):  # 503 twice, then the image
            self.send(503) if hits <= 2 else self.send(200, IMAGES[1], "image/png")
        elif self.path == "/drip":  # a byte at a time, each well within the timeout
            self.send_response(200)
            self.send_header("Content-Length", "10000")
            self.end_headers()
            for _ in range(10000):
                if server.stop.wait(0.05):
                    break
                self.wfile.write(b"x")
                self.wfile.flush()
        elif self.path.startswith("/hang"):
            server.stop.wait(60)  # reads the request, never answers
        else:
            self.send(404, b"not here", "text/plain")


@pytest.fixture(scope="module")
def web():
    """The server's base URL; `web.hits(path)` counts requests."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.hits, server.lock, server.stop = {}, threading.Lock(), threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    class Web(str):
        def hits(self, path: str) -> int:
            return server.hits.get(path, 0)

    yield Web(f"http://127.0.0.1:{server.server_address[1]}")
    server.stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def preprocessor(model_dir) -> Preprocessor:
    return Preprocessor.from_pretrained(model_dir)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url_table(cells: list, column=pa.string()) -> pa.Table:
    n = len(cells)
    return pa.table({"key": [f"k{i}" for i in range(n)], "image": pa.array(cells, column),
                     "question": [tiny.QUESTIONS[i % 5] for i in range(n)]})


def errors(preparer: Preparer, cells: list, column=pa.string()) -> list[str | None]:
    batch, _ = preparer.samples(url_table(cells, column))
    return batch.column(PREP_ERROR).to_pylist()


def preparer(model_dir: str, preprocessor: Preprocessor, **kw) -> Preparer:
    return tiny.preparer(model_dir, None, preprocessor, **kw)


# ---------------------------------------------------------------- in the CPU stage, without Ray


def test_urls_give_the_same_answers_as_the_same_images_given_as_bytes(web, model_dir):
    urls = [f"{web}/img/0.png", f"{web}/img/1.png", f"{web}/redirect/2", f"{web}/img/3.png"]
    by_url = url_table(urls)
    by_bytes = url_table([IMAGES[i] for i in range(4)], pa.binary())
    staged = {name: tiny.preparer(model_dir, None)(t)
              for name, t in (("url", by_url), ("bytes", by_bytes))}
    assert staged["url"].column(PREP_ERROR).to_pylist() == [None] * 4
    assert staged["url"].column(PREPARED).to_pylist() == staged["bytes"].column(PREPARED).to_pylist()
    answerer = tiny.answerer(model_dir, keep=8, max_new_tokens=4)
    answers = {name: answerer(t).to_pylist() for name, t in staged.items()}
    assert [r["error"] for r in answers["url"]] == [None] * 4
    for a, b in zip(answers["url"], answers["bytes"]):
        assert (a["id"], a["answer"], a["image_tokens_kept"]) == (b["id"], b["answer"], b["image_tokens_kept"])
    # and a datasets-style struct whose path is a URL
    struct = pa.array([{"bytes": None, "path": urls[0]}], tiny.IMAGE_STRUCT)
    struct_staged = tiny.preparer(model_dir, None)(url_table([None]).set_column(
        1, "image", struct))
    assert struct_staged.column(PREPARED).to_pylist() == staged["bytes"].column(PREPARED).to_pylist()[:1]


def test_each_failure_is_an_error_row_that_names_its_status_or_reason(web, model_dir, preprocessor):
    port = closed_port()
    cells = {
        "missing": (f"{web}/no/such.png", f"cannot fetch {web}/no/such.png: HTTP 404 Not Found"),
        "html": (f"{web}/page.html", f"not an image: unrecognised or corrupt header "
                                     f"(fetched from {web}/page.html, Content-Type text/html)"),
        "big": (f"{web}/big-declared", f"cannot fetch {web}/big-declared: body of 104,857,600 bytes "
                                       f"(Content-Length) is above the limit of 64 MiB"),
        "loop": (f"{web}/loop", f"cannot fetch {web}/loop: more than {MAX_REDIRECTS} redirects"),
        "refused": (f"http://127.0.0.1:{port}/a.png",
                    f"cannot fetch http://127.0.0.1:{port}/a.png: Connection refused (3 attempts)"),
        "tls": (f"{web.replace('http:', 'https:')}/tls", None),  # checked below: OpenSSL's words vary
        "flaky": (f"{web}/flaky/1", None),  # 503, 503, then the image: the default 2 retries cure it
        "good": (f"{web}/img/0.png", None),
    }
    got = dict(zip(cells, errors(preparer(model_dir, preprocessor), [url for url, _ in cells.values()])))
    assert got.pop("tls").startswith(f"cannot fetch {cells['tls'][0]}: TLS error: ")
    assert got == {name: message for name, (_, message) in cells.items() if name != "tls"}
    assert web.hits("/flaky/1") == 3 and web.hits("/no/such.png") == 1  # a 404 is not retried


def test_retries_and_their_backoff_are_bounded_by_the_flags(web, model_dir, preprocessor):
    start = time.perf_counter()
    got = errors(preparer(model_dir, preprocessor, fetch_retries=1), [f"{web}/flaky/2"])
    assert got == [f"cannot fetch {web}/flaky/2: HTTP 503 Service Unavailable (2 attempts)"]
    assert web.hits("/flaky/2") == 2 and time.perf_counter() - start >= 0.25  # one backoff
    got = errors(preparer(model_dir, preprocessor, fetch_retries=1), [f"{web}/truncated"])
    assert got == [f"cannot fetch {web}/truncated: body cut short: 100 bytes read, {len(IMAGES[0]) - 100} more "
                   f"expected (2 attempts)"]
    assert web.hits("/truncated") == 2


def test_a_server_that_never_answers_costs_the_timeout_times_the_attempts_for_a_whole_batch(
        web, model_dir, preprocessor):
    hangs = [f"{web}/hang/{i}" for i in range(8)]
    start = time.perf_counter()
    got = errors(preparer(model_dir, preprocessor, fetch_timeout=0.5, fetch_retries=1),
                 hangs + [f"{web}/img/0.png"])
    seconds = time.perf_counter() - start
    assert got == [f"cannot fetch {u}: timed out after 0.5 s (2 attempts)" for u in hangs] + [None]
    # 2 attempts of 0.5 s and a 0.25 s backoff, fetched at once (one after another: 8 x 1.25 s)
    assert 1.0 <= seconds < 2.5, seconds


def test_a_body_that_trickles_or_outgrows_the_byte_limit_is_cut_off(web):
    start = time.perf_counter()
    with pytest.raises(FetchError) as err:
        fetch(f"{web}/drip", timeout=0.5, retries=0)
    assert str(err.value) == f"cannot fetch {web}/drip: timed out after 0.5 s (1 attempt)"
    assert time.perf_counter() - start < 1.5
    with pytest.raises(FetchError) as err:  # no Content-Length: refused while streaming
        fetch(f"{web}/big-streamed", max_bytes=100_000)
    assert str(err.value) == f"cannot fetch {web}/big-streamed: body is above the limit of 100,000 bytes"
    assert fetch(f"{web}/big-streamed", max_bytes=8 << 20).data[:8] == IMAGES[0][:8]  # 4 MiB: within


def test_image_bytes_and_video_bytes_fetch_a_url_themselves(web):
    assert image_bytes(f"{web}/img/2.png") == IMAGES[2]
    assert image_bytes({"bytes": None, "path": f"{web}/redirect/3"}) == IMAGES[3]
    with pytest.raises(FetchError) as err:  # the message is the URL's, not rewritten for a video
        video_bytes(f"{web}/image/clip.mp4")
    assert str(err.value) == f"cannot fetch {web}/image/clip.mp4: HTTP 404 Not Found"


def test_the_fetch_flags_are_checked_and_do_not_decide_the_answers(model_dir):
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(JobError, match=r"^--fetch-timeout must be a number of seconds > 0, got "):
            JobConfig(model=model_dir, fetch_timeout=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(JobError, match=r"^--fetch-retries must be an int >= 0, got "):
            JobConfig(model=model_dir, fetch_retries=bad)
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    cfg = JobConfig(model=model_dir, **job_kwargs(parser.parse_args(["--fetch-timeout", "0.5",
                                                                     "--fetch-retries", "0"])))
    assert (cfg.fetch_timeout, cfg.fetch_retries) == (0.5, 0)
    assert cfg.answer_config() == JobConfig(model=model_dir).answer_config()  # a rerun may change them


# ---------------------------------------------------------------- the job, with Ray


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_job_answers_url_rows_and_keeps_one_row_per_input_row(local_ray, web, model_dir, tmp_path):
    urls = [f"{web}/img/0.png", f"{web}/no/such.png", f"{web}/hang/job", f"{web}/redirect/1"]
    pq.write_table(url_table(urls), tmp_path / "urls.parquet")
    cfg = JobConfig(model=model_dir, input=str(tmp_path / "urls.parquet"), output=str(tmp_path / "out"),
                    id_column="key", keep=8, max_new_tokens=4, fetch_timeout=0.5, fetch_retries=0)
    summary = run(cfg)
    got = {r["id"]: r for r in read_rows(cfg).to_pylist()}
    assert summary["rows"] == 4 and sorted(got) == ["k0", "k1", "k2", "k3"]
    assert got["k1"]["error"] == f"cannot fetch {urls[1]}: HTTP 404 Not Found"
    assert got["k2"]["error"] == f"cannot fetch {urls[2]}: timed out after 0.5 s (1 attempt)"  # the flags arrived
    vlm = PrunedVLM.from_pretrained(model_dir, method="vlm-pruner", keep=8)
    direct = vlm.generate([tiny.image(0), tiny.image(1)], [tiny.QUESTIONS[0], tiny.QUESTIONS[3]], max_new_tokens=4)
    for key, d in (("k0", direct[0]), ("k3", direct[1])):
        assert got[key]["error"] is None and got[key]["answer"] == d.text
