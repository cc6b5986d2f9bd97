"""A model's published gene axis (scBERT's PanglaoDB genes, scFoundation's 19,264 genes) over the store.

A foundation model with a fixed gene axis reads a cell as one value per gene of that axis, in the
axis' order; genes the data lack are zero (scBERT's ``preprocess.py``, scFoundation's
``main_gene_selection`` in ``model/get_embedding.py``). The axis is the published data file, read
as given (never retyped): a text file with one gene per line, a TSV / CSV with a gene column
(scFoundation's ``OS_scRNA_gene_index.19264.tsv`` has ``gene_name``), or an ``.h5ad`` whose
``var_names`` are the axis (scBERT's ``panglao_human.h5ad``; read in backed mode, X is not loaded).

:func:`model_axis` maps the axis onto the store: an entry that is an Ensembl id matches
``var.feature_id``, any other entry ``var.feature_name`` (the store's current HGNC symbol, to which
ingest maps every source's ids and symbols). The loader then reads only the matched store genes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atlasmix.errors import AtlasmixError

#: Column names taken as the gene column of a TSV / CSV, in this order.
GENE_COLUMNS = ("gene_name", "gene_symbol", "symbol", "feature_name", "gene", "gene_id", "feature_id")


def read_gene_list(path: str | Path, column: str | None = None) -> list[str]:
    """The genes of a published gene-axis file, in file order.

    Parameters
    ----------
    path : str or pathlib.Path
        ``.h5ad`` (its ``var_names``), ``.tsv`` / ``.csv`` with a header naming a gene column
        (``column``, else the first of :data:`GENE_COLUMNS` present), or a plain list (one gene
        per line; also a one-column TSV without a known header).
    column : str, optional
        The gene column of a TSV / CSV.

    Returns
    -------
    list of str

    Raises
    ------
    AtlasmixError
        Missing or unreadable file, no gene column, an empty list, or a gene listed twice.
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise AtlasmixError(f"gene list not found: {p}")
    try:
        if p.suffix == ".h5ad":
            import anndata as ad

            a = ad.read_h5ad(p, backed="r")
            genes = [str(g) for g in a.var_names]
            a.file.close()
        else:
            sep = "," if p.suffix == ".csv" else "\t"
            df = pd.read_csv(p, sep=sep, header=0, dtype=str, keep_default_na=False)
            cols = [c.strip() for c in df.columns]
            df.columns = cols
            if column is not None:
                if column not in cols:
                    raise AtlasmixError(f"gene list {p} has no column {column!r} (columns: {', '.join(cols)})")
                genes = df[column].tolist()
            elif any(c in cols for c in GENE_COLUMNS):
                genes = df[next(c for c in GENE_COLUMNS if c in cols)].tolist()
            elif len(cols) == 1:  # a plain list: the first line is a gene too
                genes = [cols[0]] + df[cols[0]].tolist()
            else:
                raise AtlasmixError(f"gene list {p}: no gene column (one of {', '.join(GENE_COLUMNS)}); "
                                    "pass the column name")
    except AtlasmixError:
        raise
    except Exception as e:  # a file from the wild: one line, never a traceback
        raise AtlasmixError(f"gene list {p} is not readable: {type(e).__name__}: {e}") from None
    genes = [g.strip() for g in genes if str(g).strip()]
    if not genes:
        raise AtlasmixError(f"gene list {p} is empty")
    if len(set(genes)) != len(genes):
        dup = next(g for g in genes if genes.count(g) > 1)
        raise AtlasmixError(f"gene list {p} lists {dup!r} twice")
    return genes


def model_axis(store, genes: list[str]) -> dict[str, np.ndarray]:
    """Which store gene feeds each position of a model's gene axis.

    Parameters
    ----------
    store : atlasmix.store.Store
    genes : list of str
        The model's axis (:func:`read_gene_list`): Ensembl ids or symbols.

    Returns
    -------
    dict
        ``var_joinids`` int64 (M,) ascending: the matched store genes (the loader's gene axis);
        ``position`` int64 (M,): each one's position on the model axis; ``n_genes``: the axis length;
        ``matched``: M. A symbol held by several store genes feeds from the first (lowest
        ``soma_joinid``); positions without a store gene stay zero.

    Raises
    ------
    AtlasmixError
        No gene of the list is in the store.
    """
    var = store.var()
    joinids = var.index.to_numpy(dtype=np.int64)
    by_id: dict[str, int] = {}
    by_name: dict[str, int] = {}
    for j, fid, name in zip(joinids.tolist(), var["feature_id"].astype(str), var["feature_name"].astype(str)):
        by_id.setdefault(fid, j)
        by_name.setdefault(name, j)
    vj, pos, seen = [], [], set()
    for k, g in enumerate(genes):
        j = by_id.get(g.split(".")[0]) if g.upper().startswith("ENS") else by_name.get(g)
        if j is not None and j not in seen:
            seen.add(j)
            vj.append(j)
            pos.append(k)
    if not vj:
        raise AtlasmixError("no gene of the model's gene list is in the store")
    vj_a, pos_a = np.array(vj, dtype=np.int64), np.array(pos, dtype=np.int64)
    order = np.argsort(vj_a)
    return {"var_joinids": vj_a[order], "position": pos_a[order], "n_genes": len(genes), "matched": len(vj)}
