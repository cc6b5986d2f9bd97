"""The x cache folder's size cap and clean-up: least recently used projections go first, a projection
another process is reading never goes, stale and unfinished ones go on request (simulated store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from atlasmix.errors import AtlasmixError
from atlasmix.simulate import simulate_atlas
from atlasmix.store import Store
from atlasmix.training import xcache
from atlasmix.training.xcache import META, clean_x_cache, ensure_x_cache, list_x_cache, release_leases
from tests.conftest import ROOT, ingest_plan, run_cli, simulated_store


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    d = tmp_path_factory.mktemp("xc")
    store, _ = simulated_store(d, 1500, sources="blood_a,malignant", seed=3, n_genes=500)
    cells = np.sort(store.obs([])["soma_joinid"].to_numpy())
    return store, cells, d


@pytest.fixture(autouse=True)
def _no_leases():
    release_leases()
    yield
    release_leases()


def _build(store, cells, genes, root, **kw):
    uri, meta = ensure_x_cache(store, cells, genes, root, fmt="h5", **kw)
    return Path(uri).parent.name, meta


def _names(root):
    return {r["name"] for r in list_x_cache(root) if r["kind"] == "projection"}


def test_cap_deletes_least_recently_used_first(lake, tmp_path):
    store, cells, _ = lake
    b, mb = _build(store, cells, np.arange(0, 100), tmp_path)
    c, mc = _build(store, cells, np.arange(100, 200), tmp_path)
    d, md = _build(store, cells, np.arange(200, 300), tmp_path)
    assert _names(tmp_path) == {b, c, d} and all(m["built"] for m in (mb, mc, md))
    time.sleep(0.02)
    assert _build(store, cells, np.arange(0, 100), tmp_path)[1]["built"] is False  # b used again: c is now oldest
    release_leases()
    rows = {r["name"]: r for r in list_x_cache(tmp_path)}
    assert rows[b]["last_used"] > rows[d]["last_used"] > rows[c]["last_used"]
    cap = rows[b]["bytes"] + rows[d]["bytes"]
    r = clean_x_cache(tmp_path, max_bytes=cap)
    assert r["removed"] == [c] and _names(tmp_path) == {b, d} and r["bytes"] <= cap
    # a build applies the cap itself, keeping what it just built
    e, _ = _build(store, cells, np.arange(300, 400), tmp_path, max_bytes=rows[b]["bytes"] + 1)
    assert _names(tmp_path) == {e}


def test_a_projection_larger_than_the_cap_is_refused_and_leaves_nothing(lake, tmp_path):
    store, cells, _ = lake
    kept, _ = _build(store, cells, np.arange(0, 50), tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(AtlasmixError, match="passed the cap"):
        _build(store, cells, np.arange(0, 400), tmp_path, max_bytes=20_000, chunk_cells=200)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(AtlasmixError, match="ATLASMIX_X_CACHE_MAX_GB"):
        os.environ["ATLASMIX_X_CACHE_MAX_GB"] = "lots"
        try:
            xcache.cap_bytes()
        finally:
            del os.environ["ATLASMIX_X_CACHE_MAX_GB"]


HOLDER = textwrap.dedent("""
    import sys, numpy as np
    from atlasmix.store import Store
    from atlasmix.training.xcache import ensure_x_cache
    store = Store(sys.argv[1])
    cells = np.sort(store.obs([])["soma_joinid"].to_numpy())
    ensure_x_cache(store, cells, np.arange(0, 100), sys.argv[2], fmt="h5")
    print("holding", flush=True)
    sys.stdin.read()  # until the test closes our stdin
