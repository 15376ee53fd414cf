"""The GitHub workflow: what runs where (issue 15). A self-hosted GPU runner executes whatever
code a job hands it, so the GPU job must never run a fork's pull request."""

from __future__ import annotations

from pathlib import Path

import yaml

WORKFLOW = Path(__file__).resolve().parents[1] / ".github" / "workflows" / "tests.yml"


def _workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as the boolean True
    data["on"] = data.pop(True, data.get("on"))
    return data


def _gpu_job() -> dict:
    jobs = _workflow()["jobs"]
    gpu = [job for job in jobs.values() if "self-hosted" in job.get("runs-on", [])]
    assert len(gpu) == 1, "expected exactly one job on the self-hosted GPU runner"
    return gpu[0]


def test_gpu_job_never_runs_a_forks_pull_request():
    condition = " ".join(_gpu_job()["if"].split())
    assert "vars.GPU_RUNNER_LABEL != ''" in condition  # skipped where no runner is set up
    # a pull request runs only when its head branch is in this repository
    assert "github.event.pull_request.head.repo.full_name == github.repository" in condition
    assert "github.event_name == 'push'" in condition
    triggers = _workflow()["on"]
    assert "pull_request_target" not in triggers  # it would run fork code with secrets


def test_gpu_job_runs_the_unit_tests_and_the_notebooks_on_cuda():
    job = _gpu_job()
    assert job["env"]["COURSE_DEVICE"] == "cuda"
    runs = [step.get("run", "") for step in job["steps"]]
    assert "make unit" in runs  # the CUDA-only unit tests skip everywhere else
    assert "make notebooks" in runs
    uses = [step.get("uses", "") for step in job["steps"]]
    assert any(u.startswith("actions/cache@") for u in uses)  # pip downloads are cached


def test_cpu_job_runs_make_test():
    jobs = _workflow()["jobs"]
    assert any(step.get("run") == "make test" for step in jobs["cpu"]["steps"])
