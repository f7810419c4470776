"""The delivery promises against real processes: SIGKILL, a blackholed centre."""

from __future__ import annotations

import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

from gateway.plan import NumberPlan
from tests.support.events import crash_event
from tests.support.fake_servers import FakeAssistanceCentre
from tests.support.server import free_port, running_gateway
from tests.support.twilio import call_params, dial_of, dialled_number, parse

SWEDE = {"vin": "YV1ZW72U5N1234567", "msisdn": "+46701234567"}

FAST_DELIVERY = {
    "GATEWAY_DELIVERY_TIMEOUT_S": "0.5",
    "GATEWAY_DELIVERY_BACKOFF_INITIAL_S": "0.05",
    "GATEWAY_DELIVERY_BACKOFF_MAX_S": "0.5",
    "GATEWAY_DELIVERY_BUDGET_S": "1",
    "GATEWAY_DELIVERY_POLL_S": "0.05",
    "GATEWAY_DELIVERY_CONCURRENCY": "2",
}


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_twenty_times_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    rng = random.Random(20261125)
    accepted: set[str] = set()
    port = free_port()
    with FakeAssistanceCentre() as centre:
        env = {"GATEWAY_ASSISTANCE_URL": centre.url, **FAST_DELIVERY}
        for round_ in range(20):
            # a flapping centre keeps deliveries in retry when the kill lands
            centre.mode = "flap" if round_ % 2 else "up"
            with running_gateway(tmp_path, port=port, **env) as gw:
                for n in range(5):
                    event = crash_event(**SWEDE, event_id=f"kill-{round_}-{n}")
                    response = gw.post_event(event)
                    if response.status_code in (200, 201):
                        accepted.add(response.json()["incident_id"])
                time.sleep(rng.uniform(0.0, 0.15))
                gw.process.send_signal(signal.SIGKILL)
                gw.process.wait()
        assert len(accepted) == 100
        centre.mode = "up"
        # one more start: everything accepted before the kills is delivered
        with running_gateway(tmp_path, port=port, **env):
            wait_until(lambda: accepted <= set(centre.incidents), timeout=60,
                       what="every accepted incident at the centre")
        assert set(centre.incidents) == accepted
        # at least once on the wire, once at the centre
        assert all(centre.deliveries[key] >= 1 for key in accepted)
        wire = sum(centre.deliveries[key] for key in accepted)
        print(f"\n100 incidents, {wire} deliveries on the wire, "
              f"{sum(1 for k in accepted if centre.deliveries[k] > 1)} sent more than once")


def test_blackholed_incident_api_still_rings_staffed_lines_fast(tmp_path: Path,
                                                               plan: NumberPlan) -> None:
    """The centre's incident API hangs: deliveries open its breaker, but the lines are
    staffed and the whisper carries the data, so calls still ring the centre, fast."""
    with FakeAssistanceCentre() as centre:
        centre.mode = "blackhole"
        env = {"GATEWAY_ASSISTANCE_URL": centre.url, "GATEWAY_BREAKER_FAILURES": "2",
               **FAST_DELIVERY}
        with running_gateway(tmp_path, **env) as gw:
            assert gw.post_event(crash_event(**SWEDE)).status_code == 201
            wait_until(lambda: 'gateway_centre_open{centre="api"} 1.0'
                       in requests.get(gw.base_url + "/metrics", timeout=2).text,
                       timeout=20, what="the breaker to open")
            timings = []
            for n in range(10):
                event = crash_event(**SWEDE, location={"lat": 55.6761, "lon": 12.5683})
                assert gw.post_event(event).status_code == 201
                started = time.perf_counter()
                response = gw.twilio("/twilio/voice", call_params(f"CAbh{n}", SWEDE["msisdn"]))
                timings.append(time.perf_counter() - started)
                root = parse(response.content)
                assert dialled_number(root) == plan.centres_for("SE")[0].number
                assert "dial-result" in dial_of(root).get("action", "")
            print(f"\nwebhook with the centre blackholed: median "
                  f"{statistics.median(timings) * 1000:.1f} ms, max {max(timings) * 1000:.1f} ms")
            assert max(timings) < 1.0  # the blackholed API never delays a call


def test_separate_worker_process_delivers(tmp_path: Path) -> None:
    with FakeAssistanceCentre() as centre:
        env_extra = {"GATEWAY_ASSISTANCE_URL": centre.url, **FAST_DELIVERY}
        with running_gateway(tmp_path, "--no-worker", **env_extra) as gw:
            answer = gw.post_event(crash_event(**SWEDE)).json()
            time.sleep(0.5)
            assert answer["incident_id"] not in centre.incidents  # nobody delivers yet
            from tests.support.server import gateway_env

            env = gateway_env(tmp_path, 0, **env_extra)
            worker = subprocess.Popen([sys.executable, "-m", "gateway", "worker"], env=env,
                                      cwd=tmp_path, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            try:
                wait_until(lambda: answer["incident_id"] in centre.incidents, timeout=20,
                           what="the worker process to deliver")
            finally:
                worker.terminate()
                assert worker.wait(timeout=10) == 0
