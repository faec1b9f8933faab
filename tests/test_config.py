"""The run config file (`vl run -f vl.yaml`, `[tool.vaultlayer]`), `vl schema`, the merge under the flags,
and setup commands run on the host before the command."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest
import yaml

from cli import cmd_run, context
from cli import main as vl_main
from cli.cmd_run import request_from_args
from cli.context import UsageError, warn
from cli.main import parser
from tests.conftest import REPO, make_counter_spec, make_spec
from vaultlayer import client as vl_client
from vaultlayer.catalog import KNOWN_PROVIDERS
from vaultlayer.config import PoolConfig, RunConfig, load_file
from vaultlayer.models import AttemptOutcome, Market, RunState
from vaultlayer.request import RunRequestError, build_spec
from vaultlayer.runs import AsyncClient

EXAMPLE = REPO / "examples" / "vl.yaml"

# (file text, the one problem line expected on stderr after "vl: error: ")
BAD_CONFIGS = [
    ("comand: python x.py\n", "vl.yaml: comand: unknown field 'comand'; fix: did you mean 'command'?"),
    ("resources:\n  pools:\n    - zones: [a]\n    - market: spott\n",
     "vl.yaml: resources.pools[1].market: 'spott' is not one of spot, on-demand; fix: use one of them"),
    ("resources:\n  pools:\n    - gpus: 2\n",
     "vl.yaml: resources.pools[0].gpus: unknown field 'gpus'; fix: did you mean 'gpu'?"),
    ("resources:\n  pool:\n    - zones: [a]\n",
     "vl.yaml: resources.pool: unknown field 'pool'; fix: did you mean 'pools'?"),
    ("resources:\n  pools:\n    - provider: aws\n      gpu: 'A10G:0'\n",
     "vl.yaml: resources.pools[0].gpu: 'A10G:0' is not a GPU; fix: write CLASS or CLASS:COUNT, such as A10G:1"),
    ("resources:\n  pools:\n    - provider: nimbus\n",
     "vl.yaml: resources.pools[0].provider: 'nimbus' is not one of local, aws, gcp; fix: use one of them"),
    ("resources:\n  pools: []\n", "vl.yaml: resources.pools: [] is empty; fix: give at least one"),
    ("resources:\n  pools:\n    - gpu: A10G:1\n",
     "vl.yaml: resources.pools[0]: the local provider runs on this machine and cannot provision --gpu A10G"),
    ("checkpoint:\n  every: soon\n",
     "vl.yaml: checkpoint.every: 'soon' is neither a number of steps nor a duration; fix: write a positive "
     "number of steps such as 50"),
    ("checkpoint:\n  min: 10\n", "vl.yaml: checkpoint.min: 10 is not a duration; fix: write a number with a unit"),
    ("checkpoint:\n  keep: 0\n", "vl.yaml: checkpoint.keep: 0 is too small; fix: give a number at least 1"),
    ("checkpoint:\n  storage: bucket/x\n",
     "vl.yaml: checkpoint.storage: storage URL 'bucket/x' has no scheme; fix: use file:///abs/path"),
    ("checkpoint:\n  dir: .\n", "vl.yaml: checkpoint.dir: '.' holds"),
    ("limits:\n  max_cost: -5\n", "vl.yaml: limits.max_cost: -5 is too small; fix: give a number more than 0"),
    ("limits:\n  max_attempts: ten\n", "vl.yaml: limits.max_attempts: 'ten' is not a whole number; fix:"),
    ("limits:\n  max_reclaims: yes\n", "vl.yaml: limits.max_reclaims: True is not a whole number; fix:"),
    ("limits:\n  deadline: tomorrow\n",
     "vl.yaml: limits.deadline: 'tomorrow' is neither a duration nor a time; fix:"),
    ("limits:\n  deadline: 2026-01-01T00:00:00\n",
     "vl.yaml: limits.deadline: '2026-01-01T00:00:00' has no time zone; fix: add one, such as 2026-01-01T00:00:00Z"),
    ("limits:\n  deadline: 2020-01-01T00:00:00Z\n",
     "vl.yaml: limits.deadline: '2020-01-01T00:00:00+00:00' is in the past; fix: give a later time"),
    ("env:\n  1BAD: x\n", "vl.yaml: env: '1BAD' is not an environment variable name; fix:"),
    ("env:\n  VL_RUN_ID: x\n", "vl.yaml: env: 'VL_RUN_ID': names starting with VL_ are vaultlayer's own; fix:"),
    ("env:\n  HF_TOKEN: {secret: 'vault:x'}\n",
     "vl.yaml: env.HF_TOKEN: 'vault:x' is not a secret reference; fix: write one of env:NAME, file:/path"),
    ("env:\n  HF_TOKEN: {secrt: 'env:X'}\n", "vl.yaml: env.HF_TOKEN: {'secrt': 'env:X'} is not a secret reference"),
    ("env:\n  DEBUG: true\n", "vl.yaml: env.DEBUG: True is not text; fix: quote the value"),
    ("command: 42\n", "vl.yaml: command: 42 is not a command; fix: write it as a string"),
    ("command: nosuchprogram-vl --x\n", "vl.yaml: command: command 'nosuchprogram-vl' not found on PATH"),
    ("workdir: nowhere\n", "vl.yaml: workdir: 'nowhere' is not a directory"),
    ("resources: [\n", "vl.yaml: line 2, column 1: expected the node content, but found '<stream end>'; fix: "
                       "correct the YAML syntax there"),
    ("- a\n- b\n", "vl.yaml: expected a mapping of fields such as command, env, resources; got list"),
]


def refusal(argv: list[str]) -> list[str]:
    """What `vl run ARGV` prints on stderr when it refuses its input (it then exits 2, before connecting)."""
    with pytest.raises((RunRequestError, UsageError)) as refused:
        spec_from(argv)
    problems = refused.value.problems if isinstance(refused.value, RunRequestError) else [str(refused.value)]
    return [f"vl: error: {problem}" for problem in problems]


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_bad_config_is_one_line_naming_field_value_and_fix(tmp_path, vl_home, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    Path("vl.yaml").write_text(text)
    lines = refusal(["run", "-f", "vl.yaml"])
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"vl: error: {expected}"), lines[0]


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
async def test_vl_run_and_the_client_refuse_a_bad_file_alike(tmp_path, vl_home, monkeypatch, capsys, text, expected):
    """`vl run -f FILE` and `AsyncClient.submit(FILE)` go through one check: the same lines, nothing submitted."""
    monkeypatch.chdir(tmp_path)
    Path("vl.yaml").write_text(text)
    submitted = []

    async def record(*args, **kwargs):
        submitted.append(args)

    def exit_now(code: int):
        raise SystemExit(code)

    async def no_connection():
        raise AssertionError("bad input must be refused before connecting")

    monkeypatch.setattr(vl_client, "submit", record)
    monkeypatch.setattr(context, "exit_now", exit_now)
    monkeypatch.setattr(cmd_run, "connect", no_connection)
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(vl_main.main, ["run", "-f", "vl.yaml"])  # vl's own event loop, as from a shell
    printed = capsys.readouterr().err.splitlines()
    with pytest.raises(RunRequestError) as refused:
        await AsyncClient(temporal=None).submit("vl.yaml")
    assert exited.value.code == context.EXIT_BAD_INPUT
    assert printed == [f"vl: error: {problem}" for problem in refused.value.problems]
    assert printed[0].startswith(f"vl: error: {expected}"), printed
    assert submitted == []


def test_every_problem_is_reported_at_once(tmp_path, vl_home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("vl.yaml").write_text("checkpoint: {every: soon, keep: 0}\nlimits: {max_cost: 0}\n")
    lines = refusal(["run", "-f", "vl.yaml"])
    assert [line.split(": ")[3] for line in lines] == ["checkpoint.every", "checkpoint.keep", "limits.max_cost"]


def test_a_missing_file_and_a_bad_secret_flag_are_refused(tmp_path, vl_home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert refusal(["run", "-f", "nope.yaml"]) == [
        "vl: error: nope.yaml: no such file; fix: check the path given to -f"]
    assert refusal(["run", "--env-secret", "TOKEN=vault:x", "--", "python", "-c", "pass"]) == [
        "vl: error: --env-secret TOKEN: 'vault:x' is not a secret reference; fix: write one of env:NAME, "
        "file:/path, aws-sm:<secret id or ARN> or gcp-sm:projects/P/secrets/S"]
    assert refusal(["run", "--env", "TOKEN=a", "--env-secret", "TOKEN=env:T", "--", "python", "-c", "pass"]) == [
        "vl: error: --env-secret TOKEN: TOKEN also has a plain value (--env or env:); fix: keep one"]


def test_vl_run_with_a_bad_file_exits_2_and_starts_nothing(tmp_path):
    (tmp_path / "bad.yaml").write_text("resources:\n  pools:\n    - market: spott\nlimits: {max_cost: nine}\n")
    home = tmp_path / "vlhome"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VL_", "TEMPORAL_"))} | {"VL_HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "cli.main", "run", "-f", "bad.yaml"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "vl: error: bad.yaml: resources.pools[0].market: 'spott' is not one of spot, on-demand; fix: use one of them",
        "vl: error: bad.yaml: limits.max_cost: 'nine' is not a number; fix: write one, such as 40",
    ]
    assert not home.exists(), "bad input must start no server, worker or host"


# ---------------------------------------------------------------- the merge


def spec_from(argv: list[str]):
    """The RunSpec `vl run ARGV` would submit: the same steps as cli.cmd_run.cmd_run, without submitting."""
    return build_spec(request_from_args(parser().parse_args([*argv[:1], "--run-id", "r-config-test", *argv[1:]])),
                      warn=warn)


FULL = """
command: python train.py --steps 100
workdir: .
env:
  A: 1
  HF_TOKEN: {secret: env:HF_TOKEN}
  DB_PASSWORD: {secret: file:secrets/db}
