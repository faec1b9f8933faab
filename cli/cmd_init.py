"""`vl init SCRIPT`: show the lines that make a script resumable (vaultlayer/snippet.py) and add them with consent.

`vl run` offers the same for a script that does not save through VaultLayer (cli/cmd_run.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.context import UsageError, consent
from vaultlayer.snippet import NotApplicable, proposal_for, write


def add_parsers(sub: argparse._SubParsersAction) -> None:
    init = sub.add_parser("init", help="add the lines that make a training script resumable (shows the diff, asks)")
    init.add_argument("script", help="the training script (Hugging Face Trainer, Lightning or a PyTorch loop)")
    init.add_argument("--yes", action="store_true", help="write without asking (for scripts)")
    init.set_defaults(handler=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
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
