"""An endpoint pool against three emulators with their own quotas, measured from the servers' side
(``make bench-pool``).

The real pipeline (``pipeline.runner.run`` with ``[[endpoints]]``) captions a manifest of same-size rows
(so every request is charged the same) against emulators in quota mode (Azure's rules, see
bench/quota.py) with TPM 20,000 / 40,000 / 60,000 and 0.5 s latency, for ``--minutes``; the run then
gets the stop a SIGTERM gives. Scenarios:

1. steady: tokens charged for the requests each endpoint answered 200, per minute, from the end of the
   first window (10 s) on, against its quota and against the ceiling of a client keeping the 10-s rule
   at this request size, floor(TPM/6 ÷ charge) × charge × 6 (goal ≥ 97 % of the ceiling each); 429s
   over all requests (goal ≤ 1 %).
2. kill: the same, with the 40,000 emulator (a process of its own) SIGKILLed after ``--kill-after`` s: no
   row may fail; rows whose request was on the wire at it (an attempt no emulator logged) must reach
   another endpoint within 10 s of the kill.
3. 429: the same, with the 40,000 emulator answering every request 429 ``retry-after-ms: 30000`` for a
   minute from ``--kill-after`` s: no request may reach it during a hold (0.1 s after a 429, for
   requests already on their way, to 95 % of the 30 s); no row may fail.
4. shared: one emulator of 60,000 TPM and a second client sending 30 % of it steadily (a request every
   few seconds, whatever the answer, as another application's traffic would): our 429 share (goal ≤ 3 %)
   and the share of what the other client leaves under the ceiling that we use (goal ≥ 90 %).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import math
import os
import signal
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from chaos import DEPLOYMENT, EMULATOR_KEY, KEY_ENV, ChaosConfig, start_emulator, stop
from PIL import Image
from quota import WINDOW_S, make_manifest, print_goals

from pipeline.config import EmulatorConfig, RunConfig, config_from_mapping
from pipeline.emulator import Emulator, Fault, ReceivedRequest
from pipeline.runner import RunOptions, run
from pipeline.sink import read_output
from pipeline.summary import RunSummary

QUOTAS_TPM = (20_000, 40_000, 60_000)
NAMES = ("small", "medium", "large")
FAILING = 1  # the endpoint killed, or answering 429 for a minute
LATENCY_S = 0.5
MAX_TOKENS = 300
CONCURRENCY = 24
HOLD_429_MS = 30_000
CO_TENANT_SHARE = 0.3
ROWS = 3000
MOVED_WITHIN_S = 10.0


def pool_config(urls: Sequence[str], quotas: Sequence[int], names: Sequence[str] = NAMES) -> RunConfig:
    endpoints = [
        {
            "name": name,
            "provider": "azure",
            "url": url,
            "deployment": DEPLOYMENT,
            "api_key_env": KEY_ENV,
            "tokens_per_minute": tpm,
        }
        for name, url, tpm in zip(names, urls, quotas, strict=True)
    ]
    return config_from_mapping(
        {
            "endpoints": endpoints,
            "request": {"max_tokens": MAX_TOKENS},
            "limits": {"concurrency": CONCURRENCY},
        },
        source="bench/pool.py",
    )


def read_request_log(path: Path) -> list[ReceivedRequest]:
    """A standalone emulator's request log as the records an in-process one keeps."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            records.append(
                ReceivedRequest(
                    r["at"],
                    r["route"],
                    {},
                    None,
                    r["prompt_text"],
                    r["status"],
                    r["prompt_tokens"],
                    r["completion_tokens"],
                )
            )
    return records


@dataclass(frozen=True, slots=True)
class Served:
    name: str
    quota: int
    charge: int  # prompt tokens + max_tokens of one request
    per_min: float  # charged tokens of 200 answers per minute
    requests: int
    rejected: int  # 429s

    @property
    def ceiling(self) -> int:
        """The most a client keeping the 10-s rule can be served per minute at this request size."""
        return math.floor(self.quota / 6 / self.charge) * self.charge * 6 if self.charge else 0


def served(name: str, quota: int, requests: Sequence[ReceivedRequest], since: float, until: float) -> Served:
    seen = [r for r in requests if since <= r.at < until and r.prompt_text.startswith("Describe image")]
    answered = [r.prompt_tokens + MAX_TOKENS for r in seen if r.status == 200 and r.prompt_tokens is not None]
    charge = int(statistics.median(answered)) if answered else 0
    minutes = (until - since) / 60
    return Served(name, quota, charge, sum(answered) / minutes, len(seen), sum(r.status == 429 for r in seen))


