"""The `gcp` provider: Compute Engine VMs created by the control plane (provider.py), what those VMs read
from Google themselves (host.py), and how both reach Google's APIs (api.py). The machine map, prices and
settings are in vaultlayer/catalog/gcp.py."""

from activities.providers.gcp.host import HOST, GceMetadataNoticeSource, read_temporal_settings
from activities.providers.gcp.provider import GcpProvider, label_value

__all__ = ["HOST", "GceMetadataNoticeSource", "GcpProvider", "label_value", "read_temporal_settings"]
