"""The delivery centre's bulk file: ``python -m gateway vehicles import FILE.csv``.

The file: UTF-8 (a byte-order mark is fine), comma-separated, a header row naming the
columns in any order (case and surrounding spaces ignored), one vehicle per row:

======================  ==================================================================
column                  content (rules: :mod:`gateway.owners.vehicle_fields`)
======================  ==================================================================
``vin``                 required; the key: a VIN already registered is updated
``car_msisdn``          required; E.164 or the national form of the market
``market``              required; ISO country code (``SE``)
``purchase_date``       required; ``YYYY-MM-DD``
``serviced_regularly``  ``true``/``false``, ``yes``/``no``, ``1``/``0``; empty: false
``owner_name``          required
``owner_phones``        required; one or more numbers separated by ``;`` (the first gets
                        the theft SMS); the header ``owner_phone`` is read the same way
``language``            optional (``sv-SE``); empty: the market's language
``pin``                 optional column and cell: the owner's first PIN, 4 to 8 digits;
                        applied only to a vehicle that has no PIN yet (a re-import never
                        overrides a PIN the owner has changed since)
======================  ==================================================================

All or nothing: every row is checked first (fields, a VIN or car SIM twice in the file,
a car SIM registered to a vehicle outside the file); any problem is reported as
``FILE:LINE: FIELD: reason`` and nothing is written.  Then PINs are hashed and every
row is written in one transaction: a row is *created*, *updated* (the fields named)
or *unchanged*, so running the same file again changes nothing.  A PIN never appears
in a report.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import ValidationError
from gateway.owners.enrolment import ImportResult
from gateway.owners.pins import PIN_FORMAT_MESSAGE, is_valid_pin
from gateway.owners.registry import Vehicles
from gateway.owners.vehicle_fields import FIELDS, REQUIRED, VehicleRecord, parse_record

COLUMNS = (*FIELDS, "pin")
_ALIASES = {"owner_phone": "owner_phones"}


@dataclass(frozen=True)
class RowError:
    line: int
    field: str
    reason: str

    def format(self, name: str) -> str:
        return f"{name}:{self.line}: {self.field}: {self.reason}"


@dataclass
class _Row:
    line: int
    record: VehicleRecord
    pin: str | None  # dropped as soon as it is hashed


@dataclass
class ImportReport:
    """What an import did (or, with errors, why it did nothing)."""

    errors: list[RowError] = field(default_factory=list)
    #: (line, result), in file order
    results: list[tuple[int, ImportResult]] = field(default_factory=list)
    dry_run: bool = False

    def count(self, kind: str) -> int:
        return sum(1 for _, r in self.results if r.result == kind)


def read_rows(text: str, *, today: dt.date) -> tuple[list[_Row], list[RowError]]:
    """Parse and check every row; the rows only when there is no error at all."""
    errors: list[RowError] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or not any(h.strip() for h in header):
        return [], [RowError(1, "header", "the file is empty; the first row names the "
                                          f"columns ({', '.join(COLUMNS)})")]
    names = [_ALIASES.get(h.strip().lower(), h.strip().lower()) for h in header]
    for i, name in enumerate(names):
        if name not in COLUMNS:
            errors.append(RowError(1, header[i].strip()[:64] or f"column {i + 1}",
                                   "unknown column"))
        elif names.index(name) != i:
            errors.append(RowError(1, name, "column given twice"))
    errors += [RowError(1, c, "required column missing") for c in FIELDS
               if c in REQUIRED and c not in names]
    if errors:
        return [], errors

    rows: list[_Row] = []
    seen_vin: dict[str, int] = {}
    seen_sim: dict[str, int] = {}
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue  # a blank line
        if len(cells) != len(names):
            errors.append(RowError(line, "row", f"{len(cells)} cells; the header has "
                                                f"{len(names)} columns"))
            continue
        values = dict(zip(names, cells, strict=True))
        pin = values.pop("pin", "").strip() or None
        row_errors: dict[str, str] = {}
        if pin is not None and not is_valid_pin(pin):
            row_errors["pin"] = PIN_FORMAT_MESSAGE
            pin = None
        try:
            record = parse_record(values, text=True, today=today)
        except ValidationError as exc:
            row_errors = {**exc.errors, **row_errors}
        else:
            for key, seen, what in ((record.vin, seen_vin, "vin"),
                                    (record.car_msisdn, seen_sim, "car_msisdn")):
                if key in seen:
                    row_errors[what] = f"the same as on line {seen[key]}"
                else:
                    seen[key] = line
            rows.append(_Row(line, record, pin))
        errors += [RowError(line, f, reason) for f, reason in row_errors.items()]
    if not rows and not errors:
        errors.append(RowError(1, "file", "no vehicle rows after the header"))
    return ([] if errors else rows), errors


def _decode(data: bytes) -> tuple[str, RowError | None]:
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return "", RowError(line, "file", "not UTF-8 text (save the file as CSV UTF-8)")


def import_file(path: Path, *, registry: Vehicles, actor: str,
                dry_run: bool = False) -> ImportReport:
    """Check the whole file, then write it in one transaction (or, ``dry_run``, say
    what would happen).  Database errors surface as StoreError, nothing written."""
    report = ImportReport(dry_run=dry_run)
    text, problem = _decode(path.read_bytes())
    if problem is not None:
        report.errors.append(problem)
        return report
    today = dt.datetime.fromtimestamp(registry.clock(), tz=dt.UTC).date()
    rows, report.errors = read_rows(text, today=today)
    if report.errors:
        return report
    vins = [r.record.vin for r in rows]
    holders = registry.sim_holders(r.record.car_msisdn for r in rows)
    for row in rows:
        holder = holders.get(row.record.car_msisdn)
        if holder is not None and holder != row.record.vin:
            report.errors.append(RowError(row.line, "car_msisdn",
                                          f"already registered to vehicle {holder}"))
    if report.errors:
        return report

    current = registry.records(vins)
    with_pin = registry.with_pin(vins)
    if dry_run:
        for row in rows:
            report.results.append((row.line, _would(row, current, with_pin)))
        return report
    to_write: list[tuple[VehicleRecord, str | None]] = []
    for row in rows:
        pin_hash = None
        if row.pin is not None and row.record.vin not in with_pin:
            pin_hash = registry.hasher.hash(row.pin)
        row.pin = None
        to_write.append((row.record, pin_hash))
    results = registry.import_records(to_write, actor=actor)
    report.results = [(row.line, result) for row, result in zip(rows, results, strict=True)]
    return report


def _would(row: _Row, current: Mapping[str, VehicleRecord], with_pin: set[str]) -> ImportResult:
    before = current.get(row.record.vin)
    if before is None:
        return ImportResult(row.record.vin, "created", "")
    changed = row.record.differences(before)
    if row.pin is not None and row.record.vin not in with_pin:
        changed.append("pin")
    return ImportResult(row.record.vin, "updated" if changed else "unchanged", "",
                        tuple(changed))
