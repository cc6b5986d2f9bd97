"""Mixtures as queries (issue 4): specs, resolution, manifests, CLI, on the store of ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from atlasmix.errors import AtlasmixError
from atlasmix.mixing import (SpecError, diff_manifests, load_spec, loads_spec, read_manifest, resolve,
                             write_manifest)
from atlasmix.mixing.obs_context import ObsContext
from conftest import ROOT, needs_shared, run_cli

EXAMPLES = ROOT / "examples" / "mixtures"
DEMO_MIXTURES = ROOT / "atlasmix" / "study" / "demo" / "mixtures"
BLOOD = "dataset_id IN ('zheng_pbmc8k', 'pbmc3k', 'pisces_pbmc1k', 'pbmc10k_cite')"


@pytest.fixture(scope="module")
def store(shared_store):
    return shared_store[0]


@pytest.fixture(scope="module")
def obs(store):
    """All obs of the store as pandas, indexed by soma_joinid (the ground truth for the checks)."""
    return store.obs().to_pandas().set_index("soma_joinid")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def cells(res, component=None, split=None) -> np.ndarray:
    t = res.table.to_pandas()
    if component is not None:
        t = t[t["component"] == component]
    if split is not None:
        t = t[t["split"].isin([split] if isinstance(split, str) else split)]
    return t["soma_joinid"].to_numpy()


# ---------------------------------------------------------------------------------------------- spec
@pytest.mark.parametrize("text, fragment", [
    ('name = "m"\n[[components]]\nname = "a"\nwhere = "true"\n[[components]]\nname = "b"\nwhere = "true"\n'
     '[[components]]\nname = "c"\nwhere = "true"\nn_cells = -5\n', "components[2].n_cells: Input should be greater than 0"),
    ('name = "m"\n[[components]]\nname = "a"\nwhere = "true"\nstratgy = "random"\n', "components[0].stratgy: unknown key"),
    ('name = "m"\n[[components]]\nname = "a"\nwhere = "true"\nstrategy = "stratified"\n', "components[0].strategy"),
    ('name = "m"\n[[components]]\nname = "a"\nwhere = "true"\nn_cells = 5\nfraction = 0.5\n',
     "components[0]: give at most one of n_cells, fraction, weight"),
    ('name = "m"\n[[components]]\nname = "a"\nwhere = "true"\nweight = 2\n', "components[0].weight: a weight is a share"),
    ('name = "m"\n[[components]]\nname = "a"\nwhere = "true"\nsql = "SELECT soma_joinid FROM obs"\n',
     "components[0]: give exactly one of `where`"),
    ('name = "m"\n[[components]]\nname = "a"\nwhere = "true"\nstrategy = "balanced"\n', "needs `balance_by`"),
    ('name = "m"\n[[components]]\nname = "a"\nwhere = "true"\n[[components]]\nname = "a"\nwhere = "true"\n',
     "components[1].name: 'a' is used by components[0] too"),
    ('name = "m"\n[eval_sets.e]\nwhere = "true"\nfraction = 1.5\n', "eval_sets.e.fraction: Input should be less than or equal to 1"),
    ('name = "m"\nvalidation_fraction = 1\n[[components]]\nname = "a"\nwhere = "true"\n', "validation_fraction"),
    ('name = "m"\n[[components]\nname = "a"\n', "TOML"),
    ('seed = 1\n[[components]]\nname = "a"\nwhere = "true"\n', "name: required key is missing"),
])
def test_bad_spec_names_the_key(text, fragment):
    with pytest.raises(SpecError) as e:
        loads_spec(text, "bad.toml")
    assert fragment in str(e.value)
    assert str(e.value).startswith("bad spec bad.toml: ")
    assert "\n" not in str(e.value)


def test_spec_hash_ignores_formatting():
    a = loads_spec('name = "m"\nseed = 3\n[[components]]\nname = "a"\nwhere = "true"\nn_cells = 10\n')
    b = loads_spec('seed = 3\nname = "m"\n\n[[components]]\nn_cells = 10\nwhere = "true"\nname = "a"\n')
    c = loads_spec('name = "m"\nseed = 4\n[[components]]\nname = "a"\nwhere = "true"\nn_cells = 10\n')
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()


def test_example_specs_are_valid():
    files = sorted(EXAMPLES.glob("*/*.toml"))
    assert {f.parent.name for f in files} == {"shared"}
    files += sorted(DEMO_MIXTURES.glob("*.toml"))
    for f in files:
        spec = load_spec(f)
        for item in spec.exclude:
            assert (f.parent / item).is_file() or item in spec.eval_sets


# ---------------------------------------------------------------------------------------------- strategies
@needs_shared
def test_random_draws_match_the_query_and_nest(store, obs, tmp_path):
    def spec(n):
        return loads_spec(f'name = "r"\nseed = 11\n[[components]]\nname = "blood"\nwhere = "{BLOOD} AND cell_type <> \'unknown\'"\n'
                          f"n_cells = {n}\n")

    small, big = resolve(spec(400), store), resolve(spec(900), store)
    a, b = cells(small), cells(big)
    assert len(a) == 400 and len(b) == 900 and len(np.unique(b)) == 900
    assert np.isin(a, b).all()  # bottom-k sampling: a larger draw contains the smaller one
    sel = obs.loc[b]
    assert sel["dataset_id"].isin(["zheng_pbmc8k", "pbmc3k", "pisces_pbmc1k", "pbmc10k_cite"]).all()
    assert (sel["cell_type"] != "unknown").all()
    # the draw is spread over the datasets roughly in proportion (not the first rows of obs)
    pool = obs[obs["dataset_id"].isin(["zheng_pbmc8k", "pbmc3k"]) & (obs["cell_type"] != "unknown")]
    share = (sel["dataset_id"] == "zheng_pbmc8k").mean()
    expect = (pool["dataset_id"] == "zheng_pbmc8k").mean()
    assert abs(share - expect) < 0.1
    # composition in the sidecar data = counts from obs
    comp = {(r["dataset_id"], r["cell_type"]): r["n_cells"] for r in big.composition}
    assert comp == sel.groupby(["dataset_id", "cell_type"], observed=True).size().to_dict()


@needs_shared
def test_weights_quotas_fraction_and_split(store, obs):
    spec = loads_spec(f"""
