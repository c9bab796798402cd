"""Measure the store's costs: `python benchmark.py` (or `make bench`).

Times are compared as ratios within one run (the machine is shared and noisy):
each operation runs on a store of 1,000 tasks and on one of 100,000, and each
figure is the best mean of several repeats. Memory is measured with tracemalloc.
Then the data file: throughput over HTTP with 8 clients, in memory against
APP_DATA_SYNC=full and normal, and the time to load 100,000 tasks at startup.
"""

import copy
import gc
import http.client
import json
import os
import re
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
    started = time.perf_counter()
    store.complete(root.id, {"lease_token": held.lease_token})
    return 1e6 * (time.perf_counter() - started) / dependents


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


CLIENTS, PER_CLIENT = 8, 150


def http_throughput(environment: dict[str, str]) -> tuple[float, float]:
    """(creates per second, claim-then-completes per second) over HTTP with 8 clients.

    The server runs in a process of its own, so that the clients do not share its GIL.
    """
    server = subprocess.Popen(
        [sys.executable, "orchestrator.py"], text=True, stdout=subprocess.PIPE,
        env={**os.environ, "APP_SERVER_PORT": "0", "APP_SECURITY_RATE_LIMIT": "0",
             "APP_LOG_LEVEL": "warning", **environment},
        cwd=os.path.dirname(os.path.abspath(__file__)), stderr=subprocess.DEVNULL,
    )
    try:
        address = re.search(r"http://([^\s;]+)", server.stdout.readline()).group(1)

        def run(work) -> float:
            threads = [threading.Thread(target=work, args=(n, address)) for n in range(CLIENTS)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return CLIENTS * PER_CLIENT / (time.perf_counter() - started)
        return run(_creates), run(_claims_and_completes)
    finally:
        server.terminate()
        server.wait()


def _request(connection: http.client.HTTPConnection, method: str, path: str,
             body: dict | None = None) -> dict:
    """One request on a kept-alive connection; the envelope's data."""
    connection.request(method, path, None if body is None else json.dumps(body),
                       {"Content-Type": "application/json"})
    answer = connection.getresponse()
    envelope = json.loads(answer.read())
    assert answer.status < 300, envelope
    return envelope["data"]


def _creates(client: int, address: str) -> None:
    """One client's creates, in a directory of its own."""
    connection = http.client.HTTPConnection(address, timeout=30)
    for i in range(PER_CLIENT):
        _request(connection, "POST", "/api/v1/tasks",
                 {"work_directory": f"/bench/{client}", "prompt": f"task {i}"})
    connection.close()


def _claims_and_completes(client: int, address: str) -> None:
    """One client claims each task of its directory and completes it."""
    connection = http.client.HTTPConnection(address, timeout=30)
    for _ in range(PER_CLIENT):
        task = _request(connection, "GET", f"/api/v1/tasks/next?work_path=/bench/{client}"
                                           "&worker_id=w")
        _request(connection, "POST", f"/api/v1/tasks/{task['id']}/complete", {"worker_id": "w"})
    connection.close()


def data_file_figures(folder: str) -> None:
    """The durable store against the in-memory one, as ratios in one run; best of three."""
    modes = {"in memory": None, "data file, full": "full", "data file, normal": "normal"}
    best = {name: (0.0, 0.0) for name in modes}
    for repeat in range(3):
        for name, sync in modes.items():
            environment = {} if sync is None else {
                "APP_DATA_FILE": os.path.join(folder, f"{sync}-{repeat}.db"),
                "APP_DATA_SYNC": sync}
            creates, cycles = http_throughput(environment)
            best[name] = (max(best[name][0], creates), max(best[name][1], cycles))
    memory = best["in memory"]
    print(f"\nover HTTP, {CLIENTS} clients      creates/s   claim+complete/s   ratio to memory")
    for name, (creates, cycles) in best.items():
        print(f"{name:<26} {creates:10.0f} {cycles:18.0f}       ×{creates / memory[0]:.2f}"
              f" / ×{cycles / memory[1]:.2f}")


def startup_seconds(folder: str, count: int = LARGE) -> float:
    """Seconds to open a data file holding `count` tasks (written in one batch)."""
    path = os.path.join(folder, "large.db")
    store = filled_store(count)
    journal = _Journal(path)
    tasks = [copy.copy(task) for task in store._tasks.values()]  # as the store hands them over
    lock = threading.Lock()
    with lock:
        ticket = journal.record(tasks, [], {"sequence": 2 * count})
    journal.wait(ticket)
    journal.close()
    started = time.perf_counter()
    TaskStore(path=path).close()
    return time.perf_counter() - started


def main() -> None:
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
    with tempfile.TemporaryDirectory() as folder:
        data_file_figures(folder)
        print(f"startup with {LARGE:,} tasks in the data file: {startup_seconds(folder):.2f} s")


if __name__ == "__main__":
    main()
