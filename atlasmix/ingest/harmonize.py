"""Gene harmonisation: map a source's gene identifiers onto Ensembl gene ids.

Rules, in order, for each source gene (first hit wins):

1. whitespace stripped; an Ensembl id (``ENSG00000141510.17``) is kept with its version suffix
   stripped (``_PAR_Y`` copies are refused as duplicates of the X-chromosome gene);
2. an exact match of the current symbol (GENCODE v44 for human) with one id;
3. a case-insensitive match of the current symbol (mouse genes upper-cased by some pipelines);
4. an HGNC *previous* symbol, 5. the gene name of an older Ensembl release (84/93/100),
   6. an HGNC *alias* symbol — each only when it names exactly one current gene.

A current symbol naming several genes goes to the id whose HGNC approved symbol it is (human), else
to the lowest Ensembl id (the earliest-assigned locus; later ids with the same name are mostly
readthrough or patch loci); it is counted as ``symbol_tiebreak``. A synonym naming several current
genes is *ambiguous* and left unmapped.
Several source genes mapping to one id are *duplicates*: summed (default, as Cell Ranger's
``--feature`` aggregation does) or refused (``on_duplicate="refuse"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasmix.errors import IngestError
from atlasmix.store.genes import ENSEMBL_ID_RE, GeneTable

METHODS = ["ensembl_id", "symbol", "symbol_tiebreak", "symbol_case", "previous", "historical", "alias"]


@dataclass
class GeneMapping:
    """Result of :func:`harmonize_genes`.

    Attributes
    ----------
    source_names : numpy.ndarray of str, shape (n_source_genes,)
        Identifiers as given (before stripping).
    feature_id : numpy.ndarray of object, shape (n_source_genes,)
        Mapped Ensembl id, or None.
    method : numpy.ndarray of object, shape (n_source_genes,)
        Rule that mapped the gene (one of ``METHODS``), ``"unmapped"`` or ``"ambiguous"``.
    target_ids : list of str
        Distinct mapped ids, in first-occurrence order: the columns this dataset writes.
    report : dict
        Counts: ``n_source_genes``, ``n_mapped``, ``n_unmapped``, ``n_ambiguous``, ``n_duplicates``,
        ``by_method``, ``mapped_fraction``, plus up to 20 ``unmapped_examples``.
    """

    source_names: np.ndarray
    feature_id: np.ndarray
    method: np.ndarray
    target_ids: list[str]
    report: dict = field(default_factory=dict)

    def matrix(self, target_col: dict[str, int], n_cols: int) -> sp.csr_matrix:
        """Sparse 0/1 matrix M, shape (n_source_genes, n_cols), float32, so that ``X_src @ M``.

        Puts each mapped source gene at column ``target_col[feature_id]`` and sums duplicates.
        """
        rows = np.flatnonzero(self.feature_id != None)  # noqa: E711 - object array
        cols = np.array([target_col[self.feature_id[i]] for i in rows], dtype=np.int64)
        return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                             shape=(len(self.feature_id), n_cols))


def _unique_lookup(keys: pd.Series, ids: pd.Series) -> tuple[dict, set]:
    """key -> id for keys naming exactly one id; and the set of keys naming several."""
    df = pd.DataFrame({"k": keys.to_numpy(), "id": ids.to_numpy()}).drop_duplicates()
    n = df.groupby("k")["id"].transform("size")
    return dict(zip(df.loc[n == 1, "k"], df.loc[n == 1, "id"])), set(df.loc[n > 1, "k"])


def _tiebreak(genes: pd.DataFrame, keys: pd.Series) -> dict:
    """For symbols naming several ids: the HGNC-approved id if exactly one, else the lowest id."""
    df = pd.DataFrame({"k": keys.to_numpy(), "id": genes.index.to_numpy()})
    df["approved"] = (genes["hgnc_symbol"].to_numpy() == genes["feature_name"].to_numpy()) \
        if "hgnc_symbol" in genes.columns else False
    df = df[df.groupby("k")["id"].transform("size") > 1]
    df = df.sort_values(["k", "approved", "id"], ascending=[True, False, True])
    best = df.groupby("k").head(1)
    return dict(zip(best["k"], best["id"]))


def harmonize_genes(names, table: GeneTable, on_duplicate: str = "sum") -> GeneMapping:
    """Map source gene identifiers (symbols or Ensembl ids) to Ensembl ids of ``table``.

    Parameters
    ----------
    names : sequence of str, length n_source_genes
        The source's gene identifiers (var index or a var column).
    table : GeneTable
        Vocabulary and synonyms (:func:`atlasmix.store.genes.gene_table`).
    on_duplicate : {"sum", "refuse"}
        What to do when several source genes map to one id.

    Returns
    -------
    GeneMapping

    Raises
    ------
    IngestError
        ``on_duplicate="refuse"`` and duplicates exist.
    """
    src = np.asarray([str(n) for n in names], dtype=object)
    stripped = np.array([s.strip() for s in src], dtype=object)
    n = len(src)
    fid = np.full(n, None, dtype=object)
    method = np.full(n, "unmapped", dtype=object)

    genes = table.genes
    current, _ = _unique_lookup(genes["feature_name"], genes.index.to_series())
    current.update({k: (v, "symbol_tiebreak") for k, v in _tiebreak(genes, genes["feature_name"]).items()})
    upper = genes["feature_name"].str.upper()
    current_ci, _ = _unique_lookup(upper, genes.index.to_series())
    current_ci.update({k: (v, "symbol_tiebreak") for k, v in _tiebreak(genes, upper).items()})
    syn = {}
    for kind in ["previous", "historical", "alias"]:
        s = table.synonyms[table.synonyms["kind"] == kind]
        syn[kind] = _unique_lookup(s["key"], s["feature_id"])

    for i, name in enumerate(stripped):
        if not name:
            continue
        m = ENSEMBL_ID_RE.match(name)
        if m:
            if m.group(3):  # GENCODE _PAR_Y copy: the X copy carries the counts' identity
                method[i] = "ambiguous"
                continue
            fid[i], method[i] = m.group(1), "ensembl_id"
            continue
        hit = current.get(name)
        if hit is not None:
            fid[i], method[i] = hit if isinstance(hit, tuple) else (hit, "symbol")
            continue
        key = name.upper()
        hit = current_ci.get(key)
        if hit is not None:
            fid[i], method[i] = hit if isinstance(hit, tuple) else (hit, "symbol_case")
            continue
        for kind in ["previous", "historical", "alias"]:
            uniq, amb = syn[kind]
            if key in uniq:
                fid[i], method[i] = uniq[key], kind
                break
            if key in amb:
                method[i] = "ambiguous"
                break

    mapped = fid != None  # noqa: E711
    ids = pd.Series(fid[mapped])
    dup_mask = ids.duplicated(keep=False).to_numpy()
    n_dup = int(dup_mask.sum() - ids[dup_mask].nunique()) if dup_mask.any() else 0
    if n_dup and on_duplicate == "refuse":
        first = ids[dup_mask].iloc[0]
        who = [src[i].strip() for i in np.flatnonzero(mapped)[dup_mask] if fid[i] == first]
        raise IngestError(f"{n_dup} source genes duplicate another gene's Ensembl id (e.g. {who} -> {first}); "
                          "use --on-duplicate-genes sum to add them up")
    target_ids = list(dict.fromkeys(fid[mapped].tolist()))
    by_method = {k: int((method == k).sum()) for k in METHODS}
    report = {
        "n_source_genes": n,
        "n_mapped": int(mapped.sum()),
        "n_target_genes": len(target_ids),
        "n_unmapped": int((method == "unmapped").sum()),
        "n_ambiguous": int((method == "ambiguous").sum()),
        "n_duplicates": n_dup,
        "duplicates": on_duplicate,
        "by_method": by_method,
        "mapped_fraction": float(mapped.mean()) if n else 0.0,
        "unmapped_examples": [s.strip() for s in src[~mapped][:20]],
        "gene_table": table.source,
    }
    return GeneMapping(src, fid, method, target_ids, report)


def check_usable(mapping: GeneMapping, min_mapped_fraction: float) -> None:
    """Refuse a source whose identifiers are not genes.

    Raises
    ------
    IngestError
        No gene mapped, or fewer than ``min_mapped_fraction`` of the source genes mapped.
    """
    r = mapping.report
    if r["n_mapped"] == 0 or r["mapped_fraction"] < min_mapped_fraction:
        ex = ", ".join(r["unmapped_examples"][:3])
        raise IngestError(
            f"no usable gene identifiers: {r['n_mapped']}/{r['n_source_genes']} genes map to Ensembl ids "
            f"(< {min_mapped_fraction:.0%}; e.g. {ex}); pass --gene-id-column, --organism or --gene-table")
