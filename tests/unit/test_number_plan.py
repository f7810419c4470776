"""The number plan in numbers/ and its loader, gateway.plan.

Every row of numbers/countries.csv, centres.csv, inbound.csv and
twilio_emergency.csv is checked with libphonenumber: E.164 numbers must be valid,
emergency numbers must be known to libphonenumber's short-number data for the
region unless the row carries an explained exception (and then libphonenumber must
really not know it, so a stale exception fails).  The loader's every refusal names
the file, the line and the reason.
"""

from __future__ import annotations

import csv
import pathlib
import re

import phonenumbers
import pytest
from phonenumbers import shortnumberinfo

from gateway.errors import PlanEntryMissingError, PlanError
from gateway.plan import (
    CENTRE_COLUMNS,
    COUNTRY_COLUMNS,
    DEFAULT_EMERGENCY,
    INBOUND_COLUMNS,
    SERVICES,
    TWILIO_EMERGENCY_COLUMNS,
    Centre,
    InboundNumber,
    NumberPlan,
    TwilioEmergency,
    load_plan,
    plan_dir_default,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
PLAN_DIR = REPO / "numbers"
COUNTRIES_CSV = PLAN_DIR / "countries.csv"
CENTRES_CSV = PLAN_DIR / "centres.csv"
INBOUND_CSV = PLAN_DIR / "inbound.csv"
TWILIO_CSV = PLAN_DIR / "twilio_emergency.csv"
README = PLAN_DIR / "README.md"

# ISO 3166-1 alpha-2: all 249 officially assigned codes.
_ISO_CODES = """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ
    BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ
    CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ
    DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR
    GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY
    HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP
    KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY
    MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ
    NA NC NE NF NG NI NL NO NP NR NU NZ OM
    PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW
    SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ
    TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ
    VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW
"""
ISO_3166_1_ALPHA2 = frozenset(_ISO_CODES.split())
# Codes outside the assigned list that the plan also covers: XK (Kosovo,
# user-assigned) and AC/TA (exceptionally reserved; libphonenumber regions).
EXTRA_CODES = frozenset({"XK", "AC", "TA"})
LIBPHONENUMBER_REGIONS = frozenset(phonenumbers.SUPPORTED_REGIONS) - {"001"}

# <Say language> values used by the plan; each is offered by at least one of
# Twilio's <Say> voice families (Amazon Polly or Google). Documented in
# numbers/README.md; anything else falls back to English there.
_SAY_LANGUAGES = """
    ar-AE ar-XA bg-BG bn-IN ca-ES cmn-CN cmn-TW cs-CZ da-DK de-AT de-DE el-GR
    en-AU en-GB en-IE en-IN en-NZ en-US en-ZA es-ES es-MX es-US fi-FI fr-CA fr-FR
    he-IL hi-IN hu-HU id-ID is-IS it-IT ja-JP ko-KR ms-MY nb-NO nl-BE nl-NL pl-PL
    pt-BR pt-PT ro-RO ru-RU sk-SK sv-SE th-TH tr-TR uk-UA vi-VN yue-HK
"""
TWILIO_SAY_LANGUAGES = frozenset(_SAY_LANGUAGES.split())

# Countries where Twilio Programmable Voice can dial the emergency number (Twilio,
# "Emergency Calling for Programmable Voice").
TWILIO_EMERGENCY_COUNTRIES = frozenset(
    {"US", "CA", "GB", "AU", "IE", "FR", "DE", "AT", "MY", "TH", "PH", "NZ", "IT"}
)
# Short numbers in twilio_emergency.csv that libphonenumber does not list as emergency
# numbers for the country, and why they are there anyway.  A stale entry fails.
TWILIO_NUMBERS_NOT_IN_LIBPHONENUMBER = {
    ("US", "933"): "Twilio's emergency-address test number, not an emergency number",
    ("TH", "112"): "Twilio documents 112 dialling; libphonenumber lists 191/1669/199 only",
    ("NZ", "112"): "Twilio documents 112 dialling; libphonenumber lists 111 only",
}


def _read(path: pathlib.Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


COUNTRY_ROWS = _read(COUNTRIES_CSV)
CENTRE_ROWS = _read(CENTRES_CSV)
INBOUND_ROWS = _read(INBOUND_CSV)
TWILIO_ROWS = _read(TWILIO_CSV)
EXCEPTION_ROWS = [row for row in COUNTRY_ROWS if row["exception"].strip()]


def _is_valid_e164(number: str) -> bool:
    if not re.fullmatch(r"\+[1-9][0-9]{1,14}", number):
        return False
    parsed = phonenumbers.parse(number, None)
    return phonenumbers.is_valid_number(parsed) and (
        phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) == number
    )


@pytest.fixture(scope="module")
def plan() -> NumberPlan:
    return load_plan(PLAN_DIR)


# ------------------------------------------------------------------- file shape


def test_countries_header() -> None:
    with COUNTRIES_CSV.open(encoding="utf-8", newline="") as handle:
        assert next(csv.reader(handle)) == list(COUNTRY_COLUMNS)


def test_centres_header() -> None:
    with CENTRES_CSV.open(encoding="utf-8", newline="") as handle:
        assert next(csv.reader(handle)) == list(CENTRE_COLUMNS)


def test_inbound_header() -> None:
    with INBOUND_CSV.open(encoding="utf-8", newline="") as handle:
        assert next(csv.reader(handle)) == list(INBOUND_COLUMNS)


def test_twilio_emergency_header() -> None:
    with TWILIO_CSV.open(encoding="utf-8", newline="") as handle:
        assert next(csv.reader(handle)) == list(TWILIO_EMERGENCY_COLUMNS)


def test_iso_list_is_complete() -> None:
    assert len(ISO_3166_1_ALPHA2) == 249


def test_plan_covers_every_iso_code() -> None:
    codes = {row["country"] for row in COUNTRY_ROWS}
    assert sorted(ISO_3166_1_ALPHA2 - codes) == []


def test_plan_covers_every_libphonenumber_region() -> None:
    codes = {row["country"] for row in COUNTRY_ROWS}
    assert sorted(LIBPHONENUMBER_REGIONS - codes) == []


def test_plan_has_no_unknown_codes() -> None:
    codes = {row["country"] for row in COUNTRY_ROWS}
    assert sorted(codes - ISO_3166_1_ALPHA2 - EXTRA_CODES - LIBPHONENUMBER_REGIONS) == []
    assert len(COUNTRY_ROWS) == len(codes) == 252


def test_rows_are_sorted_by_country() -> None:
    codes = [row["country"] for row in COUNTRY_ROWS]
    assert codes == sorted(codes)


# ------------------------------------------------------------------- per country


@pytest.mark.parametrize("row", COUNTRY_ROWS, ids=[r["country"] for r in COUNTRY_ROWS])
def test_country_row(row: dict[str, str], plan: NumberPlan) -> None:
    code = row["country"]
    number = row["emergency_number"]
    assert re.fullmatch(r"[A-Z]{2}", code)
    assert row["name"].strip()
    assert re.fullmatch(r"[0-9]{2,8}", number), number
    assert row["source"].strip()

    # PSAP/TPS numbers are contractual, not public: the shipped plan invents none
    assert row["psap_number"] == "" and row["psap_caller_id"] == "", (
        f"{code}: the shipped plan carries no PSAP numbers; an operator adds them")

    known = shortnumberinfo.is_emergency_number(number, code)
    exception = row["exception"].strip()
    if exception:
        assert not known, (
            f"{code}: libphonenumber now knows {number} as an emergency number; "
            "the exception is stale and should be removed"
        )
        assert len(exception) >= 80, f"{code}: exception is not explained"
        assert number in exception, f"{code}: exception does not say which number was chosen"
        assert "libphonenumber" in exception
    else:
        assert known, (
            f"{code}: {number} is not an emergency number for {code} in libphonenumber "
            f"{phonenumbers.__version__}; pick one it knows or add an explained exception"
        )
        assert row["source"].startswith("libphonenumber ShortNumberMetadata (emergency) v")

    assert row["language"] in TWILIO_SAY_LANGUAGES, row["language"]
    assert plan.centres_for(code), f"{code} has no assistance centre"


@pytest.mark.parametrize(
    "row", EXCEPTION_ROWS, ids=[r["country"] for r in EXCEPTION_ROWS] or ["none"]
)
def test_exception_is_listed_in_readme(row: dict[str, str]) -> None:
    assert f"`{row['country']}`" in README.read_text(encoding="utf-8")


def test_exceptions_only_where_libphonenumber_has_no_emergency_data() -> None:
    # Where libphonenumber has emergency data the plan must use a number it knows.
    for row in EXCEPTION_ROWS:
        metadata = phonenumbers.PhoneMetadata.short_metadata_for_region(row["country"])
        emergency = None if metadata is None else metadata.emergency
        pattern = None if emergency is None else emergency.national_number_pattern
        assert pattern is None, f"{row['country']} has emergency data: {pattern}"


# ------------------------------------------------------------------- Twilio emergency


def test_twilio_emergency_lists_the_documented_countries(plan: NumberPlan) -> None:
    assert {row["country"] for row in TWILIO_ROWS} == TWILIO_EMERGENCY_COUNTRIES
    assert len(TWILIO_ROWS) == len(TWILIO_EMERGENCY_COUNTRIES)
    assert plan.twilio_emergency_countries() == sorted(TWILIO_EMERGENCY_COUNTRIES)
    assert plan.twilio_emergency("DK") is None and plan.twilio_emergency(None) is None


@pytest.mark.parametrize("row", TWILIO_ROWS, ids=[r["country"] for r in TWILIO_ROWS])
def test_twilio_emergency_row(row: dict[str, str], plan: NumberPlan) -> None:
    code = row["country"]
    entry = plan.entry(code)
    assert not entry.exception
    assert row["source"].startswith("Twilio docs: Emergency Calling for Programmable Voice")
    # Twilio routes by the registered address only where it offers address registration
    assert (row["address_required"] == "yes") == (code in {"US", "CA", "GB"})
    twilio = plan.twilio_emergency(code.lower())
    assert twilio is not None and twilio.numbers == tuple(row["numbers"].split())
    for number in twilio.numbers:
        known = shortnumberinfo.is_emergency_number(number, code)
        excused = (code, number) in TWILIO_NUMBERS_NOT_IN_LIBPHONENUMBER
        assert known != excused, (
            f"{code} {number}: libphonenumber {'now knows' if known else 'does not know'} it; "
            "update TWILIO_NUMBERS_NOT_IN_LIBPHONENUMBER")


# ------------------------------------------------------------------- inbound numbers


@pytest.mark.parametrize("row", INBOUND_ROWS, ids=[r["number"] for r in INBOUND_ROWS])
def test_inbound_row(row: dict[str, str]) -> None:
    assert _is_valid_e164(row["number"]), row["number"]
    assert row["service"] in SERVICES
    assert row["country"] == "*" or row["country"] in ISO_3166_1_ALPHA2
    assert row["source"].startswith("DEMO: "), "the shipped numbers are fictitious"


def test_inbound_serves_every_service_everywhere(plan: NumberPlan) -> None:
    # each service has a catch-all number, so a car of any country can call
    for service in SERVICES:
        found = plan.inbound_for(service, "JP")
        assert found is not None and found.country == "*", service
    us = plan.inbound_for("emergency", "us")
    assert us is not None and us.number == "+12025550150"
    roadside = plan.inbound_number("+442079460901")
    assert isinstance(roadside, InboundNumber)
    assert (roadside.service, roadside.country) == ("roadside", "*")
    assert plan.inbound_number("+442079460999") is None and plan.inbound_number(None) is None


# ------------------------------------------------------------------- centres


@pytest.mark.parametrize("row", CENTRE_ROWS, ids=[r["centre_id"] for r in CENTRE_ROWS])
def test_centre_row(row: dict[str, str]) -> None:
    for column in ("number", "roadside_number"):
        assert _is_valid_e164(row[column]), f"{row['centre_id']} {column} {row[column]}"
    assert int(row["priority"]) >= 1
    codes = row["countries"].split()
    assert codes == ["*"] or all(c in ISO_3166_1_ALPHA2 | EXTRA_CODES for c in codes)
    assert row["language"] in TWILIO_SAY_LANGUAGES
    assert row["name"].startswith("DEMO "), "the shipped plan is a demo plan"


def test_centre_numbers_are_distinct() -> None:
    numbers = [row[c] for row in CENTRE_ROWS for c in ("number", "roadside_number")]
    assert len(numbers) == len(set(numbers))


def test_catch_all_centre_is_lowest_priority() -> None:
    catch_all = [r for r in CENTRE_ROWS if r["countries"].strip() == "*"]
    assert catch_all
    lowest = max(int(r["priority"]) for r in CENTRE_ROWS)
    assert all(int(r["priority"]) == lowest for r in catch_all)


def test_every_country_has_a_centre(plan: NumberPlan) -> None:
    assert [c for c in plan.countries() if not plan.centres_for(c)] == []


def test_demo_european_and_north_american_centres(plan: NumberPlan) -> None:
    de = [c.centre_id for c in plan.centres_for("DE")]
    assert de == ["eu-primary", "eu-backup", "global"]
    assert [c.centre_id for c in plan.centres_for("gb")] == ["eu-primary", "eu-backup", "global"]
    assert [c.centre_id for c in plan.centres_for("PR")] == ["na-primary", "global"]
    assert [c.centre_id for c in plan.centres_for("JP")] == ["global"]


# ------------------------------------------------------------------- loader API


def test_load_default_plan(plan: NumberPlan) -> None:
    assert len(plan) == len(COUNTRY_ROWS) == 252
    assert plan.countries() == sorted(r["country"] for r in COUNTRY_ROWS)
    assert pathlib.Path(plan.source) == PLAN_DIR


def test_plan_dir_default_is_the_repo_plan() -> None:
    default = plan_dir_default()
    assert default == PLAN_DIR
    for name in ("countries.csv", "centres.csv", "inbound.csv", "twilio_emergency.csv"):
        assert (default / name).is_file(), name
    assert len(load_plan()) == len(COUNTRY_ROWS)


def test_plan_dir_default_prefers_the_packaged_plan(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # installed from the wheel, numbers/ is gateway/_plan (pyproject force-include)
    import importlib.resources

    (tmp_path / "_plan").mkdir()
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    assert plan_dir_default() == tmp_path / "_plan"


def test_entry_and_get(plan: NumberPlan) -> None:
    us = plan.entry("us")
    assert (us.country, us.emergency_number, us.psap_number, us.psap_caller_id) == (
        "US", "911", "", "")
    assert plan.entry(" GB ").emergency_number == "999"
    assert plan.entry("AU").emergency_number == "000"
    assert plan.entry("NZ").emergency_number == "111"
    assert plan.entry("JP").emergency_number == "119"
    assert plan.entry("DE").emergency_number == "112"
    assert plan.get("zz") is None
    with pytest.raises(PlanEntryMissingError) as info:
        plan.entry("ZZ")
    assert info.value.country == "ZZ"
    assert isinstance(info.value, PlanError)


def test_default_emergency() -> None:
    assert DEFAULT_EMERGENCY == "112"


def test_centre_serves() -> None:
    centre = Centre("x", "X", frozenset({"DE", "AT"}), 1, "+442079460100", "+442079460101", "en-GB")
    assert centre.serves("de") and centre.serves("AT") and not centre.serves("FR")
    anywhere = Centre("y", "Y", frozenset({"*"}), 9, "+442079460100", "+442079460101", "en-GB")
    assert anywhere.serves("FR") and anywhere.serves("zz")


# ------------------------------------------------------------------- temp plans

GOOD_COUNTRIES = [
    list(COUNTRY_COLUMNS),
    ["DE", "Germany", "112", "", "", "de-DE", "test", ""],
    ["FR", "France", "112", "+33140000000", "+33140000001", "fr-FR", "test", ""],
    ["US", "United States", "911", "", "", "en-US", "test", ""],
]


def _country(code: str, psap: str = "", caller_id: str = "", *, emergency: str = "112",
             language: str = "de-DE", source: str = "test") -> list[str]:
    return [code, code, emergency, psap, caller_id, language, source, ""]


def _centre(cid: str, countries: str, priority: int, n: int) -> list[str]:
    return [
        cid,
        cid.upper(),
        countries,
        str(priority),
        f"+4420794601{n:02d}",
        f"+4420794602{n:02d}",
        "en-GB",
    ]


GOOD_CENTRES = [
    list(CENTRE_COLUMNS),
    _centre("zeta", "DE FR", 2, 1),
    _centre("star-1", "*", 1, 2),
    _centre("beta", "DE", 1, 3),
    _centre("alpha", "DE US", 1, 4),
    _centre("star-9", "*", 9, 5),
]

GOOD_INBOUND = [
    list(INBOUND_COLUMNS),
    ["+442079460900", "emergency", "*", "test"],
    ["+442079460901", "roadside", "*", "test"],
    ["+12025550150", "emergency", "US", "test"],
]

GOOD_TWILIO = [
    list(TWILIO_EMERGENCY_COLUMNS),
    ["US", "911 933", "yes", "test"],
    ["DE", "112", "no", "test"],
]


def _write(
    directory: pathlib.Path,
    countries: list[list[str]] = GOOD_COUNTRIES,
    centres: list[list[str]] = GOOD_CENTRES,
    inbound: list[list[str]] = GOOD_INBOUND,
    twilio: list[list[str]] = GOOD_TWILIO,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    files = {"countries.csv": countries, "centres.csv": centres, "inbound.csv": inbound,
             "twilio_emergency.csv": twilio}
    for name, rows in files.items():
        with (directory / name).open("w", encoding="utf-8", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(rows)


def test_temp_plan_loads(tmp_path: pathlib.Path) -> None:
    _write(tmp_path)
    plan = load_plan(tmp_path)
    assert plan.countries() == ["DE", "FR", "US"]
    fr = plan.entry("fr")
    assert (fr.psap_number, fr.psap_caller_id) == ("+33140000000", "+33140000001")
    assert plan.entry("DE").psap_number == ""
    assert plan.source == str(tmp_path)
    assert plan.twilio_emergency("us") == TwilioEmergency("US", ("911", "933"), True, "test")
    assert plan.twilio_emergency("DE") == TwilioEmergency("DE", ("112",), False, "test")
    assert plan.twilio_emergency("FR") is None
    assert [n.number for n in plan.inbound] == ["+442079460900", "+442079460901",
                                                "+12025550150"]
    assert plan.inbound_for("emergency", "US") == InboundNumber(
        "+12025550150", "emergency", "US", "test")
    assert plan.inbound_for("emergency", "DE") == InboundNumber(
        "+442079460900", "emergency", "*", "test")
    assert plan.inbound_for("owner", "DE") is None


def test_psap_number_without_caller_id_passes_the_car_through(tmp_path: pathlib.Path) -> None:
    _write(tmp_path, GOOD_COUNTRIES + [_country("AT", "+4315551234")])
    at = load_plan(tmp_path).entry("AT")
    assert (at.psap_number, at.psap_caller_id) == ("+4315551234", "")


def test_inbound_may_be_empty(tmp_path: pathlib.Path) -> None:
    # the loader accepts it; `assist-gateway check` refuses a plan with no emergency number
    _write(tmp_path, inbound=[list(INBOUND_COLUMNS)], twilio=[list(TWILIO_EMERGENCY_COLUMNS)])
    plan = load_plan(tmp_path)
    assert plan.inbound == () and plan.twilio_emergency("US") is None


def test_centres_for_ordering(tmp_path: pathlib.Path) -> None:
    _write(tmp_path)
    plan = load_plan(tmp_path)
    # priority first; at equal priority specific centres before "*"; then centre_id
    assert [c.centre_id for c in plan.centres_for("de")] == [
        "alpha",
        "beta",
        "star-1",
        "zeta",
        "star-9",
    ]
    assert [c.centre_id for c in plan.centres_for("FR")] == ["star-1", "zeta", "star-9"]
    assert [c.centre_id for c in plan.centres_for("US")] == ["alpha", "star-1", "star-9"]
    assert [c.centre_id for c in plan.centres_for("JP")] == ["star-1", "star-9"]


def _bad(rows: list[list[str]], line: int, change: list[str] | None) -> list[list[str]]:
    """Copy of rows with the row at 1-based file line ``line`` replaced (or removed)."""
    out = [list(r) for r in rows]
    if change is None:
        del out[line - 1]
    else:
        out[line - 1] = change
    return out


def _expect(tmp_path: pathlib.Path, file: str, line: int | None, reason: str) -> None:
    """load_plan refuses the plan with ``<dir>/<file>:<line>: ...reason...``."""
    with pytest.raises(PlanError) as info:
        load_plan(tmp_path)
    message = str(info.value)
    where = str(tmp_path / file) + (f":{line}:" if line is not None else ":")
    assert message.startswith(where), message
    assert reason in message, message


COUNTRY_ERRORS = [
    pytest.param(
        [r[:6] + r[7:] for r in GOOD_COUNTRIES], 1, "missing column(s) source", id="missing-column"
    ),
    pytest.param(
        [r[:3] + r[5:] for r in GOOD_COUNTRIES], 1,
        "missing column(s) psap_number, psap_caller_id", id="old-format",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 3, ["FR", "France", "112", "+3312", "", "fr-FR", "test", ""]),
        3,
        "psap_number '+3312' for FR",
        id="invalid-psap-number",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 3, ["FR", "France", "112", "112", "", "fr-FR", "test", ""]),
        3,
        "psap_number '112' for FR is not in E.164 form",
        id="short-psap-number",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 3, ["FR", "France", "112", "+44 20 7946 0100", "", "fr-FR", "t",
                                 ""]),
        3,
        "E.164",
        id="psap-with-spaces",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 3, ["FR", "France", "112", "+33140000000", "+3314", "fr-FR", "t",
                                 ""]),
        3,
        "psap_caller_id '+3314' for FR",
        id="invalid-psap-caller-id",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 3, ["FR", "France", "112", "", "+33140000001", "fr-FR", "t", ""]),
        3,
        "psap_caller_id for FR needs a psap_number",
        id="caller-id-without-psap",
    ),
    pytest.param(
        GOOD_COUNTRIES + [_country("DE")],
        5,
        "duplicate country DE (first given on line 2)",
        id="duplicate-country",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 2, _country("de")), 2, "two upper-case letters", id="lower-case-code"
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 2, _country("DEU")), 2, "two upper-case letters", id="alpha-3-code"
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 4, _country("US", emergency="9-1-1")),
        4,
        "digits only",
        id="emergency-not-digits",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 4, _country("US", emergency="")),
        4,
        "emergency_number is empty",
        id="emergency-empty",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 4, _country("US")[:7]),
        4,
        "expected 8 fields, found 7",
        id="short-row",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 4, _country("US", source="")), 4, "source is empty", id="no-source"
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 4, _country("US", language="English")),
        4,
        "language 'English'",
        id="bad-language",
    ),
    pytest.param([list(COUNTRY_COLUMNS)], None, "no country rows", id="no-rows"),
]


