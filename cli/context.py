"""What every `vl` command shares: bad input and its exit codes, errors said on one line (`vl --verbose` adds
the traceback behind them), asking a person, and the connection to Temporal (the configured cluster, or the
embedded server `vl` starts).

Exit codes of `vl run`: 0 the script succeeded; the script's own exit code when it failed (1 when the run
failed for another reason, such as a limit); 2 bad input (nothing was provisioned); 3 the run was cancelled;
130 detached with Ctrl-C (the run goes on).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import traceback
from typing import NoReturn

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3
EXIT_DETACHED = 130

_verbose = False


class UsageError(Exception):
    """Bad input: reported on one line, before anything is provisioned."""


def set_verbose(verbose: bool) -> None:
    global _verbose
    _verbose = verbose


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print_traceback()
    print(f"vl: error: {message}", file=sys.stderr)
    exit_now(code)


def warn(message: str) -> None:
    print(f"vl: warning: {message}", file=sys.stderr)


def print_traceback() -> None:
    """With --verbose, the traceback of the error being handled (if any), before its one-line message."""
    if _verbose and sys.exc_info()[1] is not None:
        traceback.print_exc()


def connect_failure(address: str, err: RuntimeError) -> str:
    """`Client.connect`'s error, which wraps the transport's, as one line."""
    reason = re.search(r'message: "([^"]+)"', str(err))
    return (f"cannot reach the Temporal server at {address} ({reason.group(1) if reason else err}); start it, fix "
            f"TEMPORAL_ADDRESS, or unset TEMPORAL_ADDRESS to use the embedded server")


def expected_message(err: BaseException) -> str | None:
    """One line for a server's refusal a person can act on; None for anything else, which is a bug and keeps
    its traceback."""
    from temporalio.service import RPCError, RPCStatusCode

    from vaultlayer.codec import EncryptionKeyError

    if isinstance(err, EncryptionKeyError):  # a run sealed with a key this shell lacks: the message names it
        return str(err)
    if not isinstance(err, RPCError):
        return None
    if err.status == RPCStatusCode.NOT_FOUND:
        return f"not found: {err.message}; list runs with: vl ls"
    if err.status == RPCStatusCode.UNAVAILABLE:
        return f"the Temporal server is unavailable ({err.message}); check that it runs, then try again"
    return f"the Temporal server refused the call: {err.message} ({err.status.name})"


def exit_now(code: int) -> NoReturn:
    """Exit with the output flushed but without the interpreter's finalization, where the Temporal client's
    Rust threads abort it now and then ("Fatal Python error: PyGILState_Release", exit 134 after a
    command that worked: temporalio/sdk-python#300). Everything `vl` awaited has finished by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def consent(question: str) -> bool:
    """A person's yes; no when nobody answers (end of input)."""
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


# ---------------------------------------------------------------- connection


class Connection:
    def __init__(self, client, ui_url: str | None) -> None:
        self.client = client
        self.ui_url = ui_url

    def run_link(self, run_id: str) -> str | None:
        from vaultlayer.ui import run_link

        return run_link(self.ui_url, self.client.namespace, run_id) if self.ui_url else None


async def connect() -> Connection:
    from vaultlayer import client as vl_client
    from vaultlayer.codec import EncryptionKeyError, load_keys

    try:
        load_keys()  # a malformed key setting is bad input: say so before anything starts
    except EncryptionKeyError as err:
        raise UsageError(str(err)) from None
    address = vl_client.configured_address()
    if address:
        try:
            client = await vl_client.connect()
        except RuntimeError as err:
            fail(connect_failure(address, err), code=1)
        return Connection(client, os.environ.get("VL_UI_URL"))
    from worker.local_server import EmbeddedError, ensure_embedded

    try:
        embedded = await asyncio.to_thread(ensure_embedded)
    except EmbeddedError as err:
        fail(str(err), code=1)
    for what in embedded.started:
        print(f"started {what} (vl down stops it)", file=sys.stderr)
    return Connection(await vl_client.connect(embedded.address), embedded.ui_url)
