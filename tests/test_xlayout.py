"""The store's x layout (zarr v3 CSR per dataset): written by every ingest, equal to TileDB X, opened by
anndata, crash-safe, rebuilt by ``store optimize``, checked by ``store verify``, read by the loader."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from atlasmix.store import Store
from atlasmix.store import xlayout
from atlasmix.training.loader import MixtureLoader, epoch_order, shard_length, shard_order
from conftest import run_cli


def _tiledb_rows(store: Store, start: int, end: int) -> sp.csr_matrix:
    import tiledbsoma as soma

    n_var = len(store.var())
    with soma.open(f"{store.uri}/ms/RNA/X/raw", context=store.context) as X:
        t = X.read(coords=(slice(start, end - 1),)).tables().concat()
    m = sp.csr_matrix((t["soma_data"].to_numpy(), (t["soma_dim_0"].to_numpy() - start, t["soma_dim_1"].to_numpy())),
                      shape=(end - start, n_var), dtype=np.float32)
    m.sum_duplicates()
    return m


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A simulated atlas (3 sources, 1,800 cells, 600 genes) and its plan."""
    from atlasmix.simulate import simulate_atlas

    d = tmp_path_factory.mktemp("xl")
    info = simulate_atlas(d / "sim", 1800, sources="blood_a,malignant,bone_marrow", seed=5, n_genes=600)
    return Path(info["plan"])


@pytest.fixture(scope="module")
def base(sim, tmp_path_factory):
    uri = tmp_path_factory.mktemp("xlstore") / "store"
    assert run_cli("store", "init", uri).returncode == 0
    r = run_cli("ingest", uri, "--plan", sim, "--chunk-size", "256")
    assert r.returncode == 0, r.stderr
    return uri


