"""`vl init SCRIPT`: show the lines that make a script resumable (vaultlayer/snippet.py) and add them with consent.

`vl run` offers the same for a script that does not save through VaultLayer and has no `--checkpoint-dir`:
on a terminal it shows the diff and asks; otherwise (CI, a pipe) it prints a one-line hint and runs the
script unchanged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from vaultlayer.snippet import NotApplicable, Proposal, propose

_INTERPRETER_OPTIONS_WITH_VALUE = {"-W", "-X", "-Q"}


def script_of(command: list[str], workdir: Path) -> Path | None:
    """The Python script a command runs (`python [options] train.py ...`, or `./train.py`), if it runs one."""
    if not command:
        return None
    if command[0].endswith(".py"):
        candidate = command[0]
    elif Path(command[0]).name.startswith("python"):
        rest = iter(command[1:])
        candidate = None
        for arg in rest:
            if arg in ("-m", "-c", "-"):
                return None
            if arg in _INTERPRETER_OPTIONS_WITH_VALUE:
                next(rest, None)
            elif not arg.startswith("-"):
                candidate = arg
                break
        if candidate is None or not candidate.endswith(".py"):
            return None
    else:
        return None
    path = workdir / candidate
    return path if path.is_file() else None


def proposal_for(path: Path) -> Proposal:
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise NotApplicable(f"cannot read {path}: {err}") from None
    return propose(source, path.name)


def write(path: Path, proposal: Proposal) -> Path:
    """The new script in place (atomically), the original kept beside it as SCRIPT.bak."""
    backup = path.with_name(path.name + ".bak")
    shutil.copy2(path, backup)
    partial = path.with_name(f".{path.name}.vl-{os.getpid()}")
    partial.write_text(proposal.source)
    shutil.copymode(path, partial)
    os.replace(partial, path)
    return backup


def consent(question: str) -> bool:
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def cmd_init(args: argparse.Namespace) -> int:
    from cli.main import UsageError

    path = Path(args.script)
    if not path.is_file():
        raise UsageError(f"{args.script!r} is not a file; give the training script, such as train.py")
    try:
        proposal = proposal_for(path)
    except NotApplicable as err:
        print(f"vl: {err}", file=sys.stderr)
        return 0 if "already saves" in str(err) else 1
    print(f"{path.name}: {proposal.framework}; these lines make it resume after a reclaim:\n")
    print(proposal.diff)
    if not args.yes and not consent(f"Add them to {path}?"):
        print("left unchanged")
        return 1
    backup = write(path, proposal)
    print(f"{path} is resumable (the original is in {backup.name}); run it with: vl run -- python {path}")
    return 0


def offer_on_run(command: list[str], workdir: Path) -> None:
    """Before `vl run` starts a script that would restart from scratch after a reclaim: ask, or hint."""
    path = script_of(command, workdir)
    if path is None:
        return
    try:
        proposal = proposal_for(path)
    except NotApplicable:
        return
    if not sys.stdin.isatty():
        print(f"vl: hint: {path.name} ({proposal.framework}) does not save through VaultLayer, so a reclaim "
              f"restarts it from the beginning; `vl init {path.name}` adds the lines that make it resume",
              file=sys.stderr)
        return
    print(f"{path.name} ({proposal.framework}) does not save through VaultLayer: a reclaim would restart it "
          "from the beginning. These lines make it resume:\n")
    print(proposal.diff)
    if consent(f"Add them to {path.name} before the run?"):
        backup = write(path, proposal)
        print(f"{path.name} updated (the original is in {backup.name})", flush=True)


def add_parser(sub: argparse._SubParsersAction) -> None:
    init = sub.add_parser("init", help="add the lines that make a training script resumable (shows the diff, asks)")
    init.add_argument("script", help="the training script (Hugging Face Trainer, Lightning or a PyTorch loop)")
    init.add_argument("--yes", action="store_true", help="write without asking (for scripts)")
    init.set_defaults(handler=cmd_init)
