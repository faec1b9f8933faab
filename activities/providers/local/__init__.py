"""The `local` provider: a host is a `vl agent` process group on this machine (provider.py), warned of a
reclaim through a metadata directory shaped like AWS IMDS (host.py), slowed down where its zone says so
(throttle.py)."""

from activities.providers.local.host import (
    HOST,
    METADATA_DIR_VARIABLE,
    NOTICE_RELATIVE_PATH,
    MetadataDirNoticeSource,
)
from activities.providers.local.provider import LocalProvider, free_port, kill_group
from activities.providers.local.throttle import group_alive, group_members

__all__ = ["HOST", "METADATA_DIR_VARIABLE", "NOTICE_RELATIVE_PATH", "LocalProvider", "MetadataDirNoticeSource",
           "free_port", "group_alive", "group_members", "kill_group"]