@pytest.fixture
def store_copy(base, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(base, dst)
    return dst


def test_ingest_writes_a_layout_equal_to_tiledb_that_anndata_opens(base):
    import anndata as ad
    import zarr

    s = Store(str(base))
    cat = s.catalog()
    assert len(cat) == 3
    for j, row in cat.iterrows():
        assert xlayout.dataset_ready(s.uri, int(j))
        g = zarr.open_group(str(Path(base) / "x_layout"), mode="r")[f"d{int(j)}"]
        X = ad.io.sparse_dataset(g)  # AnnData's own CSR reader
        ref = _tiledb_rows(s, int(row.obs_joinid_start), int(row.obs_joinid_end))
        assert X.shape == (int(row.n_cells), len(s.var()))
        got = X[:]
        got.sort_indices()
        assert ref.nnz > 0 and (got != ref).nnz == 0
        assert np.array_equal(got.indices, ref.indices) and np.array_equal(got.data, ref.data)
    r = run_cli("store", "verify", base, "--json")
    assert r.returncode == 0, r.stderr
    assert {d["status"] for d in json.loads(r.stdout)["datasets"]} == {"equal"}


def test_layout_reader_matches_tiledb_on_random_cells_and_gene_subsets(base):
    s = Store(str(base))
    ids = s.obs([])["soma_joinid"].to_numpy()
    rng = np.random.default_rng(0)
    reader = xlayout.reader_for(s)
    full = sp.vstack([_tiledb_rows(s, int(r.obs_joinid_start), int(r.obs_joinid_end))
                      for _, r in s.catalog().sort_values("obs_joinid_start").iterrows()]).tocsr()
    for _ in range(5):
        pick = np.sort(rng.choice(ids, 300, replace=False))
        genes = rng.choice(len(s.var()), 120, replace=False)  # an unsorted gene axis
        col_of = np.full(len(s.var()), -1, np.int32)
        col_of[genes] = np.arange(len(genes))
        got = reader.read(pick, col_of, len(genes))
        want = full[np.searchsorted(ids, pick)][:, genes]
        assert (got != want).nnz == 0
        whole = reader.read(pick, None, len(s.var()))
        assert (whole != full[np.searchsorted(ids, pick)]).nnz == 0
    # no layout file stays open between reads (a store's shard files can outnumber the fd limit)
    assert not [f for f in _open_files() if xlayout.LAYOUT_DIR in f]
    reader.close()
    # Store.iter_X takes ascending unique ids: TileDB returns each cell once, so a repeat or an
    # out-of-order id would come back as an empty or another cell's row
    from atlasmix.errors import StoreError

    for bad in (ids[[5, 5, 6]], ids[[7, 3]]):
        with pytest.raises(StoreError, match="ascending and unique"):
            next(s.iter_X(bad))


def _open_files() -> list[str]:
    import os

    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed meanwhile
            pass
    return out


@pytest.mark.parametrize("point", ["x_chunk", "before_commit"])
def test_killed_ingest_leaves_no_visible_layout_and_rerun_completes(store_copy, sim, point):
    src = next(p for p in sim.parent.glob("*.h5ad"))
    args = ("ingest", store_copy, src, "--dataset-id", "again", "--chunk-size", "100", "--on-duplicate-cells", "warn")
    r = run_cli(*args, env={"ATLASMIX_CRASH_AT": point})
    assert r.returncode == -signal.SIGKILL
    s = Store(str(store_copy))
    crashed = s.catalog(include_all=True).query("status == 'ingesting'").index
    assert len(crashed) == 1
    # what the killed ingest left is invisible: the loader reads the three complete datasets only
    assert xlayout.datasets_for(s) is not None and len(xlayout.datasets_for(s)) == 3
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert not (Path(store_copy) / "x_layout" / f"d{int(crashed[0])}").exists()  # rolled back by recovery
    r = run_cli("store", "verify", store_copy)
    assert r.returncode == 0, r.stderr + r.stdout


def test_replace_removes_the_old_layout(store_copy, sim):
    s = Store(str(store_copy))
    old = s.catalog().query("dataset_id == 'blood_a'").index[0]
    src = sim.parent / "blood_a.h5ad"
    r = run_cli("ingest", store_copy, src, "--dataset-id", "blood_a", "--replace", "--obs-filter",
                "cell_type = 'B cell'")
    assert r.returncode == 0, r.stderr
    s = Store(str(store_copy))
    new = s.catalog().query("dataset_id == 'blood_a'").index[0]
    assert not (Path(store_copy) / "x_layout" / f"d{int(old)}").exists()
    assert xlayout.dataset_ready(s.uri, int(new))
    assert run_cli("store", "verify", store_copy).returncode == 0


def test_optimize_adds_the_layout_to_an_old_store_and_verify_catches_damage(store_copy):
    root = Path(store_copy) / "x_layout"
    s = Store(str(store_copy))
    ids = s.obs([])["soma_joinid"].to_numpy()
    # a store made before the layout existed: readers fall back to TileDB X
    shutil.rmtree(root)
    assert xlayout.datasets_for(s) is None
    with pytest.raises(Exception, match="no x layout"):
        MixtureLoader(s, ids, x_source="layout")
    r = run_cli("store", "verify", store_copy)
    assert r.returncode == 1 and "missing" in r.stdout + r.stderr
    r = run_cli("store", "optimize", store_copy)
    assert r.returncode == 0, r.stderr
    assert "3 datasets written" in r.stderr
    assert run_cli("store", "verify", store_copy).returncode == 0
    # resumable: an interrupted group (no completion marker) is rewritten, finished ones kept
    j = int(s.catalog().index[1])
    meta = json.loads((root / f"d{j}" / "zarr.json").read_text())
    meta["attributes"].pop(xlayout.COMPLETE_ATTR)
    (root / f"d{j}" / "zarr.json").write_text(json.dumps(meta))
    r = run_cli("store", "optimize", store_copy)
    assert r.returncode == 0 and "1 datasets written, 2 already there" in r.stderr, r.stderr
    # change five counts of one dataset's layout (a valid zarr write): verify names the dataset
    import zarr

    arr = zarr.open_array(str(root / f"d{j}" / "data"), mode="r+")
    arr[10:15] = arr[10:15] + 1
    r = run_cli("store", "verify", store_copy, "--json")
    assert r.returncode == 1
    bad = [d for d in json.loads(r.stdout)["datasets"] if d["status"] == "differs"]
    assert [d["dataset_id"] for d in bad] == [s.catalog().loc[j, "dataset_id"]]


def test_verify_reports_damaged_shard_files_as_differs_and_readers_refuse_them(store_copy):
    """A shard whose index checksum is wrong, a truncated shard and array metadata that disagrees
    with indptr are each reported as 'differs' (exit 1, every dataset checked), not passed and not a
    crash; a reader refuses the damaged shard with a StoreError instead of reading other values."""
    s = Store(str(store_copy))
    root = Path(store_copy) / xlayout.LAYOUT_DIR
    j0, j1, j2 = (int(j) for j in s.catalog().sort_values("obs_joinid_start").index)
    crc = root / f"d{j0}" / "data" / "c" / "0"
    raw = bytearray(crc.read_bytes())
    raw[-1] ^= 0xFF  # the last byte: the shard index's crc32c
    crc.write_bytes(bytes(raw))
    cut = root / f"d{j1}" / "indices" / "c" / "0"
    cut.write_bytes(cut.read_bytes()[:-100])
    meta_path = root / f"d{j2}" / "data" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [meta["shape"][0] - 1000]
    meta_path.write_text(json.dumps(meta))
    r = run_cli("store", "verify", store_copy, "--json")
    assert r.returncode == 1, r.stderr
    detail = {d["dataset_id"]: d["detail"] for d in json.loads(r.stdout)["datasets"] if d["status"] == "differs"}
    names = s.catalog()["dataset_id"]
    assert set(detail) == {names[j0], names[j1], names[j2]}
    assert "checksum" in detail[names[j0]] and "disagree" in detail[names[j2]]
    assert "checksum" in detail[names[j1]] or "truncated" in detail[names[j1]]  # the file's tail is not an index
    from atlasmix.errors import StoreError

    start = int(s.catalog().loc[j1, "obs_joinid_start"])
    reader = xlayout.LayoutReader(s.uri, [(j1, start, 5)])
    with pytest.raises(StoreError, match="checksum|truncated"):
        reader.read(np.arange(start, start + 5), None, len(s.var()))
    reader.close()


def test_loader_reads_the_layout_and_serves_the_same_minibatches_as_tiledb(base):
    s = Store(str(base))
    ids = s.obs([])["soma_joinid"].to_numpy()
    genes = np.random.default_rng(3).choice(len(s.var()), 150, replace=False)
    for var_joinids in (np.arange(len(s.var())), genes):
        got = {}
        for src in ("layout", "tiledb"):
            L = MixtureLoader(s, ids, var_joinids=var_joinids, batch_size=64, io_batch_size=256, block_size=16,
                              seed=2, x_source=src, rank=1, world_size=2)
            got[src] = [(b["soma_joinid"].clone(), b["X"].clone(), b["library_size"].clone()) for b in L]
        assert len(got["layout"]) == len(got["tiledb"]) > 3
        for a, b in zip(got["layout"], got["tiledb"]):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    L = MixtureLoader(s, ids, read_processes=1, batch_size=128, io_batch_size=512, seed=1)
    ref = MixtureLoader(s, ids, x_source="tiledb", batch_size=128, io_batch_size=512, seed=1)
    for a, b in zip(L, ref):  # through a read process (shared memory) as well
        assert torch.equal(a["X"], b["X"])
    L.close()


@pytest.mark.parametrize("n,block,k", [(100_000, 64, 8), (5_003, 16, 3), (777, 64, 8)])
def test_shards_are_dealt_whole_blocks(n, block, k):
    """8 shards read runs of ~block_size consecutive cells (dealing single cells gave runs of ~1)."""
    runs = []
    for e in range(2):
        o = epoch_order(n, seed=4, epoch=e, block_size=block)
        assert np.array_equal(np.sort(o), np.arange(n))
        drop = [shard_order(o, i, k, "drop", block) for i in range(k)]
        assert {len(x) for x in drop} == {shard_length(n, k, "drop", block)}
        cat = np.concatenate(drop)
        assert len(np.unique(cat)) == len(cat) and n - len(cat) < (k + 1) * block
        pad = [shard_order(o, i, k, "pad", block) for i in range(k)]
        assert {len(x) for x in pad} == {shard_length(n, k, "pad", block)}
        assert set(np.concatenate(pad).tolist()) == set(range(n))
        for x in drop:
            io = np.sort(x[:4096])
            if len(io) < 2 * block:
                continue
            brk = np.flatnonzero(np.diff(io) != 1)
            runs.append(len(io) / (len(brk) + 1))
    if runs:
        assert np.mean(runs) >= 0.9 * block
    # one shard: nothing dropped, every cell once
    o = epoch_order(n, 1, 0, block)
    assert np.array_equal(shard_order(o, 0, 1, "drop", block), o)


def test_s3_store_gets_the_layout_and_the_loader_reads_it(s3_env, sim):
    pytest.importorskip("obstore")
    s3_env, bucket = s3_env
    uri = f"s3://{bucket}/atlas"
    assert run_cli("store", "init", uri, env=s3_env).returncode == 0
    r = run_cli("ingest", uri, "--plan", sim, "--chunk-size", "300", env=s3_env)
    assert r.returncode == 0, r.stderr
    s = Store(uri)
    assert all(xlayout.dataset_ready(uri, int(j)) for j in s.catalog().index)
    r = run_cli("store", "verify", uri, "--json", env=s3_env)
    assert r.returncode == 0, r.stderr
    assert {d["status"] for d in json.loads(r.stdout)["datasets"]} == {"equal"}
    ids = s.obs([])["soma_joinid"].to_numpy()
    got = {}
    for src in ("layout", "tiledb"):
        L = MixtureLoader(s, ids, batch_size=128, io_batch_size=512, seed=4, x_source=src)
        got[src] = [(b["soma_joinid"].clone(), b["X"].clone()) for b in L]
    for a, b in zip(got["layout"], got["tiledb"], strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # replace on S3 deletes the old group's objects; optimize finds nothing to do
    old = int(s.catalog().query("dataset_id == 'malignant'").index[0])
    r = run_cli("ingest", uri, sim.parent / "malignant.h5ad", "--dataset-id", "malignant", "--replace", env=s3_env)
    assert r.returncode == 0, r.stderr
    assert not xlayout.dataset_ready(uri, old)
    assert xlayout.layout_root(uri).read_bytes(f"d{old}/zarr.json") is None
    r = run_cli("store", "optimize", uri, env=s3_env)
    assert r.returncode == 0 and "0 datasets written, 3 already there" in r.stderr, r.stderr


def test_layout_reads_reuse_buffers_only_once_their_csr_is_dropped(base):
    """A read's indices / data come from a pool (atlasmix._buffers): a CSR still held is never
    overwritten by a later read, and a dropped one's buffers serve the next read."""
    store = Store(base)
    reader = xlayout.reader_for(store)
    try:
        a_ids = np.arange(0, 300, dtype=np.int64)
        b_ids = np.arange(700, 1100, dtype=np.int64)  # more nonzeros than a: a fresh buffer
        a = reader.read(a_ids, None, len(store.var()))
        a_copy = a.copy()
        b = reader.read(b_ids, None, len(store.var()))
        assert not np.shares_memory(a.data, b.data) and not np.shares_memory(a.indices, b.indices)
        assert (a != a_copy).nnz == 0  # the held read is intact
        fresh = reader._buffers.n_fresh
        b_copy = b.copy()
        del b
        c = reader.read(np.arange(720, 1000, dtype=np.int64), None, len(store.var()))  # fits b's buffers
        assert reader._buffers.n_fresh == fresh  # reused, not allocated
        assert (c != b_copy[20:300]).nnz == 0 and (a != a_copy).nnz == 0
    finally:
        reader.close()


def test_buffer_pool_holds_one_idle_buffer_per_buffer_in_use_not_one_per_size():
    """Ever larger requests taken and dropped one at a time (IO batches of denser and denser
    datasets) leave one buffer per kind in the pool, not one per size (+1 GiB of idle buffers while
    a 1M-cell split was read into memory)."""
    from atlasmix._buffers import BufferPool

    pool = BufferPool(capacity=12, headroom=1.1)
    for n in (100, 200, 400, 800, 1600):
        i, _ = pool.take((n,), np.int32)
        d, _ = pool.take((n,), np.float32)
        del i, d
    assert pool.n_fresh == 10 and len(pool._bufs) == 2
    top = int(np.ceil(1600 * 1.1))
    assert sorted((b.dtype.str, b.shape[0]) for b in pool._bufs) == [("<f4", top), ("<i4", top)]
    a, _ = pool.take((1000,), np.int32)
    b, reused = pool.take((1000,), np.int32)  # two in use at once: a second buffer of the kind
    assert not reused and len(pool._bufs) == 3 and not np.shares_memory(a, b)


def test_buffer_pool_rules():
    from atlasmix._buffers import BufferPool

    pool = BufferPool(capacity=2, headroom=1.5)
    x, reused = pool.take((10,), np.int32)
    assert x.shape == (10,) and not reused and pool.n_fresh == 1
    del x
    y, reused = pool.take((14,), np.int32)  # within the 15-element headroom: the same buffer
    assert reused and pool.n_fresh == 1
    z, reused = pool.take((14,), np.float32)  # another dtype: never shared
    assert not reused and pool.n_fresh == 2 and not np.shares_memory(y, z)
    w, _ = pool.take((3,), np.int32)  # y still held: a new buffer (pool full, kept outside)
    assert pool.n_fresh == 3 and not np.shares_memory(w, y)
    del y, z
    big, reused = pool.take((100,), np.int32)  # too large for any: replaces an idle one
    assert not reused and pool.n_fresh == 4
    v = big[5:7]  # a view keeps the buffer in use
    del big
    again, reused = pool.take((100,), np.int32)
    assert not np.shares_memory(again, v)
    del v, again
    last, reused = pool.take((100,), np.int32)
    assert reused


@pytest.mark.parametrize("rewrite", ["data", "indices"])
def test_a_layout_rewritten_by_another_tool_is_read_through_zarr_not_misread(store_copy, rewrite):
    """The reader's fast path only takes arrays as the ingest writes them. A dataset whose arrays
    another tool rewrote with the same sharded blosc chain -- counts as int32, indices under v2 chunk
    keys (no ``c/`` prefix) -- must read the same cells, not fill values or reinterpreted bytes."""
    import zarr
    from zarr.codecs import BloscCodec

    s = Store(str(store_copy))
    cat = s.catalog().sort_values("obs_joinid_start")
    j, row = int(cat.index[0]), cat.iloc[0]
    g = zarr.open_group(Path(store_copy) / xlayout.LAYOUT_DIR / f"d{j}", mode="r+", zarr_format=3)
    chain = dict(chunks=(1000,), shards=(4000,), compressors=[BloscCodec(cname="lz4", shuffle="bitshuffle")])
    a = g[rewrite][:]
    del g[rewrite]
    if rewrite == "data":
        g.create_array("data", data=a.astype(np.int32), **chain)
    else:
        g.create_array("indices", data=a, chunk_key_encoding={"name": "v2", "separator": "/"}, **chain)
    start, end = int(row.obs_joinid_start), int(row.obs_joinid_end)
    reader = xlayout.reader_for(s)
    want = _tiledb_rows(s, start, end)
    for ids in (np.arange(start, end), np.arange(start, end, 3)):  # whole chunks, and edges of chunks
        got = reader.read(ids, None, len(s.var()))
        assert got.dtype == np.float32 and got.nnz == want[ids - start].nnz > 0
        assert (got != want[ids - start]).nnz == 0
    reader.close()
