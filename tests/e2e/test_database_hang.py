"""A database that accepts TCP and never answers must not cost a caller their call.

A real gateway process on PostgreSQL, reached through a TCP proxy that stops
forwarding mid-run (connections stay open, no bytes come back): 20 concurrent
incoming calls and 20 concurrent Fallback URL requests must each be answered with a
<Dial> or the hand-back within one second.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import postgres_url
from tests.support.events import crash_event
from tests.support.proxy import TcpProxy, proxied_url
from tests.support.server import GatewayProcess, running_gateway
from tests.support.twilio import call_params, parse

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CARS = [("+4915112345" + f"{n:03d}", f"WBA3A5C51CF2560{n:02d}") for n in range(20)]


@pytest.fixture
def pg_url() -> str:
    url = postgres_url()
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide PostgreSQL: set GATEWAY_TEST_POSTGRES_URL")
        pytest.skip("PostgreSQL not configured: set GATEWAY_TEST_POSTGRES_URL to run this test")
    return url


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    parts = urlsplit(pg_url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as tcp:
        yield tcp


def answer_kind(response: requests.Response) -> str:
    root = parse(response.content)
    if root.find("Dial") is not None:
        return "dial"
    said = " ".join(s.text or "" for s in root.iter("Say"))
    return "hand_back" if "itself" in said or "dial" in said else "other"


def test_hung_database_every_call_answered_within_a_second(tmp_path: Path, pg_url: str,
                                                           proxy: TcpProxy) -> None:
    from gateway.store import Store, metadata, register_tables

    register_tables()
    fresh = Store.from_url(pg_url)
    metadata.drop_all(fresh.engine)
    fresh.dispose()
    with running_gateway(tmp_path, "--no-worker",
                         GATEWAY_DATABASE_URL=proxied_url(pg_url, proxy),
                         GATEWAY_EMERGENCY_CALLER_IDS="+4930901820") as gw:
        for msisdn, vin in CARS:  # crashes stored while the database still answers
            event = crash_event(vin=vin, msisdn=msisdn, location={"lat": 52.52, "lon": 13.40})
            assert gw.post_event(event).status_code == 201
        warm = gw.twilio("/twilio/voice", call_params("CAwarm", CARS[0][0]))  # pooled conns
        assert answer_kind(warm) == "dial"

        proxy.mode = "blackhole"
        calls = [("/twilio/voice", call_params(f"CAhang{n}", msisdn))
                 for n, (msisdn, _) in enumerate(CARS)]
        fallbacks = [("/twilio/voice/fallback", call_params(
            f"CAfb{n}", msisdn, ErrorCode="11205",
            ErrorUrl=f"{gw.base_url}/twilio/voice")) for n, (msisdn, _) in enumerate(CARS)]

        def timed(item: tuple[str, dict[str, str]]) -> tuple[float, str]:
            started = time.perf_counter()
            response = gw.twilio(*item)
            return time.perf_counter() - started, answer_kind(response)

        with ThreadPoolExecutor(max_workers=40) as pool:
            results = list(pool.map(timed, calls + fallbacks))
        slowest = max(seconds for seconds, _ in results)
        print(f"\nhung database: 40 webhooks, slowest {slowest * 1000:.0f} ms, "
              f"median {sorted(s for s, _ in results)[20] * 1000:.0f} ms")
        assert all(kind in ("dial", "hand_back") for _, kind in results), results
        assert slowest < 1.0, results
        assert _still_serving(gw)


def _still_serving(gw: GatewayProcess) -> bool:
    """After the storm the server still answers at once (no thread is stuck)."""
    started = time.perf_counter()
    response = gw.twilio("/twilio/voice", call_params("CAafter", CARS[1][0]))
    return answer_kind(response) == "dial" and time.perf_counter() - started < 1.0
