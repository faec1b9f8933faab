"""The run config file: `vl run -f vl.yaml`, or `[tool.vaultlayer]` in ./pyproject.toml.

One pydantic schema (`RunConfig`, published by `vl schema`) describes a run: command, workdir, env (plain
values and secret references), setup commands, candidate pools, checkpointing and limits. Unknown fields
are refused with the nearest field name, and every problem becomes one line that names the field, the
bad value and the fix (`ConfigError.problems`), before anything is provisioned. Fields left out mean
"not set here": `LoadedConfig.request` turns the file into a `RunRequest` (vaultlayer/request.py) with the
flags given on the command line over it, and the request's defaults fill the rest.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import tomllib
import typing
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from vaultlayer import checkpoint
from vaultlayer.durations import parse_duration, parse_interval
from vaultlayer.request import (
    PLACE_FIELDS,
    PoolRequest,
    RunRequest,
    RunRequestError,
    checkpoint_directory,
    resolve_command,
)
from vaultlayer.secrets import ENV_NAME, REFERENCE_FORMS, parse_reference

DURATION_FIX = "write a number with a unit, such as '30s', '5m' or '2h'"


class ConfigError(RunRequestError):
    """A config file that cannot be used: one line per problem."""


class ConfigModel(BaseModel):
    """Unknown fields are errors, so that a typo is reported instead of silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: `true` is not the number 1


def _duration(value: object) -> str:
    try:
        parse_duration(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a duration; fix: {DURATION_FIX}") from None
    return str(value)


Duration = Annotated[str, BeforeValidator(_duration)]


class SecretRef(ConfigModel):
    """An env value read on the host when an attempt starts; only this reference crosses Temporal."""

    secret: str = Field(description=f"where the value is: {REFERENCE_FORMS}")


class PoolConfig(ConfigModel):
    """Candidate capacity: one provider, its regions or zones (in order), a GPU class and count, a market."""

    provider: Literal["local", "aws", "gcp"] = "local"  # vaultlayer.catalog.KNOWN_PROVIDERS; a test keeps them equal
    regions: list[str] = Field(default_factory=list, description="allowed regions, in order of preference")
    zones: list[str] = Field(default_factory=list, description="allowed zones, in order of preference")
    gpu: str | None = Field(None, description="GPU class and count, such as A10G:1 (cloud providers)")
    market: Literal["spot", "on-demand"] = "spot"
    price: float | None = Field(None, ge=0, description="USD per hour of a host (overrides the price list)")
    on_demand_price: float | None = Field(None, ge=0, description="USD per hour of the same capacity on demand")
    speed: float | None = Field(None, gt=0, description="one host's training speed relative to one V100 (default: "
                                "the GPU class's, vaultlayer/catalog/throughput.py); measured speed replaces it")

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+(:[1-9][0-9]*)?", value):
            raise ValueError(f"{value!r} is not a GPU; fix: write CLASS or CLASS:COUNT, such as A10G:1 or L4:2")
        return value


class Resources(ConfigModel):
    pools: list[PoolConfig] | None = Field(None, min_length=1, description="candidate pools, in order of "
                                           "preference (default: one local pool)")
    on_demand_fallback: bool | None = Field(None, description="add an on-demand pool after each spot pool, "
                                            "used only when spot cannot meet the deadline")
    nodes: int | None = Field(None, ge=1, description="hosts per attempt, placed, started and moved together "
                              "as one gang (torchrun --nnodes); default 1")


class CheckpointConfig(ConfigModel):
    storage: str | None = Field(None, description="fsspec URL: file:///abs/path, s3://bucket/prefix, "
                                "gs://bucket/prefix (default: file://$VL_HOME/storage)")
    every: str | int | None = Field(None, description="steps (50) or a duration (10m); default: Young/Daly")
    min: Duration | None = Field(None, description="shortest automatic interval (default 60s)")
    max: Duration | None = Field(None, description="longest automatic interval (default 30m)")
    dir: str | None = Field(None, description="zero-code mode: the directory the script keeps its own "
                            "checkpoints in (relative to this file)")
    keep: int | None = Field(None, ge=1, description="complete checkpoints kept (default 3)")

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                checkpoint.validate_storage_url(value)
            except ValueError as err:
                raise ValueError(str(err).replace("; ", "; fix: ", 1)) from None
        return value

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, value: object) -> object:
        if value is None:
            return value
        try:
            if isinstance(value, bool):
                raise ValueError
            parse_interval(str(value))
        except ValueError:
            raise ValueError(f"{value!r} is neither a number of steps nor a duration; fix: write a positive "
                             f"number of steps such as 50, or {DURATION_FIX}") from None
        return str(value)


