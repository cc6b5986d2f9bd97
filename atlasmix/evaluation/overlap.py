"""The eval / train overlap refusal: no model is scored on its own training cells.

:func:`check_overlap` compares an eval set with the training manifest of a model: store sets by
soma_joinid and by cell count fingerprint (copies of training cells under other joinids), file sets by
the file's sha256 against the sources of the training datasets. The model side is
:class:`TrainedOnManifest`, the ``training_cells`` of every adapter of a run folder whose ``run.json``
names its manifest (:func:`training_cells_from_manifest`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atlasmix.errors import AtlasmixError
from atlasmix.mixing import read_manifest
from atlasmix.store import Store
from atlasmix.store.fingerprint import copy_candidates, shared_cells


def training_cells_from_manifest(path: str | None, sha256: str | None) -> tuple[np.ndarray | None, dict]:
    """Train + validation soma_joinids of a manifest and its sidecar.

    Parameters
    ----------
    path : str or None
        The manifest (parquet); None or a missing file gives ``(None, {})``.
    sha256 : str or None
        The manifest sha256 the model recorded; checked against the sidecar when given.

    Returns
    -------
    (numpy.ndarray of int64 or None, dict)
        Sorted unique joinids of the ``train`` and ``validation`` rows, and the sidecar dict.

    Raises
    ------
    AtlasmixError
        The manifest is not the one the model was trained on (sha256 differs), or its file does not
        match its sidecar.
    """
    if not path or not Path(path).is_file():
        return None, {}
    table, side = read_manifest(path)  # verifies the file's sha256 against the sidecar
    if sha256 and side["manifest"]["sha256"] != sha256:
        raise AtlasmixError(f"manifest {path} is not the one the model was trained on (sha256 differs)")
    t = table.to_pandas()
    tv = t[t["split"].astype(str).isin(["train", "validation"])]
    return np.unique(tv["soma_joinid"].to_numpy(dtype=np.int64)), side


class TrainedOnManifest:
    """``training_cells`` for adapters of run directories whose ``run.json`` names the training manifest."""

    def training_cells(self) -> tuple[np.ndarray | None, dict]:
        """(train + validation soma_joinids, info) from the manifest named in ``run.json``; (None, ...)
        when it names none (a bare model folder).

        ``info`` holds ``store`` (the training store's identity) and ``manifest`` (path).

        Raises
        ------
        AtlasmixError
            The manifest named in ``run.json`` is missing (the overlap check cannot be done).
        """
        m = self.run.get("manifest", {})
        if m.get("path") and not Path(m["path"]).is_file():
            raise AtlasmixError(f"{self.name}: training manifest {m['path']} is missing, so the eval/train overlap "
                                "cannot be checked")
        ids, _ = training_cells_from_manifest(m.get("path"), m.get("sha256"))
        return ids, {"store": self.run.get("store", {}), "manifest": m.get("path")}



def check_overlap(model, eval_set, store=None) -> dict:
    """Refuse an eval set that shares cells with the model's training manifest.

    Store sets: the set's soma_joinids vs the manifest's train + validation joinids (same store id
    required: joinids of two stores are not comparable), then the cells' count fingerprints vs those
    of the training cells (copies of training cells under other joinids, e.g. the same run ingested
    from two formats; datasets ingested without fingerprints are named in ``how``). External files:
    the file's sha256 vs the source sha256 of every dataset that contributed training cells (read
    from the training store's catalog when that store is reachable).

    Returns
    -------
    dict
        ``checked`` (bool), ``how`` (sentence), ``n_overlap``.

    Raises
    ------
    AtlasmixError
        Overlap (shared joinids or copied cells), or a store set evaluated against a model trained
        on another store.
    """
    train_ids, info = model.training_cells()
    rec = info.get("store", {}) or {}
    if train_ids is None:
        return {"checked": False, "how": "the model records no training manifest", "n_overlap": 0}
    if eval_set.kind == "store":
        cur = eval_set.store.identity()
        if rec.get("store_id") and rec["store_id"] != cur["store_id"]:
            raise AtlasmixError(f"model {model.name} was trained on store {rec['store_id']}, eval set {eval_set.name} "
                                f"is on store {cur['store_id']}: soma_joinids are not comparable; export the set "
                                "to h5ad and pass the file instead")
        n = int(np.count_nonzero(np.isin(eval_set.joinids, train_ids, assume_unique=True)))
        if n:
            raise AtlasmixError(f"eval set {eval_set.name} shares {n:,} of its {eval_set.n_cells:,} cells with the "
                                f"training manifest of model {model.name} ({info.get('manifest')}); refusing to "
                                "evaluate on training cells")
        # the same cells stored twice (another dataset id / format): equal counts on every gene,
        # looked up only in datasets ingest found holding copies
        (ev, tr), unchecked = copy_candidates(eval_set.store, eval_set.joinids, train_ids)
        dup = shared_cells(eval_set.store, ev, tr) if len(ev) and len(tr) else {"n_shared": 0, "datasets": {}}
        if dup["n_shared"]:
            src = ", ".join(f"{d} ({k:,})" for d, k in dup["datasets"].items())
            raise AtlasmixError(f"eval set {eval_set.name}: {dup['n_shared']:,} of its {eval_set.n_cells:,} cells have "
                                f"the same counts on every gene as training cells of model {model.name} (in {src}: "
                                "the same cells stored twice); refusing to evaluate on training cells")
        how = "soma_joinids and cell count fingerprints vs training manifest (train + validation)"
        if unchecked:
            how += f"; datasets without fingerprints not checked for copies: {', '.join(unchecked)}"
        return {"checked": True, "how": how, "n_overlap": 0}
    uri = rec.get("uri")
    if not uri:
        return {"checked": False, "how": "training store unknown", "n_overlap": 0}
    try:
        st = store if (store is not None and store.identity()["store_id"] == rec.get("store_id")) else Store(uri)
        cat = st.catalog()
    except Exception:  # the training store is not reachable from here
        return {"checked": False, "how": f"training store {uri} not reachable", "n_overlap": 0}
    starts = cat["obs_joinid_start"].to_numpy()
    ends = cat["obs_joinid_end"].to_numpy()
    used = [i for i in range(len(cat)) if np.any((train_ids >= starts[i]) & (train_ids < ends[i]))]
    hit = cat.iloc[used]
    hit = hit[hit["source_sha256"] == eval_set.sha256]
    if len(hit):
        raise AtlasmixError(f"eval set {eval_set.name} ({eval_set.source}) is the source file of dataset "
                            f"{hit['dataset_id'].iloc[0]!r}, which contributed training cells to model {model.name}; "
                            "refusing to evaluate on training cells")
    return {"checked": True, "how": "file sha256 vs the sources of the training datasets", "n_overlap": 0}