""")


def test_a_projection_another_process_reads_is_never_deleted(lake, tmp_path):
    store, cells, _ = lake
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, store.uri, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding"
        held = _names(tmp_path)
        assert len(held) == 1 and list_x_cache(tmp_path)[0]["in_use"]
        mine, _ = _build(store, cells, np.arange(200, 300), tmp_path)
        r = clean_x_cache(tmp_path, everything=True)  # this process holds its own one too
        assert r["removed"] == [] and set(r["kept_in_use"]) == held | {mine}
        release_leases()
        r = run_cli("x-cache", "clean", tmp_path, "--max-gb", "0")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.splitlines()[0])
        assert out["removed"] == [mine] and out["kept_in_use"] == sorted(held)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert clean_x_cache(tmp_path, max_bytes=0)["removed"] == sorted(held)
    assert _names(tmp_path) == set()


def test_stale_and_unfinished_entries_are_cleaned_and_listed(lake, tmp_path):
    store, cells, d = lake
    import shutil

    copy = Store(str(shutil.copytree(store.uri, tmp_path / "store")))
    root = tmp_path / "cache"
    old, _ = _build(copy, cells, np.arange(0, 80), root)
    info = simulate_atlas(d / "sim2", 300, sources="blood_b", seed=9, n_genes=500)
    ingest_plan(copy, info["plan"])
    live = root / f"x-{'1' * 24}-h5.tmp-{os.getpid()}-2"  # a build of a live process
    live.mkdir()
    new, _ = _build(copy, np.sort(copy.obs([])["soma_joinid"].to_numpy()), np.arange(0, 80), root)
    assert old in _names(root) and live.exists()  # the build's own clean-up keeps both
    release_leases()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (root / f"x-{'0' * 24}-h5.tmp-{dead_pid}-1").mkdir()  # the build of a process that died
    r = run_cli("x-cache", "list", root, "--json")
    assert r.returncode == 0, r.stderr
    kinds = {e["name"]: e["kind"] for e in json.loads(r.stdout)["entries"]}
    assert kinds[old] == kinds[new] == "projection" and sorted(kinds.values()).count("unfinished") == 2
    r = run_cli("x-cache", "clean", root, "--store", f"{tmp_path}/./store")  # the store spelled otherwise
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[0])
    assert sorted(out["removed"]) == sorted([old, f"x-{'0' * 24}-h5.tmp-{dead_pid}-1"])
    assert sorted(p.name for p in root.iterdir()) == sorted([new, live.name])
    assert (root / new / META).exists()
    for args in (("clean", tmp_path / "nowhere"), ("list", tmp_path / "nowhere"), ("clean", root, "--max-gb", "nan")):
        r = run_cli("x-cache", *args)
        assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, args
    assert "finite" in r.stderr


def test_a_build_is_held_through_its_rename_and_listing_skips_vanished_entries(lake, tmp_path, monkeypatch):
    """Another process cleaning the folder (everything not in use) right after a build's rename does
    not delete the new projection: its lock is taken before the rename. A listing or clean-up over a
    folder whose entries another process deletes meanwhile skips them instead of failing."""
    from atlasmix.training.xcache import build as build_mod
    from atlasmix.training.xcache import folder as folder_mod

    store, cells, _ = lake
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cleaner = ("import sys; from atlasmix.training.xcache import clean_x_cache; "
               "print(clean_x_cache(sys.argv[1], everything=True)['removed'])")
    rename, cleaned = os.rename, []

    def rename_then_clean(src, dst):
        rename(src, dst)
        if ".tmp-" in Path(src).name and ".del-" not in Path(dst).name:  # a finished build moved into place
            out = subprocess.run([sys.executable, "-c", cleaner, str(tmp_path)], capture_output=True, text=True,
                                 env=env, check=True)
            cleaned.append(out.stdout.strip())

    monkeypatch.setattr(build_mod.os, "rename", rename_then_clean)
    uri, meta = ensure_x_cache(store, cells, np.arange(0, 60), tmp_path, fmt="h5")
    monkeypatch.setattr(build_mod.os, "rename", rename)
    assert meta["built"] and cleaned == ["[]"] and Path(uri).exists()
    release_leases()

    entry = folder_mod._entry

    def vanishing(p):  # another process deletes the entry just before it is looked at
        import shutil

        shutil.rmtree(p)
        return entry(p)

    monkeypatch.setattr(folder_mod, "_entry", vanishing)
    assert list_x_cache(tmp_path) == [] and clean_x_cache(tmp_path, max_bytes=0)["removed"] == []


def test_an_h5_copy_over_the_cap_on_disk_is_refused(lake, tmp_path):
    """The running check counts the nonzeros; HDF5 stores whole 2**16-element chunks, so the file can
    pass a cap its nonzeros are under: the size on disk is checked before the copy is kept."""
    store, cells, _ = lake
    with pytest.raises(AtlasmixError, match="over the cap"):
        _build(store, cells, np.arange(0, 40), tmp_path, max_bytes=300_000)
    assert list(tmp_path.iterdir()) == []
    _, meta = _build(store, cells, np.arange(0, 40), tmp_path)
    assert 8 * meta["nnz"] < 300_000 < meta["bytes"]  # (so the nonzeros alone were under that cap)


def test_x_source_layout_with_an_x_cache_reads_the_cache(lake, tmp_path):
    """x_source applies without an x cache; with one it must not claim the store has no layout."""
    from atlasmix.training.loader import MixtureLoader

    store, cells, _ = lake
    L = MixtureLoader(store, cells, x_source="layout", x_cache=tmp_path, var_joinids=np.arange(0, 40), batch_size=256)
    assert sum(b["X"].shape[0] for b in L) == len(cells)


def test_release_leases_under_a_folder_frees_only_that_folder(lake, tmp_path):
    """A study grid cell drops its locks on its own cache folder before deleting it; locks this
    process holds elsewhere stay (a long-lived process does not pile up locks on deleted copies)."""
    store, cells, _ = lake
    a, b = tmp_path / "a", tmp_path / "b"
    _build(store, cells, np.arange(0, 30), a)
    _build(store, cells, np.arange(0, 30), b)
    release_leases(a)
    assert clean_x_cache(a, everything=True)["kept_in_use"] == []
    assert len(clean_x_cache(b, everything=True)["kept_in_use"]) == 1
