"""Mixture specs: TOML files validated with pydantic v2.

A spec declares a training corpus as queries over the store's ``obs`` table (see
:mod:`atlasmix.mixing.obs_context` for the tables a query can use) and named evaluation sets.
Every validation error names the offending key path, e.g. ``components[2].n_cells: ...``.

Example
-------
.. code-block:: toml

    name = "base_plus_malignant"
    seed = 0
    validation_fraction = 0.05
    exclude = ["eval_sets.toml"]          # eval sets (and other mixtures) kept out of training

    [[components]]
    name = "base"
    where = "tissue_general = 'blood' AND disease = 'normal'"
    fraction = 0.5

    [[components]]
    name = "malignant"
    where = "is_malignant"
    n_cells = 5000
    strategy = "balanced"
    balance_by = "donor_id"

    [eval_sets.heldout_donor]
    where = "donor_id = 'blood_a_donor1'"
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atlasmix._files import load_toml
from atlasmix.errors import AtlasmixError

Strategy = Literal["random", "balanced", "geometric_sketch"]
STRATEGIES = ("random", "balanced", "geometric_sketch")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class SpecError(AtlasmixError):
    """A mixture spec is malformed (TOML syntax, unknown key, bad value); the message names the key path."""


class SketchOptions(BaseModel):
    """Options of the ``geometric_sketch`` strategy.

    Attributes
    ----------
    n_pcs : int
        Principal components the sketch is computed on (Hie et al. 2019 sketch a PCA embedding).
        geosketch's covering search is pure Python, O(n_cells x n_pcs) per iteration: keep it modest.
    n_top_genes : int
        Genes with the highest variance of log1p(CP10k) among the component's cells used for the PCA.
    chunk_size : int
        Cells per streamed X chunk (memory ~ chunk_size x genes per cell).
    """

    model_config = ConfigDict(extra="forbid")
    n_pcs: int = Field(20, ge=2, le=500)
    n_top_genes: int = Field(2000, ge=10)
    chunk_size: int = Field(8192, ge=16)


class Selection(BaseModel):
    """What components and eval sets share: a query, a size and a sampling strategy.

    Attributes
    ----------
    where : str, optional
        A SQL predicate over ``obs`` (shorthand for ``SELECT soma_joinid FROM obs WHERE (...)``).
    sql : str, optional
        A duckdb ``SELECT`` returning a column ``soma_joinid`` (may join ``datasets`` or the
        ``extra_<dataset_id>`` side tables). Exactly one of ``where`` / ``sql``.
    n_cells : int, optional
        Absolute number of cells.
    fraction : float, optional
        Share (0, 1] of the cells the query matches (after exclusions). Without any size, all
        matching cells are taken.
    strategy : {"random", "balanced", "geometric_sketch"}
        How cells are drawn from the matching ones.
    balance_by : str or list of str, optional
        obs column(s) whose values get equal numbers of cells (``balanced`` only).
    take_all_if_short : bool
        When the query matches fewer cells than asked for, take them all instead of failing.
    sketch : SketchOptions, optional
        ``geometric_sketch`` options.
    """

    model_config = ConfigDict(extra="forbid")
    where: str | None = None
    sql: str | None = None
    n_cells: int | None = Field(None, gt=0)
    fraction: float | None = Field(None, gt=0, le=1)
    strategy: Strategy = "random"
    balance_by: str | list[str] | None = None
    take_all_if_short: bool = False
    sketch: SketchOptions | None = None

    @field_validator("where", "sql")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("balance_by")
    @classmethod
    def _columns(cls, v):
        cols = [v] if isinstance(v, str) else v
        if cols is not None:
            if not cols:
                raise ValueError("give at least one column")
            for c in cols:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", c):
                    raise ValueError(f"{c!r} is not a column name")
        return v

    def _check_common(self) -> None:
        if (self.where is None) == (self.sql is None):
            raise ValueError("give exactly one of `where` (a predicate over obs) or `sql` (a SELECT returning soma_joinid)")
        if self.strategy == "balanced" and self.balance_by is None:
            raise ValueError("strategy 'balanced' needs `balance_by` (e.g. balance_by = \"cell_type\")")
        if self.strategy != "balanced" and self.balance_by is not None:
            raise ValueError(f"`balance_by` only applies to strategy 'balanced', not {self.strategy!r}")
        if self.strategy != "geometric_sketch" and self.sketch is not None:
            raise ValueError(f"`sketch` options only apply to strategy 'geometric_sketch', not {self.strategy!r}")

    @property
    def balance_columns(self) -> list[str]:
        """``balance_by`` as a list (empty when not balanced)."""
        if self.balance_by is None:
            return []
        return [self.balance_by] if isinstance(self.balance_by, str) else list(self.balance_by)

    @property
    def query_text(self) -> str:
        return self.where if self.where is not None else self.sql  # type: ignore[return-value]


class Component(Selection):
    """One component of a mixture: a :class:`Selection` with a name and an optional ``weight``.

    Attributes
    ----------
    name : str
        Unique within the spec; written to the manifest's ``component`` column and used (with the
        spec seed) to seed the component's sampling.
    weight : float, optional
        Share of the spec's total ``n_cells`` left after fixed-size components (weights are normalised).
    """

    name: str = Field(pattern=_NAME)
    weight: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self):
        self._check_common()
        given = [k for k in ("n_cells", "fraction", "weight") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of n_cells, fraction, weight (got {', '.join(given)})")
        return self


class EvalSet(Selection):
    """A named evaluation set (the name is its key under ``[eval_sets]``)."""

    @model_validator(mode="after")
    def _check(self):
        self._check_common()
        if self.n_cells is not None and self.fraction is not None:
            raise ValueError("give at most one of n_cells, fraction")
        return self


class MixtureSpec(BaseModel):
    """A mixture: named components (the training corpus) and eval sets.

    Attributes
    ----------
    name : str
        Name of the mixture.
    description : str
        Free text.
    seed : int
        Seeds every random choice (with each component's / eval set's name).
    n_cells : int, optional
        Total training + validation cells; required when a component uses ``weight``.
    validation_fraction : float
        Share [0, 1) of each component's cells assigned to ``split = "validation"`` (seeded).
    exclude : list of str
        Cells kept out of the training corpus: the name of an eval set of this spec, a path to another
        spec file (``.toml``: its eval sets become eval sets of this mixture and all its cells are
        excluded) or a manifest (``.parquet``: its cells are excluded). Paths are relative to the spec.
    components : list of Component
        The training corpus, resolved in order (a cell goes to the first component that draws it).
    eval_sets : dict of str to EvalSet
        Named eval sets; always disjoint from training and validation cells.
    """

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=_NAME)
    description: str = ""
    seed: int = Field(0, ge=0, lt=2**63)
    n_cells: int | None = Field(None, gt=0)
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    exclude: list[str] = Field(default_factory=list)
    components: list[Component] = Field(default_factory=list)
    eval_sets: dict[str, EvalSet] = Field(default_factory=dict)

    @field_validator("eval_sets")
    @classmethod
    def _eval_names(cls, v: dict[str, EvalSet]) -> dict[str, EvalSet]:
        for k in v:
            if not re.fullmatch(_NAME, k):
                raise ValueError(f"eval set name {k!r}: use letters, digits, '_', '-' and '.'")
        return v

    @model_validator(mode="after")
    def _check(self):
        names = [c.name for c in self.components]
        for i, n in enumerate(names):
            if names.index(n) != i:
                raise ValueError(f"components[{i}].name: {n!r} is used by components[{names.index(n)}] too")
            if n in self.eval_sets:
                raise ValueError(f"components[{i}].name: {n!r} is also the name of an eval set")
        weighted = [i for i, c in enumerate(self.components) if c.weight is not None]
        if weighted and self.n_cells is None:
            raise ValueError(f"components[{weighted[0]}].weight: a weight is a share of the total, "
                             "so give the total `n_cells` at the top level")
        if not self.components and not self.eval_sets:
            raise ValueError("components: a spec needs at least one component or eval set")
        return self

    # ------------------------------------------------------------------ helpers
    def canonical(self) -> dict[str, Any]:
        """The spec as plain JSON-able data with every default filled in (what the spec hash covers)."""
        return self.model_dump(mode="json")

    def spec_hash(self) -> str:
        """sha256 of :meth:`canonical` as sorted, compact JSON (formatting and key order do not matter)."""
        return hashlib.sha256(canonical_json(self.canonical()).encode()).hexdigest()


def canonical_json(obj: Any) -> str:
    """Sorted-key, compact JSON (the form hashed for spec hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _loc(loc: tuple) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _format_error(e: ValidationError, where: str) -> str:
    err = e.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-after", "union"))))
    # drop pydantic's union-member tags such as 'str' / 'list[str]'
    loc = tuple(p for p in loc if p not in ("str", "list[str]"))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    path = _loc(loc)
    if re.match(r"^[A-Za-z_]\w*(\[\d+\])?[.\w\[\]]*: ", msg):  # the validator already named the key
        return f"bad spec {where}: {msg}"
    extra = f"; got {err['input']!r}" if err["type"] not in ("extra_forbidden", "missing") \
        and not isinstance(err.get("input"), (dict, list)) else ""
    return f"bad spec {where}: {path}: {msg}{extra}" if path else f"bad spec {where}: {msg}"


def parse_spec(data: dict[str, Any], where: str = "<dict>") -> MixtureSpec:
    """Validate a spec given as a dict (a parsed TOML document).

    Raises
    ------
    SpecError
        Naming the offending key path, e.g. ``components[2].n_cells: Input should be greater than 0``.
    """
    try:
        return MixtureSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_error(e, where)) from None


def loads_spec(text: str, where: str = "<string>") -> MixtureSpec:
    """Parse and validate TOML text.

    Raises
    ------
    SpecError
        TOML syntax error (with line/column) or an invalid spec.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"bad spec {where}: TOML: {e}") from None
    return parse_spec(data, where)


def load_spec(path: str | Path) -> MixtureSpec:
    """Read and validate a TOML spec file.

    Raises
    ------
    SpecError
        File missing, TOML syntax error or invalid spec (the message names the key path).
    """
    p = Path(path)
    return parse_spec(load_toml(p, missing="spec not found: {path}", bad="bad spec {name}: TOML: {error}",
                                error=SpecError), p.name)
