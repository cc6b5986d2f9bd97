"""A mixture's gene axis: the genes a model is trained and scored on.

Three rules, named the same way on every command that trains (``--genes``) and in study specs:

``all-shared``
    Genes measured in *every* dataset that contributes cells (the rows of the store's
    ``feature_dataset_presence_matrix``); the loader's default (:func:`mixture_genes`).
    Empty as soon as one dataset is a small targeted panel that shares nothing with the others.
``hvg:N[,min-datasets=F]``
    The top ``N`` highly variable genes of the mixture's training cells among the genes measured in at
    least a fraction ``F`` (default 0.5) of the contributing datasets (:func:`choose_genes`). Works for
    any mixture that measures at least one gene in ``F`` of its datasets.
a file
    One gene per line: Ensembl ``feature_id`` or, when unique in the store, ``feature_name``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlasmix.errors import AtlasmixError

#: Default share of contributing datasets a candidate HVG must be measured in.
MIN_DATASET_FRACTION = 0.5
_HVG = re.compile(r"^hvg:(\d+)(?:,min-datasets=([0-9.]+))?$")
USAGE = ("--genes takes a file (one gene per line), 'all-shared' (measured in every dataset of the mixture) or "
         "'hvg:N[,min-datasets=F]' (top N HVGs among genes measured in at least a fraction F of its datasets)")


@dataclass(frozen=True)
class GeneAxis:
    """A parsed ``--genes`` value.

    Attributes
    ----------
    kind : {"all-shared", "hvg", "file"}
    n_hvg : int or None
        ``hvg`` only: number of HVGs.
    min_dataset_fraction : float
        ``hvg`` only: candidate genes are measured in at least this share of the contributing datasets.
    path : pathlib.Path or None
        ``file`` only.
    """

    kind: str = "all-shared"
    n_hvg: int | None = None
    min_dataset_fraction: float = MIN_DATASET_FRACTION
    path: Path | None = None

    @classmethod
    def parse(cls, text: str | Path | None) -> "GeneAxis":
        """Parse ``all-shared``, ``hvg:N[,min-datasets=F]`` or a file path (``None``: ``all-shared``).

        Raises
        ------
        AtlasmixError
            A malformed ``hvg:`` rule, ``F`` outside (0, 1], ``N`` < 1, or a file that does not exist.
        """
        if text is None:
            return cls()
        t = str(text).strip()
        if t == "all-shared":
            return cls()
        if t.startswith("hvg"):
            m = _HVG.match(t)
            if not m:
                raise AtlasmixError(f"bad --genes {t!r}: {USAGE}")
            n, f = int(m.group(1)), float(m.group(2)) if m.group(2) else MIN_DATASET_FRACTION
            if n < 1 or not 0 < f <= 1:
                raise AtlasmixError(f"bad --genes {t!r}: N must be >= 1 and min-datasets in (0, 1]")
            return cls("hvg", n, f)
        p = Path(t)
        if not p.is_file():
            raise AtlasmixError(f"--genes {t!r} is neither a file nor a rule; {USAGE}")
        return cls("file", path=p)

    def describe(self) -> str:
        """The rule as it is written on the command line."""
        if self.kind == "hvg":
            return f"hvg:{self.n_hvg},min-datasets={self.min_dataset_fraction:g}"
        return str(self.path) if self.kind == "file" else "all-shared"


def read_gene_file(path: str | Path) -> list[str]:
    """Genes of a list file: one per line, blank lines and ``#`` comments skipped.

    Raises
    ------
    AtlasmixError
        The file lists no gene.
    """
    genes = [ln.split("#", 1)[0].strip() for ln in Path(path).read_text().splitlines()]
    genes = [g for g in genes if g]
    if not genes:
        raise AtlasmixError(f"gene list {path} is empty")
    return genes


def resolve_gene_axis(store, manifests: list[Path], axis: GeneAxis, *, max_cells: int = 20_000,
                      seed: int = 0) -> list[str] | None:
    """The genes of ``axis`` for the training cells of ``manifests``.

    Returns
    -------
    list of str or None
        Gene identifiers for a file or an HVG rule (Ensembl ids for HVGs); ``None`` for ``all-shared``,
        which the loader resolves itself (:func:`mixture_genes`).

    Raises
    ------
    AtlasmixError
        As :func:`choose_genes` and :func:`read_gene_file`.
    """
    if axis.kind == "file":
        return read_gene_file(axis.path)
    if axis.kind == "hvg":
        return choose_genes(store, manifests, n_genes=axis.n_hvg, max_cells=max_cells,
                            min_dataset_fraction=axis.min_dataset_fraction, seed=seed)
    return None


def gene_axis_var_joinids(store, manifest: Path, axis: GeneAxis, split: str = "train", *,
                           seed: int = 0) -> np.ndarray:
    """var joinids of ``axis`` for the ``split`` cells of ``manifest`` (``all-shared`` resolved too).

    Returns
    -------
    numpy.ndarray of int64
        In the file's order for a gene list, in var order otherwise.

    Raises
    ------
    AtlasmixError
        As :func:`resolve_gene_axis` and :func:`mixture_genes`.
    """
    from atlasmix.mixing.manifest import read_manifest

    genes = resolve_gene_axis(store, [Path(manifest)], axis, seed=seed)
    if genes is not None:
        return mixture_genes(store, np.zeros(0, np.int64), genes)
    t, _ = read_manifest(manifest, store=store)
    sp = t["split"].cast("string").to_numpy(zero_copy_only=False)
    return mixture_genes(store, t["soma_joinid"].to_numpy()[sp == split])


def choose_genes(store, manifests: list[Path], n_genes: int = 2000, max_cells: int = 20_000,
                 min_dataset_fraction: float = MIN_DATASET_FRACTION, seed: int = 0) -> list[str]:
    """The top ``n_genes`` HVGs of the mixtures' training cells (the ``hvg:N`` rule).

    Candidate genes are those measured (feature_dataset_presence_matrix) in at least
    ``min_dataset_fraction`` of the datasets that contribute training cells -- small gene panels
    (e.g. a 200-gene dataset) would otherwise empty the intersection. Among them, scanpy's
    ``seurat``-flavour HVG selection on log1p(CP10k) (streamed moments,
    :class:`atlasmix.preprocess.HVGStats`) over a seeded sample of at most ``max_cells``
    training cells (union over ``manifests``). Memory: ``max_cells`` x candidate genes per read chunk.

    Returns
    -------
    list of str
        Ensembl ids (``feature_id``), in var order; fewer than ``n_genes`` when fewer genes qualify.

    Raises
    ------
    AtlasmixError
        No training cell, or no candidate gene.
    """
    from atlasmix.preprocess import HVGStats
    from atlasmix.mixing.manifest import read_manifest

    cells = []
    for m in manifests:
        t, _ = read_manifest(m, store=store)
        split = t["split"].cast("string").to_numpy(zero_copy_only=False)
        cells.append(t["soma_joinid"].to_numpy()[split == "train"])
    cells = np.unique(np.concatenate(cells)) if cells else np.zeros(0, np.int64)
    if len(cells) == 0:
        raise AtlasmixError("the mixture has no training cells to choose HVGs from")
    rng = np.random.default_rng(seed)
    if len(cells) > max_cells:
        cells = np.sort(rng.choice(cells, max_cells, replace=False))
    obs = store.obs(["dataset_id"]).to_pandas().set_index("soma_joinid")
    used = set(obs.loc[cells, "dataset_id"].unique())
    cat = store.catalog()
    rows = cat.index.to_numpy()[cat["dataset_id"].isin(used).to_numpy()]  # index: dataset joinid
    pres = store.presence()[np.asarray(rows, dtype=np.int64)]
    frac = np.asarray(pres.mean(axis=0)).ravel()
    var = store.var()
    cand = var.index.to_numpy()[frac[var.index.to_numpy()] >= min_dataset_fraction - 1e-9]
    if len(cand) == 0:
        raise AtlasmixError(f"no gene is measured in at least {min_dataset_fraction:g} of the mixture's "
                            f"{len(used)} datasets; lower min-datasets in --genes hvg:N,min-datasets=F")
    stats = HVGStats(len(cand))
    for _, m in store.iter_X(cells, cand, chunk_size=4096):
        stats.update(m)
    dn = stats.table()["dispersions_norm"].to_numpy()
    order = np.argsort(-np.nan_to_num(dn, nan=-np.inf), kind="stable")  # most variable first, NaN last
    top = np.sort(order[:min(n_genes, len(cand))])
    return var.loc[cand[top], "feature_id"].astype(str).tolist()


def mixture_genes(store, cells: np.ndarray, genes: Sequence[str] | None = None) -> np.ndarray:
    """Var joinids of a mixture's gene axis.

    Parameters
    ----------
    store : atlasmix.store.Store
    cells : numpy.ndarray of int64
        The mixture's cell joinids (any order).
    genes : sequence of str, optional
        Explicit gene list: Ensembl ``feature_id`` values (or ``feature_name`` symbols when unique),
        returned in this order. Default: genes measured in *every* dataset that contributes cells
        (the intersection of the datasets' rows of the presence matrix), sorted by var joinid.

    Returns
    -------
    numpy.ndarray of int64

    Raises
    ------
    AtlasmixError
        A listed gene is not in the store, or the default intersection is empty.
    """
    var = store.var()
    if genes is not None:
        by_id = dict(zip(var["feature_id"], var.index))
        names = var["feature_name"].value_counts()
        by_name = {n: j for n, j in zip(var["feature_name"], var.index) if names[n] == 1}
        out, missing = [], []
        for g in genes:
            j = by_id.get(g, by_name.get(g))
            (missing if j is None else out).append(g if j is None else int(j))
        if missing:
            raise AtlasmixError(f"{len(missing)} genes are not in the store (first: {missing[0]!r})")
        return np.asarray(out, dtype=np.int64)
    ranges = store.complete_ranges()
    cat = store.catalog()
    start_to_jid = dict(zip(cat["obs_joinid_start"].to_numpy(), cat.index.to_numpy()))
    which = np.unique(np.searchsorted(ranges[:, 0], np.unique(cells), side="right") - 1)
    ds = [int(start_to_jid[int(ranges[i, 0])]) for i in which]
    pres = store.presence()
    keep = np.asarray(pres[ds].sum(axis=0)).ravel() == len(ds)
    out = var.index.to_numpy(dtype=np.int64)[keep[: len(var)]]
    if len(out) == 0:
        raise AtlasmixError(f"the {len(ds)} datasets of this mixture measure no gene in common (--genes all-shared); "
                            "use --genes hvg:2000 (top HVGs among genes measured in at least half of them) or "
                            "--genes FILE")
    return out


__all__ = ["GeneAxis", "USAGE", "choose_genes", "gene_axis_var_joinids", "mixture_genes", "read_gene_file", "resolve_gene_axis"]