class CodeConfig(ConfigModel):
    ship: bool = Field(True, description="pack the workdir at submit and run every attempt in that snapshot; "
                       "false: the command runs in workdir as each host has it (an image with the code)")
    max_size: str | None = Field(None, description="refuse a workdir bigger than this, such as 500MB "
                                 "(default 100MB)")
    allow_secret_files: list[str] = Field(default_factory=list, description="workdir files shipped although "
                                          "their names look like secrets (.env, *.pem, ...)")


class LimitsConfig(ConfigModel):
    max_cost: float | None = Field(None, gt=0, description="stop once the run has cost this much, USD")
    deadline: str | datetime | None = Field(None, description="a duration from submission (36h) or a time "
                                            "with its zone (2026-12-01T18:00:00Z)")
    max_attempts: int | None = Field(None, ge=0, description="stop after this many attempts")
    max_reclaims: int | None = Field(None, ge=0, description="stop after this many reclaims (default 200)")
    max_attempts_without_progress: int | None = Field(
        None, gt=0, description="stop after this many attempts in a row store no checkpoint (default 10)")
    script_retries: int | None = Field(None, ge=0, description="retries when the script itself fails")
    total_steps: int | None = Field(None, gt=0, description="the step the script finishes at")
    work: Duration | None = Field(None, description="how long the run takes uninterrupted, such as 24h")

    @field_validator("deadline", mode="before")
    @classmethod
    def _deadline(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                parse_duration(value)
                return value
            except ValueError:
                try:
                    value = datetime.fromisoformat(value)
                except ValueError:
                    raise ValueError(f"{value!r} is neither a duration nor a time; fix: {DURATION_FIX}, or a time "
                                     "such as 2026-12-01T18:00:00Z") from None
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError(f"'{value.isoformat()}' has no time zone; fix: add one, such as "
                             f"{value.isoformat()}Z for UTC")
        return value


def _env_value(value: object, info: ValidationInfo) -> object:
    """A plain value (numbers become text) or `{secret: REF}`; anything else says how to write it. A relative
    `file:` path is relative to the config file's folder."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{value!r} is not text; fix: quote the value, such as \"true\", or give "
                         "{secret: REF}")
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        if set(value) != {"secret"}:
            raise ValueError(f"{value!r} is not a secret reference; fix: write {{secret: REF}} with REF one of "
                             f"{REFERENCE_FORMS}")
        return SecretRef(secret=parse_reference(value["secret"], (info.context or {}).get("folder")))
    return value


EnvValue = Annotated[str | SecretRef, BeforeValidator(_env_value, json_schema_input_type=str | int | float | SecretRef)]


class RunConfig(ConfigModel):
    """A run, as `vl run -f FILE` reads it. Flags given on the command line override these values."""

    command: str | list[str] | None = Field(None, description="the command, as one string (split like a shell "
                                            "does) or a list; the command after `--` overrides it")
    workdir: str | None = Field(None, description="the code that travels with the run; the command runs in its "
                                "snapshot (default: this file's folder)")
    code: CodeConfig = Field(default_factory=CodeConfig)
    outputs: str | None = Field(None, description="a folder of the workdir the script writes its results to: "
                                "stored when it succeeds, fetched with `vl pull`")
    env: dict[str, EnvValue] = Field(default_factory=dict, description="extra environment: a value, or "
                                     "{secret: REF} read on the host when an attempt starts")
    setup: list[str] = Field(default_factory=list, description="shell commands run on the host, in order, "
                             "before the command in every attempt; one that fails fails the attempt")
    setup_cache: bool = Field(True, description="store what setup leaves in pip's and uv's caches once, and "
                              "restore it on every later host; false: setup uses the host's own caches")
    resources: Resources = Field(default_factory=Resources)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = shlex.split(value)
            except ValueError as err:
                raise ValueError(f"{value!r} cannot be split into words ({err}); fix: close the quote") from None
        if isinstance(value, list) and value and all(isinstance(word, str) for word in value):
            return value
        raise ValueError(f"{value!r} is not a command; fix: write it as a string, such as "
                         "'python train.py --steps 100', or a list of words")

    @field_validator("env", mode="before")
    @classmethod
    def _env_names(cls, value: object) -> object:
        for name in value if isinstance(value, dict) else ():
            if not ENV_NAME.fullmatch(str(name)):
                raise ValueError(f"{name!r} is not an environment variable name; fix: use letters, digits "
                                 "and _, not starting with a digit")
            if str(name).startswith("VL_"):
                raise ValueError(f"{name!r}: names starting with VL_ are vaultlayer's own; fix: rename it")
        return value


# ---------------------------------------------------------------- loading


class LoadedConfig(BaseModel):
    """A validated config and where it came from: relative paths in it resolve against `folder`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: RunConfig
    source: str  # as the user named it, for messages
    folder: Path

    def request(self, given: RunRequest | None = None) -> RunRequest:
        """The run this file describes, with the fields set on `given` (the flags given on the command line)
        over it, field by field; relative paths in the file start at its folder. A pool given with a place
        (provider, regions, zones) replaces the file's pools; one given without a place overrides the fields
        it sets (gpu, market, prices) in every pool of the file. Raises ConfigError naming the file's field."""
        given = given or RunRequest()
        chosen = given.model_fields_set
        config, folder, source = self.config, self.folder, self.source
        saving, limits = config.checkpoint, config.limits
        from_file: dict[str, object] = {
            "setup": config.setup or None, "setup_cache": None if config.setup_cache else False,
            "storage": saving.storage, "checkpoint_every": saving.every,
            "checkpoint_min": saving.min, "checkpoint_max": saving.max, "keep_checkpoints": saving.keep,
            "max_cost": limits.max_cost, "max_attempts": limits.max_attempts, "max_reclaims": limits.max_reclaims,
            "max_attempts_without_progress": limits.max_attempts_without_progress,
            "script_retries": limits.script_retries, "total_steps": limits.total_steps, "work": limits.work,
            "deadline": self._deadline(), "on_demand_fallback": config.resources.on_demand_fallback,
            "nodes": config.resources.nodes,
            "output_dir": config.outputs, "code": None if config.code.ship else False,
            "workdir_max_size": config.code.max_size, "allow_secret_files": config.code.allow_secret_files or None}
        values = {name: value for name, value in from_file.items() if value is not None and name not in chosen}
        values |= {name: getattr(given, name) for name in chosen}

        if given.workdir:
            workdir = Path(given.workdir).resolve()
        else:
            workdir = (folder / config.workdir).resolve() if config.workdir else folder
            if not workdir.is_dir():
                raise ConfigError([f"{source}: workdir: {config.workdir!r} is not a directory (relative paths "
                                   f"start at {folder}); fix: give an existing directory"])
            values["workdir"] = str(workdir)
        if not given.command and config.command:
            try:
                values["command"] = resolve_command(config.command, workdir)
            except RunRequestError as err:
                raise ConfigError([f"{source}: command: {err}"]) from None
        if saving.dir is not None and "checkpoint_dir" not in chosen:
            try:
                values["checkpoint_dir"] = checkpoint_directory(saving.dir, folder)
            except RunRequestError as err:
                raise ConfigError([f"{source}: checkpoint.dir: {str(err).removeprefix('--checkpoint-dir ')}"]) \
                    from None
        on_command_line = {*given.env, *given.env_secrets}
        values["env"] = {name: value for name, value in config.env.items()
                         if isinstance(value, str) and name not in on_command_line} | given.env
        values["env_secrets"] = {name: value.secret for name, value in config.env.items()
                                 if isinstance(value, SecretRef) and name not in on_command_line} | given.env_secrets
        values["pools"] = self._pools(given.pools)
        return RunRequest(**values)

    def _deadline(self) -> str | datetime | None:
        deadline = self.config.limits.deadline
        if isinstance(deadline, datetime) and deadline <= datetime.now(UTC):
            raise ConfigError([f"{self.source}: limits.deadline: '{deadline.isoformat()}' is in the past; fix: "
                               "give a later time, or a duration from now such as 36h"])
        return deadline

    def _pools(self, given: list[PoolRequest] | None) -> list[PoolRequest] | None:
        entries = self.config.resources.pools
        if entries is None or (given is not None and (len(given) > 1 or PLACE_FIELDS & given[0].model_fields_set)):
            return given
        update = {name: getattr(given[0], name) for name in given[0].model_fields_set} if given else {}
        return [PoolRequest(provider=entry.provider, regions=entry.regions, zones=entry.zones, gpu=entry.gpu,
                            market=entry.market, price=entry.price, on_demand_price=entry.on_demand_price,
                            speed=entry.speed, where=f"{self.source}: resources.pools[{index}]").model_copy(update=update)
                for index, entry in enumerate(entries)]


def load_file(path: str | os.PathLike) -> LoadedConfig:
    """A YAML file, or a pyproject.toml's `[tool.vaultlayer]` table when the name ends in .toml."""
    source, path = str(path), Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"{source}: no such file; fix: check the path given to -f"]) from None
    except OSError as err:
        raise ConfigError([f"{source}: cannot be read ({err.strerror}); fix: check the path given to -f"]) from None
    if path.suffix == ".toml":
        data = _toml_table(text, source)
        if data is None:
            raise ConfigError([f"{source}: has no [tool.vaultlayer] table; fix: add one, or give a YAML file"])
        return load_mapping(data, source, path.resolve().parent, prefix="tool.vaultlayer")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join((getattr(err, "problem", None) or str(err)).split())  # one line (fuzzing found two)
        raise ConfigError([f"{source}: {where}{problem}; fix: correct the YAML syntax there"]) from None
    return load_mapping({} if data is None else data, source, path.resolve().parent)


