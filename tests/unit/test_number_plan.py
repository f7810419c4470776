"""The number plan in numbers/ and its loader, gateway.plan.

Every row of numbers/countries.csv and numbers/centres.csv is checked with
libphonenumber: E.164 numbers must be valid, emergency numbers must be known
to libphonenumber's short-number data for the region unless the row carries
an explained exception (and then libphonenumber must really not know it, so a
stale exception fails).
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
    Centre,
    NumberPlan,
    load_plan,
    plan_dir_default,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
PLAN_DIR = REPO / "numbers"
COUNTRIES_CSV = PLAN_DIR / "countries.csv"
CENTRES_CSV = PLAN_DIR / "centres.csv"
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

# Countries where Twilio Programmable Voice can dial the emergency number.
TWILIO_EMERGENCY_COUNTRIES = frozenset(
    {"US", "CA", "GB", "AU", "IE", "FR", "DE", "AT", "MY", "TH", "PH", "NZ", "IT"}
)


def _read(path: pathlib.Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


COUNTRY_ROWS = _read(COUNTRIES_CSV)
CENTRE_ROWS = _read(CENTRES_CSV)
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

    # fallback_dial: the emergency number itself, or an operator's E.164 route.
    fallback = row["fallback_dial"]
    if fallback.startswith("+"):
        assert _is_valid_e164(fallback), fallback
    else:
        assert fallback == number

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


@pytest.mark.parametrize("code", sorted(TWILIO_EMERGENCY_COUNTRIES))
def test_twilio_emergency_countries_dial_a_known_number(code: str, plan: NumberPlan) -> None:
    entry = plan.entry(code)
    assert not entry.exception
    assert shortnumberinfo.is_emergency_number(entry.fallback_dial, code)


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
    assert (default / "countries.csv").is_file()
    assert (default / "centres.csv").is_file()
    assert len(load_plan()) == len(COUNTRY_ROWS)


def test_entry_and_get(plan: NumberPlan) -> None:
    us = plan.entry("us")
    assert (us.country, us.emergency_number, us.fallback_dial) == ("US", "911", "911")
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
    ["DE", "Germany", "112", "112", "de-DE", "test", ""],
    ["FR", "France", "112", "+33140000000", "fr-FR", "test", ""],
    ["US", "United States", "911", "911", "en-US", "test", ""],
]


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


def _write(directory: pathlib.Path, countries: list[list[str]], centres: list[list[str]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("countries.csv", countries), ("centres.csv", centres)):
        with (directory / name).open("w", encoding="utf-8", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(rows)


def test_temp_plan_loads(tmp_path: pathlib.Path) -> None:
    _write(tmp_path, GOOD_COUNTRIES, GOOD_CENTRES)
    plan = load_plan(tmp_path)
    assert plan.countries() == ["DE", "FR", "US"]
    assert plan.entry("fr").fallback_dial == "+33140000000"
    assert plan.source == str(tmp_path)


def test_centres_for_ordering(tmp_path: pathlib.Path) -> None:
    _write(tmp_path, GOOD_COUNTRIES, GOOD_CENTRES)
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


COUNTRY_ERRORS = [
    pytest.param(
        [r[:5] + r[6:] for r in GOOD_COUNTRIES], 1, "missing column(s) source", id="missing-column"
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 3, ["FR", "France", "112", "+3312", "fr-FR", "test", ""]),
        3,
        "fallback_dial '+3312'",
        id="invalid-e164",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 3, ["FR", "France", "112", "+44 20 7946 0100", "fr-FR", "t", ""]),
        3,
        "E.164",
        id="e164-with-spaces",
    ),
    pytest.param(
        GOOD_COUNTRIES + [["DE", "Germany again", "112", "112", "de-DE", "test", ""]],
        5,
        "duplicate country DE (first given on line 2)",
        id="duplicate-country",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 2, ["de", "Germany", "112", "112", "de-DE", "test", ""]),
        2,
        "two upper-case letters",
        id="lower-case-code",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 2, ["DEU", "Germany", "112", "112", "de-DE", "test", ""]),
        2,
        "two upper-case letters",
        id="alpha-3-code",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 4, ["US", "United States", "9-1-1", "911", "en-US", "t", ""]),
        4,
        "digits only",
        id="emergency-not-digits",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 4, ["US", "United States", "", "911", "en-US", "t", ""]),
        4,
        "emergency_number is empty",
        id="emergency-empty",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 4, ["US", "United States", "911", "9x1", "en-US", "t", ""]),
        4,
        "fallback_dial '9x1'",
        id="fallback-garbage",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 4, ["US", "United States", "911", "911", "en-US", "t"]),
        4,
        "expected 7 fields, found 6",
        id="short-row",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 4, ["US", "United States", "911", "911", "en-US", "", ""]),
        4,
        "source is empty",
        id="no-source",
    ),
    pytest.param(
        _bad(GOOD_COUNTRIES, 4, ["US", "United States", "911", "911", "English", "t", ""]),
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
    _write(tmp_path, countries, GOOD_CENTRES)
    with pytest.raises(PlanError) as info:
        load_plan(tmp_path)
    message = str(info.value)
    where = str(tmp_path / "countries.csv") + (f":{line}:" if line is not None else ":")
    assert message.startswith(where), message
    assert reason in message


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
    _write(tmp_path, GOOD_COUNTRIES, centres)
    with pytest.raises(PlanError) as info:
        load_plan(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'centres.csv'}:{line}:"), message
    assert reason in message


def test_centre_may_name_a_known_country_without_a_row(tmp_path: pathlib.Path) -> None:
    # A plan may leave a country out (routing then uses DEFAULT_EMERGENCY);
    # its centres still serve it.
    _write(tmp_path, GOOD_COUNTRIES, GOOD_CENTRES + [_centre("nordic", "SE DK", 1, 6)])
    plan = load_plan(tmp_path)
    assert plan.get("SE") is None
    assert [c.centre_id for c in plan.centres_for("se")] == ["nordic", "star-1", "star-9"]


def test_line_numbers_count_quoted_newlines(tmp_path: pathlib.Path) -> None:
    text = (
        ",".join(COUNTRY_COLUMNS) + "\n"
        'DE,"Germany,\nFederal Republic",112,112,de-DE,test,\n'
        "FR,France,112,+3312,fr-FR,test,\n"
    )
    _write(tmp_path, GOOD_COUNTRIES, GOOD_CENTRES)
    (tmp_path / "countries.csv").write_text(text, encoding="utf-8")
    with pytest.raises(PlanError, match=r"countries\.csv:4: fallback_dial"):
        load_plan(tmp_path)


def test_missing_files(tmp_path: pathlib.Path) -> None:
    with pytest.raises(PlanError, match="directory not found"):
        load_plan(tmp_path / "nowhere")
    _write(tmp_path, GOOD_COUNTRIES, GOOD_CENTRES)
    (tmp_path / "centres.csv").unlink()
    with pytest.raises(PlanError, match=r"centres\.csv: file not found"):
        load_plan(tmp_path)


def test_empty_file(tmp_path: pathlib.Path) -> None:
    _write(tmp_path, GOOD_COUNTRIES, GOOD_CENTRES)
    (tmp_path / "countries.csv").write_text("", encoding="utf-8")
    with pytest.raises(PlanError, match=r"countries\.csv:1: file is empty"):
        load_plan(tmp_path)


def test_blank_lines_and_bom_are_tolerated(tmp_path: pathlib.Path) -> None:
    _write(tmp_path, GOOD_COUNTRIES, GOOD_CENTRES)
    path = tmp_path / "countries.csv"
    path.write_text("\ufeff" + path.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")
    assert len(load_plan(tmp_path)) == 3
