"""Source readers: h5ad, AnnData zarr, 10x MEX, 10x HDF5 and SOMA experiments, read in row chunks.

Every reader gives ``obs()`` (source obs, index = barcodes), ``var()`` (index = gene identifiers),
``n_obs`` and ``iter_rows(rows, chunk_size)`` which yields CSR blocks of the selected rows (cells x
source genes) without loading the whole matrix, plus ``provenance()``.

Memory: h5ad / zarr / 10x HDF5 / SOMA are read with bounded memory (one chunk of rows at a time,
through ``anndata.io.sparse_dataset``, h5py or tiledbsoma). 10x MEX is a text coordinate file with
no row index; it is parsed with ``scipy.io.mmread`` as a whole (memory O(nnz)) — convert very large
MEX directories to 10x HDF5 or h5ad first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasmix.errors import IngestError

FORMATS = ["h5ad", "zarr", "mex", "10x_h5", "soma"]


def _contiguous_windows(rows: np.ndarray, chunk_size: int) -> Iterator[np.ndarray]:
    for s in range(0, len(rows), chunk_size):
        yield rows[s:s + chunk_size]


def detect_format(source: str) -> str:
    """Guess the format of ``source`` from its name and content.

    Raises
    ------
    IngestError
        Missing path, empty file, or an unknown format.
    """
    if "://" in source and not source.startswith("file://"):
        return "soma"
    p = Path(source.removeprefix("file://"))
    if not p.exists():
        raise IngestError(f"source not found: {p}")
    if p.is_dir():
        names = {f.name for f in p.iterdir()}
        if names & {"matrix.mtx", "matrix.mtx.gz"}:
            return "mex"
        if names & {"zarr.json", ".zgroup", ".zattrs"}:
            return "zarr"
        if {"obs", "ms"} <= names or "__tiledb_group.tdb" in names or "__group" in names:
            return "soma"
        raise IngestError(f"unknown format: directory {p} is neither 10x MEX, AnnData zarr nor a SOMA experiment")
    if p.stat().st_size == 0:
        raise IngestError(f"empty file: {p}")
    with open(p, "rb") as fh:
        magic = fh.read(8)
    if magic != b"\x89HDF\r\n\x1a\n":
        raise IngestError(f"unknown format: {p.name} is not HDF5 (h5ad / 10x h5), zarr, MEX or SOMA")
    try:
        with h5py.File(p, "r") as f:
            if "matrix" in f and "barcodes" in f["matrix"]:
                return "10x_h5"
            if _cr2_genomes(f):  # Cell Ranger 2.x: one group per genome
                return "10x_h5"
            if "X" in f and "obs" in f:
                return "h5ad"
    except OSError as e:
        raise IngestError(f"truncated or unreadable HDF5 file {p.name}: {e}") from e
    raise IngestError(f"unknown format: HDF5 file {p.name} is neither h5ad nor 10x HDF5")


_CR2_KEYS = {"barcodes", "data", "indices", "indptr", "shape", "genes"}


def _cr2_genomes(f: h5py.File) -> list[str]:
    """Genome groups of a Cell Ranger 2.x HDF5 file (each holds its own genes x cells CSC matrix)."""
    return [k for k in f.keys() if isinstance(f[k], h5py.Group) and _CR2_KEYS <= set(f[k].keys())]


class Reader:
    """Base class; see the module docstring for the contract. A reader sets ``_obs`` and ``_var`` when
    it opens its source."""

    format = ""
    n_obs = 0
    _obs: pd.DataFrame
    _var: pd.DataFrame

    def obs(self) -> pd.DataFrame:
        """The source obs (index: barcodes)."""
        return self._obs

    def var(self) -> pd.DataFrame:
        """The source var (index: gene identifiers)."""
        return self._var

    def iter_rows(self, rows: np.ndarray, chunk_size: int) -> Iterator[sp.csr_matrix]:
        """Yield CSR blocks (float, cells x source genes) for ``rows`` (sorted source row indices)."""
        raise NotImplementedError

    def provenance(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class AnnDataReader(Reader):
    """h5ad or AnnData zarr. ``layer``: ``None``/``"X"``, ``"raw"`` (``raw/X`` with ``raw/var``) or a layer name."""

    def __init__(self, path: str, fmt: str, layer: str | None = None):
        import anndata as ad

        self.format = fmt
        self.path = path
        try:
            if fmt == "h5ad":
                self._file = h5py.File(path, "r")
            else:
                import zarr

                self._file = zarr.open_group(path, mode="r")
            self._obs = self._read_frame(self._file["obs"])
            if layer in (None, "X"):
                xg, varg = self._file["X"], self._file["var"]
            elif layer == "raw":
                if "raw" in self._file:
                    xg, varg = self._file["raw/X"], self._file["raw/var"]
                elif "raw.X" in self._file:  # anndata < 0.7 stored raw as raw.X / raw.var
                    xg, varg = self._file["raw.X"], self._file["raw.var"]
                else:
                    raise IngestError(f"{Path(path).name} has no raw/X")
            else:
                if "layers" not in self._file or layer not in self._file["layers"]:
                    raise IngestError(f"{Path(path).name} has no layer {layer!r}")
                xg, varg = self._file["layers"][layer], self._file["var"]
            self._var = self._read_frame(varg)
            self._legacy_categories()
            self._uns_prov = self._read_provenance()
        except IngestError:
            raise
        except Exception as e:  # truncated datasets, broken encodings
            raise IngestError(f"unreadable {fmt} file {Path(path).name}: {type(e).__name__}: {e}".splitlines()[0]) from e
        attrs = dict(xg.attrs)
        enc = attrs.get("encoding-type", "array")
        if enc in ("csr_matrix", "csc_matrix") or "h5sparse_format" in attrs:  # h5sparse: anndata < 0.7
            try:
                self._X = ad.io.sparse_dataset(xg)
            except Exception as e:
                raise IngestError(f"unreadable sparse X in {Path(path).name}: {type(e).__name__}: {e}"
                                  .splitlines()[0]) from e
        elif hasattr(xg, "shape") and len(xg.shape) == 2:  # dense X, read in row chunks like sparse X
            self._X = xg
        else:
            raise IngestError(f"{Path(path).name}: X has encoding {enc!r}, not a 2-d dense or CSR/CSC matrix")
        self._enc = enc
        self.n_obs = len(self._obs)
        if self._X.shape != (len(self._obs), len(self._var)):
            raise IngestError(f"{Path(path).name}: X shape {tuple(self._X.shape)} does not match obs x var")

    def _read_frame(self, elem) -> pd.DataFrame:
        """obs/var through anndata's own dataframe reader, which also reads the pre-0.7 encoding
        (a structured array whose first field is the index). anndata exposes it only as
        ``anndata._io.{h5ad,zarr}.read_dataframe`` (what ``read_h5ad``/``read_zarr`` call)."""
        import warnings

        if self.format == "h5ad":
            from anndata._io.h5ad import read_dataframe
        else:
            from anndata._io.zarr import read_dataframe
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OldFormatWarning: we read it, and say so in the provenance
            df = read_dataframe(elem)
        if not isinstance(df, pd.DataFrame):
            raise IngestError(f"{Path(self.path).name}: {elem.name} is not a dataframe")
        self.legacy = getattr(self, "legacy", False) or not hasattr(elem, "keys")
        return df

    def _legacy_categories(self) -> None:
        """anndata < 0.7 stored categorical obs/var columns as integer codes plus ``uns/<col>_categories``;
        anndata's own compat step (``anndata.compat._clean_uns``) turns them back into categoricals."""
        if not getattr(self, "legacy", False) or "uns" not in self._file:
            return
        import types

        import anndata as ad
        from anndata.compat import _clean_uns

        uns = {k: ad.io.read_elem(self._file["uns"][k]) for k in self._file["uns"].keys() if k.endswith("_categories")}
        uns = {k: (v.astype(str) if isinstance(v, np.ndarray) and v.dtype.kind == "S" else v) for k, v in uns.items()}
        if uns:
            _clean_uns(types.SimpleNamespace(obs=self._obs, var=self._var, uns=uns))

    def _read_provenance(self) -> dict:
        try:
            if "uns" in self._file and "provenance" in self._file["uns"]:
                import anndata as ad

                v = ad.io.read_elem(self._file["uns"]["provenance"])
                if isinstance(v, (str, bytes)):  # often stored as a JSON string
                    v = json.loads(v)
                return dict(v) if isinstance(v, dict) else {"provenance": str(v)}
        except Exception:  # provenance is informative only
            return {}
        return {}

    def provenance(self) -> dict:
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in self._uns_prov.items()}

    def iter_rows(self, rows, chunk_size):
        for win in _contiguous_windows(rows, chunk_size):
            lo, hi = int(win[0]), int(win[-1]) + 1
            try:
                block = self._X[lo:hi]
            except Exception as e:
                raise IngestError(f"truncated or corrupt X in {Path(self.path).name}: {type(e).__name__}") from e
            block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
            yield block[win - lo] if len(win) != hi - lo else block

    def close(self):
        if self.format == "h5ad":
            self._file.close()


