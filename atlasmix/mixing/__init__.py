"""mixing: declare training corpora as SQL over obs and resolve them to frozen manifests.

>>> from atlasmix.mixing import resolve, write_manifest, read_manifest
>>> from atlasmix.store import Store
>>> res = resolve("examples/mixtures/shared/base_model.toml", "lake")
>>> side = write_manifest(res, "runs/base_model.parquet")
>>> table, side = read_manifest("runs/base_model.parquet", store=Store("lake"))  # loaders

Modules, in data-flow order: :mod:`atlasmix.mixing.spec` (the spec format),
:mod:`atlasmix.mixing.obs_context` (the sandboxed SQL over obs: tables a query can use),
:mod:`atlasmix.mixing.exclusions` (the tree of excluded specs and manifests),
:mod:`atlasmix.mixing.sampling` (seeded, hash-stable draws), :mod:`atlasmix.mixing.sketch` (geometric
sketching), :mod:`atlasmix.mixing.draws` (each spec's cells; the order of resolution),
:mod:`atlasmix.mixing.manifest_table` (the manifest table, composition, copies),
:mod:`atlasmix.mixing.manifest` (parquet + sidecar files), :mod:`atlasmix.mixing.resolver`
(:func:`resolve`, the stages together), :mod:`atlasmix.mixing.genes` (a mixture's gene axis); and
``examples/mixtures/README.md``.
"""

from atlasmix.mixing.manifest import (check_store, diff_manifests, read_manifest, read_sidecar, sidecar_path,
                                      write_manifest)
from atlasmix.mixing.manifest_table import Resolution
from atlasmix.mixing.obs_context import ObsContext
from atlasmix.mixing.resolver import resolve
from atlasmix.mixing.spec import Component, EvalSet, MixtureSpec, SketchOptions, SpecError, load_spec, loads_spec, parse_spec

__all__ = ["Component", "EvalSet", "MixtureSpec", "ObsContext", "Resolution", "SketchOptions", "SpecError",
           "check_store", "diff_manifests", "load_spec", "loads_spec", "parse_spec", "read_manifest", "read_sidecar",
           "resolve", "sidecar_path", "write_manifest"]
