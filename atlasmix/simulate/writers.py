"""Chunked writers: AnnData h5ad / zarr (grown with anndata's ``sparse_dataset(...).append``) and 10x MEX.

Every writer takes CSR row chunks (cells x genes, float32 integer-valued counts) one at a time, so
memory is bounded by the chunk, and writes ``obs``/``var``/``uns`` at the end with
``anndata.io.write_elem``.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasmix.simulate import _kernels

#: Storage chunk (elements) of the on-disk data/indices/indptr arrays.
STORAGE_CHUNK = 1 << 18


def _csr(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_genes: int) -> sp.csr_matrix:
    m = sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, n_genes), copy=False)
    m.has_sorted_indices = True
    return m


def _clean_uns(value: Any) -> Any:
    """Make a nested value writable by ``write_elem`` (None -> "None", tuples -> lists)."""
    if isinstance(value, dict):
        return {str(k): _clean_uns(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_clean_uns(v) for v in value]
        if items and all(isinstance(v, str) for v in items):
            return np.array(items, dtype=object)
        if items and all(isinstance(v, (int, float, bool, np.number)) for v in items):
            return np.asarray(items)
        return {str(i): v for i, v in enumerate(items)}
    if value is None:
        return "None"
    return value


class AnnDataWriter:
    """Write an AnnData h5ad (``fmt="h5ad"``) or zarr store (``fmt="zarr"``) in row chunks.

    Parameters
    ----------
    path : Path
        Output file (h5ad) or directory (zarr); replaced if it exists.
    var : pandas.DataFrame
        Gene annotation (index Ensembl ids, column ``feature_name``).
    fmt : {"h5ad", "zarr"}
        Container.
    compression : str or None
        HDF5 filter for X (``"gzip"``, ``"lzf"``) or ``None``; ignored for zarr.
    """

    def __init__(self, path: Path, var: pd.DataFrame, fmt: str = "h5ad", compression: str | None = None):
        import anndata
        from anndata.io import sparse_dataset, write_elem

        self.path, self.var, self.fmt = Path(path), var, fmt
        self._write_elem = write_elem
        if self.path.exists():
            if self.path.is_dir():
                shutil.rmtree(self.path)
            else:
                self.path.unlink()
        kw: dict[str, Any] = {"indptr_dtype": np.int64}
        if fmt == "h5ad":
            import h5py

            self._f = h5py.File(self.path, "w")
            kw["chunks"] = (STORAGE_CHUNK,)
            if compression:
                kw["compression"] = compression
        else:
            import zarr

            self._f = zarr.open_group(str(self.path), mode="w", zarr_format=anndata.settings.zarr_write_format)
            kw["chunks"] = (STORAGE_CHUNK,)
        self._f.attrs["encoding-type"] = "anndata"
        self._f.attrs["encoding-version"] = "0.1.0"
        empty = sp.csr_matrix((np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(1, np.int64)),
                              shape=(0, len(var)))
        write_elem(self._f, "X", empty, dataset_kwargs=kw)
        self._X = sparse_dataset(self._f["X"])
        self.n_obs = 0
        self.nnz = 0

    def append(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        """Append CSR rows (int64 indptr, int32 indices, float32 data) to X."""
        self._X.append(_csr(indptr, indices, data, len(self.var)))
        self.n_obs += len(indptr) - 1
        self.nnz += len(indices)

    def finish(self, obs: pd.DataFrame, uns: dict[str, Any]) -> None:
        """Write obs, var, uns and the empty mappings; close the file.

        Raises
        ------
        ValueError
            ``obs`` does not have one row per appended cell.
        """
        if len(obs) != self.n_obs:
            raise ValueError(f"obs has {len(obs)} rows but X has {self.n_obs}")
        we = self._write_elem
        we(self._f, "obs", obs)
        we(self._f, "var", self.var)
        we(self._f, "uns", _clean_uns(uns))
        for k in ("obsm", "varm", "obsp", "varp", "layers"):
            we(self._f, k, {})
        if self.fmt == "h5ad":
            self._f.close()


class MexWriter:
    """Write a 10x Genomics MEX directory in row chunks.

    Files: ``matrix.mtx.gz`` (MatrixMarket coordinate integer, genes x cells, 1-based),
    ``features.tsv.gz`` (``id<TAB>name<TAB>Gene Expression``), ``barcodes.tsv.gz`` and, since MEX
    carries no cell metadata, ``obs.csv.gz`` (first column ``barcode``, then the obs columns).
    The MatrixMarket header needs the non-zero count, so entries go to a temporary gzip member
    that is appended after the header member (a multi-member gzip file, read by any gzip reader).
    """

    def __init__(self, path: Path, var: pd.DataFrame, compresslevel: int = 4):
        self.path, self.var = Path(path), var
        if self.path.exists():
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        self.path.mkdir(parents=True)
        feats = pd.DataFrame({"id": var.index.astype(str), "name": var["feature_name"].astype(str),
                              "type": "Gene Expression"})
        with gzip.open(self.path / "features.tsv.gz", "wt", compresslevel=compresslevel) as fh:
            feats.to_csv(fh, sep="\t", header=False, index=False)
        self._body_path = self.path / ".matrix.body.gz"
        self._body = gzip.open(self._body_path, "wb", compresslevel=compresslevel)
        self.n_obs = 0
        self.nnz = 0

    def append(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        """Append CSR rows (cells) as MatrixMarket entries."""
        self._body.write(_kernels.format_mtx(indptr, indices, data, self.n_obs).tobytes())
        self.n_obs += len(indptr) - 1
        self.nnz += len(indices)

    def finish(self, obs: pd.DataFrame, uns: dict[str, Any]) -> None:
        """Write the header, barcodes and obs sidecar; ``uns`` is not stored in MEX."""
        if len(obs) != self.n_obs:
            raise ValueError(f"obs has {len(obs)} rows but the matrix has {self.n_obs}")
        self._body.close()
        mtx = self.path / "matrix.mtx.gz"
        with open(mtx, "wb") as out:
            header = (f"%%MatrixMarket matrix coordinate integer general\n"
                      f"%metadata_json: {{\"software_version\": \"atlasmix simulate\", \"format_version\": 2}}\n"
                      f"{len(self.var)} {self.n_obs} {self.nnz}\n")
            out.write(gzip.compress(header.encode()))
            with open(self._body_path, "rb") as body:
                shutil.copyfileobj(body, out, 1 << 22)
        self._body_path.unlink()
        with gzip.open(self.path / "barcodes.tsv.gz", "wt") as fh:
            fh.write("\n".join(obs.index.astype(str)) + ("\n" if len(obs) else ""))
        obs.rename_axis("barcode").to_csv(self.path / "obs.csv.gz")


def toml_str(s: str) -> str:
    """A TOML basic string literal."""
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{out}"'


def write_plan(path: Path, entries: list[dict[str, Any]]) -> None:
    """Write an ingest plan: one ``[[dataset]]`` table per entry, with an optional ``[dataset.set]``.

    Each entry has ``dataset_id``, ``source`` (path relative to the plan), ``organism``, ``title``,
    optionally ``obs_table`` (CSV of per-cell obs keyed by barcode, for MEX) and ``set`` (dict of
    obs columns to set to a constant).
    """
    lines = ["# ingest plan written by `atlasmix simulate`", ""]
    for e in entries:
        lines.append("[[dataset]]")
        for k in ("dataset_id", "source", "organism", "title", "obs_table"):
            if k in e:
                lines.append(f"{k} = {toml_str(str(e[k]))}")
        if e.get("set"):
            lines.append("[dataset.set]")
            for k, v in e["set"].items():
                lines.append(f"{k} = {toml_str(str(v))}")
        lines.append("")
    Path(path).write_text("\n".join(lines))