name = "w"
seed = 5
n_cells = 3000
validation_fraction = 0.1
[[components]]
name = "weighted_blood"
where = "{BLOOD}"
weight = 2
[[components]]
name = "crispr"
where = "dataset_id = 'scmageck_crispr'"
weight = 1
[[components]]
name = "paul"
where = "dataset_id = 'paul15'"
n_cells = 500
[[components]]
name = "baron_half"
where = "dataset_id LIKE 'baron%'"
fraction = 0.5
""")
    res = resolve(spec, store)
    sizes = {c["name"]: c["n_cells"] for c in res.components}
    # fixed components first: 500 + half of the 350 Baron cells; the weights share the rest 2:1
    assert sizes["paul"] == 500 and sizes["baron_half"] == 175
    rest = 3000 - 675
    assert sizes["weighted_blood"] + sizes["crispr"] == rest
    assert abs(sizes["weighted_blood"] - 2 * rest / 3) <= 1
    assert sum(sizes.values()) == 3000 == res.counts["train"] + res.counts["validation"]
    for c in res.components:
        assert c["n_validation"] == int(np.floor(0.1 * c["n_cells"] + 0.5))
        assert c["n_train"] + c["n_validation"] == c["n_cells"]
    assert (obs.loc[cells(res, "paul"), "dataset_id"] == "paul15").all()
    t = res.table.to_pandas()
    assert t["soma_joinid"].is_unique and t["soma_joinid"].is_monotonic_increasing


@needs_shared
def test_balanced_gives_equal_cells_per_value(store, obs):
    spec = loads_spec('name = "b"\nseed = 2\n[[components]]\nname = "bal"\nwhere = "dataset_id = \'pbmc3k\'"\n'
                      'n_cells = 900\nstrategy = "balanced"\nbalance_by = "cell_type"\n')
    res = resolve(spec, store)
    got = obs.loc[cells(res), "cell_type"].value_counts()
    avail = obs[obs["dataset_id"] == "pbmc3k"]["cell_type"].value_counts()
    assert got.sum() == 900 and set(got.index) == set(avail.index)
    small = avail[avail < got.max()]
    assert (got[small.index] == small).all()  # rare types (platelets, DCs) give all their cells
    big = got.drop(small.index)
    assert big.max() - big.min() <= 1  # every other type gets the same number (water-filling level)
    rnd = resolve(loads_spec('name = "b"\nseed = 2\n[[components]]\nname = "bal"\n'
                             'where = "dataset_id = \'pbmc3k\'"\nn_cells = 900\n'), store)
    assert obs.loc[cells(rnd), "cell_type"].value_counts().max() > 1.5 * got.max()


@needs_shared
def test_balanced_by_two_columns_in_eval_set(store, obs):
    res = resolve(loads_spec('name = "e"\n[eval_sets.baron]\nwhere = "dataset_id LIKE \'baron%\'"\nn_cells = 100\n'
                             'strategy = "balanced"\nbalance_by = ["dataset_id", "cell_type"]\n'), store)
    got = obs.loc[cells(res, "baron", "eval")].groupby(["dataset_id", "cell_type"], observed=True).size()
    assert got.sum() == 100 and len(got) == 10 and got.max() - got.min() <= 1


@needs_shared
def test_geometric_sketch_streams_x_and_keeps_rare_types(store, obs, monkeypatch):
    from atlasmix.store.store import Store

    calls = []
    orig = Store.iter_X

    def counting(self, joinids, var_joinids=None, chunk_size=8192):
        calls.append((len(joinids), chunk_size))
        yield from orig(self, joinids, var_joinids, chunk_size)

    monkeypatch.setattr(Store, "iter_X", counting)
    text = ('name = "g"\nseed = 1\n[[components]]\nname = "sketch"\nwhere = "dataset_id = \'pbmc3k\'"\n'
            'n_cells = 300\nstrategy = "geometric_sketch"\nsketch = { n_pcs = 10, n_top_genes = 300, chunk_size = 1000 }\n')
    a = resolve(loads_spec(text), store)
    assert calls and all(n == 2638 and c == 1000 for n, c in calls)  # X streamed in chunks, component cells only
    b = resolve(loads_spec(text), store)
    assert np.array_equal(cells(a), cells(b))
    got = obs.loc[cells(a), "cell_type"]
    pop = obs[obs["dataset_id"] == "pbmc3k"]["cell_type"]
    rare = ["DC", "Platelet"]
    # Hie et al. 2019: rare states are over-represented relative to their share of the population
    assert got.isin(rare).mean() > 2 * pop.isin(rare).mean()
    assert len(got) == 300 and set(got.index) <= set(pop.index)


@needs_shared
def test_resolution_never_reads_x_without_sketch(store, monkeypatch, tmp_path):
    import tiledbsoma

    from atlasmix.store.store import Store

    def boom(*a, **k):
        raise AssertionError("X was read")

    monkeypatch.setattr(Store, "iter_X", boom)
    monkeypatch.setattr(tiledbsoma.SparseNDArray, "read", boom)
    spec = write(tmp_path / "s.toml", f"""
