"""Geneformer-format dictionaries: read, write and align them to a store's gene axis.

Geneformer (Theodoris et al. 2023) ships two pickles with every model:

``token_dictionary.pkl``
    ``{"<pad>": 0, "<mask>": 1, [V2: "<cls>": 2, "<eos>": 3,] ensembl_id: token_id, ...}``.
``gene_median_dictionary.pkl``
    ``{ensembl_id: median}``: the nonzero median of CP10k expression of the gene over the
    pretraining corpus (the rank value encoding divides by it).

The published V1 files (``gc30M``) are in ``../shared/geneformer/``; :func:`write_dictionaries`
writes files of the same format from :func:`atlasmix.training.geneformer.medians.gene_medians`,
so models trained here load in the Geneformer ecosystem and vice versa.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlasmix.errors import AtlasmixError

TOKEN_FILE = "token_dictionary.pkl"
MEDIAN_FILE = "gene_median_dictionary.pkl"
NAME_ID_FILE = "gene_name_id_dict.pkl"
PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"


@dataclass
class Dictionaries:
    """A token dictionary and a gene median dictionary.

    Attributes
    ----------
    token : dict of str -> int
        Token ids, ``<pad>``=0, ``<mask>``=1 (V2 also ``<cls>``, ``<eos>``), then Ensembl ids.
    median : dict of str -> float
        Nonzero median of CP10k expression per Ensembl id (only genes with a token).
    """

    token: dict[str, int]
    median: dict[str, float]

    @property
    def pad_id(self) -> int:
        return int(self.token[PAD])

    @property
    def mask_id(self) -> int:
        return int(self.token[MASK])

    @property
    def special_ids(self) -> list[int]:
        """Token ids of the special tokens present (``<pad>``, ``<mask>``, ``<cls>``, ``<eos>``)."""
        return [int(self.token[k]) for k in (PAD, MASK, CLS, EOS) if k in self.token]

    @property
    def has_v2_specials(self) -> bool:
        return CLS in self.token and EOS in self.token

    def genes(self) -> list[str]:
        """Ensembl ids that have both a token and a median, in token-id order."""
        g = [k for k in self.token if not k.startswith("<") and k in self.median]
        return sorted(g, key=lambda k: self.token[k])

    def vocab_size(self) -> int:
        return int(max(self.token.values())) + 1

    def arrays(self, feature_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Align the dictionaries to a gene axis.

        Parameters
        ----------
        feature_ids : sequence of str
            Ensembl ids of a gene axis (e.g. the store's ``var.feature_id``).

        Returns
        -------
        (numpy.ndarray of bool, numpy.ndarray of int64, numpy.ndarray of float64)
            ``in_vocab`` (len(feature_ids),): the id has a token and a median; ``token_ids``
            and ``medians`` of the same length (0 / NaN where not in the vocabulary).
        """
        ids = list(feature_ids)
        tok = np.zeros(len(ids), dtype=np.int64)
        med = np.full(len(ids), np.nan)
        ok = np.zeros(len(ids), dtype=bool)
        for i, g in enumerate(ids):
            t, m = self.token.get(g), self.median.get(g)
            if t is not None and m is not None and not str(g).startswith("<"):
                tok[i], med[i], ok[i] = int(t), float(m), True
        return ok, tok, med


def _load_pickle(path: Path, what: str) -> dict:
    if not path.is_file():
        raise AtlasmixError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f)
    except Exception as e:  # corrupt / not a pickle
        raise AtlasmixError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(d, dict):
        raise AtlasmixError(f"{what} {path} is not a dict")
    return d


def load_dictionaries(directory: str | Path) -> Dictionaries:
    """Read ``token_dictionary.pkl`` and ``gene_median_dictionary.pkl`` from ``directory``.

    Parameters
    ----------
    directory : path
        A folder holding both pickles (Geneformer's published files, or :func:`write_dictionaries`'s
        output, or a model directory written by ``atlasmix train geneformer``).

    Returns
    -------
    Dictionaries

    Raises
    ------
    AtlasmixError
        A file is missing or unreadable, or the token dictionary lacks ``<pad>``=0 / ``<mask>``.
    """
    d = Path(directory)
    token = _load_pickle(d / TOKEN_FILE, "token dictionary")
    median = _load_pickle(d / MEDIAN_FILE, "gene median dictionary")
    token = {str(k): int(v) for k, v in token.items()}
    median = {str(k): float(v) for k, v in median.items()}
    if token.get(PAD) != 0 or MASK not in token:
        raise AtlasmixError(f"{d / TOKEN_FILE} must map <pad> to 0 and have <mask>")
    bad = [g for g, m in median.items() if not (m > 0 and np.isfinite(m))]
    if bad:
        raise AtlasmixError(f"gene median dictionary has {len(bad)} non-positive medians (first {bad[0]!r})")
    return Dictionaries(token, median)


def build_dictionaries(medians: dict[str, float], special_tokens: bool = False) -> Dictionaries:
    """Geneformer dictionaries from per-gene medians.

    Parameters
    ----------
    medians : dict of str -> float
        Ensembl id -> nonzero median of CP10k (genes with no nonzero value left out).
    special_tokens : bool
        False (V1): ``<pad>`` = 0, ``<mask>`` = 1, genes from 2. True (V2): also ``<cls>`` = 2,
        ``<eos>`` = 3, genes from 4.

    Returns
    -------
    Dictionaries
        Genes numbered in sorted Ensembl-id order (as Geneformer's own dictionaries).
    """
    token = {PAD: 0, MASK: 1}
    if special_tokens:
        token.update({CLS: 2, EOS: 3})
    start = len(token)
    genes = sorted(g for g, m in medians.items() if m > 0 and np.isfinite(m))
    token.update({g: start + i for i, g in enumerate(genes)})
    return Dictionaries(token, {g: float(medians[g]) for g in genes})


def write_dictionaries(dicts: Dictionaries, directory: str | Path) -> list[Path]:
    """Write ``token_dictionary.pkl`` and ``gene_median_dictionary.pkl`` (Geneformer format).

    Returns
    -------
    list of pathlib.Path
        The two files written.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name, obj in ((TOKEN_FILE, dicts.token), (MEDIAN_FILE, dicts.median)):
        with open(d / name, "wb") as f:
            pickle.dump(obj, f)
        out.append(d / name)
    return out


def load_name_id_dict(path: str | Path) -> dict[str, str]:
    """Geneformer's ``gene_name_id_dict.pkl`` (symbol -> Ensembl id)."""
    return {str(k): str(v) for k, v in _load_pickle(Path(path), "gene name dictionary").items()}
