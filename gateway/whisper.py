"""What the agent hears before the call is bridged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.plan import NumberPlan

_TRIGGERS = {"crash": "Crash alert", "sos": "S O S call", "on_call": "Roadside assistance call"}


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
