"""Measure the orchestrator's costs: `python benchmark.py [store|http]` (or `make bench`).

Times are compared as ratios within one run (the machine is shared and noisy).
The store: each operation runs on a store of 1,000 tasks and on one of 100,000,
each figure the best mean of several repeats; memory is measured with tracemalloc.
Over HTTP: each route against a bare Bottle app on the same waitress settings
(the floor), in pairs of runs back to back (the median pair's ratio), with wrk when it is installed; creates on
1,000 and 100,000 tasks (p99 and the slowest request, collector pauses
included); the data file against memory with 8 clients, in rounds; and the time to load
100,000 tasks at startup. Exit status 1 when a figure misses its target.
"""

import dataclasses
import gc
import http.client
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc

from orchestrator import TaskStore, _Journal

SMALL, LARGE = 1_000, 100_000


def filled_store(waiting: int, elsewhere: int = 0) -> TaskStore:
    """`waiting` tasks in /bench, `elsewhere` more spread over 100 other directories."""
    store = TaskStore(retention=0)
    for i in range(waiting):
        store.create({"work_directory": "/bench", "prompt": f"task {i}"})
    for i in range(elsewhere):
        store.create({"work_directory": f"/other/{i % 100}", "prompt": f"other {i}"})
    return store


def compare(operation, small: TaskStore, large: TaskStore, calls: int = 100,
            repeats: int = 7) -> tuple[float, float]:
    """Microseconds per call of operation(store) on each store: the best of interleaved repeats.

    Alternating the two stores within each repeat lets the machine's drift hit both alike.
    """
    best = {id(small): float("inf"), id(large): float("inf")}
    for _ in range(repeats):
        for store in (small, large):
            start = time.perf_counter()
            for _ in range(calls):
                operation(store)
            best[id(store)] = min(best[id(store)], (time.perf_counter() - start) / calls * 1e6)
    return best[id(small)], best[id(large)]


def doomed_ids(*stores: TaskStore):
    """Per store, an iterator over ids to delete."""
    return {id(s): iter([t.id for t in s.list({"limit": 1000})["tasks"]]) for s in stores}


OPERATIONS = [
    # name, operation, the ratio the contract allows
    ("claim", lambda store: store.claim("/bench", "w"), 2),
    ("create", lambda store: store.create({"work_directory": "/bench", "prompt": "new"}), 2),
    ("statistics", lambda store: store.statistics(), 1.5),
    ("list, first page", lambda store: store.list({"limit": 50}), 1.5),
    ("list, first page by status", lambda store: store.list({"status": "working", "limit": 50}),
     1.5),
    ("metrics (a scrape's numbers)", lambda store: store.metrics(), 1.5),
]


def unblock_microseconds_per_dependent(dependents: int) -> float:
    """Completing a task that blocks `dependents` others: the cost per dependent."""
    store = TaskStore()
    root, _ = store.create({"work_directory": "/bench", "prompt": "root"})
    for n in range(dependents):
        store.create({"work_directory": "/bench", "prompt": f"d{n}", "depends_on": [root.id]})
    held = store.claim("/bench", "w")
    # As the server paces the collector: what exists is frozen, so that a full pass during
    # the cascade scans what it makes, not every store this benchmark keeps alive.
    gc.collect()
    gc.freeze()
    try:
        started = time.perf_counter()
        store.complete(root.id, {"lease_token": held.lease_token})
        return 1e6 * (time.perf_counter() - started) / dependents
    finally:
        gc.unfreeze()


