"""The agent-SDK contract: every file and `VL_*` variable the host agent and the training script exchange.

The one definition (docs/agent-sdk-contract.md describes it): the agent (activities/host.py,
activities/snapshots.py), the SDK (vaultlayer/sdk.py) and the checkpoint uploader (vaultlayer/checkpoint/)
name these files and variables only through this module, so a rename on one side cannot silently break
resume on the other. Standard library only: the SDK imports it in the training environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --- Environment the agent sets for the script -------------------------------------------------------------
ENV_PREFIX = "VL_"  # the agent drops every inherited variable with this prefix, then sets its own
ENV_RUN_ID = "VL_RUN_ID"
ENV_ATTEMPT = "VL_ATTEMPT"
ENV_CHECKPOINT_DIR = "VL_CHECKPOINT_DIR"  # zero-code mode: the script's own checkpoint directory
ENV_STAGING_DIR = "VL_STAGING_DIR"  # where the SDK stages saves; without it the SDK is inactive
ENV_CONTROL_DIR = "VL_CONTROL_DIR"  # notices from the agent, progress from the SDK
ENV_RESTORE_DIR = "VL_RESTORE_DIR"  # the restored checkpoint's files, when there is one
ENV_RESTORE_STEP = "VL_RESTORE_STEP"
ENV_RESTORE_WORLD_SIZE = "VL_RESTORE_WORLD_SIZE"  # how many ranks wrote the restored checkpoint (1 when absent)
ENV_CHECKPOINT_EVERY = "VL_CHECKPOINT_EVERY"  # "auto", "<n>" steps or a duration
ENV_CHECKPOINT_MIN = "VL_CHECKPOINT_MIN"  # bounds of the automatic interval
ENV_CHECKPOINT_MAX = "VL_CHECKPOINT_MAX"
ENV_MTBF_SECONDS = "VL_MTBF_SECONDS"  # the pool's expected time between reclaims, for the automatic interval
# Test-only, read by the agent, never set for the script: the directory of vaultlayer/failpoints.py's pause files.
ENV_FAILPOINTS = "VL_FAILPOINTS"
# The shortest life of a host of this run that was lost before its first save: the first save comes earlier.
ENV_SHORTEST_HOST_LIFE = "VL_SHORTEST_HOST_LIFE"
ENV_HOST_SINCE = "VL_HOST_SINCE"  # when this host was handed over (epoch seconds): the early first save counts from it
# A gang (`vl run --nodes N`): this host's place in it and where its peers are, for torchrun's static rendezvous.
# Set on every host of a multi-node run only. The command may name them as `$VL_NODE_RANK` (the agent expands them).
ENV_NODE_RANK = "VL_NODE_RANK"  # 0 .. N-1
ENV_NUM_NODES = "VL_NUM_NODES"
ENV_NODE_ADDRS = "VL_NODE_ADDRS"  # every host's private address, comma-separated, in node-rank order
ENV_MASTER_ADDR = "VL_MASTER_ADDR"  # node 0's address
ENV_MASTER_PORT = "VL_MASTER_PORT"  # the rendezvous port on node 0
GANG_VARIABLES = (ENV_NODE_RANK, ENV_NUM_NODES, ENV_NODE_ADDRS, ENV_MASTER_ADDR, ENV_MASTER_PORT)

# --- Files ---------------------------------------------------------------------------------------------------
SAVE_RECORD = "vl-save.json"  # in a staged save, written last before the commit rename; never uploaded
# A save written by many ranks (torchrun) holds, beside their files, one part record per rank written when that rank's
# files are complete, and the claim of the rank that commits the save. Like the save record, never uploaded.
SAVE_BOOKKEEPING_PREFIX = "vl-save"
PART_RECORD_PREFIX = "vl-save.rank-"
COMMIT_CLAIM = "vl-save.commit"
STAGING_PREFIX = ".tmp-"  # a staged save being written; renamed without it when complete
PROGRESS_FILE = "progress.json"  # in the control directory, written by the SDK
NOTICE_FILE = "notice.json"  # in the control directory, written by the agent
SETUP_FAILED_FILE = "setup-failed"  # in the control directory: why the run's setup commands failed
SETUP_DONE_FILE = "setup-done"  # in the control directory: written when every setup command succeeded

# --- Handed over by the submitter to a local host (never through Temporal) ---------------------------------------
# The values of a run's `env:` secrets, read from the environment of the `vl run` (or client) that submitted it:
# VL_HOME/secrets/<run_id>.json, mode 0600, deleted when the run ends. The local provider names the file to its
# host agent in this variable (dropped from the script's environment with every other VL_* one).
ENV_HANDED_OVER = "VL_HANDED_OVER_ENV"
HANDED_OVER_DIR = "secrets"


def handed_over_path(vl_home: Path, run_id: str) -> Path:
    return vl_home / HANDED_OVER_DIR / f"{run_id}.json"


@dataclass(frozen=True)
class ScriptEnv:
    """The `VL_*` variables of one attempt, as the agent sets them for the script."""

    run_id: str
    attempt: int
    checkpoint_dir: str | None = None  # zero-code mode: only the run, the attempt and this are set
    staging_dir: Path | None = None
    control_dir: Path | None = None
    restore_dir: Path | None = None  # with restore_step, when there is a checkpoint to resume from
    restore_step: int | None = None
    restore_world_size: int = 1
    checkpoint_every: str = "auto"
    checkpoint_min: str = "60s"
    checkpoint_max: str = "30m"
    mtbf_seconds: float | None = None
    shortest_host_life_seconds: float | None = None
    host_since: float | None = None

    def to_environ(self) -> dict[str, str]:
        env = {ENV_RUN_ID: self.run_id, ENV_ATTEMPT: str(self.attempt)}
        if self.checkpoint_dir:
            return env | {ENV_CHECKPOINT_DIR: self.checkpoint_dir}
        env |= {ENV_STAGING_DIR: str(self.staging_dir), ENV_CONTROL_DIR: str(self.control_dir)}
        if self.restore_dir is not None:
            env |= {ENV_RESTORE_DIR: str(self.restore_dir), ENV_RESTORE_STEP: str(self.restore_step),
                    ENV_RESTORE_WORLD_SIZE: str(self.restore_world_size)}
        env |= {ENV_CHECKPOINT_EVERY: self.checkpoint_every, ENV_CHECKPOINT_MIN: self.checkpoint_min,
                ENV_CHECKPOINT_MAX: self.checkpoint_max}
        if self.mtbf_seconds:
            env[ENV_MTBF_SECONDS] = str(self.mtbf_seconds)
        if self.shortest_host_life_seconds is not None:
            env[ENV_SHORTEST_HOST_LIFE] = str(self.shortest_host_life_seconds)
        if self.host_since is not None:
            env[ENV_HOST_SINCE] = str(self.host_since)
        return env


def gang_environ(node_rank: int, addresses: list[str], master_port: int) -> dict[str, str]:
    """The gang variables of one host of a multi-node run."""
    return {ENV_NODE_RANK: str(node_rank), ENV_NUM_NODES: str(len(addresses)), ENV_NODE_ADDRS: ",".join(addresses),
            ENV_MASTER_ADDR: addresses[0], ENV_MASTER_PORT: str(master_port)}


def expand_gang_variables(argv: list[str], gang: Mapping[str, str]) -> list[str]:
    """The command with `$VL_NODE_RANK` and `${VL_NODE_RANK}` (and the other gang variables) replaced by their
    values: the command runs without a shell, and it was written before anyone knew the hosts. Nothing else is
    expanded, so an argument that means a literal `$` elsewhere stays as it is."""
    expanded = []
    for arg in argv:
        for name in sorted(GANG_VARIABLES, key=len, reverse=True):  # VL_NODE_ADDRS before a shorter prefix
            if name in gang:
                arg = arg.replace("${" + name + "}", gang[name]).replace("$" + name, gang[name])
        expanded.append(arg)
    return expanded


def without_contract_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` less every `VL_*` variable: an inherited one must not pose as this attempt's."""
    return {name: value for name, value in environ.items() if not name.startswith(ENV_PREFIX)}