def load_pyproject(folder: Path) -> LoadedConfig | None:
    """`[tool.vaultlayer]` of the folder's pyproject.toml, or None when there is none."""
    path = folder / "pyproject.toml"
    if not path.is_file():
        return None
    data = _toml_table(path.read_text(), "pyproject.toml")
    return None if data is None else load_mapping(data, "pyproject.toml", folder.resolve(), prefix="tool.vaultlayer")


def _toml_table(text: str, source: str) -> object:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{source}: {err}; fix: correct the TOML syntax there"]) from None
    return document.get("tool", {}).get("vaultlayer")


def load_mapping(data: object, source: str, folder: Path, prefix: str = "") -> LoadedConfig:
    """A config given as data (the file's shape); `source` names it in messages, `folder` anchors its paths."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: {prefix + ': ' if prefix else ''}expected a mapping of fields such as "
                           f"command, env, resources; got {type(data).__name__}; fix: see docs/config.md"])
    try:
        config = RunConfig.model_validate(data, context={"folder": folder})
    except ValidationError as err:
        raise ConfigError([f"{source}: {location((prefix, *e['loc']) if prefix else e['loc'])}: {problem(e)}"
                           for e in err.errors()]) from None
    return LoadedConfig(config=config, source=source, folder=folder)


# ---------------------------------------------------------------- messages


def location(loc: tuple) -> str:
    """('resources', 'pools', 1, 'market') -> 'resources.pools[1].market'."""
    text = ""
    for part in loc:
        name = str(part).encode("unicode_escape").decode()  # a key holding a newline stays on one line
        text += f"[{part}]" if isinstance(part, int) else (f".{name}" if text else name)
    return text


def problem(error: dict) -> str:
    """The bad value and the fix, for one pydantic error."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "value_error":
        return str(ctx["error"])
    if kind == "missing":
        return "is required; fix: add it"
    if kind == "extra_forbidden":
        return f"unknown field {error['loc'][-1]!r}; fix: {_suggestion(error['loc'])}"
    if kind in ("literal_error", "enum"):
        choices = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        return f"{value!r} is not one of {', '.join(choices)}; fix: use one of them"
    if kind in ("greater_than", "greater_than_equal"):
        bound = ctx.get("gt", ctx.get("ge"))
        words = "more than" if kind == "greater_than" else "at least"
        return f"{value!r} is too small; fix: give a number {words} {bound:g}"
    if kind.startswith("int_"):
        return f"{value!r} is not a whole number; fix: write one, such as 3"
    if kind.startswith("float_"):
        return f"{value!r} is not a number; fix: write one, such as 40"
    if kind.startswith("bool_"):
        return f"{value!r} is not true or false; fix: write true or false"
    if kind in ("string_type", "str_type"):
        return f"{value!r} is not text; fix: write it as a string (quote it)"
    if kind in ("list_type", "tuple_type"):
        return f"{value!r} is not a list; fix: write a list, such as [a, b]"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"{value!r} is not a mapping; fix: write its fields below it (see docs/config.md)"
    if kind == "too_short":
        return f"{value!r} is empty; fix: give at least one, or leave the field out"
    return f"{error['msg']} (got {value!r}); fix: see docs/config.md"


def _suggestion(loc: tuple) -> str:
    """The nearest field name at the unknown field's place, or the fields there are."""
    model: type[BaseModel] | None = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    if model is None:
        return "remove it"
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"remove it (fields here: {', '.join(names)})"


def _model_in(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def json_schema() -> dict:
    """What `vl schema` prints: the JSON Schema of a config file, for editors and CI checks."""
    schema = RunConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "VaultLayer run config (vl run -f FILE)"
    return schema
