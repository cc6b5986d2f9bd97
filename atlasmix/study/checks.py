"""Sanity checks a composition study must pass before its answer is read.

For each added source ``X`` declared in the study (``[checks.sources] X = "<its held-out eval set>"``):

``diagonal``      ``X_only`` scores highest among the study's ``*_only`` mixtures on X's held-out set,
                  and its paired delta against the runner-up has a 95 % interval above 0. A model
                  trained on a source must explain that source's held-out cells better than models
                  trained on other sources; if not, the models are undertrained or broken.
``adding_helps``  ``base_plus_X`` scores at least as well as the reference (e.g. ``base_model``) on X's
                  held-out set: the 95 % interval of the paired delta lies above ``-margin``
                  (non-inferiority; the reference never saw X).

A check that cannot apply (a mixture the study lacks, an eval set no model can score, e.g. mouse
cells for a human gene axis) says so (``applicable`` False) instead of failing.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from atlasmix.study import stats


def _na(name: str, kind: str, eval_set: str, subject: str, why: str) -> dict:
    return {"name": name, "kind": kind, "eval_set": eval_set, "subject": subject, "applicable": False,
            "passed": None, "detail": f"not applicable: {why}"}


def run_checks(sources: dict[str, str], mixtures: list[str], reference: str | None,
               cells: Callable[[str, str], np.ndarray | None], *, margin: float = 0.01, n_bootstrap: int = 1000,
               seed: int = 0) -> list[dict]:
    """Evaluate the checks (module doc).

    Parameters
    ----------
    sources : dict of str to str
        Source name -> its held-out eval set.
    mixtures : list of str
        The study's mixtures (headline budget, full size).
    reference : str or None
        The reference mixture of ``adding_helps``.
    cells : callable
        ``cells(mixture, eval_set)`` -> per-cell scores, shape (n_seeds, n_cells), seeds in the
        same order for every mixture; None when the mixture has no scores there.
    margin : float
        Non-inferiority margin of ``adding_helps``.
    n_bootstrap, seed
        Bootstrap settings (:mod:`atlasmix.study.stats`).

    Returns
    -------
    list of dict
        Keys :data:`atlasmix.study.tables.CHECK_KEYS`.
    """
    out: list[dict] = []
    only = [m for m in mixtures if m.endswith("_only")]
    for src, ev in sorted(sources.items()):
        mine = f"{src}_only"
        name = f"diagonal:{src}"
        if mine not in mixtures:
            out.append(_na(name, "diagonal", ev, mine, f"the study has no mixture {mine}"))
        elif len(only) < 2:
            out.append(_na(name, "diagonal", ev, mine, "fewer than two *_only mixtures"))
        else:
            scored = {}
            for m in only:
                v = cells(m, ev)
                if v is not None and np.isfinite(v).any():
                    scored[m] = v
            if mine not in scored or len(scored) < 2:
                out.append(_na(name, "diagonal", ev, mine, f"fewer than two *_only models could be scored on {ev}"))
            else:
                means = {m: float(np.mean(np.nanmedian(v, axis=1))) for m, v in scored.items()}
                rank = sorted(means, key=means.get, reverse=True)
                rival = rank[1] if rank[0] == mine else rank[0]
                d = stats.paired_delta(scored[mine], scored[rival], n_bootstrap=n_bootstrap, seed=seed)
                ok = rank[0] == mine and d["lo"] > 0
                out.append({"name": name, "kind": "diagonal", "eval_set": ev, "subject": mine, "applicable": True,
                            "passed": bool(ok),
                            "detail": (f"{mine} {means[mine]:.3f} vs best other *_only {rival} {means[rival]:.3f}: "
                                       f"delta {d['delta']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
                                       + ("" if ok else (" -- interval not above 0" if rank[0] == mine
                                                         else f" -- {rival} scores highest")))})
        plus = f"base_plus_{src}"
        name = f"adding_helps:{src}"
        if reference is None:
            out.append(_na(name, "adding_helps", ev, plus, "the study names no reference mixture"))
        elif plus not in mixtures:
            out.append(_na(name, "adding_helps", ev, plus, f"the study has no mixture {plus}"))
        else:
            a, b = cells(plus, ev), cells(reference, ev)
            if a is None or b is None or not np.isfinite(a).any() or not np.isfinite(b).any():
                out.append(_na(name, "adding_helps", ev, plus, f"{plus} or {reference} could not be scored on {ev}"))
            else:
                d = stats.paired_delta(a, b, n_bootstrap=n_bootstrap, seed=seed)
                ok = d["lo"] > -margin
                out.append({"name": name, "kind": "adding_helps", "eval_set": ev, "subject": plus, "applicable": True,
                            "passed": bool(ok),
                            "detail": (f"{plus} - {reference}: {d['delta']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
                                       f" (passes when the interval lies above -{margin:g})")})
    return out
