"""`vl run -f FILE` and `vl schema`: the config file merged under the command-line flags.

Precedence, highest first: a flag given on the command line, the config file (`-f FILE`, else
`[tool.vaultlayer]` in ./pyproject.toml), the flag's default. The merge fills the same argparse namespace
the flags fill, so one path (`cli.main.build_spec`) turns both into the `RunSpec`.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from cli.main import UsageError, checkpoint_dir_option, parser, pools_from_flags, resolve_command
from vaultlayer.config import ConfigError, LoadedConfig, SecretRef, load_file, load_pyproject
from vaultlayer.models import Market, Pool
from vaultlayer.secrets import ENV_NAME, looks_secret, parse_reference

# Flags that say where pools are: any of them on the command line replaces the file's pools.
PLACE_OPTIONS = {"provider", "region", "zone"}
# Flags that say what a pool is: each overrides that field in every pool of the file.
POOL_FIELD_OPTIONS = ("gpu", "market", "price", "on_demand_price")


def given_options(argv: list[str]) -> set[str]:
    """The destinations of the `vl run` options given on the command line, as opposed to defaulted."""
    top = parser()
    # argparse has no public handle on a subcommand's parser: the subparsers action holds it.
    subcommands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    options = [action for action in subcommands.choices["run"]._actions if action.option_strings]  # noqa: SLF001
    for action in options:
        action.default = argparse.SUPPRESS  # left out of the namespace unless given
    return set(vars(top.parse_args(argv))) & {action.dest for action in options}


def apply_config(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the config file's values where no flag was given; unchanged when there is no file."""
    if args.file:
        loaded = load_file(Path(args.file))
    else:
        loaded = load_pyproject(Path.cwd())
        if loaded is not None:
            print("vl: using [tool.vaultlayer] from ./pyproject.toml (-f FILE reads another config)", file=sys.stderr)
    return args if loaded is None else merge(args, loaded, given_options(args.argv))


def merge(args: argparse.Namespace, loaded: LoadedConfig, given: set[str]) -> argparse.Namespace:
    """The flags in `given` win; the file fills the rest; relative paths in the file are relative to its folder."""
    config, folder, source = loaded.config, loaded.folder, loaded.source
    merged = argparse.Namespace(**vars(args))

    def put(dest: str, value: object) -> None:
        if value is not None and dest not in given:
            setattr(merged, dest, value)

    put("workdir", str((folder / config.workdir).resolve()) if config.workdir else str(folder))
    workdir = Path(merged.workdir)
    if not workdir.is_dir():
        raise ConfigError([f"{source}: workdir: {config.workdir!r} is not a directory (relative paths start at "
                           f"{folder}); fix: give an existing directory"])
    if not args.command and config.command:
        try:
            merged.command = resolve_command(config.command, workdir)
        except UsageError as err:
            raise ConfigError([f"{source}: command: {err}"]) from None
    on_command_line = {item.partition("=")[0] for item in [*args.env, *args.env_secret]}
    merged.env = [f"{name}={value}" for name, value in config.env.items()
                  if isinstance(value, str) and name not in on_command_line] + args.env
    merged.env_secret = [f"{name}={value.secret}" for name, value in config.env.items()
                         if isinstance(value, SecretRef) and name not in on_command_line] + args.env_secret
    put("setup", config.setup or None)

    saving = config.checkpoint
    for dest, value in (("storage", saving.storage), ("checkpoint_every", saving.every),
                        ("checkpoint_min", saving.min), ("checkpoint_max", saving.max),
                        ("keep_checkpoints", saving.keep)):
        put(dest, value)
    if saving.dir is not None and "checkpoint_dir" not in given:
        try:
            merged.checkpoint_dir = checkpoint_dir_option(saving.dir, folder)
        except UsageError as err:
            raise ConfigError([f"{source}: checkpoint.dir: {str(err).removeprefix('--checkpoint-dir ')}"]) from None

    limits = config.limits
    for dest in ("max_cost", "max_attempts", "max_reclaims", "script_retries", "total_steps", "work"):
        put(dest, getattr(limits, dest))
    if isinstance(limits.deadline, datetime):
        seconds = (limits.deadline - datetime.now(UTC)).total_seconds()
        if seconds <= 0:
            raise ConfigError([f"{source}: limits.deadline: '{limits.deadline.isoformat()}' is in the past; fix: "
                               "give a later time, or a duration from now such as 36h"])
        put("deadline", f"{seconds:.3f}s")
    else:
        put("deadline", limits.deadline)

    fallback = config.resources.on_demand_fallback
    put("on_demand_fallback", fallback)
    if config.resources.pools is not None and not PLACE_OPTIONS & given:
        update = {name: getattr(args, name) for name in POOL_FIELD_OPTIONS if name in given}
        entries = [entry.model_copy(update=update) for entry in config.resources.pools]
        merged.file_pools = file_pools(entries, merged.on_demand_fallback, source)
    return merged


def file_pools(entries: list, on_demand_fallback: bool, source: str) -> list[Pool]:
    """Each entry's pools (every zone or region of it, in order) as the pool flags make them, then, with the
    fallback, an on-demand copy of every spot pool after all of them."""
    from vaultlayer.catalog import validate_pools

    pools: list[Pool] = []
    for index, entry in enumerate(entries):
        flags = argparse.Namespace(provider=entry.provider, gpu=entry.gpu, region=entry.regions, zone=entry.zones,
                                   market=entry.market, price=entry.price, on_demand_price=entry.on_demand_price,
                                   on_demand_fallback=False)
        try:
            made = pools_from_flags(flags)
            validate_pools(made)
        except (UsageError, ValueError) as err:
            raise ConfigError([f"{source}: resources.pools[{index}]: {err}"]) from None
        pools += made
    if on_demand_fallback:
        pools += [pool.model_copy(update={"market": Market.ON_DEMAND, "price_per_hour": pool.on_demand_price_per_hour})
                  for pool in pools if pool.market == Market.SPOT]
    return pools


def secret_env(args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """NAME -> reference from --env-secret (and the file); warns about plain values that look like secrets.
    Raises ValueError: the caller reports it as bad input."""
    references = {}
    for item in args.env_secret:
        name, sep, reference = item.partition("=")
        if not sep or not ENV_NAME.fullmatch(name):
            raise ValueError(f"--env-secret {item!r}: expected NAME=REF, such as HF_TOKEN=env:HF_TOKEN")
        if name in env:
            raise ValueError(f"--env-secret {name}: {name} also has a plain value (--env or env:); fix: keep one")
        try:
            references[name] = parse_reference(reference)
        except ValueError as err:
            raise ValueError(f"--env-secret {name}: {err}") from None
    for name in env:
        if looks_secret(name):
            print(f"vl: warning: env {name} looks like a secret, and a plain value is stored in the run's history; "
                  f"pass a reference instead: --env-secret {name}=env:{name} (in a config file: "
                  f"{name}: {{secret: env:{name}}}), see docs/config.md", file=sys.stderr)
    return references
