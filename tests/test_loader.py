"""The streaming loader: coverage, per-epoch order, DDP shards, resume and content, on the shared-data store or its simulated stand-in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasmix.errors import AtlasmixError
from atlasmix.mixing import loads_spec, read_manifest, resolve, write_manifest
from atlasmix.training.loader import MixtureLoader, epoch_order, shard_order, shuffle_entropy
from tests.conftest import in_sql



@pytest.fixture(scope="module")
def mix(lake, tmp_path_factory):
    store, names = lake
    spec = loads_spec(f'name = "loader"\nseed = 5\nvalidation_fraction = 0.1\n[[components]]\nname = "pbmc"\n'
                      f'where = "{in_sql(names)}"\nn_cells = 1500\n', "loader.toml")
    path = tmp_path_factory.mktemp("mix") / "loader.parquet"
    write_manifest(resolve(spec, store), path)
    table, _ = read_manifest(path, store=store)
    split = table["split"].cast("string").to_numpy(zero_copy_only=False)
    train = np.unique(table["soma_joinid"].to_numpy()[split == "train"])
    return store, path, train


def make(mix, **kw):
    store, path, _ = mix
    opts = dict(batch_size=64, io_batch_size=256, block_size=4, seed=3)
    opts.update(kw)
    return MixtureLoader(store, path, "train", **opts)


_BASE: dict = {}


def base_loader(mix):
    """One loader built once (DDP shards are cheap copies of it, as a training script would make)."""
    if "L" not in _BASE:
        _BASE["L"] = make(mix)
    return _BASE["L"]


def ids_of(batches):
    return np.concatenate([b["soma_joinid"].numpy() for b in batches])


def test_every_cell_once_per_epoch_and_a_new_order_each_epoch(mix):
    _, _, train = mix
    L = make(mix)
    assert L.n_obs == len(train) and len(L) == -(-len(train) // 64)
    e0 = [b for b in L]
    e1 = [b for b in L]
    assert L.epoch == 2
    a, b = ids_of(e0), ids_of(e1)
    for x in (a, b):
        assert len(x) == len(train) and np.array_equal(np.sort(x), train)  # each cell exactly once
    assert [len(x["soma_joinid"]) for x in e0] == [64] * (len(L) - 1) + [len(train) - 64 * (len(L) - 1)]
    assert not np.array_equal(a, b)  # the order changes between epochs ...
    assert np.mean(a == b) < 0.05
    # ... is reproducible per seed, and a different seed gives another order
    again = make(mix)
    assert np.array_equal(ids_of(list(again)), a) and np.array_equal(ids_of(list(again)), b)
    assert not np.array_equal(ids_of(list(make(mix, seed=4))), a)
    # not store order
    assert np.mean(np.diff(a) > 0) < 0.7


def test_batches_equal_the_stores_counts(mix):
    store, _, _ = mix
    L = make(mix)
    obs = store.obs(["dataset_id", "total_counts"]).to_pandas().set_index("soma_joinid")
    for i, b in enumerate(L):
        if i == 3:
            break
        ids = b["soma_joinid"].numpy()
        order = np.argsort(ids)
        (got_ids, m), = list(store.iter_X(ids[order], L.var_joinids, chunk_size=10_000))
        expect = np.empty((len(ids), L.n_vars), dtype=np.float32)
        expect[order] = m.toarray()
        X = b["X"]
        assert X.dtype == torch.float32 and X.shape == (len(ids), L.n_vars) and X.layout == torch.strided
        assert np.array_equal(X.numpy(), expect)
        assert X.sum() > 0
        np.testing.assert_allclose(b["library_size"].numpy().ravel(), expect.sum(axis=1), rtol=1e-6)
        names = np.asarray(L.categories["dataset_id"])[b["dataset_id"].numpy()]
        assert (names == obs.loc[ids, "dataset_id"].to_numpy()).all()
    # CSR on request carries the same counts; obs total_counts as the library size on request
    Ls = make(mix, sparse=True, library="total_counts")
    b = next(iter(Ls))
    assert b["X"].layout == torch.sparse_csr
    first = next(iter(make(mix)))
    assert torch.equal(b["X"].to_dense(), first["X"])
    np.testing.assert_allclose(b["library_size"].numpy().ravel(),
                               obs.loc[b["soma_joinid"].numpy(), "total_counts"].to_numpy(), rtol=1e-6)


def test_gene_axis_default_intersection_and_explicit_list(mix):
    store, path, _ = mix
    L = make(mix)
    pres = store.presence()
    cat = store.catalog().reset_index().set_index("dataset_id")
    ds = [int(cat.loc[d, "soma_joinid"]) for d in L.categories["dataset_id"]]
    inter = np.flatnonzero(np.asarray(pres[ds].sum(axis=0)).ravel() == len(ds))
    assert np.array_equal(L.var_joinids, inter)
    var = store.var()
    genes = list(var.loc[inter[[5, 0, 9]], "feature_id"])
    Lg = make(mix, genes=genes)
    assert Lg.n_vars == 3 and list(var.loc[Lg.var_joinids, "feature_id"]) == genes
    full = next(iter(make(mix)))
    part = next(iter(Lg))
    assert torch.equal(part["X"], full["X"][:, [5, 0, 9]])
    with pytest.raises(AtlasmixError, match="not in the store"):
        make(mix, genes=["ENSG_NOT_A_GENE"])


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("uneven", ["drop", "pad"])
def test_ddp_shards_are_disjoint_equal_and_cover(mix, world, uneven):
    _, _, train = mix
    n = len(train)
    base = base_loader(mix)
    for epoch in (0, 1):
        shards = []
        for r in range(world):
            L = base.with_shard(r, world, uneven=uneven)
            L.set_epoch(epoch)
            shards.append(L.cells[L.shard_positions()])
            assert len(L) == len(base.with_shard(0, world, uneven=uneven))  # equal batch counts
        sizes = {len(s) for s in shards}
        assert len(sizes) == 1
        allc = np.concatenate(shards)
        if uneven == "drop":
            assert len(np.unique(allc)) == len(allc)  # disjoint
            b = base.block_size  # whole blocks are dealt: fewer than world blocks' worth left out
            assert n - len(allc) == n % (world * b) < world * b
        else:
            assert np.array_equal(np.unique(allc), train)  # covers the manifest
            assert 0 <= len(allc) - n < world * base.block_size  # the few padded cells are the only repeats
    # ranks do not own a fixed slice: a rank's cells change between epochs, and are spread over the store
    L = base.with_shard(1, world)
    s0 = set(L.cells[L.shard_positions(0)])
    s1 = set(L.cells[L.shard_positions(1)])
    assert len(s0 & s1) < 0.8 * len(s0)
    assert np.ptp(L.cells[L.shard_positions(0)]) > 0.8 * np.ptp(train)


def test_ddp_ranks_and_workers_iterate_their_shards(mix):
    _, _, train = mix
    got = []
    lens = set()
    for r in range(2):
        for w in range(2):
            L = make(mix, rank=r, world_size=2, worker=w, num_workers=2, drop_last=True)
            batches = list(L)
            lens.add(len(batches))
            assert all(len(b["soma_joinid"]) == 64 for b in batches)
            got.append(ids_of(batches))
    assert len(lens) == 1
    allc = np.concatenate(got)
    assert len(np.unique(allc)) == len(allc) and np.isin(allc, train).all()
    assert len(train) - len(allc) < 4 * 64


def test_mid_epoch_resume_continues_exactly(mix):
    _, _, train = mix
    ref = make(mix)
    e0 = ids_of(list(ref))
    e1 = ids_of(list(ref))
    L = make(mix)
    it = iter(L)
    first = [next(it) for _ in range(7)]  # crosses an IO batch boundary (4 minibatches per IO batch)
    state = L.state_dict()
    del it
    assert state["epoch"] == 0 and state["batches_done"] == 7
    R = make(mix)
    R.load_state_dict(state)
    rest = ids_of(list(R))
    assert np.array_equal(np.concatenate([ids_of(first), rest]), e0)
    assert np.array_equal(ids_of(list(R)), e1)  # and the next epoch is the uninterrupted run's
    with pytest.raises(AtlasmixError, match="seed"):
        make(mix, seed=9).load_state_dict(state)
    with pytest.raises(AtlasmixError, match="seed must be >= 0"):  # not numpy's bare ValueError at the first batch
        make(mix, seed=-1)
    # uneven and drop_last change a shard's minibatches too: a state saved with others is refused
    with pytest.raises(AtlasmixError, match="drop_last"):
        make(mix, drop_last=True).load_state_dict(state)
    with pytest.raises(AtlasmixError, match="uneven"):
        make(mix).with_shard(0, 1, uneven="pad").load_state_dict(state)
    # a shard with no minibatch is an error, not an epoch that yields nothing (and skips the next)
    empty = make(mix, block_size=64).with_shard(0, 2, 0, len(train) // 64)
    assert len(empty) == 0
    with pytest.raises(AtlasmixError, match="no minibatch"):
        next(iter(empty))
    assert empty.epoch == 0
    # a loader pickles (for spawn-started workers: the store is reopened by URI) with its position
    import pickle

    P = pickle.loads(pickle.dumps(L))
    assert P.state_dict() == state and np.array_equal(ids_of(list(P)), rest)


def test_shuffle_entropy_against_iid(mix):
    L = make(mix, block_size=1)
    codes = [b["dataset_id"].numpy() for b in L]
    good = shuffle_entropy(codes)
    assert good["n_batches"] == len(L) and 0.9 < good["ratio"] < 1.1
    seq = make(mix, shuffle=False)
    bad = shuffle_entropy([b["dataset_id"].numpy() for b in seq])
    assert bad["ratio"] < 0.3  # store order serves one dataset at a time
    assert np.array_equal(ids_of(list(make(mix, shuffle=False))), mix[2])


def test_order_helpers():
    o = epoch_order(103, seed=1, epoch=0, block_size=8)
    assert np.array_equal(np.sort(o), np.arange(103))
    first = np.sort(o[:8])  # a locality block stays together (cells inside it permuted), at a random phase
    assert np.array_equal(first, np.arange(first[0], first[0] + 8))
    assert not np.array_equal(o, epoch_order(103, seed=1, epoch=1, block_size=8))
    assert np.array_equal(o, epoch_order(103, seed=1, epoch=0, block_size=8))
    assert len(shard_order(o, 0, 4)) == 25 and len(shard_order(o, 3, 4, "pad")) == 26
    with pytest.raises(AtlasmixError):
        shard_order(o, 4, 4)


def test_dataloader_worker_processes_serve_their_shards(mix):
    """Two spawn-started DataLoader workers: each serves its own shard of whole blocks, nothing repeats."""
    from atlasmix.training.dataset import MixtureIterableDataset

    _, _, train = mix
    L = make(mix, batch_size=128, io_batch_size=512)
    with pytest.raises(TypeError, match="num_workers"):  # unsized: its length depends on the workers
        len(MixtureIterableDataset(L))
    ds = MixtureIterableDataset(L, num_workers=2)
    ds.set_epoch(1)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    batches = list(dl)
    assert len(dl) == len(batches)  # the length the DataLoader reports is what its workers yield
    assert len(L.with_shard(0, 1, 0, 1)) != len(batches)  # (so one shard's count would be wrong here)
    got = ids_of(batches)
    # whole blocks are dealt: fewer than 2 blocks' worth of cells wait for another epoch
    assert len(np.unique(got)) == len(got) and len(train) - len(got) < 2 * L.block_size and np.isin(got, train).all()
    L.set_epoch(1)
    expect = [set(L.with_shard(0, 1, w, 2).cells[L.with_shard(0, 1, w, 2).shard_positions()]) for w in range(2)]
    first = got[:128]  # the DataLoader takes worker 0's first minibatch first
    assert set(first) <= expect[0] and not set(first) & expect[1]


@pytest.mark.parametrize(("sparse", "in_memory"), [(False, False), (True, False), (False, True)])
def test_device_gather_path_equals_host_path(mix, sparse, in_memory):
    """The GPU path (IO batch copied once, minibatches cut out on the device) is exercised here on
    the CPU: same cells, order, counts, library sizes and codes as the host path, also mid-epoch,
    also from a split held in memory (whose dense host path reads views of the held CSR: the device
    path must get the IO batch's rows, not a view)."""
    host = make(mix, gather_on_device=False, sparse=sparse, obs_columns=("dataset_id", "cell_type"),
                in_memory=in_memory)
    dev = make(mix, gather_on_device=True, sparse=sparse, obs_columns=("dataset_id", "cell_type"),
               in_memory=in_memory)
    assert dev._gathers_on_device() and not host._gathers_on_device()
    for _ in range(2):  # two epochs: different orders, same between paths
        for a, b in zip(host, dev, strict=True):
            assert torch.equal(a["soma_joinid"], b["soma_joinid"])
            xa = a["X"].to_dense() if sparse else a["X"]
            xb = b["X"].to_dense() if sparse else b["X"]
            assert xb.dtype == torch.float32 and xb.shape == xa.shape
            assert torch.equal(xa, xb)
            assert torch.equal(a["library_size"], b["library_size"])
            assert torch.allclose(b["library_size"].ravel(), xb.sum(1))
            assert torch.equal(a["dataset_id"], b["dataset_id"]) and torch.equal(a["cell_type"], b["cell_type"])
    # resume mid-epoch on the device path continues with the same minibatches
    it = iter(dev)
    [next(it) for _ in range(3)]
    st = dev.state_dict()
    rest = [b["soma_joinid"] for b in it]
    again = make(mix, gather_on_device=True, sparse=sparse, in_memory=in_memory)
    again.load_state_dict(st)
    assert all(torch.equal(x, y["soma_joinid"]) for x, y in zip(rest, again, strict=True))
    assert (host.in_memory_bytes > 0) == (dev.in_memory_bytes > 0) == in_memory


def _shm_blocks() -> set[str]:
    """This process's read-process blocks still in /dev/shm (other pytest workers' are not counted)."""
    import os
    from pathlib import Path

    from atlasmix.training.read import shm_prefix

    d = Path("/dev/shm")
    return {p.name for p in d.glob(f"{shm_prefix(os.getpid())}*")} if d.is_dir() else set()


@pytest.mark.parametrize("gather_on_device", [False, True])
def test_read_processes_serve_the_same_batches_and_free_shared_memory(mix, gather_on_device, monkeypatch):
    import os

    from atlasmix.training import read
    from atlasmix.training.read import shm_prefix

    assert _shm_blocks() == set()
    seen, attach = [], read._attach

    def watch(result):  # records the block names the read processes hand over
        seen.extend(name for name, _, _ in result[0])
        return attach(result)

    monkeypatch.setattr(read, "_attach", watch)
    host = make(mix, gather_on_device=False)
    procs = make(mix, read_processes=1, gather_on_device=gather_on_device)
    try:
        for _ in range(2 if gather_on_device else 1):
            for a, b in zip(host, procs, strict=True):
                assert torch.equal(a["soma_joinid"], b["soma_joinid"])
                assert torch.equal(a["X"], b["X"]) and torch.equal(a["library_size"], b["library_size"])
        it = iter(procs)  # stop mid-epoch: pending reads are cancelled or freed
        next(it)
        it.close()
    finally:
        procs.close()
    assert procs._pool is None
    assert seen and all(n.startswith(shm_prefix(os.getpid())) for n in seen)
    assert _shm_blocks() == set()  # every shared-memory block was unlinked


def test_read_process_errors_reach_the_caller_and_leave_no_shared_memory(mix, tmp_path, monkeypatch):
    """In a read process, an X that cannot be opened gives its own error (not a bare BrokenProcessPool
    from a failed initializer) and the same loader reads again once X is back; an augmentation that
    fails and a /dev/shm with no room leave no shared-memory block behind."""
    import errno
    import os
    import shutil

    import scipy.sparse as sp

    from atlasmix.errors import StoreError
    from atlasmix.store import Store
    from atlasmix.store.xlayout import LAYOUT_DIR
    from atlasmix.training import read
    from atlasmix.training.memory import InMemoryX

    store, _, train = mix
    copy = Store(str(shutil.copytree(store.uri, tmp_path / "store")))
    L = MixtureLoader(copy, train, batch_size=64, io_batch_size=256, block_size=4, seed=3, read_processes=1)
    layout = tmp_path / "store" / LAYOUT_DIR
    shutil.move(layout, tmp_path / "away")  # e.g. a concurrent `store optimize` rewriting it
    try:
        with pytest.raises(StoreError, match="no complete x layout"):
            next(iter(L))
    finally:
        shutil.move(tmp_path / "away", layout)
    assert sum(b["X"].shape[0] for b in L) == len(L.shard_positions())  # the same read process, X back
    assert _shm_blocks() == set()

    class Failing:  # fails on the second IO batch
        n = 0

        def csr(self, m, ids, epoch):
            Failing.n += 1
            if Failing.n == 2:
                raise ValueError("augment failed")
            return m

    L.augment = Failing()
    with pytest.raises(ValueError, match="augment failed"):
        list(L)
    L.augment = None
    assert _shm_blocks() == set()

    # a read process killed mid-epoch (the OOM killer): one clear error, and the next pass starts afresh
    import signal

    it = iter(L)
    next(it)
    for pid in list(L._pool._pool._processes):
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(AtlasmixError, match="a read process died"):
        list(it)
    assert L._pool is None
    L.set_epoch(0)
    assert sum(b["X"].shape[0] for b in L) == len(L.shard_positions())
    L.close()
    assert _shm_blocks() == set()

    # no room in /dev/shm: posix_fallocate fails before any write (a write would be a SIGBUS)
    m = sp.random(6, 10, density=0.5, format="csr", dtype=np.float32, random_state=0)
    monkeypatch.setattr(read, "_W", {"X": InMemoryX(np.arange(6), m), "col_of": None, "n_vars": 10})

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(read.os, "posix_fallocate", full)
    mine = f"{read.shm_prefix(os.getppid())}{os.getpid()}_"
    with pytest.raises(AtlasmixError, match="no room in /dev/shm"):
        read._worker_read(np.arange(6))
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(mine)]


