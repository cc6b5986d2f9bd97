"""Training budgets: how long a model trains, declared up front and recorded with the model.

A composition study compares models trained on corpora of very different sizes (462 TF-atlas cells
next to 20,000 blood cells). Trained for the same number of *epochs*, the small corpus gets a few
optimizer steps and the large one hundreds, and the comparison measures steps, not data. A budget
fixes the unit of comparison:

``cells``
    cells seen (compute-matched: every mixture sees the same number of cells; a small corpus is
    repeated, a large one may not finish an epoch). The study default.
``steps``
    optimizer steps.
``epochs``
    passes over the training split (scFM-datamix: 250).
``converged``
    validation-loss early stopping with a stated ``patience`` (validation points without an improvement
    of at least ``min_delta`` of the best ELBO) and a maximum given in one of the units above.

Every budget resolves to a number of optimizer steps for a given training split and minibatch size
(:meth:`Budget.max_steps`); validation runs every :meth:`Budget.val_every` steps (the same number of
validation points for every mixture under a ``cells`` or ``steps`` budget), and the KL warm-up of
the VAE runs over a fixed share of the steps (scvi-tools' default warms up over 400 *epochs*, which
under a cells budget would give each mixture a different KL schedule).

After training, :func:`convergence` applies one plateau rule to the validation curve (or the
training curve when there is no validation split): the run *converged* when the best validation
ELBO of the last quarter of the validation points improved on the best before them by less than
``plateau_tol`` (default 3 %) of its magnitude -- diminishing returns, not a zero gradient: a
2-epoch LDVAE of the round-1 demo improved by 30-50 % in its last quarter, the demo's
compute-matched models by 1-3 %. A model that fails the rule (or has fewer than 4 validation
points to judge) is labelled undertrained in a study's results.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from atlasmix.errors import AtlasmixError

Unit = Literal["cells", "steps", "epochs"]

#: relative improvement of the best validation ELBO over the last quarter of training under which a
#: run counts as converged (:func:`convergence`)
PLATEAU_REL_TOL = 0.03
#: KL warm-up share of a cells or steps budget
DEFAULT_KL_WARMUP_FRACTION = 0.25


class Budget(BaseModel):
    """How long a model trains.

    Attributes
    ----------
    unit : {"cells", "steps", "epochs"}
        Unit of ``value`` (and of the maximum of a ``converged`` budget).
    value : int
        Cells seen, optimizer steps or epochs (> 0).
    until_converged : bool
        Stop early when the validation ELBO has not improved by ``min_delta`` for ``patience``
        validation points (Lightning ``EarlyStopping`` through scvi-tools); ``value`` is then the
        maximum.
    patience : int
        Validation points without improvement before stopping (``until_converged`` only).
    min_delta : float
        Smallest improvement of the validation ELBO (nats per cell) that counts.
    n_validations : int
        Validation points over the budget (validation every ``max_steps / n_validations`` steps).
    plateau_tol : float
        Relative improvement of the last quarter under which the run counts as converged
        (:func:`convergence`).
    kl_warmup_fraction : float, optional
        Share of the budget's steps over which the KL weight rises from 0 to 1 (0: no warm-up).
        None: 25 % for ``cells`` and ``steps`` budgets; scvi-tools' own warm-up (400 epochs) for an
        ``epochs`` budget, as scFM-datamix trained.

    Examples
    --------
    >>> Budget.parse("cells=200000").max_steps(n_train=462, batch_size=128)  # 4 minibatches per epoch
    1732
    """

    model_config = ConfigDict(extra="forbid")
    unit: Unit = "cells"
    value: int = Field(gt=0)
    until_converged: bool = False
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0)
    n_validations: int = Field(20, ge=1)
    plateau_tol: float = Field(PLATEAU_REL_TOL, gt=0, lt=1)
    kl_warmup_fraction: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self):
        if self.unit == "cells" and self.value < 1:
            raise ValueError("a cells budget needs at least one cell")
        return self

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """A budget from its short form: ``cells=200000``, ``steps=2000``, ``epochs=250`` or
        ``converged:epochs=100`` (optionally ``,patience=5``).

        Raises
        ------
        AtlasmixError
            Not one of these forms.
        """
        t = text.strip()
        until = t.startswith("converged:")
        if until:
            t = t[len("converged:"):]
        parts = [p.strip() for p in t.split(",") if p.strip()]
        try:
            unit, value = parts[0].split("=", 1)
            extra = dict(p.split("=", 1) for p in parts[1:])
            return cls(unit=unit.strip(), value=int(value), until_converged=until,
                       **{k.strip(): (float(v) if k.strip() in ("min_delta", "kl_warmup_fraction", "plateau_tol")
                                      else int(v))
                          for k, v in extra.items()})
        except Exception as e:
            raise AtlasmixError(f"bad budget {text!r}: use cells=N, steps=N, epochs=N or converged:epochs=N"
                                f"[,patience=K] ({e})") from None

    @property
    def label(self) -> str:
        """The short form (:meth:`parse` reads it back), e.g. ``cells=200000``."""
        s = f"{self.unit}={self.value}"
        return f"converged:{s},patience={self.patience}" if self.until_converged else s

    def max_steps(self, n_train: int, batch_size: int, batches_per_epoch: int | None = None) -> int:
        """Optimizer steps of this budget for a training split of ``n_train`` cells.

        Parameters
        ----------
        n_train : int
            Training cells (one epoch).
        batch_size : int
            Cells per minibatch.
        batches_per_epoch : int, optional
            The loader's minibatches per epoch (default ``ceil(n_train / batch_size)``).

        Raises
        ------
        AtlasmixError
            An empty training split.
        """
        if n_train <= 0:
            raise AtlasmixError("the training split is empty")
        bpe = batches_per_epoch or math.ceil(n_train / batch_size)
        if self.unit == "steps":
            return int(self.value)
        if self.unit == "epochs":
            return int(self.value) * int(bpe)
        # cells seen: the epoch's last minibatch may be short, so count cells per epoch exactly
        per_epoch_cells = min(n_train, bpe * batch_size)
        full, rest = divmod(int(self.value), per_epoch_cells)
        return full * int(bpe) + math.ceil(rest / batch_size)

    def val_every(self, max_steps: int) -> int:
        """Steps between validation points (at least 1)."""
        return max(1, int(round(max_steps / self.n_validations)))

    def kl_warmup_steps(self, max_steps: int) -> int | None:
        """Steps of the KL warm-up (None: none, or scvi-tools' epoch-based default; see
        ``kl_warmup_fraction``)."""
        frac = self.kl_warmup_fraction
        if frac is None:
            frac = None if self.unit == "epochs" else DEFAULT_KL_WARMUP_FRACTION
        if frac is None:
            return None
        n = int(round(frac * max_steps))
        return n if n > 0 else None


def convergence(curve, rel_tol: float = PLATEAU_REL_TOL) -> dict:
    """The plateau rule (module doc) on a training curve.

    Parameters
    ----------
    curve : pandas.DataFrame
        One row per validation point with ``validation_loss`` (ELBO, nats per cell; NaN when there
        is no validation split) and ``train_loss``.
    rel_tol : float
        Relative improvement under which the curve counts as flat.

    Returns
    -------
    dict
        ``converged`` (bool, or None with fewer than 4 points), ``rule`` (text), ``monitor``
        (column used), ``improvement_last_quarter`` (relative improvement of the best value in the
        last quarter over the best before it; > 0 means still improving).
    """
    rule = (f"best loss of the last quarter of validation points improves on the best before by < {rel_tol:.0%}")
    if curve is None or len(curve) == 0:
        return {"converged": None, "rule": rule, "monitor": None, "improvement_last_quarter": None}
    col = "validation_loss" if "validation_loss" in curve and np.isfinite(curve["validation_loss"]).sum() >= 4 \
        else "train_loss"
    v = np.asarray(curve[col], dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 4:
        return {"converged": None, "rule": rule, "monitor": col, "improvement_last_quarter": None}
    k = max(1, len(v) // 4)
    before, last = v[:-k].min(), v[-k:].min()
    imp = float((before - last) / max(abs(before), 1e-12))
    return {"converged": bool(imp < rel_tol), "rule": rule, "monitor": col, "improvement_last_quarter": round(imp, 6)}