name = "nx"
n_cells = 1000
validation_fraction = 0.2
[[components]]
name = "a"
where = "{BLOOD}"
weight = 1
[[components]]
name = "b"
where = "dataset_id = 'pbmc3k'"
strategy = "balanced"
balance_by = "cell_type"
n_cells = 200
[eval_sets.e]
where = "dataset_id = 'pbmc5k_cite'"
""")
    res = resolve(spec, store)
    write_manifest(res, tmp_path / "m.parquet")
    assert res.counts == {"train": 800, "validation": 200, "eval": 200}


# ---------------------------------------------------------------------------------------------- exclusion
@needs_shared
def test_eval_sets_and_excluded_mixtures_are_disjoint_from_training(store, obs, tmp_path):
    write(tmp_path / "evals.toml", """
name = "suite"
seed = 9
[eval_sets.heldout_dataset]
where = "dataset_id = 'pbmc10k_cite'"
[eval_sets.stim]
where = "dataset_id = 'kang_ifnb' AND perturbation = 'stim_IFNb'"
fraction = 0.3
""")
    first = write(tmp_path / "first.toml", f"""
name = "first"
exclude = ["evals.toml"]
[[components]]
name = "half"
where = "{BLOOD} OR dataset_id = 'kang_ifnb'"
fraction = 0.5
""")
    second = write(tmp_path / "second.toml", f"""
