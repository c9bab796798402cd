"""Tests for orchestrator.py: the store, the REST API, the gate, configuration and serving."""

import base64
import contextlib
import dataclasses
import datetime
import hashlib
import inspect
import http.client
import itertools
import json
import keyword
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import urllib.request
import uuid
import wsgiref.util
from pathlib import Path

import bottle
import pytest
import webtest

import orchestrator
from orchestrator import (
    Config,
    ConfigError,
    Conflict,
    NotFound,
    RateLimited,
    RateLimiter,
    TaskStore,
    ValidationError,
    create_app,
    running_server,
)

MODULE = Path(orchestrator.__file__)
#: A well-formed task id that no store has: fixed, so that parallel runs collect alike.
NO_SUCH_TASK = "0b7c1d2e-0000-4000-8000-000000000000"


# ---------------------------------------------------------------------------
# Fixtures: clock -> store -> app -> client
# ---------------------------------------------------------------------------

class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(clock):
    return TaskStore(max_retries=2, task_timeout=60, retention=3600, clock=clock)


@pytest.fixture
def config():
    return Config(rate_limit=0)


@pytest.fixture
def app(config, store):
    return create_app(config, store)


@pytest.fixture
def client(app):
    return webtest.TestApp(app)


@pytest.fixture
def make_task(client):
    """Create a task over HTTP and return its JSON."""
    def make(**fields):
        body = {"work_directory": "/repo", "prompt": "fix the bug", **fields}
        return client.post_json("/api/v1/tasks", body, status=201).json["data"]
    return make


@pytest.fixture
def claim(client):
    """Claim over HTTP and return the task JSON or None."""
    def claim(work_path="/repo", worker_id="w1"):
        query = {"work_path": work_path, "worker_id": worker_id}
        return client.get("/api/v1/tasks/next", query, status=200).json["data"]
    return claim


def task_url(task, action=""):
    return f"/api/v1/tasks/{task['id']}" + (f"/{action}" if action else "")


def statistics(client):
    return client.get("/api/v1/statistics").json["data"]


# ---------------------------------------------------------------------------
# Creating tasks
# ---------------------------------------------------------------------------

TASK_FIELDS = {
    "id", "work_directory", "prompt", "priority", "tags", "metadata", "status", "worker_id",
    "created_at", "updated_at", "started_at", "completed_at", "lease_expires_at", "result",
    "error_message", "retry_count", "max_retries", "progress", "progress_at", "not_before",
    "depends_on", "blocked_by",
}


def test_create_answers_201_with_location_and_every_field(client):
    body = {"work_directory": "/repo", "prompt": "write tests"}
    res = client.post_json("/api/v1/tasks", body, status=201)
    task = res.json["data"]
    assert res.json["success"] is True and res.json["error"] is None
    assert res.headers["Location"] == f"/api/v1/tasks/{task['id']}"
    assert set(task) == TASK_FIELDS
    assert uuid.UUID(task["id"]).version == 4
    assert task["status"] == "waiting"
    assert task["created_at"].endswith("Z") and task["started_at"] is None


def test_create_fills_defaults_from_declaration_and_config(make_task):
    task = make_task()
    assert task["priority"] == "medium"
    assert task["tags"] == [] and task["metadata"] == {}
    assert task["max_retries"] == 2  # the store's setting
    assert task["retry_count"] == 0 and task["worker_id"] is None


def test_every_timestamp_is_rfc3339_utc(make_task, clock):
    task = make_task()
    assert task["created_at"] == "2027-01-15T08:00:00.000Z"
    assert clock.now == 1_800_000_000.0


def test_answers_made_under_the_lock_show_what_a_snapshot_shows(client, make_task, claim,
                                                                store, clock):
    # create, claim, get and complete answer through Task.to_dict under the lock, not
    # from a snapshot: at every step the answer is the snapshot's dict.
    created = make_task(tags=["a", "b"], metadata={"k": [1, {"x": None}]}, delay_seconds=5)
    assert created == store.get(created["id"]).to_dict()
    clock.advance(7.0004)
    claimed = claim()
    assert claimed == {**store.get(claimed["id"]).to_dict(), "lease_token": claimed["lease_token"]}
    clock.advance(1.5)
    read = client.get(task_url(claimed)).json["data"]
    assert read == store.get(claimed["id"]).to_dict()
    clock.advance(2.25)
    done = client.post_json(task_url(claimed, "complete"), {
        "lease_token": claimed["lease_token"], "result": {"output": "ok", "duration_ms": 3}},
    ).json["data"]
    assert done == store.get(claimed["id"]).to_dict()
    assert done["completed_at"] == orchestrator._rfc3339(clock()) != done["started_at"]
    assert done["result"] == {"status": "success", "output": "ok", "duration_ms": 3}


def test_a_remembered_timestamp_reads_as_a_fresh_one(make_task, clock):
    # Instants are formatted once while recent; the same instant reads the same either way.
    orchestrator._remembered_instant.cache_clear()
    first = make_task()
    assert orchestrator._remembered_instant.cache_info().currsize >= 1
    assert first["created_at"] == orchestrator._instant(clock()) == "2027-01-15T08:00:00.000Z"
    clock.advance(0.0015)
    assert make_task()["created_at"] == "2027-01-15T08:00:00.001Z"


@pytest.mark.parametrize("instant", [
    0.0, 1e-20, -1e-20, 0.0004999, 0.0005, 0.9995, 0.9999995, 1.9999995, -0.9999995, -1.5,
    1_800_000_000.0005, 1_767_225_599.9999995, 1_767_225_599.9995, 253_402_300_799.999,
    -2_208_988_800.25, -0.0010005, -0.1130005, -60.9999995,
])
def test_an_instant_reads_as_datetime_shows_it_to_the_millisecond(instant):
    assert orchestrator._instant(instant) == as_datetime_shows(instant)


def test_instants_read_as_datetime_shows_them_over_many_random_ones():
    spread = random.Random(7)
    for _ in range(20_000):
        # Across the years, and densely around 1970, where the fraction is negative.
        instant = spread.choice([spread.uniform(-3e9, 5e9), spread.uniform(-61, 61)])
        assert orchestrator._instant(instant) == as_datetime_shows(instant)


@pytest.mark.parametrize("value", [
    {"prompt": "naïve café ✓", "tags": ["a", "b"], "n": 3, "x": 1.5, "none": None, "yes": True},
    ["\u2028", "\x7f", "\ud800", {"nested": [[], {}]}], "text", 0, -2.25, None, False,
    [float("nan"), float("inf"), -0.0, 10 ** 30], {1: "a", 2.5: "b", None: "c", True: "d"},
])
@pytest.mark.parametrize("ascii_only", [True, False])
@pytest.mark.parametrize("with_c_encoder", [True, False])
def test_the_json_encoders_write_what_json_dumps_writes(monkeypatch, value, ascii_only,
                                                         with_c_encoder):
    if not with_c_encoder:  # an interpreter without json's C part
        monkeypatch.setattr(json.encoder, "c_make_encoder", None)
    assert orchestrator._json_encoder(ascii_only)(value) == json.dumps(value, ensure_ascii=ascii_only)


@pytest.mark.parametrize("ascii_only", [True, False])
def test_the_json_encoders_refuse_what_json_cannot_hold(ascii_only):
    with pytest.raises(TypeError, match="not JSON serializable"):
        orchestrator._json_encoder(ascii_only)({"when": datetime.datetime.now()})


def as_datetime_shows(instant: float) -> str:
    """The instant as datetime writes it in UTC, to the millisecond, ending in Z."""
    shown = datetime.datetime.fromtimestamp(instant, datetime.timezone.utc)
    return shown.isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"


@pytest.mark.parametrize("given, stored", [
    ("/a//b/", "/a/b"),
    ("/a/./b/../c", "/a/c"),
    ("//srv//x", "/srv/x"),
    ("/", "/"),
    ("C:/x//y/", "C:\\x\\y"),
    ("c:\\Users\\me\\", "c:\\Users\\me"),
])
def test_work_directory_is_stored_normalized(make_task, given, stored):
    assert make_task(work_directory=given)["work_directory"] == stored


def test_priority_is_case_insensitive_and_tags_drop_duplicates(make_task):
    task = make_task(priority="HiGh", tags=["b", "a", "b", "c", "a"])
    assert task["priority"] == "high"
    assert task["tags"] == ["b", "a", "c"]


def test_prompt_is_stored_verbatim(make_task):
    prompt = "  line one\n\tline two — ünïcode ✓  "
    assert make_task(prompt=prompt)["prompt"] == prompt


def test_an_integral_number_counts_as_an_integer(make_task):
    assert make_task(max_retries=3.0)["max_retries"] == 3


def test_limits_themselves_are_accepted(make_task):
    deep = {}
    for _ in range(31):
        deep = {"x": deep}
    task = make_task(
        work_directory="/" + "d" * 999,
        prompt="p" * 100_000,
        tags=[f"{i:050d}" for i in range(20)],
        metadata=deep,
        max_retries=100,
    )
    assert len(task["work_directory"]) == 1000 and len(task["prompt"]) == 100_000
    assert make_task(max_retries=0)["max_retries"] == 0


def nested(levels):
    value = {}
    for _ in range(levels - 1):
        value = {"x": value}
    return value


@pytest.mark.parametrize("field, value, rule", [
    ("work_directory", None, "work_directory: must be a string"),
    ("work_directory", "", "work_directory: must not be empty"),
    ("work_directory", "relative/path", "work_directory: must be an absolute path"),
    ("work_directory", "/a\x00b", "work_directory: must be an absolute path"),
    ("work_directory", "/a\nb", "work_directory: must be an absolute path"),
    ("work_directory", "C:relative", "work_directory: must be an absolute path"),
    ("work_directory", "/" + "d" * 1000, "work_directory: must be at most 1000 characters"),
    ("work_directory", ["/a"], "work_directory: must be a string"),
    ("prompt", "", "prompt: must not be empty"),
    ("prompt", " \n\t ", "prompt: must not be only whitespace"),
    ("prompt", "p" * 100_001, "prompt: must be at most 100000 characters"),
    ("prompt", 42, "prompt: must be a string"),
    ("prompt", "bad \ud800 surrogate", "prompt: must be valid Unicode"),
    ("priority", "urgent", "priority: must be one of high, medium, low"),
    ("priority", 1, "priority: must be a string"),
    ("tags", "a,b", "tags: must be an array"),
    ("tags", [str(i) for i in range(21)], "tags: must have at most 20 items"),
    ("tags", [""], "tags[0]: must not be empty"),
    ("tags", ["ok", "t" * 51], "tags[1]: must be at most 50 characters"),
    ("tags", [1], "tags[0]: must be a string"),
    ("metadata", [], "metadata: must be an object"),
    ("metadata", "x", "metadata: must be an object"),
    ("metadata", nested(33), "metadata: must not nest deeper than 32 levels"),
    ("max_retries", -1, "max_retries: must be at least 0"),
    ("max_retries", 101, "max_retries: must be at most 100"),
    ("max_retries", 10**30, "max_retries: must be at most 100"),
    ("max_retries", 1.5, "max_retries: must be an integer"),
    ("max_retries", 1e300, "max_retries: must be at most 100"),
    ("max_retries", True, "max_retries: must be an integer"),
    ("max_retries", "3", "max_retries: must be an integer"),
])
def test_create_rejects_invalid_field_naming_it(client, store, field, value, rule):
    body = {"work_directory": "/repo", "prompt": "p", field: value}
    res = client.post_json("/api/v1/tasks", body, status=400)
    assert res.json["success"] is False and res.json["data"] is None
    assert res.json["error"]["code"] == "VALIDATION_ERROR"
    assert res.json["error"]["message"].startswith(rule)
    assert res.json["error"]["details"]["field"].startswith(field)
    assert store.statistics()["total_tasks"] == 0


def test_a_result_reads_back_in_its_declared_order_whatever_order_it_was_sent(
        client, make_task, claim):
    make_task()
    task = claim()
    done = client.post_json(task_url(task, "complete"), {
        "lease_token": task["lease_token"], "result": {"duration_ms": 5, "output": "done"},
    }).json["data"]
    assert list(done["result"]) == ["status", "output", "duration_ms"]
    assert list(client.get(task_url(task)).json["data"]["result"]) == list(done["result"])


@pytest.mark.parametrize("body", [
    {"prompt": 5, "work_directory": "relative"},
    {"work_directory": "relative", "prompt": 5},
    {"prompt": 5},  # the missing work_directory comes first
    {"tags": "x", "prompt": "p"},
])
def test_a_bad_body_is_refused_for_its_first_bad_field_as_declared_in_any_order_sent(
        client, store, body):
    res = client.post("/api/v1/tasks", json.dumps(body), content_type="application/json",
                      status=400)
    assert res.json["error"]["details"]["field"] == "work_directory"
    assert store.statistics()["total_tasks"] == 0


@pytest.mark.parametrize("body", [
    b'{"work_directory": "/r", "prompt": "p", "metadata": {"x": 1e400}}',
    b'{"work_directory": "/r", "prompt": "p", "metadata": {"x": [-1E+999]}}',
])
def test_a_number_too_large_for_json_output_is_a_400(client, store, body):
    res = client.post("/api/v1/tasks", body, content_type="application/json", status=400)
    assert "too large a number" in res.json["error"]["message"]
    assert store.statistics()["total_tasks"] == 0


@pytest.mark.parametrize("field, value", [
    ("work_directory", "/tmp/x\u009b"), ("work_directory", "/tmp/x\u2028y"),
])
def test_a_directory_with_any_control_character_is_rejected(client, store, field, value):
    client.post_json("/api/v1/tasks", {"work_directory": value, "prompt": "p"}, status=400)
    assert store.statistics()["total_tasks"] == 0


@pytest.mark.parametrize("worker_id", ["w\u0085", "w\u2029"])
def test_a_worker_id_with_any_control_character_is_rejected(client, make_task, worker_id):
    make_task()
    client.get("/api/v1/tasks/next", {"work_path": "/repo", "worker_id": worker_id}, status=400)


@pytest.mark.parametrize("missing", ["work_directory", "prompt"])
def test_create_requires_directory_and_prompt(client, store, missing):
    body = {"work_directory": "/repo", "prompt": "p"}
    del body[missing]
    res = client.post_json("/api/v1/tasks", body, status=400)
    assert res.json["error"]["message"] == f"{missing}: is required"
    assert store.statistics()["total_tasks"] == 0


def test_create_rejects_unknown_fields_listing_them(client, store):
    body = {"work_directory": "/r", "prompt": "p", "id": "x", "status": "completed",
            "retry_count": 5}
    error = client.post_json("/api/v1/tasks", body, status=400).json["error"]
    assert error["message"].startswith("unknown fields: id, retry_count, status")
    assert error["details"]["fields"] == ["id", "retry_count", "status"]
    assert store.statistics()["total_tasks"] == 0


@pytest.mark.parametrize("raw, message", [
    (b"[]", "request body must be a JSON object"),
    (b'"text"', "request body must be a JSON object"),
    (b"null", "request body must be a JSON object"),
    (b"12", "request body must be a JSON object"),
    (b"{", "request body is not valid JSON"),
    (b'{"prompt": NaN}', "request body is not valid JSON"),
    (b'{"max_retries": Infinity}', "request body is not valid JSON"),
    (b"\xff\xfe{}", "request body is not valid UTF-8"),
    (b'{"max_retries": ' + b"9" * 5000 + b"}", "request body is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "request body"),
])
def test_malformed_body_is_a_400_not_a_500(client, store, raw, message):
    res = client.post("/api/v1/tasks", raw, content_type="application/json", status=400)
    assert res.json["error"]["code"] == "VALIDATION_ERROR"
    assert res.json["error"]["message"].startswith(message)
    assert store.statistics()["total_tasks"] == 0


def test_idempotency_key_returns_first_task_with_200(client, store):
    body = {"work_directory": "/repo", "prompt": "once"}
    headers = {"Idempotency-Key": "req-1"}
    first = client.post_json("/api/v1/tasks", body, headers=headers, status=201).json["data"]
    again = client.post_json("/api/v1/tasks", body, headers=headers, status=200).json["data"]
    assert again["id"] == first["id"]
    assert store.statistics()["total_tasks"] == 1


def test_idempotency_key_with_a_different_body_conflicts(client, store):
    headers = {"Idempotency-Key": "req-1"}
    first = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "a"},
                             headers=headers).json["data"]
    res = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "b"},
                           headers=headers, status=409)
    assert res.json["error"]["code"] == "CONFLICT"
    assert res.json["error"]["details"]["task_id"] == first["id"]
    assert store.statistics()["total_tasks"] == 1


@pytest.mark.parametrize("key", ["", "k" * 201, "caf\u00e9", "tab\tinside"])
def test_idempotency_key_length_is_checked(client, store, key):
    res = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "a"},
                           headers={"Idempotency-Key": key}, status=400)
    assert res.json["error"]["details"]["field"] == "Idempotency-Key"
    assert store.statistics()["total_tasks"] == 0


def test_deleting_a_task_frees_its_idempotency_key(client):
    body, headers = {"work_directory": "/r", "prompt": "a"}, {"Idempotency-Key": "k"}
    first = client.post_json("/api/v1/tasks", body, headers=headers, status=201).json["data"]
    client.delete(task_url(first))
    second = client.post_json("/api/v1/tasks", body, headers=headers, status=201).json["data"]
    assert second["id"] != first["id"]


# ---------------------------------------------------------------------------
# Claiming
# ---------------------------------------------------------------------------

def test_claim_sets_holder_start_and_lease(make_task, claim, clock):
    make_task()
    task = claim(worker_id="agent-7")
    assert task["status"] == "working" and task["worker_id"] == "agent-7"
    assert task["started_at"] == "2027-01-15T08:00:00.000Z"
    assert task["lease_expires_at"] == "2027-01-15T08:01:00.000Z"  # task_timeout 60


def test_claim_answers_null_when_nothing_waits(client, claim):
    res = client.get("/api/v1/tasks/next", {"work_path": "/repo", "worker_id": "w"})
    assert res.json == {**res.json, "success": True, "data": None, "error": None}


def test_claim_prefers_high_priority_then_oldest(make_task, claim):
    low = make_task(priority="low")
    medium_1 = make_task(priority="medium")
    high = make_task(priority="high")
    medium_2 = make_task(priority="medium")
    order = [claim()["id"] for _ in range(4)]
    assert order == [high["id"], medium_1["id"], medium_2["id"], low["id"]]
    assert claim() is None


def test_claim_only_sees_its_own_work_directory(make_task, claim):
    mine = make_task(work_directory="/repo")
    make_task(work_directory="/other")
    assert claim(work_path="/repo/")["id"] == mine["id"]  # matched after normalizing
    assert claim(work_path="/repo") is None
    assert claim(work_path="/repo/sub") is None


def test_requeued_task_goes_to_the_back_of_its_priority(client, make_task, claim):
    first = make_task()
    second = make_task()
    held = claim()
    assert held["id"] == first["id"]
    client.post_json(task_url(held, "fail"), {"error": "flaky"})
    assert [claim()["id"], claim()["id"]] == [second["id"], first["id"]]


def test_a_task_is_held_by_one_worker_at_a_time(make_task, claim):
    make_task()
    assert claim(worker_id="a") is not None
    assert claim(worker_id="b") is None


@pytest.mark.parametrize("query, field", [
    ({"worker_id": "w"}, "work_path"),
    ({"work_path": "/r"}, "worker_id"),
    ({"work_path": "relative", "worker_id": "w"}, "work_path"),
    ({"work_path": "/r", "worker_id": ""}, "worker_id"),
    ({"work_path": "/r", "worker_id": "x" * 101}, "worker_id"),
    ({"work_path": "/r", "worker_id": "tab\there"}, "worker_id"),
    ({"work_path": "/r", "worker_id": "w", "limit": "1"}, "limit"),
])
def test_claim_rejects_a_bad_query_naming_the_parameter(client, make_task, store, query, field):
    make_task(work_directory="/r")
    res = client.get("/api/v1/tasks/next", query, status=400)
    assert field in res.json["error"]["message"]
    assert store.statistics()["waiting_tasks"] == 1


@pytest.mark.parametrize("query", ["work_path=/r%FF&worker_id=w", "work_path=/r&worker_id=%C3"])
def test_a_query_value_that_is_not_utf8_is_a_400_naming_the_parameter(client, make_task, store,
                                                                       query):
    make_task(work_directory="/r")
    res = client.get("/api/v1/tasks/next?" + query, status=400)
    name = "work_path" if "%FF" in query else "worker_id"
    assert res.json["error"]["message"] == f"{name}: must be valid UTF-8"
    assert res.json["error"]["details"]["field"] == name
    assert store.statistics()["waiting_tasks"] == 1


def test_remembered_queries_stay_few_and_answer_as_a_fresh_check_does(client, make_task):
    # A worker's repeated claim query is checked once; a remembered one still gives
    # exactly what it gave, and a bad query is never remembered.
    for n in range(300):
        client.get("/api/v1/tasks", {"tag": f"t{n}", "limit": 1})
    assert len(orchestrator._checked_queries) <= 256
    make_task(work_directory="/a/b")
    query = {"work_path": "/a//b/", "worker_id": "w"}
    assert client.get("/api/v1/tasks/next", query).json["data"]["work_directory"] == "/a/b"
    assert client.get("/api/v1/tasks/next", query).json["data"] is None  # the same, again
    client.get("/api/v1/tasks/next", {**query, "wait": "21"}, status=400)
    assert client.get("/api/v1/tasks/next", {**query, "wait": "21"}, status=400).json[
        "error"]["details"]["field"] == "wait"


def test_a_query_name_that_is_not_utf8_is_a_400(client):
    res = client.get("/api/v1/tasks?%FF=1", status=400)
    assert "UTF-8" in res.json["error"]["message"]


def test_a_query_parameter_without_a_name_is_a_400_saying_so(client):
    res = client.get("/api/v1/tasks?=1", status=400)
    assert res.json["error"]["message"] == "query parameter names must not be empty"


def test_an_unknown_query_parameter_given_twice_is_refused_as_unknown(client):
    res = client.get("/api/v1/tasks?colour=red&colour=red", status=400)
    assert res.json["error"]["message"].startswith("unknown fields: colour; allowed: ")


def test_a_percent_encoded_utf8_query_value_is_decoded(client, make_task):
    make_task(work_directory="/caf\u00e9")
    task = client.get("/api/v1/tasks/next?work_path=/caf%C3%A9&worker_id=w").json["data"]
    assert task["work_directory"] == "/caf\u00e9"


def test_an_integer_query_takes_ascii_digits_only(client):
    res = client.get("/api/v1/tasks?limit=%D9%A1", status=400)  # ARABIC-INDIC DIGIT ONE
    assert res.json["error"]["details"]["field"] == "limit"


def test_repeated_query_parameter_is_rejected(client):
    res = client.get("/api/v1/tasks/next?work_path=/a&work_path=/b&worker_id=w", status=400)
    assert res.json["error"]["message"] == "work_path: must be given at most once"


# ---------------------------------------------------------------------------
# Completing, failing, heartbeats and leases
# ---------------------------------------------------------------------------

def test_complete_stores_the_result_and_finishes(client, make_task, claim, clock):
    make_task()
    held = claim()
    clock.advance(12.5)
    result = {"status": "success", "output": "done", "duration_ms": 12500, "metadata": {"k": 1}}
    task = client.post_json(task_url(held, "complete"),
                            {"worker_id": "w1", "original_prompt": "fix the bug",
                             "result": result}).json["data"]
    assert task["status"] == "completed" and task["result"] == result
    assert task["completed_at"] == "2027-01-15T08:00:12.500Z"
    assert task["lease_expires_at"] is None and task["worker_id"] == "w1"
    assert statistics(client)["average_duration_ms"] == 12500.0


def test_complete_without_a_result_means_success_with_empty_output(client, make_task, claim):
    make_task()
    task = client.post(task_url(claim(), "complete")).json["data"]
    assert task["result"] == {"status": "success", "output": ""}
    assert task["status"] == "completed"


def test_complete_with_failure_status_counts_as_a_failure(client, make_task, claim):
    make_task()
    held = claim()
    task = client.post_json(task_url(held, "complete"),
                            {"result": {"status": "failure", "output": "tests fail"}}).json["data"]
    assert task["status"] == "waiting" and task["retry_count"] == 1
    assert task["error_message"] == "tests fail" and task["worker_id"] is None


@pytest.mark.parametrize("body, message", [
    ({"worker_id": "intruder"}, "not held by worker intruder"),
    ({"original_prompt": "something else"}, "original_prompt does not match"),
])
def test_complete_refuses_a_mismatch_with_409(client, make_task, claim, body, message):
    make_task()
    held = claim()
    res = client.post_json(task_url(held, "complete"), body, status=409)
    assert message in res.json["error"]["message"]
    assert client.get(task_url(held)).json["data"]["status"] == "working"


@pytest.mark.parametrize("action, body", [
    ("complete", {}),
    ("fail", {"error": "x"}),
    ("heartbeat", {"worker_id": "w1"}),
])
def test_reports_on_a_task_that_is_not_working_conflict(client, make_task, action, body):
    task = make_task()
    res = client.post_json(task_url(task, action), body, status=409)
    assert res.json["error"]["message"] == (
        f"task {task['id']} is waiting; can only report on a working task"
    )


def test_result_is_validated_against_its_declaration(client, make_task, claim):
    make_task()
    held = claim()
    for result, message in [
        ({"status": "meh"}, "result.status: must be one of success, failure"),
        ({"duration_ms": -1}, "result.duration_ms: must be at least 0"),
        ({"extra": 1}, "unknown fields: result.extra"),
        ("done", "result: must be an object"),
    ]:
        res = client.post_json(task_url(held, "complete"), {"result": result}, status=400)
        assert res.json["error"]["message"].startswith(message)
    assert client.get(task_url(held)).json["data"]["status"] == "working"


def test_failures_requeue_until_max_retries_then_fail(client, make_task, claim):
    task = make_task(max_retries=2)
    for attempt in (1, 2):
        held = claim()
        again = client.post_json(task_url(held, "fail"), {"error": f"boom {attempt}"}).json["data"]
        assert again["status"] == "waiting" and again["retry_count"] == attempt
        assert again["error_message"] == f"boom {attempt}"
    final = client.post_json(task_url(claim(), "fail"), {"error": "boom 3"}).json["data"]
    assert final["status"] == "failed" and final["retry_count"] == 2
    assert final["completed_at"] is not None and final["worker_id"] == "w1"
    assert claim() is None
    assert statistics(client)["retries_total"] == 2
    assert task["id"] == final["id"]


def test_fail_with_retry_false_is_final_at_once(client, make_task, claim):
    make_task()
    task = client.post_json(task_url(claim(), "fail"), {"error": "fatal", "retry": False}).json
    assert task["data"]["status"] == "failed" and task["data"]["retry_count"] == 0


@pytest.mark.parametrize("body, message", [
    ({}, "error: is required"),
    ({"error": ""}, "error: must not be empty"),
    ({"error": "x", "retry": "no"}, "retry: must be a boolean"),
    ({"error": "x", "worker_id": 5}, "worker_id: must be a string"),
])
def test_fail_validates_its_body(client, make_task, claim, body, message):
    make_task()
    held = claim()
    res = client.post_json(task_url(held, "fail"), body, status=400)
    assert res.json["error"]["message"] == message
    assert client.get(task_url(held)).json["data"]["status"] == "working"


def test_fail_by_another_worker_conflicts(client, make_task, claim):
    make_task()
    held = claim(worker_id="owner")
    client.post_json(task_url(held, "fail"), {"error": "x", "worker_id": "other"}, status=409)
    assert client.get(task_url(held)).json["data"]["status"] == "working"


def test_expired_lease_requeues_the_task(client, make_task, claim, clock):
    make_task()
    held = claim()
    clock.advance(60)
    task = client.get(task_url(held)).json["data"]
    assert task["status"] == "waiting" and task["retry_count"] == 1
    assert task["error_message"] == "lease expired"
    assert task["worker_id"] is None and task["lease_expires_at"] is None
    assert statistics(client)["expired_leases_total"] == 1


def test_expired_lease_past_the_limit_fails_the_task(client, make_task, claim, clock):
    make_task(max_retries=0)
    held = claim()
    clock.advance(61)
    task = client.get(task_url(held)).json["data"]
    assert task["status"] == "failed" and task["error_message"] == "lease expired"


@pytest.mark.parametrize("action, body", [
    ("complete", {"worker_id": "slow"}),
    ("fail", {"error": "late", "worker_id": "slow"}),
    ("heartbeat", {"worker_id": "slow"}),
])
def test_former_holder_is_refused_after_its_lease_expired(client, make_task, claim, clock,
                                                          action, body):
    make_task()
    held = claim(worker_id="slow")
    clock.advance(61)
    assert claim(worker_id="fast")["id"] == held["id"]  # delivered again
    client.post_json(task_url(held, action), body, status=409)
    task = client.get(task_url(held)).json["data"]
    assert task["status"] == "working" and task["worker_id"] == "fast"


def test_heartbeat_extends_the_lease(client, make_task, claim, clock):
    make_task()
    held = claim()
    clock.advance(50)
    task = client.post_json(task_url(held, "heartbeat"), {"worker_id": "w1"}).json["data"]
    assert task["lease_expires_at"] == "2027-01-15T08:01:50.000Z"
    clock.advance(50)  # past the first lease, within the second
    assert client.get(task_url(held)).json["data"]["status"] == "working"
    clock.advance(10)
    assert client.get(task_url(held)).json["data"]["status"] == "waiting"


@pytest.mark.parametrize("body, status", [({}, 400), ({"worker_id": "other"}, 409)])
def test_heartbeat_needs_the_holders_worker_id(client, make_task, claim, body, status):
    make_task()
    held = claim()
    client.post_json(task_url(held, "heartbeat"), body, status=status)
    assert client.get(task_url(held)).json["data"]["lease_expires_at"] == held["lease_expires_at"]


def test_release_puts_the_task_first_in_its_priority_without_counting_a_retry(
        client, make_task, claim):
    first = make_task(prompt="first")
    make_task(prompt="second")
    make_task(prompt="urgent", priority="high")
    assert claim()["prompt"] == "urgent"
    held = claim(worker_id="w2")
    assert held["prompt"] == "first"
    released = client.post_json(task_url(first, "release"), {"worker_id": "w2"}).json["data"]
    assert released["status"] == "waiting" and released["retry_count"] == 0
    assert released["worker_id"] is None and released["lease_expires_at"] is None
    assert claim()["prompt"] == "first"  # ahead of "second", which waited longer
    assert statistics(client)["retries_total"] == 0


def test_release_with_max_retries_zero_does_not_fail_the_task(client, make_task, claim):
    task = make_task(max_retries=0)
    claim()
    assert client.post_json(task_url(task, "release"), {"worker_id": "w1"}).json["data"][
        "status"] == "waiting"


@pytest.mark.parametrize("body, status", [({}, 400), ({"worker_id": "other"}, 409),
                                          ({"worker_id": "w1", "extra": 1}, 400)])
def test_release_needs_the_holder(client, make_task, claim, store, body, status):
    task = make_task()
    claim()
    client.post_json(task_url(task, "release"), body, status=status)
    assert store.get(task["id"]).status == "working"


def test_release_of_a_task_that_is_not_working_conflicts(client, make_task):
    client.post_json(task_url(make_task(), "release"), {"worker_id": "w1"}, status=409)


def test_heartbeat_progress_is_kept_shown_and_cleared_on_requeue(client, make_task, claim, clock):
    task = make_task()
    claim()
    beat = client.post_json(task_url(task, "heartbeat"),
                            {"worker_id": "w1", "progress": "step 2 of 5"}).json["data"]
    assert beat["progress"] == "step 2 of 5" and beat["progress_at"].endswith("Z")
    assert client.get(task_url(task)).json["data"]["progress"] == "step 2 of 5"
    assert client.get("/api/v1/tasks").json["data"]["tasks"][0]["progress"] == "step 2 of 5"
    client.post_json(task_url(task, "heartbeat"), {"worker_id": "w1"})  # keeps the last word
    assert client.get(task_url(task)).json["data"]["progress"] == "step 2 of 5"
    requeued = client.post_json(task_url(task, "fail"), {"worker_id": "w1", "error": "x"}).json
    assert requeued["data"]["progress"] is None and requeued["data"]["progress_at"] is None