@pytest.mark.parametrize(("countries", "line", "reason"), COUNTRY_ERRORS)
def test_countries_errors(
    tmp_path: pathlib.Path, countries: list[list[str]], line: int | None, reason: str
) -> None:
    # no twilio_emergency rows: its check needs the countries
    _write(tmp_path, countries, twilio=[list(TWILIO_EMERGENCY_COLUMNS)])
    _expect(tmp_path, "countries.csv", line, reason)


CENTRE_ERRORS = [
    pytest.param(
        [r[:4] + r[5:] for r in GOOD_CENTRES], 1, "missing column(s) number", id="missing-column"
    ),
    pytest.param(
        _bad(GOOD_CENTRES, 2, ["zeta", "Z", "DE", "1", "+447700900123", "+442079460101", "en"]),
        2,
        "number '+447700900123' is not a valid number",
        id="invalid-e164",
    ),
    pytest.param(
        _bad(GOOD_CENTRES, 2, ["zeta", "Z", "DE", "1", "02079460100", "+442079460101", "en"]),
        2,
        "E.164 form",
        id="national-format",
    ),
    pytest.param(
        _bad(GOOD_CENTRES, 3, ["star-1", "S", "*", "1", "+442079460100", "+4412", "en-GB"]),
        3,
        "roadside_number '+4412'",
        id="invalid-roadside",
    ),
    pytest.param(
        GOOD_CENTRES + [_centre("beta", "US", 3, 6)],
        7,
        "duplicate centre_id beta (first given on line 4)",
        id="duplicate-centre",
    ),
    pytest.param(
        _bad(GOOD_CENTRES, 2, _centre("zeta", "DE UK", 2, 1)),
        2,
        "country UK is neither in countries.csv nor a known country code",
        id="unknown-country",
    ),
    pytest.param(
        _bad(GOOD_CENTRES, 2, _centre("zeta", "DE *", 2, 1)),
        2,
        "'*' must be the only entry",
        id="wildcard-mixed",
    ),
    pytest.param(
        _bad(GOOD_CENTRES, 2, ["zeta", "Z", "DE", "0", "+442079460100", "+442079460101", "en"]),
        2,
        "priority '0'",
        id="priority-zero",
    ),
    pytest.param(
        _bad(GOOD_CENTRES, 2, ["zeta", "Z", "DE", "one", "+442079460100", "+442079460101", "en"]),
        2,
        "priority 'one'",
        id="priority-text",
    ),
    pytest.param(
        _bad(GOOD_CENTRES, 2, ["zeta", "Z", "", "1", "+442079460100", "+442079460101", "en"]),
        2,
        "countries is empty",
        id="no-countries",
    ),
]