name = "second"
exclude = ["first.toml", "inline"]
[[components]]
name = "rest"
where = "{BLOOD} OR dataset_id = 'kang_ifnb'"
[eval_sets.inline]
where = "dataset_id = 'pisces_pbmc1k'"
n_cells = 100
""")
    r1, r2 = resolve(first, store), resolve(second, store)
    ev1 = cells(r1, split="eval")
    assert set(obs.loc[cells(r1, "heldout_dataset", "eval"), "dataset_id"]) == {"pbmc10k_cite"}
    assert len(cells(r1, "stim", "eval")) == 300
    train1 = cells(r1, split=["train", "validation"])
    assert not np.isin(train1, ev1).any() and not (obs.loc[train1, "dataset_id"] == "pbmc10k_cite").any()
    assert r1.disjointness["disjoint"] and r1.disjointness["n_overlap"] == 0
    assert "disjoint" in r1.disjointness["statement"] and "heldout_dataset" in r1.disjointness["statement"]
    # second excludes first (its cells and its eval sets) and an inline eval set
    train2 = cells(r2, split=["train", "validation"])
    assert not np.isin(train2, train1).any()
    assert set(r2.disjointness["eval_sets"]) == {"heldout_dataset", "stim", "inline"}
    assert not np.isin(train2, cells(r2, split="eval")).any()
    # "rest" is every matching cell that is neither in an eval set nor drawn by first
    pool = obs.index[obs["dataset_id"].isin(["zheng_pbmc8k", "pbmc3k", "pisces_pbmc1k", "pbmc10k_cite", "kang_ifnb"])]
    assert set(train2) == set(pool) - set(cells(r2, split="eval")) - set(train1)
    # excluding the written manifest instead of the spec gives the same cells
    write_manifest(r1, tmp_path / "first.parquet")
    third = write(tmp_path / "third.toml", second.read_text().replace('"first.toml"', '"first.parquet", "evals.toml"'))
    r3 = resolve(third, store)
    assert np.array_equal(cells(r3, "rest"), cells(r2, "rest"))


@needs_shared
def test_circular_and_missing_exclusions(tmp_path, store):
    write(tmp_path / "a.toml", 'name = "a"\nexclude = ["b.toml"]\n[[components]]\nname = "x"\nwhere = "true"\n')
    write(tmp_path / "b.toml", 'name = "b"\nexclude = ["a.toml"]\n[[components]]\nname = "y"\nwhere = "true"\n')
    with pytest.raises(SpecError, match="circular exclusion"):
        resolve(tmp_path / "a.toml", store)
    write(tmp_path / "c.toml", 'name = "c"\nexclude = ["nope.toml"]\n[[components]]\nname = "x"\nwhere = "true"\n')
    with pytest.raises(SpecError, match=r"exclude\[0\]: spec file not found"):
        resolve(tmp_path / "c.toml", store)


# ---------------------------------------------------------------------------------------------- quotas
@needs_shared
def test_quota_shortfall_fails_or_takes_all(store):
    text = 'name = "s"\n[[components]]\nname = "pbmc5k"\nwhere = "dataset_id = \'pbmc5k_cite\'"\nn_cells = 250\n'
    with pytest.raises(AtlasmixError) as e:
        resolve(loads_spec(text), store)
    msg = str(e.value)
    assert "components[0] 'pbmc5k': asks for 250 cells but only 200 are available" in msg
    assert "take_all_if_short" in msg
    res = resolve(loads_spec(text + "take_all_if_short = true\n"), store)
    assert res.components[0]["n_cells"] == 200 and res.components[0]["took_all_short"]
    # a total that the components do not add up to is an error, not a silent resize
    with pytest.raises(AtlasmixError, match="not the total"):
        resolve(loads_spec('name = "t"\nn_cells = 999\n[[components]]\nname = "a"\nwhere = "dataset_id = \'pbmc5k_cite\'"\n'),
                store)


# ---------------------------------------------------------------------------------------------- SQL
@pytest.mark.parametrize("key, text, refused", [
    ("where", "dataset_id = 'x'; DROP TABLE obs", "';'"),
    ("sql", "COPY (SELECT soma_joinid FROM obs) TO '/tmp/leak.csv'", "'COPY'"),
    ("sql", "ATTACH '/tmp/other.db' AS other", "'ATTACH'"),
    ("where", "soma_joinid IN (SELECT 1 FROM read_csv('/etc/passwd'))", "'read_csv('"),
    ("sql", "INSTALL httpfs", "'INSTALL'"),
    ("sql", "CREATE TABLE t AS SELECT soma_joinid FROM obs", "'CREATE'"),
    ("where", "true OR soma_joinid IN (SELECT 1 FROM glob('/etc/*'))", "'glob('"),
])
@needs_shared
def test_refused_sql(store, key, text, refused):
    spec = loads_spec(f'name = "q"\n[[components]]\nname = "a"\n{key} = "{text}"\n')
    with pytest.raises(AtlasmixError) as e:
        resolve(spec, store)
    assert str(e.value).startswith(f"refused components[0].{key}: {refused} is not allowed")


@needs_shared
def test_nondeterministic_sql_is_refused(store):
    with pytest.raises(AtlasmixError, match=r"refused components\[0\]\.where: 'random\(' changes between runs"):
        resolve(loads_spec('name = "q"\n[[components]]\nname = "a"\nwhere = "random() < 0.5"\n'), store)


@needs_shared
def test_sql_runs_locked_down(store):
    ctx = ObsContext.from_store(store, ["true"], [])
    try:
        with pytest.raises(Exception, match="(?i)lock|configuration"):
            ctx.con.execute("SET enable_external_access = true")
        with pytest.raises(Exception, match="(?i)external|disabled|permission"):
            ctx.con.execute("SELECT * FROM read_csv('/etc/hostname')").fetchall()
    finally:
        ctx.close()


@needs_shared
def test_sql_errors_and_foreign_ids(store):
    with pytest.raises(AtlasmixError, match=r"components\[0\]\.where: .*nosuchcolumn"):
        resolve(loads_spec('name = "q"\n[[components]]\nname = "a"\nwhere = "nosuchcolumn = 1"\n'), store)
    with pytest.raises(AtlasmixError, match="not visible cells"):
        resolve(loads_spec('name = "q"\n[[components]]\nname = "a"\nsql = "SELECT 99999999 AS soma_joinid"\n'), store)
    with pytest.raises(AtlasmixError, match="must return a column soma_joinid"):
        resolve(loads_spec('name = "q"\n[[components]]\nname = "a"\nsql = "SELECT 1 AS x"\n'), store)


@needs_shared
def test_catalog_columns_and_side_tables(store, obs):
    res = resolve(loads_spec("""