def test_heartbeat_progress_is_at_most_4000_characters(client, make_task, claim):
    task = make_task()
    claim()
    res = client.post_json(task_url(task, "heartbeat"), {"worker_id": "w1", "progress": "x" * 4001},
                           status=400)
    assert res.json["error"]["details"]["field"] == "progress"


def test_directory_concurrency_holds_claims_until_a_task_finishes(clock):
    store = TaskStore(directory_concurrency=1, clock=clock)
    first, _ = store.create({"work_directory": "/r", "prompt": "one"})
    store.create({"work_directory": "/r", "prompt": "two"})
    store.create({"work_directory": "/other", "prompt": "three"})
    assert store.claim("/r", "a").id == first.id
    assert store.claim("/r", "b") is None  # one is working there already
    assert store.claim("/other", "c") is not None  # other directories are not held up
    store.complete(first.id)
    assert store.claim("/r", "b").prompt == "two"


def test_directory_concurrency_wakes_a_waiting_claim_when_a_task_finishes():
    store = TaskStore(directory_concurrency=1)
    first, _ = store.create({"work_directory": "/r", "prompt": "one"})
    store.create({"work_directory": "/r", "prompt": "two"})
    store.claim("/r", "a")
    waiter = Background(store.claim, "/r", "b", 10)
    waiter.start()
    wait_until(lambda: store.waiting_requests == 1)
    store.fail(first.id, {"error": "x", "retry": False})
    assert waiter.finish().prompt == "two" and waiter.seconds < 5


def test_directory_concurrency_comes_from_the_setting():
    config = Config.from_env({"APP_TASK_DIRECTORY_CONCURRENCY": "1"})
    assert TaskStore.from_config(config).directory_concurrency == 1
    with pytest.raises(ConfigError, match="APP_TASK_DIRECTORY_CONCURRENCY"):
        Config.from_env({"APP_TASK_DIRECTORY_CONCURRENCY": "-1"})


def test_statistics_never_show_an_expired_lease_as_held(client, make_task, claim, clock):
    make_task()
    claim()
    assert statistics(client)["working_tasks"] == 1
    clock.advance(60)
    stats = statistics(client)
    assert stats["working_tasks"] == 0 and stats["waiting_tasks"] == 1


# ---------------------------------------------------------------------------
# Dependencies
# ---------------------------------------------------------------------------

def make(store, prompt, *after, directory="/r"):
    """A task in the store that depends on the given ones."""
    return store.create({"work_directory": directory, "prompt": prompt,
                         "depends_on": [task.id for task in after]})[0]


def finish(store, task, how="complete"):
    """Claim a task (it must be the next one) and complete or fail it for good."""
    held = store.claim(task.work_directory, "w")
    assert held.id == task.id
    if how == "complete":
        store.complete(task.id, {"lease_token": held.lease_token})
    else:
        store.fail(task.id, {"lease_token": held.lease_token, "error": "broke", "retry": False})


def test_a_diamond_runs_in_dependency_order(store):
    a = make(store, "a")
    b, c = make(store, "b", a), make(store, "c", a)
    d = make(store, "d", b, c)
    assert store.get(d.id).blocked_by == [b.id, c.id]
    assert store.statistics()["blocked_tasks"] == 3
    finish(store, a)
    assert store.get(b.id).blocked_by == [] and store.get(d.id).blocked_by == [b.id, c.id]
    finish(store, b)
    assert store.claim("/r", "w").id == c.id  # d is still blocked by c
    store.complete(c.id)
    assert store.claim("/r", "w").id == d.id


def test_an_unblocked_task_takes_its_place_by_creation(store):
    first = make(store, "first")
    blocked = make(store, "blocked", first)
    later = make(store, "later")
    finish(store, first)
    assert [store.claim("/r", "w").id for _ in range(2)] == [blocked.id, later.id]


@pytest.mark.parametrize("end, why", [
    (lambda store, task: finish(store, task, "fail"), "failed"),
    (lambda store, task: store.cancel(task.id), "was cancelled"),
    (lambda store, task: store.delete(task.id), "was deleted"),
])
def test_the_end_of_a_dependency_cancels_its_dependents_transitively(store, end, why):
    a = make(store, "a")
    b = make(store, "b", a)
    c = make(store, "c", b)
    unrelated = make(store, "unrelated")
    end(store, a)
    for task in (b, c):
        cancelled = store.get(task.id)
        assert cancelled.status == "cancelled"
        assert a.id in cancelled.error_message and why in cancelled.error_message
    assert store.get(unrelated.id).status == "waiting"


def test_a_failure_that_is_retried_cancels_nothing(store):
    a = store.create({"work_directory": "/r", "prompt": "a", "max_retries": 1})[0]
    b = make(store, "b", a)
    held = store.claim("/r", "w")
    store.fail(a.id, {"lease_token": held.lease_token, "error": "flaky"})
    assert store.get(b.id).status == "waiting" and store.get(b.id).blocked_by == [a.id]


def test_retrying_a_cascaded_task_waits_for_its_dependency_again(store):
    a = make(store, "a")
    b = make(store, "b", a)
    finish(store, a, "fail")
    store.retry(a.id)  # does not revive b
    assert store.get(b.id).status == "cancelled"
    store.retry(b.id)
    assert store.get(b.id).blocked_by == [a.id]
    finish(store, a)
    assert store.claim("/r", "w").id == b.id


def test_a_blocked_task_cancelled_by_a_person_stays_as_it_was_when_its_dependency_ends(store):
    a = make(store, "a")
    b = make(store, "b", a)
    c = make(store, "c", a)
    store.cancel(b.id, {"reason": "not needed"})
    assert store.get(b.id).blocked_by == []
    finish(store, a)
    assert (store.get(b.id).status, store.get(b.id).error_message) == ("cancelled", "not needed")
    d = make(store, "d", directory="/s")
    e = make(store, "e", d, directory="/s")
    store.cancel(e.id, {"reason": "mine"})
    finish(store, d, "fail")
    assert store.get(e.id).error_message == "mine"  # not cancelled twice
    assert store.get(c.id).status == "waiting" and store.get(c.id).blocked_by == []


def test_a_bulk_retry_takes_dependents_and_their_failed_dependencies_together(store):
    a = store.create({"work_directory": "/r", "prompt": "a", "max_retries": 0})[0]
    b = make(store, "b", a)
    finish(store, a, "fail")
    answer = store.bulk({"action": "retry", "filter": {"status": "failed,cancelled"}})
    assert (answer["changed"], answer["skipped"]) == (2, 0)
    assert store.get(b.id).blocked_by == [a.id] and store.claim("/r", "w").id == a.id


@pytest.mark.parametrize("dependency_completed", [False, True])
def test_retrying_a_task_whose_dependency_is_gone_conflicts_saying_so(store,
                                                                      dependency_completed):
    # Whether it completed first is not kept, so the message claims neither.
    a = make(store, "a")
    b = make(store, "b", a)
    if dependency_completed:
        finish(store, a, "complete")
    store.delete(a.id)
    if dependency_completed:
        store.cancel(b.id)  # else cancelled with the deletion
    with pytest.raises(Conflict) as refused:
        store.retry(b.id)
    assert str(refused.value) == (
        f"task {b.id} depends on task {a.id}, which is gone (deleted, or dropped after "
        "retention); a task that has not run cannot be retried without its dependencies")
    assert store.get(b.id).status == "cancelled"


def test_a_retry_adds_no_backoff_even_to_a_task_cancelled_during_one(clock):
    store = TaskStore(retry_backoff=30, clock=clock)
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    held = store.claim("/r", "w")
    store.fail(task.id, {"lease_token": held.lease_token, "error": "flaky"})
    assert store.get(task.id).not_before > clock()  # backing off
    store.cancel(task.id)
    assert store.retry(task.id).not_before is None
    assert store.claim("/r", "w").id == task.id


def test_a_dependency_dropped_after_retention_cancels_the_task_still_waiting_for_it(store,
                                                                                    clock):
    a = make(store, "a")
    b = make(store, "b", a)
    finish(store, a, "fail")
    store.retry(b.id)  # waits for a to be retried, which retention is about to make impossible
    clock.advance(3600)
    cancelled = store.get(b.id)
    assert cancelled.status == "cancelled" and cancelled.blocked_by == []
    assert f"depends on task {a.id}, which was dropped after retention" == cancelled.error_message
    assert store.statistics()["blocked_tasks"] == 0


def test_a_task_that_ran_can_be_retried_after_its_completed_dependency_was_dropped(store, clock):
    a = make(store, "a")
    b = make(store, "b", a)
    finish(store, a)
    clock.advance(1800)
    finish(store, b, "fail")
    clock.advance(1800)  # a is dropped; b, which ran once a had completed, is kept
    with pytest.raises(NotFound):
        store.get(a.id)
    assert store.retry(b.id).status == "waiting"
    assert store.claim("/r", "w").id == b.id


def test_dependencies_on_a_completed_task_do_not_block(store):
    a = make(store, "a")
    finish(store, a)
    b = make(store, "b", a)
    assert store.get(b.id).blocked_by == [] and store.claim("/r", "w").id == b.id


@pytest.mark.parametrize("depends_on, status, field", [
    ([NO_SUCH_TASK], 400, "depends_on"),
    (["not-an-id"], 400, "depends_on[0]"),
    ([str(uuid.UUID(int=n)) for n in range(51)], 400, "depends_on"),
])
def test_bad_dependencies_are_refused_and_change_nothing(client, store, depends_on, status,
                                                         field):
    res = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "p",
                                             "depends_on": depends_on}, status=status)
    assert res.json["error"]["details"]["field"] == field and len(store) == 0


def test_depending_on_a_failed_task_conflicts(store):
    a = make(store, "a")
    finish(store, a, "fail")
    with pytest.raises(Conflict, match="failed"):
        make(store, "b", a)
    assert len(store) == 1


def test_dependencies_show_in_the_api_and_cannot_be_patched(client, store):
    a = make(store, "a")
    b = make(store, "b", a)
    shown = client.get(f"/api/v1/tasks/{b.id}").json["data"]
    assert shown["depends_on"] == [a.id] and shown["blocked_by"] == [a.id]
    res = client.patch_json(f"/api/v1/tasks/{b.id}", {"depends_on": []}, status=400)
    assert "depends_on" in res.json["error"]["message"]
    blocked = client.get("/api/v1/tasks", {"blocked": "true"}).json["data"]["tasks"]
    assert [task["id"] for task in blocked] == [b.id]
    free = client.get("/api/v1/tasks", {"blocked": "false"}).json["data"]["tasks"]
    assert [task["id"] for task in free] == [a.id]
    dependents = client.get("/api/v1/tasks", {"depends_on": a.id}).json["data"]["tasks"]
    assert [task["id"] for task in dependents] == [b.id]


def test_a_thousand_dependents_unblock_together(store):
    root = make(store, "root")
    dependents = [make(store, f"d{n}", root) for n in range(1000)]
    finish(store, root)
    assert store.statistics()["blocked_tasks"] == 0
    assert store.claim("/r", "w").id == dependents[0].id


# ---------------------------------------------------------------------------
# Delays and retry backoff
# ---------------------------------------------------------------------------

def test_a_delayed_task_is_waiting_but_not_claimable_until_its_time(client, store, clock):
    task = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "later",
                                              "delay_seconds": 60}).json["data"]
    assert task["status"] == "waiting" and task["not_before"] == orchestrator._rfc3339(
        clock() + 60)
    assert store.claim("/r", "w") is None
    assert statistics(client)["delayed_tasks"] == 1
    clock.advance(60)
    assert store.claim("/r", "w").id == task["id"]
    assert statistics(client)["delayed_tasks"] == 0


def test_a_due_delayed_task_keeps_its_place_by_creation(store, clock):
    first, _ = store.create({"work_directory": "/r", "prompt": "first", "delay_seconds": 10})
    second, _ = store.create({"work_directory": "/r", "prompt": "second"})
    clock.advance(10)
    assert [store.claim("/r", "w").id, store.claim("/r", "w").id] == [first.id, second.id]


def test_not_before_takes_an_rfc_3339_utc_time(client, store, clock):
    at = orchestrator._rfc3339(clock() + 30)
    task = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "p",
                                              "not_before": at}).json["data"]
    assert task["not_before"] == at and store.claim("/r", "w") is None


@pytest.mark.parametrize("fields, field", [
    ({"delay_seconds": 604_801}, "delay_seconds"),
    ({"delay_seconds": -1}, "delay_seconds"),
    ({"not_before": "tomorrow"}, "not_before"),
    ({"not_before": "2026-02-30T10:00:00Z"}, "not_before"),
    ({"not_before": "2026-12-03T10:00:00+02:00"}, "not_before"),
    ({"not_before": "2026-12-03T10:00:00Z", "delay_seconds": 5}, "delay_seconds"),
])
def test_a_bad_delay_is_a_400_naming_the_field(client, store, fields, field):
    res = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "p", **fields},
                           status=400)
    assert res.json["error"]["details"]["field"] == field and len(store) == 0


def test_a_waiting_task_can_be_delayed_and_brought_forward(client, store, clock):
    task = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "p"}).json["data"]
    client.patch_json(task_url(task), {"delay_seconds": 100})
    assert store.claim("/r", "w") is None
    client.patch_json(task_url(task), {"delay_seconds": 0})
    assert store.claim("/r", "w").id == task["id"]


def test_failures_back_off_doubling_with_jitter_up_to_the_cap(clock):
    store = TaskStore(max_retries=10, task_timeout=60, clock=clock, retry_backoff=30,
                      retry_backoff_max=100)
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    for expected in (30, 60, 100, 100):
        store.claim("/r", "w")
        failed = store.fail(task.id, {"error": "x"})
        delay = failed.not_before - clock()
        assert 0.9 * expected <= delay <= 1.1 * expected
        assert store.claim("/r", "w") is None  # not before its time
        clock.advance(delay)


def test_a_lease_that_expires_backs_off_too_but_release_and_retry_do_not(clock):
    store = TaskStore(max_retries=5, task_timeout=60, clock=clock, retry_backoff=30)
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    store.claim("/r", "w")
    clock.advance(61)
    assert store.get(task.id).not_before is not None and store.claim("/r", "w") is None
    clock.advance(40)
    held = store.claim("/r", "w")
    store.release(task.id, {"lease_token": held.lease_token})
    assert store.claim("/r", "w").id == task.id  # a release is not delayed
    store.fail(task.id, {"error": "x", "retry": False})
    store.retry(task.id)
    assert store.get(task.id).not_before is None  # nor is a person's retry


def test_without_a_backoff_setting_a_failure_is_claimable_at_once(store):
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    store.claim("/r", "w")
    store.fail(task.id, {"error": "x"})
    assert store.claim("/r", "w").id == task.id


def test_backoff_comes_from_the_settings():
    config = Config.from_env({"APP_TASK_RETRY_BACKOFF": "30",
                              "APP_TASK_RETRY_BACKOFF_MAX": "300"})
    store = TaskStore.from_config(config)
    assert (store.retry_backoff, store.retry_backoff_max) == (30, 300)


def test_a_waiting_claim_wakes_when_a_delayed_task_becomes_due():
    store = TaskStore()
    store.create({"work_directory": "/r", "prompt": "p", "delay_seconds": 1})
    claim = Background(store.claim, "/r", "w", 10)
    claim.start()
    assert claim.finish(timeout=15) is not None
    assert 0.9 <= claim.seconds < 8  # due after a second; not the whole 10 s wait


# ---------------------------------------------------------------------------
# Fencing: a lease token per claim
# ---------------------------------------------------------------------------

REPORTS = [("complete", {}), ("fail", {"error": "late"}), ("heartbeat", {}), ("release", {})]


def lease_over(res):
    """Assert that a report was refused because its lease is over."""
    assert res.json["error"]["code"] == "CONFLICT"
    assert "this lease is over" in res.json["error"]["message"]


@pytest.mark.parametrize("action, body", REPORTS)
@pytest.mark.parametrize("names_worker", [True, False])
def test_a_late_report_from_an_expired_lease_cannot_touch_the_next_holders_task(
        client, make_task, claim, clock, store, action, body, names_worker):
    task = make_task()
    first = claim(worker_id="a")
    clock.advance(61)  # a's lease expires; b claims the task
    second = claim(worker_id="b")
    late = {**body, "lease_token": first["lease_token"]}
    if names_worker:
        late["worker_id"] = "a"
    lease_over(client.post_json(task_url(task, action), late, status=409))
    held = store.get(task["id"])
    assert (held.status, held.worker_id, held.result) == ("working", "b", None)
    done = client.post_json(task_url(task, "complete"), {"lease_token": second["lease_token"]})
    assert done.json["data"]["status"] == "completed"


def test_a_worker_that_claims_the_task_again_cannot_report_on_its_old_lease(
        client, make_task, claim, clock):
    task = make_task()
    old = claim(worker_id="w")
    clock.advance(61)
    new = claim(worker_id="w")  # the same name, restarted: a new lease
    assert new["id"] == task["id"] and new["lease_token"] != old["lease_token"]
    lease_over(client.post_json(task_url(task, "complete"),
                                {"worker_id": "w", "lease_token": old["lease_token"]}, status=409))
    client.post_json(task_url(task, "complete"),
                     {"worker_id": "w", "lease_token": new["lease_token"]})


@pytest.mark.parametrize("end_the_lease", [
    lambda client, task, token: client.post_json(task_url(task, "release"), {"lease_token": token}),
    lambda client, task, token: client.post_json(task_url(task, "cancel"), {}),
    lambda client, task, token: client.post_json(task_url(task, "fail"),
                                                 {"lease_token": token, "error": "x"}),
], ids=["release", "cancel", "fail"])
def test_a_token_is_refused_once_its_lease_has_ended(client, make_task, claim, store,
                                                      end_the_lease):
    task = make_task()
    token = claim()["lease_token"]
    end_the_lease(client, task, token)
    before = store.get(task["id"]).to_dict()
    for action, body in REPORTS:
        lease_over(client.post_json(task_url(task, action), {**body, "lease_token": token},
                                    status=409))
    assert store.get(task["id"]).to_dict() == before  # a refused report changes nothing


def test_a_token_and_a_worker_id_must_both_match(client, make_task, claim, store):
    task = make_task()
    token = claim(worker_id="a")["lease_token"]
    res = client.post_json(task_url(task, "complete"), {"lease_token": token, "worker_id": "b"},
                           status=409)
    assert "not held by worker b" in res.json["error"]["message"]
    assert store.get(task["id"]).status == "working"


def test_each_claim_gets_a_new_unguessable_token_shown_only_in_its_answer(
        client, make_task, claim, caplog):
    caplog.set_level(logging.DEBUG, logger="orchestrator")
    tasks = [make_task(), make_task()]
    tokens = [claim()["lease_token"], claim()["lease_token"]]
    assert tokens[0] != tokens[1] and all(len(token) >= 22 for token in tokens)
    shown = [client.get(task_url(task)).text for task in tasks] + [client.get("/api/v1/tasks").text]
    assert not any(token in text for token in tokens for text in shown + [caplog.text])
    assert all("lease_token" not in text for text in shown)


def test_heartbeat_and_release_take_a_token_instead_of_a_worker_id(client, make_task, claim):
    task = make_task()
    token = claim()["lease_token"]
    beat = client.post_json(task_url(task, "heartbeat"), {"lease_token": token}).json["data"]
    assert beat["status"] == "working"
    released = client.post_json(task_url(task, "release"), {"lease_token": token}).json["data"]
    assert released["status"] == "waiting"


@pytest.mark.parametrize("action, body", [("heartbeat", {}), ("release", {})])
def test_heartbeat_and_release_name_the_missing_token(client, make_task, claim, action, body):
    task = make_task()
    claim()
    res = client.post_json(task_url(task, action), body, status=400)
    assert res.json["error"]["details"]["field"] == "lease_token"
    assert "lease_token: is required (or worker_id)" in res.json["error"]["message"]


@pytest.mark.parametrize("token", ["", "x" * 101, "has space", 7])
def test_a_malformed_token_is_a_400_naming_it(client, make_task, claim, token):
    task = make_task()
    claim()
    res = client.post_json(task_url(task, "complete"), {"lease_token": token}, status=400)
    assert res.json["error"]["details"]["field"] == "lease_token"


def test_anonymous_reports_work_while_the_setting_is_on(client, make_task, claim):
    task = make_task()
    claim()
    assert client.post_json(task_url(task, "complete"), {}).json["data"]["status"] == "completed"


@pytest.mark.parametrize("action, body", [("complete", {}), ("fail", {"error": "x"})])
def test_anonymous_reports_are_a_400_when_the_setting_is_off(clock, action, body):
    store = TaskStore(anonymous_reports=False, clock=clock)
    client = webtest.TestApp(create_app(Config(rate_limit=0), store))
    task = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "p"}).json["data"]
    token = client.get("/api/v1/tasks/next", {"work_path": "/r", "worker_id": "w"}).json["data"][
        "lease_token"]
    res = client.post_json(task_url(task, action), body, status=400)
    assert res.json["error"]["details"]["field"] == "lease_token"
    assert store.get(task["id"]).status == "working"
    client.post_json(task_url(task, action), {**body, "lease_token": token})


@pytest.mark.parametrize("seed", range(5))
def test_no_interleaving_lets_an_ended_lease_change_a_task(clock, seed):
    """Random claims, expiries, cancels, retries and late reports: a report with a token
    is accepted only from the task's latest claim while it is working, and a refused one
    changes nothing."""
    rng = random.Random(seed)
    store = TaskStore(max_retries=100, task_timeout=60, clock=clock)
    tasks = [store.create({"work_directory": "/r", "prompt": f"p{n}"})[0].id for n in range(2)]
    latest, tokens = {}, []  # the latest claim's token per task; every token handed out
    for _ in range(400):
        step = rng.random()
        if step < 0.25:
            held = store.claim("/r", rng.choice(["a", "b"]))
            if held is not None:
                latest[held.id] = held.lease_token
                tokens.append((held.id, held.lease_token))
        elif step < 0.4:
            clock.advance(rng.choice([1, 30, 61]))
        elif step < 0.45:
            task_id = rng.choice(tasks)
            with contextlib.suppress(Conflict):
                store.cancel(task_id)
            with contextlib.suppress(Conflict):
                store.retry(task_id)
        elif tokens:
            task_id, token = rng.choice(tokens)
            action = rng.choice(["complete", "fail", "heartbeat", "release"])
            before = store.get(task_id)
            body = {"lease_token": token, **({"error": "x"} if action == "fail" else {})}
            try:
                getattr(store, action)(task_id, body)
            except Conflict:
                assert store.get(task_id).to_dict() == before.to_dict()
            else:
                assert before.status == "working" and latest[task_id] == token
            if task_id in tasks and store.get(task_id).status == "completed":  # keep two in play
                tasks[tasks.index(task_id)] = store.create(
                    {"work_directory": "/r", "prompt": "again"})[0].id


@pytest.mark.parametrize("field, value", [
    ("worker_id", "evil\n"), ("work_path", "/tmp/w\n"),
])
def test_a_trailing_newline_is_a_control_character_too(client, field, value):
    query = {"work_path": "/r", "worker_id": "w", field: value}
    res = client.get("/api/v1/tasks/next", query, status=400)
    assert res.json["error"]["details"]["field"] == field


def test_a_report_with_a_query_string_is_refused_not_read_as_anonymous(client, make_task, claim,
                                                                      store):
    task = make_task()
    token = claim()["lease_token"]
    res = client.post(task_url(task, "complete") + "?lease_token=" + token, status=400)
    assert res.json["error"]["details"]["field"] == "lease_token"
    assert "query" in res.json["error"]["message"]
    assert store.get(task["id"]).status == "working"


def test_the_claim_answer_is_never_cached(client, make_task, claim):
    make_task()
    res = client.get("/api/v1/tasks/next", {"work_path": "/repo", "worker_id": "w"})
    assert res.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("raw, allowed", [("on", True), ("off", False), ("OFF", False),
                                          ("true", True), ("0", False)])
def test_anonymous_reports_come_from_the_setting(raw, allowed):
    config = Config.from_env({"APP_TASK_ANONYMOUS_REPORTS": raw})
    assert TaskStore.from_config(config).anonymous_reports is allowed


def test_anonymous_reports_setting_must_be_on_or_off():
    with pytest.raises(ConfigError, match="APP_TASK_ANONYMOUS_REPORTS must be on or off"):
        Config.from_env({"APP_TASK_ANONYMOUS_REPORTS": "maybe"})


# ---------------------------------------------------------------------------
# Cancel, retry, get, update, delete
# ---------------------------------------------------------------------------

def test_cancel_takes_a_waiting_task_out_of_the_queue(client, make_task, claim):
    task = make_task()
    cancelled = client.post(task_url(task, "cancel")).json["data"]
    assert cancelled["status"] == "cancelled" and cancelled["completed_at"] is not None
    assert claim() is None


def test_cancel_of_a_working_task_ends_its_lease(client, make_task, claim):
    make_task()
    held = claim()
    task = client.post_json(task_url(held, "cancel"), {"reason": "not needed"}).json["data"]
    assert task["status"] == "cancelled" and task["lease_expires_at"] is None
    assert task["error_message"] == "not needed"
    client.post_json(task_url(held, "complete"), {"worker_id": "w1"}, status=409)


@pytest.mark.parametrize("finish", ["complete", "cancel"])
def test_cancel_of_a_finished_task_conflicts(client, make_task, claim, finish):
    make_task()
    held = claim()
    client.post(task_url(held, finish))
    res = client.post(task_url(held, "cancel"), status=409)
    assert "can only cancel a waiting or working task" in res.json["error"]["message"]


def test_cancel_rejects_unknown_fields(client, make_task):
    task = make_task()
    client.post_json(task_url(task, "cancel"), {"why": "x"}, status=400)
    assert client.get(task_url(task)).json["data"]["status"] == "waiting"


def test_manual_retry_requeues_a_failed_task_past_max_retries(client, make_task, claim):
    make_task(max_retries=0)
    held = claim()
    client.post_json(task_url(held, "fail"), {"error": "x"})
    task = client.post(task_url(held, "retry")).json["data"]
    assert task["status"] == "waiting" and task["retry_count"] == 1
    assert task["completed_at"] is None and task["worker_id"] is None
    assert claim()["id"] == held["id"]


@pytest.mark.parametrize("setup", ["waiting", "working", "completed"])
def test_retry_of_a_task_that_has_not_failed_or_been_cancelled_conflicts(client, make_task, claim,
                                                                        store, setup):
    task = make_task()
    if setup != "waiting":
        claim()
    if setup == "completed":
        client.post(task_url(task, "complete"))
    res = client.post(task_url(task, "retry"), status=409)
    assert "can only retry a failed or cancelled task" in res.json["error"]["message"]
    assert store.get(task["id"]).status == setup


def test_retry_brings_back_a_cancelled_task_without_counting_a_retry(client, make_task, claim):
    task = make_task()
    client.post_json(task_url(task, "cancel"), {"reason": "not now"})
    again = client.post(task_url(task, "retry")).json["data"]
    assert again["status"] == "waiting" and again["retry_count"] == 0
    assert again["completed_at"] is None
    assert claim()["id"] == task["id"]
    assert statistics(client)["retries_total"] == 0


def test_retry_of_a_cancelled_task_keeps_a_start_time_still_to_come(client, make_task, claim,
                                                                     clock):
    task = make_task(delay_seconds=3600)
    client.post(task_url(task, "cancel"))
    again = client.post(task_url(task, "retry")).json["data"]
    assert again["not_before"] == task["not_before"]
    assert claim() is None
    clock.advance(3600)
    assert claim()["id"] == task["id"]


def test_retry_of_a_cancelled_task_whose_start_time_has_passed_is_claimable_at_once(
        client, make_task, claim, clock):
    task = make_task(delay_seconds=60)
    client.post(task_url(task, "cancel"))
    clock.advance(120)
    assert client.post(task_url(task, "retry")).json["data"]["not_before"] is None
    assert claim()["id"] == task["id"]


def test_head_on_the_claim_route_is_a_405_and_claims_nothing(client, make_task, claim, store):
    task = make_task()
    res = client.head("/api/v1/tasks/next?work_path=/repo&worker_id=w1", status=405)
    assert res.headers["Allow"] == "GET"
    assert store.get(task["id"]).status == "waiting" and claim()["id"] == task["id"]


def test_retry_rejects_a_body_with_fields(client, make_task):
    client.post_json(task_url(make_task(), "retry"), {"force": True}, status=400)


