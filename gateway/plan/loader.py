"""Reading and validating the number plan's CSV files (see ``numbers/README.md``).

:func:`load_plan` reads the four files of a plan directory and builds a
:class:`~gateway.plan.model.NumberPlan`; any problem raises
:class:`~gateway.errors.PlanError` naming the file, the line and the reason.
Nothing is read at import time.
"""

from __future__ import annotations

import csv
import importlib.resources
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import phonenumbers

from gateway.errors import PlanError
from gateway.plan.model import (
    SERVICES,
    WILDCARD,
    Centre,
    CountryEntry,
    InboundNumber,
    NumberPlan,
    TwilioEmergency,
)
from gateway.startup import loaded

if TYPE_CHECKING:
    from gateway.config import Settings

COUNTRIES_FILE = "countries.csv"
CENTRES_FILE = "centres.csv"
INBOUND_FILE = "inbound.csv"
TWILIO_EMERGENCY_FILE = "twilio_emergency.csv"

COUNTRY_COLUMNS: tuple[str, ...] = (
    "country",
    "name",
    "emergency_number",
    "psap_number",
    "psap_caller_id",
    "language",
    "source",
    "exception",
)
INBOUND_COLUMNS: tuple[str, ...] = ("number", "service", "country", "source")
TWILIO_EMERGENCY_COLUMNS: tuple[str, ...] = ("country", "numbers", "address_required", "source")
CENTRE_COLUMNS: tuple[str, ...] = (
    "centre_id",
    "name",
    "countries",
    "priority",
    "number",
    "roadside_number",
    "language",
)

# Codes a centre may name without a countries.csv row (a plan may leave a country
# out; routing then uses DEFAULT_EMERGENCY). Catches typos such as UK or EL.
# libphonenumber's regions plus the ISO 3166-1 codes it has no metadata for.
_KNOWN_CODES = frozenset(phonenumbers.SUPPORTED_REGIONS) | frozenset(
    {"AQ", "BV", "GS", "HM", "PN", "TF", "UM"}
)

_CODE_RE = re.compile(r"[A-Z]{2}")
_SHORT_RE = re.compile(r"[0-9]{2,8}")
_E164_RE = re.compile(r"\+[1-9][0-9]{1,14}")
_LANGUAGE_RE = re.compile(r"[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*")
_CENTRE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def plan_dir_default() -> pathlib.Path:
    """The packaged plan directory.

    Installed from a wheel, pyproject force-includes ``numbers/`` as
    ``gateway/_plan``; in a source checkout it is ``numbers/`` next to the
    ``gateway`` package.
    """
    packaged = importlib.resources.files("gateway") / "_plan"
    if packaged.is_dir():
        return pathlib.Path(str(packaged))
    # gateway/plan/loader.py -> gateway/plan -> gateway -> the checkout
    return pathlib.Path(__file__).resolve().parents[2] / "numbers"


def load_plan(path: pathlib.Path | None = None) -> NumberPlan:
    """Load and validate the plan in directory ``path`` (default: :func:`plan_dir_default`).

    ``GATEWAY_NUMBER_PLAN`` is read by the configuration (``Settings.number_plan_dir``)
    and passed in as ``path``; this function does not read the environment.
    Raises PlanError naming the file, line and reason for the first problem found.
    """
    if path is None:
        path = plan_dir_default()
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise PlanError(f"{directory}: number plan directory not found")
    entries = _load_countries(directory / COUNTRIES_FILE)
    centres = _load_centres(directory / CENTRES_FILE, entries)
    inbound = _load_inbound(directory / INBOUND_FILE)
    twilio = _load_twilio_emergency(directory / TWILIO_EMERGENCY_FILE, entries)
    return NumberPlan(str(directory), entries, centres, inbound, twilio)


def load_plan_or_none(settings: Settings, problems: dict[str, str]) -> NumberPlan | None:
    """The plan in ``settings.number_plan_dir``, or None when it fails to load (recorded
    in ``problems["number_plan"]``: :func:`gateway.startup.loaded`)."""
    return loaded(problems, "number_plan", "number plan",
                  lambda: load_plan(settings.number_plan_dir))


# --------------------------------------------------------------------------- reading