setup: [echo one, echo two]
resources:
  pools:
    - zones: [a, b]
  on_demand_fallback: true
checkpoint: {every: 25, min: 30s, keep: 2, dir: ckpts}
limits: {max_cost: 3, deadline: 2h, max_attempts: 4, total_steps: 100}
"""


@pytest.fixture
def project(tmp_path, vl_home, monkeypatch) -> Path:
    """A project folder with the config in conf/ (so relative paths visibly start there); cwd elsewhere."""
    folder = tmp_path / "project" / "conf"
    folder.mkdir(parents=True)
    (folder / "vl.yaml").write_text(FULL.replace("workdir: .", "workdir: .."))
    (folder.parent / "train.py").write_text("")
    monkeypatch.chdir(tmp_path)
    return folder.parent


def test_the_file_alone_makes_the_spec_with_paths_relative_to_it(project):
    spec = spec_from(["run", "-f", "project/conf/vl.yaml"])
    assert spec.command[1:] == ["train.py", "--steps", "100"] and Path(spec.command[0]).name.startswith("python")
    assert spec.workdir == str(project)
    assert spec.env == {"A": "1"}
    assert spec.env_secrets == {"HF_TOKEN": "env:HF_TOKEN", "DB_PASSWORD": f"file:{project}/conf/secrets/db"}
    assert spec.setup == ["echo one", "echo two"]
    assert [(p.zone, p.market) for p in spec.pools] == [
        ("a", Market.SPOT), ("b", Market.SPOT), ("a", Market.ON_DEMAND), ("b", Market.ON_DEMAND)]
    assert (spec.checkpoint_every, spec.checkpoint_min, spec.checkpoint_max) == ("25", "30s", "30m")
    # Inside the workdir: relative, so that it resolves inside the code snapshot on every host.
    assert spec.keep_checkpoints == 2 and spec.checkpoint_dir == "conf/ckpts"
    assert spec.limits.max_cost == 3 and spec.limits.max_attempts == 4 and spec.total_steps == 100
    assert spec.limits.deadline - spec.submitted_at == pytest.approx(timedelta(hours=2), abs=timedelta(seconds=1))


def test_flags_given_override_the_file_even_when_they_equal_the_defaults(project, capsys):
    spec = spec_from(["run", "-f", "project/conf/vl.yaml", "--checkpoint-every", "50", "--checkpoint-min", "60s",
                      "--market", "on-demand", "--env", "A=2", "--env-secret", "HF_TOKEN=file:tok", "--max-cost", "9",
                      "--setup", "echo flag", "--", "python", "other.py"])
    assert spec.command[1:] == ["other.py"]
    assert spec.checkpoint_every == "50" and spec.checkpoint_min == "60s"  # 60s is the flag's default
    assert [(p.zone, p.market) for p in spec.pools] == [("a", Market.ON_DEMAND), ("b", Market.ON_DEMAND)]
    assert spec.env == {"A": "2"}
    assert spec.env_secrets == {"HF_TOKEN": f"file:{Path.cwd() / 'tok'}",
                                "DB_PASSWORD": f"file:{project}/conf/secrets/db"}
    assert spec.limits.max_cost == 9 and spec.setup == ["echo flag"]
    assert spec.keep_checkpoints == 2 and spec.limits.max_attempts == 4  # not given: still the file's
    assert "warning" not in capsys.readouterr().err

    where = spec_from(["run", "-f", "project/conf/vl.yaml", "--zone", "z9"])  # a place flag replaces the pools
    assert [(p.zone, p.market) for p in where.pools] == [("z9", Market.SPOT), ("z9", Market.ON_DEMAND)]


def test_plain_env_that_looks_secret_warns_and_points_at_references(project, capsys):
    spec_from(["run", "-f", "project/conf/vl.yaml", "--env", "WANDB_API_KEY=abc", "--env", "EPOCHS=3"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vl: warning: env")]
    assert warnings == ["vl: warning: env WANDB_API_KEY looks like a secret, and a plain value is stored in the "
                        "run's history; pass a reference instead: --env-secret WANDB_API_KEY=env:WANDB_API_KEY (in a "
                        "config file: WANDB_API_KEY: {secret: env:WANDB_API_KEY}), see docs/config.md"]


def test_an_absolute_deadline_in_the_file(project):
    at = (datetime.now(UTC) + timedelta(hours=5)).replace(microsecond=0)
    path = project / "conf" / "vl.yaml"
    path.write_text(path.read_text().replace("deadline: 2h", f"deadline: {at.isoformat()}"))
    spec = spec_from(["run", "-f", str(path)])
    assert spec.limits.deadline == pytest.approx(at, abs=timedelta(seconds=1))


def test_pyproject_table_is_used_from_the_working_directory(tmp_path, vl_home, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("train.py").write_text("")
    Path("pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.vaultlayer]\ncommand = "python train.py"\n'
                                      '[tool.vaultlayer.checkpoint]\nevery = 7\n')
    spec = spec_from(["run"])
    assert spec.command[1:] == ["train.py"] and spec.checkpoint_every == "7" and spec.workdir == str(tmp_path)
    assert "vl: using [tool.vaultlayer] from ./pyproject.toml" in capsys.readouterr().err
    assert spec_from(["run", "-f", "pyproject.toml", "--checkpoint-every", "9"]).checkpoint_every == "9"

    Path("pyproject.toml").write_text('[tool.vaultlayer.checkpoint]\nevry = 7\n')
    assert refusal(["run"]) == [("vl: error: pyproject.toml: tool.vaultlayer.checkpoint.evry: unknown field "
                                       "'evry'; fix: did you mean 'every'?")]


# ---------------------------------------------------------------- vl schema and the example


def test_vl_schema_is_json_schema_and_the_documented_example_validates():
    printed = subprocess.run([sys.executable, "-m", "cli.main", "schema"], cwd=REPO, capture_output=True, text=True,
                             timeout=60, check=True).stdout
    schema = json.loads(printed)
    jsonschema.Draft202012Validator.check_schema(schema)
    example = EXAMPLE.read_text()
    jsonschema.validate(yaml.safe_load(example), schema)
    assert load_file(EXAMPLE).config.resources.pools[1].provider == "gcp"
    with pytest.raises(jsonschema.ValidationError, match="spott"):
        jsonschema.validate({"resources": {"pools": [{"market": "spott"}]}}, schema)
    with pytest.raises(jsonschema.ValidationError, match="comand"):
        jsonschema.validate({"comand": "python x.py"}, schema)
    docs = (REPO / "docs" / "config.md").read_text()
    documented = docs.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert documented == example, "docs/config.md's complete example must be examples/vl.yaml"


def test_schema_providers_are_the_registered_ones():
    assert typing.get_args(PoolConfig.model_fields["provider"].annotation) == KNOWN_PROVIDERS
    assert RunConfig.model_fields["resources"].default_factory().pools is None


# ---------------------------------------------------------------- setup commands on the host


async def test_setup_commands_run_before_the_command_and_a_failing_one_fails_the_attempt(
        temporal_env, control, tmp_path):
    client = temporal_env.client
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    good_dir.mkdir()
    bad_dir.mkdir()
    check = "import pathlib, sys; sys.exit(0 if pathlib.Path('made-by-setup').read_text() == 'ok\\n' else 5)"
    good = make_spec(tmp_path, steps=1, out=tmp_path / "unused", workdir=str(good_dir),
                     command=[sys.executable, "-c", check],
                     setup=["echo ok > made-by-setup", "test -f made-by-setup"])
    bad = make_spec(tmp_path, steps=1, out=tmp_path / "unused", workdir=str(bad_dir),
                    command=[sys.executable, "-c", "open('command-ran', 'w')"], setup=["true", "exit 7"])
    for spec in (good, bad):
        await vl_client.submit(client, spec, queue=control)
    results = (client.get_workflow_handle(spec.run_id).result() for spec in (good, bad))
    await asyncio.wait_for(asyncio.gather(*results, return_exceptions=True), 120)  # the bad run's fails

    done = await vl_client.status(client, good.run_id)
    assert done.state == RunState.SUCCEEDED, done.attempts
    failed = await vl_client.status(client, bad.run_id)
    assert failed.state == RunState.FAILED and failed.exit_code == 1  # the run's: the script never ran
    attempt = failed.attempts[-1]
    assert attempt.outcome == AttemptOutcome.FAILED and attempt.exit_code == 7
    assert attempt.reason == "setup command 'exit 7' failed with exit code 7"
    assert "vl: setup command failed with exit code 7: exit 7" in attempt.log_tail
    assert not (bad_dir / "command-ran").exists(), "the command must not run after a failed setup"


def test_the_no_progress_limit_from_the_file_and_the_flag_and_a_scheduled_reclaim_without_notice(project):
    (project / "conf" / "vl.yaml").write_text(FULL.replace("workdir: .", "workdir: ..").replace(
        "max_attempts: 4,", "max_attempts: 4, max_attempts_without_progress: 3,"))
    assert spec_from(["run", "-f", "project/conf/vl.yaml"]).limits.max_attempts_without_progress == 3
    flagged = spec_from(["run", "-f", "project/conf/vl.yaml", "--max-attempts-without-progress", "7",
                         "--reclaim-every", "9s", "--notice-seconds", "0"])
    assert flagged.limits.max_attempts_without_progress == 7 and flagged.notice_seconds == 0
    assert make_counter_spec(project, steps=1, out=project / "x").limits.max_attempts_without_progress == 10
    for bad in (["--max-attempts-without-progress", "0"], ["--notice-seconds", "-1"]):
        with pytest.raises(RunRequestError, match=bad[0]):
            spec_from(["run", "-f", "project/conf/vl.yaml", *bad])


def test_the_setup_cache_is_on_unless_the_file_or_the_flag_turns_it_off(project):
    assert spec_from(["run", "-f", "project/conf/vl.yaml"]).setup_cache is True
    assert spec_from(["run", "-f", "project/conf/vl.yaml", "--no-setup-cache"]).setup_cache is False
    (project / "conf" / "vl.yaml").write_text(FULL.replace("workdir: .", "workdir: ..") + "setup_cache: false\n")
    assert spec_from(["run", "-f", "project/conf/vl.yaml"]).setup_cache is False
