"""The network's limit: fetch every object under a prefix straight from the S3 server.

Parallel range GETs over keep-alive connections (what an S3 SDK's transfer manager
does), bytes discarded: no FUSE, no page cache. What the same run's s3fs scenarios
take against this is the cost of the client, not of the network.

Run: ``python -m bench.s3get URL BUCKET PREFIX [--connections N] [--range-size BYTES]``;
prints one JSON line ``{"objects": N, "bytes": B, "requests": R}``; exits 1 on a
failed request.
"""

import argparse
import http.client
import json
import queue
import sys
import threading
import urllib.parse
import xml.etree.ElementTree as ET

__all__ = ["list_objects", "main"]

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def list_objects(host: str, port: int, bucket: str, prefix: str) -> dict[str, int]:
    """Key to size of every object under *prefix* (ListObjectsV2, all pages)."""
    objects: dict[str, int] = {}
    token = ""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            conn.request("GET", f"/{bucket}?{urllib.parse.urlencode(query)}")
            reply = conn.getresponse()
            body = reply.read()
            if reply.status != 200:
                raise RuntimeError(f"listing {bucket}/{prefix}: HTTP {reply.status}")
            root = ET.fromstring(body)
            for item in root.iter(f"{_NS}Contents"):
                objects[item.findtext(f"{_NS}Key", "")] = int(item.findtext(f"{_NS}Size", "0"))
            token = root.findtext(f"{_NS}NextContinuationToken", "") or ""
            if root.findtext(f"{_NS}IsTruncated", "false") != "true" or not token:
                return objects
    finally:
        conn.close()


def _fetch(
    host: str,
    port: int,
    bucket: str,
    work: "queue.Queue[tuple[str, int, int] | None]",
    totals: list[int],
    lock: threading.Lock,
    failures: list[str],
) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        while (item := work.get()) is not None:
            key, offset, length = item
            conn.request(
                "GET",
                f"/{bucket}/{urllib.parse.quote(key)}",
                headers={"Range": f"bytes={offset}-{offset + length - 1}"},
            )
            reply = conn.getresponse()
            got = 0
            while piece := reply.read(1 << 20):
                got += len(piece)
            if reply.status not in (200, 206) or got != length:
                failures.append(f"{key} bytes {offset}+{length}: HTTP {reply.status}, got {got}")
            with lock:
                totals[0] += got
                totals[1] += 1
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3get", description=__doc__)
    parser.add_argument("url", help="the server, http://HOST:PORT")
    parser.add_argument("bucket")
    parser.add_argument("prefix")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--range-size", type=int, default=8 * 2**20)
    args = parser.parse_args(argv)
    parsed = urllib.parse.urlsplit(args.url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    objects = list_objects(host, port, args.bucket, args.prefix)
    work: queue.Queue[tuple[str, int, int] | None] = queue.Queue()
    for key, size in objects.items():  # key order: a model's shards in index order
        for offset in range(0, size, args.range_size):
            work.put((key, offset, min(args.range_size, size - offset)))
    for _ in range(args.connections):
        work.put(None)
    totals, lock, failures = [0, 0], threading.Lock(), []
    shared = (host, port, args.bucket, work, totals, lock, failures)
    threads = [threading.Thread(target=_fetch, args=shared) for _ in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"objects": len(objects), "bytes": totals[0], "requests": totals[1]}))
    for failure in failures[:5]:
        print(f"s3get: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
