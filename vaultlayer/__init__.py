"""VaultLayer: durable spot GPU training. The SDK a training script imports lives here.

Importing this package stays light (standard library only): no torch, fsspec or temporalio, so a
training environment pays nothing for it. PyTorch helpers are in `vaultlayer.pytorch`.
"""

from vaultlayer.sdk import Restored, active, resume, save, save_async, should_save, wait_for_saves

__all__ = ["Restored", "active", "resume", "save", "save_async", "should_save", "wait_for_saves"]
