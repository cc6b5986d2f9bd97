"""Study specs: a composition experiment as one TOML file (``atlasmix study run STUDY.toml``).

A study is the grid mixtures x seeds x budgets (x subset fractions x strategies for data-size
scaling) of LDVAE models, each evaluated on every eval set, summarised with intervals over seeds
and eval cells, compared with a reference mixture, and checked for sanity.

Example
-------
.. code-block:: toml

    name = "demo"
    mixtures_dir = "mixtures"            # mixture specs <name>.toml (relative to this file)
    mixtures = ["base_model", "base_plus_malignant", "malignant_only"]
    eval_sets = "mixtures/eval_sets.toml"
    reference = "base_model"
    seeds = [0, 1, 2]                    # each seed: the manifest draw and the weight initialisation
    budgets = ["cells=150000"]           # compute-matched: every mixture sees 150,000 cells

    [genes]
    n_hvg = 500                          # the models' shared gene axis: HVGs of the training cells

    [ldvae]
    batch_size = 256
    lr = 0.03

    [evaluation]
    max_cells_per_set = 1000             # a seeded subsample, the same cells for every model

    [checks.sources]                     # source -> its held-out eval set (mixture "<source>_only")
    malignant = "malignant_heldout_donor"

    [scaling]                            # scFM-dataselection's subset-size curves of one mixture
    base = "base_full"
    fractions = [0.01, 0.1, 0.25, 0.5, 0.75, 1.0]
    strategies = ["random", "balanced", "geometric_sketch"]
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atlasmix._files import load_toml
from atlasmix.errors import AtlasmixError
from atlasmix.mixing.spec import STRATEGIES, SpecError, _format_error
from atlasmix.training.budget import Budget
from atlasmix.training.options import LDVAE_LOADER, LDVAEModelOptions, LDVAETrainOptions, LoaderOptions


class GeneAxis(BaseModel):
    """The models' shared gene axis (:func:`atlasmix.mixing.genes.choose_genes`).

    Attributes
    ----------
    n_hvg : int
        HVGs (scanpy seurat flavour on log1p CP10k) of a sample of the training cells.
    min_dataset_fraction : float
        Candidate genes are measured in at least this share of the contributing datasets.
    max_cells : int
        Training cells sampled for the HVG statistics.
    file : str, optional
        A gene list (one Ensembl id or symbol per line) instead of HVGs.
    """

    model_config = ConfigDict(extra="forbid")
    n_hvg: int = Field(2000, ge=10)
    min_dataset_fraction: float = Field(0.5, gt=0, le=1)
    max_cells: int = Field(20_000, ge=100)
    file: str | None = None


_MODEL, _TRAIN = LDVAEModelOptions(), LDVAETrainOptions()


class LDVAEOptions(BaseModel):
    """LDVAE (scvi-tools ``LinearSCVI``) settings of every run; scFM-datamix's by default.

    Each key is a field of one of the option groups ``train ldvae`` and
    :func:`atlasmix.training.ldvae.train_ldvae` take (:mod:`atlasmix.training.options`): the model's
    (``n_latent`` to ``batch_key``), the training's ``lr`` and the loader's ``batch_size``, with
    those groups' defaults and checks (:meth:`option_groups`); a minibatch has at least 2 cells.
    """

    model_config = ConfigDict(extra="forbid")
    n_latent: int = Field(_MODEL.n_latent, ge=1)
    n_layers: int = Field(_MODEL.n_layers, ge=1)
    n_hidden: int = Field(_MODEL.n_hidden, ge=1)
    dropout_rate: float = Field(_MODEL.dropout_rate, ge=0, lt=1)
    gene_likelihood: str = _MODEL.gene_likelihood
    dispersion: str = _MODEL.dispersion
    lr: float = Field(_TRAIN.lr, gt=0)
    batch_size: int = Field(LDVAE_LOADER.batch_size, ge=2)
    batch_key: str | None = _MODEL.batch_key

    @model_validator(mode="after")
    def _check_groups(self):
        try:
            self.option_groups()
        except AtlasmixError as e:  # reported with the key path, as the other spec errors
            raise ValueError(str(e)) from None
        return self

    def option_groups(self) -> tuple[LDVAEModelOptions, LDVAETrainOptions, LoaderOptions]:
        """The model, training and loader options these keys set (every other field at its default)."""
        model = LDVAEModelOptions(n_latent=self.n_latent, n_layers=self.n_layers, n_hidden=self.n_hidden,
                                  dropout_rate=self.dropout_rate, gene_likelihood=self.gene_likelihood,
                                  dispersion=self.dispersion, batch_key=self.batch_key)
        return model, LDVAETrainOptions(lr=self.lr), LDVAE_LOADER.replace(batch_size=self.batch_size)


class EvaluationOptions(BaseModel):
    """How every run is scored.

    Attributes
    ----------
    n_hvg : int
        Genes scored by the reconstruction metric: the eval set's top HVGs on the gene axis
        (scFM-datamix: 1,000).
    max_cells_per_set : int, optional
        Score a seeded subsample of at most this many cells of each eval set (the same cells for
        every run, so runs stay paired); None: every cell.
    knn : bool
        kNN (k=5) cell-type classification on the LDVAE latent (macro F1; labelled sets only).
    n_bootstrap : int
        Bootstrap replicates of the intervals.
    seed : int
        Seed of the subsample and the bootstrap.
    """

    model_config = ConfigDict(extra="forbid")
    n_hvg: int = Field(1000, ge=10)
    max_cells_per_set: int | None = Field(None, ge=10)
    knn: bool = True
    n_bootstrap: int = Field(1000, ge=100)
    seed: int = 0


class Checks(BaseModel):
    """Sanity checks (:mod:`atlasmix.study.checks`).

    Attributes
    ----------
    sources : dict of str to str
        Added source -> the eval set holding its held-out cells. Source ``X`` is checked when the
        study has mixtures ``X_only`` (diagonal dominance) and ``base_plus_X`` (adding helps).
    margin : float
        Non-inferiority margin of "adding helps" (Pearson r): the 95 % interval of
        ``base_plus_X - reference`` must lie above ``-margin``.
    """

    model_config = ConfigDict(extra="forbid")
    sources: dict[str, str] = Field(default_factory=dict)
    margin: float = Field(0.01, ge=0)


class _PretrainOptions(BaseModel):
    """Options shared by the foundation models a study pretrains (Geneformer, scGPT, scBERT): each
    listed mixture x each study seed trains one model with ``budget`` (its own: MLM steps are not
    LDVAE steps), scored against a baseline that knows no cell context.

    Attributes
    ----------
    mixtures : list of str, optional
        Mixtures to train on (default: the reference, else the first mixture).
    preset : str
        Model size (each model's ``PRESETS``; ``tiny`` for tests).
    batch_size : int
        Cells per optimizer step.
    lr : float
        AdamW learning rate.
    budget : str
        Training budget (:class:`atlasmix.training.budget.Budget` short form; cells or steps).
    """

    model_config = ConfigDict(extra="forbid")
    mixtures: list[str] | None = None
    preset: str = "tiny"
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    budget: str = "steps=200"

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        try:
            b = Budget.parse(v)
        except AtlasmixError as e:
            raise ValueError(str(e)) from None
        if b.until_converged:
            raise ValueError("pretraining runs take a cells, steps or epochs budget")
        return v


class GeneformerOptions(_PretrainOptions):
    """Geneformer (BERT masked-gene model on rank value encoded cells) runs of a study
    (:class:`_PretrainOptions`): every eval set scores the masked rank prediction of a seeded
    subsample of ``max_rank_cells`` cells against the mean-rank baseline (sc-foundation-eval's
    zero-shot test); a model whose score does not beat the baseline (paired interval above 0) is
    labelled so.

    Attributes
    ----------
    max_len : int
        Tokens per cell (rank value encoding truncated).
    dictionaries : str, optional
        Folder with ``token_dictionary.pkl`` + ``gene_median_dictionary.pkl`` (relative to the study
        file); default: exact gene medians of each run's training split.
    max_rank_cells : int
        Cells per eval set scored by masked rank prediction.
    """

    max_len: int = Field(256, ge=8)
    dictionaries: str | None = None
    max_rank_cells: int = Field(200, ge=10)


class ScGPTOptions(_PretrainOptions):
    """scGPT runs of a study (:class:`_PretrainOptions`), scored by masked value prediction on
    ``max_scored_cells`` cells per eval set against the per-gene mean bin
    (:func:`atlasmix.evaluation.run.masked_prediction_outputs`).

    Attributes
    ----------
    max_len : int
        Tokens per cell (genes subsampled beyond it).
    vocab : str, optional
        scGPT vocabulary JSON (relative to the study file); default: the store's gene symbols.
    max_scored_cells : int
    """

    max_len: int = Field(256, ge=8)
    vocab: str | None = None
    max_scored_cells: int = Field(200, ge=10)


class ScBERTOptions(_PretrainOptions):
    """scBERT runs of a study (:class:`_PretrainOptions`), scored by masked expression-token
    prediction on ``max_scored_cells`` cells per eval set against the per-gene mean token.

    Attributes
    ----------
    genes : str
        scBERT's gene axis file (relative to the study file; :func:`atlasmix.training.gene_lists.read_gene_list`).
    gene2vec : str, optional
        gene2vec matrix (``.npy``, genes x dim) for fixed position embeddings.
    max_scored_cells : int
    """

    genes: str
    gene2vec: str | None = None
    batch_size: int = Field(8, ge=1)
    max_scored_cells: int = Field(200, ge=10)


#: The pretrained foundation models a study can list, by spec key.
PRETRAINED_KINDS = ("geneformer", "scgpt", "scbert")


class Scaling(BaseModel):
    """Subset-size curves of one mixture (scFM-dataselection).

    Attributes
    ----------
    base : str
        The mixture whose components are subsampled.
    fractions : list of float
        Shares (0, 1] of each component's cells.
    strategies : list of str
        ``random``, ``balanced`` (equal cells per ``balance_by`` value) and/or ``geometric_sketch``.
    balance_by : str
        obs column of the ``balanced`` strategy.
    seeds : list of int, optional
        Default: the study's seeds.
    """

    model_config = ConfigDict(extra="forbid")
    base: str
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.1, 0.25, 0.5, 0.75, 1.0])
    strategies: list[str] = Field(default_factory=lambda: ["random", "balanced", "geometric_sketch"])
    balance_by: str = "cell_type"
    seeds: list[int] | None = None

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v):
        if not v or any(not (0 < f <= 1) for f in v):
            raise ValueError("fractions must lie in (0, 1]")
        return sorted(set(v))

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, v):
        for s in v:
            if s not in STRATEGIES:
                raise ValueError(f"unknown strategy {s!r} (one of {', '.join(STRATEGIES)})")
        return v


class StudySpec(BaseModel):
    """A study (module doc).

    Attributes
    ----------
    name : str
    mixtures_dir : str
        Folder of the mixture specs, relative to the study file.
    mixtures : list of str
        Mixture spec names (``<name>.toml`` in ``mixtures_dir``); default: every spec there except
        the eval-set spec.
    eval_sets : str
        The eval-set spec (relative to the study file); every mixture must exclude it.
    reference : str, optional
        The mixture every other one is compared with (paired deltas).
    seeds : list of int
        Replicates: the seed replaces each mixture spec's seed (the cells drawn) and seeds the
        weights and the data order.
    budgets : list of str
        Training budgets (:class:`atlasmix.training.budget.Budget` short forms). The first is the
        headline.
    geneformer : GeneformerOptions, optional
        Also train Geneformer on some mixtures (scored by masked rank prediction vs its baseline).
    scgpt : ScGPTOptions, optional
        Also train scGPT (scored by masked value prediction vs the per-gene mean bin).
    scbert : ScBERTOptions, optional
        Also train scBERT (scored by masked token prediction vs the per-gene mean token).
    """

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    mixtures_dir: str = "."
    mixtures: list[str] | None = None
    eval_sets: str = "eval_sets.toml"
    reference: str | None = None
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    budgets: list[str] = Field(default_factory=lambda: ["cells=150000"])
    genes: GeneAxis = Field(default_factory=GeneAxis)
    ldvae: LDVAEOptions = Field(default_factory=LDVAEOptions)
    evaluation: EvaluationOptions = Field(default_factory=EvaluationOptions)
    checks: Checks = Field(default_factory=Checks)
    scaling: Scaling | None = None
    geneformer: GeneformerOptions | None = None
    scgpt: ScGPTOptions | None = None
    scbert: ScBERTOptions | None = None

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if not v or len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError("give distinct, non-negative seeds")
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v):
        if not v:
            raise ValueError("give at least one budget")
        for b in v:
            try:
                Budget.parse(b)
            except AtlasmixError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.mixtures is not None:
            if not self.mixtures:
                raise ValueError("mixtures: give at least one mixture")
            if len(set(self.mixtures)) != len(self.mixtures):
                raise ValueError("mixtures: a mixture is named twice")
            if self.reference is not None and self.reference not in self.mixtures:
                raise ValueError(f"reference: {self.reference!r} is not one of the study's mixtures")
            for kind in PRETRAINED_KINDS:
                opts = getattr(self, kind)
                for m in (opts.mixtures or []) if opts else []:
                    if m not in self.mixtures:
                        raise ValueError(f"{kind}.mixtures: {m!r} is not one of the study's mixtures")
        return self

    def budget_objects(self) -> list[Budget]:
        """The budgets, parsed."""
        return [Budget.parse(b) for b in self.budgets]


def load_study(path: str | Path) -> tuple[StudySpec, Path]:
    """Read and validate a study file.

    Returns
    -------
    (StudySpec, pathlib.Path)
        The spec and the folder relative paths are resolved against.

    Raises
    ------
    SpecError
        File missing, TOML syntax error or an invalid spec (the message names the key path).
    """
    p = Path(path)
    data = load_toml(p, missing="study spec not found: {path}", bad="bad study {name}: TOML: {error}", error=SpecError)
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_error(e, p.name).replace("bad spec", "bad study", 1)) from None
    return spec, p.resolve().parent