name = "cat"
[[components]]
name = "mex"
where = "source_format = 'mex'"
[[components]]
name = "mouse"
where = "dataset_organism = 'Mus musculus' AND dataset_n_cells < 1000"
[[components]]
name = "guides"
sql = '''SELECT o.soma_joinid FROM obs o JOIN extra_scmageck_crispr e USING (soma_joinid)
         WHERE e."target.gene" = 'TP53' '''
[[components]]
name = "via_datasets"
where = "dataset_id IN (SELECT dataset_id FROM datasets WHERE n_genes_measured > 50000)"
"""), store)
    assert set(obs.loc[cells(res, "mex"), "dataset_id"]) == {"pbmc3k_mex"}
    assert set(obs.loc[cells(res, "mouse"), "dataset_id"]) == {"baron_mouse"}
    extra = store.obs_extra("scmageck_crispr")
    assert set(cells(res, "guides")) == set(extra.index[extra["target.gene"] == "TP53"])
    assert set(obs.loc[cells(res, "via_datasets"), "dataset_id"]) == {"pisces_pbmc1k"}


# ---------------------------------------------------------------------------------------------- manifest
@needs_shared
def test_manifest_is_byte_deterministic(store, tmp_path):
    spec = write(tmp_path / "d.toml", f"""
name = "det"
seed = 42
validation_fraction = 0.1
[[components]]
name = "blood"
where = "{BLOOD}"
n_cells = 2000
[[components]]
name = "paul"
where = "dataset_id = 'paul15'"
strategy = "balanced"
balance_by = "cell_type"
n_cells = 700
[eval_sets.e1]
where = "dataset_id = 'pbmc5k_cite'"
[eval_sets.e2]
where = "dataset_id IN ('pbmc5k_cite', 'baron_human')"
""")
    s1 = write_manifest(resolve(spec, store), tmp_path / "a.parquet")
    s2 = write_manifest(resolve(spec, store), tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert s1["manifest"]["sha256"] == s2["manifest"]["sha256"]
    assert s1["spec_hash"] == s2["spec_hash"] and s1["store"] == s2["store"] == store.identity()
    other = write(tmp_path / "o.toml", spec.read_text().replace("seed = 42", "seed = 43"))
    s3 = write_manifest(resolve(other, store), tmp_path / "c.parquet")
    assert s3["manifest"]["sha256"] != s1["manifest"]["sha256"]
    t = pq.read_table(tmp_path / "a.parquet")
    assert t.column_names == ["soma_joinid", "component", "split"]
    assert str(t.schema.field("soma_joinid").type) == "int64"
    df = t.to_pandas()
    assert df["soma_joinid"].is_monotonic_increasing
    assert set(df["split"]) == {"train", "validation", "eval"}
    # pbmc5k cells are in both eval sets: one row per eval set, training never sees them
    both = df[df["split"] == "eval"].groupby("soma_joinid").size()
    assert (both == 2).sum() == 200
    assert df[df["split"] != "eval"]["soma_joinid"].is_unique
    meta = json.loads(pq.ParquetFile(tmp_path / "a.parquet").schema_arrow.metadata[b"atlasmix"])
    assert meta["spec_hash"] == s1["spec_hash"] and "time" not in json.dumps(meta)
    side = json.loads((tmp_path / "a.json").read_text())
    assert side["counts"]["eval"] == 200 + 200 + 175 and side["disjointness"]["disjoint"] is True
    assert sum(r["n_cells"] for r in side["composition"]) == len(df)


@needs_shared
def test_read_manifest_checks_hash_and_store_state(store, tmp_path):
    res = resolve(loads_spec('name = "m"\n[[components]]\nname = "a"\nwhere = "dataset_id = \'pbmc5k_cite\'"\n'), store)
    write_manifest(res, tmp_path / "m.parquet")
    table, side = read_manifest(tmp_path / "m.parquet", store=store)
    assert table.num_rows == 200 and side["store"]["state_hash"] == store.identity()["state_hash"]
    with pytest.raises(AtlasmixError, match="exists"):
        write_manifest(res, tmp_path / "m.parquet")
    doc = json.loads((tmp_path / "m.json").read_text())
    doc["store"]["state_hash"] = "0" * 64  # as if an ingest happened after resolution
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(AtlasmixError, match="store changed"):
        read_manifest(tmp_path / "m.parquet", store=store)
    with open(tmp_path / "m.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(AtlasmixError, match="modified"):
        read_manifest(tmp_path / "m.parquet")


# ---------------------------------------------------------------------------------------------- examples + CLI
@needs_shared
def test_shared_examples_resolve(store):
    base = resolve(EXAMPLES / "shared" / "base_model.toml", store)
    full = resolve(EXAMPLES / "shared" / "base_full.toml", store)
    plus = resolve(EXAMPLES / "shared" / "base_plus_perturbation.toml", store)
    alone = resolve(EXAMPLES / "shared" / "perturbation_only.toml", store)
    # the BaseModel half is the same cells in every mixture of the study
    assert np.array_equal(cells(base, "base"), cells(full, "base")) and np.array_equal(cells(base, "base"), cells(plus, "base"))
    assert len(cells(full, "base_second_half")) == len(cells(full, "base"))
    assert set(cells(plus, "perturbation")) == set(cells(alone, "perturbation"))
    for r in (base, full, plus, alone):
        assert r.disjointness["disjoint"] and len(r.disjointness["eval_sets"]) == 5
        assert "pbmc3k_mex" not in {c["dataset_id"] for c in r.composition}
    for f in ("base_plus_bone_marrow", "base_plus_pancreas", "bone_marrow_only", "pancreas_only"):
        assert resolve(EXAMPLES / "shared" / f"{f}.toml", store).counts["train"] > 0


@needs_shared
def test_cli_resolve_show_diff(store, tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    r = run_cli("mix", "resolve", EXAMPLES / "shared" / "base_model.toml", "--store", store.uri, "--out", a)
    assert r.returncode == 0, r.stderr
    assert "disjoint" in r.stdout and a.exists() and (tmp_path / "a.json").exists()
    r = run_cli("mix", "resolve", EXAMPLES / "shared" / "base_full.toml", "--store", store.uri, "--out", b, "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("mix", "show", a, "--store", store.uri)
    assert r.returncode == 0 and "store state matches" in r.stdout and "zheng_pbmc8k" in r.stdout
    r = run_cli("mix", "diff", a, b, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d == diff_manifests(a, b)
    tv = d["cells"]["train+validation"]
    assert tv["only_a"] == 0 and tv["both"] == tv["a"] and tv["only_b"] > 0
    assert any(c["key"].startswith("components[base_second_half]") for c in d["spec_changes"])
    bad = write(tmp_path / "bad.toml", 'name = "x"\n[[components]]\nname = "a"\nwhere = "true"\nn_cells = 0\n')
    r = run_cli("mix", "resolve", bad, "--store", store.uri, "--out", tmp_path / "x.parquet")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: bad spec bad.toml: components[0].n_cells")


def test_streamed_pca_equals_in_memory_pca():
    """The out-of-core PCA (3 streamed passes, any chunk size) = sklearn PCA of log1p(CP10k) on the HVGs."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    from atlasmix.mixing.sketch import streamed_pca

    rng = np.random.default_rng(0)
    counts = sp.random(500, 300, density=0.2, random_state=1, format="csr",
                       data_rvs=lambda k: rng.poisson(3, k) + 1).astype(np.float32)
    ids = np.arange(1000, 1500)
    genes = np.arange(300) * 2  # var joinids need not be 0..n-1

    def iter_x(joinids, var_joinids, chunk_size):
        cols = np.searchsorted(genes, var_joinids)
        for s in range(0, len(joinids), chunk_size):
            yield joinids[s:s + chunk_size], counts[s:s + chunk_size][:, cols]

    a = streamed_pca(iter_x, ids, genes, n_pcs=5, n_top_genes=100, chunk_size=64)
    b = streamed_pca(iter_x, ids, genes, n_pcs=5, n_top_genes=100, chunk_size=499)
    dense = counts.toarray().astype(np.float64)
    x = np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4)
    hvg = np.sort(np.argsort(-x.var(axis=0), kind="stable")[:100])
    ref = PCA(n_components=5, svd_solver="full").fit_transform(x[:, hvg])
    assert a.shape == (500, 5)
    np.testing.assert_allclose(a, b, atol=1e-8)
    np.testing.assert_allclose(np.abs(a), np.abs(ref), atol=1e-6)
