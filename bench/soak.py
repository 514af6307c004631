"""Fault and soak harness: a real `tuneloop serve` on loopback (registry on SQLite, its job
worker on), healthy clients timed alone and then beside hostile ones, with faults injected
while it runs; every request is counted by what answered it.

    python bench/soak.py --quiet-s 30 --abuse-s 90

Healthy tenant acme chats (non-streamed and streamed) and posts feedback; meanwhile:
clients that disconnect mid-stream, send their body a byte at a time, never finish their
headers or send 100 KB of them; JSON schemas built to hurt a grammar compiler; uploads, job
creation and cancellation; tenant globex asking for acme's ids; the job worker SIGKILLed
mid-run (the server restarts it). At the end the server itself is SIGKILLed and restarted, and
the registry is checked: every feedback, file and job the server accepted is there.

    python bench/soak.py --postgres

puts the registry on a PostgreSQL server of its own (tests/postgres.py) and restarts that
server mid-run as well: requests in the outage are answered 503 with a time to retry (counted
apart from other 5xx), and everything after it must succeed again on the same server process.
The API process's memory is sampled through the run, so a leak (growth that goes on) is told
apart from warming up (growth that stops).
Writes bench/out/soak.json and prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BASE = "smollm2-135m-instruct"
TUNELOOP = str(Path(sys.executable).parent / "tuneloop")
TIMEOUT_S = 120.0  # a request unanswered after this counts as never answered
SAMPLE_S = 5.0  # how often the API process's memory is read


class Tally:
    """Requests by kind and outcome (HTTP status class, or what happened without one)."""

    def __init__(self):
        self.lock, self.counts = threading.Lock(), collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)

    def add(self, kind: str, outcome: str, seconds: float | None = None) -> None:
        with self.lock:
            self.counts[(kind, outcome)] += 1
            if seconds is not None:
                self.latency[kind].append(seconds)


def outcome(status: int) -> str:
    """503 is the registry restarting (serve/app.py), the one 5xx a client is told to retry."""
    return "2xx" if status < 300 else str(status) if status < 500 or status == 503 else "5xx"


def start(ws: Path, port: int, db_url: str = "") -> subprocess.Popen:
    env = dict(os.environ, TUNELOOP_HOME=str(ws), TUNELOOP_DB_URL=db_url)
    proc = subprocess.Popen([TUNELOOP, "serve", "--port", str(port), "--base", BASE],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def rss_mb(proc: subprocess.Popen) -> float:
    """The API process alone (its job worker, a child, comes and goes with jobs)."""
    return psutil.Process(proc.pid).memory_info().rss / 2**20


class Clients:
    def __init__(self, url: str, keys: dict, tally: Tally, stop: threading.Event, folder: Path):
        self.url, self.keys, self.tally, self.stop, self.folder = url, keys, tally, stop, folder
        self.accepted = collections.Counter()  # what the server said it stored
        self.ids: dict[str, list[str]] = collections.defaultdict(list)
        self.schemas_sent = 0

    def http(self, tenant="acme") -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=TIMEOUT_S,
                            headers={"Authorization": f"Bearer {self.keys[tenant]}"})

    def call(self, kind: str, fn):
        began = time.perf_counter()
        try:
            reply = fn()
        except httpx.TimeoutException:
            self.tally.add(kind, "never answered")
            return None
        except httpx.HTTPError as exc:
            self.tally.add(kind, f"connection: {type(exc).__name__}")
            return None
        self.tally.add(kind, outcome(reply.status_code), time.perf_counter() - began)
        return reply

    def loop(self, fn, pause: float = 0.0):
        rng = random.Random(id(fn))
        while not self.stop.is_set():
            fn(rng)
            if pause:
                time.sleep(pause * rng.random())

    # -- healthy ---------------------------------------------------------------------------
    def chat(self, rng):
        with self.http() as c:
            ask = {"model": BASE, "max_tokens": 4, "temperature": 0,
                   "messages": [{"role": "user", "content": f"my card {rng.randrange(99)} is lost"}]}
            if rng.random() < 0.5:
                reply = self.call("healthy chat", lambda: c.post("/v1/chat/completions", json=ask))
                if reply is not None and reply.status_code == 200 and rng.random() < 0.5:
                    fb = self.call("feedback", lambda: c.post("/v1/feedback", json={
                        "completion_id": reply.json()["id"], "rating": 1}))
                    if fb is not None and fb.status_code == 200:
                        self.accepted["feedback"] += 1
            else:
                def streamed():
                    with c.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as r:
                        for _ in r.iter_lines():
                            pass
                        return r
                self.call("healthy chat (streamed)", streamed)

    # -- hostile ---------------------------------------------------------------------------
    def leave_mid_stream(self, rng):
        with self.http() as c:
            def leave():
                with c.stream("POST", "/v1/chat/completions", json={
                        "model": BASE, "max_tokens": 64, "stream": True,
                        "messages": [{"role": "user", "content": "tell me a story"}]}) as r:
                    next(r.iter_lines(), None)
                    return r  # closed with most of the reply unread
            self.call("disconnect mid-stream", leave)

    def raw(self, kind: str, chunks: list[bytes], gap_s: float, hold_s: float = 0.0):
        """Send `chunks` on a raw socket `gap_s` apart, then read what comes back."""
        host, port = self.url.rsplit(":", 1)[0][7:], int(self.url.rsplit(":", 1)[1])
        began = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
                for chunk in chunks:
                    sock.sendall(chunk)
                    time.sleep(gap_s)
                time.sleep(hold_s)
                sock.shutdown(socket.SHUT_WR) if hold_s else None
                data = sock.recv(65536)
        except TimeoutError:
            return self.tally.add(kind, "never answered")
        except OSError as exc:
            return self.tally.add(kind, f"closed by server ({type(exc).__name__})")
        if not data:
            return self.tally.add(kind, "closed by server")
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        self.tally.add(kind, outcome(status) if status else "garbled", time.perf_counter() - began)

    def byte_by_byte(self, rng):
        body = json.dumps({"model": BASE, "max_tokens": 2,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                f"{self.keys['acme']}\r\nContent-Type: application/json\r\nContent-Length: "
                f"{len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.raw("body a byte at a time", [head] + [body[i:i + 1] for i in range(len(body))], 0.03)

    def unfinished_headers(self, rng):
        self.raw("headers never finished", [b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"],
                 0.0, hold_s=5.0)

    def huge_headers(self, rng):
        self.raw("100 KB of headers", [(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: "
                                        f"Bearer {self.keys['acme']}\r\nX-Big: {'a' * 100_000}"
                                        "\r\nConnection: close\r\n\r\n").encode()], 0)

    def hostile_schema(self, rng):
        deep: dict = {"type": "string"}
        for _ in range(rng.choice([64, 256])):
            deep = {"type": "object", "properties": {"x": deep}, "required": ["x"]}
        schemas = {
            "deep nesting": deep,
            "exponential oneOf": {"oneOf": [{"oneOf": [{"type": "string"}, {"type": "integer"}]}
                                            for _ in range(24)]},
            # a new one each time: nothing compiled before can be reused
            "huge enum": {"enum": [f"value-{rng.random()}-{i}" for i in range(20_000)]},
            "catastrophic regex": {"type": "string", "pattern": "^(a+)+(b+)+(c|cc)*$"},
        }
        self.schemas_sent += 1  # each kind in turn, the huge enum every other time
        turn = ["huge enum", "deep nesting", "huge enum", "exponential oneOf", "huge enum",
                "catastrophic regex"]
        name = turn[self.schemas_sent % len(turn)]
        with self.http() as c:
            self.call(f"schema: {name}", lambda: c.post("/v1/chat/completions", json={
                "model": BASE, "max_tokens": 8, "messages": [{"role": "user", "content": "go"}],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "x", "schema": schemas[name]}}}))

    def upload_and_job(self, rng):
        rows = [{"messages": [{"role": "user", "content": f"question {i} {rng.random()}"},
                              {"role": "assistant", "content": "answer"}]} for i in range(12)]
        with self.http() as c:
            reply = self.call("upload", lambda: c.post("/v1/files", data={"purpose": "fine-tune"},
                              files={"file": ("rows.jsonl", "".join(json.dumps(r) + "\n"
                                                                    for r in rows))}))
            if reply is None or reply.status_code != 200:
                return
            self.accepted["files"] += 1
            file_id = reply.json()["id"]
            self.ids["file"].append(file_id)
            job = self.call("create job", lambda: c.post("/v1/fine_tuning/jobs", json={
                "model": BASE, "training_file": file_id, "hyperparameters": {"n_epochs": 1}}))
            if job is None or job.status_code != 200:
                return
            self.accepted["jobs"] += 1
            self.ids["job"].append(job.json()["id"])
            time.sleep(rng.random() * 3)  # some are cancelled queued, some running
            self.call("cancel job", lambda: c.post(
                f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel"))

    def other_tenants_ids(self, rng):
        if not self.ids["file"]:
            return time.sleep(0.5)
        with self.http("globex") as c:
            file_id, job_id = rng.choice(self.ids["file"]), rng.choice(self.ids["job"] or ["x"])
            for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content",
                         f"/v1/fine_tuning/jobs/{job_id}"):
                reply = self.call("another tenant's id", lambda: c.get(path))
                if reply is not None and reply.status_code < 300:  # (a 503 shows nothing)
                    self.tally.add("another tenant's id", "LEAKED")


def run_phase(clients: Clients, seconds: float, hostile: bool, healthy: int,
              faults: dict | None = None, sample=None):
    """Run the clients for `seconds`; `faults` maps a share of the time (0.5: half way) to what
    to do then; `sample` is called every few seconds throughout."""
    clients.stop.clear()
    jobs = [clients.chat] * healthy
    if hostile:
        jobs += [clients.leave_mid_stream, clients.byte_by_byte, clients.unfinished_headers,
                 clients.huge_headers, clients.hostile_schema, clients.upload_and_job,
                 clients.other_tenants_ids]
    threads = [threading.Thread(target=clients.loop, args=(fn, 0.5 if fn != clients.chat else 0))
               for fn in jobs]
    for t in threads:
        t.start()
    began, pending = time.monotonic(), sorted((faults or {}).items())
    while (now := time.monotonic() - began) < seconds:
        while pending and now >= pending[0][0] * seconds:
            pending.pop(0)[1]()
        if sample:
            sample(now)
        time.sleep(min(SAMPLE_S, seconds - now))
    clients.stop.set()
    for t in threads:
        t.join(timeout=TIMEOUT_S + 10)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else float("nan")


def restart_postgres(cluster, faults: list, down_s: float = 5.0) -> None:
    """Stop the registry's server (its sessions cut), leave it down a while, start it again."""
    cluster.stop()
    time.sleep(down_s)
    cluster.start()
    faults.append(f"PostgreSQL stopped mid-run, down {down_s:.0f} s, then started again")


