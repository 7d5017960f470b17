"""Know the object: where a file points and what the catalogs say is there, beside the model's answer.

For each classified file: the position from its FITS header (`nebula.device.position`),
else, when solving is on, from a plate solve (`nebula.device.platesolve`); then the
catalog's objects in that field (`nebula.device.skycatalog`) and whether the
catalog's label for the main one agrees with the model's. The answer becomes
the result record's ``position``, ``catalog``, ``agrees`` and ``position_note``
fields, on every route (classify, the daemon's log, the web page).

Nothing here stops a run: a missing catalog file or solver is said once when
the `Identifier` is made, and each record that lacks a position says why.
`annotate_fits` writes the answers into a copy of a FITS file, never the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nebula.device import platesolve
from nebula.device.position import position_of_file
from nebula.device.skycatalog import CatalogFileError, SkyCatalog, agreement


@dataclass
class SkyAnswer:
    """The record fields this module adds (None: left out of the record)."""

    position: dict | None = None
    catalog: dict | None = None
    agrees: bool | None = None
    position_note: str | None = None

    def fields(self) -> dict:
        return {"position": self.position, "catalog": self.catalog, "agrees": self.agrees,
                "position_note": self.position_note}


class Identifier:
    """Loaded once per run: the catalog (None when unavailable) and whether to plate-solve."""

    def __init__(self, catalog: SkyCatalog | None, solve: bool = False, cpulimit_s: int = platesolve.DEFAULT_CPULIMIT_S,
                 catalog_problem: str | None = None):
        self.catalog, self.solve, self.cpulimit_s = catalog, solve, cpulimit_s
        self.catalog_problem = catalog_problem
        self.solve_problem = platesolve.unavailable_reason() if solve else None

    @classmethod
    def from_config(cls, config) -> "Identifier | None":
        """The identifier a RunConfig asks for (None when its catalog is off); never raises for a missing file."""
        if not config.catalog:
            return None
        try:
            catalog, problem = SkyCatalog.load(config.catalog_file), None
        except CatalogFileError as err:
            catalog, problem = None, f"catalog look-up unavailable: {err}"
        return cls(catalog, config.solve, config.solve_cpulimit_s, problem)

    def problems(self) -> list[str]:
        """One line for each part that cannot work here (announced once at the start of a run)."""
        return [p for p in (self.catalog_problem, self.solve_problem) if p]

    def identify(self, path: str | Path, model_label: str | None) -> SkyAnswer:
        found = position_of_file(path)
        notes = list(found.warnings)
        position = found.position
        if position is None:
            if not self.solve:
                notes.append("no position in the file's header (plate solving is off: --solve)")
            elif self.solve_problem:
                notes.append(self.solve_problem)
            else:
                solved = platesolve.solve(path, field_hint_deg=found.field_deg, cpulimit_s=self.cpulimit_s)
                position = solved.position
                if position is None:
                    notes.append(solved.reason)
        answer = SkyAnswer(position_note="; ".join(notes) or None)
        if position is None:
            return answer
        answer.position = {**position.to_record(), **({"target": found.target} if found.target else {})}
        if self.catalog is None:  # the full reason was announced once; each record says it briefly
            answer.position_note = "; ".join([*notes, "catalog look-up unavailable (no usable catalog file)"])
            return answer
        field = self.catalog.field(position)
        answer.catalog = field.to_record()
        answer.agrees = agreement(model_label, field.label)
        return answer


def catalog_line(record: dict) -> str | None:
    """The catalog's answer as people read it, for the table output: None when the record has none to give."""
    position, catalog, note = record.get("position"), record.get("catalog"), record.get("position_note")
    if position is None:
        return f"position: {note}" if note else None
    field = position.get("field_deg")
    where = (f"{position['source']} RA {position['ra']:.3f} Dec {position['dec']:+.3f}"
             + (f", field {field * 60:.0f}'" if field else ", field unknown"))
    main = (catalog or {}).get("main")
    if main is None:
        text = "no catalog object in the field" if catalog is not None else "no catalog"
    else:
        name = f" ({main['name']})" if main.get("name") else ""
        agrees = {True: "agrees", False: "DISAGREES"}.get(record.get("agrees"), "no comparison")
        text = f"{main['designation']}{name}, {main['type']} -> {main['label'] or 'no label'}; model {agrees}"
        following = ", ".join(o["designation"] for o in catalog.get("next", []))
        text += f"; also {following}" if following else ""
    return f"catalog: {text}  [{where}]" + (f"  ({note})" if note else "")


FITS_CARDS = {  # header keyword -> (record key path, comment); FITS keywords are at most 8 characters
    "NEBLABEL": (("label",), "nebula-classifier: the model's label"),
    "NEBSCORE": (("score",), "nebula-classifier: the model's score"),
    "NEBCATOB": (("catalog", "main", "designation"), "nebula-classifier: catalog's main object"),
    "NEBCATLB": (("catalog", "main", "label"), "nebula-classifier: catalog's label for it"),
    "NEBAGREE": (("agrees",), "nebula-classifier: model and catalog agree"),
    "NEBPOSRC": (("position", "source"), "nebula-classifier: position from header|solve"),
    "NEBSHA": (("model_sha256",), "nebula-classifier: model file sha256 (first 16)"),
}


def _dig(record: dict, keys: tuple[str, ...]):
    value = record
    for key in keys:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


def annotate_fits(source: str | Path, out_dir: str | Path, record: dict) -> Path:
    """Copy a FITS file into `out_dir` with the answers in its image header; the original is only read.

    Raises ValueError (not a FITS file, or `out_dir` is where the original is) and OSError.
    """
    from astropy.io import fits  # FITS writing only: imported here

    source, out_dir = Path(source), Path(out_dir)
    target = out_dir / source.name
    out_dir.mkdir(parents=True, exist_ok=True)
    if target.resolve() == source.resolve():
        raise ValueError(f"--annotate-fits {out_dir} is the original's folder: the copy would replace {source.name}")
    with fits.open(source, memmap=False) as hdus:
        image = next((h for h in hdus if h.is_image and h.header.get("NAXIS", 0) >= 2), None)
        if image is None:
            raise ValueError("no image HDU to annotate")
        for keyword, (keys, comment) in FITS_CARDS.items():
            value = _dig(record, keys)
            if value is not None:
                image.header[keyword] = (value[:16] if keyword == "NEBSHA" else value, comment)
        hdus.writeto(target, overwrite=True, output_verify="silentfix")
    return target
