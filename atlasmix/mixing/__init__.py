"""mixing: declare training corpora as SQL over obs and resolve them to frozen manifests.

>>> from atlasmix.mixing import resolve, write_manifest, read_manifest
>>> from atlasmix.store import Store
>>> res = resolve("examples/mixtures/shared/base_model.toml", "lake")
>>> side = write_manifest(res, "runs/base_model.parquet")
>>> table, side = read_manifest("runs/base_model.parquet", store=Store("lake"))  # loaders

See :mod:`atlasmix.mixing.spec` (the spec format), :mod:`atlasmix.mixing.resolver` (tables a query
can use, order of resolution), :mod:`atlasmix.mixing.sampling` (seeded, hash-stable draws),
:mod:`atlasmix.mixing.sketch` (geometric sketching on an out-of-core PCA) and
:mod:`atlasmix.mixing.manifest` (parquet + sidecar), and ``examples/mixtures/README.md``.
"""

from atlasmix.mixing.manifest import (check_store, diff_manifests, read_manifest, read_sidecar, sidecar_path,
                                      write_manifest)
from atlasmix.mixing.resolver import ObsContext, Resolution, resolve
from atlasmix.mixing.spec import Component, EvalSet, MixtureSpec, SketchOptions, SpecError, load_spec, loads_spec, parse_spec

__all__ = ["Component", "EvalSet", "MixtureSpec", "ObsContext", "Resolution", "SketchOptions", "SpecError",
           "check_store", "diff_manifests", "load_spec", "loads_spec", "parse_spec", "read_manifest", "read_sidecar",
           "resolve", "sidecar_path", "write_manifest"]