@pytest.mark.parametrize("task_id", [NO_SUCH_TASK, "not-a-uuid", "x" * 500, "%00"])
@pytest.mark.parametrize("method, action", [
    ("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "complete"), ("POST", "fail"),
    ("POST", "heartbeat"), ("POST", "cancel"), ("POST", "retry"),
])
def test_unknown_task_is_404(client, task_id, method, action):
    body = {"complete": {}, "fail": {"error": "x"}, "heartbeat": {"worker_id": "w"}}.get(action)
    if method == "PATCH":
        body = {"prompt": "x"}
    url = f"/api/v1/tasks/{task_id}" + (f"/{action}" if action else "")
    res = client.request(url, method=method, status=404,
                         body=json.dumps(body).encode() if body is not None else b"",
                         content_type="application/json" if body is not None else None)
    assert res.json["error"]["code"] == "NOT_FOUND"
    assert len(res.json["error"]["message"]) < 120


def test_update_changes_a_waiting_task(client, make_task):
    task = make_task()
    patch = {"prompt": "new", "priority": "LOW", "tags": ["t"], "metadata": {"a": 1},
             "max_retries": 5, "work_directory": "/elsewhere/"}
    updated = client.patch_json(task_url(task), patch).json["data"]
    assert updated["prompt"] == "new" and updated["priority"] == "low"
    assert updated["work_directory"] == "/elsewhere" and updated["max_retries"] == 5
    assert updated["tags"] == ["t"] and updated["metadata"] == {"a": 1}


def test_update_leaves_unsent_fields_alone(client, make_task):
    task = make_task(priority="high", tags=["keep"])
    updated = client.patch_json(task_url(task), {"prompt": "new"}).json["data"]
    assert updated["priority"] == "high" and updated["tags"] == ["keep"]


def test_update_of_a_task_that_is_not_waiting_conflicts(client, make_task, claim):
    make_task()
    held = claim()
    client.patch_json(task_url(held), {"prompt": "new"}, status=409)
    assert client.get(task_url(held)).json["data"]["prompt"] == "fix the bug"


@pytest.mark.parametrize("body, message", [
    ({}, "send at least 1 of: work_directory, prompt"),
    ({"status": "completed"}, "unknown fields: status"),
    ({"id": "x"}, "unknown fields: id"),
    ({"prompt": ""}, "prompt: must not be empty"),
    ({"work_directory": "rel"}, "work_directory: must be an absolute path"),
])
def test_update_rejects_a_bad_body(client, make_task, body, message):
    task = make_task()
    res = client.patch_json(task_url(task), body, status=400)
    assert res.json["error"]["message"].startswith(message)
    assert client.get(task_url(task)).json["data"] == task


def test_update_of_priority_keeps_the_tasks_place_in_time(client, make_task, claim):
    first = make_task()
    second = make_task()
    client.patch_json(task_url(first), {"priority": "low"})
    client.patch_json(task_url(first), {"priority": "medium"})
    assert [claim()["id"], claim()["id"]] == [first["id"], second["id"]]


def test_update_of_work_directory_moves_the_task(client, make_task, claim):
    task = make_task(work_directory="/old")
    client.patch_json(task_url(task), {"work_directory": "/new"})
    assert claim(work_path="/old") is None
    assert claim(work_path="/new")["id"] == task["id"]


def test_delete_removes_the_task_in_any_state(client, make_task, claim):
    make_task()
    waiting = make_task()
    held = claim()
    assert held["id"] != waiting["id"]
    for task in (waiting, held):
        res = client.delete(task_url(task))
        assert res.json["data"] == {"id": task["id"], "deleted": True}
        client.get(task_url(task), status=404)
    assert statistics(client)["total_tasks"] == 0
    assert claim() is None


# ---------------------------------------------------------------------------
# Listing and statistics
# ---------------------------------------------------------------------------

def test_list_is_newest_first_with_the_page_fields(client, make_task):
    ids = [make_task(prompt=str(i))["id"] for i in range(5)]
    page = client.get("/api/v1/tasks", {"limit": 2, "offset": 1}).json["data"]
    assert [t["id"] for t in page["tasks"]] == [ids[3], ids[2]]
    assert (page["total"], page["limit"], page["offset"], page["has_more"]) == (5, 2, 1, True)
    last = client.get("/api/v1/tasks", {"limit": 2, "offset": 4}).json["data"]
    assert [t["id"] for t in last["tasks"]] == [ids[0]] and last["has_more"] is False


def test_list_defaults_to_fifty(client, make_task):
    page = client.get("/api/v1/tasks").json["data"]
    assert (page["tasks"], page["total"], page["limit"], page["offset"]) == ([], 0, 50, 0)


def test_list_filters_combine(client, make_task, claim):
    a = make_task(work_directory="/a", priority="high", tags=["x"])
    b = make_task(work_directory="/a", priority="low", tags=["x", "y"])
    c = make_task(work_directory="/b", priority="high", tags=["y"])
    claim(work_path="/a", worker_id="w9")  # takes a (high)
    cases = [
        ({"status": "waiting"}, [c, b]),
        ({"status": "working"}, [a]),
        ({"priority": "high"}, [c, a]),
        ({"priority": "HIGH", "status": "waiting"}, [c]),
        ({"worker_id": "w9"}, [a]),
        ({"work_directory": "/a/"}, [b, a]),
        ({"tag": "y"}, [c, b]),
        ({"tag": "y", "work_directory": "/b"}, [c]),
        ({"tag": "none"}, []),
    ]
    for query, expected in cases:
        page = client.get("/api/v1/tasks", query).json["data"]
        assert [t["id"] for t in page["tasks"]] == [t["id"] for t in expected], query
        assert page["total"] == len(expected)


@pytest.mark.parametrize("query, message", [
    ({"limit": "0"}, "limit: must be at least 1"),
    ({"limit": "1001"}, "limit: must be at most 1000"),
    ({"limit": "ten"}, "limit: must be an integer"),
    ({"limit": "1e3"}, "limit: must be an integer"),
    ({"offset": "-1"}, "offset: must be at least 0"),
    ({"limit": "9" * 40}, "limit: must be at most 1000"),
    ({"offset": "9" * 40}, "offset: must be at most 9007199254740991"),
    ({"offset": "9" * 5000}, "offset: must be an integer"),
    ({"status": "done"}, "status: must be one or more of waiting, working"),
    ({"priority": ""}, "priority: must be one of high, medium, low"),
    ({"state": "waiting"}, "unknown fields: state"),
])
def test_list_rejects_a_bad_query(client, query, message):
    res = client.get("/api/v1/tasks", query, status=400)
    assert res.json["error"]["message"].startswith(message)


def test_status_index_stays_newest_first_through_every_transition(store, clock, monkeypatch):
    monkeypatch.setattr(orchestrator._SortedKeys, "CHUNK", 2)  # force many chunk splits
    rng = random.Random(7)
    tasks = [store.create({"work_directory": f"/d{i % 3}", "prompt": "p"})[0] for i in range(120)]
    operations = [
        lambda task: store.claim(task.work_directory, "w"),
        lambda task: store.complete(task.id),
        lambda task: store.fail(task.id, {"error": "e"}),
        lambda task: store.cancel(task.id),
        lambda task: store.retry(task.id),
    ]
    for _ in range(400):
        with contextlib.suppress(Conflict):
            rng.choice(operations)(rng.choice(tasks))
    everything = store.list({"limit": 1000})["tasks"]
    assert [t.id for t in everything] == [t.id for t in reversed(tasks)]
    for status in orchestrator.STATUSES:
        expected = [t.id for t in everything if t.status == status]
        page = store.list({"status": status, "limit": 1000})
        assert [t.id for t in page["tasks"]] == expected
        assert page["total"] == len(expected)


def test_statistics_count_every_status_and_the_success_rate(client, make_task, claim, clock):
    for _ in range(5):
        make_task()
    done = claim()
    clock.advance(2)
    client.post(task_url(done, "complete"))
    failed = claim()
    client.post_json(task_url(failed, "fail"), {"error": "x", "retry": False})
    client.post(task_url(claim(), "cancel"))
    claim()
    stats = statistics(client)
    assert stats == {
        **stats,
        "total_tasks": 5, "waiting_tasks": 1, "working_tasks": 1, "completed_tasks": 1,
        "failed_tasks": 1, "cancelled_tasks": 1, "active_tasks": 2, "success_rate": 0.5,
        "retries_total": 0, "expired_leases_total": 0, "average_duration_ms": 2000.0,
    }
    assert stats["uptime_seconds"] == 2.0


def test_statistics_start_empty(client):
    stats = statistics(client)
    assert stats["success_rate"] == 0.0 and stats["average_duration_ms"] is None
    assert stats["total_tasks"] == 0


def test_finished_tasks_are_dropped_after_retention(client, make_task, claim, clock, store):
    make_task()
    waiting = make_task()
    client.post(task_url(claim(), "complete"))
    clock.advance(3599)
    assert statistics(client)["completed_tasks"] == 1
    clock.advance(1)
    stats = statistics(client)
    assert stats["completed_tasks"] == 0 and stats["total_tasks"] == 1
    assert stats["average_duration_ms"] is None
    assert client.get(task_url(waiting)).json["data"]["status"] == "waiting"


def test_retention_of_zero_keeps_finished_tasks_forever(clock):
    store = TaskStore(retention=0, clock=clock)
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    store.cancel(task.id)
    clock.advance(10**9)
    assert store.get(task.id).status == "cancelled"


def test_settling_by_the_next_due_time_drops_what_a_full_look_drops(clock):
    # _settle skips its look while now < _next_due. A twin that always looks must see
    # the same, also where rounding bites: 2.2 + 0.7 is 2.9000000000000004.
    rng = random.Random(7)
    for _ in range(200):
        finished_at = round(rng.uniform(1, 10), rng.randint(1, 3))
        retention = round(rng.uniform(0.1, 5), rng.randint(1, 3))
        deadline = finished_at + retention
        for probe in (math.nextafter(deadline, -math.inf), deadline, round(deadline, 3)):
            seen = []
            for always_looks in (False, True):
                now = [finished_at]
                store = TaskStore(retention=retention, clock=lambda: now[0])
                if always_looks:
                    store._earliest_deadline = lambda: -math.inf
                    store._due_by = lambda deadline: None
                task, _ = store.create({"work_directory": "/r", "prompt": "p"})
                store.cancel(task.id)
                now[0] = probe
                seen.append(store.statistics()["total_tasks"])  # an operation: it settles
            assert seen[0] == seen[1], (finished_at, retention, probe)


def test_cancelled_queue_entries_do_not_pile_up(store):
    tasks = [store.create({"work_directory": "/r", "prompt": "p"})[0] for _ in range(3000)]
    for task in tasks[:-1]:
        store.cancel(task.id)
    assert sum(len(heap) for heap in store._queues.values()) < 2000
    assert store.claim("/r", "w").id == tasks[-1].id
    assert store.claim("/r", "w") is None


def test_list_takes_several_statuses_newest_first(client, make_task, claim):
    first, second, third = (make_task(prompt=str(n)) for n in range(3))
    claim()  # the first is working
    client.post(task_url(third, "cancel"))
    page = client.get("/api/v1/tasks", {"status": "working,cancelled", "limit": 1}).json["data"]
    assert [t["id"] for t in page["tasks"]] == [third["id"]]
    assert (page["total"], page["has_more"]) == (2, True)
    both = client.get("/api/v1/tasks", {"status": "cancelled,working"}).json["data"]["tasks"]
    assert [t["id"] for t in both] == [third["id"], first["id"]]
    res = client.get("/api/v1/tasks", {"status": "waiting,done"}, status=400)
    assert res.json["error"]["details"]["field"] == "status"


def test_list_searches_prompt_error_and_output_in_any_case(client, make_task, claim):
    by_error = make_task(prompt="one")
    by_output = make_task(prompt="two")
    by_prompt = make_task(prompt="Fix the Parser")
    make_task(prompt="unrelated")
    claim()
    claim()
    client.post_json(task_url(by_error, "fail"), {"error": "parser crashed", "retry": False})
    client.post_json(task_url(by_output, "complete"), {"result": {"output": "the PARSER works"}})
    found = client.get("/api/v1/tasks", {"q": "parser"}).json["data"]
    assert {t["id"] for t in found["tasks"]} == {by_prompt["id"], by_error["id"], by_output["id"]}
    narrowed = client.get("/api/v1/tasks", {"q": "parser", "status": "failed"}).json["data"]
    assert [t["id"] for t in narrowed["tasks"]] == [by_error["id"]]


def directories(client):
    """GET /api/v1/directories, by directory."""
    return {d["work_directory"]: d for d in
            client.get("/api/v1/directories").json["data"]["directories"]}


def test_directories_count_each_directory_with_its_oldest_waiting_age_and_holders(
        client, make_task, claim, clock):
    make_task(work_directory="/a")
    clock.advance(10)
    make_task(work_directory="/a")
    make_task(work_directory="/b")
    clock.advance(5)
    claim(work_path="/a", worker_id="w1")
    seen = directories(client)
    assert seen["/a"]["counts"] == {"waiting": 1, "working": 1, "completed": 0, "failed": 0,
                                    "cancelled": 0}
    assert seen["/a"]["oldest_waiting_age_seconds"] == 5  # the second task, created 5 s ago
    assert seen["/a"]["workers"] == ["w1"]
    assert seen["/b"]["oldest_waiting_age_seconds"] == 5 and seen["/b"]["workers"] == []
    assert list(seen) == ["/a", "/b"]


def test_directories_follow_moves_and_forget_a_directory_with_no_tasks(client, make_task):
    task = make_task(work_directory="/a")
    client.patch_json(task_url(task), {"work_directory": "/b"})
    assert list(directories(client)) == ["/b"]
    client.delete(task_url(task))
    assert directories(client) == {}


def test_directories_always_agree_with_a_scan_of_the_tasks(clock):
    rng = random.Random(7)
    store = TaskStore(max_retries=1, task_timeout=60, clock=clock)
    for _ in range(600):
        step = rng.random()
        directory = rng.choice(["/a", "/b", "/c"])
        if step < 0.35:
            store.create({"work_directory": directory, "prompt": "p"})
        elif step < 0.6:
            store.claim(directory, rng.choice(["w1", "w2"]))
        elif step < 0.7:
            clock.advance(rng.choice([5, 61]))
        else:
            tasks = store.list({"limit": 1000})["tasks"]
            if tasks:
                task = rng.choice(tasks)
                action = rng.choice([
                    lambda: store.complete(task.id), lambda: store.cancel(task.id),
                    lambda: store.retry(task.id), lambda: store.delete(task.id),
                    lambda: store.update(task.id, {"work_directory": directory})])
                with contextlib.suppress(Conflict):
                    action()
        tasks = store.list({"limit": 1000})["tasks"]
        expected = {}
        for task in tasks:
            entry = expected.setdefault(task.work_directory, {
                "counts": dict.fromkeys(orchestrator.STATUSES, 0), "workers": set(),
                "oldest": None})
            entry["counts"][task.status] += 1
            if task.status == "working":
                entry["workers"].add(task.worker_id)
            if task.status == "waiting":
                entry["oldest"] = min(entry["oldest"] or task.created_at, task.created_at)
        listed = {d["work_directory"]: d for d in store.directories()}
        assert listed.keys() == expected.keys()
        for name, entry in expected.items():
            assert listed[name]["counts"] == entry["counts"]
            assert listed[name]["workers"] == sorted(entry["workers"])
            age = None if entry["oldest"] is None else round(clock() - entry["oldest"], 3)
            assert listed[name]["oldest_waiting_age_seconds"] == age


def workers(client):
    """GET /api/v1/workers, by worker id, most recently seen first."""
    return {w["worker_id"]: w for w in client.get("/api/v1/workers").json["data"]["workers"]}


def test_workers_show_when_each_was_seen_what_it_holds_and_how_it_did(client, make_task, claim,
                                                                     clock):
    done, failed, held = make_task(), make_task(), make_task()
    claim(worker_id="w1")
    client.post_json(task_url(done, "complete"), {"worker_id": "w1"})
    claim(worker_id="w1")
    client.post_json(task_url(failed, "fail"), {"worker_id": "w1", "error": "x", "retry": False})
    clock.advance(30)
    token = claim(worker_id="w2")["lease_token"]
    client.post_json(task_url(held, "heartbeat"), {"lease_token": token})  # names w2 by token
    claim(worker_id="idle")  # nothing left, but it was seen asking
    seen = workers(client)
    assert list(seen) == ["idle", "w2", "w1"]  # most recently seen first
    assert seen["w1"] == {"worker_id": "w1", "last_seen": seen["w1"]["last_seen"],
                          "holding": [], "completed": 1, "failed": 1}
    assert seen["w2"]["holding"] == [held["id"]]
    assert seen["w1"]["last_seen"] < seen["w2"]["last_seen"]


def test_workers_are_forgotten_an_hour_after_they_were_last_seen(client, make_task, claim, clock):
    claim(worker_id="old")
    clock.advance(3000)
    claim(worker_id="recent")
    clock.advance(601)
    assert list(workers(client)) == ["recent"]


def test_at_most_max_workers_are_remembered(clock):
    store = TaskStore(clock=clock, max_workers=3)
    for n in range(5):
        store.claim("/r", f"w{n}")
    assert [w["worker_id"] for w in store.workers()] == ["w4", "w3", "w2"]


def test_bulk_retries_every_failed_task_of_a_directory(client, make_task, claim, store):
    failed = [make_task(max_retries=0) for _ in range(3)]
    other = make_task(work_directory="/other", max_retries=0)
    for task in failed:
        claim()
        client.post_json(task_url(task, "fail"), {"error": "x"})
    claim(work_path="/other")
    client.post_json(task_url(other, "fail"), {"error": "x"})
    answer = client.post_json("/api/v1/tasks/bulk", {
        "action": "retry", "filter": {"work_directory": "/repo", "status": "failed"}}).json["data"]
    assert answer == {"action": "retry", "changed": 3, "skipped": 0, "more": False}
    assert [store.get(t["id"]).status for t in failed] == ["waiting"] * 3
    assert store.get(other["id"]).status == "failed"


def test_bulk_skips_tasks_whose_state_forbids_the_action(client, make_task, claim, store):
    done = make_task()
    claim()
    client.post_json(task_url(done, "complete"), {})
    waiting = make_task()
    answer = client.post_json("/api/v1/tasks/bulk", {
        "action": "cancel", "filter": {"work_directory": "/repo"}}).json["data"]
    assert (answer["changed"], answer["skipped"]) == (1, 1)
    assert store.get(waiting["id"]).status == "cancelled"
    deleted = client.post_json("/api/v1/tasks/bulk", {
        "action": "delete", "filter": {"status": "completed,cancelled"}}).json["data"]
    assert deleted["changed"] == 2 and len(store) == 0


def test_bulk_changes_at_most_a_thousand_tasks_a_call(clock):
    store = TaskStore(clock=clock)
    client = webtest.TestApp(create_app(Config(rate_limit=0), store))
    for _ in range(orchestrator.BULK_LIMIT + 1):
        store.create({"work_directory": "/r", "prompt": "p"})
    body = {"action": "cancel", "filter": {"status": "waiting"}}
    first = client.post_json("/api/v1/tasks/bulk", body).json["data"]
    assert (first["changed"], first["more"]) == (orchestrator.BULK_LIMIT, True)
    second = client.post_json("/api/v1/tasks/bulk", body).json["data"]
    assert (second["changed"], second["more"]) == (1, False)


@pytest.mark.parametrize("body, field", [
    ({"action": "retry", "filter": {}}, "filter"),
    ({"action": "retry"}, "filter"),
    ({"action": "explode", "filter": {"status": "failed"}}, "action"),
    ({"action": "delete", "filter": {"limit": 5}}, None),
])
def test_bulk_refuses_an_empty_filter_or_a_bad_action_and_changes_nothing(client, make_task,
                                                                          store, body, field):
    task = make_task()
    res = client.post_json("/api/v1/tasks/bulk", body, status=400)
    if field is not None:
        assert res.json["error"]["details"]["field"] == field
    assert store.get(task["id"]).status == "waiting"


# ---------------------------------------------------------------------------
# The store's Python API
# ---------------------------------------------------------------------------

def test_store_methods_raise_the_documented_errors(store):
    with pytest.raises(ValidationError) as caught:
        store.create({"work_directory": "x", "prompt": "p"})
    assert caught.value.status == 400 and caught.value.code == "VALIDATION_ERROR"
    with pytest.raises(NotFound) as missing:
        store.get("nope")
    assert missing.value.status == 404
    task, created = store.create({"work_directory": "/r", "prompt": "p"})
    assert created is True
    with pytest.raises(Conflict) as conflict:
        store.complete(task.id)
    assert conflict.value.status == 409 and conflict.value.code == "CONFLICT"


def test_store_returns_copies_that_later_changes_do_not_touch(store):
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    store.claim("/r", "w")
    assert task.status == "waiting"


def test_changing_a_returned_task_does_not_change_the_store(store):
    created, _ = store.create({"work_directory": "/r", "prompt": "p", "tags": ["a"],
                               "metadata": {"deep": {"list": [1]}}})
    created.tags.append("sneaked")
    created.metadata["deep"]["list"].append(2)
    store.claim("/r", "w")
    done = store.complete(created.id, {"result": {"output": "ok", "metadata": {"k": [1]}}})
    done.result["metadata"]["k"].append(2)
    done.result["output"] = "changed"
    for listed in store.list()["tasks"]:
        listed.tags.append("again")
    stored = store.get(created.id)
    assert stored.tags == ["a"] and stored.metadata == {"deep": {"list": [1]}}
    assert stored.result["metadata"] == {"k": [1]} and stored.result["output"] == "ok"


def test_changing_what_was_passed_in_does_not_change_the_store(store):
    fields = {"work_directory": "/r", "prompt": "p", "tags": ["a"], "metadata": {"deep": [1]}}
    task, _ = store.create(fields)
    fields["tags"].append("b")
    fields["metadata"]["deep"].append(2)
    update = {"metadata": {"new": [1]}, "tags": ["x"]}
    store.update(task.id, update)
    update["metadata"]["new"].append(2)
    update["tags"].append("y")
    store.claim("/r", "w")
    result = {"output": "ok", "metadata": {"m": [1]}}
    store.complete(task.id, {"result": result})
    result["metadata"]["m"].append(2)
    stored = store.get(task.id)
    assert stored.tags == ["x"] and stored.metadata == {"new": [1]}
    assert stored.result["metadata"] == {"m": [1]}


# ---------------------------------------------------------------------------
# The envelope, routing errors and the 500
# ---------------------------------------------------------------------------

def test_unknown_route_is_a_404_envelope(client):
    res = client.get("/nowhere", status=404)
    assert res.content_type == "application/json"
    assert res.json["error"]["code"] == "NOT_FOUND" and res.json["success"] is False


@pytest.mark.parametrize("method, path, allow", [
    ("DELETE", "/api/v1/tasks", "GET,POST"),
    ("PUT", f"/api/v1/tasks/{NO_SUCH_TASK}", "DELETE,GET,PATCH"),
    ("GET", f"/api/v1/tasks/{NO_SUCH_TASK}/complete", "POST"),
    ("DELETE", "/api/v1/tasks/next", "GET"),  # "next" is not a task id
    ("OPTIONS", "/api/v1/tasks/next", "GET"),
    ("POST", "/health", "GET"),
])
def test_wrong_method_is_a_405_with_allow(client, method, path, allow):
    res = client.request(path, method=method, status=405)
    assert res.headers["Allow"] == allow
    assert res.json["error"]["code"] == "METHOD_NOT_ALLOWED"


def test_unexpected_error_is_a_generic_500_logged_with_traceback(client, store, monkeypatch,
                                                                 caplog):
    def explode(*args):
        raise RuntimeError("secret internals")
    monkeypatch.setattr(store, "statistics", explode)
    with caplog.at_level(logging.ERROR, logger="orchestrator"):
        res = client.get("/api/v1/statistics", status=500)
    assert res.json["error"] == {"code": "INTERNAL_ERROR", "message": "internal server error",
                                 "details": {}}
    assert "secret" not in res.text
    assert "secret internals" in caplog.text and "Traceback" in caplog.text


def test_json_responses_are_utf8_not_ascii_escapes(client, make_task):
    prompt = "\u4fee\u590d caf\u00e9 \u2014 na\u00efve"
    res = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": prompt})
    assert prompt.encode() in res.body and b"\\u" not in res.body
    assert res.json["data"]["prompt"] == prompt


def test_mcp_texts_are_utf8_not_ascii_escapes(rpc):
    prompt = "\u4fee\u590d caf\u00e9"
    res = rpc("tools/call", {"name": "create_task",
                             "arguments": {"work_directory": "/r", "prompt": prompt}})
    assert prompt.encode() in res.body
    assert prompt in res.json["result"]["content"][0]["text"]


def test_json_responses_keep_control_characters_escaped(client):
    prompt = "a\u001b[31m\u007f\u009b31m\u2028b"
    res = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": prompt})
    assert res.body.decode().isprintable()
    assert res.json["data"]["prompt"] == prompt


def test_a_lone_surrogate_in_metadata_still_answers_valid_json(client):
    body = b'{"work_directory": "/r", "prompt": "p", "metadata": {"k": "\\ud800"}}'
    res = client.post("/api/v1/tasks", body, content_type="application/json", status=201)
    assert res.json["data"]["metadata"] == {"k": "\ud800"}
    res.body.decode("utf-8")  # strict: valid UTF-8


def test_health_reports_status_version_and_queue(client, make_task):
    make_task()
    health = client.get("/health").json["data"]
    assert health["status"] == "healthy" and health["version"] == orchestrator.__version__
    assert health["tasks"] == {"total": 1, "waiting": 1, "working": 0}
    assert isinstance(health["uptime_seconds"], float)
    assert client.head("/health").status_int == 200


def test_two_apps_share_nothing(config):
    first = webtest.TestApp(create_app(config))
    second = webtest.TestApp(create_app(config))
    first.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "p"})
    assert second.get("/api/v1/statistics").json["data"]["total_tasks"] == 0


def test_a_storm_of_odd_bodies_never_causes_a_500(client, make_task, claim):
    make_task()
    held = claim()
    odd = [b"", b"{}", b"[]", b"null", b'{"a":' * 50, b"\x00", b'{"error": null}',
           b'{"result": {"metadata": []}}', b'{"worker_id": "\\u0000"}',
           b'{"prompt": "\\ud800"}', b'{"tags": [[[]]]}', b'{"error": "' + b"e" * 20000 + b'"}']
    for action in ("complete", "fail", "heartbeat", "cancel", "retry"):
        for raw in odd:
            res = client.post(task_url(held, action), raw, content_type="application/json",
                              expect_errors=True)
            assert res.status_int < 500, (action, raw)
    for raw in odd:
        for method, url in [("PATCH", task_url(held)), ("POST", "/api/v1/tasks")]:
            res = client.request(url, method=method, body=raw, content_type="application/json",
                                 expect_errors=True)
            assert res.status_int < 500, (url, raw)


# ---------------------------------------------------------------------------
# The gate: API key, origin, content type, body size, rate limit
# ---------------------------------------------------------------------------

@pytest.fixture
def keyed_client(store):
    return webtest.TestApp(create_app(Config(rate_limit=0, api_key="s3cret"), store))


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic s3cret", "s3cret",
                                           "Bearer "])
def test_api_key_is_required_when_configured(keyed_client, store, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    res = keyed_client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "p"},
                                 headers=headers, status=401)
    assert res.headers["WWW-Authenticate"].startswith("Bearer")
    assert res.json["error"]["code"] == "UNAUTHORIZED"
    assert store.statistics()["total_tasks"] == 0


def test_the_right_key_is_accepted_in_any_scheme_case(keyed_client):
    keyed_client.get("/api/v1/statistics", headers={"Authorization": "bearer s3cret"})


def test_api_key_is_checked_before_routing(keyed_client):
    keyed_client.get("/api/v1/no-such-thing", status=401)
    keyed_client.get("/api/v1/no-such-thing", status=404,
                     headers={"Authorization": "Bearer s3cret"})


def test_health_needs_no_key(keyed_client):
    keyed_client.get("/health", status=200)


@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS", "DELETE"])
@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost:8080", "null",
                                    "https://localhost"])
def test_a_foreign_origin_is_forbidden(client, store, method, origin):
    res = client.request("/api/v1/tasks", method=method, headers={"Origin": origin},
                         body=b'{"work_directory": "/r", "prompt": "p"}',
                         content_type="application/json", status=403)
    assert res.json["error"]["code"] == "FORBIDDEN"
    assert "Access-Control-Allow-Origin" not in res.headers
    assert store.statistics()["total_tasks"] == 0


@pytest.mark.parametrize("host", ["evil.example:8080", "evil.example"])
def test_a_dns_rebinding_page_is_not_the_servers_own_origin(store, host):
    # evil.example re-resolved to 127.0.0.1: Origin and Host agree, yet it is not us.
    client = webtest.TestApp(create_app(Config(rate_limit=0), store))
    origin = "http://" + host
    res = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "p"},
                           headers={"Origin": origin, "Host": host}, status=403)
    assert res.json["error"]["code"] == "FORBIDDEN"
    client.post_json("/mcp", {"jsonrpc": "2.0", "id": 1, "method": "ping"},
                     headers={"Origin": origin, "Host": host}, status=403)
    assert store.statistics()["total_tasks"] == 0


@pytest.mark.parametrize("host", ["localhost:8080", "127.0.0.1:8080", "[::1]:8080"])
def test_a_loopback_servers_own_origin_is_a_loopback_name(store, host):
    client = webtest.TestApp(create_app(Config(rate_limit=0), store))
    client.get("/api/v1/tasks", headers={"Origin": "http://" + host, "Host": host}, status=200)


def test_a_server_bound_beyond_loopback_accepts_its_own_name(store):
    client = webtest.TestApp(create_app(Config(rate_limit=0, host="0.0.0.0"), store))
    client.get("/api/v1/tasks", headers={"Origin": "http://box.lan:8080", "Host": "box.lan:8080"},
               status=200)


def test_own_and_allowed_origins_pass(store):
    config = Config(rate_limit=0, allowed_origins=("https://ui.example:8443",))
    client = webtest.TestApp(create_app(config, store))
    for origin in ("http://localhost", "http://localhost:80", "https://ui.example:8443"):
        res = client.get("/api/v1/tasks", headers={"Origin": origin}, status=200)
        assert "Access-Control-Allow-Origin" not in res.headers


# -- the Host rule and Sec-Fetch-Site: no web page reads or claims the queue ---

REBINDING_HOSTS = ["evil.example:8080", "evil.example", "127.0.0.1.evil.example",
                   "localhost.evil.example:80", "[::2]:8080"]


@pytest.mark.parametrize("host", ["127.0.0.1 evil.example", "127.0.0.1\tevil.example",
                                  "127.1 evil.example:8080"])
def test_a_host_with_text_after_a_loopback_address_is_refused(client, host):
    client.get("/api/v1/tasks", headers={"Host": host}, status=403)


@pytest.mark.parametrize("host", REBINDING_HOSTS)
@pytest.mark.parametrize("method, path", [
    ("GET", "/api/v1/tasks"), ("GET", "/api/v1/tasks/next?work_path=/repo&worker_id=x"),
    ("GET", "/health"), ("GET", "/openapi.json"), ("POST", "/mcp"), ("GET", "/no/such/path"),
])
def test_a_rebinding_host_is_refused_on_every_route(client, make_task, store, host, method,
                                                    path):
    make_task(work_directory="/repo")
    res = client.request(path, method=method, headers={"Host": host}, status=403,
                         body=b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}'
                         if method == "POST" else b"",
                         content_type="application/json" if method == "POST" else None)
    assert host.split(":")[0].strip("[]") in res.text
    assert "fix the bug" not in res.text
    assert store.list({"status": "waiting"})["total"] == 1  # nothing was claimed


def test_the_host_rule_comes_before_the_api_key(store):
    client = webtest.TestApp(create_app(Config(rate_limit=0, api_key="s3cret"), store))
    res = client.get("/api/v1/tasks", headers={"Host": "evil.example"}, status=403)
    assert res.json["error"]["code"] == "FORBIDDEN"


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1:1", "[::1]:8080",
                                  "LOCALHOST:9", "127.0.0.1"])
def test_loopback_hosts_are_served(client, host):
    client.get("/api/v1/tasks", headers={"Host": host}, status=200)


def test_a_request_without_a_host_is_served(app, store):
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/v1/statistics",
               "SERVER_PROTOCOL": "HTTP/1.0"}
    wsgiref.util.setup_testing_defaults(environ)
    environ.pop("HTTP_HOST", None)
    answer = {}
    app(environ, lambda status, headers, exc_info=None: answer.update(status=status))
    assert answer["status"].startswith("200")


@pytest.mark.parametrize("allowed, host, status", [
    ("box.lan", "box.lan:8080", 200),
    ("box.lan", "BOX.LAN", 200),
    ("box.lan:8080", "box.lan:8080", 200),
    ("box.lan:8080", "box.lan:9090", 403),
    ("box.lan, other.lan", "other.lan", 200),
    ("box.lan", "evil.example", 403),
    ("box.lan", "localhost:8080", 200),  # loopback names stay allowed
])
def test_allowed_hosts_extend_the_loopback_names(store, allowed, host, status):
    config = Config.from_env({"APP_SECURITY_ALLOWED_HOSTS": allowed, "APP_SECURITY_RATE_LIMIT": "0"})
    client = webtest.TestApp(create_app(config, store))
    client.get("/api/v1/tasks", headers={"Host": host}, status=status)


def test_a_server_bound_beyond_loopback_checks_hosts_only_when_some_are_listed(store):
    open_config = Config(rate_limit=0, host="0.0.0.0")
    webtest.TestApp(create_app(open_config, store)).get(
        "/api/v1/tasks", headers={"Host": "anything.example"}, status=200)
    listed = dataclasses.replace(open_config, allowed_hosts=("box.lan",))
    client = webtest.TestApp(create_app(listed, store))
    client.get("/api/v1/tasks", headers={"Host": "box.lan"}, status=200)
    client.get("/api/v1/tasks", headers={"Host": "anything.example"}, status=403)


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
@pytest.mark.parametrize("path", ["/api/v1/tasks/next?work_path=/repo&worker_id=x",
                                  "/api/v1/tasks"])
def test_a_cross_site_browser_request_without_an_allowed_origin_is_refused(
        client, make_task, store, site, path):
    make_task(work_directory="/repo")
    res = client.get(path, headers={"Sec-Fetch-Site": site}, status=403)
    assert res.json["error"]["code"] == "FORBIDDEN" and site in res.json["error"]["message"]
    assert store.list({"status": "waiting"})["total"] == 1