def test_every_x_source_gives_the_same_batches_for_padded_shards_unsorted_axes_and_augments(mix, tmp_path):
    """The same minibatches from the x layout, TileDB X and an x cache when: a padded shard repeats
    cells inside one IO batch (TileDB returns a repeated cell once); the gene axis is unsorted with
    read-depth downsampling (its draws follow the nonzeros' order, which an x cache stores sorted);
    and sparse minibatches on an unsorted axis meet torch's CSR rules (sorted columns per row)."""
    from atlasmix.training.rda import ReadDepthAugment

    pad = {src: make(mix, x_source=src, block_size=64).with_shard(7, 8, uneven="pad") for src in ("layout", "tiledb")}
    cells = pad["layout"].cells[pad["layout"].shard_positions()]
    assert len(np.unique(cells)) < len(cells) <= pad["layout"].io_batch_size  # repeats within one IO batch
    for a, b in zip(*pad.values(), strict=True):
        assert torch.equal(a["soma_joinid"], b["soma_joinid"]) and torch.equal(a["X"], b["X"])

    axis = base_loader(mix).var_joinids
    vj = np.random.default_rng(0).permutation(axis)[:97]  # an unsorted gene subset
    runs = {}
    for name, kw in (("layout", {}), ("tiledb", {"x_source": "tiledb"}), ("x_cache", {"x_cache": tmp_path})):
        L = make(mix, var_joinids=vj, augment=ReadDepthAugment(p=0.5, min_total=0, seed=7), **kw)
        runs[name] = [(b["soma_joinid"], b["X"], b["library_size"]) for b in L]
    for same in zip(*runs.values(), strict=True):
        assert all(all(torch.equal(f[0], g) for g in f[1:]) for f in zip(*same, strict=True))

    with torch.sparse.check_sparse_tensor_invariants():  # sorted, distinct columns in every row
        for b in make(mix, var_joinids=vj, sparse=True):
            X = b["X"]
            torch.sparse_csr_tensor(X.crow_indices(), X.col_indices(), X.values(), X.shape)


