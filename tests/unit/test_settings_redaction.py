"""Secrets never reach the logs: the settings as logged mask tokens and URL passwords."""

from edge.settings import EdgeSettings
from runtime.settings import redact_urls


def test_nats_url_credentials_are_masked_in_logged_settings():
    settings = EdgeSettings(nats_url="nats://relay:s3cret@n1:4222,nats://tok3n@n2:4222,nats://n3:4222", admin_token="op")
    logged = settings.redacted()
    assert logged["nats_url"] == "nats://relay:***@n1:4222,nats://***@n2:4222,nats://n3:4222"
    assert logged["admin_token"] == "***"
    assert "s3cret" not in repr(logged) and "tok3n" not in repr(logged) and "'op'" not in repr(logged)


def test_urls_without_credentials_are_unchanged():
    assert redact_urls("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
