"""End to end: loads as jobs on a real stack, with an Ollama stand-in that loads slowly: the job
follows the load, cancelling it stops the worker and fails its waiting requests, a job queued
for room is cancelled without evicting anything, and the CLI and the page show the progress."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest
import requests
from playwright.sync_api import Browser, expect

from tests.ollama_standin import OllamaStandin
from tests.stack import Stack, wait_until
from tests.test_ui import open_page, row

GB = 2**30
#: The stand-in takes LOAD_SECONDS to load slow:70b.
LOAD_SECONDS = 8.0
MODELS = [
    {"model_id": "slow", "upstream_model": "slow:70b", "ttl_minutes": 30},
    {"model_id": "tiny", "upstream_model": "tiny:1b", "ttl_minutes": 30},
    {"model_id": "other", "upstream_model": "tiny:1b", "ttl_minutes": 30},
    # Not in the stand-in until pulled from its library (PULL_SECONDS).
    {"model_id": "fresh", "upstream_model": "fresh:7b", "ttl_minutes": 30, "pull": True},
]
PULL_SECONDS = 4.0


@pytest.fixture(scope="module")
def standin() -> Iterator[OllamaStandin]:
    """Overrides conftest's: slow:70b takes LOAD_SECONDS to load, tiny:1b a moment."""
    server = OllamaStandin(
        models={"slow:70b": 40 * GB, "tiny:1b": GB // 10},
        seconds_per_gb=LOAD_SECONDS / 40,
        library={"fresh:7b": 4 * GB, "long:7b": GB},
        pull_seconds=PULL_SECONDS,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack]) -> Stack:
    settings = {
        "max_concurrent_models": 1,
        "memory_limit_mb": 0,  # slow:70b is 40 GB as the stand-in reports it
        # A fixed residency, so that a second model must wait for room.
        "min_resident_seconds": 60,
        "resident_load_multiple": 0,
        "capacity_wait_seconds": 30,
    }
    return make_stack(MODELS, settings)  # type: ignore[no-any-return]


def unload_all(stack: Stack) -> None:
    for m in MODELS:
        if stack.state(m["model_id"]) in ("HOT", "COOLING"):
            stack.post(f"/models/{m['model_id']}/unload", {"force": True, "wait": True})
    for m in MODELS:
        stack.wait_state(m["model_id"], "COLD", "FAILED")


def worker_pid(stack: Stack, program: str) -> int | None:
    for name in (program, f"models:{program}"):
        out = stack.supervisorctl("pid", name).stdout.strip()
        if out.isdigit() and int(out) > 0:
            return int(out)
    return None


def standin_has(standin: OllamaStandin, name: str) -> bool:
    ps = requests.get(standin.url + "/api/ps", timeout=5).json()["models"]
    return any(m["name"] == name for m in ps)


