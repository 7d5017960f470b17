"""Build the device's compact catalog file from Stellarium's deep-sky catalog and OpenNGC.

Every object of Stellarium's catalog.dat gets its designations, its proper name
(names.dat) and OUR label by the very rules that label the training set
(`nebula.train.stellarium.label_object`: the curated overrides, Stellarium's
type, OpenNGC's type, Stellarium's morphology, the catalog prefix), so the
catalog's answer on the Pi and the dataset's labels cannot drift apart. The
format belongs to the device (`nebula.device.skycatalog.write`).

    nebula catalog build --out models/skycatalog.npz
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from nebula.device import skycatalog
from nebula.device.config import DEFAULT_CATALOG
from nebula.train.catalogs import OpenNgc, StellariumCatalog
from nebula.train.stellarium import DEFAULT_SOURCE, Identification, label_object, read_overrides, reason_kind

CREDITS = {
    "stellarium": ("Stellarium's deep-sky catalog (nebulae/default/catalog.dat and names.dat, Debian package "
                   "stellarium-data), compiled by the Stellarium team from NGC/IC, Messier, Caldwell, Barnard, "
                   "Sharpless, van den Bergh, RCW, LDN, LBN, PGC, UGC and other catalogues; GPL-2.0-or-later"),
    "openngc": "OpenNGC by Mattia Verga (https://github.com/mattiaverga/OpenNGC, via the pyongc package); CC-BY-SA-4.0",
}


def build_entries(catalog: StellariumCatalog, overrides: dict, openngc: OpenNgc | None) -> list[skycatalog.CatalogEntry]:
    """One entry per Stellarium object, labelled by the training set's rules."""
    entries = []
    for obj in catalog.objects:
        ident = Identification(obj.designation, "catalog", obj)
        found = label_object(ident, overrides, openngc)
        label, rule = (found[0], _rule(found[1])) if found else (None, None)
        name = next((catalog.names[key][0] for key in ident.keys if key in catalog.names), "")
        entries.append(skycatalog.CatalogEntry(ids=obj.ids or (f"DSO {obj.number}",), ra=obj.ra, dec=obj.dec,
                                               size_deg=obj.size, type_code=obj.type_code, label=label, rule=rule,
                                               name=name))
    return entries


def _rule(reason: str) -> str:
    kind = reason_kind(reason)
    return "OpenNGC type" if kind == "catalog type" and "OpenNGC" in reason.split(";")[0] else kind


def build(source: str | Path = DEFAULT_SOURCE, out: str | Path = DEFAULT_CATALOG) -> tuple[Path, list]:
    """Write the catalog file; returns its path and the entries written."""
    source = Path(source)
    catalog = StellariumCatalog.load(source)
    openngc = OpenNgc.from_pyongc()
    try:
        entries = build_entries(catalog, read_overrides(), openngc)
    finally:
        openngc.close()
    about = {
        "what": "nebula-classifier sky catalog: deep-sky objects with our labels (nebula.device.skycatalog)",
        "sources": CREDITS,
        "source_folder": str(source),
        "objects": len(entries),
        "built_utc": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    return skycatalog.write(out, entries, about), entries
