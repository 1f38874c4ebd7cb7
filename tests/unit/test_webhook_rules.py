"""The pure rules of webhooks: which targets are allowed, the retry schedule with its jitter,
how a receiver's answer is read, the settings."""

from __future__ import annotations

import base64
import random

import pytest

from common.settings import ConfigError
from sequencer.config import WEBHOOK_RETRY_SCHEDULE, Settings
from sequencer.errors import InvalidArgument, WebhookTargetNotAllowed
from sequencer.sealing import SecretBox, UnsealError
from sequencer.webhooks import check_states, check_target, event_type, judge, new_secret, parse_retry_after, retry_delay

ENV = {"DATABASE_URL": "postgresql://x@127.0.0.1/db"}


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/h", "http://localhost/h", "http://[::1]:9/h"])
def test_development_mode_allows_loopback(url: str) -> None:
    assert check_target(url, (), development=True) == url


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example.com/h", "http://10.1.2.3/h", "https://169.254.169.254/", "http://127.0.0.2.nip.io/"],
)
def test_development_mode_allows_nothing_else(url: str) -> None:
    with pytest.raises(WebhookTargetNotAllowed):
        check_target(url, (), development=True)


def test_outside_development_only_listed_https_hosts() -> None:
    allowed = ("hooks.example.com", "*.erp.example.net")
    assert check_target("https://hooks.example.com/a", allowed, development=False)
    assert check_target("https://eu.erp.example.net/a", allowed, development=False)
    for url in (
        "http://hooks.example.com/a",  # https only
        "https://erp.example.net/a",  # the wildcard names subdomains only
        "https://evil-hooks.example.com/a",
        "http://127.0.0.1/a",  # loopback is not special outside development mode
        "https://hooks.example.com.evil.io/a",
    ):
        with pytest.raises(WebhookTargetNotAllowed):
            check_target(url, allowed, development=False)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/", "http://u:p@127.0.0.1/", "http://127.0.0.1:99999/", "//x"])
def test_malformed_targets(url: str) -> None:
    with pytest.raises(WebhookTargetNotAllowed):
        check_target(url, (), development=True)


def test_states_default_and_refusals() -> None:
    assert check_states([]) == (3, 4, 6, 7)
    assert check_states([6, 3, 3]) == (3, 6)
    with pytest.raises(InvalidArgument):
        check_states([2])


def test_event_types() -> None:
    types = [event_type(s) for s in (3, 4, 6, 7)]
    assert types == ["event.applied", "event.rejected", "event.skipped", "event.blocked"]


def test_retry_schedule_with_jitter_and_its_end() -> None:
    rand = random.Random(1)
    schedule = WEBHOOK_RETRY_SCHEDULE
    assert retry_delay(schedule, 0, rand) == 0.0
    for step, base in enumerate(schedule[1:], start=1):
        delay = retry_delay(schedule, step, rand)
        assert delay is not None and base * 0.8 <= delay <= base * 1.2
    assert retry_delay(schedule, len(schedule), rand) is None


def test_answers() -> None:
    assert judge(204, None, None).delivered
    gone = judge(410, None, None)
    assert gone.disable and not gone.delivered
    assert judge(429, None, "120").retry_after == 120.0
    assert judge(503, None, "7").retry_after == 7.0
    assert judge(500, None, "120").retry_after is None  # only 429 and 503 name a time
    failed = judge(None, "ClientConnectorError: refused", None)
    assert not failed.delivered and failed.error == "ClientConnectorError: refused"
    assert parse_retry_after("soon") is None


def test_secrets_are_standard_webhooks_secrets_and_seal() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    box = SecretBox.from_setting(base64.b64encode(bytes(range(32))).decode())
    sealed = box.seal(secret, b"sub-1")
    assert secret.encode() not in sealed and box.open(sealed, b"sub-1") == secret
    with pytest.raises(UnsealError):
        box.open(sealed, b"sub-2")  # bound to its subscription
    with pytest.raises(UnsealError):
        SecretBox(None).open(sealed, b"sub-1")


def test_settings() -> None:
    settings = Settings.from_env(
        {
            **ENV,
            "SEQUENCER_WEBHOOK_ALLOWED_HOSTS": "Hooks.Example.com, *.erp.example.net",
            "SEQUENCER_WEBHOOK_RETRY_SCHEDULE": "0,0.5,1",
            "SEQUENCER_WEBHOOK_DISABLE_AFTER": "60",
        }
    )
    assert settings.webhook_allowed_hosts == ("hooks.example.com", "*.erp.example.net")
    assert settings.webhook_retry_schedule == (0.0, 0.5, 1.0)
    assert settings.webhook_disable_after == 60.0 and settings.webhook_timeout == 15.0
    for bad in (
        {"SEQUENCER_WEBHOOK_RETRY_SCHEDULE": "0,-1"},
        {"SEQUENCER_WEBHOOK_RETRY_SCHEDULE": "soon"},
        {"SEQUENCER_WEBHOOK_SECRET_KEY": "c2hvcnQ="},
        {"SEQUENCER_WEBHOOK_LEASE": "5", "SEQUENCER_WEBHOOK_TIMEOUT": "10"},
    ):
        with pytest.raises(ConfigError):
            Settings.from_env({**ENV, **bad})