# --- Staged saves --------------------------------------------------------------------------------------------
def staging_name(step: int, nonce: str) -> str:
    """The directory a save at `step` is written into."""
    return f"{STAGING_PREFIX}{step}-{nonce}"


def committed_name(step: int, nonce: str) -> str:
    """The directory a complete save at `step` is renamed to (an atomic commit)."""
    return f"{step:012d}-{nonce}"


def is_being_written(name: str) -> bool:
    return name.startswith(STAGING_PREFIX)


def is_save_bookkeeping(name: str) -> bool:
    """A top-level file of a staged save that is the SDK's, not the checkpoint's: never uploaded."""
    return name.startswith(SAVE_BOOKKEEPING_PREFIX)


def part_record_name(rank: int) -> str:
    return f"{PART_RECORD_PREFIX}{rank:05d}.json"


@dataclass(frozen=True)
class SaveRecord:
    """`vl-save.json`: what a staged save is. `files` (path -> size, mtime_ns, blake3) are the digests the
    writer took, which the uploader uses for a file that has not changed since. `world_size`: how many ranks
    wrote it (each its own files, in the one directory)."""

    step: int
    emergency: bool = False
    notice_id: str | None = None
    created_at: float | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    world_size: int = 1


def write_save_record(directory: Path, record: SaveRecord) -> None:
    (directory / SAVE_RECORD).write_text(json.dumps(asdict(record)))


