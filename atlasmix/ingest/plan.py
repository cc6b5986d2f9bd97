"""Ingest plans: a TOML file listing the datasets of one ``atlasmix ingest STORE --plan PLAN``."""

from __future__ import annotations

from pathlib import Path

from atlasmix._files import load_toml
from atlasmix.errors import AtlasmixError
from atlasmix.ingest.ingest import DatasetRequest


def read_plan(plan: str | Path, common: dict | None = None) -> list[DatasetRequest]:
    """The datasets of an ingest plan (TOML, one ``[[dataset]]`` table per dataset) as requests.

    Parameters
    ----------
    plan : path
        The plan file. Relative ``source``, ``obs_table`` and ``gene_table`` paths are relative to it.
    common : dict, optional
        :class:`DatasetRequest` fields every entry starts from (an entry's own keys win), e.g.
        ``{"qc": QCPolicy()}``.

    Returns
    -------
    list of DatasetRequest, in plan order

    Raises
    ------
    AtlasmixError
        Missing file, bad TOML, no ``[[dataset]]`` entries, or an entry that is not a valid request
        (the message names the entry and key).
    """
    plan = Path(plan)
    common = common or {}
    doc = load_toml(plan, missing="plan not found: {path}", bad="bad plan {path}: {error}")
    items = doc.get("dataset")
    if not isinstance(items, list) or not items:
        raise AtlasmixError(f"plan {plan} has no [[dataset]] entries")
    reqs = []
    for i, d in enumerate(items):
        d = dict(common) | dict(d)
        src = d.get("source", "")
        if src and "://" not in src and not Path(src).is_absolute():
            d["source"] = str((plan.parent / src).resolve())
        for k in ("obs_table", "gene_table"):
            if d.get(k) and not Path(d[k]).is_absolute():
                d[k] = str((plan.parent / d[k]).resolve())
        try:
            reqs.append(DatasetRequest(**d))
        except Exception as e:  # pydantic ValidationError: point at the entry and key
            first = e.errors()[0] if hasattr(e, "errors") else {"loc": (), "msg": str(e)}
            loc = ".".join(map(str, first["loc"]))
            raise AtlasmixError(f"plan {plan.name}: dataset[{i}].{loc}: {first['msg']}") from e
    return reqs