def _read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", header=None, dtype=str,
                       compression="gzip" if path.name.endswith(".gz") else None)


def _first(d: Path, *names: str) -> Path:
    for n in names:
        if (d / n).exists():
            return d / n
    raise IngestError(f"10x MEX directory {d} lacks {names[0]}")


class MexReader(Reader):
    """10x MEX directory: ``matrix.mtx(.gz)`` (genes x cells), ``features.tsv(.gz)``/``genes.tsv(.gz)``, ``barcodes.tsv(.gz)``.

    Only ``Gene Expression`` features are kept when a feature-type column exists.
    """

    format = "mex"

    def __init__(self, path: str):
        import scipy.io

        d = Path(path)
        self.path = path
        feats = _read_tsv(_first(d, "features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
        bcs = _read_tsv(_first(d, "barcodes.tsv.gz", "barcodes.tsv"))
        mtx = _first(d, "matrix.mtx.gz", "matrix.mtx")
        try:
            m = scipy.io.mmread(str(mtx))
        except Exception as e:
            raise IngestError(f"truncated or corrupt {mtx.name}: {type(e).__name__}: {e}".splitlines()[0]) from e
        if m.shape != (len(feats), len(bcs)):
            raise IngestError(f"{mtx.name} is {m.shape[0]} x {m.shape[1]} but features/barcodes give "
                              f"{len(feats)} x {len(bcs)}")
        keep = np.ones(len(feats), bool)
        if feats.shape[1] >= 3:
            keep = (feats[2] == "Gene Expression").to_numpy()
        self._X = sp.csr_matrix(m.T)[:, np.flatnonzero(keep)]
        feats = feats[keep]
        self._var = pd.DataFrame({"gene_ids": feats[0].to_numpy(),
                                  "gene_symbols": feats[1 if feats.shape[1] > 1 else 0].to_numpy()})
        ids = feats[0]
        ensembl_like = ids.str.match(r"^ENS[A-Z]*G\d{11}").mean() > 0.5
        self._var.index = pd.Index(self._var["gene_ids" if ensembl_like else "gene_symbols"].astype(str))
        self._obs = pd.DataFrame(index=pd.Index(bcs[0].astype(str), name=None))
        self.n_obs = len(self._obs)

    def iter_rows(self, rows, chunk_size):
        for win in _contiguous_windows(rows, chunk_size):
            yield self._X[win]


class TenxH5Reader(Reader):
    """10x Genomics HDF5 feature-barcode matrix: Cell Ranger >= 3 (``matrix`` group, ``features/*``) and
    Cell Ranger 2.x (one group per genome with ``genes``/``gene_names``), as ``scanpy.read_10x_h5`` reads them.

    Multi-genome files (several CR2 genome groups, or CR3 ``features/genome`` with several values) need
    ``genome``; without it the reader refuses with the list of genomes. Only ``Gene Expression``
    features are kept. The file stores CSC of genes x cells = CSR of cells x genes, so rows are sliced
    through ``indptr``.

    Raises
    ------
    IngestError
        Multi-genome file without ``genome``, an unknown ``genome``, or a truncated file.
    """

    format = "10x_h5"

    def __init__(self, path: str, genome: str | None = None):
        self.path = path
        self._f = h5py.File(path, "r")
        name = Path(path).name
        try:
            if "matrix" in self._f:
                g = self._f["matrix"]
                ids = g["features/id"][:].astype(str)
                names = g["features/name"][:].astype(str)
                feats = g["features"]
                keep = (feats["feature_type"][:].astype(str) == "Gene Expression") if "feature_type" in feats \
                    else np.ones(len(ids), bool)
                if "genome" in feats:
                    gen = feats["genome"][:].astype(str)
                    have = sorted(set(gen[keep]))
                    if len(have) > 1 and genome is None:
                        raise IngestError(f"{name} holds {len(have)} genomes ({', '.join(have)}); choose one with "
                                          "--genome NAME")
                    if genome is not None:
                        if genome not in have:
                            raise IngestError(f"{name} has no genome {genome!r} (it has: {', '.join(have)})")
                        keep &= gen == genome
            else:
                groups = _cr2_genomes(self._f)
                if not groups:
                    raise IngestError(f"{name}: no 'matrix' group and no Cell Ranger 2 genome group")
                if genome is None and len(groups) > 1:
                    raise IngestError(f"{name} holds {len(groups)} genomes ({', '.join(groups)}); choose one with "
                                      "--genome NAME")
                if genome is not None and genome not in groups:
                    raise IngestError(f"{name} has no genome {genome!r} (it has: {', '.join(groups)})")
                g = self._f[genome or groups[0]]
                ids = g["genes"][:].astype(str)
                names = g["gene_names"][:].astype(str) if "gene_names" in g else ids
                keep = np.ones(len(ids), bool)
            self._g = g
            self._barcodes = g["barcodes"][:].astype(str)
            self._indptr = g["indptr"][:]
            self._shape = tuple(int(x) for x in g["shape"][:])
        except IngestError:
            self._f.close()
            raise
        except Exception as e:
            self._f.close()
            raise IngestError(f"truncated or corrupt 10x HDF5 {name}: {type(e).__name__}") from e
        if self._shape != (len(ids), len(self._barcodes)) or len(self._indptr) != len(self._barcodes) + 1:
            self._f.close()
            raise IngestError(f"{name}: shape {self._shape} does not match {len(ids)} features x "
                              f"{len(self._barcodes)} barcodes")
        self._keep = keep
        self._var = pd.DataFrame({"gene_ids": ids[keep], "gene_symbols": names[keep]}, index=pd.Index(ids[keep]))
        self._obs = pd.DataFrame(index=pd.Index(self._barcodes))
        self.n_obs = len(self._barcodes)
        self.genome = genome

    def iter_rows(self, rows, chunk_size):
        n_genes = self._shape[0]
        for win in _contiguous_windows(rows, chunk_size):
            lo, hi = int(win[0]), int(win[-1]) + 1
            a, b = int(self._indptr[lo]), int(self._indptr[hi])
            try:
                data = self._g["data"][a:b]
                ind = self._g["indices"][a:b]
            except Exception as e:
                raise IngestError(f"truncated or corrupt 10x HDF5 {Path(self.path).name}: {type(e).__name__}") from e
            block = sp.csr_matrix((data, ind, self._indptr[lo:hi + 1] - a), shape=(hi - lo, n_genes))
            block = block[:, np.flatnonzero(self._keep)] if not self._keep.all() else block
            yield block[win - lo] if len(win) != hi - lo else block

    def close(self):
        self._f.close()


class SomaReader(Reader):
    """Another SOMA experiment (e.g. a CELLxGENE Census release), filtered by ``value_filter`` on obs.

    var identifiers are ``var.feature_id`` (Ensembl ids in Census). Cells are read through an
    ``axis_query`` in chunks of joinids; ``layer`` names the X layer (default ``raw``).
    """

    format = "soma"

    def __init__(self, uri: str, measurement: str = "RNA", layer: str | None = None,
                 value_filter: str | None = None, context=None):
        import tiledbsoma as soma

        self.path = uri
        self._ms = measurement
        self._layer = layer or "raw"
        try:
            self._exp = soma.Experiment.open(uri, context=context)
            q = self._exp.axis_query(measurement, obs_query=soma.AxisQuery(value_filter=value_filter))
            obs = q.obs().concat().to_pandas()
            var = self._exp.ms[measurement].var.read().concat().to_pandas()
        except Exception as e:
            raise IngestError(f"cannot read SOMA experiment {uri}: {type(e).__name__}: {e}".splitlines()[0]) from e
        if self._layer not in self._exp.ms[measurement].X:
            raise IngestError(f"SOMA experiment {uri} has no X layer {self._layer!r}")
        self._joinids = obs["soma_joinid"].to_numpy()
        self._var_joinids = var["soma_joinid"].to_numpy()
        idx = obs["obs_id"].astype(str) if "obs_id" in obs.columns else obs["soma_joinid"].astype(str)
        self._obs = obs.drop(columns=["soma_joinid"]).set_index(pd.Index(idx.to_numpy()))
        ids = var["feature_id"] if "feature_id" in var.columns else var.iloc[:, 1]
        self._var = var.drop(columns=["soma_joinid"]).set_index(pd.Index(ids.astype(str).to_numpy()))
        self.n_obs = len(self._obs)
        self._value_filter = value_filter

    def provenance(self):
        return {"soma_uri": self.path, "value_filter": self._value_filter or ""}

    def iter_rows(self, rows, chunk_size):
        import pyarrow as pa

        X = self._exp.ms[self._ms].X[self._layer]
        col_of = pd.Series(np.arange(len(self._var_joinids)), index=self._var_joinids)
        for win in _contiguous_windows(rows, chunk_size):
            ids = self._joinids[win]
            order = np.argsort(ids)
            t = X.read(coords=(pa.array(ids[order]),)).tables().concat()
            pos = order[np.searchsorted(ids[order], t["soma_dim_0"].to_numpy())]
            cols = col_of.reindex(t["soma_dim_1"].to_numpy()).to_numpy()
            yield sp.csr_matrix((t["soma_data"].to_numpy(), (pos, cols)), shape=(len(ids), len(self._var_joinids)))

    def close(self):
        self._exp.close()


def open_reader(source: str, fmt: str | None = None, layer: str | None = None,
                value_filter: str | None = None, context=None, genome: str | None = None) -> Reader:
    """Open ``source`` with the reader for ``fmt`` (auto-detected when None).

    Raises
    ------
    IngestError
        Unknown format, empty/truncated file, missing layer.
    """
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise IngestError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt in ("h5ad", "zarr"):
        return AnnDataReader(source, fmt, layer)
    if genome is not None and fmt != "10x_h5":
        raise IngestError(f"--genome applies to 10x HDF5 files, not {fmt}")
    if fmt == "mex":
        return MexReader(source)
    if fmt == "10x_h5":
        return TenxH5Reader(source, genome)
    return SomaReader(source, layer=layer, value_filter=value_filter, context=context)


def read_obs_table(path: str) -> pd.DataFrame:
    """Read a CSV/TSV obs table whose first column is the barcode (``--obs-table``)."""
    p = Path(path)
    if not p.exists():
        raise IngestError(f"obs table not found: {p}")
    sep = "\t" if ".tsv" in p.name else ","
    return pd.read_csv(p, sep=sep, index_col=0, dtype=str,
                       compression="gzip" if p.name.endswith(".gz") else None)


def provenance_json(d: dict) -> str:
    return json.dumps(d, default=str, sort_keys=True)


__all__ = ["FORMATS", "Reader", "open_reader", "detect_format", "read_obs_table"]