def test_a_cross_site_mcp_call_is_refused(client, store):
    client.post_json("/mcp", {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                     headers={"Sec-Fetch-Site": "cross-site"}, status=403)


def test_a_cross_site_request_from_an_allowed_origin_passes(store):
    config = Config(rate_limit=0, allowed_origins=("https://ui.example",))
    client = webtest.TestApp(create_app(config, store))
    client.get("/api/v1/tasks", headers={"Sec-Fetch-Site": "cross-site",
                                         "Origin": "https://ui.example"}, status=200)


@pytest.mark.parametrize("site", ["same-origin", "none", None])
def test_same_origin_and_non_browser_requests_pass(client, make_task, site):
    make_task(work_directory="/repo")
    headers = {"Sec-Fetch-Site": site} if site else {}
    task = client.get("/api/v1/tasks/next", {"work_path": "/repo", "worker_id": "x"},
                      headers=headers, status=200).json["data"]
    assert task["status"] == "working"


@pytest.mark.parametrize("host", ["localhost:\u00b2", "evil.example:\u00b2", "localhost:abc",
                                  "localhost:99999", ""])
def test_a_host_whose_port_is_not_a_port_is_refused_not_a_500(client, host):
    res = client.get("/health", headers={"Host": host}, status=403)
    assert res.json["error"]["code"] == "FORBIDDEN"


def test_an_allowed_host_with_a_bad_port_is_refused(store):
    config = Config(rate_limit=0, allowed_hosts=("box.lan", "evil.example:abc"))
    client = webtest.TestApp(create_app(config, store))
    client.get("/api/v1/tasks", headers={"Host": "box.lan:abc"}, status=403)
    client.get("/api/v1/tasks", headers={"Host": "evil.example:abc"}, status=403)


@pytest.mark.parametrize("bind", ["127.1", "0x7f000001", "127.0.0.2"])
def test_the_host_rule_holds_however_the_loopback_bind_is_spelled(store, bind):
    client = webtest.TestApp(create_app(Config(rate_limit=0, host=bind), store))
    client.get("/api/v1/tasks", headers={"Host": "evil.example:8080",
                                         "Origin": "http://evil.example:8080"}, status=403)


def test_an_unusable_origin_in_a_python_config_does_not_open_cross_site_requests(store):
    config = Config(rate_limit=0, allowed_origins=("localhost:3000",))  # not an origin
    client = webtest.TestApp(create_app(config, store))
    client.get("/api/v1/tasks", headers={"Sec-Fetch-Site": "cross-site"}, status=403)


@pytest.mark.parametrize("value", ["box_1.lan", "box.lan,", " box.lan , other.lan:8080 "])
def test_allowed_hosts_take_underscores_and_stray_commas(value):
    assert Config.from_env({"APP_SECURITY_ALLOWED_HOSTS": value}).allowed_hosts


@pytest.mark.parametrize("value", ["evil example", "http://box.lan", "box.lan:99999", "box.lan:",
                                   "a/b", ","])
def test_a_bad_allowed_hosts_setting_names_it(value):
    with pytest.raises(ConfigError, match="APP_SECURITY_ALLOWED_HOSTS"):
        Config.from_env({"APP_SECURITY_ALLOWED_HOSTS": value})



@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/jsonp", ""])
def test_a_body_that_is_not_json_is_a_415(client, store, content_type):
    res = client.post("/api/v1/tasks", b'{"work_directory": "/r", "prompt": "p"}',
                      headers={"Content-Type": content_type}, status=415)
    assert res.json["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert store.statistics()["total_tasks"] == 0


def test_json_with_a_charset_is_accepted(client):
    client.post("/api/v1/tasks", b'{"work_directory": "/r", "prompt": "p"}',
                content_type="application/json; charset=utf-8", status=201)


class UnreadableInput:
    """A request body stream that fails the test if anything reads it."""

    def read(self, *args):
        raise AssertionError("the body was read")

    readline = readlines = read


def test_a_declared_body_over_the_limit_is_a_413_before_it_is_read(store):
    app = create_app(Config(rate_limit=0, max_body=100), store)
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/v1/tasks",
               "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": "101",
               "wsgi.input": UnreadableInput()}
    wsgiref.util.setup_testing_defaults(environ)
    answer = {}
    body = b"".join(app(environ, lambda status, headers, exc_info=None: answer.update(status=status)))
    assert answer["status"].startswith("413")
    assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert store.statistics()["total_tasks"] == 0


def test_a_body_of_exactly_the_limit_is_accepted(store):
    client = webtest.TestApp(create_app(Config(rate_limit=0, max_body=100), store))
    body = json.dumps({"work_directory": "/r", "prompt": "p"}).encode()
    body = body[:-1] + b" " * (100 - len(body)) + b"}"
    assert len(body) == 100
    client.post("/api/v1/tasks", body, content_type="application/json", status=201)


def test_rate_limit_answers_429_with_retry_after(store):
    client = webtest.TestApp(create_app(Config(rate_limit=3), store))
    remaining = [client.get("/api/v1/tasks").headers["X-RateLimit-Remaining"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    res = client.get("/api/v1/tasks", status=429)
    assert res.json["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert int(res.headers["Retry-After"]) >= 1
    assert res.headers["X-RateLimit-Limit"] == "3" and res.headers["X-RateLimit-Remaining"] == "0"
    client.get("/health", status=200)  # never limited


def test_rate_limiter_window_slides(clock):
    limiter = RateLimiter(10, window=60, clock=clock)
    clock.now = 600.0  # the start of a window
    for _ in range(10):
        limiter.hit("a")
    with pytest.raises(RateLimited) as caught:
        limiter.hit("a")
    # Full window: wait for it to end (60 s), then for 1/10 of its weight to fade (6 s).
    assert caught.value.retry_after == 66
    clock.advance(90)  # half into the next window: the 10 old requests weigh 5
    assert [limiter.hit("a") for _ in range(4)] == [4, 3, 2, 1]
    limiter.hit("a")
    with pytest.raises(RateLimited):
        limiter.hit("a")
    assert limiter.hit("b") == 9  # every client has its own window


def test_rate_limiter_forgets_idle_clients_and_bounds_memory(clock):
    limiter = RateLimiter(5, window=60, clock=clock, max_clients=1000)
    for i in range(5000):
        limiter.hit(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 1000
    clock.advance(121)
    limiter.hit("late")
    assert len(limiter) == 1


# ---------------------------------------------------------------------------
# Configuration and the command line
# ---------------------------------------------------------------------------

def test_config_reads_every_variable():
    env = {
        "APP_SERVER_HOST": "0.0.0.0", "APP_SERVER_PORT": "9000", "APP_SERVER_THREADS": "4",
        "APP_SERVER_TIMEOUT": "10", "APP_SERVER_MAX_BODY": "2048", "APP_TASK_MAX_RETRIES": "1",
        "APP_TASK_TIMEOUT": "30", "APP_TASK_RETENTION": "0", "APP_SECURITY_RATE_LIMIT": "0",
        "APP_SECURITY_API_KEY": "k", "APP_SECURITY_ALLOWED_ORIGINS": "http://a:1, https://b",
        "APP_LOG_LEVEL": "DEBUG", "APP_LOG_FORMAT": "json",
    }
    assert Config.from_env(env) == Config(
        host="0.0.0.0", port=9000, threads=4, timeout=10, max_body=2048, max_retries=1,
        task_timeout=30, retention=0, rate_limit=0, api_key="k",
        allowed_origins=("http://a:1", "https://b"), log_level="debug", log_format="json",
    )


def test_config_from_an_empty_mapping_ignores_the_environment(monkeypatch):
    monkeypatch.setenv("APP_SERVER_PORT", "1234")
    assert Config.from_env({}) == Config()
    assert Config.from_env().port == 1234


@pytest.mark.parametrize("variable, value, accepts", [
    ("APP_SERVER_PORT", "abc", "an integer from 0 to 65535"),
    ("APP_SERVER_PORT", "70000", "an integer from 0 to 65535"),
    ("APP_SERVER_TIMEOUT", "-1", "an integer from 1"),
    ("APP_SERVER_THREADS", "0", "an integer from 1"),
    ("APP_TASK_RETENTION", "1.5", "an integer from 0"),
    ("APP_LOG_LEVEL", "loud", "one of debug, info, warning, error"),
    ("APP_LOG_FORMAT", "xml", "one of pretty, json"),
    ("APP_SECURITY_ALLOWED_ORIGINS", "not-an-origin", "comma-separated origins"),
    # Keys no client could send: the token is stripped, a header has no control
    # characters, and beyond ASCII clients disagree on the bytes.
    ("APP_SECURITY_API_KEY", "abc ", "printable ASCII"),
    ("APP_SECURITY_API_KEY", "\tabc", "printable ASCII"),
    ("APP_SECURITY_API_KEY", "a\x07b", "printable ASCII"),
    ("APP_SECURITY_API_KEY", "密钥", "printable ASCII"),
    ("APP_SECURITY_API_KEY", "clé", "printable ASCII"),
])
def test_a_bad_setting_names_the_variable_and_what_it_accepts(variable, value, accepts):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({variable: value})
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(f"{variable} must be {accepts}")


@pytest.mark.parametrize("header", ["Origin", "Authorization", "Idempotency-Key",
                                    "MCP-Protocol-Version", "Mcp-Method"])
def test_a_header_that_is_not_utf8_is_never_a_500(client, header):
    for path in ("/api/v1/tasks", "/mcp"):
        res = client.post(path, b"{}", content_type="application/json", expect_errors=True,
                          extra_environ={"HTTP_" + header.upper().replace("-", "_"): "\xe9t\xe9"})
        assert res.status_int < 500, (path, res.status_int)


def test_the_api_key_never_shows_in_the_config_repr():
    assert "s3cret" not in repr(Config(api_key="s3cret"))


@pytest.mark.parametrize("argv, env, message", [
    (["--port", "abc"], {}, "--port must be an integer from 0 to 65535"),
    ([], {"APP_SERVER_PORT": "-5"}, "APP_SERVER_PORT must be an integer from 0 to 65535"),
    (["--threads", "0"], {}, "--threads must be an integer from 1"),
    (["--host", "local host"], {}, "APP_SERVER_HOST (or --host) must be an address"),
    ([], {"APP_SECURITY_ALLOWED_HOSTS": "http://box.lan"}, "APP_SECURITY_ALLOWED_HOSTS must be"),
    (["--port", "\u0661"], {}, "--port must be an integer"),
    (["--data-file", "/no/such/dir/tasks.db"], {}, "/no/such/dir/tasks.db"),
])
def test_main_stops_with_status_2_before_listening(monkeypatch, capsys, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert orchestrator.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_flags_override_the_environment():
    config = Config.from_env({"APP_SERVER_PORT": "1"}).with_flags(port="2", host=None)
    assert config.port == 2 and config.host == "127.0.0.1"


def run_module(*args, **kwargs):
    return subprocess.run([sys.executable, str(MODULE), *args], capture_output=True, text=True,
                          timeout=30, **kwargs)


def test_help_documents_the_flags():
    result = run_module("--help")
    assert result.returncode == 0
    for flag in ("--host", "--port", "--threads"):
        assert flag in result.stdout


def test_the_readme_examples_can_be_pasted_as_they_are():
    readme = (MODULE.parent / "README.md").read_text()
    commands = "\n".join(re.findall(r"```sh\n(.*?)```", readme, re.DOTALL))
    assert "TASK=$(curl" in commands  # the first create keeps the id
    assert not re.search(r"\{(task_)?id\}", commands), "placeholders cannot be pasted"
    assert commands.index("TASK=$(curl") < commands.index("$TASK/")


def test_importing_the_module_has_no_side_effects():
    code = ("import logging, threading, orchestrator; "
            "assert threading.active_count() == 1; "
            "assert not logging.getLogger().handlers; "
            "assert not logging.getLogger('orchestrator').handlers")
    result = subprocess.run([sys.executable, "-c", code], cwd=MODULE.parent,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr



def test_importing_the_module_leaves_the_garbage_collector_alone():
    code = "import gc, orchestrator; assert not gc.callbacks and not gc.get_freeze_count()"
    result = subprocess.run([sys.executable, "-c", code], cwd=MODULE.parent,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_the_server_keeps_tasks_out_of_full_collections_and_thaws_once_the_frozen_set_doubles():
    code = textwrap.dedent("""
        import gc, weakref, orchestrator
        orchestrator._pace_the_collector()
        store = orchestrator.TaskStore()
        before = gc.get_freeze_count()
        for n in range(1000):
            store.create({"work_directory": "/repo", "prompt": f"task {n}"})
        gc.collect()
        assert gc.get_freeze_count() >= before + 1000, "the survivors of a full pass are frozen"

        class Node:
            pass
        node = Node()
        node.itself = node  # a cycle: only the collector can free it
        alive = weakref.ref(node)
        gc.collect()
        del node
        gc.collect()
        assert alive() is not None, "frozen, so a full pass does not scan it"
        ballast = [[] for _ in range(2 * gc.get_freeze_count())]
        for _ in range(3):  # frozen, thawed (the frozen set doubled), scanned
            gc.collect()
        assert alive() is None, "the pass after a thaw frees it"
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=MODULE.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


class ServerProcess:
    """`python orchestrator.py` in a subprocess, with the URL from its first line.

    `code` runs instead of the module's own main (it must call orchestrator.main).
    """

    def __init__(self, *args, code=None, **env):
        command = [sys.executable, str(MODULE)] if code is None else [sys.executable, "-c", code]
        self.process = subprocess.Popen(
            [*command, *args], text=True, cwd=MODULE.parent,
            env={**os.environ, "APP_SERVER_PORT": "0", "APP_SECURITY_RATE_LIMIT": "0", **env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.first_line = self.process.stdout.readline()
        found = re.search(r"listening on (http://[^\s;]+)", self.first_line)
        self.url = found.group(1) if found else None

    def stop(self, signum=signal.SIGTERM):
        """Send a signal; return (exit status, everything it wrote to stderr)."""
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=10), self.process.stderr.read()
        finally:
            self.process.kill()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_server_prints_its_url_and_stops_cleanly_on_a_signal(signum):
    server = ServerProcess(APP_LOG_FORMAT="json")
    assert server.first_line.startswith("orchestrator ")
    assert " listening on http://127.0.0.1:" in server.first_line
    assert "tasks live in memory only" in server.first_line
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=10)
    connection.request("GET", "/health")
    assert connection.getresponse().status == 200
    connection.close()
    status, stderr = server.stop(signum)
    assert status == 0
    logs = [json.loads(line) for line in stderr.splitlines()]
    access = [entry for entry in logs if entry["msg"] == "request"]
    assert access and access[0]["path"] == "/health" and access[0]["status"] == 200
    assert {"ts", "level", "msg", "method", "duration_ms", "client"} <= set(access[0])


def test_listening_beyond_loopback_without_a_key_warns():
    server = ServerProcess(APP_SERVER_HOST="0.0.0.0")
    status, stderr = server.stop()
    assert status == 0
    assert "WARNING" in stderr and "without APP_SECURITY_API_KEY" in stderr


# ---------------------------------------------------------------------------
# Keeping tasks: the data file
# ---------------------------------------------------------------------------

@pytest.fixture
def data_file(tmp_path):
    return str(tmp_path / "tasks.db")


@pytest.fixture
def open_store(clock, data_file):
    """Open stores on the data file (with the test's clock); each is closed at the end."""
    opened = []

    def open_store(**settings):
        store = TaskStore(**{"max_retries": 2, "task_timeout": 60, "retention": 3600,
                             "clock": clock, "path": data_file, **settings})
        opened.append(store)
        return store
    yield open_store
    for store in opened:
        store.close()


def everything(store):
    """Every task as the API shows it, newest first, and the counters."""
    tasks = [task.to_dict() for task in store.list({"limit": 1000})["tasks"]]
    counters = store.statistics()
    del counters["uptime_seconds"]
    return tasks, counters


def claim_order(store, directory):
    """Claim every claimable task of a directory; their prompts in claim order."""
    order = []
    while (task := store.claim(directory, "drain")) is not None:
        order.append(task.prompt)
    return order


def populate(store, clock):
    """Tasks in every status, with leases, keys, counters, a PATCH and re-queues."""
    ids = {}
    for number, (directory, priority) in enumerate([
        ("/a", "low"), ("/a", "high"), ("/a", "medium"), ("/a", "high"), ("/a", "medium"),
        ("/b", "medium"), ("/b", "medium"), ("/b", "low"), ("/a", "low"), ("/a", "medium"),
    ]):
        fields = {"work_directory": directory, "prompt": f"p{number}", "priority": priority,
                  "tags": [f"t{number}"], "metadata": {"n": number, "nested": {"x": [1.5]}}}
        task, _ = store.create(fields, idempotency_key=f"key-{number}")
        ids[number] = task.id
        clock.advance(1)
    store.update(ids[0], {"priority": "high"})  # keeps its place in time
    done = store.claim("/b", "w1")
    store.complete(done.id, {"result": {"output": "ok", "duration_ms": 5}})
    again = store.claim("/b", "w2")
    store.fail(again.id, {"error": "flaky"})  # re-queued, at the back
    failed = store.claim("/a", "w3")
    store.fail(failed.id, {"error": "broken", "retry": False})
    store.cancel(ids[8], {"reason": "not now"})
    expired = store.claim("/a", "w4")
    clock.advance(61)  # its lease runs out: re-queued at the next operation
    store.statistics()
    store.claim("/a", "holder")  # a lease that is still held
    store.delete(ids[9])
    store.retry(failed.id)
    clock.advance(1)
    return ids, expired


def test_a_restart_restores_every_task_the_queues_keys_and_counters(open_store, clock):
    store = open_store()
    ids, _ = populate(store, clock)
    before = everything(store)
    assert before[1]["retries_total"] >= 2 and before[1]["expired_leases_total"] == 1
    store.close()
    reopened = open_store()
    assert everything(reopened) == before
    with pytest.raises(Conflict) as reused:  # the keys came back with their bodies
        reopened.create({"work_directory": "/a", "prompt": "other"}, idempotency_key="key-1")
    assert reopened.create({"work_directory": "/a", "prompt": "p1", "priority": "high",
                            "tags": ["t1"], "metadata": {"n": 1, "nested": {"x": [1.5]}}},
                           idempotency_key="key-1")[0].id == ids[1]
    assert reused.value.details["task_id"] == ids[1]
    twin_clock = FakeClock()  # the same history in memory only
    twin = TaskStore(max_retries=2, task_timeout=60, retention=3600, clock=twin_clock)
    populate(twin, twin_clock)
    assert claim_order(reopened, "/a") == claim_order(twin, "/a")
    assert claim_order(reopened, "/b") == claim_order(twin, "/b")


def test_new_tasks_after_a_restart_queue_behind_the_old_ones(open_store):
    store = open_store()
    store.create({"work_directory": "/r", "prompt": "old"})
    store.close()
    reopened = open_store()
    reopened.create({"work_directory": "/r", "prompt": "new"})
    assert claim_order(reopened, "/r") == ["old", "new"]
    assert [t.prompt for t in reopened.list()["tasks"]] == ["new", "old"]


def test_numbers_and_places_after_a_restart_go_on_above_every_stored_one(open_store):
    # The sequence is not saved with each change: a restart goes on from the rows.
    store = open_store()
    for prompt in ("old1", "old2"):
        store.create({"work_directory": "/r", "prompt": prompt})
    held = store.claim("/r", "w")
    store.release(held.id, {"lease_token": held.lease_token})  # first in line, place < 0
    handed_out = store._sequence  # its last value went to that place
    store.close()
    reopened = open_store()
    assert reopened._sequence == handed_out
    reopened.create({"work_directory": "/r", "prompt": "new"})
    again = reopened.claim("/r", "w")
    reopened.release(again.id, {"lease_token": again.lease_token})
    assert claim_order(reopened, "/r") == ["old1", "old2", "new"]
    assert [t.prompt for t in reopened.list()["tasks"]] == ["new", "old2", "old1"]


def test_a_saved_sequence_above_the_rows_is_still_honoured(open_store, data_file):
    # Version 1 saved the counter with each change; its newest tasks may be gone.
    store = open_store()
    store.create({"work_directory": "/r", "prompt": "kept"})
    store.close()
    with contextlib.closing(sqlite3.connect(data_file)) as connection, connection:
        connection.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('sequence', 1000)")
        connection.execute("PRAGMA user_version = 1")
    reopened = open_store()
    task, _ = reopened.create({"work_directory": "/r", "prompt": "new"})
    assert task.number == 1001
    with contextlib.closing(sqlite3.connect(data_file)) as connection:
        # Marked as this version's, so that version 1, which trusts the counter, refuses it.
        assert connection.execute("PRAGMA user_version").fetchone()[0] == 2


def test_a_version_1_file_is_upgraded_to_rows_keyed_by_number(open_store, data_file):
    # Version 1 keyed the rows by the task's id. Opening its file copies them into a
    # table keyed by number; every task comes back as it was, and goes on being saved.
    store = open_store()
    store.create({"work_directory": "/r", "prompt": "held", "metadata": {"k": [1, 2]}})
    held = store.claim("/r", "w")
    doomed, _ = store.create({"work_directory": "/r", "prompt": "doomed", "tags": ["a"]})
    saved = everything(store)
    store.close()
    with contextlib.closing(sqlite3.connect(data_file)) as connection, connection:
        table = connection.execute("SELECT sql FROM sqlite_master WHERE name = 'tasks'").fetchone()[0]
        keyed_by_id = (table.replace('"id" TEXT NOT NULL', '"id" TEXT PRIMARY KEY')
                       .replace('"number" INTEGER PRIMARY KEY', '"number" INTEGER')
                       .replace(', "blocked_by" TEXT DEFAULT \'[]\'', ''))  # a later field
        assert keyed_by_id.count("PRIMARY KEY") == 1 and "blocked_by" not in keyed_by_id
        connection.execute("ALTER TABLE tasks RENAME TO tasks_as_they_are")
        connection.execute(keyed_by_id)
        names = ", ".join(name for _, name, *_ in connection.execute("PRAGMA table_info(tasks)"))
        connection.execute(f"INSERT INTO tasks SELECT {names} FROM tasks_as_they_are")
        connection.execute("DROP TABLE tasks_as_they_are")
        connection.execute("PRAGMA user_version = 1")
    upgraded = open_store()
    assert everything(upgraded) == saved
    upgraded.complete(held.id, {"lease_token": held.lease_token})
    upgraded.delete(doomed.id)
    after = everything(upgraded)
    upgraded.close()
    assert everything(open_store()) == after
    with contextlib.closing(sqlite3.connect(data_file)) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == 2
        tables = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        assert sorted(name for name, in tables) == ["meta", "tasks"]
        keys = connection.execute("SELECT number, rowid FROM tasks").fetchall()
        assert keys == [(held.number, held.number)]  # the number is the row's key


def restart_holding_a_task(open_store, clock, down_for):
    """A store whose task "w" holds is closed, the clock moved on, the file opened again."""
    store = open_store()
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    store.claim("/r", "w")
    store.close()
    clock.advance(down_for)
    return open_store(), task


def test_a_lease_that_ran_out_while_the_server_was_down_expires_at_the_first_request(
        open_store, clock):
    reopened, task = restart_holding_a_task(open_store, clock, down_for=61)
    again = reopened.get(task.id)
    assert (again.status, again.retry_count, again.worker_id) == ("waiting", 1, None)
    assert reopened.statistics()["expired_leases_total"] == 1


def test_a_held_lease_survives_a_restart_for_its_worker(open_store, clock):
    reopened, task = restart_holding_a_task(open_store, clock, down_for=30)
    assert reopened.heartbeat(task.id, {"worker_id": "w"}).status == "working"
    assert reopened.complete(task.id, {"worker_id": "w"}).status == "completed"


def test_a_lease_token_survives_a_restart_and_still_fences(open_store, clock):
    store = open_store()
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    token = store.claim("/r", "w").lease_token
    store.close()
    reopened = open_store()
    assert reopened.heartbeat(task.id, {"lease_token": token}).status == "working"
    reopened.release(task.id, {"lease_token": token})
    reopened.claim("/r", "w")
    with pytest.raises(Conflict, match="this lease is over"):
        reopened.complete(task.id, {"lease_token": token})


def test_a_token_the_file_kept_from_an_earlier_claim_is_never_revived(open_store, data_file,
                                                                       clock):
    store = open_store()
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    token = store.claim("/r", "a").lease_token
    store.close()
    # A version from before tokens claims the task again for b: it writes the columns it
    # knows and leaves lease_token alone.
    with contextlib.closing(sqlite3.connect(data_file)) as connection, connection:
        connection.execute("UPDATE tasks SET worker_id = 'b', started_at = started_at + 1, "
                           "version = version + 1 WHERE id = ?", (task.id,))
    reopened = open_store()
    with pytest.raises(Conflict, match="this lease is over"):
        reopened.complete(task.id, {"lease_token": token})
    assert reopened.get(task.id).worker_id == "b"


def test_the_data_file_is_readable_by_its_owner_only(open_store, data_file):
    open_store()
    assert os.stat(data_file).st_mode & 0o077 == 0


def test_a_delay_survives_a_restart(open_store, clock):
    store = open_store()
    task, _ = store.create({"work_directory": "/r", "prompt": "p", "delay_seconds": 30})
    store.close()
    reopened = open_store()
    assert reopened.claim("/r", "w") is None
    assert reopened.statistics()["delayed_tasks"] == 1
    clock.advance(30)
    assert reopened.claim("/r", "w").id == task.id


def test_dependencies_survive_a_restart(open_store):
    store = open_store()
    a = make(store, "a")
    b = make(store, "b", a)
    store.close()
    reopened = open_store()
    assert reopened.get(b.id).blocked_by == [a.id]
    assert reopened.claim("/r", "w").id == a.id and reopened.claim("/r", "w") is None
    reopened.complete(a.id)
    assert reopened.claim("/r", "w").id == b.id


def test_retention_goes_on_across_a_restart_and_clears_the_file(open_store, clock):
    store = open_store()
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    store.cancel(task.id)
    store.close()
    clock.advance(3601)
    reopened = open_store()
    assert reopened.statistics()["total_tasks"] == 0  # dropped at the first operation
    reopened.close()
    assert len(open_store()) == 0  # and from the file too


def test_a_change_to_more_tasks_than_one_statement_writes_survives_a_restart(open_store):
    # The writer puts up to UPSERT_ROWS rows in one statement; a bulk change spans several.
    store = open_store()
    count = 2 * orchestrator._UPSERT_ROWS + 3
    for n in range(count):
        store.create({"work_directory": "/r", "prompt": f"p{n}"})
    assert store.bulk({"action": "cancel", "filter": {"work_directory": "/r"}})["changed"] == count
    before = everything(store)
    store.close()
    reopened = open_store()
    assert everything(reopened) == before
    assert reopened.statistics()["cancelled_tasks"] == count


def test_a_deleted_task_stays_deleted_after_a_restart(open_store):
    store = open_store()
    task, _ = store.create({"work_directory": "/r", "prompt": "p"}, idempotency_key="k")
    store.delete(task.id)
    store.close()
    reopened = open_store()
    with pytest.raises(NotFound):
        reopened.get(task.id)
    assert reopened.create({"work_directory": "/r", "prompt": "p"}, "k")[1] is True


def test_a_second_store_on_the_same_file_is_refused_until_the_first_closes(open_store,
                                                                           data_file):
    first = open_store()
    with pytest.raises(ConfigError, match="in use by another process") as refused:
        TaskStore(path=data_file)
    assert data_file in refused.value.message
    first.close()
    open_store()


def test_a_second_server_on_the_same_file_exits_2(open_store, data_file, capsys):
    open_store()
    assert orchestrator.main(["--data-file", data_file, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert data_file in err and "in use by another process" in err and "Traceback" not in err


def bad_data_files(tmp_path):
    """Each kind of unusable data file: (path, words the refusal must contain)."""
    text = tmp_path / "notes.txt"
    text.write_text("not a database, just notes\n" * 100)
    foreign = tmp_path / "foreign.db"
    with contextlib.closing(sqlite3.connect(foreign)) as connection:
        connection.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
        connection.commit()
    newer = tmp_path / "newer.db"
    TaskStore(path=str(newer)).close()
    with contextlib.closing(sqlite3.connect(newer)) as connection:
        connection.execute("PRAGMA user_version = 999")
        connection.commit()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return {
        "missing directory": (tmp_path / "no" / "such" / "tasks.db", "directory"),
        "parent is a file": (blocker / "tasks.db", "directory"),
        "not a database": (text, "not"),
        "another program's database": (foreign, "not"),
        "a newer schema": (newer, "newer"),
        "a directory": (tmp_path, "is a directory"),
    }


@pytest.mark.parametrize("case", ["missing directory", "parent is a file", "not a database",
                                  "another program's database", "a newer schema",
                                  "a directory"])
def test_an_unusable_data_file_exits_2_naming_it(tmp_path, capsys, case):
    path, words = bad_data_files(tmp_path)[case]
    assert orchestrator.main(["--data-file", str(path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and words in err and "Traceback" not in err
    if case == "not a database":
        assert path.read_text().startswith("not a database")  # left as it was
    if case == "a directory":
        assert not Path(f"{path}.lock").exists()  # refused before a lock file was made


def test_the_data_file_can_be_read_with_sqlite(open_store, data_file):
    store = open_store()
    for prompt in ("a", "b"):
        store.create({"work_directory": "/r", "prompt": prompt})
    store.claim("/r", "w")
    with contextlib.closing(sqlite3.connect(data_file)) as connection:
        rows = connection.execute(
            "select status, count(*) from tasks group by status order by status").fetchall()
    assert rows == [("waiting", 1), ("working", 1)]


@contextlib.contextmanager
def failing_commits(store):
    """Every commit to the store's data file fails, as on a full disk; yields the list
    the attempts are counted in."""
    journal, attempts = store._journal, []  # no public way to fill a disk

    def disk_full():
        attempts.append(1)
        raise sqlite3.OperationalError("database or disk is full")
    journal._commit = disk_full
    try:
        yield attempts
    finally:
        del journal._commit


def test_a_failed_commit_answers_503_and_acknowledges_nothing(open_store, clock, data_file):
    store = open_store()
    client = webtest.TestApp(create_app(Config(rate_limit=0), store))
    kept = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "kept"}).json
    with failing_commits(store):
        res = client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": "lost"},
                               status=503)
        assert res.json["error"]["code"] == "STORAGE_ERROR"
        assert data_file in res.json["error"]["message"]
        client.get("/api/v1/statistics", status=503)  # it shows the unsaved task
    store.close()
    reopened = open_store()
    assert [task.prompt for task in reopened.list()["tasks"]] in (["kept"], ["lost", "kept"])
    assert reopened.get(kept["data"]["id"]).prompt == "kept"


def test_while_a_deletion_is_unsaved_reads_and_refusals_of_it_answer_503(open_store):
    # A 404 or a 409 shows the store as it is: here, a deletion the disk has not got.
    store = open_store()
    store._journal.retry_seconds = 0  # each read tries the deletion again
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    with failing_commits(store):
        with pytest.raises(orchestrator.StorageError):
            store.delete(task.id)
        with pytest.raises(orchestrator.StorageError):
            store.get(task.id)  # not NotFound: a crash now would bring the task back
        with pytest.raises(orchestrator.StorageError):
            store.complete(task.id, {"worker_id": "w"})
        with pytest.raises(orchestrator.ValidationError):
            store.create({"prompt": "a bad body shows nothing of the store"})
    with pytest.raises(orchestrator.NotFound):
        store.get(task.id)


@contextlib.contextmanager
def held_commits(store):
    """Commits to the store's data file wait until the block ends, as on a slow disk."""
    journal = store._journal
    commit, go = journal._commit, threading.Event()

    def slow_commit():
        go.wait(10)
        commit()
    journal._commit = slow_commit
    try:
        yield
    finally:
        go.set()
        del journal._commit


def test_a_refusal_is_answered_only_once_what_it_shows_is_on_disk(open_store):
    store = open_store()
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    with held_commits(store):
        deleting = Background(store.delete, task.id)
        deleting.start()
        wait_until(lambda: task.id not in store._tasks)  # deleted, not yet committed
        reading = Background(store.get, task.id)
        reading.start()
        reading.join(0.3)
        assert reading.is_alive()  # a 404 now would be taken back by a crash
    deleting.finish()
    reading.join(10)
    assert isinstance(reading.error, orchestrator.NotFound)


def test_a_refusal_waits_for_what_its_own_settling_changed(open_store, clock, data_file):
    store = open_store()
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    store.claim("/r", "w")
    clock.advance(61)  # the lease has run out: the next request, any request, expires it
    with held_commits(store):
        refusing = Background(store.get, NO_SUCH_TASK)
        refusing.start()
        refusing.join(0.3)
        assert refusing.is_alive()  # the expiry it made is not on disk yet
    refusing.join(10)
    assert isinstance(refusing.error, orchestrator.NotFound)
    assert status_on_disk(data_file, task.id) == "waiting"


def test_once_the_disk_has_room_a_read_saves_what_was_missed_and_answers(open_store):
    store = open_store()
    store._journal.retry_seconds = 0  # not a second after the failure: at once
    with failing_commits(store), pytest.raises(orchestrator.StorageError):
        store.create({"work_directory": "/r", "prompt": "saved by the next read"})
    assert store.statistics()["total_tasks"] == 1  # no write needed to get going again
    store.close()
    assert [task.prompt for task in open_store().list()["tasks"]] == ["saved by the next read"]


def test_while_the_disk_stays_full_reads_retry_at_most_once_a_retry_interval(open_store):
    store = open_store()
    store._journal.retry_seconds = 60
    with failing_commits(store) as attempts:
        with pytest.raises(orchestrator.StorageError):
            store.create({"work_directory": "/r", "prompt": "p"})
        for _ in range(5):
            with pytest.raises(orchestrator.StorageError):
                store.statistics()  # answered at once: the failure is fresh
        assert len(attempts) == 1
        store._journal.retry_seconds = 0
        with pytest.raises(orchestrator.StorageError):
            store.statistics()  # its interval is over: this read tries again
        assert len(attempts) == 2


def test_a_claim_that_could_not_be_saved_goes_back_first_in_line(open_store):
    # Its lease token reached no one: held, the task would wait out its lease.
    store = open_store()
    task, _ = store.create({"work_directory": "/r", "prompt": "first"})
    store.create({"work_directory": "/r", "prompt": "second"})
    with failing_commits(store), pytest.raises(orchestrator.StorageError):
        store.claim("/r", "w")
    again = store.claim("/r", "w2")
    assert (again.id, again.retry_count) == (task.id, 0)
    store.close()
    assert open_store().get(task.id).worker_id == "w2"


def test_after_a_failed_commit_the_next_one_saves_what_was_missed(open_store):
    store = open_store()
    with failing_commits(store), pytest.raises(orchestrator.StorageError):
        store.create({"work_directory": "/r", "prompt": "retried with the next batch"})
    store.create({"work_directory": "/r", "prompt": "next"})
    store.close()
    assert len(open_store()) == 2


@contextlib.contextmanager
def sqlite_refuses(data_file, event, when="true"):
    """Make SQLite itself refuse every row change of that kind (UPDATE, DELETE), or those
    of the rows `when` picks, as a full disk would, until the block ends."""
    def run(sql):
        with contextlib.closing(sqlite3.connect(data_file)) as connection, connection:
            connection.execute(sql)
    run(f"CREATE TRIGGER refuse BEFORE {event} ON tasks WHEN {when} "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    try:
        yield
    finally:
        run("DROP TRIGGER refuse")


def status_on_disk(data_file, task_id):
    with contextlib.closing(sqlite3.connect(data_file)) as connection:
        return connection.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]


def test_a_one_statement_batch_that_sqlite_refuses_is_saved_by_the_next(open_store, data_file):
    store = open_store()
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    with sqlite_refuses(data_file, "UPDATE"), pytest.raises(orchestrator.StorageError):
        store.cancel(task.id)  # the batch is the cancelled row alone
    assert status_on_disk(data_file, task.id) == "waiting"
    store.create({"work_directory": "/r", "prompt": "next"})
    store.close()
    assert open_store().get(task.id).status == "cancelled"


def test_a_batch_of_several_statements_that_sqlite_refuses_is_undone_whole(open_store,
                                                                           data_file):
    store = open_store()
    first, _ = store.create({"work_directory": "/r", "prompt": "first"})
    dependent, _ = store.create({"work_directory": "/r", "prompt": "then",
                                 "depends_on": [first.id]})
    # One batch, two statements: the dependent's row (cancelled), then the deletion.
    with sqlite_refuses(data_file, "DELETE"), pytest.raises(orchestrator.StorageError):
        store.delete(first.id)
    assert status_on_disk(data_file, dependent.id) == "waiting"  # undone with the deletion
    store.create({"work_directory": "/r", "prompt": "next"})
    store.close()
    reopened = open_store()
    assert reopened.get(dependent.id).status == "cancelled" and len(reopened) == 2


def test_a_batch_of_deletions_that_sqlite_refuses_midway_is_undone_whole(open_store,
                                                                          data_file):
    # One statement, but a set of parameters per row: still all or none.
    store = open_store()
    doomed = [store.create({"work_directory": "/r", "prompt": f"p{n}", "tags": ["doomed"]})[0]
              for n in range(4)]
    with (sqlite_refuses(data_file, "DELETE", when=f"old.number = {doomed[2].number}"),
          pytest.raises(orchestrator.StorageError)):
        store.bulk({"action": "delete", "filter": {"tag": "doomed"}})
    assert [status_on_disk(data_file, task.id) for task in doomed] == ["waiting"] * 4
    store.create({"work_directory": "/r", "prompt": "next"})
    store.close()
    assert [task.prompt for task in open_store().list()["tasks"]] == ["next"]


def test_the_server_says_where_its_tasks_are_kept(data_file):
    first = ServerProcess("--data-file", data_file)
    assert "0 tasks loaded from " + data_file in first.first_line
    urllib.request.urlopen(urllib.request.Request(
        first.url + "/api/v1/tasks", data=b'{"work_directory": "/r", "prompt": "p"}',
        headers={"Content-Type": "application/json"}), timeout=10).close()
    status, stderr = first.stop()
    assert status == 0 and "1 task kept in " + data_file in stderr
    second = ServerProcess(APP_DATA_FILE=data_file)
    assert "1 task loaded from " + data_file in second.first_line
    second.stop()


def test_a_server_without_a_data_file_says_its_tasks_are_gone():
    server = ServerProcess()
    urllib.request.urlopen(urllib.request.Request(
        server.url + "/api/v1/tasks", data=b'{"work_directory": "/r", "prompt": "p"}',
        headers={"Content-Type": "application/json"}), timeout=10).close()
    status, stderr = server.stop()
    assert status == 0
    assert ("stopped; 1 task was in memory and is gone (set APP_DATA_FILE to keep them)"
            in stderr)



# -- the journal underneath: versions, group commit, new fields -------------------

def journal_task(number, **changes):
    """A waiting Task as the store would hand it to the journal."""
    return orchestrator.Task(**{
        "id": f"task-{number}", "work_directory": "/r", "prompt": "p", "priority": "medium",
        "tags": [], "metadata": {}, "max_retries": 3, "created_at": 1000.0 + number,
        "updated_at": 1000.0 + number, "number": number,
        "queue_entry": (1, number, f"task-{number}"), "version": 1, **changes})


def save(journal, tasks=(), deleted=()):
    """Record changes as the store does (under a lock), then wait until they are on disk."""
    with threading.Lock():
        ticket = journal.record(list(tasks), list(deleted), {})
    journal.wait(ticket)


def test_an_older_version_of_a_row_never_overwrites_a_newer_one(data_file):
    journal = orchestrator._Journal(data_file)
    save(journal, [journal_task(1, prompt="newer", version=5)])
    save(journal, [journal_task(1, prompt="older", version=4)])
    rows, _ = journal.load()
    journal.close()
    assert [(row["prompt"], row["version"]) for row in rows] == [("newer", 5)]


def test_a_task_changed_after_it_was_recorded_is_saved_as_recorded(data_file):
    journal = orchestrator._Journal(data_file)
    task = journal_task(1, prompt="as recorded")
    with threading.Lock():
        ticket = journal.record([task], [], {})
    task.prompt, task.version = "changed later", 2  # as the store may, once its lock is free
    journal.wait(ticket)
    rows, _ = journal.load()
    journal.close()
    assert [(row["prompt"], row["version"]) for row in rows] == [("as recorded", 1)]


def test_changes_queued_together_share_one_commit(data_file):
    journal = orchestrator._Journal(data_file)
    tickets = [journal.record([journal_task(n)], [], {}) for n in range(8)]
    waiters = [Background(journal.wait, ticket) for ticket in tickets]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.finish()
    assert journal.commits == 1
    assert len(journal.load()[0]) == 8
    journal.close()


def test_a_field_added_to_the_task_later_gets_a_column_and_old_rows_its_default(
        data_file, monkeypatch):
    journal = orchestrator._Journal(data_file)
    save(journal, [journal_task(1)])
    journal.close()

    @dataclasses.dataclass(slots=True)
    class LaterTask(orchestrator.Task):
        progress: str | None = None
        depends_on: list = dataclasses.field(default_factory=list)
    monkeypatch.setattr(orchestrator, "Task", LaterTask)
    later = orchestrator._Journal(data_file)
    newer = LaterTask(**{**dataclasses.asdict(journal_task(2)), "progress": "half",
                         "depends_on": ["task-1"]})
    save(later, [newer])
    rows, _ = later.load()
    later.close()
    assert [(row["progress"], row["depends_on"]) for row in rows] == [
        (None, []), ("half", ["task-1"])]


@pytest.mark.parametrize("sync, level", [("full", 2), ("normal", 1)])
def test_data_sync_sets_how_sqlite_syncs(data_file, sync, level):
    store = TaskStore.from_config(Config(data_file=data_file, data_sync=sync))
    store.close()
    with contextlib.closing(sqlite3.connect(data_file)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    config = Config.from_env({"APP_DATA_FILE": data_file, "APP_DATA_SYNC": sync.upper()})
    assert (config.data_file, config.data_sync) == (data_file, sync)
    journal = orchestrator._Journal(data_file, sync)
    try:
        assert journal._connection.execute("PRAGMA synchronous").fetchone()[0] == level
    finally:
        journal.close()

# -- a crash over a real process: kill -9 under load loses nothing acknowledged ----

CRASHING_SERVER = """
import sys, time, orchestrator
mode = sys.argv.pop(1)
commit = orchestrator._Journal._commit
def slow_commit(journal):
    time.sleep(0.02)  # a slow disk: a wide window between a change and its commit
    commit(journal)
orchestrator._Journal._commit = slow_commit
if mode == "broken":
    # Acknowledges before committing: the variant the crash test must catch.
    orchestrator._Journal.wait = lambda journal, ticket: None
sys.exit(orchestrator.main(sys.argv[1:]))
"""


def call(url, method, path, body=None, headers=None):
    """One request on a fresh connection: (status, envelope); OSError or HTTPException if cut."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    try:
        connection.request(method, path, None if body is None else json.dumps(body),
                           {"Content-Type": "application/json", **(headers or {})})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


class Load:
    """Client threads that create (with keys), claim, complete and delete, noting what was
    acknowledged, until the server goes away."""

    def __init__(self, url, cycle, threads=6):
        self.url = url
        self.cycle = cycle
        self.created = {}  # idempotency key -> task id
        self.claimed = {}  # task id -> worker id
        self.completed = set()
        self.deleted = set()
        self.unacknowledged = []  # create bodies whose answer never came
        self.threads = [threading.Thread(target=self.work, args=(n,), daemon=True)
                        for n in range(threads)]
        for thread in self.threads:
            thread.start()

    def work(self, number):
        directory, worker = f"/crash/{self.cycle}/{number}", f"w{number}"
        for step in itertools.count():
            key = f"{self.cycle}-{number}-{step}"
            body = {"work_directory": directory, "prompt": key}
            try:
                status, answer = call(self.url, "POST", "/api/v1/tasks", body,
                                      {"Idempotency-Key": key})
            except (OSError, http.client.HTTPException):
                self.unacknowledged.append((key, body))
                return
            assert status == 201, answer
            task_id = self.created[key] = answer["data"]["id"]
            try:
                status, answer = call(self.url, "GET", f"/api/v1/tasks/next?work_path="
                                      f"{directory}&worker_id={worker}")
                assert status == 200 and answer["data"]["id"] == task_id, answer
                self.claimed[task_id] = worker
                status, answer = call(self.url, "POST", f"/api/v1/tasks/{task_id}/complete",
                                      {"worker_id": worker})
                assert status == 200, answer
                self.completed.add(task_id)
                if step % 3 == 0:
                    assert call(self.url, "DELETE", f"/api/v1/tasks/{task_id}")[0] == 200
                    self.deleted.add(task_id)
            except (OSError, http.client.HTTPException):
                return

    def join(self):
        for thread in self.threads:
            thread.join(timeout=30)


def lost_acknowledgements(url, load):
    """What a restarted server shows against what the load saw acknowledged; [] when nothing."""
    problems = []
    for key, task_id in load.created.items():
        status, answer = call(url, "GET", f"/api/v1/tasks/{task_id}")
        task = answer["data"]
        if task_id in load.deleted:
            if status != 404:
                problems.append(f"deleted task {key} came back")
        elif status != 200:
            problems.append(f"acknowledged create {key} is lost")
        elif task_id in load.completed and task["status"] != "completed":
            problems.append(f"acknowledged complete of {key} is lost: {task['status']}")
        elif task_id in load.claimed and task["status"] == "waiting":
            problems.append(f"acknowledged claim of {key} is lost")
    for key, body in load.unacknowledged:  # retried with their keys: exactly one task each
        status, answer = call(url, "POST", "/api/v1/tasks", body, {"Idempotency-Key": key})
        assert status in (200, 201), answer
        same = call(url, "GET", "/api/v1/tasks?limit=1000&work_directory="
                    + body["work_directory"])[1]["data"]["tasks"]
        if [task["prompt"] for task in same].count(key) != 1:
            problems.append(f"retried create {key} made {len(same)} tasks")
    return problems


def crash_under_load(data_file, mode, cycle):
    """Serve the file, load it, kill -9 mid-load; then check it with a restarted server."""
    server = ServerProcess(mode, "--data-file", data_file, code=CRASHING_SERVER)
    assert server.url, server.process.stderr.read()
    load = Load(server.url, cycle)
    wait_until(lambda: len(load.created) >= 30)
    server.process.kill()
    server.process.wait(timeout=10)
    load.join()
    restarted = ServerProcess("--data-file", data_file)
    try:
        return lost_acknowledgements(restarted.url, load), load
    finally:
        restarted.stop()


def test_kill_9_under_load_loses_nothing_acknowledged(data_file):
    for cycle in range(3):
        problems, load = crash_under_load(data_file, "durable", cycle)
        assert problems == [], problems
        assert load.completed and load.deleted  # the load did all four kinds of change


def test_the_crash_test_catches_a_server_that_acknowledges_before_committing(data_file):
    problems, _ = crash_under_load(data_file, "broken", 0)
    assert problems, "a server that answers before its commit lost nothing: the test is blind"

# ---------------------------------------------------------------------------
# /metrics: the Prometheus text format
# ---------------------------------------------------------------------------

def scrape(client):
    """/metrics parsed by Prometheus's own client library: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    res = client.get("/metrics")
    assert res.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(res.text) for sample in family.samples}


def test_metrics_track_the_queue_as_tasks_move(client, store, clock):
    first, _ = store.create({"work_directory": "/a", "prompt": "p", "priority": "high"})
    store.create({"work_directory": "/b", "prompt": "p", "priority": "low"})
    clock.advance(5)
    held = store.claim("/a", "w1")
    clock.advance(10)
    store.complete(held.id)
    clock.advance(3)
    seen = scrape(client)
    assert seen[("orchestrator_tasks", (("status", "waiting"),))] == 1
    assert seen[("orchestrator_tasks", (("status", "cancelled"),))] == 0  # zeros included
    assert seen[("orchestrator_tasks_created_total", (("priority", "high"),))] == 1
    assert seen[("orchestrator_tasks_created_total", (("priority", "medium"),))] == 0
    assert seen[("orchestrator_tasks_claimed_total", ())] == 1
    assert seen[("orchestrator_tasks_finished_total", (("status", "completed"),))] == 1
    assert seen[("orchestrator_oldest_waiting_task_age_seconds", ())] == 18
    assert seen[("orchestrator_work_directories_waiting", ())] == 1
    assert seen[("orchestrator_waiting_tasks", (("state", "claimable"),))] == 1
    assert seen[("orchestrator_waiting_tasks", (("state", "delayed"),))] == 0
    assert seen[("orchestrator_workers_busy", ())] == 0
    assert seen[("orchestrator_build_info", (("version", orchestrator.__version__),))] == 1
    assert seen[("orchestrator_task_wait_seconds_count", ())] == 1
    assert seen[("orchestrator_task_wait_seconds_sum", ())] == 5
    assert seen[("orchestrator_task_wait_seconds_bucket", (("le", "1.0"),))] == 0
    assert seen[("orchestrator_task_wait_seconds_bucket", (("le", "5.0"),))] == 1
    assert seen[("orchestrator_task_wait_seconds_bucket", (("le", "+Inf"),))] == 1
    run = (("status", "completed"),)
    assert seen[("orchestrator_task_run_seconds_sum", run)] == 10
    assert seen[("orchestrator_task_run_seconds_bucket", (("le", "15.0"), *run))] == 1
    store.claim("/b", "w2")
    clock.advance(61)  # its lease expires
    after = scrape(client)
    assert after[("orchestrator_lease_expirations_total", ())] == 1
    assert after[("orchestrator_tasks_retried_total", ())] == 1
    assert after[("orchestrator_workers_busy", ())] == 0


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")  # WebTest's lint, on BREW
def test_metrics_count_requests_by_route_template_never_by_raw_path(client, make_task):
    task = make_task()
    client.get(task_url(task))
    client.get(f"/api/v1/tasks/{uuid.uuid4()}", status=404)
    client.get("/no/such/path", status=404)
    client.request("/api/v1/statistics", method="BREW", status=405)
    text = client.get("/metrics").text
    seen = scrape(client)
    route = "/api/v1/tasks/{task_id}"
    assert seen[("orchestrator_http_requests_total",
                 (("code", "200"), ("method", "GET"), ("route", route)))] == 1
    assert seen[("orchestrator_http_requests_total",
                 (("code", "404"), ("method", "GET"), ("route", route)))] == 1
    assert seen[("orchestrator_http_requests_total",
                 (("code", "404"), ("method", "GET"), ("route", "unmatched")))] == 1
    assert ("orchestrator_http_requests_total",
            (("code", "405"), ("method", "other"), ("route", "/api/v1/statistics"))) in seen
    assert task["id"] not in text and "/no/such/path" not in text and "BREW" not in text


def test_metrics_follow_the_exposition_rules(client, make_task):
    make_task()
    text = client.get("/metrics").text
    assert text.endswith("\n")
    families = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)
    assert len(families) == len({name for name, _ in families}) == 15
    for name, kind in families:
        assert f"# HELP {name} " in text
        assert name.endswith("_total") == (kind == "counter")
        first_sample = re.search(f"^{name}[{{ _]", text, re.MULTILINE).start()
        assert text.index(f"# TYPE {name} ") < first_sample
    for labels in re.findall(r"\{([^}]*)\}", text):
        assert all(re.fullmatch(r'[a-z_]+="[^"\\\n]*"', pair) for pair in labels.split(","))


def test_metrics_need_the_key_obey_the_host_rule_and_scrapes_do_not_count(store):
    client = webtest.TestApp(create_app(Config(rate_limit=1, api_key="s3cret"), store))
    bearer = {"Authorization": "Bearer s3cret"}
    for _ in range(3):
        client.get("/metrics", headers=bearer)
    client.get("/metrics", status=401)
    client.get("/metrics", headers={**bearer, "Host": "evil.example"}, status=403)


def test_wrong_keys_at_metrics_count_and_a_spent_address_is_refused_whatever_its_key(store):
    client = webtest.TestApp(create_app(Config(rate_limit=2, api_key="s3cret"), store))
    bearer = {"Authorization": "Bearer s3cret"}
    for _ in range(3):
        client.get("/metrics", headers=bearer)  # a scrape with the key is never counted
    guesses = [client.get("/metrics", headers={"Authorization": f"Bearer guess{i}"},
                          expect_errors=True).status_int for i in range(3)]
    assert guesses == [401, 401, 429]
    # Else a 200 among the 429s would still tell a guesser which key is right.
    assert client.get("/metrics", headers=bearer, status=429).headers["Retry-After"]
    other = {"REMOTE_ADDR": "10.0.0.2"}
    client.get("/metrics", headers=bearer, extra_environ=other)


def test_promtool_accepts_the_metrics(client, make_task, claim):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs promtool, from Debian's prometheus package: "
                    "apt-get install prometheus (.ci/run installs it)")
    make_task()
    claim()
    client.get("/api/v1/tasks")
    result = subprocess.run([promtool, "check", "metrics"], input=client.get("/metrics").text,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------

def test_each_transition_is_logged_with_task_directory_and_worker(client, make_task, claim,
                                                                  caplog):
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        task = make_task(prompt="x" * 500)
        claim(worker_id="w5")
        client.post(task_url(task, "complete"))
    events = [r for r in caplog.records if r.getMessage().startswith("task ")]
    assert [r.getMessage() for r in events] == ["task created", "task claimed", "task completed"]
    assert all(r.task_id == task["id"] and r.work_directory == "/repo" for r in events)
    assert events[1].worker_id == "w5"
    assert len(events[0].prompt) == 80


CONTROL_CHARACTERS = {
    "escape sequences": "\u001b[31mRED\u001b]0;pwned\u0007",
    "NUL": "a\u0000b",
    "carriage return": "real\rforged",
    "newline": "one\n2026-01-01T00:00:00.000Z INFO    forged line",
    "DEL": "a\u007fb",
    "C1 (CSI)": "a\u009b31mb\u0085c",
    "line and paragraph separators": "a\u2028b\u2029c",
}


@pytest.mark.parametrize("text", CONTROL_CHARACTERS.values(), ids=CONTROL_CHARACTERS.keys())
def test_pretty_logs_escape_control_characters_from_requests(client, caplog, text):
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": text,
                                           "tags": [text.replace("\n", " ")]})
        worker_id = "w" + "".join(c for c in text if c.isprintable())  # its own rule
        task = client.get("/api/v1/tasks/next", {"work_path": "/r", "worker_id": worker_id}
                          ).json["data"]
        client.post_json(task_url(task, "fail"), {"error": text})
        client.get("/api/v1/tasks/" + urllib.parse.quote(text), status=404)
    formatter = orchestrator._PrettyFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert len(lines) >= 4
    for line in lines:
        assert line.isprintable(), repr(line)  # no control character, one line per event


@pytest.mark.parametrize("text", CONTROL_CHARACTERS.values(), ids=CONTROL_CHARACTERS.keys())
def test_json_logs_stay_one_json_object_per_line(client, caplog, text):
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        client.post_json("/api/v1/tasks", {"work_directory": "/r", "prompt": text})
    formatter = orchestrator._JsonFormatter()
    for record in caplog.records:
        line = formatter.format(record)
        assert "\n" not in line and line.isprintable()
        assert json.loads(line)["msg"]


def test_pretty_logs_keep_plain_values_bare_and_printable_unicode_as_is():
    record = logging.makeLogRecord({"msg": "task created", "levelname": "INFO",
                                    "work_directory": "/home/me/caf\u00e9", "prompt": "fix it"})
    line = orchestrator._PrettyFormatter().format(record)
    assert "work_directory=/home/me/caf\u00e9" in line and 'prompt="fix it"' in line


def test_the_api_key_is_never_logged(keyed_client, caplog):
    with caplog.at_level(logging.DEBUG):
        keyed_client.get("/api/v1/tasks", headers={"Authorization": "Bearer s3cret"})
    assert "s3cret" not in caplog.text


# ---------------------------------------------------------------------------
# Over real sockets
# ---------------------------------------------------------------------------

@pytest.fixture
def live_store():
    return TaskStore()


@pytest.fixture
def live_url(live_store):
    config = Config(rate_limit=0, threads=8, max_body=1000)
    with running_server(config, create_app(config, live_store)) as url:
        yield url


def raw_exchange(url, request_bytes):
    """Send raw bytes, return the raw answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request_bytes)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def post_raw(url, body, headers=b""):
    """POST /api/v1/tasks over a fresh connection; return (status line, body)."""
    answer = raw_exchange(url, (
        b"POST /api/v1/tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\n" + headers + b"\r\n" + body
    ))
    head, _, payload = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], payload


def test_over_a_socket_a_body_beyond_four_times_the_limit_is_refused_at_the_headers(
        live_url, live_store):
    status, _ = post_raw(live_url, b"", b"Content-Length: 999999\r\n")
    assert status.startswith(b"HTTP/1.1 413")  # waitress's own answer, at the headers
    assert live_store.statistics()["total_tasks"] == 0


def test_over_a_socket_a_body_of_exactly_the_limit_is_accepted(live_url, live_store):
    body = json.dumps({"work_directory": "/r", "prompt": "p" * 950}).encode()
    body = body[:-1] + b" " * (1000 - len(body)) + b"}"
    status, payload = post_raw(live_url, body, f"Content-Length: {len(body)}\r\n".encode())
    assert status.startswith(b"HTTP/1.1 201"), payload
    assert live_store.statistics()["total_tasks"] == 1


def get_raw(url, path, host=b"localhost"):
    """GET over a fresh connection, HTTP/1.0 when host is None; return (status line, body)."""
    if host is None:
        head = f"GET {path} HTTP/1.0\r\n\r\n".encode()
    else:
        head = f"GET {path} HTTP/1.1\r\nConnection: close\r\n".encode() + b"Host: " + host + b"\r\n\r\n"
    answer = raw_exchange(url, head)
    head, _, payload = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], payload


def test_over_a_socket_a_rebinding_host_is_refused(live_url, live_store):
    live_store.create({"work_directory": "/repo", "prompt": "secret plan"})
    status, payload = get_raw(live_url, "/api/v1/tasks", host=b"evil.example:8080")
    assert status.startswith(b"HTTP/1.1 403") and b"secret plan" not in payload
    status, payload = get_raw(live_url, "/api/v1/tasks", host=None)  # HTTP/1.0, no Host
    assert status.startswith(b"HTTP/1.0 200") or status.startswith(b"HTTP/1.1 200")
    assert b"secret plan" in payload


@pytest.mark.parametrize("size", [1001, 2000, 4000])
def test_over_a_socket_a_body_up_to_four_times_the_limit_gets_the_413_envelope(live_url,
                                                                              live_store, size):
    status, payload = post_raw(live_url, b"x" * size, f"Content-Length: {size}\r\n".encode())
    assert status.startswith(b"HTTP/1.1 413")
    error = json.loads(payload)["error"]
    assert error["code"] == "PAYLOAD_TOO_LARGE" and "1000" in error["message"]
    assert error["details"]["limit"] == 1000
    assert live_store.statistics()["total_tasks"] == 0


def test_over_a_socket_an_oversized_mcp_body_gets_a_json_rpc_error(live_url):
    body = b"x" * 3000
    answer = raw_exchange(live_url, (
        b"POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: 3000\r\n\r\n" + body))
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    message = json.loads(payload)
    assert message["jsonrpc"] == "2.0" and message["error"]["data"]["code"] == "PAYLOAD_TOO_LARGE"
    assert "1000" in message["error"]["message"]

def test_a_chunked_body_over_the_limit_is_refused_by_waitress(live_url, live_store):
    chunk = b"x" * 2000
    answer = raw_exchange(live_url, (
        b"POST /api/v1/tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n"
    ))
    assert answer.startswith(b"HTTP/1.1 413")
    assert live_store.statistics()["total_tasks"] == 0


def test_running_server_stops_and_frees_its_port():
    with running_server(Config(rate_limit=0)) as url:
        port = int(url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_concurrent_claims_deliver_each_task_exactly_once():
    """8 workers long-poll while half the tasks are still being created: none lost, none twice."""
    total, workers = 2000, 8
    store = TaskStore(max_waiters=workers)
    config = Config(rate_limit=0, threads=workers + 2)
    for i in range(total // 2):
        store.create({"work_directory": "/shared", "prompt": f"task {i}"})
    producing = threading.Event()
    producing.set()
    claimed: list[list[str]] = [[] for _ in range(workers)]
    errors = []

    def produce():
        for i in range(total // 2, total):
            store.create({"work_directory": "/shared", "prompt": f"task {i}"})
        producing.clear()

    def work(index, host_port):
        connection = http.client.HTTPConnection(host_port, timeout=30)
        try:
            while True:
                connection.request(
                    "GET", f"/api/v1/tasks/next?work_path=/shared&worker_id=w{index}&wait=1")
                task = json.loads(connection.getresponse().read())["data"]
                if task is not None:
                    claimed[index].append(task["id"])
                elif not producing.is_set():
                    return
        except Exception as error:  # reported by the main thread
            errors.append(error)
        finally:
            connection.close()

    with running_server(config, create_app(config, store)) as url:
        threads = [threading.Thread(target=work, args=(i, url.removeprefix("http://")))
                   for i in range(workers)]
        threads.append(threading.Thread(target=produce))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    every = [task_id for ids in claimed for task_id in ids]
    assert not errors
    assert len(every) == total and len(set(every)) == total
    assert sum(1 for ids in claimed if ids) > 1  # the work really was shared
    stats = store.statistics()
    assert stats["working_tasks"] == total and stats["waiting_tasks"] == 0


# ---------------------------------------------------------------------------
# A small JSON Schema checker: the subset the service's schemas use
# ---------------------------------------------------------------------------

def schema_errors(schema, value, path="$", root=None):
    """Every way value breaks schema, as readable strings (empty when it conforms).

    `root` is the document that $refs point into.
    """
    if "$ref" in schema:
        return schema_errors(resolve(root, schema["$ref"]), value, path, root)
    if "anyOf" in schema:
        if all(schema_errors(option, value, path, root) for option in schema["anyOf"]):
            return [f"{path}: matches no anyOf option"]
        return []
    if "const" in schema and value != schema["const"]:
        return [f"{path}: is not {schema['const']!r}"]
    types = schema.get("type")
    if types is not None:
        allowed = types if isinstance(types, list) else [types]
        if not any(json_type_matches(name, value) for name in allowed):
            return [f"{path}: {value!r} is not of type {types}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1e18):
            errors.append(f"{path}: length {len(value)} out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: does not match {schema['pattern']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            value < schema.get("minimum", -1e18) or value > schema.get("maximum", 1e18)):
        errors.append(f"{path}: {value} out of bounds")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", 1e18):
            errors.append(f"{path}: too many items")
        for index, item in enumerate(value):
            errors += schema_errors(schema.get("items", {}), item, f"{path}[{index}]", root)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{path}: missing {name}" for name in schema.get("required", [])
                   if name not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: unexpected {name}" for name in value if name not in properties]
        for name, item in value.items():
            if name in properties:
                errors += schema_errors(properties[name], item, f"{path}.{name}", root)
    return errors


def resolve(root, ref):
    """The schema a local $ref such as #/components/schemas/Task points at."""
    assert ref.startswith("#/"), ref
    target = root
    for part in ref[2:].split("/"):
        target = target[part]
    return target


def json_type_matches(name, value):
    return {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "null": value is None,
    }[name]


def test_the_schema_checker_catches_what_it_claims_to():
    schema = orchestrator._TASK_SCHEMA
    good = orchestrator.TaskStore().create({"work_directory": "/r", "prompt": "p"})[0].to_dict()
    assert schema_errors(schema, good) == []
    for broken in ({**good, "status": "lost"}, {**good, "extra": 1}, {**good, "retry_count": -1},
                   {k: v for k, v in good.items() if k != "id"}, {**good, "result": "text"}):
        assert schema_errors(schema, broken)


# ---------------------------------------------------------------------------
# MCP
# ---------------------------------------------------------------------------

MODERN = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {}}


@pytest.fixture
def rpc(client):
    """Send one JSON-RPC message to /mcp; the headers follow the era of `version`."""
    def rpc(method, params=None, *, version="2025-11-25", request_id=1, headers=None,
            status=200, notification=False):
        message = {"jsonrpc": "2.0", "method": method}
        if not notification:
            message["id"] = request_id
        params = dict(params or {})
        sent = {}
        if version == MODERN:
            params.setdefault("_meta", META)
            sent = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
            if method == "tools/call":
                sent["Mcp-Name"] = params.get("name", "")
        elif version is not None:
            sent = {"MCP-Protocol-Version": version}
        if params:
            message["params"] = params
        sent.update(headers or {})
        res = client.post("/mcp", json.dumps(message).encode(), content_type="application/json",
                          headers={k: v for k, v in sent.items() if v is not None}, status=status)
        assert "Mcp-Session-Id" not in res.headers
        return res
    return rpc


@pytest.fixture
def call_tool(rpc):
    """tools/call; returns the JSON-RPC result."""
    def call_tool(name, arguments=None, version="2025-11-25"):
        res = rpc("tools/call", {"name": name, "arguments": arguments or {}}, version=version)
        return res.json["result"]
    return call_tool


HANDSHAKE_VERSIONS = ["2025-03-26", "2025-06-18", "2025-11-25"]
MISSING_ID = NO_SUCH_TASK
TOOL_NAMES = ["create_task", "acquire_task", "complete_task", "fail_task", "heartbeat_task",
              "release_task", "cancel_task", "retry_task", "get_task", "wait_for_task",
              "update_task", "delete_task", "list_tasks", "list_directories", "get_statistics"]


@pytest.mark.parametrize("version", HANDSHAKE_VERSIONS)
def test_handshake_conversation(rpc, version):
    init = rpc("initialize", {"protocolVersion": version, "capabilities": {},
                              "clientInfo": {"name": "test", "version": "1"}}, version=None)
    result = init.json["result"]
    assert init.json["id"] == 1 and result["protocolVersion"] == version
    assert result["serverInfo"] == {"name": "simple-task-orchestrator", "version": "1.0.0",
                                    "title": "Simple Task Orchestrator"}
    assert result["capabilities"] == {"tools": {"listChanged": False}}
    for step in ("acquire_task", "heartbeat_task", "complete_task", "fail_task", "worker_id"):
        assert step in result["instructions"]
    initialized = rpc("notifications/initialized", version=version, notification=True, status=202)
    assert initialized.body == b""
    assert rpc("ping", version=version, request_id="p").json == {
        "jsonrpc": "2.0", "id": "p", "result": {}}
    tools = rpc("tools/list", version=version).json["result"]
    assert [tool["name"] for tool in tools["tools"]] == TOOL_NAMES
    assert "resultType" not in tools and "ttlMs" not in tools
    created = rpc("tools/call", {"name": "create_task", "arguments": {
        "work_directory": "/r", "prompt": "p"}}, version=version).json["result"]
    assert created["isError"] is False and created["structuredContent"]["status"] == "waiting"
    assert json.loads(created["content"][0]["text"]) == created["structuredContent"]


@pytest.mark.parametrize("asked", ["2024-11-05", MODERN, "someday", None])
def test_initialize_offers_the_newest_handshake_version_otherwise(rpc, asked):
    result = rpc("initialize", {"protocolVersion": asked, "capabilities": {}},
                 version=None).json["result"]
    assert result["protocolVersion"] == "2025-11-25"


def test_a_missing_version_header_means_2025_03_26(rpc):
    res = rpc("tools/call", {"name": "create_task", "arguments": {"prompt": "p"}}, version=None)
    assert res.json["error"]["code"] == -32602  # argument errors are protocol errors there
    assert res.json["error"]["message"] == "work_directory: is required"


def test_modern_conversation(rpc, call_tool):
    discover = rpc("server/discover", version=MODERN).json["result"]
    assert discover["supportedVersions"][0] == MODERN
    assert set(HANDSHAKE_VERSIONS) <= set(discover["supportedVersions"])
    assert discover["capabilities"] == {"tools": {"listChanged": False}}
    assert "acquire_task" in discover["instructions"]
    assert discover["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == (
        "simple-task-orchestrator")
    assert discover["resultType"] == "complete" and discover["cacheScope"] == "public"
    assert discover["ttlMs"] > 0
    tools = rpc("tools/list", version=MODERN).json["result"]
    assert [tool["name"] for tool in tools["tools"]] == TOOL_NAMES
    assert tools["resultType"] == "complete" and tools["ttlMs"] > 0
    created = call_tool("create_task", {"work_directory": "/m", "prompt": "p"}, version=MODERN)
    assert created["resultType"] == "complete" and created["isError"] is False
    acquired = call_tool("acquire_task", {"work_path": "/m", "worker_id": "w"}, version=MODERN)
    assert acquired["structuredContent"]["task"]["id"] == created["structuredContent"]["id"]


@pytest.mark.parametrize("meta", [None, {}, {"io.modelcontextprotocol/protocolVersion": MODERN},
                                  {"io.modelcontextprotocol/clientCapabilities": {}}, "text", 5,
                                  [1]])
def test_a_modern_request_without_its_meta_is_invalid_params(rpc, meta):
    params = {} if meta is None else {"_meta": meta}
    res = rpc("tools/list", params, version=None, status=400,
              headers={"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/list"})
    assert res.json["error"]["code"] == -32602 and res.json["id"] == 1


@pytest.mark.parametrize("headers", [
    {"MCP-Protocol-Version": "2025-11-25"},
    {"Mcp-Method": None},
    {"Mcp-Method": "tools/list"},
    {"Mcp-Name": "get_task"},
    {"Mcp-Name": None},
    {"Mcp-Name": "=?base64?not base64?="},
])
def test_modern_headers_must_agree_with_the_body(rpc, store, headers):
    res = rpc("tools/call", {"name": "create_task", "arguments": {
        "work_directory": "/r", "prompt": "p"}}, version=MODERN, headers=headers, status=400)
    assert res.json["error"]["code"] == -32020
    assert res.json["error"]["message"].startswith("Header mismatch")
    assert store.statistics()["total_tasks"] == 0


def test_a_modern_mcp_name_may_come_base64_encoded(rpc):
    encoded = "=?base64?" + __import__("base64").b64encode(b"get_statistics").decode() + "?="
    res = rpc("tools/call", {"name": "get_statistics"}, version=MODERN,
              headers={"Mcp-Name": encoded})
    assert res.json["result"]["isError"] is False


def test_an_unsupported_modern_version_names_the_supported_ones(rpc):
    meta = {**META, "io.modelcontextprotocol/protocolVersion": "2099-01-01"}
    res = rpc("tools/list", {"_meta": meta}, version=None, status=400,
              headers={"MCP-Protocol-Version": "2099-01-01", "Mcp-Method": "tools/list"})
    error = res.json["error"]
    assert error["code"] == -32022 and error["data"]["requested"] == "2099-01-01"
    assert MODERN in error["data"]["supported"]


@pytest.mark.parametrize("meta", [5, "text", [1], None])
def test_odd_meta_in_a_handshake_request_is_ignored(rpc, meta):
    assert rpc("ping", {"_meta": meta}).json["result"] == {}


def test_an_unsupported_version_header_without_meta_is_a_400(rpc):
    res = rpc("tools/list", version="1999-01-01", status=400)
    assert res.json["error"]["code"] == -32602


def test_an_unknown_version_header_is_named_with_the_versions_spoken(rpc):
    message = rpc("tools/list", version="1999-01-01", status=400).json["error"]["message"]
    assert "1999-01-01" in message and "2025-11-25" in message and "2026-07-28" in message


@pytest.mark.parametrize("method, version, status", [
    ("resources/list", "2025-11-25", 200),
    ("server/discover", "2025-06-18", 200),
    ("resources/list", MODERN, 404),
    ("initialize", MODERN, 404),
    ("ping", MODERN, 404),
])
def test_an_unknown_method_is_32601_with_the_eras_status(rpc, method, version, status):
    res = rpc(method, version=version, status=status)
    assert res.json["error"]["code"] == -32601 and res.json["id"] == 1


@pytest.mark.parametrize("version, status", [("2025-11-25", 200), (MODERN, 400)])
def test_an_unknown_tool_is_32602(rpc, version, status):
    res = rpc("tools/call", {"name": "make_coffee"}, version=version, status=status)
    assert res.json["error"]["code"] == -32602 and "make_coffee" in res.json["error"]["message"]


@pytest.mark.parametrize("params", [{}, {"name": 7}])
def test_a_tool_call_without_a_name_says_so_not_a_python_repr(rpc, params):
    res = rpc("tools/call", params)
    assert res.json["error"]["code"] == -32602
    assert res.json["error"]["message"] == "params.name must be a string: the tool's name"


def test_a_header_mismatch_shows_both_values_as_json(rpc):
    res = rpc("tools/call", {"name": "get_statistics", "arguments": {}}, version=MODERN,
              headers={"Mcp-Name": None}, status=400)
    assert res.json["error"]["message"] == (
        'Header mismatch: Mcp-Name header value null does not match body value "get_statistics"')


@pytest.mark.parametrize("raw, code", [
    (b"{", -32700),
    (b"\xff", -32700),
    (b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]', -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "result": {}}', -32600),
    (b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}', -32600),
    (b'{"jsonrpc": "2.0", "id": true, "method": "ping"}', -32600),
    (b'{"jsonrpc": "2.0", "id": {}, "method": "ping"}', -32600),
    (b'{"jsonrpc": "2.0", "id": 2.5, "method": "ping"}', -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": []}', -32600),
    (b"null", -32600),
    (b"", -32600),
])
def test_malformed_messages_are_400_with_the_json_rpc_code(client, raw, code):
    res = client.post("/mcp", raw, content_type="application/json", status=400)
    assert res.json["error"]["code"] == code and res.json["id"] is None


@pytest.mark.parametrize("method, version", [("notifications/initialized", "2025-11-25"),
                                             ("notifications/cancelled", "2025-06-18"),
                                             ("notifications/anything", MODERN)])
def test_any_notification_is_202_without_a_body(rpc, method, version):
    assert rpc(method, version=version, notification=True, status=202).body == b""


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_get_and_delete_on_mcp_are_405_allowing_post(client, method):
    res = client.request("/mcp", method=method, status=405)
    assert res.headers["Allow"] == "POST"


def test_every_tool_works_and_returns_what_rest_returns(client, call_tool, claim):
    created = call_tool("create_task", {"work_directory": "/r", "prompt": "p", "priority": "high",
                                        "idempotency_key": "k1"})["structuredContent"]
    again = call_tool("create_task", {"work_directory": "/r", "prompt": "p", "priority": "high",
                                      "idempotency_key": "k1"})["structuredContent"]
    assert again["id"] == created["id"]
    task_id = created["id"]
    acquired = call_tool("acquire_task", {"work_path": "/r", "worker_id": "w"})
    assert acquired["structuredContent"]["task"]["id"] == task_id
    beat = call_tool("heartbeat_task", {"task_id": task_id, "worker_id": "w",
                                        "progress": "half way"})
    assert beat["structuredContent"]["progress"] == "half way"
    released = call_tool("release_task", {"task_id": task_id, "worker_id": "w"})
    assert released["structuredContent"]["status"] == "waiting"
    assert released["structuredContent"]["retry_count"] == 0
    assert call_tool("acquire_task", {"work_path": "/r", "worker_id": "w"})[
        "structuredContent"]["task"]["id"] == task_id
    done = call_tool("complete_task", {"task_id": task_id, "worker_id": "w",
                                       "result": {"output": "ok", "duration_ms": 5}})
    assert done["structuredContent"]["result"] == {"status": "success", "output": "ok",
                                                   "duration_ms": 5}
    rest = client.get(f"/api/v1/tasks/{task_id}").json["data"]
    assert call_tool("get_task", {"task_id": task_id})["structuredContent"] == rest
    second = call_tool("create_task", {"work_directory": "/r", "prompt": "two"})
    second_id = second["structuredContent"]["id"]
    updated = call_tool("update_task", {"task_id": second_id, "prompt": "2", "tags": ["x"]})
    assert updated["structuredContent"]["prompt"] == "2"
    token = call_tool("acquire_task", {"work_path": "/r", "worker_id": "w"})[
        "structuredContent"]["task"]["lease_token"]
    failed = call_tool("fail_task", {"task_id": second_id, "error": "no", "retry": False,
                                     "lease_token": token})
    assert failed["structuredContent"]["status"] == "failed"
    retried = call_tool("retry_task", {"task_id": second_id})
    assert retried["structuredContent"]["status"] == "waiting"
    cancelled = call_tool("cancel_task", {"task_id": second_id, "reason": "enough"})
    assert cancelled["structuredContent"]["error_message"] == "enough"
    page = call_tool("list_tasks", {"status": "completed"})["structuredContent"]
    assert page == {**client.get("/api/v1/tasks?status=completed").json["data"]}
    stats = call_tool("get_statistics")["structuredContent"]
    assert stats["completed_tasks"] == 1 and stats["cancelled_tasks"] == 1
    deleted = call_tool("delete_task", {"task_id": second_id})["structuredContent"]
    assert deleted == {"id": second_id, "deleted": True}
    empty = call_tool("acquire_task", {"work_path": "/r//", "worker_id": "w"})
    assert empty["structuredContent"] == {"task": None}
    assert empty["content"][0]["text"] == "No task is waiting in /r right now."


@pytest.mark.parametrize("tool, arguments", [
    ("complete_task", {}), ("fail_task", {"error": "x"}), ("heartbeat_task", {}),
    ("release_task", {}),
])
def test_reporting_tools_need_a_lease_token_or_a_worker_id(call_tool, store, tool, arguments):
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    acquired = call_tool("acquire_task", {"work_path": "/r", "worker_id": "w"})
    token = acquired["structuredContent"]["task"]["lease_token"]
    refused = call_tool(tool, {"task_id": task.id, **arguments})
    assert refused["isError"] is True
    assert "lease_token: is required (or worker_id)" in refused["content"][0]["text"]
    assert store.get(task.id).status == "working"
    accepted = call_tool(tool, {"task_id": task.id, "lease_token": token, **arguments})
    assert accepted["isError"] is False


def test_tools_and_instructions_tell_the_agent_to_pass_back_its_lease_token(rpc):
    tools = {tool["name"]: tool for tool in rpc("tools/list").json["result"]["tools"]}
    assert "lease_token" in tools["acquire_task"]["description"]
    for name in ("complete_task", "fail_task", "heartbeat_task", "release_task"):
        assert "lease_token" in tools[name]["inputSchema"]["properties"]
        assert "lease_token" in tools[name]["description"]
        assert "anyOf" not in tools[name]["inputSchema"]  # some clients refuse it at the top
    init = rpc("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                              "clientInfo": {"name": "t", "version": "1"}}, version=None)
    assert "lease_token" in init.json["result"]["instructions"]


def test_list_directories_tool_shows_what_rest_shows(client, call_tool, make_task):
    make_task(work_directory="/a")
    listed = call_tool("list_directories")["structuredContent"]
    assert listed == client.get("/api/v1/directories").json["data"]
    assert listed["directories"][0]["counts"]["waiting"] == 1


def test_get_task_reads_a_task_that_has_not_finished(call_tool, store):
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    assert call_tool("get_task", {"task_id": task.id})["structuredContent"]["status"] == "waiting"


def test_wait_for_task_says_plainly_whether_the_task_finished(call_tool, store):
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    waiting = call_tool("wait_for_task", {"task_id": task.id, "wait": 0})
    assert waiting["structuredContent"]["status"] == "waiting"
    assert waiting["content"][0]["text"].startswith(f"Task {task.id} has not finished")
    store.cancel(task.id)
    done = call_tool("wait_for_task", {"task_id": task.id, "wait": 1})
    assert done["content"][0]["text"].startswith(f"Task {task.id} finished: cancelled")


def test_every_tool_result_conforms_to_its_output_schema(rpc, call_tool):
    schemas = {tool["name"]: tool["outputSchema"]
               for tool in rpc("tools/list").json["result"]["tools"]}
    task_id = call_tool("create_task", {"work_directory": "/r", "prompt": "p"})[
        "structuredContent"]["id"]
    calls = [
        ("acquire_task", {"work_path": "/r", "worker_id": "w"}),
        ("heartbeat_task", {"task_id": task_id, "worker_id": "w"}),
        ("complete_task", {"task_id": task_id, "worker_id": "w"}),
        ("get_task", {"task_id": task_id}),
        ("acquire_task", {"work_path": "/r", "worker_id": "w"}),
        ("list_tasks", {}),
        ("get_statistics", {}),
        ("delete_task", {"task_id": task_id}),
    ]
    for name, arguments in calls:
        result = call_tool(name, arguments)
        assert result["isError"] is False, result
        assert schema_errors(schemas[name], result["structuredContent"]) == [], name


@pytest.mark.parametrize("name, arguments, code", [
    ("get_task", {"task_id": MISSING_ID}, "NOT_FOUND"),
    ("complete_task", {"task_id": MISSING_ID, "worker_id": "w"}, "NOT_FOUND"),
    ("fail_task", {"task_id": MISSING_ID, "error": "x", "lease_token": "t"}, "NOT_FOUND"),
    ("heartbeat_task", {"task_id": MISSING_ID, "worker_id": "w"}, "NOT_FOUND"),
    ("cancel_task", {"task_id": MISSING_ID}, "NOT_FOUND"),
    ("retry_task", {"task_id": MISSING_ID}, "NOT_FOUND"),
    ("update_task", {"task_id": MISSING_ID, "prompt": "x"}, "NOT_FOUND"),
    ("delete_task", {"task_id": MISSING_ID}, "NOT_FOUND"),
    ("complete_task", {"task_id": "WAITING", "worker_id": "w"}, "CONFLICT"),
    ("fail_task", {"task_id": "WAITING", "error": "x", "lease_token": "t"}, "CONFLICT"),
    ("heartbeat_task", {"task_id": "WAITING", "worker_id": "w"}, "CONFLICT"),
    ("retry_task", {"task_id": "WAITING"}, "CONFLICT"),
    ("create_task", {"work_directory": "/r", "prompt": "other", "idempotency_key": "k"},
     "CONFLICT"),
])
def test_business_errors_are_tool_results_starting_with_the_code(call_tool, name, arguments,
                                                                 code):
    waiting = call_tool("create_task", {"work_directory": "/r", "prompt": "p",
                                        "idempotency_key": "k"})["structuredContent"]
    arguments = {key: waiting["id"] if value == "WAITING" else value
                 for key, value in arguments.items()}
    result = call_tool(name, arguments)
    assert result["isError"] is True and "structuredContent" not in result
    assert result["content"][0]["text"].startswith(f"{code}: ")


@pytest.mark.parametrize("version, as_protocol_error", [
    ("2025-03-26", True), ("2025-06-18", True), ("2025-11-25", False), (MODERN, False),
])
def test_argument_errors_follow_the_revision(rpc, store, version, as_protocol_error):
    res = rpc("tools/call", {"name": "create_task", "arguments": {
        "work_directory": "relative", "prompt": "p"}}, version=version)
    if as_protocol_error:
        assert res.json["error"]["code"] == -32602
        assert res.json["error"]["data"] == {"field": "work_directory"}
    else:
        result = res.json["result"]
        assert result["isError"] is True
        assert result["content"][0]["text"].startswith("VALIDATION_ERROR: work_directory:")
    assert store.statistics()["total_tasks"] == 0


@pytest.mark.parametrize("params", [{"name": ["create_task"]}, {"name": {"a": 1}},
                                    {"name": "list_tasks", "arguments": []},
                                    {"name": "list_tasks", "arguments": 0}])
def test_a_malformed_tool_call_is_32602_not_a_500(rpc, params):
    res = rpc("tools/call", params)
    assert res.json["id"] == 1 and res.json["error"]["code"] == -32602


def test_a_reused_idempotency_key_names_the_task_in_the_tool_error(call_tool):
    first = call_tool("create_task", {"work_directory": "/r", "prompt": "a",
                                      "idempotency_key": "k"})["structuredContent"]
    again = call_tool("create_task", {"work_directory": "/r", "prompt": "b",
                                      "idempotency_key": "k"})
    assert again["isError"] and first["id"] in again["content"][0]["text"]


def test_tools_reject_unknown_arguments(call_tool, store):
    result = call_tool("create_task", {"work_directory": "/r", "prompt": "p", "status": "done"})
    assert result["content"][0]["text"].startswith("VALIDATION_ERROR: unknown fields: status")
    assert store.statistics()["total_tasks"] == 0


def test_tool_schemas_come_from_the_request_declarations(rpc):
    tools = {tool["name"]: tool for tool in rpc("tools/list").json["result"]["tools"]}
    create = tools["create_task"]["inputSchema"]
    assert create["properties"]["work_directory"] == orchestrator.WORK_DIRECTORY.json_schema()
    assert create["required"] == ["work_directory", "prompt"]
    assert create["additionalProperties"] is False
    assert create["properties"]["idempotency_key"]["maxLength"] == 200
    complete = tools["complete_task"]["inputSchema"]["properties"]
    assert complete["result"]["properties"]["status"]["enum"] == ["success", "failure"]
    assert tools["acquire_task"]["inputSchema"]["required"] == ["work_path", "worker_id"]
    acquired = tools["acquire_task"]["outputSchema"]["properties"]["task"]
    assert schema_errors(acquired, None) == []


def test_tool_annotations_mark_reads_and_deletes(rpc):
    tools = {tool["name"]: tool["annotations"] for tool in rpc("tools/list").json["result"]["tools"]}
    assert {name for name, hints in tools.items() if hints.get("readOnlyHint")} == {
        "get_task", "wait_for_task", "list_tasks", "list_directories", "get_statistics"}
    assert tools["delete_task"]["destructiveHint"] is True
    assert tools["create_task"]["destructiveHint"] is False


def test_mcp_refuses_a_foreign_origin(rpc, store):
    res = rpc("tools/call", {"name": "create_task", "arguments": {"work_directory": "/r",
              "prompt": "p"}}, headers={"Origin": "http://evil.example"}, status=403)
    assert res.json["error"]["code"] == -32600 and res.json["id"] is None
    assert res.json["error"]["data"]["code"] == "FORBIDDEN"
    assert store.statistics()["total_tasks"] == 0
    rpc("ping", headers={"Origin": "http://localhost"})


def test_mcp_needs_the_api_key_when_one_is_set(store):
    client = webtest.TestApp(create_app(Config(rate_limit=0, api_key="s3cret"), store))
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
    res = client.post("/mcp", body, content_type="application/json", status=401)
    assert res.headers["WWW-Authenticate"].startswith("Bearer")
    assert res.json["error"]["data"]["code"] == "UNAUTHORIZED"
    client.post("/mcp", body, content_type="application/json",
                headers={"Authorization": "Bearer s3cret"}, status=200)


def test_mcp_wrong_key_attempts_count_against_the_rate_limit(store):
    client = webtest.TestApp(create_app(Config(rate_limit=3, api_key="s3cret"), store))
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
    guesses = [client.post("/mcp", body, content_type="application/json", expect_errors=True,
                           headers={"Authorization": f"Bearer guess{i}"}).status_int
               for i in range(5)]
    assert guesses == [401, 401, 401, 429, 429]


def test_mcp_refuses_an_address_that_spent_its_limit_on_guesses_even_with_the_key(store):
    client = webtest.TestApp(create_app(Config(rate_limit=2, api_key="s3cret"), store))
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()

    def ping(key):
        return client.post("/mcp", body, content_type="application/json", expect_errors=True,
                           headers={"Authorization": f"Bearer {key}"}).status_int

    assert [ping("guess"), ping("guess"), ping("s3cret")] == [401, 401, 429]


def test_mcp_tool_calls_over_the_limit_are_tool_results_with_a_key_too(store):
    client = webtest.TestApp(create_app(Config(rate_limit=1, api_key="s3cret"), store))
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "get_statistics"}}).encode()
    answers = [client.post("/mcp", body, content_type="application/json",
                           headers={"Authorization": "Bearer s3cret",
                                    "MCP-Protocol-Version": "2025-11-25"}).json["result"]
               for _ in range(3)]
    assert [answer["isError"] for answer in answers] == [False, True, True]
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_int == 200


def test_a_guess_is_counted_before_its_key_is_compared_and_given_back_when_right(monkeypatch):
    gate = orchestrator._Gate(Config(rate_limit=1, api_key="s3cret"))
    compare = gate._check_api_key
    raced = []

    def compare_while_another_races():
        # The one slot is this request's while its key is compared: a racer gets none.
        with pytest.raises(RateLimited):
            gate.guesses.hit("unknown")
        raced.append(True)
        compare()

    monkeypatch.setattr(gate, "_check_api_key", compare_while_another_races)
    bottle.request.bind({"HTTP_AUTHORIZATION": "Bearer s3cret", "PATH_INFO": "/metrics"})
    gate._check_api_key_counting_guesses()
    assert raced and gate.guesses.hit("unknown") == 0  # the right key gave its slot back


def test_mcp_rate_limit_answers_tool_calls_as_tool_results(store):
    client = webtest.TestApp(create_app(Config(rate_limit=2), store))

    def call(method, params=None):
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        return client.post("/mcp", json.dumps(body).encode(), content_type="application/json",
                           headers={"MCP-Protocol-Version": "2025-11-25"}).json["result"]

    for _ in range(2):
        assert call("tools/call", {"name": "get_statistics"})["isError"] is False
    limited = call("tools/call", {"name": "get_statistics"})
    assert limited["isError"] is True
    assert limited["content"][0]["text"].startswith("RATE_LIMIT_EXCEEDED: ")
    assert len(call("tools/list")["tools"]) == len(TOOL_NAMES)  # listing touches no store


@pytest.mark.parametrize("content_type, status", [("text/plain", 415), ("application/json", 413)])
def test_mcp_applies_the_content_type_and_body_limit(store, content_type, status):
    client = webtest.TestApp(create_app(Config(rate_limit=0, max_body=50), store))
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "get_statistics", "arguments": {"padding": "x" * (40 if status == 415 else 99)}}})
    if status == 415:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    res = client.post("/mcp", body.encode(), content_type=content_type, status=status)
    assert res.json["jsonrpc"] == "2.0" and res.json["id"] is None


def test_tasks_cross_between_mcp_and_rest(client, call_tool, make_task, claim):
    over_mcp = call_tool("create_task", {"work_directory": "/x", "prompt": "from mcp"})
    assert claim(work_path="/x")["id"] == over_mcp["structuredContent"]["id"]
    over_rest = make_task(work_directory="/y")
    acquired = call_tool("acquire_task", {"work_path": "/y", "worker_id": "agent"})
    assert acquired["structuredContent"]["task"]["id"] == over_rest["id"]
    assert client.get(task_url(over_rest)).json["data"]["worker_id"] == "agent"


def run_relay(url, lines, *extra):
    """Feed lines to `orchestrator.py mcp-stdio`; return (exit status, stdout lines, stderr)."""
    result = subprocess.run([sys.executable, str(MODULE), "mcp-stdio", "--url", url, *extra],
                            input="".join(line + "\n" for line in lines), capture_output=True,
                            text=True, timeout=30)
    return result.returncode, result.stdout.splitlines(), result.stderr


def test_mcp_stdio_relays_both_eras_and_exits_when_stdin_closes(live_url, live_store):
    handshake = [
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"}}}),
        json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "create_task", "arguments": {"work_directory": "/s", "prompt": "p"}}}),
        json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "create_task", "arguments": {"work_directory": "s", "prompt": "p"}}}),
        json.dumps({"jsonrpc": "2.0", "id": 4, "method": "server/discover",
                    "params": {"_meta": META}}),
        json.dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
            "_meta": META, "name": "acquire_task", "arguments": {"work_path": "/s",
                                                                 "worker_id": "ü-worker"}}}),
    ]
    status, replies, _ = run_relay(live_url + "/mcp", handshake)
    assert status == 0
    replies = [json.loads(line) for line in replies]
    assert [reply["id"] for reply in replies] == [1, 2, 3, 4, 5]  # none for the notification
    assert replies[0]["result"]["protocolVersion"] == "2025-06-18"
    assert replies[1]["result"]["structuredContent"]["status"] == "waiting"
    assert replies[2]["error"]["code"] == -32602  # 2025-06-18 was negotiated and relayed
    assert replies[3]["result"]["supportedVersions"][0] == MODERN
    assert replies[4]["result"]["structuredContent"]["task"]["worker_id"] == "ü-worker"
    assert live_store.statistics()["working_tasks"] == 1