def kill_worker(server: subprocess.Popen, faults: list) -> None:
    workers = [p for p in psutil.Process(server.pid).children(recursive=True)
               if "tuneloop.serve.worker" in " ".join(p.cmdline())]
    for p in workers:
        p.send_signal(signal.SIGKILL)
    faults.append(f"job worker SIGKILLed mid-run ({len(workers)} process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quiet-s", type=float, default=30)
    parser.add_argument("--abuse-s", type=float, default=90)
    parser.add_argument("--healthy", type=int, default=2, help="healthy chat clients")
    parser.add_argument("--postgres", action="store_true",
                        help="the registry on a PostgreSQL server of its own, restarted mid-run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        cluster = None
        if args.postgres:
            sys.path.insert(0, str(ROOT))
            from tests import postgres

            cluster = stack.enter_context(postgres.cluster())
        soak(args, cluster)


def soak(args, cluster) -> None:
    from tuneloop.serve.auth import create_key
    from tuneloop.store import Registry

    ws = Path(tempfile.mkdtemp(prefix="soak-"))
    db_url = cluster.url if cluster else ""
    os.environ.update(TUNELOOP_HOME=str(ws), TUNELOOP_DB_URL=db_url)
    registry = Registry.open(ws)
    keys = {t: create_key(registry, t, rate_per_minute=10**6)[1] for t in ("acme", "globex")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, faults = f"http://127.0.0.1:{port}", []
    server = start(ws, port, db_url)
    quiet, abuse, memory = Tally(), Tally(), []
    try:
        clients = Clients(url, keys, quiet, threading.Event(), ws)
        run_phase(clients, args.quiet_s, False, args.healthy)
        rss_start = rss_mb(server)
        clients.tally = abuse
        faults_at = {0.5: lambda: kill_worker(server, faults)}
        if cluster:
            faults_at[0.7] = lambda: restart_postgres(cluster, faults)
        run_phase(clients, args.abuse_s, True, args.healthy, faults_at,
                  sample=lambda t: memory.append((round(t), round(rss_mb(server)))))
        rss_end = rss_mb(server)
        with httpx.Client(base_url=url, timeout=TIMEOUT_S,
                          headers={"Authorization": f"Bearer {keys['acme']}"}) as c:
            for job_id in clients.ids["job"]:  # what is still running is cancelled
                c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        server.send_signal(signal.SIGKILL)
        server.wait()
        for p in psutil.process_iter(["cmdline"]):  # its orphaned worker too
            if "tuneloop.serve.worker" in " ".join(p.info["cmdline"] or []):
                p.kill()
        faults.append("server SIGKILLed after the run, then restarted")
        server = start(ws, port, db_url)
        stored = check_registry(registry, clients, url, keys["acme"])
    finally:
        server.kill()
    result = report(quiet, abuse, clients.accepted, stored, faults, rss_start, rss_end, args,
                    memory)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))