def print_served(rows: Sequence[Served]) -> None:
    print(f"{'endpoint':>9} {'quota':>7} {'charge':>6} {'ceiling':>7} {'served/min':>10} {'/ceiling':>8} "
          f"{'/quota':>7} {'requests':>8} {'429s':>5}")  # fmt: skip
    for s in rows:
        print(
            f"{s.name:>9} {s.quota:>7} {s.charge:>6} {s.ceiling:>7} {s.per_min:>10.0f} "
            f"{s.per_min / s.ceiling if s.ceiling else 0:>8.1%} {s.per_min / s.quota:>7.1%} {s.requests:>8} "
            f"{s.rejected:>5}"
        )
    total = sum(s.requests for s in rows)
    print(
        f"429s: {sum(s.rejected for s in rows)} of {total} requests ({sum(s.rejected for s in rows) / max(1, total):.2%})"
    )


async def run_for(cfg: RunConfig, manifest: Path, output: Path, seconds: float) -> tuple[RunSummary, float]:
    """Run the pipeline for `seconds`, then stop it as a SIGTERM does; returns its summary and start."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    stopper = loop.call_later(seconds, os.kill, os.getpid(), signal.SIGTERM)
    try:
        summary = await run(cfg, RunOptions(manifest, output))
    finally:
        stopper.cancel()
    return summary, started


class Processes:
    """Standalone emulators (processes this script started), their URLs and request logs."""

    def __init__(self, work: Path, quotas: Sequence[int]) -> None:
        self.logs = [work / f"emulator-{n}.jsonl" for n in range(len(quotas))]
        self.procs, self.urls = [], []
        for n, tpm in enumerate(quotas):
            proc, url = start_emulator(
                ChaosConfig(latency_s=LATENCY_S, fault_rate=0.0, drop_rate=0.0, seed=n),
                self.logs[n],
                work / "emulator.err",
                ["--tpm", str(tpm)],
            )
            self.procs.append(proc)
            self.urls.append(url)

    def close(self) -> None:
        for proc in self.procs:
            stop(proc)

    def requests(self, n: int) -> list[ReceivedRequest]:
        return read_request_log(self.logs[n])


def committed_rows(output: Path) -> list[dict[str, Any]]:
    return read_output(
        output, columns=["id", "prompt", "status", "attempts", "endpoint", "started_at"]
    ).to_pylist()


def check_rows(rows: Sequence[dict[str, Any]], summary: RunSummary) -> bool:
    ids = [r["id"] for r in rows]
    print(
        f"rows: {len(rows)} committed, {summary.counts['error']} failed, each id once: {len(ids) == len(set(ids))}"
    )
    return len(ids) == len(set(ids)) and summary.counts["error"] == 0


async def steady(work: Path, manifest: Path, seconds: float) -> dict[str, bool]:
    print(f"\n1. steady: TPM {QUOTAS_TPM}, {seconds / 60:g} min, latency {LATENCY_S} s", flush=True)
    (work / "steady").mkdir()
    procs = Processes(work / "steady", QUOTAS_TPM)
    try:
        summary, started = await run_for(
            pool_config(procs.urls, QUOTAS_TPM), manifest, work / "steady-out", seconds
        )
    finally:
        procs.close()
    rows = [
        served(NAMES[n], QUOTAS_TPM[n], procs.requests(n), started + WINDOW_S, started + seconds)
        for n in range(3)
    ]
    print_served(rows)
    is_ok = check_rows(committed_rows(work / "steady-out"), summary)
    total = sum(s.requests for s in rows)
    return {
        "steady: each endpoint >= 97 % of its ceiling": all(s.per_min >= 0.97 * s.ceiling for s in rows),
        "steady: 429s <= 1 %": sum(s.rejected for s in rows) <= 0.01 * total,
        "steady: no row failed, each once": is_ok,
    }


async def kill(work: Path, manifest: Path, seconds: float, kill_after_s: float) -> dict[str, bool]:
    print(f"\n2. kill: as 1, {NAMES[FAILING]} SIGKILLed after {kill_after_s:g} s", flush=True)
    (work / "kill").mkdir()
    procs = Processes(work / "kill", QUOTAS_TPM)
    killed_at: list[float] = []  # monotonic (the emulators' loop time too), then epoch (rows' started_at)

    def kill_now() -> None:
        killed_at.extend((time.monotonic(), time.time()))
        procs.procs[FAILING].kill()

    killer = asyncio.get_running_loop().call_later(kill_after_s, kill_now)
    try:
        summary, started = await run_for(
            pool_config(procs.urls, QUOTAS_TPM), manifest, work / "kill-out", seconds
        )
    finally:
        killer.cancel()
        procs.close()
    logs = [procs.requests(n) for n in range(3)]
    rows = committed_rows(work / "kill-out")
    logged = Counter(r.prompt_text for log in logs for r in log)
    # started before the kill, with an attempt no emulator answered: on the wire at (or queued for) the
    # killed one; rows started later that tried it (its breaker's probes) are not counted
    on_the_wire = [
        r for r in rows if r["attempts"] > logged[r["prompt"]] and r["started_at"].timestamp() < killed_at[1]
    ]
    moved_s = []
    for row in on_the_wire:
        later = [
            r.at for n in (0, 2) for r in logs[n] if r.prompt_text == row["prompt"] and r.at >= killed_at[0]
        ]
        moved_s.append(min(later) - killed_at[0] if later else math.inf)
    print(f"rows on the wire at the kill: {len(on_the_wire)}; re-sent elsewhere after "
          f"{', '.join(f'{s:.2f}' for s in sorted(moved_s)) or '-'} s")  # fmt: skip
    print_served(
        [served(NAMES[n], QUOTAS_TPM[n], logs[n], started + WINDOW_S, started + seconds) for n in (0, 2)]
    )
    print(f"stats: {json.dumps(summary.endpoints[NAMES[FAILING]])}")
    return {
        "kill: no row failed, each once": check_rows(rows, summary),
        f"kill: rows on the wire re-sent elsewhere within {MOVED_WITHIN_S:g} s": all(
            s <= MOVED_WITHIN_S for s in moved_s
        ),
    }


async def refusing(work: Path, manifest: Path, seconds: float, from_s: float) -> dict[str, bool]:
    print(
        f"\n3. 429: as 1, {NAMES[FAILING]} answering 429 retry-after-ms {HOLD_429_MS} from {from_s:g} s for 60 s"
    )
    emulators = [
        Emulator(
            EmulatorConfig(latency_s=LATENCY_S, tokens_per_minute=tpm, seed=n),
            api_key=EMULATOR_KEY,
            deployment=DEPLOYMENT,
            keep_bodies=False,
        )
        for n, tpm in enumerate(QUOTAS_TPM)
    ]
    for emulator in emulators:
        await emulator.start()
    failing = emulators[FAILING]
    loop = asyncio.get_running_loop()
    refusals = [Fault(status=429, headers={"retry-after-ms": str(HOLD_429_MS)})] * 1000
    timers = [
        loop.call_later(from_s, failing.script, *refusals),
        loop.call_later(from_s + 60, failing.clear_script),
    ]
    try:
        cfg = pool_config([e.url for e in emulators], QUOTAS_TPM)
        summary, started = await run_for(cfg, manifest, work / "refusing-out", seconds)
    finally:
        for timer in timers:
            timer.cancel()
        for emulator in emulators:
            await emulator.stop()
    refused_at = [r.at for r in failing.requests if r.status == 429]
    hold_s = HOLD_429_MS / 1000
    during = [r for r in failing.requests if any(t + 0.1 < r.at < t + 0.95 * hold_s for t in refused_at)]
    print(f"429s at {NAMES[FAILING]}: {len(refused_at)} at "
          f"{', '.join(f'{t - started:.1f}' for t in refused_at[:12])} s; requests during its holds: {len(during)}")  # fmt: skip
    print_served(
        [
            served(NAMES[n], QUOTAS_TPM[n], emulators[n].requests, started + WINDOW_S, started + seconds)
            for n in range(3)
        ]
    )
    print(f"stats: {json.dumps(summary.endpoints[NAMES[FAILING]])}, paused_s {summary.paused_s}")
    return {
        "429: no request reached it during its holds": not during and bool(refused_at),
        "429: no row failed, each once": check_rows(committed_rows(work / "refusing-out"), summary),
    }


async def send_steadily(url: str, per_min: float, stopping: asyncio.Event) -> None:
    """Another client of the deployment: one same-size request every 60/per_min seconds, whatever the
    answer (a steady load that does not adapt, as another application's traffic would be)."""
    buffer = io.BytesIO()
    Image.new("RGB", (512, 512), (90, 140, 200)).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe co-tenant image in one paragraph."},
                    {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
                ],
            }
        ],
        "max_tokens": MAX_TOKENS,
    }
    target = f"{url}/openai/deployments/{DEPLOYMENT}/chat/completions?api-version=2024-02-15-preview"
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(headers={"api-key": EMULATOR_KEY}) as session, asyncio.TaskGroup() as tg:

        async def post() -> None:
            async with session.post(target, json=body) as response:
                await response.read()

        next_at = loop.time()
        while not stopping.is_set():
            tg.create_task(post(), name="co-tenant-request")
            next_at += 60 / per_min
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), max(0.0, next_at - loop.time()))


