"""The provider registry answers a host's questions from its environment alone: which notice source to
watch, where to read the Temporal settings, which secret schemes it can read. The agent asks only it."""

from __future__ import annotations

import pytest

from activities import providers
from activities.env_secrets import SecretUnavailable, resolve_secrets
from activities.notices import NoNoticeSource
from activities.providers.aws import ImdsNoticeSource
from activities.providers.base import NOTICE_SOURCE_VARIABLE, TEMPORAL_SETTINGS_VARIABLE
from activities.providers.gcp import GceMetadataNoticeSource
from activities.providers.local import METADATA_DIR_VARIABLE, MetadataDirNoticeSource


@pytest.fixture
def bare_host(monkeypatch):
    for name in (NOTICE_SOURCE_VARIABLE, METADATA_DIR_VARIABLE, TEMPORAL_SETTINGS_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(("variable", "value", "expected"), [
    (NOTICE_SOURCE_VARIABLE, "imds", ImdsNoticeSource),
    (NOTICE_SOURCE_VARIABLE, "gce-metadata", GceMetadataNoticeSource),
    (METADATA_DIR_VARIABLE, "/tmp/host/metadata", MetadataDirNoticeSource),
])
def test_each_cloud_answers_for_its_own_notice_source(bare_host, variable, value, expected):
    bare_host.setenv(variable, value)
    assert type(providers.notice_source()) is expected


def test_a_host_no_provider_set_up_has_no_notice_source_and_its_settings_in_the_environment(bare_host):
    assert type(providers.notice_source()) is NoNoticeSource
    assert providers.temporal_settings() is None


def test_an_unknown_settings_store_is_refused_naming_the_stores(bare_host):
    bare_host.setenv(TEMPORAL_SETTINGS_VARIABLE, "vault:kv/temporal")
    with pytest.raises(ValueError, match="store of secretsmanager, ssm, gcp-secret-manager"):
        providers.temporal_settings()


def test_the_cloud_secret_schemes_come_from_the_providers():
    assert set(providers.secret_readers()) == {"aws-sm", "gcp-sm"}
    with pytest.raises(SecretUnavailable, match=r"^secret env X \(vault:kv/x\): unknown scheme; fix: use env:, "
                                                r"file:, aws-sm: or gcp-sm:$"):
        resolve_secrets({"X": "vault:kv/x"})
