"""Objects and S3 requests per image of a real batch job, through a counting proxy.

    python benchmarks/objects_per_image.py [--images 8] [--size camera2] [--bundle B]
        [--slowdown-every N] [--ome-zarr | --ome-zarr-image] [-- extra job flags]

Starts the project's throwaway SeaweedFS (``ray_jobs.local_s3.LocalS3``) with a small
reverse proxy in front of its S3 port on 127.0.0.1 (threaded ``http.server``: every request
forwarded unchanged, bodies streamed, counted by method and by output subfolder), uploads N
synthetic camera-size images (``segpc.io.synthetic``) under ``s3://bench/in`` straight to
the server (not counted), runs the batch job in-process (``ray_jobs.segment.main``, default
flags: no --segpc-masks, no --overlays) with ``--s3-endpoint`` at the proxy, and prints:

* the objects the job left under its output prefix, per image, by kind (masks, parquet, other);
  ``--ome-zarr`` / ``--ome-zarr-image`` run the job so (masks.zarr as OME-Zarr groups) and
  check the mask objects against that layout's count instead of the compact one's 3;
* the requests it made, per image, by method (PUT, GET, HEAD, LIST, DELETE, POST) and by
  output subfolder (``input`` = reading the images; ``other`` = the bucket itself).

LIST is a GET with a listing query; DELETE counts S3's bulk delete (POST ?delete) as well as
single deletes. Every per-image figure is the job's total divided by N, so the job's fixed
requests (listing the input, the resume check, slides.parquet, the root group) weigh more
with few images.

``--slowdown-every N`` makes the proxy answer every Nth write (PUT/POST/DELETE) with S3's
``503 SlowDown`` instead of forwarding it: the job must still finish with every image.

Without ``--bundle`` a tiny bundle is trained first (about a minute on one CPU: its U-Net
sees a small synthetic archive for a few epochs, as the tests' bundle does), so the images
have cells and the label maps are not empty.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import slide_folders  # noqa: E402

METHODS = ("PUT", "GET", "HEAD", "LIST", "DELETE", "POST")
BUCKET, INPUT, OUTPUT = "bench", "in", "out"
# hop-by-hop headers, and Expect (not signed by SigV4: the proxy answers 100-continue itself)
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class CountingProxy(ThreadingHTTPServer):
    """Forwards every request to ``upstream`` (host, port) and counts it."""

    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], slowdown_every: int = 0):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream, self.slowdown_every = upstream, slowdown_every
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (method class, subfolder)
        self.statuses: Counter = Counter()
        self.writes = self.slowdowns = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.statuses.clear()
            self.writes = self.slowdowns = 0

    def count(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.requests[_classify(method, path)] += 1
            self.statuses[status] += 1

    def throttle(self, method: str) -> bool:
        """Whether this write gets a 503 SlowDown instead of being forwarded."""
        if not self.slowdown_every or method not in ("PUT", "POST", "DELETE"):
            return False
        with self.lock:
            self.writes += 1
            hit = self.writes % self.slowdown_every == 0
            self.slowdowns += hit
            return hit

    def __enter__(self) -> "CountingProxy":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def _classify(method: str, path: str) -> tuple[str, str]:
    """(PUT|GET|HEAD|LIST|DELETE|POST, subfolder) of an S3 request line."""
    parts = urlsplit(path)
    query = parse_qs(parts.query, keep_blank_values=True)
    bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
    if method == "GET" and not key and ("list-type" in query or "prefix" in query or "delimiter" in query):
        method, key = "LIST", query.get("prefix", [""])[0]
    elif method == "POST" and "delete" in query:
        method = "DELETE"
    if bucket != BUCKET or not key:
        return method, "other"
    top, _, rest = key.partition("/")
    if top == INPUT:
        return method, "input"
    if top == OUTPUT:
        return method, rest.split("/", 1)[0] or "(output root)"
    return method, "other"


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CountingProxy
    _conn: http.client.HTTPConnection | None = None

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        if self.server.throttle(self.command):
            self._stream_body(None)  # read, not forwarded
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOWDOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOWDOWN)
            self.server.count(self.command, self.path, 503)
            return
        if self._conn is None:
            self._conn = http.client.HTTPConnection(*self.server.upstream, timeout=300)
        body, sent = self._stream_body(self._conn)
        try:
            if not sent:
                raise ConnectionError("the server closed the connection while the body was sent")
            resp = self._conn.getresponse()
        except (ConnectionError, http.client.HTTPException, OSError):
            # a keep-alive connection the server had closed: once more on a fresh one
            self._conn.close()
            self._conn = http.client.HTTPConnection(*self.server.upstream, timeout=300)
            self._start(self._conn)
            self._conn.send(body)
            resp = self._conn.getresponse()
        self.server.count(self.command, self.path, resp.status)
        chunked = resp.chunked
        body_out = resp.read() if chunked else None  # listings come chunked: small, sent whole
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP | {"transfer-encoding"} and not (chunked and k.lower() == "content-length"):
                self.send_header(k, v)
        if chunked:
            self.send_header("Content-Length", str(len(body_out)))
        self.end_headers()
        if body_out is not None:
            self.wfile.write(body_out)
        elif self.command != "HEAD":
            while piece := resp.read(1 << 16):
                self.wfile.write(piece)
        resp.read()  # leave the upstream connection clean for the next request

    def _start(self, conn: http.client.HTTPConnection) -> None:
        """The request line and headers, unchanged (Host included: it is signed)."""
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in self.headers.items():
            if k.lower() not in _HOP:
                conn.putheader(k, v)
        conn.endheaders()

    def _stream_body(self, conn: http.client.HTTPConnection | None) -> tuple[bytes, bool]:
        """Send the request line and headers upstream, then copy the body as it arrives
        (Content-Length or chunked framing). Returns the body (kept for one resend on a
        stale connection) and whether all of it reached the server."""
        kept, ok = bytearray(), conn is not None

        def relay(data: bytes) -> None:
            nonlocal ok
            kept.extend(data)
            if ok:
                try:
                    conn.send(data)
                except OSError:
                    ok = False

        if ok:
            try:
                self._start(conn)
            except OSError:
                ok = False
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline()
                relay(line)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        tail = self.rfile.readline()
                        relay(tail)
                        if tail in (b"\r\n", b"\n", b""):
                            return bytes(kept), ok
                relay(self.rfile.read(size + 2))  # the chunk and its CRLF
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            piece = self.rfile.read(min(left, 1 << 16))
            if not piece:
                break
            relay(piece)
            left -= len(piece)
        return bytes(kept), ok

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


# ----------------------------------------------------------------------------- the run


def quick_bundle(work: Path) -> str:
    """A tiny bundle whose U-Net has seen a small synthetic archive for a few epochs (as the
    tests' bundle): it finds nuclei at any size, the cytoplasm networks stay random."""
    import numpy as np
    import torch

    from segpc.config import preset
    from segpc.io.imaging import read_image
    from segpc.io.segpc_format import read_split
    from segpc.io.synthetic import write_archive
    from segpc.models.bundle import new_bundle, save_bundle
    from segpc.training.data import nucleus_arrays
    from segpc.training.steps import train_epoch

    out = work / "bundle"
    if (out / "bundle.json").exists():
        return str(out)
    torch.manual_seed(0)
    write_archive(work / "train", n_images=9, n_slides=3, seed=7, size="320x240")
    cfg = preset("tiny")
    cfg.nucleus.threshold = 0.35
    bundle = new_bundle(cfg, {"note": "objects_per_image benchmark bundle"})
    samples = list(read_split(work / "train"))
    for s in samples:
        s.image = read_image(s.image_path)
    arrays = nucleus_arrays(samples, cfg.nucleus.input_size)
    opt = torch.optim.Adam(bundle.nucleus.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(40):
        train_epoch(bundle.nucleus, opt, arrays, np.random.default_rng(epoch).permutation(len(arrays)), 4,
                    torch.device("cpu"), gen)
    save_bundle(bundle, str(out))
    return str(out)


def object_kind(key: str) -> str:
    sub = key.split("/", 1)[0]
    if sub == "masks.zarr":
        return "masks"
    if key.endswith(".parquet"):
        return "parquet"
    return "other"


def table(title: str, rows: list[tuple[str, Counter]], columns: list[str], n: int) -> str:
    """Rows of counts, per image (total / n), with a total column."""
    width = max([len(r[0]) for r in rows] + [len(title)])
    out = [f"{title:<{width}} " + " ".join(f"{c:>7}" for c in columns) + f" {'total':>7}"]
    for name, counts in rows:
        out.append(f"{name:<{width}} " + " ".join(f"{counts[c] / n:>7.2f}" for c in columns)
                   + f" {sum(counts[c] for c in columns) / n:>7.2f}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", default="camera2", help="WIDTHxHEIGHT, camera1, camera2 or mixed")
    p.add_argument("--bundle", default=None, help="a trained bundle (default: train a tiny one)")
    p.add_argument("--slowdown-every", type=int, default=0,
                   help="answer every Nth write with 503 SlowDown (0: never)")
    p.add_argument("--work", default=None, help="working folder (default: a temp folder)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--ome-zarr", action="store_true", help="run the job with --ome-zarr")
    p.add_argument("--ome-zarr-image", action="store_true", help="run the job with --ome-zarr-image")
    p.add_argument("job_args", nargs="*", help="extra flags for the job (after --)")
    args = p.parse_args()

    from ray_jobs.local_s3 import LocalS3
    from ray_jobs.segment import main as segment_main
    from segpc.io.storage import filesystem

    work = Path(args.work or tempfile.mkdtemp(prefix="segpc-objects-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bundle = args.bundle or quick_bundle(work)
    print(f"bundle: {bundle} ({time.time() - t0:.0f}s)", flush=True)
    _, folders = slide_folders(work, args.images, 2, seed=41, size=args.size)

    with LocalS3() as s3:
        os.environ.update(s3.env())
        fs, _ = filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        files = sorted(p for p in folders.rglob("*") if p.is_file())
        for path in files:
            fs.pipe_file(f"{BUCKET}/{INPUT}/{path.relative_to(folders).as_posix()}", path.read_bytes())
        n = len(files)
        host, port = s3.endpoint.removeprefix("http://").split(":")
        with CountingProxy((host, int(port)), args.slowdown_every) as proxy:
            print(f"SeaweedFS {s3.endpoint}, counting proxy {proxy.endpoint}; {n} image(s) {args.size}",
                  flush=True)
            t1 = time.time()
            status = segment_main(["--input", f"s3://{BUCKET}/{INPUT}", "--output", f"s3://{BUCKET}/{OUTPUT}",
                                   "--bundle", bundle, "--s3-endpoint", proxy.endpoint,
                                   "--progress-every", "1000", *args.job_args,
                                   *(["--ome-zarr"] if args.ome_zarr else []),
                                   *(["--ome-zarr-image"] if args.ome_zarr_image else [])])
            job_s = time.time() - t1
            requests, statuses, slowdowns = Counter(proxy.requests), Counter(proxy.statuses), proxy.slowdowns
        os.environ["AWS_ENDPOINT_URL"] = s3.endpoint  # the listing below, not counted
        fs.invalidate_cache()
        keys = [k.split(f"{BUCKET}/{OUTPUT}/", 1)[1] for k in fs.find(f"{BUCKET}/{OUTPUT}")]
        from segpc.io.outputs import read_table

        images = read_table(f"s3://{BUCKET}/{OUTPUT}", "images").to_pandas()

    print(f"\njob exit status {status}, {job_s:.1f}s; images/ rows: {len(images)} "
          f"({int((images.status == 'ok').sum())} ok), {int(images.n_cells.sum())} cells")
    objects = Counter(object_kind(k) for k in keys)
    by_sub = Counter(k.split("/", 1)[0] for k in keys)
    print(f"\nobjects under the output prefix: {len(keys)} ({len(keys) / n:.2f} per image)")
    print("  per image by kind:   " + ", ".join(f"{k} {objects[k] / n:.2f}" for k in ("masks", "parquet", "other")))
    print("  by subfolder (total): " + ", ".join(f"{k} {v}" for k, v in sorted(by_sub.items())))
    subs = sorted({s for _, s in requests})
    rows = [(s, Counter({m: c for (m, s2), c in requests.items() if s2 == s})) for s in subs]
    everything = Counter()
    for (m, _), c in requests.items():
        everything[m] += c
    outputs = Counter()
    for (m, s), c in requests.items():
        if s not in ("input", "other"):
            outputs[m] += c
    print(f"\nrequests per image ({sum(requests.values())} in all, {n} images):")
    print(table("subfolder", rows + [("outputs (all but input, other)", outputs), ("all", everything)],
                list(METHODS), n))
    masks_per_image, requests_per_image = objects["masks"] / n, sum(requests.values()) / n
    if args.ome_zarr or args.ome_zarr_image or "--ome-zarr" in args.job_args or "--ome-zarr-image" in args.job_args:
        print(f"\nOME-Zarr layout: {masks_per_image:.2f} mask objects per image (per image: 4 group zarr.json, "
              "2 objects per level and label image, 2 more per level with the image; the compact "
              "layout's target of 3 does not apply)")
    else:
        print(f"\ntargets: at most 3 mask objects per image: {'met' if masks_per_image <= 3 else 'MISSED'} "
              f"({masks_per_image:.2f}); at most 10 requests per image in all: "
              f"{'met' if requests_per_image <= 10 else 'MISSED'} ({requests_per_image:.2f})")
    print(f"response statuses: {dict(sorted(statuses.items()))}"
          + (f"; 503 SlowDown answered: {slowdowns}" if args.slowdown_every else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "images": n, "size": args.size, "status": status, "job_s": job_s,
            "objects": dict(objects), "objects_by_subfolder": dict(by_sub),
            "requests": {f"{m} {s}": c for (m, s), c in sorted(requests.items())},
            "statuses": {str(k): v for k, v in statuses.items()}, "slowdowns": slowdowns}, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