@pytest.mark.parametrize(("centres", "line", "reason"), CENTRE_ERRORS)
def test_centres_errors(
    tmp_path: pathlib.Path, centres: list[list[str]], line: int, reason: str
) -> None:
    _write(tmp_path, centres=centres)
    _expect(tmp_path, "centres.csv", line, reason)


INBOUND_ERRORS = [
    pytest.param(
        [r[:1] + r[2:] for r in GOOD_INBOUND], 1, "missing column(s) service", id="missing-column"
    ),
    pytest.param(
        _bad(GOOD_INBOUND, 3, ["+442079460901", "breakdown", "*", "test"]),
        3,
        "service 'breakdown' is not one of emergency, roadside, owner",
        id="unknown-service",
    ),
    pytest.param(
        GOOD_INBOUND + [["+442079460900", "owner", "*", "test"]],
        5,
        "duplicate number +442079460900 (first given on line 2)",
        id="duplicate-number",
    ),
    pytest.param(
        _bad(GOOD_INBOUND, 2, ["02079460900", "emergency", "*", "test"]),
        2,
        "number '02079460900' is not in E.164 form",
        id="national-format",
    ),
    pytest.param(
        _bad(GOOD_INBOUND, 2, ["+447700900123", "emergency", "*", "test"]),
        2,
        "number '+447700900123' is not a valid number",
        id="invalid-number",
    ),
    pytest.param(
        _bad(GOOD_INBOUND, 4, ["+12025550150", "emergency", "UK", "test"]),
        4,
        "country 'UK' is neither '*' nor a known country code",
        id="unknown-country",
    ),
    pytest.param(
        _bad(GOOD_INBOUND, 4, ["+12025550150", "", "US", "test"]),
        4,
        "service is empty",
        id="no-service",
    ),
    pytest.param(
        _bad(GOOD_INBOUND, 4, ["+12025550150", "emergency", "US", ""]),
        4,
        "source is empty",
        id="no-source",
    ),
]