def test_ctrl_c_on_mcp_stdio_exits_130_without_a_traceback(live_url, spawn):
    relay = spawn([sys.executable, str(MODULE), "mcp-stdio", "--url", live_url],
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True)
    relay.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}) + "\n")
    relay.stdin.flush()
    assert json.loads(relay.stdout.readline())["id"] == 1  # so it reads stdin again now
    relay.send_signal(signal.SIGINT)
    _, err = relay.communicate(timeout=10)
    assert relay.returncode == 130 and "Traceback" not in err


def test_mcp_stdio_survives_text_that_cannot_be_a_header(live_url):
    modern = {"_meta": META}
    lines = [
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "x\ny", "params": modern}),
        json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/list",
                    "params": {"_meta": {**META, orchestrator._VERSION_KEY: "2026\u2028"}}}),
        json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": modern}),
    ]
    status, replies, stderr = run_relay(live_url + "/mcp", lines)
    assert status == 0 and "Traceback" not in stderr
    replies = [json.loads(line) for line in replies]
    assert [reply["id"] for reply in replies] == [1, 2, 3]
    assert "error" in replies[0] and "error" in replies[1]
    assert len(replies[2]["result"]["tools"]) == len(TOOL_NAMES)


def test_mcp_stdio_answers_every_request_even_when_the_server_is_down():
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{port.getsockname()[1]}/mcp"
    port.close()
    status, replies, stderr = run_relay(url, ['{"jsonrpc": "2.0", "id": 7, "method": "ping"}',
                                              "not json"])
    assert status == 0
    first, second = (json.loads(line) for line in replies)
    assert first["id"] == 7 and "cannot reach the orchestrator" in first["error"]["message"]
    assert second["error"]["code"] == -32700
    assert "cannot reach" in stderr