async def shared(work: Path, manifest: Path, seconds: float) -> dict[str, bool]:
    tpm = QUOTAS_TPM[-1]
    print(
        f"\n4. shared: one emulator of TPM {tpm}; another client sends {CO_TENANT_SHARE:.0%} of it steadily"
    )
    (work / "shared").mkdir()
    procs = Processes(work / "shared", [tpm])
    stopping = asyncio.Event()
    charge = 412  # what one such request is charged: prompt tokens + max_tokens (printed below as measured)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                send_steadily(procs.urls[0], tpm * CO_TENANT_SHARE / charge, stopping), name="co-tenant"
            )
            try:
                _, started = await run_for(
                    pool_config(procs.urls, [tpm], ["only"]), manifest, work / "shared-out", seconds
                )
            finally:
                stopping.set()
    finally:
        procs.close()
    log = procs.requests(0)
    since, until = started + WINDOW_S, started + seconds
    ours = served("ours", tpm, log, since, until)
    theirs = [r for r in log if since <= r.at < until and r.prompt_text.startswith("Describe co-tenant")]
    their_charges = [r.prompt_tokens + MAX_TOKENS for r in theirs if r.status == 200 and r.prompt_tokens]
    theirs_per_min = sum(their_charges) / ((until - since) / 60)
    left = ours.ceiling - theirs_per_min
    print(f"other client: {theirs_per_min:.0f} tokens/min served ({theirs_per_min / tpm:.1%} of the quota; "
          f"charge {statistics.median(their_charges) if their_charges else 0:.0f}), "
          f"{sum(r.status == 429 for r in theirs)} 429s of {len(theirs)}")  # fmt: skip
    print(f"ours: {ours.per_min:.0f} tokens/min served = {ours.per_min / left:.1%} of the {left:.0f} the other "
          f"leaves under the ceiling {ours.ceiling}; 429s {ours.rejected} of {ours.requests} "
          f"({ours.rejected / max(1, ours.requests):.2%})")  # fmt: skip
    return {
        "shared: our 429s <= 3 %": ours.rejected <= 0.03 * ours.requests,
        "shared: >= 90 % of what the other client leaves": ours.per_min >= 0.9 * left,
    }


