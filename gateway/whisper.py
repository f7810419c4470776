"""What the agent hears before the call is bridged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.plan import NumberPlan

_TRIGGERS = {"crash": "Crash alert", "sos": "S O S call", "on_call": "Roadside assistance call"}

#: what the agent presses to take the call, and what they are told to press
ACCEPT_DIGIT = "1"
ACCEPT_PROMPT = f"Press {ACCEPT_DIGIT} to accept."
#: the whisper before the accept key, prompt included, is at most this many words: it
#: counts in the caller's time budget (the details follow once the agent accepted)
WHISPER_MAX_WORDS = 16


def whisper_headline(incident: Mapping[str, Any] | None, *, service: str,
                     plan: NumberPlan | None, sim_country: str | None) -> str:
    """What the agent hears before pressing the key: the trigger, the worst signs and the
    country, in at most :data:`WHISPER_MAX_WORDS` words with the accept prompt."""
    if incident is not None and incident.get("test_call"):
        trigger = "Test call, no emergency."
    elif service == "roadside":
        trigger = "Roadside assistance call."
    elif incident is None:
        trigger = "Emergency call, no data message."
    elif incident.get("type") in ("crash", "sos"):
        trigger = f"{_TRIGGERS[str(incident['type'])]}."
    else:  # an emergency call after an ON CALL data message: routed as the emergency
        trigger = "Emergency call."
    parts = [trigger]
    crash = (incident or {}).get("crash") or {}
    if isinstance(crash, dict) and crash.get("airbag_deployed"):
        parts.append("Airbags deployed.")
    occupants = (incident or {}).get("occupants") or {}
    if isinstance(occupants, dict) and isinstance(occupants.get("count"), int):
        parts.append(f"{occupants['count']} aboard.")
    country = (incident or {}).get("location_country") or (incident or {}).get("route_country")
    parts.append(f"In {_country_name(country or sim_country, plan)}.")
    words = " ".join(parts).split()
    budget = WHISPER_MAX_WORDS - len(ACCEPT_PROMPT.split())
    return " ".join(words[:budget])


def _country_name(code: str | None, plan: NumberPlan | None) -> str:
    if not code:
        return "an unknown country"
    entry = plan.get(code) if plan is not None else None
    return entry.name if entry is not None else code


def whisper_summary(
    incident: Mapping[str, Any] | None, *, plan: NumberPlan | None, sim_country: str | None
) -> str:
    """Trigger, crash details, occupants, place, car: short sentences for <Say>."""
    if incident is None:
        where = _country_name(sim_country, plan)
        return (
            "Call from a connected car with no data message. "
            f"The car's SIM is registered in {where}. Ask the caller where they are."
        )
    parts = [f"{_TRIGGERS.get(str(incident['type']), 'Call')} from a connected car."]
    crash = incident.get("crash") or {}
    if crash.get("airbag_deployed"):
        parts.append("Airbags deployed.")
    if crash.get("belt_tensioner_fired"):
        parts.append("Belt tensioners fired.")
    if crash.get("rollover"):
        parts.append("The car rolled over.")
    if isinstance(crash.get("delta_v_kmh"), (int, float)):
        parts.append(f"Change of speed {round(crash['delta_v_kmh'])} kilometres per hour.")
    occupants = incident.get("occupants") or {}
    if isinstance(occupants.get("count"), int):
        count = occupants["count"]
        parts.append(f"{count} occupant{'s' if count != 1 else ''}.")
    country = incident.get("location_country")
    where = (
        f"in {_country_name(country, plan)}"
        if country
        else f"outside any country's waters, routed to {_country_name(incident.get('route_country'), plan)}"
    )
    if incident.get("lat") is None or incident.get("lon") is None:  # an MSD without a fix
        routed = _country_name(incident.get("route_country"), plan)
        parts.append(f"Position unknown, routed to {routed}. Ask the caller where they are.")
    else:
        parts.append(
            f"Position {where}, latitude {incident['lat']:.4f}, longitude {incident['lon']:.4f}."
        )
    if incident.get("heading_deg") is not None:
        parts.append(f"Heading {round(incident['heading_deg'])} degrees.")
    if incident.get("trusted") is False:
        parts.append("The car flags this position as untrusted.")
    vin = str(incident.get("vin", ""))
    if vin:
        parts.append(f"Vehicle ending {' '.join(vin[-6:])}.")
    return " ".join(parts)