@pytest.mark.parametrize("suffix", ["", "/", "/mcp"])
def test_mcp_stdio_takes_the_base_url_like_work_does(live_url, suffix):
    ping = ['{"jsonrpc": "2.0", "id": 1, "method": "ping"}']
    status, replies, _ = run_relay(live_url + suffix, ping)
    assert status == 0 and json.loads(replies[0]) == {"jsonrpc": "2.0", "id": 1, "result": {}}


@pytest.mark.parametrize("suffix, posted_to", [
    ("/orch", "/orch/mcp"), ("/orch/", "/orch/mcp"), ("/orch/mcp", "/orch/mcp"),
    ("/orch/mcp/", "/orch/mcp"),
])
def test_mcp_stdio_adds_mcp_to_a_base_url_with_a_path(live_url, suffix, posted_to):
    _, replies, _ = run_relay(live_url + suffix, ['{"jsonrpc": "2.0", "id": 1, "method": "ping"}'])
    assert f"from {live_url}{posted_to}:" in json.loads(replies[0])["error"]["message"]


def test_mcp_stdio_turns_an_answer_that_is_not_json_rpc_into_an_error(live_url):
    status, replies, _ = run_relay(live_url + "/api/v1", ['{"jsonrpc": "2.0", "id": 3, '
                                                          '"method": "ping"}'])
    reply = json.loads(replies[0])
    assert status == 0 and reply["id"] == 3 and reply["jsonrpc"] == "2.0"
    assert reply["error"]["code"] == -32603 and "HTTP 404" in reply["error"]["message"]
    assert "success" not in reply


def test_mcp_stdio_shows_a_non_json_rpc_answer_as_text(live_url):
    _, replies, _ = run_relay(live_url + "/api/v1", ['{"jsonrpc": "2.0", "id": 3, '
                                                     '"method": "ping"}'])
    message = json.loads(replies[0])["error"]["message"]
    assert "b'" not in message and '"success": false' in message


def test_mcp_stdio_sends_the_token(store):
    config = Config(rate_limit=0, api_key="s3cret")
    with running_server(config, create_app(config, store)) as url:
        ping = ['{"jsonrpc": "2.0", "id": 1, "method": "ping"}']
        _, refused, _ = run_relay(url + "/mcp", ping)
        _, accepted, _ = run_relay(url + "/mcp", ping, "--token", "s3cret")
    assert json.loads(refused[0])["error"]["data"]["code"] == "UNAUTHORIZED"
    assert json.loads(refused[0])["id"] == 1
    assert json.loads(accepted[0])["result"] == {}


# ---------------------------------------------------------------------------
# The page at /: served (here), and driven in a real browser (at the end)
# ---------------------------------------------------------------------------

def test_the_page_is_one_html_document_that_needs_nothing_from_elsewhere(client):
    res = client.get("/")
    assert res.content_type == "text/html" and res.charset == "utf-8"
    html = res.text
    assert html.startswith("<!doctype html>") and "<script>" in html and "<style>" in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # no CDN, no external request
    assert "innerHTML" not in html and "outerHTML" not in html and "insertAdjacentHTML" not in html
    assert client.head("/").body == b""


def test_the_page_allows_only_its_own_script_and_style(client):
    res = client.get("/")
    policy = dict(part.strip().split(" ", 1) for part in
                  res.headers["Content-Security-Policy"].split(";"))
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        body = re.search(f"<{tag}>(.*?)</{tag}>", res.text, re.S).group(1)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert policy[directive] == f"'sha256-{digest}'"
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert res.headers["Referrer-Policy"] == "no-referrer"
    assert res.headers["X-Content-Type-Options"] == "nosniff"


def test_the_page_needs_no_key_but_obeys_the_host_rule(store):
    client = webtest.TestApp(create_app(Config(rate_limit=0, api_key="s3cret"), store))
    assert client.get("/").status_int == 200
    refused = client.get("/", headers={"Host": "evil.example"}, status=403)
    assert refused.json["error"]["code"] == "FORBIDDEN"


# ---------------------------------------------------------------------------
# The OpenAPI document
# ---------------------------------------------------------------------------