@pytest.mark.parametrize(("inbound", "line", "reason"), INBOUND_ERRORS)
def test_inbound_errors(
    tmp_path: pathlib.Path, inbound: list[list[str]], line: int, reason: str
) -> None:
    _write(tmp_path, inbound=inbound)
    _expect(tmp_path, "inbound.csv", line, reason)


TWILIO_ERRORS = [
    pytest.param(
        [r[:2] + r[3:] for r in GOOD_TWILIO], 1, "missing column(s) address_required",
        id="missing-column",
    ),
    pytest.param(
        GOOD_TWILIO + [["GB", "999 112", "yes", "test"]],
        4,
        "country 'GB' has no row in countries.csv",
        id="country-not-in-plan",
    ),
    pytest.param(
        GOOD_TWILIO + [["US", "911", "yes", "test"]],
        4,
        "duplicate country US (first given on line 2)",
        id="duplicate-country",
    ),
    pytest.param(
        _bad(GOOD_TWILIO, 3, ["DE", "112", "true", "test"]),
        3,
        "address_required 'true' for DE must be yes or no",
        id="bad-address-required",
    ),
    pytest.param(
        _bad(GOOD_TWILIO, 3, ["DE", "112 +49110", "no", "test"]),
        3,
        "numbers +49110 for DE are not short numbers",
        id="long-number",
    ),
    pytest.param(
        _bad(GOOD_TWILIO, 3, ["DE", "", "no", "test"]), 3, "numbers is empty", id="no-numbers"
    ),
    pytest.param(
        _bad(GOOD_TWILIO, 3, ["DE", "112", "no", ""]), 3, "source is empty", id="no-source"
    ),
]