@pytest.mark.parametrize("fmt", ["tiledb", "h5"])
def test_x_cache_projection_serves_the_same_batches_and_is_reused(mix, tmp_path, fmt):
    """A gene-subset projection of X (cells x genes, in axis order) gives exactly the batches read
    from the store, is built once and found again, and a different gene axis gets its own."""
    from atlasmix.training.xcache import META

    axis = base_loader(mix).var_joinids
    vj = axis[::3][::-1].copy()  # a subset in non-joinid order: columns follow the axis, not var order
    direct = make(mix, var_joinids=vj)
    cached = make(mix, var_joinids=vj, x_cache=tmp_path, x_cache_format=fmt)
    for _ in range(2):
        for a, b in zip(direct, cached, strict=True):
            assert torch.equal(a["soma_joinid"], b["soma_joinid"])
            assert torch.equal(a["X"], b["X"]) and a["X"].shape[1] == len(vj)
            assert torch.equal(a["library_size"], b["library_size"])
            assert torch.equal(a["dataset_id"], b["dataset_id"])
    built = [p for p in tmp_path.iterdir() if (p / META).exists()]
    assert len(built) == 1 and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    again = make(mix, var_joinids=vj, x_cache=tmp_path, x_cache_format=fmt, read_processes=1)
    try:
        assert again.ensure_x_cache()["built"] is False
        it, ref = iter(again), iter(make(mix, var_joinids=vj))  # both at epoch 0
        for _ in range(3):
            a, b = next(ref), next(it)
            assert torch.equal(a["soma_joinid"], b["soma_joinid"]) and torch.equal(a["X"], b["X"])
    finally:
        again.close()
    other = make(mix, var_joinids=axis[:50], x_cache=tmp_path, x_cache_format=fmt)
    meta = other.ensure_x_cache()
    assert meta["built"] is True and meta["n_vars"] == 50 and meta["n_obs"] == len(mix[2])
    assert meta["format"] == fmt and meta["bytes"] > 0
    assert len([p for p in tmp_path.iterdir() if (p / META).exists()]) == 2
    # a projection whose metadata disagrees with its name is refused, not read
    import json
    from pathlib import Path

    meta_file = Path(other._x_cache_uri).parent / META
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "n_vars": 49}))
    with pytest.raises(AtlasmixError, match="does not hold what its name says"):
        make(mix, var_joinids=axis[:50], x_cache=tmp_path, x_cache_format=fmt).ensure_x_cache()
    with pytest.raises(AtlasmixError, match="no x_cache"):
        direct.ensure_x_cache()


