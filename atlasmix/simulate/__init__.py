"""``atlasmix simulate``: a realistic multi-source single-cell count simulator.

The embedded default corpus of the demo and the benchmark corpus. One call writes several
*sources* (datasets) that look to the ingest exactly like real CELLxGENE-style sources: raw UMI
counts on real human Ensembl genes, CELLxGENE-style obs, one file per source and an ingest plan.

Method: a Splatter-style generative model (Zappia, Phipson & Oshlack 2017, *Splatter: simulation
of single-cell RNA sequencing data*, Genome Biology 18:174): gamma-distributed gene base means
with outliers, cell-type programmes as multiplicative log-normal DE factors, log-normal library
sizes, gamma-Poisson (negative-binomial) counts with Splatter's trended BCV, optional logistic
dropout, and per-source / per-donor batch factors. See :mod:`atlasmix.simulate.model` for the
equations and :mod:`atlasmix.simulate._kernels` for the exact sparse NB sampler.

Example
-------
>>> from atlasmix.simulate import simulate_atlas
>>> info = simulate_atlas("sim_out", n_cells=20_000, sources=["blood_a", "blood_b", "malignant"])
>>> info["plan"]  # sim_out/plan.toml, ready for ``atlasmix ingest``
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from atlasmix.errors import AtlasmixError
from atlasmix.simulate import model
from atlasmix.simulate.model import BLOCK, CompiledSource
from atlasmix.simulate.sources import DEFAULT_SOURCES, PRESET_NAMES, SourceSpec, parse_sources, preset

__all__ = ["DEFAULT_SOURCES", "FORMATS", "PRESET_NAMES", "SourceSpec", "iter_chunks", "parse_sources",
           "preset", "resolve_sources", "simulate_atlas", "split_cells"]

#: Output formats.
FORMATS = ("h5ad", "zarr", "mex")
#: Default number of cells per written chunk.
DEFAULT_CHUNK = 8192


def resolve_sources(sources: str | Sequence[str | SourceSpec] | None) -> list[SourceSpec]:
    """Turn ``None`` (all presets), ``"a,b:2"`` or a list of names / :class:`SourceSpec` into specs.

    Raises
    ------
    AtlasmixError
        Unknown preset, invalid spec, duplicate names or more than 64 sources.
    """
    if sources is None:
        specs = [preset(n) for n in DEFAULT_SOURCES]
    elif isinstance(sources, str):
        specs = parse_sources(sources)
    else:
        specs = []
        for s in sources:
            if isinstance(s, SourceSpec):
                specs.append(s)
            elif isinstance(s, str):
                specs.extend(parse_sources(s))
            else:
                raise AtlasmixError(f"a source must be a name or a SourceSpec, got {type(s).__name__}")
    if not specs:
        raise AtlasmixError("no sources given")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise AtlasmixError("source names must be unique")
    if len(specs) > 64:
        raise AtlasmixError("at most 64 sources per run")
    for s in specs:
        s.validate()
    return specs


def split_cells(n_cells: int, weights: Sequence[float]) -> list[int]:
    """Split ``n_cells`` across sources proportionally to ``weights`` (largest remainder, each >= 1).

    Raises
    ------
    AtlasmixError
        ``n_cells`` smaller than the number of sources.
    """
    k = len(weights)
    if n_cells < k:
        raise AtlasmixError(f"--cells ({n_cells}) must be at least the number of sources ({k})")
    w = np.asarray(weights, float) / float(np.sum(weights))
    raw = n_cells * w
    counts = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - counts), kind="stable")[: n_cells - counts.sum()]:
        counts[i] += 1
    for i in np.flatnonzero(counts == 0):
        counts[int(np.argmax(counts))] -= 1
        counts[i] = 1
    return [int(c) for c in counts]


def iter_chunks(src: CompiledSource, n_cells: int, chunk_size: int, copy: bool = True) -> Iterator[model.Block]:
    """Yield the source's cells as CSR chunks of exactly ``chunk_size`` rows (the last may be smaller).

    Cells are generated in fixed blocks of :data:`atlasmix.simulate.model.BLOCK` cells with one
    random stream per block, then re-cut into chunks, so the output never depends on ``chunk_size``.
    Peak memory is about one chunk plus one block. With ``copy=False`` the chunks are views of an
    internal buffer, valid only until the next chunk is requested.

    Raises
    ------
    AtlasmixError
        ``chunk_size`` < 1.
    """
    if chunk_size < 1:
        raise AtlasmixError("chunk size must be >= 1")
    buf = model.RowBuffer()
    n_blocks = -(-n_cells // BLOCK)
    for b in range(n_blocks):
        model.generate_block(src, b, n_cells, into=buf)
        while buf.n >= chunk_size or (b == n_blocks - 1 and buf.n > 0):
            take = min(chunk_size, buf.n)
            yield buf.take(take, copy)
            buf.drop(take)


def _source_path(out_dir: Path, name: str, fmt: str) -> Path:
    return out_dir / (name if fmt == "mex" else f"{name}.{fmt}")


def simulate_atlas(out_dir: str | Path, n_cells: int, sources: str | Sequence[str | SourceSpec] | None = None,
                   seed: int = 0, n_genes: int | None = None, chunk_size: int = DEFAULT_CHUNK,
                   fmt: str = "h5ad", compression: str | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Simulate a multi-source atlas and write one dataset per source plus ``plan.toml``.

    Parameters
    ----------
    out_dir : str or Path
        Output directory (created; existing source files of the same names are replaced).
    n_cells : int
        Total number of cells, split across sources by their ``weight`` (largest remainder).
    sources : str, list of str / SourceSpec, or None
        Presets by name (``"blood_a,blood_b:2"`` gives blood_b twice the weight), custom
        :class:`SourceSpec` objects, or ``None`` for all presets (:data:`PRESET_NAMES`).
    seed : int
        Random seed. Output is a deterministic function of (seed, sources, n_cells per source,
        n_genes); it does not depend on ``chunk_size`` or on the number of threads.
    n_genes : int or None
        Size of the gene space; ``None`` = all 19,907 protein-coding genes of GENCODE v44.
        Always includes the 13 ``MT-`` genes and all marker genes (minimum 500).
    chunk_size : int
        Cells per written chunk (bounds memory: ~40 bytes x chunk_size x detected genes per cell).
    fmt : {"h5ad", "zarr", "mex"}
        ``<id>.h5ad``, AnnData zarr ``<id>.zarr``, or 10x MEX directory ``<id>/``.
    compression : str or None
        HDF5 compression for X in h5ad output (``"gzip"``, ``"lzf"``); default none (fastest).
    progress : callable or None
        Called as ``progress(dataset_id, cells_done, cells_total)`` after each chunk.

    Returns
    -------
    dict
        ``out_dir``, ``plan`` (path of plan.toml), ``seed``, ``n_genes``, ``seconds``,
        ``cells_per_s`` and ``sources``: one dict per source with ``dataset_id``, ``path``,
        ``n_cells``, ``nnz``, ``seconds``.

    Raises
    ------
    AtlasmixError
        Unknown source or format, bad cell/gene count or chunk size.

    Notes
    -----
    X holds float32 integer-valued raw UMI counts (cells x genes, CSR). obs columns:
    ``dataset_id, assay, organism, tissue, tissue_general, cell_type, disease, is_malignant,
    perturbation, development_stage, donor_id`` (``perturbation`` is a gene symbol or
    ``"control"`` in perturbation/TF sources, ``"none"`` elsewhere). var: index Ensembl id,
    column ``feature_name``. ``uns["simulation"]`` records every parameter.
    """
    if fmt not in FORMATS:
        raise AtlasmixError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(n_cells, (int, np.integer)) or n_cells < 1:
        raise AtlasmixError("number of cells must be a positive integer")
    if chunk_size < 1:
        raise AtlasmixError("chunk size must be >= 1")
    if compression not in (None, "gzip", "lzf"):
        raise AtlasmixError(f"unknown compression {compression!r}; use gzip or lzf")
    specs = resolve_sources(sources)
    counts = split_cells(int(n_cells), [s.weight for s in specs])
    space = model.gene_space(n_genes, int(seed))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from atlasmix import __version__
    from atlasmix.simulate import writers

    t_all = time.perf_counter()
    results, plan = [], []
    for code, (spec, n_src) in enumerate(zip(specs, counts)):
        t0 = time.perf_counter()
        src = model.compile_source(spec, space, int(seed), code)
        path = _source_path(out, spec.name, fmt)
        w = writers.MexWriter(path, space.var) if fmt == "mex" else \
            writers.AnnDataWriter(path, space.var, fmt, compression)
        groups, donors, cells = [], [], []
        for chunk in iter_chunks(src, n_src, chunk_size, copy=False):
            w.append(chunk.indptr, chunk.indices, chunk.data)
            groups.append(chunk.group.copy())
            donors.append(chunk.donor.copy())
            cells.append(chunk.cell_index.copy())
            if progress is not None:
                progress(spec.name, w.n_obs, n_src)
        obs = model.build_obs(src, np.concatenate(groups), np.concatenate(donors), np.concatenate(cells))
        uns = {"simulation": {
            "method": "Splatter-style gamma-Poisson simulation (Zappia et al. 2017, Genome Biol 18:174), "
                      "atlasmix.simulate",
            "atlasmix_version": __version__, "seed": int(seed), "n_cells": n_src, "n_cells_total": int(n_cells),
            "n_genes": space.n_genes, "block_size": BLOCK, "source_index": code,
            "sources_in_run": [s.name for s in specs],
            "model": {"mean_shape": model.MEAN_SHAPE, "mean_rate": model.MEAN_RATE,
                      "out_prob": model.OUT_PROB, "out_fac_loc": model.OUT_LOC,
                      "out_fac_scale": model.OUT_SCALE, "bcv_common": model.BCV_COMMON,
                      "bcv_df": model.BCV_DF},
            "source": _spec_uns(spec),
        }}
        w.finish(obs, uns)
        del src
        dt = time.perf_counter() - t0
        results.append({"dataset_id": spec.name, "path": str(path), "n_cells": n_src, "nnz": int(w.nnz),
                        "seconds": dt})
        entry = {"dataset_id": spec.name, "source": path.name, "organism": "human", "title": spec.title,
                 "set": {"assay": spec.assay, "tissue": spec.tissue, "tissue_general": spec.tissue_general,
                         "disease": spec.disease}}
        if fmt == "mex":  # MEX has no cell metadata: point the ingest at the obs sidecar
            entry["obs_table"] = f"{path.name}/obs.csv.gz"
        plan.append(entry)
    plan_path = out / "plan.toml"
    writers.write_plan(plan_path, plan)
    secs = time.perf_counter() - t_all
    return {"out_dir": str(out), "plan": str(plan_path), "seed": int(seed), "n_genes": space.n_genes,
            "format": fmt, "seconds": secs, "cells_per_s": int(n_cells) / secs if secs > 0 else float("inf"),
            "sources": results}


def _spec_uns(spec: SourceSpec) -> dict[str, Any]:
    d = spec.to_dict()
    ct = d.pop("cell_types")
    d["cell_type_names"] = list(ct)
    d["cell_type_proportions"] = [float(v) for v in ct.values()]
    d["donor_names"] = spec.donors()
    d["donor_age_range"] = list(spec.donor_age_range)
    return d

