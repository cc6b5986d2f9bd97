"""Manifests: the frozen result of a mixture, as parquet + a JSON sidecar.

``MANIFEST.parquet``
    Columns ``soma_joinid`` (int64), ``component`` (component or eval-set name) and ``split``
    (``train`` | ``validation`` | ``eval``), both dictionary-encoded strings (pandas: categorical),
    sorted by (soma_joinid, split, component).
    A cell appears once among train/validation rows; a cell of several eval sets has one eval row
    per set. Written byte-deterministically: fixed writer options (zstd level 3, dictionary
    encoding, one row group per 1M rows, no page index, format 2.6) and key-value metadata holding
    only the mixture name, spec hash, store identity and atlasmix version, never a timestamp. The
    same spec on the same store state (and the same pyarrow, whose version string parquet records)
    gives a byte-identical file.
``MANIFEST.json`` (the sidecar; ``MANIFEST`` minus ``.parquet`` plus ``.json``)
    ``spec`` (canonical), ``spec_hash``, ``store`` identity (``store_id``, ``uri``, ``n_cells``,
    ``state_hash``), ``manifest`` (file name, sha256, rows), ``counts`` per split, ``components``,
    ``eval_sets``, ``excluded``, ``composition`` (component x split x dataset x cell type counts),
    ``disjointness`` (the train/eval check, with a sentence), ``atlasmix_version``.

A later ingest changes the store's ``state_hash``; :func:`read_manifest` with ``store=`` refuses a
manifest whose store changed (joinids are never reused, so the cells still exist, but the corpus a
spec would now resolve to may differ).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from atlasmix import __version__
from atlasmix._files import sha256_of
from atlasmix._ids import unique_ids
from atlasmix.errors import AtlasmixError
from atlasmix.mixing.manifest_table import MANIFEST_SCHEMA, Resolution

FORMAT = "atlasmix-manifest/1"
_WRITE_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=True, write_statistics=True,
                      version="2.6", data_page_version="1.0", data_page_size=1 << 20, row_group_size=1 << 20,
                      write_page_index=False, write_page_checksum=False, store_schema=True,
                      use_compliant_nested_type=True)


def sidecar_path(manifest: str | Path) -> Path:
    """``runs/base.parquet`` -> ``runs/base.json``."""
    p = Path(manifest)
    return p.with_suffix(".json")


def write_manifest(res: Resolution, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the parquet manifest and its JSON sidecar.

    Parameters
    ----------
    res : Resolution
        From :func:`atlasmix.mixing.resolve`.
    out : path
        Manifest path, must end in ``.parquet``; the sidecar goes next to it (:func:`sidecar_path`).
    overwrite : bool
        Replace existing files.

    Returns
    -------
    dict
        The sidecar.

    Raises
    ------
    AtlasmixError
        ``out`` does not end in ``.parquet``, or exists and ``overwrite`` is False.
    """
    out = Path(out)
    if out.suffix != ".parquet":
        raise AtlasmixError(f"the manifest path must end in .parquet, got {out}")
    side = sidecar_path(out)
    if not overwrite and (out.exists() or side.exists()):
        raise AtlasmixError(f"{out if out.exists() else side} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"name": res.spec.name, "spec_hash": res.spec_hash, "store_id": res.store.get("store_id", ""),
            "state_hash": res.store.get("state_hash", ""), "atlasmix_version": __version__, "format": FORMAT}
    table = res.table.cast(MANIFEST_SCHEMA).replace_schema_metadata({"atlasmix": json.dumps(meta, sort_keys=True)})
    tmp = out.with_name(out.name + ".partial")
    pq.write_table(table, tmp, **_WRITE_OPTIONS)
    os.replace(tmp, out)
    sidecar = {
        "format": FORMAT,
        "name": res.spec.name,
        "description": res.spec.description,
        "atlasmix_version": __version__,
        "spec_path": res.spec_path,
        "spec_hash": res.spec_hash,
        "spec": res.spec.canonical(),
        "store": res.store,
        "manifest": {"file": out.name, "sha256": sha256_of(out), "n_rows": table.num_rows,
                     "bytes": out.stat().st_size},
        "counts": dict(res.counts),
        "components": res.components,
        "eval_sets": res.eval_sets,
        "excluded": res.excluded,
        "disjointness": res.disjointness,
        "composition": res.composition,
    }
    tmp = side.with_name(side.name + ".partial")
    tmp.write_text(json.dumps(sidecar, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, side)
    return sidecar


def read_sidecar(manifest: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a manifest.

    Raises
    ------
    AtlasmixError
        Manifest or sidecar missing or not an atlasmix manifest.
    """
    m = Path(manifest)
    side = sidecar_path(m)
    if not m.is_file():
        raise AtlasmixError(f"manifest not found: {m}")
    if not side.is_file():
        raise AtlasmixError(f"sidecar not found: {side} (a manifest is the .parquet plus its .json)")
    try:
        doc = json.loads(side.read_text())
    except ValueError as e:
        raise AtlasmixError(f"bad sidecar {side}: {e}") from None
    if doc.get("format") != FORMAT:
        raise AtlasmixError(f"{side} is not an atlasmix manifest sidecar")
    return doc


def check_store(sidecar: dict[str, Any], store) -> dict[str, Any]:
    """Compare a manifest's recorded store identity with ``store`` now.

    Returns
    -------
    dict
        ``same_store`` (store_id equal), ``same_state`` (state_hash equal), ``recorded``, ``current``.
    """
    cur = store.identity()
    rec = sidecar.get("store", {})
    return {"same_store": rec.get("store_id") == cur["store_id"], "same_state": rec.get("state_hash") == cur["state_hash"],
            "recorded": rec, "current": cur}


def read_manifest(manifest: str | Path, store=None, verify: bool = True) -> tuple[pa.Table, dict[str, Any]]:
    """Read a manifest for a loader: the table and its sidecar, verified.

    Parameters
    ----------
    manifest : path
        The ``.parquet`` file.
    store : atlasmix.store.Store, optional
        When given, the manifest must come from this store in its current state.
    verify : bool
        Check the file's sha256 against the sidecar.

    Returns
    -------
    (pyarrow.Table, dict)
        ``soma_joinid``/``component``/``split`` table and the sidecar.

    Raises
    ------
    AtlasmixError
        Files missing, sha256 mismatch (the file was modified), another store, or a store whose
        visible cells changed since resolution (re-resolve the spec).
    """
    m = Path(manifest)
    side = read_sidecar(m)
    if verify and sha256_of(m) != side["manifest"]["sha256"]:
        raise AtlasmixError(f"{m} does not match the sha256 in its sidecar: the manifest was modified")
    if store is not None:
        chk = check_store(side, store)
        if not chk["same_store"]:
            raise AtlasmixError(f"{m.name} was resolved on store {chk['recorded'].get('store_id')}, not on "
                                f"{chk['current']['store_id']} ({store.uri})")
        if not chk["same_state"]:
            raise AtlasmixError(f"the store changed since {m.name} was resolved (state_hash "
                                f"{chk['recorded'].get('state_hash', '')[:12]} -> {chk['current']['state_hash'][:12]}); "
                                "resolve the spec again")
    return pq.read_table(m), side


def read_manifest_cells(manifest: str | Path, identity: dict | None = None) -> tuple[np.ndarray, dict]:
    """All soma_joinids of a manifest (any split) for an ``exclude``, checked against ``identity``.

    Returns
    -------
    (numpy.ndarray of int64, dict)
        Unique sorted joinids; info (``sha256``, ``name``, ``same_state``).

    Raises
    ------
    AtlasmixError
        The manifest belongs to another store (its joinids would mean other cells).
    """
    m = Path(manifest)
    side = read_sidecar(m)
    sha = sha256_of(m)
    if sha != side["manifest"]["sha256"]:
        raise AtlasmixError(f"{m} does not match the sha256 in its sidecar: the manifest was modified")
    rec = side.get("store", {})
    if identity is not None and identity.get("store_id") and rec.get("store_id") != identity.get("store_id"):
        raise AtlasmixError(f"cannot exclude {m.name}: it was resolved on another store ({rec.get('store_id')})")
    ids = pq.read_table(m, columns=["soma_joinid"])["soma_joinid"].to_numpy()
    same = identity is None or rec.get("state_hash") == identity.get("state_hash")
    return unique_ids(ids), {"name": side.get("name"), "sha256": sha, "same_state": bool(same)}


# ---------------------------------------------------------------------------------------------- show / diff
def composition_frame(sidecar: dict[str, Any], by: str = "dataset_id"):
    """Cells per component x split x ``by`` (``dataset_id`` or ``cell_type``) as a pandas DataFrame."""
    import pandas as pd

    df = pd.DataFrame(sidecar["composition"], columns=["component", "split", "dataset_id", "cell_type", "n_cells"])
    if df.empty:
        return df
    return df.groupby(["component", "split", by], as_index=False)["n_cells"].sum()


def _totals(sidecar: dict[str, Any], key: str) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = defaultdict(int)
    for r in sidecar["composition"]:
        out[(r["split"] if r["split"] == "eval" else "train+validation", r[key])] += r["n_cells"]
    return dict(out)


def diff_manifests(a: str | Path, b: str | Path) -> dict[str, Any]:
    """Compare two manifests: cells, components, datasets, specs and stores.

    Returns
    -------
    dict
        ``cells`` (train+validation cells only in A, only in B, in both; eval likewise),
        ``components`` and ``datasets`` (per name: cells in A, in B), ``spec_changes`` (dotted keys
        whose values differ), ``same_store``, ``same_state``, ``a``/``b`` (names, hashes).

    Raises
    ------
    AtlasmixError
        A file is missing or modified.
    """
    ta, sa = read_manifest(a)
    tb, sb = read_manifest(b)

    def cells(t: pa.Table, train: bool) -> np.ndarray:
        is_eval = pc.equal(t["split"].cast(pa.string()), "eval").to_numpy(zero_copy_only=False)
        ids = t["soma_joinid"].to_numpy()
        return unique_ids(ids[~is_eval if train else is_eval])

    out: dict[str, Any] = {"a": {"name": sa["name"], "spec_hash": sa["spec_hash"], "file": str(a)},
                           "b": {"name": sb["name"], "spec_hash": sb["spec_hash"], "file": str(b)}}
    for label, train in (("train+validation", True), ("eval", False)):
        xa, xb = cells(ta, train), cells(tb, train)
        both = np.intersect1d(xa, xb, assume_unique=True).size
        out.setdefault("cells", {})[label] = {"a": int(xa.size), "b": int(xb.size), "both": int(both),
                                              "only_a": int(xa.size - both), "only_b": int(xb.size - both)}
    for key, field in (("components", "component"), ("datasets", "dataset_id")):
        ca, cb = _totals(sa, field), _totals(sb, field)
        out[key] = [{"split": k[0], "name": k[1], "a": ca.get(k, 0), "b": cb.get(k, 0)}
                    for k in sorted(set(ca) | set(cb))]
    fa, fb = _flatten(sa["spec"]), _flatten(sb["spec"])
    out["spec_changes"] = [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb))
                           if fa.get(k) != fb.get(k)]
    out["same_store"] = sa["store"].get("store_id") == sb["store"].get("store_id")
    out["same_state"] = out["same_store"] and sa["store"].get("state_hash") == sb["store"].get("state_hash")
    return out


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) and "name" in x for x in obj):
        for x in obj:  # components: key by name, not position
            out.update(_flatten({k: v for k, v in x.items() if k != "name"}, f"{prefix}[{x['name']}]"))
    else:
        out[prefix] = obj
    return out
