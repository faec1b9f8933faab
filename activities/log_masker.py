"""The script's output on its way into the host's log file, masked, in a process of its own.

The script writes into a pipe whose reader is this process, not the host agent: a script the agent leaves
behind (the agent killed, the script alive) keeps writing and keeps its host alive, instead of dying of a
broken pipe with the agent. The secret values to mask come over an inherited pipe, never on the command
line or in the environment. Run as `python -m activities.log_masker LOG_PATH SECRETS_FD` with the output on
stdin; it ends when every writer of that pipe has closed it.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from activities.masking import MaskedLog

READ_BYTES = 1 << 16


def main(log_path: str, secrets_fd: int) -> None:
    # A notice or a stop signalled to the host's process group is for the script: the masker must outlive it
    # to record the emergency save's output, and ends when the script's output does.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    with os.fdopen(secrets_fd, "rb") as source:
        secrets = [value.encode() for value in json.load(source)]
    masked = MaskedLog(open(log_path, "ab"), secrets)  # noqa: SIM115 - closed below, at the output's end
    try:
        while chunk := os.read(sys.stdin.fileno(), READ_BYTES):
            masked.write(chunk)
    finally:
        masked.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
