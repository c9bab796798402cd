"""Measure the store's costs as the queue grows: `python benchmark.py` (or `make bench`).

Times are compared as ratios within one run (the machine is shared and noisy):
each operation runs on a store of 1,000 tasks and on one of 100,000, and each
figure is the best mean of several repeats. Memory is measured with tracemalloc.
"""

import gc
import statistics
import sys
import time
import tracemalloc

from orchestrator import TaskStore

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
]


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
    extra, strings = bytes_per_task(LARGE)
    print(f"memory per task beyond its own strings: {extra:.0f} bytes "
          f"(its strings: {strings:.0f}; bound 1024) {'ok' if extra <= 1024 else 'OVER'}")


if __name__ == "__main__":
    main()