def check_registry(registry, clients: Clients, url: str, key: str) -> dict:
    """After the restart: what the registry holds of what the server accepted."""
    from sqlalchemy import func, select

    from tuneloop.store.serving import Feedback, File, Job

    deadline = time.time() + 120
    with registry.session() as s:
        while True:  # cancelled running jobs stop at their next step
            states = collections.Counter(s.scalars(select(Job.status)))
            if set(states) <= {"succeeded", "failed", "cancelled"} or time.time() > deadline:
                break
            time.sleep(1)
            s.expire_all()
        failed = [j.error for j in s.scalars(select(Job).where(Job.status == "failed"))]
        return {"feedback": s.scalar(select(func.count()).select_from(Feedback)),
                "failed jobs": failed,
                "files": s.scalar(select(func.count()).select_from(File)),
                "jobs": dict(states),
                "answers after restart": httpx.get(url + "/v1/models", timeout=30, headers={
                    "Authorization": f"Bearer {key}"}).status_code}


def report(quiet: Tally, abuse: Tally, accepted, stored, faults, rss_start, rss_end, args,
           memory) -> dict:
    healthy = ("healthy chat", "healthy chat (streamed)")
    lat_quiet = [x for k in healthy for x in quiet.latency[k]]
    lat_abuse = [x for k in healthy for x in abuse.latency[k]]
    counts = collections.Counter()
    for tally in (quiet, abuse):
        counts.update(tally.counts)
    rows = sorted({k for k, _ in counts})
    print(f"quiet {args.quiet_s:.0f} s, then abuse {args.abuse_s:.0f} s; {args.healthy} healthy "
          f"chat clients throughout\n")
    print("| requests | sent | answered (by class; 503: the registry restarting) | 5xx | "
          "never answered |")
    print("|---|---|---|---|---|")
    for kind in rows:
        mine = {o: n for (k, o), n in counts.items() if k == kind}
        answered = ", ".join(f"{o}: {n}" for o, n in sorted(mine.items())
                             if o not in ("5xx", "never answered"))
        print(f"| {kind} | {sum(mine.values())} | {answered} | {mine.get('5xx', 0)} | "
              f"{mine.get('never answered', 0)} |")
    ratio = p99(lat_abuse) / p99(lat_quiet)
    jobs_done = sum(stored["jobs"].values())
    print(f"\nhealthy p99: quiet {p99(lat_quiet):.2f} s, during the abuse {p99(lat_abuse):.2f} s "
          f"({ratio:.2f}x; goal <= 2x)")
    print(f"feedback accepted {accepted['feedback']}, stored {stored['feedback']}; files accepted "
          f"{accepted['files']}, stored {stored['files']}; jobs accepted {accepted['jobs']}, "
          f"ended {jobs_done} ({stored['jobs']}); failed: {stored['failed jobs']}")
    half = [mb for t, mb in memory if t >= args.abuse_s / 2]
    print(f"API process memory: {rss_start:.0f} MB at the start of the abuse, {rss_end:.0f} MB at "
          f"its end ({100 * (rss_end / rss_start - 1):+.1f}%; goal < 10%); over its second half "
          f"{half[0] if half else float('nan'):.0f} -> {rss_end:.0f} MB "
          f"({100 * (rss_end / half[0] - 1) if half else float('nan'):+.1f}%)")
    print("memory (s into the abuse: MB): " + ", ".join(f"{t}: {mb}" for t, mb in memory))
    print("faults: " + "; ".join(faults) + f"; after the restart GET /v1/models answered "
          f"{stored['answers after restart']}")
    return {"counts": {f"{k} | {o}": n for (k, o), n in counts.items()},
            "p99_quiet_s": p99(lat_quiet), "p99_abuse_s": p99(lat_abuse), "p99_ratio": ratio,
            "accepted": dict(accepted), "stored": stored, "faults": faults,
            "rss_start_mb": rss_start, "rss_end_mb": rss_end, "rss_samples": memory}


if __name__ == "__main__":
    main()
