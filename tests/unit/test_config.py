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
        ({**TOKEN, "GATEWAY_EMERGENCY_CALLER_IDS": "+4420794"}, "GATEWAY_EMERGENCY_CALLER_IDS"),
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


# -- emergency caller IDs -----------------------------------------------------------------


def test_no_emergency_caller_ids_by_default() -> None:
    assert dict(Settings.from_env(TOKEN).emergency_caller_ids) == {}


def test_emergency_caller_ids_are_keyed_by_their_country() -> None:
    settings = Settings.from_env({**TOKEN, "GATEWAY_EMERGENCY_CALLER_IDS":
                                  " +442079460555 , +4930901820,+1 202 555 0123"})
    assert dict(settings.emergency_caller_ids) == {
        "GB": "+442079460555", "DE": "+4930901820", "US": "+12025550123"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("+442079460555,+441614960555",
         "two caller IDs for GB (+442079460555, +441614960555)"),
        ("+442079460555,02079460555", "'02079460555' is not an E.164 number"),
        ("+4412", "'+4412' is not a valid phone number"),
        ("+80012345678", "'+80012345678' belongs to no country"),  # international freephone
    ],
    ids=["two-for-one-country", "national-format", "invalid", "non-geographic"],
)
def test_bad_emergency_caller_ids_are_refused(value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**TOKEN, "GATEWAY_EMERGENCY_CALLER_IDS": value})
    assert str(info.value).startswith("GATEWAY_EMERGENCY_CALLER_IDS: ")
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value", "replacement"),
    [
        ("GATEWAY_VOICE_NUMBER", "+442079460900", "inbound.csv"),
        ("GATEWAY_IVR_NUMBERS", "+442079460902", "inbound.csv (service owner)"),
        ("GATEWAY_EMERGENCY_CALLER_ID", "+442079460555", "set GATEWAY_EMERGENCY_CALLER_IDS"),
    ],
)
def test_replaced_variables_are_refused_naming_the_replacement(
        variable: str, value: str, replacement: str) -> None:
    # also without the auth token (the CLI reads settings that way): refused first
    for env in ({**TOKEN, variable: value}, {variable: value}):
        with pytest.raises(ConfigError) as info:
            Settings.from_env(env, require_auth_token=False)
        assert str(info.value).startswith(f"{variable}: no longer read; ")
        assert replacement in str(info.value)


def test_an_empty_replaced_variable_is_ignored() -> None:
    assert Settings.from_env({**TOKEN, "GATEWAY_VOICE_NUMBER": " "}).twilio_auth_token


# -- how long a sent vehicle command waits for the car's report ---------------------------


def test_the_command_confirmation_window() -> None:
    assert Settings.from_env(TOKEN).command_confirm_s == 300
    for value in ("30", " 3600 "):  # the ends of the range
        settings = Settings.from_env({**TOKEN, "GATEWAY_COMMAND_CONFIRM_S": value})
        assert settings.command_confirm_s == int(value)
    assert Settings.from_env({**TOKEN, "GATEWAY_COMMAND_CONFIRM_S": ""}).command_confirm_s == 300


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("29", "GATEWAY_COMMAND_CONFIRM_S: must be between 30 and 3600 seconds"),
        ("3601", "GATEWAY_COMMAND_CONFIRM_S: must be between 30 and 3600 seconds"),
        ("0", "GATEWAY_COMMAND_CONFIRM_S: must be between 30 and 3600 seconds"),
        ("-300", "GATEWAY_COMMAND_CONFIRM_S: must be between 30 and 3600 seconds"),
        ("5m", "GATEWAY_COMMAND_CONFIRM_S: '5m' is not a whole number"),
        ("90.5", "GATEWAY_COMMAND_CONFIRM_S: '90.5' is not a whole number"),
    ],
)
def test_a_bad_command_confirmation_window_is_refused(value: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**TOKEN, "GATEWAY_COMMAND_CONFIRM_S": value})
    assert str(info.value) == error