def bytes_per_task(count: int) -> tuple[float, float]:
    """(bytes per task beyond its own strings, bytes of those strings), by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = filled_store(count)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    strings = statistics.mean(
        sys.getsizeof(t.id) + sys.getsizeof(t.prompt) + sys.getsizeof(t.work_directory)
        for t in store.list({"limit": 1000})["tasks"]
    )
    return used / count - strings, strings


def report(name: str, small: float, large: float, bound: float) -> None:
    """One line: both costs, their ratio, and the ratio the contract allows."""
    ratio = large / small
    verdict = "ok" if ratio <= bound else "OVER"
    print(f"{name:<42} {small:8.1f} µs {large:8.1f} µs   ×{ratio:4.2f}  (≤ ×{bound}) {verdict}")


# ---------------------------------------------------------------------------
# Over HTTP, against the floor: a bare Bottle app on the same waitress settings
# ---------------------------------------------------------------------------

SECONDS = 3
#: Rounds of each route against the floor: each a pair of runs back to back, ours and the
#: floor's, whose ratio is taken; the median pair is reported. The machine's slow spells
#: come and go within seconds: a pair sees the same one, and the median leaves out a
#: pair that straddled one.
PAIRS = 5
CONNECTIONS = 8
SETTINGS = {"APP_SERVER_PORT": "0", "APP_SERVER_THREADS": "8", "APP_SECURITY_RATE_LIMIT": "0",
            "APP_LOG_LEVEL": "warning"}
CLAIM_PATH = "/api/v1/tasks/next?work_path=/bench&worker_id=bench"
CREATE_BODY = {"work_directory": "/bench", "prompt": "Write the tests first, then the code.",
               "priority": "medium", "tags": ["bench"]}
COMPLETE_BODY = {"worker_id": "bench", "result": {"output": "done", "duration_ms": 1200}}
#: About the size of one of our tasks in JSON, so that both servers encode alike.
BARE_ANSWER = {"id": "0f8fad5b-d9cb-469f-a165-70867728950e", "prompt": "x" * 300,
               "work_directory": "/bench", "status": "waiting", "priority": "medium",
               "tags": ["bench"], "created_at": "2026-12-03T08:00:00.000000Z",
               "updated_at": "2026-12-03T08:00:00.000000Z", "retry_count": 0, "max_retries": 3}


def bare_app():
    """The floor: three routes that do only what Bottle and waitress must."""
    import bottle
    app = bottle.Bottle()
    app.get("/health", callback=lambda: {"status": "healthy"})
    app.get("/item/<id>", callback=lambda id: BARE_ANSWER)

    def post():
        bottle.request.json  # parse the body, as a create must
        bottle.response.status = 201
        return BARE_ANSWER
    app.post("/items", callback=post)
    return app


def serve(kind: str, fill: int) -> None:
    """`python benchmark.py serve ours|bare FILL`: serve from the environment, print the URL.

    Ours is built as `orchestrator.py` builds it; `fill` tasks are created in /bench first.
    """
    from orchestrator import Config, _configure_logging, _pace_the_collector, _Server, create_app
    config = Config.from_env()
    if kind == "bare":
        server = _Server(bare_app(), config)
    else:
        store = TaskStore.from_config(config)
        for i in range(fill):
            store.create({**CREATE_BODY, "prompt": f"task {i}"})
        server = _Server(create_app(config, store), config)
    _configure_logging(config)
    _pace_the_collector()  # as orchestrator.py does once its data file is loaded
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" under load
    print(server.url, flush=True)
    server.run()


def _on_core(core: int) -> list[str]:
    """The command prefix that keeps a process on one core, where taskset is installed.

    The servers run on one core and the load on the other: without that, the
    scheduler moves them about and the figures wander by a fifth from run to run.
    """
    return ["taskset", "-c", str(core)] if shutil.which("taskset") else []


class Server:
    """A server process started by `serve`: `with Server("ours") as server: server.url`."""

    def __init__(self, kind: str, fill: int = 0, pinned: bool = True, **environment: str) -> None:
        self.process = subprocess.Popen(
            [*(_on_core(1) if pinned else []), sys.executable, os.path.abspath(__file__), "serve", kind, str(fill)],
            text=True,
            stdout=subprocess.PIPE, env={**os.environ, **SETTINGS, **environment},
            cwd=os.path.dirname(os.path.abspath(__file__)))
        self.url = self.process.stdout.readline().strip()
        assert self.url.startswith("http://"), f"the {kind} server did not start"

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *_) -> None:
        self.process.terminate()
        self.process.wait()

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One request; the envelope's data."""
        connection = http.client.HTTPConnection(self.url.removeprefix("http://"), timeout=30)
        connection.request(method, path, None if body is None else json.dumps(body),
                           {"Content-Type": "application/json"})
        answer = connection.getresponse()
        envelope = json.loads(answer.read())
        connection.close()
        assert answer.status < 300, envelope
        return envelope["data"]

    def held_ids(self) -> list[str]:
        """The ids of every task being worked on (all held by the benchmark)."""
        ids = []
        while True:
            page = self.call("GET", f"/api/v1/tasks?status=working&limit=1000&offset={len(ids)}")
            ids += [task["id"] for task in page["tasks"]]
            if not page["has_more"]:
                return ids


