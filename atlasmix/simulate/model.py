"""The generative model: gene space, expression tables per (cell group, donor), and cell blocks.

Its parts, in the order a run uses them (this module re-exports their public names):
:mod:`~atlasmix.simulate.genes` (the gene space), :mod:`~atlasmix.simulate.groups` (a source's
cell groups), :mod:`~atlasmix.simulate.tables` (the sampling tables of a source),
:mod:`~atlasmix.simulate.cells` (blocks of generated cells), :mod:`~atlasmix.simulate.obs`
(barcodes and obs), all drawing from :mod:`~atlasmix.simulate.seeding`'s keyed random streams.

Model (after Splatter, Zappia, Phipson & Oshlack 2017, Genome Biology 18:174)
-----------------------------------------------------------------------------
* **Gene base means** ``lambda_g ~ Gamma(shape=0.6, rate=0.3)`` (Splatter ``mean.shape``/``mean.rate``);
  with probability 0.05 a gene is an expression outlier, ``median(lambda) * LN(4, 0.5)``
  (``out.prob``/``out.facLoc``/``out.facScale``). Ribosomal-protein and housekeeping genes get
  high means and marker genes a low background mean; non-coding genes (only when ``n_genes``
  exceeds the protein-coding genes) are scaled by 0.2.
* **Cell groups**: a cell type (or tumour clone, perturbation, TF state) multiplies ``lambda`` by
  the DE factors of every programme on its path (:mod:`atlasmix.simulate.programmes`).
* **Batch**: per source a per-gene factor ``LN(0, batch_scale)`` and per donor ``LN(0, donor_scale)``.
* **Library size** ``L_c ~ LN(log(library_median * lib_factor), library_sdlog)`` UMIs;
  a fraction ``f_c`` (logit-normal around ``mito_fraction``) goes to the 13 ``MT-`` genes
  (Poisson total, multinomial split), the rest to nuclear genes.
* **Counts** ``X_cg ~ NB(mean mu_cg = L_c * p_kg, size r_cg)`` (gamma-Poisson) with ``p_kg`` the
  group's normalised proportions and Splatter's trended biological coefficient of variation
  ``BCV = (0.1 + 1/sqrt(mu_ref)) * sqrt(60 / chi2_60)`` evaluated at the group's reference mean
  ``mu_ref`` (library ``L_ref``). The NB size scales with the cell's library,
  ``r_cg = L_c / L_ref * r_kg``: this keeps the sampler linear in ``L_c`` (see
  :mod:`atlasmix.simulate._kernels`), so larger cells are slightly less over-dispersed.
* **Dropout** (optional): Splatter's logistic, drop probability
  ``1 / (1 + exp(-shape * (log(mu) - mid)))`` applied to each drawn non-zero count.
"""

from __future__ import annotations

# re-exported: atlasmix.simulate, its tests and benchmarks/bench_simulate.py call ``model.<name>``
from atlasmix.simulate.cells import BLOCK, Block, RowBuffer, generate_block
from atlasmix.simulate.genes import BCV_DF, MEAN_RATE, MEAN_SHAPE, OUT_LOC, OUT_PROB, OUT_SCALE, GeneSpace, gene_space
from atlasmix.simulate.groups import Group, design_groups
from atlasmix.simulate.obs import barcodes, build_obs
from atlasmix.simulate.tables import BCV_COMMON, CompiledSource, compile_source

__all__ = ["BCV_COMMON", "BCV_DF", "BLOCK", "Block", "CompiledSource", "GeneSpace", "Group", "MEAN_RATE",
           "MEAN_SHAPE", "OUT_LOC", "OUT_PROB", "OUT_SCALE", "RowBuffer", "barcodes", "build_obs",
           "compile_source", "design_groups", "gene_space", "generate_block"]