@pytest.mark.parametrize(("twilio", "line", "reason"), TWILIO_ERRORS)
def test_twilio_emergency_errors(
    tmp_path: pathlib.Path, twilio: list[list[str]], line: int, reason: str
) -> None:
    _write(tmp_path, twilio=twilio)
    _expect(tmp_path, "twilio_emergency.csv", line, reason)


def test_centre_may_name_a_known_country_without_a_row(tmp_path: pathlib.Path) -> None:
    # A plan may leave a country out (routing then uses DEFAULT_EMERGENCY);
    # its centres still serve it.
    _write(tmp_path, centres=GOOD_CENTRES + [_centre("nordic", "SE DK", 1, 6)])
    plan = load_plan(tmp_path)
    assert plan.get("SE") is None
    assert [c.centre_id for c in plan.centres_for("se")] == ["nordic", "star-1", "star-9"]


def test_line_numbers_count_quoted_newlines(tmp_path: pathlib.Path) -> None:
    text = (
        ",".join(COUNTRY_COLUMNS) + "\n"
        'DE,"Germany,\nFederal Republic",112,,,de-DE,test,\n'
        "FR,France,112,+3312,,fr-FR,test,\n"
    )
    _write(tmp_path)
    (tmp_path / "countries.csv").write_text(text, encoding="utf-8")
    with pytest.raises(PlanError, match=r"countries\.csv:4: psap_number"):
        load_plan(tmp_path)


@pytest.mark.parametrize(
    "name", ["countries.csv", "centres.csv", "inbound.csv", "twilio_emergency.csv"]
)
def test_missing_files(tmp_path: pathlib.Path, name: str) -> None:
    with pytest.raises(PlanError, match="directory not found"):
        load_plan(tmp_path / "nowhere")
    _write(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(PlanError, match=re.escape(f"{tmp_path / name}: file not found")):
        load_plan(tmp_path)


def test_empty_file(tmp_path: pathlib.Path) -> None:
    _write(tmp_path)
    (tmp_path / "countries.csv").write_text("", encoding="utf-8")
    with pytest.raises(PlanError, match=r"countries\.csv:1: file is empty"):
        load_plan(tmp_path)


def test_blank_lines_and_bom_are_tolerated(tmp_path: pathlib.Path) -> None:
    _write(tmp_path)
    path = tmp_path / "countries.csv"
    path.write_text("\ufeff" + path.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")
    assert len(load_plan(tmp_path)) == 3
