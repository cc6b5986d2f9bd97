"""The manifest tables of a resolution: the manifest itself, its composition and its copies report.

:class:`Resolution` holds what :func:`atlasmix.mixing.resolve` returns and
:func:`atlasmix.mixing.manifest.write_manifest` writes: the manifest table (:data:`MANIFEST_SCHEMA`)
and the sidecar's reports. :func:`manifest_table` builds the table from the drawn cell sets and checks
the train / eval guarantee by counting; :func:`composition_table` counts cells per component, split,
dataset and cell type; :func:`copies_report` finds cells held twice under different soma_joinids.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from atlasmix.mixing.obs_context import ObsContext
from atlasmix.mixing.spec import MixtureSpec

#: Manifest splits, in the order of their codes.
SPLITS = ("train", "validation", "eval")

#: Manifest columns. ``component`` and ``split`` are dictionary-encoded strings (pandas: categorical).
MANIFEST_SCHEMA = pa.schema([pa.field("soma_joinid", pa.int64(), nullable=False),
                             pa.field("component", pa.dictionary(pa.int32(), pa.string()), nullable=False),
                             pa.field("split", pa.dictionary(pa.int32(), pa.string()), nullable=False)])


@dataclasses.dataclass
class Resolution:
    """A resolved mixture (before it is written; see :func:`atlasmix.mixing.manifest.write_manifest`).

    Attributes
    ----------
    spec : MixtureSpec
    spec_path : str or None
    spec_hash : str
        sha256 over the canonical spec and the hashes of everything it excludes.
    table : pyarrow.Table
        The manifest: ``soma_joinid`` int64, ``component`` and ``split`` (``train``, ``validation``,
        ``eval``) dictionary-encoded strings, sorted by (soma_joinid, split, component).
    components, eval_sets, excluded : list of dict
        Per-component / eval-set / exclusion reports.
    composition : list of dict
        ``component``, ``split``, ``dataset_id``, ``cell_type``, ``n_cells`` rows.
    disjointness : dict
        The train+validation vs eval check (``disjoint`` true, counts, a sentence); with a store also
        ``copies``: cells held twice under different soma_joinids by count fingerprint
        (``n_train_validation_repeats``, ``n_eval_cells_copied_in_training``, ``copied_from``,
        ``unchecked_datasets``), a warning appended to the sentence when there are any.
    store : dict
        Store identity at resolution time.
    counts : dict
        Rows per split (``train``, ``validation``, ``eval``).
    """

    spec: MixtureSpec
    spec_path: str | None
    spec_hash: str
    table: pa.Table
    components: list[dict]
    eval_sets: list[dict]
    excluded: list[dict]
    composition: list[dict]
    disjointness: dict
    store: dict
    counts: dict


def manifest_table(components: dict[str, dict[str, np.ndarray]], eval_sets: dict[str, np.ndarray]
                   ) -> tuple[pa.Table, dict, dict, tuple[np.ndarray, np.ndarray, list[str]]]:
    """The manifest table of a resolved mixture, checked: no cell in two components, none in training and eval.

    Parameters
    ----------
    components : dict
        Component name -> ``{"train": joinids, "validation": joinids}`` (int64 arrays).
    eval_sets : dict
        Eval-set name -> joinids (int64 array).

    Returns
    -------
    (pyarrow.Table, dict, dict, tuple)
        The table (:data:`MANIFEST_SCHEMA`, sorted by (soma_joinid, split, component)); the
        disjointness report (counts and a sentence); rows per split; and the rows as
        ``(soma_joinid, code, names)`` (codes: ``split index * len(names) + name index``) for
        :func:`composition_table` and :func:`copies_report`.

    Raises
    ------
    AssertionError
        A cell in two components or a training / validation cell in an eval set (an internal error:
        the draws never produce them).
    """
    names = sorted(set(components) | set(eval_sets))
    n_names = max(len(names), 1)
    code_of = {n: i for i, n in enumerate(names)}
    ids, codes = [], []
    for name, d in components.items():
        for s in ("train", "validation"):
            ids.append(np.asarray(d[s], dtype=np.int64))
            codes.append(np.full(len(d[s]), SPLITS.index(s) * n_names + code_of[name], dtype=np.int64))
    for name, cells in eval_sets.items():
        ids.append(np.asarray(cells, dtype=np.int64))
        codes.append(np.full(len(cells), 2 * n_names + code_of[name], dtype=np.int64))
    jid = np.concatenate(ids) if ids else np.empty(0, np.int64)
    code = np.concatenate(codes) if codes else np.empty(0, np.int64)
    size = int(jid.max()) + 1 if len(jid) else 0

    # the guarantee, checked by counting (independently of how cells were drawn): every train /
    # validation cell appears once, and none of them is in an eval set
    is_tv = code < 2 * n_names
    tv_ids = jid[is_tv]
    in_tv = np.zeros(size, dtype=bool)
    in_tv[tv_ids] = True
    in_eval = np.zeros(size, dtype=bool)
    in_eval[jid[~is_tv]] = True
    n_tv, n_ev = int(len(tv_ids)), int(np.count_nonzero(in_eval))
    n_dup = n_tv - int(np.count_nonzero(in_tv))
    overlap = int(np.count_nonzero(in_tv & in_eval))
    if n_dup or overlap:
        raise AssertionError(f"internal error: {n_dup} cells in two components, {overlap} training cells in eval sets")

    # order by (soma_joinid, split, component): one row per cell -> O(max joinid) scatter, else a sort
    if len(jid) == n_tv + n_ev:
        owner = np.full(size, -1, dtype=np.int32)
        owner[jid] = code
        jid = np.flatnonzero(owner >= 0).astype(np.int64)
        code = owner[jid].astype(np.int64)
    else:  # a cell in several eval sets
        k = 3 * n_names
        key = np.sort(jid * k + code)
        jid, code = key // k, key % k
    names_eval = sorted(eval_sets)
    disjoint = {
        "disjoint": True, "n_train_validation_cells": n_tv, "n_eval_cells": n_ev,
        "eval_sets": names_eval, "n_overlap": 0, "n_cells_in_two_components": 0,
        "statement": (f"The {n_tv:,} training and validation cells are disjoint from the {n_ev:,} cells of "
                      f"the eval sets {', '.join(names_eval)} (checked at resolution: 0 shared soma_joinids)."
                      if names_eval else f"The mixture declares no eval sets; its {n_tv:,} training and "
                      "validation cells appear once each."),
    }
    comp_idx = (code % n_names).astype(np.int32)
    split_idx = (code // n_names).astype(np.int32)
    table = pa.table({
        "soma_joinid": pa.array(jid, type=pa.int64()),
        "component": pa.DictionaryArray.from_arrays(pa.array(comp_idx), pa.array(names, pa.string())),
        "split": pa.DictionaryArray.from_arrays(pa.array(split_idx), pa.array(SPLITS, pa.string())),
    }, schema=MANIFEST_SCHEMA)
    counts = {k: int(c) for k, c in zip(SPLITS, np.bincount(split_idx, minlength=3))}
    return table, disjoint, counts, (jid, code, names)


def composition_table(ctx: ObsContext, rows: tuple[np.ndarray, np.ndarray, list[str]]) -> list[dict]:
    """Cells per (component, split, dataset_id, cell_type).

    The manifest's row codes are scattered onto obs rows (a column appended to the arrow obs,
    zero-copy) and counted with one duckdb GROUP BY.

    Parameters
    ----------
    ctx : ObsContext
        The obs the mixture was resolved on (``dataset_id`` and ``cell_type`` columns).
    rows : tuple
        ``(soma_joinid, code, names)`` from :func:`manifest_table`.

    Returns
    -------
    list of dict
        ``component``, ``split``, ``dataset_id``, ``cell_type`` (``"NULL"`` for a missing one),
        ``n_cells``, sorted.
    """
    jid, code, names = rows
    n_names = max(len(names), 1)
    if len(jid) == 0:
        return []
    row_of = ctx.row_of()
    tagged = np.full(ctx.obs.num_rows, -1, dtype=np.int32)
    if np.bincount(jid, minlength=1).max() == 1:
        tagged[row_of[jid]] = code
        extra = None
    else:  # a cell in several eval sets: count those rows separately
        first = np.r_[True, jid[1:] != jid[:-1]]
        tagged[row_of[jid[first]]] = code[first]
        extra = (jid[~first], code[~first])
    t = ctx.obs.select(["dataset_id", "cell_type"]).append_column("_code", pa.array(tagged))
    con = ctx.con
    con.register("_tagged", t)
    try:
        q = ("SELECT _code, dataset_id, coalesce(cell_type, 'NULL'), count(*) FROM _tagged WHERE _code >= 0 "
             "GROUP BY ALL")
        found = con.execute(q).fetchall()
        if extra is not None:
            t2 = ctx.obs.select(["dataset_id", "cell_type"]).take(pa.array(row_of[extra[0]])).append_column(
                "_code", pa.array(extra[1].astype(np.int32)))
            con.register("_tagged", t2)
            found += con.execute(q).fetchall()
    finally:
        con.unregister("_tagged")
    agg: dict[tuple, int] = {}
    for c, d, ct, n in found:
        key = (names[c % n_names], SPLITS[c // n_names], d, ct)
        agg[key] = agg.get(key, 0) + int(n)
    return [{"component": k[0], "split": k[1], "dataset_id": k[2], "cell_type": k[3], "n_cells": v}
            for k, v in sorted(agg.items())]


def copies_report(store, rows: tuple[np.ndarray, np.ndarray, list[str]]) -> dict:
    """Cells the manifest holds twice under different soma_joinids (the same counts on every gene:
    :mod:`atlasmix.store.fingerprint`): among the training + validation cells, and eval-set cells
    whose copies are training cells. Reported, not refused (the evaluation refuses the latter).
    Fingerprints are read only for datasets that ingest found copying each other
    (:func:`~atlasmix.store.fingerprint.copy_suspects`), so mixtures without copies pay nothing.

    Parameters
    ----------
    store : atlasmix.store.Store
    rows : tuple
        ``(soma_joinid, code, names)`` from :func:`manifest_table`.

    Returns
    -------
    dict
        ``copies`` (``n_train_validation_repeats``, ``n_eval_cells_copied_in_training``,
        ``copied_from``, ``unchecked_datasets``) and ``warning`` (a sentence, or empty).
    """
    # numba-compiled module: imported only when a resolution has a store to read fingerprints from
    from atlasmix.store.fingerprint import copy_candidates, duplicates_within, fingerprints_of, shared_cells

    jid, code, names = rows  # jid ascending
    is_tv = code < 2 * max(len(names), 1)
    (tv, ev), unchecked = copy_candidates(store, jid[is_tv], np.unique(jid[~is_tv]))
    within, cross = 0, {"n_shared": 0, "datasets": {}, "unchecked": []}
    if len(tv):
        fps, _ = fingerprints_of(store, tv)
        within = duplicates_within(fps)
        if len(ev) and fps.any():
            cross = shared_cells(store, ev, tv)
    out = {"copies": {"n_train_validation_repeats": within, "n_eval_cells_copied_in_training": cross["n_shared"],
                      "copied_from": cross["datasets"], "unchecked_datasets": unchecked}}
    notes = []
    if within:
        notes.append(f"{within:,} training / validation cells repeat the counts of other cells of the mixture "
                     "(the same cells under two dataset ids?)")
    if cross["n_shared"]:
        notes.append(f"{cross['n_shared']:,} eval-set cells have copies among the training cells (in "
                     f"{', '.join(cross['datasets'])}); the evaluation will refuse them")
    out["warning"] = ("Warning: " + "; ".join(notes) + ".") if notes else ""
    return out


__all__ = ["MANIFEST_SCHEMA", "SPLITS", "Resolution", "composition_table", "copies_report", "manifest_table"]