@pytest.fixture
def document(client):
    return client.get("/openapi.json").json


def operations(document):
    """(METHOD, path) of every documented operation."""
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}


@pytest.mark.parametrize("path", ["/", "/metrics", "/openapi.json", "/health"])
def test_a_get_with_a_body_too_large_answers_a_documented_status(client, document, path):
    client.get(path, headers={"Content-Length": "2000000"}, status=413)
    assert "413" in document["paths"][path]["get"]["responses"]


def test_every_parameter_says_what_it_is_for(document):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                assert parameter["description"], (method, path, parameter["name"])


def test_the_document_is_openapi_3_1_in_shape(document):
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "Simple Task Orchestrator"
    assert document["info"]["version"] == orchestrator.__version__
    assert "on disk" in document["info"]["description"]
    ids = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert method in {"get", "post", "patch", "delete"}
            assert operation["summary"] and "\n" not in operation["summary"]
            assert operation["responses"], (method, path)
            ids.append(operation["operationId"])
    assert len(ids) == len(set(ids))


def test_the_document_lists_every_route_the_app_has(app, document):
    rule = re.compile(r"<task_id:re:[^>]+>")
    routes = {(route.method, rule.sub("{task_id}", route.rule)) for route in app.routes}
    assert routes == operations(document)
    assert ("POST", "/mcp") in routes and ("GET", "/openapi.json") in routes


def test_every_ref_in_the_document_resolves(document):
    def refs(node):
        if isinstance(node, dict):
            yield from ([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)
    found = list(refs(document))
    assert len(found) > 20
    for ref in found:
        assert isinstance(resolve(document, ref), dict), ref


def test_parameters_and_bodies_say_what_validation_enforces(document):
    listing = {p["name"]: p for p in document["paths"]["/api/v1/tasks"]["get"]["parameters"]}
    assert listing["limit"]["schema"]["minimum"] == 1
    assert listing["limit"]["schema"]["maximum"] == 1000
    assert listing["offset"]["schema"]["minimum"] == 0
    assert re.fullmatch(listing["status"]["schema"]["pattern"], "waiting,failed")
    assert not re.search(listing["status"]["schema"]["pattern"], "waiting,done")
    assert "scan" in listing["q"]["schema"]["description"]
    assert re.fullmatch(listing["priority"]["schema"]["pattern"], "HiGh")
    claim_parameters = document["paths"]["/api/v1/tasks/next"]["get"]["parameters"]
    assert {p["name"]: p["required"] for p in claim_parameters} == {
        "work_path": True, "worker_id": True, "wait": False}
    wait = next(p for p in claim_parameters if p["name"] == "wait")["schema"]
    assert (wait["minimum"], wait["maximum"], wait["default"]) == (0, 20, 0)
    create = document["paths"]["/api/v1/tasks"]["post"]
    assert create["requestBody"]["required"] is True
    body = document["components"]["schemas"]["TaskCreate"]
    assert body == orchestrator.TASK_CREATE.json_schema()
    assert body["additionalProperties"] is False and body["required"] == ["work_directory",
                                                                           "prompt"]
    assert body["properties"]["tags"]["maxItems"] == 20
    assert body["properties"]["prompt"]["maxLength"] == 100_000
    assert document["components"]["schemas"]["TaskUpdate"]["minProperties"] == 1
    header = create["parameters"][0]
    assert (header["name"], header["in"], header["schema"]["maxLength"]) == (
        "Idempotency-Key", "header", 200)
    assert document["paths"]["/api/v1/tasks/{task_id}/cancel"]["post"]["requestBody"][
        "required"] is False


def test_the_document_shows_the_lease_token_in_the_claim_and_the_reports(document):
    schemas = document["components"]["schemas"]
    claimed = schemas["ClaimedTask"]
    assert "lease_token" in claimed["required"] and "lease_token" not in schemas["Task"][
        "properties"]
    answer = document["paths"]["/api/v1/tasks/next"]["get"]["responses"]["200"]
    assert "ClaimedTask" in json.dumps(answer)
    for body in ("TaskComplete", "TaskFail", "TaskHeartbeat", "TaskRelease"):
        assert "lease_token" in schemas[body]["properties"]
    for body in ("TaskHeartbeat", "TaskRelease"):
        assert schemas[body]["anyOf"] == [{"required": ["lease_token"]},
                                          {"required": ["worker_id"]}]


@pytest.mark.parametrize("method, path, present, absent", [
    ("post", "/api/v1/tasks", {"201", "200", "400", "401", "403", "409", "413", "415", "429",
                               "500"}, {"404"}),
    ("get", "/api/v1/tasks/{task_id}", {"404", "401", "429"}, {"409", "415"}),
    ("post", "/api/v1/tasks/{task_id}/complete", {"404", "409", "415"}, set()),
    ("get", "/health", {"200", "403", "500"}, {"401", "429"}),  # 403: the Host rule
    ("get", "/openapi.json", {"200", "403"}, {"401", "429"}),
    ("post", "/mcp", {"200", "202", "400", "401", "403", "405", "413", "415", "429"}, set()),
])
def test_each_operation_documents_the_statuses_it_can_answer(document, method, path, present,
                                                             absent):
    statuses = set(document["paths"][path][method]["responses"])
    assert present <= statuses and not absent & statuses


def test_the_bearer_scheme_covers_the_api_mcp_and_metrics_only(document):
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "only when" in scheme["description"]
    for method, path in operations(document):
        secured = "security" in document["paths"][path][method.lower()]
        assert secured == (path.startswith("/api/") or path in ("/mcp", "/metrics")), path


@pytest.mark.parametrize("path", ["/openapi.json", "/health"])
def test_the_document_and_health_are_public_to_any_origin(store, path):
    client = webtest.TestApp(create_app(Config(rate_limit=1, api_key="s3cret"), store))
    for _ in range(3):
        res = client.get(path, headers={"Origin": "https://swagger.example"}, status=200)
        assert res.headers["Access-Control-Allow-Origin"] == "*"


def conforms(document, res, method, template):
    """Assert that a real response is one the document declares."""
    operation = document["paths"][template][method.lower()]
    declared = operation["responses"].get(str(res.status_int))
    assert declared, f"{method} {template} answered an undocumented {res.status_int}"
    for name, header in declared.get("headers", {}).items():
        assert not header.get("required") or name in res.headers, (template, name)
    if "content" not in declared:
        assert res.body == b""
        return
    assert res.content_type in declared["content"], (template, res.content_type)
    schema = declared["content"][res.content_type]["schema"]
    assert schema_errors(schema, res.json, root=document) == [], (method, template, res.json)


def test_real_responses_conform_to_the_document(store, clock):
    config = Config(rate_limit=40, api_key="k", max_body=5000)
    client = webtest.TestApp(create_app(config, store))
    document = client.get("/openapi.json").json
    auth = {"Authorization": "Bearer k"}

    def send(method, url, template, body=None, headers=None, **kwargs):
        kwargs.setdefault("content_type", "application/json")
        res = client.request(url, method=method, expect_errors=True,
                             headers={**auth, **(headers or {})},
                             body=json.dumps(body).encode() if body is not None else b"",
                             **kwargs)
        conforms(document, res, method, template)
        return res

    new = {"work_directory": "/r", "prompt": "p", "tags": ["a"], "metadata": {"k": [1]}}
    task = send("POST", "/api/v1/tasks", "/api/v1/tasks", new,
                headers={"Idempotency-Key": "k1"}).json["data"]
    assert send("POST", "/api/v1/tasks", "/api/v1/tasks", new,
                headers={"Idempotency-Key": "k1"}).status_int == 200
    one = "/api/v1/tasks/{task_id}"
    steps = [
        ("GET", f"/api/v1/tasks/{task['id']}", one, None),
        ("PATCH", f"/api/v1/tasks/{task['id']}", one, {"priority": "HIGH"}),
        ("GET", "/api/v1/tasks/next?work_path=/r&worker_id=w", "/api/v1/tasks/next", None),
        ("GET", "/api/v1/tasks/next?work_path=/r&worker_id=w", "/api/v1/tasks/next", None),
        ("POST", f"/api/v1/tasks/{task['id']}/heartbeat", one + "/heartbeat",
         {"worker_id": "w"}),
        ("POST", f"/api/v1/tasks/{task['id']}/complete", one + "/complete",
         {"result": {"status": "success", "output": "ok", "duration_ms": 3}}),
        ("POST", f"/api/v1/tasks/{task['id']}/complete", one + "/complete", {}),  # 409
        ("POST", f"/api/v1/tasks/{task['id']}/retry", one + "/retry", None),  # 409
        ("GET", "/api/v1/tasks?status=completed&limit=5", "/api/v1/tasks", None),
        ("GET", "/api/v1/tasks?limit=0", "/api/v1/tasks", None),  # 400
        ("GET", "/api/v1/statistics", "/api/v1/statistics", None),
        ("GET", "/health", "/health", None),
        ("GET", "/api/v1/tasks/nope", one, None),  # 404
        ("PUT", "/api/v1/tasks", "/api/v1/tasks", None),  # 405
        ("POST", "/api/v1/tasks", "/api/v1/tasks", {"prompt": 1}),  # 400
        ("POST", f"/api/v1/tasks/{task['id']}/cancel", one + "/cancel", {"reason": "done"}),
        ("DELETE", f"/api/v1/tasks/{task['id']}", one, None),
    ]
    for method, url, template, body in steps:
        if method == "PUT":
            res = client.request(url, method="PUT", expect_errors=True, headers=auth)
            assert res.status_int == 405
            conforms(document, res, "POST", template)  # documented on the path's operations
            continue
        send(method, url, template, body)
    send("POST", "/api/v1/tasks", "/api/v1/tasks", new, content_type="text/plain")  # 415
    send("POST", "/api/v1/tasks", "/api/v1/tasks", {**new, "prompt": "p" * 6000})  # 413
    send("GET", "/api/v1/statistics", "/api/v1/statistics", headers={"Authorization": ""})  # 401
    send("GET", "/api/v1/statistics", "/api/v1/statistics",
         headers={"Origin": "http://evil.example"})  # 403
    for _ in range(40):
        last = send("GET", "/api/v1/statistics", "/api/v1/statistics")
    assert last.status_int == 429
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
           "params": {"name": "get_statistics", "arguments": {}}}
    send("POST", "/mcp", "/mcp", rpc)
    send("POST", "/mcp", "/mcp", {"jsonrpc": "2.0", "method": "notifications/initialized"})
    send("POST", "/mcp", "/mcp", [rpc])  # 400
    conforms(document, client.get("/openapi.json"), "GET", "/openapi.json")


# ---------------------------------------------------------------------------
# Long-poll claims
# ---------------------------------------------------------------------------

class Background(threading.Thread):
    """Run a call in a thread; .result once joined, and how long it took."""

    def __init__(self, call, *args):
        super().__init__(daemon=True)
        self.call = call
        self.args = args
        self.result = None
        self.error = None

    def run(self):
        started = time.monotonic()
        try:
            self.result = self.call(*self.args)
        except Exception as error:  # reported by the test
            self.error = error
        self.seconds = time.monotonic() - started

    def finish(self, timeout=10):
        self.join(timeout)
        assert not self.is_alive() and self.error is None, self.error
        return self.result


def wait_until(condition, timeout=10):
    """Poll a condition in a test (never in the server) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.load(answer)


def test_a_waiting_claim_is_woken_by_a_create(client, store):
    waiter = Background(client.get, "/api/v1/tasks/next?work_path=/r&worker_id=w&wait=10")
    waiter.start()
    wait_until(lambda: store.waiting_requests == 1)
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    claimed = waiter.finish().json["data"]
    assert claimed["id"] == task.id and claimed["worker_id"] == "w"
    assert waiter.seconds < 5


def test_a_task_found_for_a_claimant_that_hung_up_goes_straight_back(live_url, live_store):
    port = int(live_url.rsplit(":", 1)[1])
    hung_up = socket.create_connection(("127.0.0.1", port))
    hung_up.sendall(b"GET /api/v1/tasks/next?work_path=/gone&worker_id=w&wait=20 HTTP/1.1\r\n"
                    b"Host: 127.0.0.1\r\n\r\n")
    wait_until(lambda: live_store.waiting_requests == 1)
    hung_up.close()  # as a worker stopped by Ctrl-C in the middle of its claim
    get_json(live_url + "/health")  # a round trip after the close: the server has seen it
    task, _ = live_store.create({"work_directory": "/gone", "prompt": "p"})
    wait_until(lambda: live_store.waiting_requests == 0
               and live_store.get(task.id).status == "waiting")
    back = live_store.get(task.id)
    assert (back.worker_id, back.retry_count) == (None, 0)
    assert live_store.claim("/gone", "next").id == task.id  # first in line


def test_a_read_with_wait_answers_when_the_task_finishes(client, store):
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    store.claim("/r", "w")
    reader = Background(client.get, f"/api/v1/tasks/{task.id}?wait=10")
    reader.start()
    wait_until(lambda: store.waiting_requests == 1)
    store.complete(task.id, {"worker_id": "w", "result": {"output": "done"}})
    answer = reader.finish().json["data"]
    assert answer["status"] == "completed" and answer["result"]["output"] == "done"
    assert reader.seconds < 5


def test_a_read_with_wait_answers_the_task_as_it_is_when_the_time_is_up(client, store):
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    started = time.monotonic()
    answer = client.get(f"/api/v1/tasks/{task.id}", {"wait": 1}).json["data"]
    assert answer["status"] == "waiting" and time.monotonic() - started >= 0.9


def test_a_read_of_a_finished_task_never_waits(client, store):
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    store.cancel(task.id)
    started = time.monotonic()
    assert client.get(f"/api/v1/tasks/{task.id}", {"wait": 20}).json["data"][
        "status"] == "cancelled"
    assert time.monotonic() - started < 5


def test_reads_and_claims_share_the_cap_on_waiting_requests(clock):
    store = TaskStore(max_waiters=1, clock=clock)
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    claim = Background(store.claim, "/elsewhere", "w", 10)
    claim.start()
    wait_until(lambda: store.waiting_requests == 1)
    started = time.monotonic()
    assert store.get(task.id, wait=10).status == "waiting"  # at once: the slot is taken
    assert time.monotonic() - started < 5
    store.stop_waiting()  # shutdown releases the waiting claim
    assert claim.finish() is None


def test_a_task_deleted_while_read_with_wait_is_a_404(client, store):
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    reader = Background(lambda: client.get(f"/api/v1/tasks/{task.id}?wait=10", status=404))
    reader.start()
    wait_until(lambda: store.waiting_requests == 1)
    store.delete(task.id)
    assert reader.finish().json["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize("wait", ["21", "-1", "x"])
def test_a_read_with_a_bad_wait_is_a_400_naming_it(client, store, wait):
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    res = client.get(f"/api/v1/tasks/{task.id}", {"wait": wait}, status=400)
    assert res.json["error"]["details"]["field"] == "wait"


def test_a_wait_that_times_out_answers_null_even_if_another_directory_got_work(client, store):
    waiter = Background(client.get, "/api/v1/tasks/next?work_path=/mine&worker_id=w&wait=1")
    waiter.start()
    wait_until(lambda: store.waiting_requests == 1)
    store.create({"work_directory": "/other", "prompt": "p"})
    res = waiter.finish()
    assert res.json["data"] is None and res.json["success"] is True
    assert 0.9 < waiter.seconds < 5


def test_a_lease_expiring_during_the_wait_wakes_the_waiter():
    store = TaskStore(task_timeout=0.3)  # the real clock: a lease of 0.3 s
    client = webtest.TestApp(create_app(Config(rate_limit=0), store))
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    store.claim("/r", "slow")
    waiter = Background(client.get, "/api/v1/tasks/next?work_path=/r&worker_id=fast&wait=10")
    waiter.start()
    claimed = waiter.finish().json["data"]
    assert claimed["id"] == task.id and claimed["worker_id"] == "fast"
    assert claimed["retry_count"] == 1 and waiter.seconds < 3


@pytest.mark.parametrize("wait", ["21", "-1", "1.5", "soon"])
def test_wait_outside_0_to_20_seconds_is_a_400(client, wait):
    res = client.get(f"/api/v1/tasks/next?work_path=/r&worker_id=w&wait={wait}", status=400)
    assert res.json["error"]["details"]["field"] == "wait"


def test_waiters_beyond_the_cap_answer_at_once_and_health_stays_served():
    config = Config(rate_limit=0, threads=4)  # two may wait, two threads stay free
    store = TaskStore(max_waiters=2)
    with running_server(config, create_app(config, store)) as url:
        claim = f"{url}/api/v1/tasks/next?work_path=/r&worker_id=w&wait=10"
        waiters = [Background(get_json, claim) for _ in range(2)]
        for waiter in waiters:
            waiter.start()
        wait_until(lambda: store.waiting_requests == 2)
        started = time.monotonic()
        assert get_json(claim)["data"] is None  # over the cap: answered at once
        assert get_json(url + "/health")["data"]["status"] == "healthy"
        assert time.monotonic() - started < 2
        for _ in range(2):
            store.create({"work_directory": "/r", "prompt": "p"})
        assert all(waiter.finish()["data"] is not None for waiter in waiters)


def test_shutdown_releases_waiting_requests():
    config = Config(rate_limit=0)
    store = TaskStore()
    with running_server(config, create_app(config, store)) as url:
        waiter = Background(get_json, f"{url}/api/v1/tasks/next?work_path=/r&worker_id=w&wait=20")
        waiter.start()
        wait_until(lambda: store.waiting_requests == 1)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 3
    assert waiter.finish()["data"] is None
    assert store.claim("/r", "w", wait=5) is None  # after shutdown, nothing waits


def test_create_app_leaves_two_threads_free_of_long_polls():
    for threads, waiters in [(8, 6), (3, 1), (2, 0), (1, 0)]:
        app = create_app(Config(threads=threads))
        plugin = next(p for p in app.plugins if isinstance(p, orchestrator._WakeWaitersOnClose))
        assert plugin.store.max_waiters == waiters


def test_mcp_acquire_task_waits_too(call_tool, store):
    waiter = Background(call_tool, "acquire_task", {"work_path": "/r", "worker_id": "w",
                                                    "wait": 10})
    waiter.start()
    wait_until(lambda: store.waiting_requests == 1)
    task, _ = store.create({"work_directory": "/r", "prompt": "p"})
    assert waiter.finish()["structuredContent"]["task"]["id"] == task.id


# ---------------------------------------------------------------------------
# The client commands: add, ls, show, cancel, retry, rm, stats, dirs, workers
# ---------------------------------------------------------------------------

@pytest.fixture
def cli(live_url, tmp_path):
    """Run `orchestrator.py COMMAND ...` against the live server, in tmp_path:
    (exit status, stdout, stderr)."""
    def cli(*args, stdin="", env=None):
        result = subprocess.run([sys.executable, str(MODULE), *args], input=stdin, cwd=tmp_path,
                                capture_output=True, text=True, timeout=30,
                                env={**os.environ, "ORCHESTRATOR_URL": live_url,
                                     "COLUMNS": "80", **(env or {})})
        return result.returncode, result.stdout, result.stderr
    return cli


@pytest.mark.parametrize("flags, env, named", [
    (["--token", "密钥"], {}, "--token"),
    (["--token", "abc "], {}, "--token"),
    ([], {"APP_SECURITY_API_KEY": "密钥"}, "APP_SECURITY_API_KEY"),
])
def test_a_key_no_header_can_carry_is_a_usage_error_naming_it(cli, flags, env, named):
    status, _, err = cli("stats", *flags, env=env)
    assert status == 2 and named in err and "printable ASCII" in err
    assert "Traceback" not in err


def test_a_key_with_spaces_inside_authorizes_requests(store):
    key = "correct horse battery staple"
    config = Config.from_env({"APP_SECURITY_API_KEY": key, "APP_SECURITY_RATE_LIMIT": "0"})
    client = webtest.TestApp(create_app(config, store))
    client.get("/api/v1/statistics", headers={"Authorization": f"Bearer {key}"}, status=200)


def test_add_takes_the_prompt_from_arguments_and_the_directory_from_here(cli, live_store,
                                                                       tmp_path):
    status, out, _ = cli("add", "fix", "the", "bug", "--priority", "high", "--tag", "cli",
                         "--tag", "urgent", "--max-retries", "0", "--delay", "60")
    assert status == 0
    task = live_store.get(out.strip())
    assert (task.prompt, task.work_directory, task.priority, task.tags, task.max_retries) == (
        "fix the bug", str(tmp_path), "high", ["cli", "urgent"], 0)
    assert 50 < task.not_before - time.time() <= 60


def test_add_reads_a_prompt_with_any_quoting_from_standard_input(cli, live_store):
    prompt = 'Line one with "quotes" and $HOME\n\nand `backticks` \\ too\n'
    status, out, _ = cli("add", "--dir", "/elsewhere/..//project", stdin=prompt)
    task = live_store.get(out.strip())
    assert status == 0 and task.prompt == prompt and task.work_directory == "/project"


def test_add_after_makes_a_task_wait_for_others(cli, live_store):
    first = cli("add", "one")[1].strip()
    second = cli("add", "two", "--after", first)[1].strip()
    assert live_store.get(second).blocked_by == [first]


def test_add_with_a_key_queues_once(cli, live_store):
    first = cli("add", "p", "--key", "build-42")[1]
    again = cli("add", "p", "--key", "build-42")[1]
    assert first == again and len(live_store) == 1


def test_ls_is_a_table_that_fits_the_terminal_and_filters(cli, live_store):
    long_prompt = "Refactor the parser " * 20
    parser, _ = live_store.create({"work_directory": "/a", "prompt": long_prompt})
    docs, _ = live_store.create({"work_directory": "/b", "prompt": "Write docs"})
    live_store.cancel(docs.id)
    status, out, _ = cli("ls")
    lines = out.splitlines()
    headers = lines[0].split()
    assert status == 0 and headers[:4] == ["ID", "STATUS", "PRIO", "AGE"]
    assert headers[-1] == "PROMPT"
    assert len(lines) == 3 and all(len(line) <= 80 for line in lines)
    assert lines[1].startswith(docs.id) and "…" in lines[2]
    assert cli("ls", "--status", "waiting")[1].count("\n") == 2
    assert parser.id in cli("ls", "--search", "PARSER")[1]
    assert docs.id not in cli("ls", "--search", "PARSER")[1]
    page = json.loads(cli("ls", "--dir", "/b", "--json")[1])
    assert [task["id"] for task in page["tasks"]] == [docs.id]


def test_show_prints_every_field_and_the_prompt(cli, live_store):
    task, _ = live_store.create({"work_directory": "/a", "prompt": "line one\nline two"})
    status, out, _ = cli("show", task.id)
    assert status == 0 and f"id:               {task.id}" in out
    assert "prompt:\n  line one\n  line two" in out


def test_show_prints_dependencies_metadata_and_every_timestamp_as_plain_text(cli, live_store):
    first, _ = live_store.create({"work_directory": "/a", "prompt": "one"})
    task, _ = live_store.create({"work_directory": "/a", "prompt": "two", "tags": ["cli", "x"],
                                 "metadata": {"ticket": 7}, "depends_on": [first.id],
                                 "delay_seconds": 60})
    status, out, _ = cli("show", task.id)
    fields = dict(line.split(":", 1) for line in out.split("\n\n")[0].splitlines())
    shown = {name: value.strip() for name, value in fields.items()}
    assert status == 0 and shown["tags"] == "cli, x" and shown["metadata"] == '{"ticket": 7}'
    assert shown["depends_on"] == shown["blocked_by"] == first.id
    assert shown["started_at"] == "-" and shown["result"] == "-"
    for name in ("updated_at", "not_before", "created_at"):
        assert shown[name].endswith("Z")
    answer = live_store.get(task.id).to_dict()
    assert set(answer) - {"prompt", "progress", "error_message"} == set(shown)


def test_stats_prints_a_missing_number_as_a_dash(cli, live_store):
    assert "average_duration_ms:     -" in cli("stats")[1]


def test_ls_into_a_pipe_keeps_whole_prompts_unless_columns_are_set(cli, live_store):
    long_prompt = "Refactor the parser " * 10
    live_store.create({"work_directory": "/a", "prompt": long_prompt})
    assert long_prompt.strip() in cli("ls", env={"COLUMNS": ""})[1]
    assert long_prompt.strip() not in cli("ls", env={"COLUMNS": "100"})[1]


def test_cancel_retry_and_rm_act_on_each_id_and_fail_for_a_refused_one(cli, live_store):
    first, _ = live_store.create({"work_directory": "/a", "prompt": "one"})
    second, _ = live_store.create({"work_directory": "/a", "prompt": "two"})
    status, out, _ = cli("cancel", first.id, second.id)
    assert status == 0 and out.splitlines() == [f"{first.id}: cancelled", f"{second.id}: cancelled"]
    assert cli("retry", first.id)[1].strip() == f"{first.id}: waiting"
    status, out, err = cli("retry", first.id, second.id)  # the first is waiting: refused
    assert status == 1 and f"task {first.id} is waiting" in err
    assert live_store.get(second.id).status == "waiting"  # the other one was still done
    assert cli("rm", first.id, second.id)[0] == 0 and len(live_store) == 0


def test_retry_failed_retries_every_failed_task_of_a_directory(cli, live_store, tmp_path):
    for directory in (str(tmp_path), "/other"):
        task, _ = live_store.create({"work_directory": directory, "prompt": "p",
                                     "max_retries": 0})
        live_store.claim(directory, "w")
        live_store.fail(task.id, {"error": "x"})
    status, out, _ = cli("retry", "--failed", "--dir", ".")
    assert status == 0 and out.strip() == "retried 1"
    assert live_store.statistics()["failed_tasks"] == 1  # /other's is left alone


def test_stats_dirs_and_workers_print_tables_or_json(cli, live_store):
    live_store.create({"work_directory": "/a", "prompt": "p"})
    live_store.claim("/a", "agent-1")
    assert "working_tasks:           1" in cli("stats")[1]
    assert cli("dirs")[1].splitlines()[1].split() == ["/a", "0", "1", "0", "-", "agent-1"]
    assert cli("workers")[1].splitlines()[1].split()[0] == "agent-1"
    assert json.loads(cli("dirs", "--json")[1])["directories"][0]["work_directory"] == "/a"


def test_wait_exits_0_when_the_task_completed_and_1_otherwise(cli, live_store):
    done, _ = live_store.create({"work_directory": "/a", "prompt": "one"})
    live_store.claim("/a", "w")
    live_store.complete(done.id, {"worker_id": "w"})
    failed, _ = live_store.create({"work_directory": "/a", "prompt": "two"})
    live_store.cancel(failed.id, {"reason": "not needed"})
    assert cli("wait", done.id) == (0, f"{done.id}: completed\n", "")
    status, _, err = cli("wait", failed.id)
    assert status == 1 and "cancelled" in err and "not needed" in err
    pending, _ = live_store.create({"work_directory": "/a", "prompt": "three"})
    status, _, err = cli("wait", pending.id, "--timeout", "1")
    assert status == 1 and "not finished after 1 s" in err


def test_a_mistyped_command_is_named_with_the_commands_there_are(capsys):
    assert orchestrator.main(["lss"]) == 2
    err = capsys.readouterr().err
    assert "unknown command lss; the commands are add, ls," in err and "(none: serve)" in err


def test_wait_on_a_task_cancelled_without_a_reason_says_just_that(cli, live_store):
    task, _ = live_store.create({"work_directory": "/a", "prompt": "p"})
    live_store.cancel(task.id)
    assert cli("wait", task.id) == (1, "", f"orchestrator.py wait: {task.id}: cancelled\n")


HOSTILE = "hello \x1b]0;PWNED\x07\x1b[2J\x9b31m\rred"


@pytest.mark.parametrize("args", [["show", "{id}"], ["ls"], ["show", "--json", "{id}"],
                                  ["wait", "{id}"]])
def test_task_text_cannot_drive_the_terminal_of_whoever_reads_it(cli, live_store, args):
    task, _ = live_store.create({"work_directory": "/a", "prompt": HOSTILE + "\nsecond line",
                                 "tags": ["t\x1bx"]})
    live_store.cancel(task.id, {"reason": HOSTILE})
    _, out, err = cli(*(arg.format(id=task.id) for arg in args), env={"COLUMNS": "200"})
    printed = out + err
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", printed), repr(printed)
    assert "\\u001b]0;PWNED" in printed  # shown, as an escape
    if args == ["show", "{id}"]:
        assert "\n  second line\n" in out  # while a line break still breaks the line


def test_add_here_keeps_the_directory_as_the_shell_shows_it(cli, live_store, tmp_path):
    # Through a symbolic link, `pwd` and a worker's --work-path $PWD say the link.
    link = tmp_path.parent / f"{tmp_path.name}-link"
    link.symlink_to(tmp_path)
    status, out, _ = cli("add", "p", env={"PWD": str(link)})
    assert status == 0 and live_store.get(out.strip()).work_directory == str(link)
    status, out, _ = cli("add", "p", env={"PWD": "/"})  # not where it runs: not believed
    assert status == 0 and live_store.get(out.strip()).work_directory == str(tmp_path)


def test_ctrl_c_on_wait_exits_130_without_a_traceback(live_url, live_store, spawn):
    task, _ = live_store.create({"work_directory": "/a", "prompt": "p"})
    waiting = spawn([sys.executable, str(MODULE), "wait", task.id, "--url", live_url],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: live_store.waiting_requests == 1)
    waiting.send_signal(signal.SIGINT)
    _, err = waiting.communicate(timeout=10)
    assert waiting.returncode == 130 and "Traceback" not in err


@pytest.mark.parametrize("args, status, says", [
    (["show", "0b7c1d2e-0000-4000-8000-000000000000"], 1, "not found"),
    (["show", "nonsense"], 2, "must be a task id"),
    (["rm", "0b7c"], 2, "must be a task id"),
    (["retry"], 2, "give task ids, or --failed"),
    (["add"], 2, "give the prompt"),
    (["ls", "--limit", "0"], 2, "--limit"),
    (["ls", "--url", "http://127.0.0.1:9"], 2, "cannot reach the orchestrator"),
])
def test_client_commands_fail_with_a_clear_line(cli, args, status, says):
    code, _, err = cli(*args, stdin=None if args == ["add"] else "")
    assert code == status and says in err and "Traceback" not in err


# ---------------------------------------------------------------------------
# The worker command
# ---------------------------------------------------------------------------

AGENT = """
import os, sys, time
prompt = sys.stdin.read()
print("cwd", os.getcwd())
print("env", os.environ["ORCHESTRATOR_TASK_ID"], os.environ["ORCHESTRATOR_URL"])
print("prompt", prompt.upper())
time.sleep(float(os.environ.get("AGENT_SLEEP", "0")))
sys.stderr.write("agent says " + os.environ.get("AGENT_SAYS", "nothing"))
sys.exit(int(os.environ.get("AGENT_EXIT", "0")))
"""


@pytest.fixture
def worker_server():
    """A live server over a real-clock store with 2 s leases: (url, store).

    Short enough to keep tests quick, long enough that a loaded machine's stall
    of half a second between two heartbeats (every 2/3 s) loses no lease.
    """
    store = TaskStore(max_retries=1, task_timeout=2)
    config = Config(rate_limit=0)
    with running_server(config, create_app(config, store)) as url:
        yield url, store


@pytest.fixture
def spawn():
    """Start processes that are stopped when the test ends, even when it fails."""
    started = []

    def spawn(command, **options):
        started.append(subprocess.Popen(command, **options))
        return started[-1]
    yield spawn
    for process in started:
        if process.poll() is None:
            for _ in range(2):  # a worker's "stop now": it stops its agent and hands back
                process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def worker_command(url, work_path, *args, agent=("-c", AGENT)):
    return [sys.executable, str(MODULE), "work", "--url", url, "--work-path", str(work_path),
            "--wait", "0", *args, "--", sys.executable, *agent]


def read_until(process, text, timeout=20):
    """Read the process's stderr until a line contains the text; that line. Fails if the
    stream ends first, or the process says nothing of it in time (it is killed then)."""
    deadline = threading.Timer(timeout, process.kill)
    deadline.start()
    try:
        while True:
            line = process.stderr.readline()
            assert line, f"the stream ended before {text!r}"
            if text in line:
                return line
    finally:
        deadline.cancel()


def run_worker(url, work_path, *args, env=None, agent=("-c", AGENT)):
    result = subprocess.run(worker_command(url, work_path, "--once", *args, agent=agent),
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, **(env or {})})
    return result.returncode, result.stderr


def test_worker_completes_a_task_with_the_commands_output(worker_server, tmp_path):
    url, store = worker_server
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "fix it"})
    status, stderr = run_worker(url, tmp_path)
    assert status == 0, stderr
    done = store.get(task.id)
    assert done.status == "completed"
    host, _, pid = done.worker_id.rpartition("-")
    assert host == socket.gethostname() and pid.isdigit()  # the default HOST-PID
    output = done.result["output"].splitlines()
    assert output[:3] == [f"cwd {tmp_path}", f"env {task.id} {url}", "prompt FIX IT"]
    assert done.result["status"] == "success" and isinstance(done.result["duration_ms"], int)
    assert f"task {task.id}: exit status 0, completed (ran" in stderr


def test_worker_failures_are_requeued_then_failed_at_the_limit(worker_server, tmp_path):
    url, store = worker_server
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    env = {"AGENT_EXIT": "3", "AGENT_SAYS": "boom"}
    assert run_worker(url, tmp_path, env=env)[0] == 0
    again = store.get(task.id)
    assert again.status == "waiting" and again.retry_count == 1
    assert again.error_message == "exit status 3: agent says boom"
    assert run_worker(url, tmp_path, env=env)[0] == 0
    assert store.get(task.id).status == "failed"


def test_worker_puts_the_prompt_in_place_of_the_placeholder(worker_server, tmp_path):
    url, store = worker_server
    prompt = 'say "hi"; rm -rf / $(whoami) {prompt}'
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": prompt})
    echo = ("-c", "import sys; print(sys.argv[1], end='')", "{prompt}")
    assert run_worker(url, tmp_path, agent=echo)[0] == 0
    assert store.get(task.id).result["output"] == prompt  # data, never a shell command


def test_worker_keeps_a_long_task_through_heartbeats(worker_server, tmp_path):
    url, store = worker_server  # leases of 2 s, renewed every 2/3 s
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    assert run_worker(url, tmp_path, env={"AGENT_SLEEP": "2.5"})[0] == 0
    done = store.get(task.id)
    assert (done.status, done.retry_count) == ("completed", 0)
    assert store.statistics()["expired_leases_total"] == 0


def test_worker_stops_the_command_when_the_lease_is_lost(worker_server, tmp_path, spawn):
    url, store = worker_server
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    worker = spawn(worker_command(url, tmp_path, "--once"), text=True,
                   env={**os.environ, "AGENT_SLEEP": "30"}, stderr=subprocess.PIPE)
    wait_until(lambda: store.get(task.id).status == "working")
    store.delete(task.id)  # its next heartbeat is refused
    assert worker.wait(timeout=10) == 0
    assert "the task was deleted: command stopped, not reported" in worker.stderr.read()


def test_worker_once_on_an_empty_queue_exits_0(worker_server, tmp_path):
    url, store = worker_server
    assert run_worker(url, tmp_path)[0] == 0
    assert store.statistics()["total_tasks"] == 0


def test_worker_with_a_missing_command_exits_2_without_claiming(worker_server, tmp_path):
    url, store = worker_server
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    command = [sys.executable, str(MODULE), "work", "--url", url, "--work-path", str(tmp_path),
               "--wait", "0", "--", str(tmp_path / "no-such-agent")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "no task was claimed" in result.stderr
    assert store.get(task.id).status == "waiting"


def test_worker_that_cannot_start_its_command_releases_the_task_and_exits_2(worker_server,
                                                                            tmp_path, spawn):
    url, store = worker_server
    doomed = tmp_path / "doomed"
    doomed.mkdir()
    worker = spawn(worker_command(url, doomed, "--once", "--wait", "20"), text=True,
                   stderr=subprocess.PIPE)
    wait_until(lambda: store.waiting_requests == 1)
    doomed.rmdir()  # the directory goes away under the worker: the worker is at fault
    task, _ = store.create({"work_directory": str(doomed), "prompt": "p"})
    assert worker.wait(timeout=10) == 2 and "cannot start" in worker.stderr.read()
    again = store.get(task.id)
    assert (again.status, again.retry_count) == ("waiting", 0)


def test_worker_stops_after_max_failures_in_a_row(worker_server, tmp_path):
    url, store = worker_server
    tasks = [store.create({"work_directory": str(tmp_path), "prompt": f"p{n}",
                           "max_retries": 0})[0] for n in range(4)]
    result = subprocess.run(worker_command(url, tmp_path, "--max-failures", "2"), text=True,
                            capture_output=True, timeout=30,
                            env={**os.environ, "AGENT_EXIT": "1"})
    assert result.returncode == 3 and "2 tasks failed in a row" in result.stderr
    statuses = [store.get(task.id).status for task in tasks]
    assert statuses.count("failed") == 2 and statuses.count("waiting") == 2


def test_worker_fails_a_nul_prompt_for_good_and_goes_on(worker_server, tmp_path):
    url, store = worker_server
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "a\u0000b"})
    echo = ("-c", "import sys; print(sys.argv[1])", "{prompt}")
    status, stderr = run_worker(url, tmp_path, agent=echo)
    assert status == 0 and "Traceback" not in stderr
    failed = store.get(task.id)
    assert failed.status == "failed" and "NUL" in failed.error_message


def test_worker_reports_output_that_is_not_utf8(worker_server, tmp_path):
    url, store = worker_server
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    agent = ("-c", "import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe end')")
    assert run_worker(url, tmp_path, "--quiet", agent=agent)[0] == 0
    assert store.get(task.id).result["output"] == "ok \ufffd\ufffd end"


def test_worker_cancel_stops_the_agent_within_seconds(worker_server, tmp_path, spawn):
    url, store = worker_server  # 2 s leases: a heartbeat every 2/3 s
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    worker = spawn(worker_command(url, tmp_path, "--once", "--grace", "1"), text=True,
                   env={**os.environ, "AGENT_SLEEP": "30"}, stderr=subprocess.PIPE)
    wait_until(lambda: store.get(task.id).status == "working")
    cancelled = time.monotonic()
    store.cancel(task.id)
    assert worker.wait(timeout=10) == 0
    assert time.monotonic() - cancelled < 8
    assert "the task was cancelled" in worker.stderr.read()


def running(pid):
    """Whether a process runs (a zombie no one has reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


#: A helper an agent leaves running: it says its pid in the file `helper` once ready,
#: and ignores SIGTERM when HELPER_IGNORES_TERM is set.
HELPER = """
import os, signal, time
if os.environ.get("HELPER_IGNORES_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open("helper.tmp", "w").write(str(os.getpid()))
os.rename("helper.tmp", "helper")
time.sleep(60)
"""
#: An agent that starts HELPER in its process group, with the agent's own output.
AGENT_WITH_HELPER = f"""
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {HELPER!r}])
while not os.path.exists("helper"):
    time.sleep(0.02)
print("agent done", flush=True)
time.sleep(float(os.environ.get("AGENT_SLEEP", "0")))
"""


def test_worker_reports_an_agent_that_exits_leaving_a_helper_on_its_output(worker_server,
                                                                           tmp_path):
    url, store = worker_server
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    status, stderr = run_worker(url, tmp_path, "--grace", "1", agent=("-c", AGENT_WITH_HELPER))
    assert status == 0, stderr
    done = store.get(task.id)
    assert done.status == "completed" and done.result["output"] == "agent done\n"
    assert not running(int((tmp_path / "helper").read_text()))  # stopped with its agent


def test_worker_cancel_kills_a_helper_that_ignores_sigterm_after_its_agent_died(
        worker_server, tmp_path, spawn):
    url, store = worker_server
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    worker = spawn(worker_command(url, tmp_path, "--once", "--grace", "1",
                                  agent=("-c", AGENT_WITH_HELPER)), text=True,
                   env={**os.environ, "AGENT_SLEEP": "30", "HELPER_IGNORES_TERM": "1"},
                   stderr=subprocess.PIPE)
    wait_until(lambda: (tmp_path / "helper").exists())
    store.cancel(task.id)
    assert worker.wait(timeout=15) == 0  # SIGTERM ended the agent; SIGKILL, its helper
    assert "the task was cancelled" in worker.stderr.read()
    assert not running(int((tmp_path / "helper").read_text()))


def test_worker_runs_a_relative_command_as_found_where_it_started(worker_server, tmp_path):
    url, store = worker_server
    for folder, says in ((tmp_path, "the agent"), (tmp_path / "proj", "a file of the checkout")):
        script = folder / "agents" / "ok"
        script.parent.mkdir(parents=True)
        script.write_text(f"#!{sys.executable}\nprint({says!r})\n")
        script.chmod(0o755)
    task, _ = store.create({"work_directory": str(tmp_path / "proj"), "prompt": "p"})
    result = subprocess.run(
        [sys.executable, str(MODULE), "work", "--url", url, "--work-path", "proj", "--wait", "0",
         "--once", "--", "./agents/ok"], cwd=tmp_path, capture_output=True, text=True,
        timeout=30)
    assert result.returncode == 0, result.stderr
    assert store.get(task.id).result["output"] == "the agent\n"


def test_worker_whose_output_is_closed_still_reports_without_a_traceback(worker_server,
                                                                         tmp_path, spawn):
    url, store = worker_server
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    agent = ("-c", "for n in range(20000): print('line', n)")  # more than a pipe holds
    worker = spawn(worker_command(url, tmp_path, "--once", agent=agent), text=True,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    worker.stdout.close()  # as `| head -2` does
    assert worker.wait(timeout=20) == 0
    assert "Traceback" not in worker.stderr.read()
    done = store.get(task.id)
    assert done.status == "completed" and done.result["output"].endswith("line 19999\n")


def test_worker_gives_its_agents_the_api_key_it_was_given(tmp_path):
    store = TaskStore()
    config = Config(rate_limit=0, api_key="sekrit")
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    agent = ("-c", "import os; print(os.environ.get('APP_SECURITY_API_KEY'))")
    environment = {key: value for key, value in os.environ.items()
                   if key != "APP_SECURITY_API_KEY"}
    with running_server(config, create_app(config, store)) as url:
        result = subprocess.run(worker_command(url, tmp_path, "--once", "--token", "sekrit",
                                               agent=agent),
                                capture_output=True, text=True, timeout=30, env=environment)
    assert result.returncode == 0, result.stderr
    assert store.get(task.id).result["output"] == "sekrit\n"  # so `orchestrator add` works


def test_worker_shows_progress_while_the_agent_runs(worker_server, tmp_path, spawn):
    url, store = worker_server
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    agent = ("-c", "import os, time; print('step one', flush=True)\n"
                   "while not os.path.exists('go'): time.sleep(0.02)")
    worker = spawn(worker_command(url, tmp_path, "--once", agent=agent), text=True,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: store.get(task.id).progress == "step one")
    (tmp_path / "go").touch()
    stdout, _ = worker.communicate(timeout=20)
    assert "step one" in stdout  # shown as it came, and reported too
    assert store.get(task.id).result["output"].strip() == "step one"


def test_worker_first_ctrl_c_finishes_the_task_then_exits(worker_server, tmp_path, spawn):
    url, store = worker_server
    first, _ = store.create({"work_directory": str(tmp_path), "prompt": "one"})
    second, _ = store.create({"work_directory": str(tmp_path), "prompt": "two"})
    until_go = ("-c", "import os, time\nwhile not os.path.exists('go'): time.sleep(0.02)")
    worker = spawn(worker_command(url, tmp_path, agent=until_go), text=True,
                   stderr=subprocess.PIPE)
    wait_until(lambda: store.get(first.id).status == "working")
    worker.send_signal(signal.SIGINT)
    read_until(worker, "stopping after this task")
    (tmp_path / "go").touch()
    assert worker.wait(timeout=10) == 0
    assert store.get(first.id).status == "completed"
    assert store.get(second.id).status == "waiting"  # no new claim after Ctrl-C


@pytest.mark.parametrize("max_retries", [1, 0])
def test_worker_second_ctrl_c_stops_the_command_and_hands_the_task_back(
        worker_server, tmp_path, max_retries, spawn):
    url, store = worker_server
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p",
                            "max_retries": max_retries})
    pid_file = tmp_path / "agent.pid"
    agent = ("-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                   "time.sleep(30)")
    worker = spawn(worker_command(url, tmp_path, agent=agent), text=True,
                   stderr=subprocess.PIPE)
    wait_until(lambda: pid_file.exists() and pid_file.read_text())
    worker.send_signal(signal.SIGINT)
    read_until(worker, "press Ctrl-C again")
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=10) == 130
    handed_back = store.get(task.id)
    assert handed_back.status == "waiting" and handed_back.retry_count == 0  # no retry used
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_directory_concurrency_holds_a_second_worker_until_the_first_finishes(tmp_path, spawn):
    store = TaskStore(task_timeout=2, directory_concurrency=1)
    config = Config(rate_limit=0)
    first, _ = store.create({"work_directory": str(tmp_path), "prompt": "one"})
    second, _ = store.create({"work_directory": str(tmp_path), "prompt": "two"})
    until_go = ("-c", "import os, time\nwhile not os.path.exists('go'): time.sleep(0.02)")
    with running_server(config, create_app(config, store)) as url:
        command = worker_command(url, tmp_path, "--once", "--wait", "20", agent=until_go)
        workers = [spawn(command, stderr=subprocess.DEVNULL)]
        wait_until(lambda: store.get(first.id).status == "working")
        workers.append(spawn(command, stderr=subprocess.DEVNULL))
        wait_until(lambda: store.waiting_requests == 1)
        assert store.get(second.id).status == "waiting"  # held back: one agent per checkout
        (tmp_path / "go").touch()
        assert [worker.wait(timeout=30) for worker in workers] == [0, 0]
    done = [store.get(first.id), store.get(second.id)]
    assert [task.status for task in done] == ["completed", "completed"]
    assert done[0].worker_id != done[1].worker_id
    assert done[1].started_at >= done[0].completed_at  # never two at once
    assert done[1].started_at - done[0].completed_at < 10  # the long poll woke, not timed out