def _fail(file: pathlib.Path, line: int | None, reason: str) -> PlanError:
    where = f"{file}:{line}" if line is not None else str(file)
    return PlanError(f"{where}: {reason}")


def _read_rows(
    file: pathlib.Path, columns: tuple[str, ...]
) -> Iterable[tuple[int, dict[str, str]]]:
    """Yield (line number, row) for each data row, checking header and field counts."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise _fail(file, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(file, None, f"cannot read file: {exc}") from exc

    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise _fail(file, 1, "file is empty; expected a header row")
        names = [h.strip() for h in header]
        missing = [c for c in columns if c not in names]
        if missing:
            raise _fail(file, 1, f"header is missing column(s) {', '.join(missing)}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise _fail(file, 1, f"header repeats column(s) {', '.join(dupes)}")
        index = {name: names.index(name) for name in columns}
        for fields in reader:
            line = reader.line_num
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(names):
                raise _fail(file, line, f"expected {len(names)} fields, found {len(fields)}")
            yield line, {name: fields[i].strip() for name, i in index.items()}
    except csv.Error as exc:
        raise _fail(file, reader.line_num, f"malformed CSV: {exc}") from exc


def _e164_problem(number: str) -> str | None:
    """None if ``number`` is a valid E.164 number in canonical form, else the reason."""
    if not _E164_RE.fullmatch(number):
        return "is not in E.164 form (+ and up to 15 digits, no spaces)"
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException as exc:
        return f"does not parse: {exc}"
    if not phonenumbers.is_valid_number(parsed):
        return "is not a valid number according to libphonenumber"
    if phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) != number:
        return "is not in canonical E.164 form"
    return None


def _require(file: pathlib.Path, line: int, row: Mapping[str, str], column: str) -> str:
    value = row[column]
    if not value:
        raise _fail(file, line, f"{column} is empty")
    return value


def _load_countries(file: pathlib.Path) -> dict[str, CountryEntry]:
    entries: dict[str, CountryEntry] = {}
    lines: dict[str, int] = {}
    for line, row in _read_rows(file, COUNTRY_COLUMNS):
        country = _require(file, line, row, "country")
        if not _CODE_RE.fullmatch(country):
            raise _fail(
                file, line, f"country {country!r} is not two upper-case letters (ISO 3166-1)"
            )
        if country in entries:
            raise _fail(
                file, line, f"duplicate country {country} (first given on line {lines[country]})"
            )
        name = _require(file, line, row, "name")
        emergency = _require(file, line, row, "emergency_number")
        if not _SHORT_RE.fullmatch(emergency):
            raise _fail(
                file,
                line,
                f"emergency_number {emergency!r} for {country} must be 2 to 8 digits only",
            )
        psap: dict[str, str] = {}
        for column in ("psap_number", "psap_caller_id"):
            value = row[column]
            problem = _e164_problem(value) if value else None
            if problem is not None:
                raise _fail(file, line, f"{column} {value!r} for {country} {problem}")
            psap[column] = value
        if psap["psap_caller_id"] and not psap["psap_number"]:
            raise _fail(file, line, f"psap_caller_id for {country} needs a psap_number")
        language = _require(file, line, row, "language")
        if not _LANGUAGE_RE.fullmatch(language):
            raise _fail(file, line, f"language {language!r} for {country} is not a language tag")
        source = _require(file, line, row, "source")
        entries[country] = CountryEntry(
            country=country,
            name=name,
            emergency_number=emergency,
            psap_number=psap["psap_number"],
            psap_caller_id=psap["psap_caller_id"],
            language=language,
            source=source,
            exception=row["exception"],
        )
        lines[country] = line
    if not entries:
        raise _fail(file, None, "no country rows")
    return entries


def _load_centres(file: pathlib.Path, entries: Mapping[str, CountryEntry]) -> list[Centre]:
    centres: list[Centre] = []
    lines: dict[str, int] = {}
    for line, row in _read_rows(file, CENTRE_COLUMNS):
        centre_id = _require(file, line, row, "centre_id")
        if not _CENTRE_ID_RE.fullmatch(centre_id):
            raise _fail(file, line, f"centre_id {centre_id!r} may only use A-Z a-z 0-9 _ . -")
        if centre_id in lines:
            raise _fail(
                file,
                line,
                f"duplicate centre_id {centre_id} (first given on line {lines[centre_id]})",
            )
        name = _require(file, line, row, "name")
        codes = _require(file, line, row, "countries").split()
        if WILDCARD in codes and len(codes) > 1:
            raise _fail(file, line, f"centre {centre_id}: '*' must be the only entry in countries")
        for code in codes:
            if code == WILDCARD:
                continue
            if not _CODE_RE.fullmatch(code):
                raise _fail(
                    file,
                    line,
                    f"centre {centre_id}: country {code!r} is not two upper-case letters",
                )
            if code not in entries and code not in _KNOWN_CODES:
                raise _fail(
                    file,
                    line,
                    f"centre {centre_id}: country {code} is neither in {COUNTRIES_FILE} "
                    "nor a known country code",
                )
        raw_priority = _require(file, line, row, "priority")
        if not re.fullmatch(r"[0-9]{1,6}", raw_priority) or int(raw_priority) < 1:
            raise _fail(
                file,
                line,
                f"centre {centre_id}: priority {raw_priority!r} is not a positive integer",
            )
        numbers: dict[str, str] = {}
        for column in ("number", "roadside_number"):
            value = _require(file, line, row, column)
            problem = _e164_problem(value)
            if problem is not None:
                raise _fail(file, line, f"centre {centre_id}: {column} {value!r} {problem}")
            numbers[column] = value
        language = _require(file, line, row, "language")
        if not _LANGUAGE_RE.fullmatch(language):
            raise _fail(
                file, line, f"centre {centre_id}: language {language!r} is not a language tag"
            )
        centres.append(
            Centre(
                centre_id=centre_id,
                name=name,
                countries=frozenset(codes),
                priority=int(raw_priority),
                number=numbers["number"],
                roadside_number=numbers["roadside_number"],
                language=language,
            )
        )
        lines[centre_id] = line
    if not centres:
        raise _fail(file, None, "no centre rows")
    return centres


def _load_inbound(file: pathlib.Path) -> list[InboundNumber]:
    rows: list[InboundNumber] = []
    seen: dict[str, int] = {}
    for line, row in _read_rows(file, INBOUND_COLUMNS):
        number = _require(file, line, row, "number")
        problem = _e164_problem(number)
        if problem is not None:
            raise _fail(file, line, f"number {number!r} {problem}")
        if number in seen:
            raise _fail(
                file, line, f"duplicate number {number} (first given on line {seen[number]})"
            )
        service = _require(file, line, row, "service")
        if service not in SERVICES:
            raise _fail(file, line, f"service {service!r} is not one of {', '.join(SERVICES)}")
        country = _require(file, line, row, "country")
        if country != WILDCARD and country not in _KNOWN_CODES:
            raise _fail(
                file, line, f"country {country!r} is neither '*' nor a known country code"
            )
        rows.append(InboundNumber(number, service, country, _require(file, line, row, "source")))
        seen[number] = line
    return rows


def _load_twilio_emergency(
    file: pathlib.Path, entries: Mapping[str, CountryEntry]
) -> dict[str, TwilioEmergency]:
    found: dict[str, TwilioEmergency] = {}
    lines: dict[str, int] = {}
    for line, row in _read_rows(file, TWILIO_EMERGENCY_COLUMNS):
        country = _require(file, line, row, "country")
        if country not in entries:
            raise _fail(file, line, f"country {country!r} has no row in {COUNTRIES_FILE}")
        if country in found:
            raise _fail(
                file, line, f"duplicate country {country} (first given on line {lines[country]})"
            )
        numbers = tuple(_require(file, line, row, "numbers").split())
        bad = [n for n in numbers if not _SHORT_RE.fullmatch(n)]
        if bad:
            raise _fail(
                file, line, f"numbers {' '.join(bad)} for {country} are not short numbers"
            )
        flag = _require(file, line, row, "address_required")
        if flag not in ("yes", "no"):
            raise _fail(file, line, f"address_required {flag!r} for {country} must be yes or no")
        source = _require(file, line, row, "source")
        found[country] = TwilioEmergency(country, numbers, flag == "yes", source)
        lines[country] = line
    return found
