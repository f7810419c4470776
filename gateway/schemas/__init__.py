"""Request and answer schemas of the vehicle, agent and admin APIs, in one place.

- :mod:`gateway.schemas.base`: the model bases, the strict body reader and the mapping
  of a pydantic error to our ``{"fields": {"location.lat": reason}}``;
- :mod:`gateway.schemas.vehicle`, :mod:`~gateway.schemas.agent`,
  :mod:`~gateway.schemas.admin`: each API's bodies and answers;
- :mod:`gateway.schemas.openapi`: the OpenAPI 3.1 document (``GET /openapi.json``).

The agent API's bodies and the admin PIN/unlock bodies are validated by these models.
The vehicle event and the enrolment record keep their hand-written validators
(:func:`gateway.events.parse_event`, :func:`gateway.owners.parse_record`: exact reasons,
eCall MSD cross-checks, the CSV import); their models here mirror them for the published
schema, and a property test holds the two together.
"""

from gateway.schemas.base import parse, read_json, validate

__all__ = ["parse", "read_json", "validate"]