def test_cancelling_a_load_under_way_stops_its_worker_and_fails_its_waiters(
    stack: Stack, standin: OllamaStandin
) -> None:
    loads_before = standin.load_counts.get("slow:70b", 0)
    resp = stack.post("/models/slow/load", {})
    assert resp.status_code == 202, resp.text
    job = resp.json()["job"]
    assert job["phase"] in ("spawning", "loading_weights") and job["origin"] == "load"
    assert resp.json()["state"] == "WARMING"
    # A second load call joins the same job.
    assert stack.post("/models/slow/load", {}).json()["job"]["job_id"] == job["job_id"]

    answers: list[requests.Response] = []
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}
    waiter = threading.Thread(
        target=lambda: answers.append(stack.post("/v1/chat/completions", body, timeout=60)),
        daemon=True,
    )
    waiter.start()
    # The worker answers and asks Ollama for the model: loading its weights.
    wait_until(lambda: stack.get(f"/jobs/{job['job_id']}").json()["phase"] == "loading_weights", 15)
    program = stack.model("slow")["program"]
    pid = worker_pid(stack, program)
    assert pid is not None, stack.supervisorctl("status").stdout
    time.sleep(0.5)  # the request has reached the pool and waits for the load
    assert waiter.is_alive() and not answers

    cancelled = stack.request("DELETE", f"/jobs/{job['job_id']}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["phase"] == "cancelled"
    model = stack.wait_state("slow", "COLD", timeout=15)
    assert model["job"]["phase"] == "cancelled"
    history = stack.get("/models/slow/health").json()["history"]
    assert (history[-2]["to"], history[-1]["to"], history[-1]["reason"]) == (
        "UNLOADING",
        "COLD",
        "cancelled",
    )
    # Nothing is left running: the worker process is gone, and so is its program.
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", 10)
    assert program not in stack.supervisorctl("status").stdout
    # The request that waited for the load gets a clear error at once.
    waiter.join(10)
    assert len(answers) == 1
    assert answers[0].status_code == 409, answers[0].text
    error = answers[0].json()["error"]
    assert error["code"] == "load_cancelled" and "cancelled" in error["message"]
    # Ollama finishes the load its client left (and would keep the model for ever, as asked):
    # the pool lets go of it there too.
    wait_until(lambda: standin.load_counts.get("slow:70b", 0) > loads_before, LOAD_SECONDS + 5)
    wait_until(lambda: not standin_has(standin, "slow:70b"), 5, 0.1)
    listed = stack.get("/jobs").json()["jobs"]
    assert [j["phase"] for j in listed if j["job_id"] == job["job_id"]] == ["cancelled"]
    again = stack.request("DELETE", f"/jobs/{job['job_id']}")
    assert again.status_code == 409 and "has ended" in again.json()["error"]["message"]
    assert stack.request("DELETE", "/jobs/job-nope").status_code == 404


def test_a_load_call_that_finds_no_room_queues_a_job_that_can_be_cancelled(stack: Stack) -> None:
    unload_all(stack)
    assert stack.post("/models/tiny/load", {"wait": True}).status_code == 200
    pid = stack.model("tiny")["pid"]
    resp = stack.post("/models/other/load", {})
    assert resp.status_code == 202, resp.text
    job = resp.json()["job"]
    # tiny is resident for 60 s: other waits in the queue for room, nothing is evicted.
    assert job["phase"] == "queued" and job["node"] is None
    assert resp.json()["state"] == "COLD"
    assert stack.get(f"/jobs/{job['job_id']}").json()["phase"] == "queued"
    cancelled = stack.request("DELETE", f"/jobs/{job['job_id']}").json()
    assert cancelled["phase"] == "cancelled"
    assert stack.state("other") == "COLD"
    tiny = stack.model("tiny")
    assert (tiny["state"], tiny["pid"]) == ("HOT", pid)
    assert "models:" + stack.model("other")["program"] not in stack.supervisorctl("status").stdout


def test_modelpool_load_shows_the_phases_and_jobs_lists_them(stack: Stack) -> None:
    unload_all(stack)
    proc = stack.cli("load", "slow", "--timeout", "60")
    assert proc.returncode == 0, (
        proc.stdout + proc.stderr + str(stack.get("/models/slow/health").json()["history"])
    )
    lines = proc.stdout.splitlines()
    assert any("WARMING loading_weights" in ln for ln in lines), proc.stdout
    assert "slow is HOT" in lines[-1]
    jobs = stack.cli("jobs", check=True).stdout
    assert re.search(r"job-\w+\s+slow\s+ready\s+100%", jobs), jobs
    assert re.search(r"job-\w+\s+slow\s+cancelled", jobs), jobs


def test_a_load_that_pulls_the_model_reports_the_download_as_progress(
    stack: Stack, standin: OllamaStandin
) -> None:
    unload_all(stack)
    assert "fresh:7b" not in standin.models
    proc = stack.cli("load", "fresh", "--timeout", "60")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = [int(p) for p in re.findall(r"WARMING loading_weights (\d+)%", proc.stdout)]
    assert any(0 < p < 100 for p in shown), proc.stdout  # the download, as it came in
    assert shown == sorted(shown), proc.stdout
    assert "fresh is HOT" in proc.stdout.splitlines()[-1]
    assert "fresh:7b" in standin.models and standin_has(standin, "fresh:7b")
    (pull,) = standin.calls_to("/api/pull")
    assert pull.body == {"model": "fresh:7b", "stream": True}
    job = stack.model("fresh")["job"]
    assert (job["phase"], job["progress"]) == ("ready", 1.0)


def test_a_pull_longer_than_the_load_timeout_goes_on_while_it_makes_progress(
    standin: OllamaStandin,
) -> None:
    entry = {"model_id": "long", "upstream_model": "long:7b", "pull": True}
    stack = Stack([entry], {"load_timeout_seconds": 2}, ollama_url=standin.url).up()
    try:
        # The pull takes twice the load timeout; its progress keeps the load alive, and the
        # caller waiting with the default timeout waits for it.
        resp = stack.post("/models/long/load", {"wait": True})
        assert resp.status_code == 200, resp.text
        assert stack.state("long") == "HOT"
        assert "long:7b" in standin.models
    finally:
        leaked = stack.down()
        stack.cleanup()
    assert not leaked


def test_the_page_shows_a_live_load_with_a_cancel_button(
    stack: Stack, browser: Browser, standin: OllamaStandin
) -> None:
    unload_all(stack)
    loads_before = standin.load_counts.get("slow:70b", 0)
    with open_page(browser, stack) as page:
        slow = row(page, "slow")
        expect(slow.locator(".job")).to_be_hidden()
        slow.locator('button[data-action="load"]').click()
        job = slow.locator(".job")
        expect(job).to_be_visible(timeout=10_000)
        expect(job).to_have_attribute("data-phase", re.compile("spawning|loading_weights"))
        expect(slow.locator(".job-text")).to_contain_text(re.compile("spawning|loading weights"))
        # Ollama does not say how far a load is: the bar is indeterminate.
        expect(job).to_have_attribute("data-phase", "loading_weights", timeout=10_000)
        assert slow.locator("progress.job-bar").get_attribute("value") is None
        slow.locator('button[data-action="cancel"]').click()
        expect(page.locator("#message")).to_contain_text("Load of slow cancelled")
        expect(slow.locator('[data-field="state"] .badge')).to_have_text("COLD", timeout=15_000)
        expect(job).to_be_hidden()
    wait_until(lambda: standin.load_counts.get("slow:70b", 0) > loads_before, LOAD_SECONDS + 5)
    wait_until(lambda: not standin_has(standin, "slow:70b"), 5, 0.1)