@pytest.mark.parametrize("layout", ["chunked", "contiguous", "gzip", "big-endian"])
def test_h5_x_cache_rows_read_directly_or_through_h5py(tmp_path, layout):
    """H5CSR reads rows equal to the CSR it holds: by pread from the chunk offsets HDF5 reports when
    the bytes on disk are the array (chunked or contiguous, unfiltered, native order), else via h5py."""
    import h5py
    import scipy.sparse as sp

    from atlasmix.training.xcache import H5CSR

    rng = np.random.default_rng(3)
    m = sp.random(300, 40, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    m.sort_indices()
    path = tmp_path / "X.h5"
    with h5py.File(path, "w") as f:
        f.attrs["n_vars"] = 40
        for name, a in (("data", m.data), ("indices", m.indices.astype(np.int32))):
            if layout == "chunked":  # small chunks: reads cross many chunk boundaries
                f.create_dataset(name, data=a, chunks=(7,), maxshape=(None,))
            elif layout == "contiguous":
                f.create_dataset(name, data=a)
            elif layout == "gzip":
                f.create_dataset(name, data=a, chunks=(7,), compression="gzip")
            else:
                f.create_dataset(name, data=a.astype(a.dtype.newbyteorder(">")))
        f.create_dataset("indptr", data=m.indptr.astype(np.int64))
    X = H5CSR(path)
    try:
        assert X.direct is (layout in ("chunked", "contiguous"))
        for rows in (np.arange(300), np.array([0, 1, 2, 150, 299]), np.sort(rng.choice(300, 120, replace=False)),
                     np.array([], dtype=np.int64)):
            got = X.read_rows(rows)
            want = m[rows]
            assert got.shape == want.shape and np.array_equal(got.indptr, want.indptr)
            assert np.array_equal(got.indices, want.indices) and np.array_equal(got.data, want.data)
    finally:
        X.close()


def test_gather_dense_equals_scipy_gather_and_toarray():
    """The one-pass gather + densify + library size equals scipy's ``m[rows].toarray()`` and row sums,
    for unsorted and duplicate columns, repeated rows, a buffer holding garbage, a partial buffer."""
    import scipy.sparse as sp

    from atlasmix.training._dense import gather_dense

    rng = np.random.default_rng(0)
    m = sp.random(200, 300, density=0.15, format="csr", dtype=np.float32, random_state=rng)
    m.data = np.round(m.data * 20 + 1).astype(np.float32)
    for k in range(0, m.shape[0], 7):  # unsorted columns in some rows
        lo, hi = m.indptr[k], m.indptr[k + 1]
        m.indices[lo:hi] = m.indices[lo:hi][::-1].copy()
    dup = sp.csr_matrix((np.array([1.0, 2.0, 5.0], dtype=np.float32), np.array([3, 3, 0]), np.array([0, 3])),
                        shape=(1, 300))  # a duplicate column sums, as in toarray
    for mat, rows in ((m, rng.permutation(200)[:64]), (m, np.array([5, 5, 199, 0])), (dup, np.array([0])),
                      (m.astype(np.float64), rng.permutation(200)[:16])):  # other dtypes: cast per element
        out = np.full((70, mat.shape[1]), np.nan, dtype=np.float32)  # an old minibatch's garbage
        lib = gather_dense(mat.indptr, mat.indices, mat.data, rows, out)
        assert np.array_equal(out[:len(rows)], mat[rows].toarray())
        assert np.isnan(out[len(rows):]).all()  # rows past the minibatch untouched
        np.testing.assert_allclose(lib, np.asarray(mat[rows].sum(axis=1)).ravel(), rtol=1e-6)
    # a fresh zero buffer needs no clearing; one with old content does
    out = np.ones((4, 300), dtype=np.float32)
    gather_dense(m.indptr, m.indices, m.data, np.arange(4), out, clear=False)
    assert not np.array_equal(out, m[:4].toarray())
    with pytest.raises(ValueError, match="outside"):
        bad = m.indices.copy()
        bad[m.indptr[2]] = 300
        gather_dense(m.indptr, bad, m.data, np.arange(4), np.zeros((4, 300), dtype=np.float32))
    with pytest.raises(ValueError, match="float32"):
        gather_dense(m.indptr, m.indices, m.data, np.arange(4), np.zeros((4, 300)))


def test_dense_buffer_pool_reuses_only_released_buffers():
    from atlasmix.training._dense import DenseBufferPool

    pool = DenseBufferPool(8, 5, capacity=2)
    a, clear = pool.take(8)
    assert a.shape == (8, 5) and not clear and pool.n_fresh == 1
    held = [torch.from_numpy(a)[2:4]]  # a view of a tensor of the buffer keeps it in use
    del a
    b, _ = pool.take(3)
    assert pool.n_fresh == 2 and b.shape == (3, 5)
    arr = torch.from_numpy(b).numpy()  # ... as does a numpy view of the tensor
    del b
    c, _ = pool.take(8)
    assert pool.n_fresh == 3  # both held, capacity reached: a fresh buffer outside the pool
    del c, arr
    d, clear = pool.take(8)  # the second buffer is free again
    assert clear and pool.n_fresh == 3
    d[:] = 1
    held.clear()
    e, clear = pool.take(8)
    assert clear and pool.n_fresh == 3 and not np.shares_memory(d, e)


def test_dense_cpu_batches_stay_intact_and_reused_buffers_carry_no_old_content(mix):
    """Dense CPU minibatches are written into reused buffers: a batch the consumer keeps is never
    overwritten, and one it edited in place and dropped leaves nothing behind in later batches."""
    store, _, _ = mix
    L = make(mix, obs_columns=("dataset_id",))

    def expected(ids):
        order = np.argsort(ids)
        (_, m), = list(store.iter_X(ids[order], L.var_joinids, chunk_size=10_000))
        out = np.empty((len(ids), L.n_vars), dtype=np.float32)
        out[order] = m.toarray()
        return out

    kept = list(L)  # every batch held: each needs its own buffer
    assert len({b["X"].data_ptr() for b in kept}) == len(kept)
    for b in kept:
        assert np.array_equal(b["X"].numpy(), expected(b["soma_joinid"].numpy()))
    del kept
    ptrs = set()
    for b in L:  # dropped after use (a training loop): buffers are reused
        X = b["X"]
        ptrs.add(X.data_ptr())
        assert np.array_equal(X.numpy(), expected(b["soma_joinid"].numpy()))
        X.add_(7.0)  # the consumer edits its batch in place, then drops it
        del b, X
    assert len(ptrs) <= 8 < len(L)


@pytest.mark.parametrize("prefetch_io", [1, 2])
def test_an_io_batch_the_consumer_is_done_with_is_freed_before_the_next_reads(mix, monkeypatch, prefetch_io):
    """While reads run ahead, the IO batch the consumer has finished is not kept alive by the loader
    (a local name or enumerate's cached tuple): its buffers go back to the pool for the next read
    (atlasmix._buffers). When a read is submitted, at most ``prefetch_io`` earlier IO batches are
    alive: the ones read ahead, the one being cut included."""
    import weakref

    from atlasmix.training import loader as loader_mod
    from atlasmix.training import read as read_mod

    done: dict[int, weakref.ref] = {}
    at_submit: list[tuple[int, bool]] = []  # (earlier IO batches alive, the one before the cut alive)

    def counting_read_ahead(submit, n, depth):
        def submit_counted(j):
            # read j is submitted while IO batch j - depth is awaited or cut: j - depth - 1 is done with
            before = done.get(j - depth - 1)
            at_submit.append((sum(r() is not None for r in done.values()), before is not None and before() is not None))
            fut = submit(j)
            fut.add_done_callback(lambda f: done.__setitem__(j, weakref.ref(f.result()[1])))
            return fut

        return read_mod.read_ahead(submit_counted, n, depth)

    monkeypatch.setattr(loader_mod, "read_ahead", counting_read_ahead)
    L = make(mix, io_batch_size=128, io_threads=1, prefetch_io=prefetch_io, in_memory=False)
    n = 0
    for b in L:  # a training loop: each minibatch dropped after use
        n += len(b["soma_joinid"])
        del b
    assert n > 0 and len(done) == len(at_submit) >= prefetch_io + 4
    assert not any(held for _, held in at_submit), at_submit
    assert max(k for k, _ in at_submit) <= prefetch_io, at_submit


def test_memory_follows_the_manifest(mix, monkeypatch):
    """obs is read for the manifest's cells only (never the whole store), codes are int32 and the
    epoch order is computed once per process and shared by shard copies."""
    from atlasmix.store import Store

    store, path, train = mix
    table, _ = read_manifest(path, store=store)
    manifest_ids = np.unique(table["soma_joinid"].to_numpy())
    calls = []
    orig = Store.obs

    def spy(self, column_names=None, value_filter=None, joinids=None):
        calls.append(None if joinids is None else len(joinids))
        return orig(self, column_names, value_filter, joinids)

    monkeypatch.setattr(Store, "obs", spy)
    L = make(mix, obs_columns=("dataset_id", "cell_type"))
    assert calls == [len(manifest_ids)]  # one read, of the manifest's rows
    assert len(manifest_ids) < 0.8 * store.info()["n_cells"]
    got = orig(store, ["dataset_id"], joinids=train[::7])
    assert np.array_equal(got["soma_joinid"].to_numpy(), train[::7])
    assert all(c.dtype == np.int32 for c in L.codes.values())
    b = next(iter(L))
    assert b["dataset_id"].dtype == torch.int64
    n_calls = len(calls)
    other = L.with_shard(1, 2)
    assert other.shard_positions() is not None and len(L._order_cache) == 1  # one order, shared
    assert L._order_cache is other._order_cache
    # a shard is a copy over the same Store (its context: an s3 region, a memory budget), not the
    # store reopened by URI with default settings, and reads nothing from it
    assert other.store is L.store and len(calls) == n_calls
    held = make(mix, in_memory=True)
    assert held.ensure_in_memory() and held.with_shard(0, 1)._memory is held._memory  # not read again


def test_reads_bounded_in_bytes(mix, monkeypatch):
    """io_batch_bytes sizes each read from the split's mean whole-row size: reads stay near the
    budget, and the batches are those of the equivalent io_batch_size."""
    store, _, train = mix
    every = np.sort(store.var().index.to_numpy())  # the whole gene axis: a read's CSR is whole rows
    per_cell = 8.0 * float(np.mean(store.obs(["n_genes_by_counts"], joinids=train)["n_genes_by_counts"].to_numpy()))
    budget = int(per_cell * 300)
    L = make(mix, io_batch_bytes=budget, io_batch_size=100_000, var_joinids=every)
    assert L.io_batch_size == int(budget // per_cell) // 64 * 64 == 256
    assert make(mix, io_batch_bytes=budget, io_batch_size=128).io_batch_size == 128  # io_batch_size stays a cap
    sizes, read = [], MixtureLoader._read

    def watch(self, X, ids, col_of):
        m = read(self, X, ids, col_of)
        sizes.append((len(ids), 8 * m.nnz))
        return m

    monkeypatch.setattr(MixtureLoader, "_read", watch)
    got = list(L)
    full = [b for n, b in sizes if n == L.io_batch_size]
    assert len(full) >= 3 and max(full) <= 1.5 * budget and abs(np.mean(full) / (256 * per_cell) - 1) < 0.15
    same = make(mix, io_batch_size=256, var_joinids=every)
    for a, b in zip(got, same, strict=True):
        assert torch.equal(a["soma_joinid"], b["soma_joinid"]) and torch.equal(a["X"], b["X"])
    assert make(mix, io_batch_bytes=1).io_batch_size == 64  # never below one minibatch
    with pytest.raises(AtlasmixError, match="io_batch_bytes"):
        make(mix, io_batch_bytes=0)


def test_in_memory_split_serves_the_streamed_batches_and_reads_once(mix, monkeypatch):
    """in_memory reads the split once in store order; every epoch's batches equal the streamed
    loader's, and no store read happens after the first epoch. 'auto' streams when the split is
    over its cap or the loader is one of several shards."""
    calls = []
    read = MixtureLoader._read

    def watch(self, X, ids, col_of):
        calls.append((type(X).__name__, len(ids), bool(np.all(np.diff(ids) > 0))))
        return read(self, X, ids, col_of)

    monkeypatch.setattr(MixtureLoader, "_read", watch)
    streamed = make(mix)
    held = make(mix, in_memory=True)
    for epoch in range(2):
        calls.clear()
        got = list(held)
        from_store = [c for c in calls if c[0] != "InMemoryX"]
        if epoch == 0:  # the one pass over the split, ascending joinids, IO-batch-sized reads
            assert sum(n for _, n, _ in from_store) == held.n_obs and all(s for *_, s in from_store)
        else:
            assert from_store == []
        for a, b in zip(got, list(streamed), strict=True):
            assert torch.equal(a["soma_joinid"], b["soma_joinid"]) and torch.equal(a["X"], b["X"])
            assert torch.equal(a["library_size"], b["library_size"]) and torch.equal(a["dataset_id"], b["dataset_id"])
    assert held._memory is not None and held.in_memory_bytes == held._memory.nbytes > 0
    auto = make(mix, in_memory="auto")
    assert auto.ensure_in_memory() and auto.in_memory_bytes <= 2 * held.in_memory_bytes
    # the sample's estimate is over a cap of 100 bytes: streams
    assert not make(mix, in_memory="auto", in_memory_max_bytes=100).ensure_in_memory()
    # a cap between the sample and the whole: the read gives up part-way and the loader streams
    small = make(mix, in_memory="auto", in_memory_max_bytes=held._memory.nbytes // 2)
    monkeypatch.setenv("ATLASMIX_IN_MEMORY_MAX_GB", "0")  # the default cap comes from the environment
    assert not make(mix, in_memory="auto").ensure_in_memory()
    from atlasmix.training import memory
    from atlasmix.training.xcache import folder

    for bad in ("inf", "nan", "-1", "lots"):  # one AtlasmixError (one line at the CLI), not an OverflowError
        monkeypatch.setenv("ATLASMIX_IN_MEMORY_MAX_GB", bad)
        with pytest.raises(AtlasmixError, match="ATLASMIX_IN_MEMORY_MAX_GB"):
            memory.cap_bytes()
        monkeypatch.setenv("ATLASMIX_X_CACHE_MAX_GB", bad)
        with pytest.raises(AtlasmixError, match="x cache|ATLASMIX_X_CACHE_MAX_GB"):
            folder.cap_bytes()
    monkeypatch.setenv("ATLASMIX_IN_MEMORY_MAX_GB", "0")
    monkeypatch.delenv("ATLASMIX_X_CACHE_MAX_GB")
    assert memory.load_split(lambda k: held._memory.read_rows(k), held.cells, held.n_vars, 256, 2,
                             max_bytes=held._memory.nbytes // 2) is None
    assert ids_of(list(small)).size == small.n_obs
    assert not make(mix, in_memory="auto", rank=0, world_size=2).ensure_in_memory()
    assert make(mix, in_memory=True, rank=0, world_size=2).ensure_in_memory()
    assert not make(mix).ensure_in_memory()
    with pytest.raises(AtlasmixError, match="in_memory"):
        make(mix, in_memory="yes")
    with pytest.raises(AtlasmixError, match="not in the in-memory split"):
        held._memory.read_rows(np.array([-1]))


def test_dense_batches_from_memory_are_views_densified_two_at_a_time_in_order(mix, monkeypatch):
    """From a split held in memory, a dense CPU minibatch is gathered straight from the held CSR
    (its IO batch is a view, not a copy) by two densify threads at once on 2 cores; streamed next to
    two read threads, by one (by two with cores to spare). Either way the minibatches come out in
    the epoch's order, equal to a single densify thread's, and the densify threads stop when the
    iteration stops or fails."""
    import os
    import threading
    import time

    from atlasmix.training import memory
    from atlasmix.training import minibatches as mb_mod

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    orig = mb_mod.Minibatches._dense_batch
    lock = threading.Lock()
    state = {"now": 0, "most": 0, "views": []}

    def watched(self, pos, rows, m, buf, clear):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["views"].append(m)
        time.sleep(0.01)  # long enough for a second densify thread, if there is one, to overlap
        try:
            return orig(self, pos, rows, m, buf, clear)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(mb_mod.Minibatches, "_dense_batch", watched)

    def run(**kw):
        state.update(most=0, views=[])
        L = make(mix, **kw)
        got = [(b["soma_joinid"].clone(), b["X"].clone(), b["library_size"].clone()) for b in L]
        return L, got, state["most"], state["views"]

    held, two, most, views = run(in_memory=True)
    assert most == 2 and all(isinstance(v, memory.HeldRows) and v.indices is held._memory.indices for v in views)
    monkeypatch.setattr(mb_mod, "DENSIFY_THREADS", 1)
    _, one, most, _ = run(in_memory=True)
    assert most == 1
    monkeypatch.setattr(mb_mod, "DENSIFY_THREADS", 2)
    _, streamed, most, views = run(in_memory=False, io_threads=2)
    assert most == 1 and not any(isinstance(v, memory.HeldRows) for v in views)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # cores to spare: streamed IO batches too
    _, streamed_two, most, views = run(in_memory=False, io_threads=2)
    assert most == 2 and not any(isinstance(v, memory.HeldRows) for v in views)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert len(two) == len(one) == len(streamed) == len(streamed_two) == len(held) > 2
    for same in zip(two, one, streamed, streamed_two, strict=True):  # (soma_joinid, X, library_size) each
        assert all(all(torch.equal(f[0], g) for g in f[1:]) for f in zip(*same, strict=True))

    it = iter(held)
    next(it)
    assert any(t.name.startswith("atlasmix-densify") for t in threading.enumerate())
    it.close()  # a consumer that stops early
    assert not any(t.name.startswith("atlasmix-densify") for t in threading.enumerate())

    def broken(self, *a):
        raise ValueError("densify failed")

    monkeypatch.setattr(mb_mod.Minibatches, "_dense_batch", broken)
    done = held.batches_done
    with pytest.raises(ValueError, match="densify failed"):  # a densify thread's error reaches the consumer
        next(iter(held))
    assert held.batches_done == done  # the failed minibatch was not delivered: a resume retries it
    assert not any(t.name.startswith("atlasmix-densify") for t in threading.enumerate())
    with pytest.raises(AtlasmixError, match="not in the in-memory split"):
        held._memory.held_rows(np.array([-1]))
    ids = held.cells[::5]
    assert (held._memory.held_rows(ids).tocsr() != held._memory.read_rows(ids)).nnz == 0


def test_load_split_appends_rows_in_place_and_equals_the_stacked_reads():
    """load_split writes each read's rows straight into the held arrays (no stacking at the end):
    with rows that get denser along the split, the arrays must grow past their first estimate, and
    the result still equals the reads stacked; a read over the cap gives up."""
    import scipy.sparse as sp

    from atlasmix.training import memory

    keys = np.arange(5, 3005, 3, dtype=np.int64)

    def read(ids):  # density rises with the key: the first reads underestimate the split
        rng = np.random.default_rng(int(ids[0]))
        return sp.random(len(ids), 50, density=min(0.9, 0.01 + ids[0] / 3000), format="csr",
                         dtype=np.float32, random_state=rng)

    held = memory.load_split(read, keys, 50, chunk=64, threads=2)
    want = sp.vstack([read(keys[s:s + 64]) for s in range(0, len(keys), 64)], format="csr")
    got = sp.csr_matrix((held.data, held.indices, held.indptr), shape=want.shape)
    assert want.nnz > 0 and (got != want).nnz == 0 and np.array_equal(held.indptr, want.indptr)
    assert held.nbytes == 8 * want.nnz + 8 * (len(keys) + 1) + 8 * len(keys)
    assert memory.load_split(read, keys, 50, chunk=64, threads=2, max_bytes=8 * want.nnz // 2) is None
    exact = 8 * want.nnz + 16 * len(keys)  # a cap the split just fits: capacity never passes it
    capped = memory.load_split(read, keys, 50, chunk=64, threads=2, max_bytes=exact)
    assert np.array_equal(capped.data, want.data) and len(capped.data.base) <= exact // 8
    empty = memory.load_split(read, keys[:0], 50, chunk=64)
    assert empty.indptr.tolist() == [0] and empty.data.size == 0
    # the held arrays are kept as they are, never through scipy (which copies int32 indices to int64
    # past 2**31 nonzeros): int64 row pointers, int32 columns, float32 values, views of the buffers
    assert (held.indptr.dtype, held.indices.dtype, held.data.dtype) == (np.int64, np.int32, np.float32)
    from types import SimpleNamespace

    arrays = SimpleNamespace(indptr=held.indptr, indices=held.indices, data=held.data, shape=(len(keys), 50))
    again = memory.InMemoryX(keys, arrays)
    assert again.indptr is held.indptr and again.indices is held.indices and again.data is held.data


def test_unique_ids_equals_numpy_unique():
    """The loader's sorted-unique of joinids is np.unique's result (sorted, unsorted, repeated, empty)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from atlasmix._ids import unique_ids

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(-2**40, 2**40), max_size=60), st.booleans())
    def check(xs, presort):
        a = np.sort(np.asarray(xs, dtype=np.int64)) if presort else np.asarray(xs, dtype=np.int64)
        got = unique_ids(a)
        assert got.dtype == np.int64 and np.array_equal(got, np.unique(a))

    check()