async def main(args: argparse.Namespace) -> int:
    os.environ[KEY_ENV] = EMULATOR_KEY
    seconds = args.minutes * 60
    chosen = set(args.only or ["steady", "kill", "429", "shared"])
    with tempfile.TemporaryDirectory(prefix="bench-pool-") as tmp:
        work = Path(tmp)
        uniform: dict[str, Any] = {"sizes": [(512, 512)], "details": ["low"]}
        manifest = await asyncio.to_thread(lambda: make_manifest(work / "data", args.rows, **uniform))
        scenarios: dict[str, Callable[[], Any]] = {
            "steady": lambda: steady(work, manifest, seconds),
            "kill": lambda: kill(work, manifest, seconds, args.kill_after),
            "429": lambda: refusing(work, manifest, seconds, args.kill_after),
            "shared": lambda: shared(work, manifest, seconds),
        }
        goals: dict[str, bool] = {}
        for name, scenario in scenarios.items():
            if name in chosen:
                goals.update(await scenario())
    return print_goals(goals)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="length of each run (default 3)")
    parser.add_argument(
        "--kill-after", type=float, default=60.0, help="seconds before the failure (default 60)"
    )
    parser.add_argument("--rows", type=int, default=ROWS, help=f"manifest rows (default {ROWS})")
    parser.add_argument(
        "--only", nargs="*", choices=["steady", "kill", "429", "shared"], help="scenarios to run"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(asyncio.run(main(parse_args())))
