"""Where the time of each end-to-end run went: the warm-up's order against the ranks'.

``python -m bench.e2e_timeline RAW.json [--storage s3fs] [--mode MODE]`` reads a raw
e2e payload (``raw/e2e-latest.json``) and prints, per run: when the sidecar's process
logged it was serving, planned and opened ``/startz`` (seconds from t0, the pod's
start); when the server's ranks began reading; and per shard, in load order, when the
storage had first sent all its bytes (the S3 server's GET log) and when the last rank finished
copying it. ``lag`` is the second minus the first: how long after a shard had arrived
the server was done with it. A load that runs behind the warm-up shows a small, even
lag; a load that starts after the warm-up has ended shows the whole load after the last
byte.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "shard_rows", "startup_events"]


def startup_events(record: dict[str, Any]) -> dict[str, float]:
    """The sidecar's first ``serving``, ``planned`` and ``start`` log events, from t0.

    :param record: one e2e record (a sidecar mode's).
    :return: event name to seconds from t0 (absent events left out).
    """
    found: dict[str, float] = {}
    for name, at, _detail in record.get("serve_events", []):
        if name in ("serving", "planned", "start", "warmed", "ready"):
            found.setdefault(name, at)
    return found


def shard_rows(record: dict[str, Any]) -> list[tuple[str, float | None, float, float | None]]:
    """Per shard in load order: last byte fetched, last rank done, and the lag between.

    :param record: one e2e record with ``rank_shards`` (and ``fetch_end`` behind s3fs).
    :return: ``(shard, fetched_s or None, done_s, lag_s or None)``.
    """
    done: dict[str, float] = {}
    for rank in record.get("rank_shards", []):
        for name, at in rank:
            done[name] = max(done.get(name, 0.0), at)
    fetched: dict[str, float] = record.get("fetch_end", {})
    rows = []
    for name, at in done.items():
        end = fetched.get(name)
        rows.append((name, end, at, None if end is None else at - end))
    return rows


def half_fetched(record: dict[str, Any]) -> dict[str, float]:
    """When half of each shard had arrived (seconds from t0), if logged.

    :param record: one e2e record.
    :return: shard name to seconds.
    """
    found: dict[str, float] = record.get("fetch_half", {})
    return found


def _describe(record: dict[str, Any]) -> list[str]:
    head = (
        f"{record['storage']} {record['mode']} rep {record['rep']}: loaded "
        f"{record.get('loaded_s', float('nan')):.1f} s, first read "
        f"{record.get('first_read_s', float('nan')):.1f} s"
    )
    if "gate_s" in record:
        head += f", gate {record['gate_s']:.2f} s"
    if "last_byte_s" in record:
        head += f", last byte {record['last_byte_s']:.1f} s"
        if record.get("last_get_s", 0.0) > record["last_byte_s"] + 0.5:
            head += f" (refetches until {record['last_get_s']:.1f} s)"
    if record.get("fetched_bytes"):
        head += f", fetched {record['fetched_bytes'] / record['bytes']:.2f} x"
    if "warmup_s" in record:
        head += f", warm-up done {record['warmup_s']:.1f} s"
    head += (
        f"; CPU: ranks {record.get('ranks_cpu_s', 0.0):.0f} s, machine "
        f"{record.get('machine_cpu_s', 0.0):.0f} s of {record.get('wall_s', 0.0):.0f} s wall; "
        f"load {record.get('load_avg', [0.0])[0]:.1f}"
    )
    lines = [head]
    events = startup_events(record)
    if events:
        lines.append("  sidecar: " + ", ".join(f"{k} {v:.2f} s" for k, v in events.items()))
    half = half_fetched(record)
    for name, fetched, done, lag in shard_rows(record):
        short = name.split("-of-")[0]
        fetched_text = "-" if fetched is None else f"{fetched:6.1f}"
        lag_text = "-" if lag is None else f"{lag:+6.1f}"
        first = f"half {half[name]:6.1f}  " if name in half else ""
        lines.append(
            f"  {short}: {first}fetched {fetched_text}  loaded {done:6.1f}  lag {lag_text}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print the timelines of the runs in a raw e2e payload.

    :param argv: command line, without the program name.
    :return: 0, or 2 when the file is not an e2e payload.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.e2e_timeline", description=__doc__)
    parser.add_argument("raw", type=Path, help="raw/e2e-*.json")
    parser.add_argument("--storage", help="only this storage")
    parser.add_argument("--mode", help="only this mode")
    args = parser.parse_args(argv)
    payload = json.loads(args.raw.read_text())
    if payload.get("kind") != "e2e":
        print(f"e2e_timeline: {args.raw} is not an e2e payload", file=sys.stderr)
        return 2
    gates: dict[str, list[dict[str, float]]] = {}
    for record in payload["records"]:
        if args.storage and record["storage"] != args.storage:
            continue
        if args.mode and record["mode"] != args.mode:
            continue
        if not record.get("ok"):
            continue
        print("\n".join(_describe(record)))
        if record.get("serve_events") and "gate_s" in record:
            gates.setdefault(record["storage"], []).append(
                startup_events(record) | {"gate": record["gate_s"]}
            )
    for storage, found in gates.items():
        print(f"\n{storage}: sidecar start-up, median over {len(found)} runs (s from t0):")
        for name in ("serving", "planned", "start", "gate"):
            values = [f[name] for f in found if name in f]
            if values:
                middle, low, high = statistics.median(values), min(values), max(values)
                print(f"  {name}: {middle:.2f} ({low:.2f}-{high:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