@contextlib.contextmanager
def scripted_claims(*answers):
    """A stand-in orchestrator whose claims get `answers` in turn, then "nothing waiting".

    Yields (url, arrivals): the monotonic time of each claim.
    """
    app, arrivals = bottle.Bottle(), []
    nothing = (200, {"success": True, "data": None, "error": None, "timestamp": "now"})

    @app.get("/api/v1/tasks/next")
    def claim():
        arrivals.append(time.monotonic())
        status, envelope = answers[len(arrivals) - 1] if len(arrivals) <= len(answers) else nothing
        bottle.response.status = status
        bottle.response.content_type = "application/json"
        return json.dumps(envelope)

    with running_server(Config(rate_limit=0), app) as url:
        yield url, arrivals


def test_worker_waits_out_a_rate_limit_as_the_server_says(tmp_path):
    limited = {"success": False, "data": None, "timestamp": "now",
               "error": {"code": "RATE_LIMITED", "message": "rate limit exceeded; retry in 2 s",
                         "details": {"retry_after": 2}}}
    with scripted_claims((429, limited)) as (url, arrivals):
        status, stderr = run_worker(url, tmp_path)
    assert status == 0
    assert "rate limited by the orchestrator; retrying in 2 s" in stderr
    assert "cannot reach" not in stderr
    assert len(arrivals) == 2 and arrivals[1] - arrivals[0] >= 2  # not the 1 s backoff


def test_an_idle_worker_pauses_a_second_between_claims_that_find_nothing(tmp_path, spawn):
    with scripted_claims() as (url, arrivals):
        worker = spawn(worker_command(url, tmp_path), stderr=subprocess.DEVNULL)
        wait_until(lambda: len(arrivals) >= 2)
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=10) == 0
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    assert min(gaps) >= 0.9  # --wait 0 answers at once: without the pause, a busy loop


def test_worker_reports_with_its_token_so_a_new_lease_under_its_name_stops_it(worker_server,
                                                                              tmp_path, spawn):
    url, store = worker_server
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    worker = spawn(worker_command(url, tmp_path, "--once", "--worker-id", "w1", "--grace", "1"),
                   text=True, env={**os.environ, "AGENT_SLEEP": "30"}, stderr=subprocess.PIPE)
    wait_until(lambda: store.get(task.id).status == "working")
    store.release(task.id, {"worker_id": "w1"})
    assert store.claim(str(tmp_path), "w1").id == task.id  # the same name, a new lease
    assert worker.wait(timeout=10) == 0
    assert "the lease was lost: command stopped, not reported" in worker.stderr.read()
    held = store.get(task.id)
    assert (held.status, held.worker_id, held.result) == ("working", "w1", None)


@pytest.mark.parametrize("url", ["notaurl", "127.0.0.1:8080", "ftp://example.com"])
@pytest.mark.parametrize("command", ["work", "mcp-stdio"])
def test_a_url_that_is_not_http_exits_2_before_anything(tmp_path, command, url):
    extra = ["--work-path", str(tmp_path), "--", "cat"] if command == "work" else []
    result = subprocess.run([sys.executable, str(MODULE), command, "--url", url, *extra],
                            capture_output=True, text=True, timeout=30, input="")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--url" in result.stderr and "http://" in result.stderr


@pytest.mark.parametrize("url_suffix, args, says", [
    ("/mcp", [], "HTTP 404"),
    ("", ["--worker-id", ""], "worker_id: must not be empty"),
])
def test_worker_whose_claims_are_refused_exits_2_saying_why(worker_server, tmp_path, url_suffix,
                                                            args, says):
    url, store = worker_server
    status, stderr = run_worker(url + url_suffix, tmp_path, *args)
    assert status == 2 and says in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("args", [
    ["--max-output", "0"], ["--max-output", "-3"], ["--max-output", "131073"],
    ["--grace", "-5"],
    ["--max-failures", "-1"], ["--wait", "25"],
])
def test_worker_numbers_are_checked_before_anything(tmp_path, args):
    command = [sys.executable, str(MODULE), "work", "--work-path", str(tmp_path), *args,
               "--", "cat"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and args[0] in result.stderr
    assert "choose from" not in result.stderr  # no list of 21 numbers


def test_worker_with_a_missing_work_path_exits_2_without_claiming(worker_server, tmp_path):
    url, store = worker_server
    missing = tmp_path / "gone"
    task, _ = store.create({"work_directory": str(missing), "prompt": "p"})
    status, stderr = run_worker(url, missing)
    assert status == 2 and "no such directory" in stderr
    assert store.get(task.id).status == "waiting"


@pytest.mark.parametrize("command", ["work", "mcp-stdio"])
def test_help_shows_the_defaults_but_never_the_key(command):
    result = subprocess.run([sys.executable, str(MODULE), command, "--help"], text=True,
                            capture_output=True, timeout=30,
                            env={**os.environ, "APP_SECURITY_API_KEY": "s3cret-key"})
    assert result.returncode == 0
    shown = " ".join(result.stdout.split())
    assert "s3cret-key" not in shown
    assert "(default: http://127.0.0.1:8080)" in shown
    assert "default: None" not in shown and "default: False" not in shown


def test_worker_first_ctrl_c_while_waiting_for_work_exits_at_once(worker_server, tmp_path,
                                                                 spawn):
    url, store = worker_server
    worker = spawn(worker_command(url, tmp_path, "--wait", "20"), stderr=subprocess.DEVNULL)
    wait_until(lambda: store.waiting_requests == 1)
    stopped = time.monotonic()
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=10) == 0
    assert time.monotonic() - stopped < 8  # not the rest of the 20 s claim
    get_json(url + "/health")  # a round trip after the close: the server has seen it
    task, _ = store.create({"work_directory": str(tmp_path), "prompt": "p"})
    wait_until(lambda: store.waiting_requests == 0 and store.get(task.id).status == "waiting")
    assert (store.get(task.id).worker_id, store.get(task.id).retry_count) == (None, 0)


def test_worker_with_a_wrong_key_exits_2(tmp_path):
    config = Config(rate_limit=0, api_key="s3cret")
    with running_server(config) as url:
        status, stderr = run_worker(url, tmp_path, "--token", "wrong")
    assert status == 2 and "refused the API key" in stderr and "Traceback" not in stderr


def test_worker_retries_while_the_server_is_down(tmp_path, spawn):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    worker = spawn(worker_command(url, tmp_path), text=True, stderr=subprocess.PIPE)
    assert "retrying in 1 s" in read_until(worker, "cannot reach")
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=10) == 0
    assert "Traceback" not in worker.stderr.read()


def test_worker_once_exits_2_when_the_server_cannot_be_reached(tmp_path):
    # A script's one-off run must not wait forever behind a mistyped --url.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    status, stderr = run_worker(url, tmp_path)
    assert status == 2 and "cannot reach the orchestrator" in stderr
    assert "retrying" not in stderr and "Traceback" not in stderr


# ---------------------------------------------------------------------------
# The page at /, in a real browser (headless Chromium through Selenium)
# ---------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for every browser test; skipped where it is not installed."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("the browser tests need Debian's Chromium and its driver: "
                    "apt-get install chromium chromium-driver (.ci/run installs them)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium must not try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1440,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture
def page_server():
    """A live server over a store with ten-minute leases: (url, store)."""
    store = TaskStore(task_timeout=600)
    config = Config(rate_limit=0)
    with running_server(config, create_app(config, store)) as url:
        yield url, store


def browser_wait(browser, condition, timeout=10):
    """Wait for a condition on the page, which may re-render between two looks at it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda _: condition())


def texts(browser, selector):
    """The text of each element a selector matches, read in one step in the page."""
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.innerText)", selector)


def click(browser, selector, index=0):
    """Click the index-th match, found and clicked in one step in the page."""
    browser.execute_script("document.querySelectorAll(arguments[0])[arguments[1]].click()",
                           selector, index)


def open_page(browser, url):
    """Load the page and wait for its first refresh; the browser log starts empty."""
    browser.get(url + "/")
    browser.get_log("browser")
    browser_wait(browser, lambda: css(browser, "#updated").text.startswith("updated"))


def css(browser, selector):
    """The first element a selector matches (for typing into a form, which never re-renders)."""
    return browser.find_element("css selector", selector)


def all_css(browser, selector):
    """Every element a selector matches."""
    return browser.find_elements("css selector", selector)


def task_rows(browser):
    """The ids of the task rows shown, top to bottom."""
    return browser.execute_script(
        "return [...document.querySelectorAll('#tasks tr.task')].map((e) => e.dataset.taskId)")


def test_the_page_loads_without_console_errors_and_counts_what_statistics_count(browser,
                                                                              page_server):
    url, store = page_server
    for n in range(3):
        store.create({"work_directory": "/p", "prompt": f"task {n}"})
    held = store.claim("/p", "agent-1")
    store.complete(held.id)
    open_page(browser, url)
    stats = store.statistics()
    shown = texts(browser, "#glance .stat[data-status] b")
    assert shown == [str(stats[f"{status}_tasks"]) for status in orchestrator.STATUSES]
    assert len(task_rows(browser)) == 3
    browser_wait(browser, lambda: "updated" in css(browser, "#updated").text)
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def submit_task_form(browser, **fields):
    """Type into the add-a-task form's fields, then submit it."""
    form = css(browser, "#add")
    for name, text in fields.items():
        form.find_element("name", name).send_keys(text)
    form.find_element("css selector", "button[type=submit]").click()


def test_a_task_added_through_the_form_appears(browser, page_server):
    url, store = page_server
    open_page(browser, url)
    submit_task_form(browser, work_directory="/home/me/project", prompt="Add a --verbose flag",
                     tags="cli, urgent")
    browser_wait(browser, lambda: len(store) == 1 and len(task_rows(browser)) == 1)
    task = store.list()["tasks"][0]
    assert (task.prompt, task.tags, task.work_directory) == (
        "Add a --verbose flag", ["cli", "urgent"], "/home/me/project")


def test_a_bad_task_from_the_form_shows_the_apis_message(browser, page_server):
    url, store = page_server
    open_page(browser, url)
    submit_task_form(browser, work_directory="relative/path", prompt="p")
    browser_wait(browser, lambda: "work_directory" in css(browser, "#message").text)
    assert len(store) == 0


def detail_buttons(browser):
    """The labels of the action buttons in a task's detail."""
    return texts(browser, "#detail-actions button")


def test_cancel_and_retry_change_the_task_and_show_only_where_valid(browser, page_server):
    url, store = page_server
    task, _ = store.create({"work_directory": "/p", "prompt": "p"})
    open_page(browser, url)
    click(browser, "#tasks tr.task")
    browser_wait(browser, lambda: detail_buttons(browser) == ["Cancel"])
    click(browser, "#detail-actions button")
    browser_wait(browser, lambda: detail_buttons(browser) == ["Retry", "Delete"])
    assert store.get(task.id).status == "cancelled"
    click(browser, "#detail-actions button")
    browser_wait(browser, lambda: detail_buttons(browser) == ["Cancel"])
    assert store.get(task.id).status == "waiting"


def test_a_task_opens_from_the_keyboard(browser, page_server):
    from selenium.webdriver.common.keys import Keys
    url, store = page_server
    task, _ = store.create({"work_directory": "/p", "prompt": "by keyboard"})
    open_page(browser, url)
    browser.execute_script("document.querySelector('#tasks tr.task').focus()")
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    browser_wait(browser, lambda: texts(browser, "#detail-title") == [f"Task {task.id}"])
    assert browser.execute_script("return document.getElementById('detail').open") is True


def test_a_delayed_task_shows_when_it_can_be_claimed(browser, page_server):
    url, store = page_server
    store.create({"work_directory": "/p", "prompt": "later", "delay_seconds": 600})
    open_page(browser, url)
    assert re.search(r"not before (9|10) min from now", texts(browser, "#tasks tr.task")[0])


def test_a_blocked_task_shows_what_it_waits_for_and_its_dependents(browser, page_server):
    url, store = page_server
    first, _ = store.create({"work_directory": "/p", "prompt": "first"})
    second, _ = store.create({"work_directory": "/p", "prompt": "second",
                              "depends_on": [first.id]})
    open_page(browser, url)
    assert "blocked by 1" in texts(browser, "#tasks tr.task")[0]  # the newest: second
    click(browser, "#tasks tr.task", 1)  # first
    browser_wait(browser, lambda: "Dependents" in texts(browser, "#detail-body")[0])
    assert second.id[:8] in texts(browser, "#detail-body dd button.link")


def test_delete_asks_first(browser, page_server):
    url, store = page_server
    task, _ = store.create({"work_directory": "/p", "prompt": "p"})
    store.cancel(task.id)
    open_page(browser, url)
    click(browser, "#tasks tr.task")
    browser_wait(browser, lambda: detail_buttons(browser) == ["Retry", "Delete"])
    css(browser, "#detail-actions button.danger").click()  # a real click: confirm() blocks
    browser.switch_to.alert.dismiss()
    assert len(store) == 1
    css(browser, "#detail-actions button.danger").click()
    browser.switch_to.alert.accept()
    browser_wait(browser, lambda: len(store) == 0 and task_rows(browser) == [])


def test_filters_and_search_narrow_the_list(browser, page_server):
    url, store = page_server
    parser, _ = store.create({"work_directory": "/a", "prompt": "Fix the parser"})
    store.create({"work_directory": "/a", "prompt": "Write docs"})
    elsewhere, _ = store.create({"work_directory": "/b", "prompt": "Fix the lexer"})
    store.cancel(elsewhere.id)
    open_page(browser, url)
    assert len(task_rows(browser)) == 3
    css(browser, "#filters input[name=q]").send_keys("PARSER")
    browser_wait(browser, lambda: task_rows(browser) == [parser.id])
    click(browser, "#filters button[type=reset]")
    browser_wait(browser, lambda: len(task_rows(browser)) == 3)
    click(browser, "#filters input[value=cancelled]")
    browser_wait(browser, lambda: task_rows(browser) == [elsewhere.id])
    click(browser, "#filters input[value=waiting]")  # several statuses at once
    browser_wait(browser, lambda: len(task_rows(browser)) == 3)
    click(browser, "#directories button.link")  # the /a row: its tasks only
    browser_wait(browser, lambda: len(task_rows(browser)) == 2 and elsewhere.id not in
                 task_rows(browser))


def test_retry_all_failed_in_a_directory(browser, page_server):
    url, store = page_server
    for _ in range(2):
        task, _ = store.create({"work_directory": "/p", "prompt": "p", "max_retries": 0})
        store.claim("/p", "w")
        store.fail(task.id, {"error": "x"})
    open_page(browser, url)
    assert texts(browser, "#directories .actions button") == ["Retry all failed (2)"]
    click(browser, "#directories .actions button")
    browser_wait(browser, lambda: store.statistics()["waiting_tasks"] == 2)
    browser_wait(browser, lambda: "Retry all failed" not in css(browser, "#directories").text)


def test_a_prompt_full_of_html_shows_as_text_and_runs_nothing(browser, page_server):
    url, store = page_server
    attack = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'
    store.create({"work_directory": "/p", "prompt": attack, "tags": ["<b>x</b>"],
                  "metadata": {"<i>": "<svg onload=alert(1)>"}})
    open_page(browser, url)
    click(browser, "#tasks tr.task")
    browser_wait(browser, lambda: attack in texts(browser, "#detail-body")[0])
    assert browser.title == "Task orchestrator"
    assert all_css(browser, "#tasks img, #detail img, #detail-body script, svg") == []


def test_with_an_api_key_the_page_asks_for_it_once_then_works(browser):
    store = TaskStore()
    store.create({"work_directory": "/p", "prompt": "secret work"})
    config = Config(rate_limit=0, api_key="s3cret")
    with running_server(config, create_app(config, store)) as url:
        browser.get(url + "/")
        browser_wait(browser, lambda: css(browser, "#key-dialog").get_attribute("open") is not None)
        assert len(all_css(browser, "#key-dialog[open]")) == 1  # one question, not one per call
        key = css(browser, "#key-form input[name=key]")
        key.send_keys("wrong")
        key.submit()
        browser_wait(browser, lambda: "refused" in css(browser, "#key-why").text)
        key.send_keys("s3cret")
        key.submit()
        browser_wait(browser, lambda: len(task_rows(browser)) == 1)
        assert browser.execute_script(
            "return sessionStorage.getItem('orchestrator-api-key')") == "s3cret"
        assert "s3cret" not in browser.current_url
        assert browser.get_cookies() == []


# ---------------------------------------------------------------------------
# The README's tour of the module stays true
# ---------------------------------------------------------------------------

def _reading_the_code() -> str:
    """The README's "Reading the code" section."""
    readme = (MODULE.parent / "README.md").read_text(encoding="utf-8")
    return readme.split("\n## Reading the code\n", 1)[1].split("\n## ", 1)[0]


def _defined_in_module(name: str) -> bool:
    """Whether the module's source defines the name: a def, a class, an assignment or a field."""
    source = MODULE.read_text(encoding="utf-8")
    return re.search(rf"(\b(def|class) {name}\b)|(^|[\s.(,]){name}(: [^\n]*)?( =|:)", source,
                     re.MULTILINE) is not None


def _defined_in_class(owner: str, name: str) -> bool:
    """Whether a class of the module has that attribute, or sets it on its instances."""
    cls = getattr(orchestrator, owner, None)
    if not isinstance(cls, type):
        return True  # a local name, e.g. counts.count: its parts were checked
    return hasattr(cls, name) or re.search(rf"self\.{name}\b[^=\n]*=", inspect.getsource(cls))


def test_reading_the_code_names_only_what_the_module_defines():
    spans = re.findall(r"`([^`]+)`", _reading_the_code())
    names = {span for span in spans
             if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", span)
             and not span.endswith(".py") and not keyword.iskeyword(span)}
    assert len(names) > 40, "the tour names the module's parts"
    missing = sorted(name for name in names
                     if not all(_defined_in_module(part) for part in name.split("."))
                     or "." in name and not _defined_in_class(*name.split(".", 1)))
    assert not missing, f"the README's tour names what the module does not define: {missing}"


def test_reading_the_code_exercises_name_tests_that_exist():
    tests = [name for name in dir(sys.modules[__name__]) if name.startswith("test_")]
    selections = re.findall(r"`-k '?([^`']+)'?`", _reading_the_code())
    assert len(selections) >= 6
    for selection in selections:
        for term in selection.split(" or "):
            assert any(term in test for test in tests), f"no test matches -k {term}"
