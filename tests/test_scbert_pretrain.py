"""scBERT pretraining from the store (tiny Performer, CPU): the masked-token loss falls, the model saves
and reloads with its gene2vec positions, a stopped run resumes to the uninterrupted weights, cells
embed from the CLI and directly; scBERT's masking rule."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import in_sql, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def mix(lake, tmp_path_factory):
    """(store, manifest, gene list file, gene2vec file): 200 cells of the first three datasets; a gene
    axis of 1,000 store symbols most often detected plus 2 the store lacks; a random gene2vec matrix."""
    from atlasmix.mixing import loads_spec, resolve, write_manifest

    store, names = lake
    spec = loads_spec(f'name = "sb"\nseed = 2\nvalidation_fraction = 0.1\n[[components]]\nname = "c"\n'
                      f'where = "{in_sql(names[:3])}"\nn_cells = 200\n', "sb.toml")
    d = tmp_path_factory.mktemp("sb")
    path = d / "sb.parquet"
    write_manifest(resolve(spec, store), path)
    from atlasmix.training.loader import MixtureLoader

    var = store.var()
    vj = var.index.to_numpy(dtype=np.int64)
    cells = np.sort(pd.read_parquet(path)["soma_joinid"].to_numpy())[:100]
    b = next(iter(MixtureLoader(store, cells, var_joinids=vj, batch_size=100, shuffle=False, obs_columns=(),
                                sparse=True)))
    det = np.bincount(b["X"].col_indices().numpy(), minlength=len(vj))
    sym = var["feature_name"].astype(str).to_numpy()[np.argsort(-det, kind="stable")]
    sym = list(dict.fromkeys(sym))[:1000] + ["NOPE1", "NOPE2"]
    (d / "genes.txt").write_text("\n".join(sym) + "\n")
    np.save(d / "g2v.npy", np.random.default_rng(0).normal(size=(len(sym), 32)).astype(np.float32))
    return store, path, d / "genes.txt", d / "g2v.npy"


def test_mask_tokens_follows_scbert():
    from atlasmix.training.scbert.pretrain import mask_tokens

    t = torch.zeros((4, 50), dtype=torch.long)
    t[0, :40] = 3
    t[1, :7] = 1
    t[2, ::2] = 5
    mt, labels = mask_tokens(t, torch.Generator().manual_seed(0), replace_prob=1.0)
    sel = labels.ne(6)
    assert sel.sum(1).tolist() == [6, 2, 4, 0]  # ceil(0.15 n) of the nonzero tokens
    assert (t[sel] != 0).all() and (mt[sel] == 6).all() and (mt[~sel] == t[~sel]).all()
    mt, labels = mask_tokens(t, torch.Generator().manual_seed(0), replace_prob=0.0)  # chosen, not replaced
    assert torch.equal(mt, t) and labels.ne(6).sum() == 12


def test_pretrain_reload_embed_and_resume(mix, tmp_path):
    from atlasmix.training.scbert.pretrain import embed_cells, load_scbert, train_scbert

    store, path, genes, g2v = mix
    out = tmp_path / "run"
    r = run_cli("train", "scbert", "--store", store.uri, "--mixture", path, "--out", out, "--genes", genes,
                "--gene2vec", g2v, "--preset", "tiny", "--batch-size", "8", "--group-batches", "4", "--warmup-steps",
                "2", "--lr", "1e-2", "--log-every", "4", "--accelerator", "cpu", "--io-batch-size", "256",
                "--max-steps", "16", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 16 and run["gene_axis"] == {"n_genes": 1002, "n_genes_in_store": 1000}
    curve = pd.read_csv(out / "training_curve.csv")
    assert len(curve) == 4 and curve["loss"].iloc[-1] < curve["loss"].iloc[0] - 0.3  # cross-entropy falls
    model, cfg, gl = load_scbert(out)
    assert cfg["gene2vec"] and len(gl) == 1002 and model.max_seq_len == 1003
    np.testing.assert_array_equal(model.pos_emb.emb.weight[:-1].numpy(), np.load(g2v))  # fixed, not trained
    r = run_cli("scbert", "embed", "--model", out, "--store", store.uri, "--where",
                f"dataset_id = '{sorted(set(store.catalog()['dataset_id']))[0]}'", "--out", tmp_path / "e.parquet",
                "--accelerator", "cpu", "--batch-size", "16", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    emb = pd.read_parquet(tmp_path / "e.parquet")
    E = emb.filter(like="emb_").to_numpy()
    assert E.shape[1] == 32 and np.isfinite(E[emb["n_tokens"] > 0]).all()
    one = embed_cells(out, store, emb["soma_joinid"].to_numpy()[:3], device="cpu")
    np.testing.assert_allclose(one.filter(like="emb_").to_numpy(), E[:3], rtol=1e-4, atol=1e-5)
    r = run_cli("train", "scbert", "--store", store.uri, "--mixture", path, "--out", tmp_path / "bad", "--genes",
                tmp_path / "missing.txt", env=ONE_THREAD)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr

    # stopped mid-run and resumed == uninterrupted (weights, masks, Performer feature redraws)
    kw = dict(genes=genes, gene2vec=g2v, preset="tiny", batch_size=8, group_batches=4, warmup_steps=2, lr=1e-2,
              log_every=4, checkpoint_every=0, device="cpu", io_batch_size=256, max_steps=10)
    train_scbert(store, path, tmp_path / "a", **kw)
    train_scbert(store, path, tmp_path / "b", stop_after=6, **kw)
    train_scbert(store, path, tmp_path / "b", resume=True, **kw)
    a, b = load_scbert(tmp_path / "a")[0].state_dict(), load_scbert(tmp_path / "b")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_scgpt_and_scbert_train_under_torchrun_on_two_ranks(mix, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo, CPU) runs the shared pretraining loop with DDP for both
    models: two ranks, each its shard, rank 0 saves a model that reloads."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from atlasmix.training.scbert.pretrain import load_scbert
    from atlasmix.training.scgpt.model import load_scgpt

    store, path, genes, _ = mix
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    common = ["--store", store.uri, "--mixture", str(path), "--preset", "tiny", "--max-steps", "4",
              "--warmup-steps", "1", "--log-every", "2", "--checkpoint-every", "2", "--accelerator", "cpu",
              "--io-batch-size", "256", "--group-batches", "2"]
    for model, extra in (("scgpt", ["--max-len", "64", "--batch-size", "8"]),
                         ("scbert", ["--genes", str(genes), "--batch-size", "4"])):
        out = tmp_path / model
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "atlasmix.cli", "train", model, *common, *extra, "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        run = json.loads((out / "run.json").read_text())
        assert run["options"]["world_size"] == 2 and run["steps"] == 4
        assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["ranks"].__len__() == 2
        (load_scgpt if model == "scgpt" else load_scbert)(out)


def test_bad_gene2vec_files_are_one_line_errors(mix, tmp_path):
    from atlasmix.errors import AtlasmixError
    from atlasmix.training.scbert.pretrain import train_scbert

    store, path, genes, _ = mix
    np.savez(tmp_path / "two.npz", a=np.zeros((3, 2)))
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    np.save(tmp_path / "nan.npy", np.full((1002, 32), np.nan, dtype=np.float32))
    for f, msg in (("two.npz", "one numeric .npy"), ("text.npy", "one numeric .npy"), ("nan.npy", "NaN"),
                   ("missing.npy", "not readable")):
        with pytest.raises(AtlasmixError, match=msg):
            train_scbert(store, path, tmp_path / f"o_{f}", genes=genes, gene2vec=tmp_path / f, preset="tiny",
                         max_steps=1, device="cpu")


def test_ddp_ranks_take_equal_steps_when_empty_cells_are_dropped():
    """Under DDP a megabatch gives as many training batches as without dropping empty cells, so that
    ranks dropping different numbers of cells still step together."""
    from atlasmix.training.stream import EncodedStream

    class Loader:
        batch_size, shuffle, seed, epoch = 10, False, 0, 0

        def __init__(self, world_size):
            self.world_size = world_size

    lengths = np.array([5, 0, 0, 0, 7, 0, 0, 3, 0, 0])
    arrays = {"tokens": np.ones((10, 8), dtype=np.int64)}
    b = {"soma_joinid": torch.arange(10)}
    one = EncodedStream(Loader(1), batch_size=3)._split(b, arrays, lengths, 0)
    two = EncodedStream(Loader(2), batch_size=3)._split(b, arrays, lengths, 0)
    assert len(one) == 1 and len(two) == 4  # ceil(10 / 3) batches under DDP
    assert sorted(int(j) for d in two for j in d["soma_joinid"] if lengths[int(j)] > 0) == [0, 4, 7]
    assert all(len(d["soma_joinid"]) >= 1 for d in two)
