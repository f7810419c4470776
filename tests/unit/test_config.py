from __future__ import annotations

import pytest

from gateway.config import Settings
from gateway.errors import ConfigError

TOKEN = {"GATEWAY_TWILIO_AUTH_TOKEN": "t" * 32}


def test_defaults_run_on_the_embedded_store() -> None:
    settings = Settings.from_env(TOKEN)
    assert settings.database_url.startswith("sqlite:///")
    assert settings.voice.ring_timeout_s == 15 and settings.delivery.backoff_max_s == 30


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "GATEWAY_TWILIO_AUTH_TOKEN"),
        ({**TOKEN, "GATEWAY_PUBLIC_URL": "gateway.example.com"}, "GATEWAY_PUBLIC_URL"),
        ({**TOKEN, "GATEWAY_PUBLIC_URL": "https://gw.example.com/#rc=2"}, "GATEWAY_PUBLIC_URL"),
        ({**TOKEN, "GATEWAY_RING_TIMEOUT_S": "2"}, "GATEWAY_RING_TIMEOUT_S"),
        ({**TOKEN, "GATEWAY_DIAL_ATTEMPTS": "two"}, "GATEWAY_DIAL_ATTEMPTS"),
        ({**TOKEN, "GATEWAY_DELIVERY_BACKOFF_MAX_S": "nan"}, "GATEWAY_DELIVERY_BACKOFF_MAX_S"),
        ({**TOKEN, "GATEWAY_VOICE_NUMBER": "12345"}, "GATEWAY_VOICE_NUMBER"),
        ({**TOKEN, "GATEWAY_IVR_NUMBERS": "+4420794609991234"}, "GATEWAY_IVR_NUMBERS"),
        ({**TOKEN, "GATEWAY_AGENT_API_TOKENS": "a" * 20 + ":admin"}, "GATEWAY_AGENT_API_TOKENS"),
        ({**TOKEN, "GATEWAY_ROADSIDE_FREE_MARKETS": "UK"}, "GATEWAY_ROADSIDE_FREE_MARKETS"),
        ({**TOKEN, "GATEWAY_PIN_SCRYPT_N": "1000"}, "GATEWAY_PIN_SCRYPT_N"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


def test_short_api_tokens_are_refused() -> None:
    with pytest.raises(ConfigError, match="16 characters"):
        Settings.from_env({**TOKEN, "GATEWAY_VEHICLE_API_TOKENS": "short"})


def test_agent_tokens_carry_roles() -> None:
    settings = Settings.from_env({**TOKEN, "GATEWAY_AGENT_API_TOKENS":
                                  "a" * 20 + ":read+dispatch," + "b" * 20})
    assert settings.agent_api_tokens["a" * 20] == {"read", "dispatch"}
    assert settings.agent_api_tokens["b" * 20] == {"read"}
