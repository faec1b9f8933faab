"""How both sides of the gcp provider reach Google's APIs: the credentials or emulator endpoint a client
is built with, and the retry of rate limits and server errors. google-api-core and google-auth are
imported inside the functions."""

from __future__ import annotations

import os

from activities.providers.base import ProviderConfigError
from vaultlayer.catalog.gcp import EMULATOR_VARIABLE, default_credentials

RATE_LIMIT_REASONS = {"rateLimitExceeded", "userRateLimitExceeded"}


def client_kwargs() -> dict:
    """How a google-cloud client reaches the API: the real one with Application Default Credentials,
    or, where the emulator variable is set (tests), that endpoint with anonymous credentials."""
    emulator = os.environ.get(EMULATOR_VARIABLE)
    if emulator:
        from google.auth.credentials import AnonymousCredentials

        return {"client_options": {"api_endpoint": emulator}, "credentials": AnonymousCredentials()}
    try:
        return {"credentials": default_credentials()}
    except ValueError as err:
        raise ProviderConfigError(str(err)) from None


def error_reasons(err) -> set[str]:
    """The `reason` of each error detail of a Google API error (quotaExceeded, rateLimitExceeded...)."""
    return {item.get("reason", "") for item in getattr(err, "errors", None) or () if isinstance(item, dict)}


def is_retryable(err: Exception) -> bool:
    """Rate limits and server errors: worth another try of the same call."""
    from google.api_core import exceptions as api

    if isinstance(err, api.TooManyRequests | api.InternalServerError | api.BadGateway | api.ServiceUnavailable
                  | api.GatewayTimeout):
        return True
    return isinstance(err, api.Forbidden) and bool(error_reasons(err) & RATE_LIMIT_REASONS)


def retry_policy():
    """The retry every Google API call here passes: backoff from 1 s to 20 s, for at most 3 minutes."""
    from google.api_core.retry import Retry

    return Retry(predicate=is_retryable, initial=1.0, maximum=20.0, multiplier=2.0, timeout=180.0)
