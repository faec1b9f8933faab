"""The `aws` provider: EC2 hosts launched by the control plane (provider.py), and what those hosts read
from AWS themselves (host.py). The offerings, prices and settings are in vaultlayer/catalog/aws.py."""

from activities.providers.aws.host import HOST, ImdsNoticeSource, read_temporal_settings
from activities.providers.aws.provider import AwsProvider

__all__ = ["HOST", "AwsProvider", "ImdsNoticeSource", "read_temporal_settings"]