@dataclasses.dataclass
class Load:
    """What one run of load measured."""
    per_second: float
    p99_ms: float
    max_ms: float
    failures: int  # answers that were not 2xx: the figure is not valid


WRK_POST = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
"""
#: Completes the tasks whose ids are in the file given after --, each thread its own share.
WRK_COMPLETE = """
local threads = 0
function setup(thread) thread:set("index", threads); threads = threads + 1 end
function init(args)
  ids = {}
  local n = 0
  for line in io.lines(args[1]) do
    if n %% 2 == index then ids[#ids + 1] = line end
    n = n + 1
  end
  next_id = 1
end
function request()
  local id = ids[next_id]
  next_id = next_id + 1
  if id == nil then wrk.thread:stop(); id = "spent" end
  return wrk.format("POST", "/api/v1/tasks/" .. id .. "/complete",
                    {["Content-Type"] = "application/json"}, [[%s]])
end
"""


def load(url: str, path: str, body: dict | None = None, ids: list[str] | None = None,
         seconds: float = SECONDS) -> Load:
    """Drive one route for `seconds` with CONNECTIONS kept-alive clients: wrk if installed."""
    if shutil.which("wrk"):
        return _wrk(url, path, body, ids, seconds)
    return _python_load(url, path, body, ids, seconds)


def _wrk(url, path, body, ids, seconds) -> Load:
    """wrk -t2 -c8 with --latency, and a Lua script for a POST."""
    with tempfile.TemporaryDirectory() as folder:
        script, extra = os.path.join(folder, "script.lua"), []
        with open(script, "w") as file:
            if ids is not None:
                file.write(WRK_COMPLETE % json.dumps(body))
                with open(os.path.join(folder, "ids"), "w") as listing:
                    listing.write("\n".join(ids) + "\n")
                extra = ["--", os.path.join(folder, "ids")]
            elif body is not None:
                file.write(WRK_POST % json.dumps(body))
        output = subprocess.run(
            [*_on_core(0), "wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", script,
             url + (path if ids is None else "/"), *extra], capture_output=True, text=True, check=True).stdout
    milliseconds = {"us": 1e-3, "ms": 1, "s": 1e3}
    maximum = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", output)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", output)
    failures = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Load(float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
                float(p99.group(1)) * milliseconds[p99.group(2)],
                float(maximum.group(1)) * milliseconds[maximum.group(2)],
                int(failures.group(1)) if failures else 0)


def _python_load(url, path, body, ids, seconds) -> Load:
    """The same load from threads with http.client, where wrk is missing (a rougher floor)."""
    address, deadline = url.removeprefix("http://"), time.perf_counter() + seconds
    latencies, failures, spare = [], [0], iter(ids or ())
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection(address, timeout=30)
        while time.perf_counter() < deadline:
            route = path
            if ids is not None:
                with lock:
                    task = next(spare, None)
                if task is None:
                    break
                route = f"/api/v1/tasks/{task}/complete"
            started = time.perf_counter()
            connection.request("GET" if body is None else "POST", route,
                               None if body is None else json.dumps(body),
                               {"Content-Type": "application/json"})
            answer = connection.getresponse()
            answer.read()
            latencies.append(time.perf_counter() - started)
            failures[0] += answer.status >= 300
        connection.close()
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return Load(len(latencies) / (time.perf_counter() - started),
                1e3 * latencies[int(0.99 * (len(latencies) - 1))], 1e3 * latencies[-1],
                failures[0])


#: name, the route on ours, the route on the floor, whether it is a POST, the target ratio
ROUTES = [
    ("health", "/health", "/health", False, 0.85),
    ("get", "/api/v1/tasks/{id}", "/item/{id}", False, 0.85),
    ("create", "/api/v1/tasks", "/items", True, 0.85),
    ("claim", CLAIM_PATH, "/item/x", False, 0.8),
    ("complete", "/api/v1/tasks/{id}/complete", "/items", True, 0.8),
]


def against_the_floor() -> bool:
    """Each route of ours against the bare floor, in pairs of runs; True if all meet target.

    Ours starts with 100,000 tasks, enough to claim in every pair; each pair's completes
    finish that pair's claims.
    """
    pairs: dict[str, list[tuple[Load, Load]]] = {name: [] for name, *_ in ROUTES}
    with Server("bare") as bare, Server("ours", fill=100_000) as ours:
        some_id = ours.call("POST", "/api/v1/tasks", CREATE_BODY)["id"]
        for pair in range(PAIRS):
            for name, path, floor_path, post, _target in ROUTES:
                ids = ours.held_ids() if name == "complete" else None
                body = (COMPLETE_BODY if name == "complete" else CREATE_BODY) if post else None
                # Shorter than the claims before it, so that their tasks are enough.
                seconds = SECONDS - 1 if name == "complete" else SECONDS
                figures = {}
                # Who goes first alternates, so that neither always follows the other.
                for server in (bare, ours) if pair % 2 == 0 else (ours, bare):
                    route = (path if server is ours else floor_path).format(id=some_id)
                    figures[server] = load(server.url, route, body,
                                           ids if server is ours else None, seconds)
                pairs[name].append((figures[bare], figures[ours]))
        dry = ours.call("GET", "/api/v1/statistics")["waiting_tasks"] == 0
    print(f"\nover HTTP, {CONNECTIONS} connections ({'wrk' if shutil.which('wrk') else 'http.client'}"
          f"), the median of {PAIRS} pairs of {SECONDS} s runs")
    print("(each column a median on its own; a ratio is the median pair's, not the columns')")
    print(f"{'route':<10} {'floor/s':>9} {'ours/s':>9}  ratio      p99 floor  p99 ours  ratio")
    met = True
    for name, _path, _floor, _post, target in ROUTES:
        ratio = statistics.median(ours.per_second / floor.per_second for floor, ours in pairs[name])
        p99_ratio = statistics.median(ours.p99_ms / floor.p99_ms for floor, ours in pairs[name])
        floor_rate = statistics.median(floor.per_second for floor, _ in pairs[name])
        rate = statistics.median(ours.per_second for _, ours in pairs[name])
        floor_p99 = statistics.median(floor.p99_ms for floor, _ in pairs[name])
        p99 = statistics.median(ours.p99_ms for _, ours in pairs[name])
        failures = sum(ours.failures for _, ours in pairs[name])
        ok = ratio >= target and p99_ratio <= 1.3 and not failures
        met &= ok
        print(f"{name:<10} {floor_rate:9.0f} {rate:9.0f}  ×{ratio:.2f}"
              f" (≥{target})  {floor_p99:6.2f} ms {p99:6.2f} ms  ×{p99_ratio:.2f}"
              f" (≤1.3) {'ok' if ok else 'UNDER'}"
              + (f"  {failures} failed" if failures else ""))
    # The spread shows how much the host moved the figures while they were measured.
    print("each pair's rate ratio, lowest first:")
    for name, *_ in ROUTES:
        ratios = sorted(ours.per_second / floor.per_second for floor, ours in pairs[name])
        print(f"  {name:<10} " + " ".join(f"{ratio:.2f}" for ratio in ratios))
    if dry:
        print("the claim queue ran dry: the claim figure counts empty answers")
    return met and not dry


def growth_figures() -> bool:
    """Creates on a store of 1,000 tasks and one of 100,000: p99 and the slowest request."""
    figures = {}
    for fill in (SMALL, LARGE):
        with Server("ours", fill=fill) as ours:
            figures[fill] = load(ours.url, "/api/v1/tasks", CREATE_BODY, seconds=10)
    small, large = figures[SMALL], figures[LARGE]
    ratio = large.p99_ms / small.p99_ms
    ok = ratio <= 1.5 and large.max_ms <= 50 and small.max_ms <= 50
    print(f"\ncreates for 10 s on {SMALL:,} and {LARGE:,} tasks: p99 {small.p99_ms:.2f} ms and"
          f" {large.p99_ms:.2f} ms (×{ratio:.2f}, ≤1.5); slowest {small.max_ms:.1f} ms and"
          f" {large.max_ms:.1f} ms (≤50) {'ok' if ok else 'OVER'}")
    return ok


def data_file_figures(folder: str) -> bool:
    """The durable store against the in-memory one, in rounds of runs back to back: each
    mode's ratio to memory in its round, the median round's, as for the routes above."""
    modes = {"in memory": {}, "data file, full": {"APP_DATA_SYNC": "full"},
             "data file, normal": {"APP_DATA_SYNC": "normal"}}
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    for repeat in range(PAIRS):
        # Memory runs first in even rounds and last in odd ones, so that the data file's
        # runs neither always follow it nor always precede it.
        for name in list(modes) if repeat % 2 == 0 else reversed(modes):
            environment = modes[name]
            if environment:
                environment = {**environment,
                               "APP_DATA_FILE": os.path.join(folder, f"{name[-4:]}-{repeat}.db")}
            # Not pinned: the data file's writer thread runs beside the requests, on the
            # other core, while SQLite has let go of the GIL.
            with Server("ours", pinned=False, **environment) as ours:
                creates = load(ours.url, "/api/v1/tasks", CREATE_BODY).per_second
                claims = load(ours.url, CLAIM_PATH, seconds=SECONDS - 1).per_second
                completes = load(ours.url, "", COMPLETE_BODY, ids=ours.held_ids(),
                                 seconds=SECONDS - 1).per_second
            rates[name].append((creates, 2 / (1 / claims + 1 / completes)))
    print(f"\nthe data file against memory over HTTP, {CONNECTIONS} connections, the median of"
          f" {PAIRS} rounds\n(each column a median on its own; a ratio is the median round's)")
    print(f"{'':<26} {'creates/s':>10} {'claim+complete/s':>18}   ratio to memory")
    ratios = {}
    for name, figures in rates.items():
        ratios[name] = [statistics.median(mode[part] / memory[part] for mode, memory
                                          in zip(figures, rates["in memory"])) for part in (0, 1)]
        creates, cycles = (statistics.median(figure[part] for figure in figures) for part in (0, 1))
        print(f"{name:<26} {creates:10.0f} {cycles:18.0f}   ×{ratios[name][0]:.2f}"
              f" / ×{ratios[name][1]:.2f}")
    return min(ratios["data file, full"]) >= 0.7


def startup_seconds(folder: str, count: int = LARGE) -> float:
    """Seconds to open a data file holding `count` tasks (written in one batch)."""
    path = os.path.join(folder, "large.db")
    store = filled_store(count)
    journal = _Journal(path)
    tasks = list(store._tasks.values())
    lock = threading.Lock()
    with lock:
        ticket = journal.record(tasks, [], {})
    journal.wait(ticket)
    journal.close()
    started = time.perf_counter()
    TaskStore(path=path).close()
    return time.perf_counter() - started


def store_figures() -> None:
    """The store's costs on 1,000 and 100,000 tasks, in process."""
    print(f"{'operation':<42} {'1,000 tasks':>11} {'100,000':>11}   ratio")
    small, large = filled_store(SMALL), filled_store(LARGE)
    for name, operation, bound in OPERATIONS:
        report(name, *compare(operation, small, large), bound)
    doomed = doomed_ids(small, large)
    report("delete", *compare(lambda s: s.delete(next(doomed[id(s)])), small, large, repeats=5), 2)
    del large
    crowded = filled_store(SMALL, elsewhere=LARGE)
    report("claim, 100,000 more in other directories",
           *compare(lambda s: s.claim("/bench", "w"), filled_store(SMALL), crowded), 1.5)
    report("unblock, per dependent (1,000 vs 10,000)",
           *(min(unblock_microseconds_per_dependent(n) for _ in range(3)) for n in (1000, 10_000)),
           1.5)
    extra, strings = bytes_per_task(LARGE)
    print(f"memory per task beyond its own strings: {extra:.0f} bytes "
          f"(its strings: {strings:.0f}; bound 1024) {'ok' if extra <= 1024 else 'OVER'}")


def main(argv: list[str]) -> int:
    """`benchmark.py [store|http]`: both parts by default; exit status 1 if a target is missed."""
    if argv[:1] == ["serve"]:
        serve(argv[1], int(argv[2]))
        return 0
    if argv[:1] != ["http"]:
        store_figures()
    if argv[:1] == ["store"]:
        return 0
    met = against_the_floor()
    met &= growth_figures()
    with tempfile.TemporaryDirectory() as folder:
        met &= data_file_figures(folder)
        print(f"startup with {LARGE:,} tasks in the data file: {startup_seconds(folder):.2f} s")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
