"""VaultLayer: durable spot GPU training. The SDK a training script imports lives here.

Importing this package stays light (standard library only): no torch, fsspec or temporalio, so a
training environment pays nothing for it. PyTorch helpers are in `vaultlayer.pytorch`. The client for
notebooks (`vaultlayer.submit`, `Client`, `Run`, ...; vaultlayer/runs.py) is imported on first use.
"""

from vaultlayer.sdk import Restored, active, resume, save, save_async, should_save, wait_for_saves

_CLIENT_NAMES = ("AsyncClient", "AsyncRun", "Client", "ClientError", "Run", "RunNotFound", "get_run", "list_runs",
                 "run_spec", "submit")
_REQUEST_NAMES = ("PoolRequest", "RunRequest", "RunRequestError", "build_spec")

__all__ = ["Restored", "active", "resume", "save", "save_async", "should_save", "wait_for_saves", *_CLIENT_NAMES,
           *_REQUEST_NAMES]


def __getattr__(name: str) -> object:
    """The client's and the run request's names, imported only when asked for: the SDK alone must not pull in
    temporalio."""
    if name in _CLIENT_NAMES:
        from vaultlayer import runs

        return getattr(runs, name)
    if name in _REQUEST_NAMES:
        from vaultlayer import request

        return getattr(request, name)
    raise AttributeError(f"module 'vaultlayer' has no attribute {name!r}")
