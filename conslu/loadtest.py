"""A bounded load test of ``conslu serve`` on loopback: ``clients`` concurrent clients send audio to
``POST /v1/parse`` until ``requests`` answers (or ``seconds`` have passed), then it stops and
reports requests/s, p50/p95 latency, errors and the mean batch size the server decoded.

    python -m conslu.loadtest --model DIR [--clients 8] [--requests 24 | --seconds 20] [--audio FILES]

With ``--model`` it starts ``conslu serve`` on a free loopback port and stops it afterwards;
``--url`` points at a running server, which must be on this machine (loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

__all__ = ["run_load", "free_port", "main"]

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


async def run_load(url: str, bodies: Sequence[bytes], *, clients: int = 8, requests: int | None = 24,
                   seconds: float | None = None, timeout: float = 120.0) -> dict:
    """Send ``bodies`` (round robin) from ``clients`` concurrent clients; stop after ``requests``
    answers in all or after ``seconds``. Returns the figures (latencies in ms)."""
    import httpx

    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"{url}: the load test only talks to a server on this machine (loopback)")
    if requests is None and seconds is None:
        raise ValueError("give requests or seconds (the test must stop by itself)")
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []
    sent = 0
    t_end = None if seconds is None else time.perf_counter() + seconds

    def more() -> bool:
        nonlocal sent
        if requests is not None and sent >= requests:
            return False
        if t_end is not None and time.perf_counter() >= t_end:
            return False
        sent += 1
        return True

    async def client(k: int, http: httpx.AsyncClient) -> None:
        i = k
        while more():
            body = bodies[i % len(bodies)]
            i += clients
            t0 = time.perf_counter()
            try:
                r = await http.post(url.rstrip("/") + "/v1/parse", content=body)
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.status_code == 200:
                batch_sizes.append(int(r.json().get("batch_size", 1)))
            else:
                errors.append(f"{r.status_code}: {r.text[:200]}")

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout) as http:
        await asyncio.gather(*(client(k, http) for k in range(clients)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pct = (lambda q: lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] if lat else None)
    return {"clients": clients, "ok": len(batch_sizes), "errors": len(errors), "first_errors": errors[:3],
            "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2) if wall else None,
            "p50_ms": None if not lat else round(pct(0.5), 1), "p95_ms": None if not lat else round(pct(0.95), 1),
            "mean_batch_size": round(statistics.mean(batch_sizes), 2) if batch_sizes else None}


def free_port() -> int:
    """A free TCP port on the loopback address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, limit: float = 300.0) -> None:
    import httpx

    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"conslu serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url}: no answer from /health within {limit:g} s")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="start `conslu serve --model DIR` on a free loopback port for the test")
    where.add_argument("--url", help="a running server on this machine")
    p.add_argument("--audio", nargs="+", required=True, help="audio files to send (round robin)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=None, help="stop after this many answers (default 24)")
    p.add_argument("--seconds", type=float, default=None, help="or after this long")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.clients < 1:
        p.error(f"--clients must be >= 1, got {args.clients}")
    requests = args.requests if args.requests is not None or args.seconds is not None else 24
    bodies = [Path(a).read_bytes() for a in args.audio]
    proc = None
    url = args.url
    try:
        if args.model:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "conslu", "serve", "--model", args.model, "--port", str(port),
                   "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
            cmd += ["--device", args.device] if args.device else []
            proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            _wait_healthy(url, proc)
        res = asyncio.run(run_load(url, bodies, clients=args.clients, requests=requests, seconds=args.seconds))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    res.update({"model": args.model, "url": url, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                "cpu_count": os.cpu_count()})
    print(json.dumps(res, indent=1))
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