def read_save_record(directory: Path) -> SaveRecord:
    """The save's record; raises OSError, ValueError, KeyError or TypeError when it is missing or malformed."""
    return _save_record(json.loads((directory / SAVE_RECORD).read_text()))


def _save_record(data: dict[str, Any]) -> SaveRecord:
    return SaveRecord(step=int(data["step"]), emergency=bool(data.get("emergency")), notice_id=data.get("notice_id"),
                      created_at=data.get("created_at"), files=data.get("files") or {},
                      world_size=int(data.get("world_size") or 1))


def write_part_record(directory: Path, rank: int, record: SaveRecord) -> None:
    """One rank's part of a save is complete. Written then renamed: a part record is never half there."""
    partial = directory / f"{part_record_name(rank)}.tmp"
    partial.write_text(json.dumps(asdict(record)))
    partial.replace(directory / part_record_name(rank))


def read_part_record(directory: Path, rank: int) -> SaveRecord:
    return _save_record(json.loads((directory / part_record_name(rank)).read_text()))


# --- Progress (SDK -> agent) ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """`progress.json`: the script's step, and the SDK's checkpoint interval and why."""

    step: int
    time: float
    save_blocked_seconds: float | None = None
    interval_seconds: float | None = None
    interval_reason: str = ""
    saves_coalesced: int = 0


def write_progress(control_dir: Path, progress: Progress, partial_name: str) -> None:
    """Write then rename, so the agent never reads half a file. `partial_name` must be unique to the writer."""
    partial = control_dir / partial_name
    partial.write_text(json.dumps(asdict(progress)))
    os.replace(partial, control_dir / PROGRESS_FILE)


def read_progress(control_dir: Path) -> Progress | None:
    """The script's last progress; None before the first, or when the file is unreadable."""
    try:
        data = json.loads((control_dir / PROGRESS_FILE).read_text())
        return Progress(step=int(data["step"]), time=float(data.get("time") or 0.0),
                        save_blocked_seconds=data.get("save_blocked_seconds"),
                        interval_seconds=data.get("interval_seconds"),
                        interval_reason=data.get("interval_reason") or "",
                        saves_coalesced=int(data.get("saves_coalesced") or 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# --- Notices (agent -> SDK) ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoticeDocument:
    """`notice.json`: a reclaim notice, by id; the SDK saves once per id."""

    id: str
    deadline: float  # epoch seconds
    kind: str = ""


def notice_path(control_dir: Path) -> Path:
    return control_dir / NOTICE_FILE


def write_notice(control_dir: Path, notice: NoticeDocument) -> None:
    """Write then rename, so the SDK never reads half a notice."""
    partial = control_dir / f"{NOTICE_FILE}.tmp"
    partial.write_text(json.dumps(asdict(notice)))
    partial.replace(notice_path(control_dir))


def read_notice(control_dir: Path) -> NoticeDocument | None:
    """The pending notice; None when there is none or it is not completely written."""
    try:
        data = json.loads(notice_path(control_dir).read_text())
        return NoticeDocument(id=str(data["id"]), deadline=float(data["deadline"]), kind=str(data.get("kind") or ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None
