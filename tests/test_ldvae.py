"""LDVAE trained from the store (no AnnData of the mixture), saved, loaded, resumed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from atlasmix.mixing import loads_spec, resolve, write_manifest
from tests.conftest import in_sql, run_cli

SMALL = ["--max-epochs", "2", "--n-hidden", "16", "--n-layers", "1", "--batch-size", "128", "--io-batch-size", "512",
         "--checkpoint-every", "1", "--no-progress", "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def mix(lake, tmp_path_factory):
    store, names = lake
    spec = loads_spec(f'name = "ldvae"\nseed = 2\nvalidation_fraction = 0.2\n[[components]]\nname = "pbmc"\n'
                      f'where = "{in_sql(names[:3])}"\nn_cells = 700\n', "ldvae.toml")
    d = tmp_path_factory.mktemp("ldvae")
    path = d / "ldvae.parquet"
    write_manifest(resolve(spec, store), path)
    from atlasmix.mixing.genes import mixture_genes

    cells = pd.read_parquet(path)["soma_joinid"].to_numpy()
    var = store.var()
    genes = var.loc[mixture_genes(store, cells)[:150], "feature_id"].tolist()  # a small gene axis keeps CPU time low
    (d / "genes.txt").write_text("\n".join(genes) + "\n")
    return store, path, d / "genes.txt", genes


def test_train_save_load_loadings_latents(mix, lake, tmp_path):
    import scvi

    store, path, genes_file, genes = mix
    out = tmp_path / "run"
    r = run_cli("train", "ldvae", "--store", store.uri, "--mixture", path, "--out", out, "--genes", genes_file, *SMALL,
                "--x-cache", tmp_path / "xc", "--x-cache-format", "h5",  # reads an uncompressed projection
                "--io-batch-mb", "0.5")  # reads bounded in bytes: fewer cells than --io-batch-size 512
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["io_batch_bytes"] == 500_000 and run["options"]["io_batch_size"] in (128, 256, 384)
    assert run["x_cache"]["train"]["format"] == "h5" and run["x_cache"]["train"]["n_vars"] == 150
    # --in-memory auto (default): both small splits held, read once (through the x cache) before epoch 1
    assert run["options"]["in_memory"] == "auto" and run["in_memory"]["train"]["held"]
    assert run["in_memory"]["validation"]["held"] and 0 < run["in_memory"]["train"]["bytes"] < 50e6
    assert len(list((tmp_path / "xc").glob("x-*-h5/X.h5"))) == 2  # train and validation cells
    side = json.loads(path.with_suffix(".json").read_text())
    assert run["manifest"]["sha256"] == side["manifest"]["sha256"] and run["store"] == store.identity()
    assert run["n_genes"] == 150 and run["epochs_run_this_call"] == 2
    assert run["n_cells"]["train"] + run["n_cells"]["validation"] == 700
    assert run["options"]["n_latent"] == 10 and run["options"]["gene_likelihood"] == "nb"
    assert sorted(run["batch_categories"]) == sorted(lake[1][:3])

    model = scvi.model.LinearSCVI.load(str(out / "model"))
    assert model.adata.n_obs <= 1000 and list(model.adata.var_names) == genes  # the template, not the mixture
    assert model.summary_stats.n_batch == 3
    # library priors are the store-estimated ones, not the template's
    np.testing.assert_allclose(model.module.library_log_means.numpy().ravel(), run["library_prior"]["log_means"], rtol=1e-6)
    load = pd.read_parquet(out / "loadings.parquet")
    assert load.shape == (150, 11) and list(load.index) == genes and np.isfinite(load.filter(like="Z_")).all().all()
    np.testing.assert_allclose(load.filter(like="Z_").to_numpy(), model.get_loadings().to_numpy(), rtol=1e-6)
    curve = pd.read_csv(out / "training_curve.csv")
    # an epochs budget validates once per epoch (validation ELBO per cell) and records cells seen
    assert len(curve) == 2 and np.allclose(curve["epoch"], [1, 2], atol=0.01)
    assert np.isfinite(curve[["train_loss", "validation_loss"]].to_numpy()).all()
    assert run["training"]["steps"] == curve["step"].iloc[-1] == run["budget"]["max_steps"]
    assert run["budget"]["label"] == "epochs=2" and run["budget"]["kl_warmup"].startswith("scvi-tools default")
    assert (out / "training_curve.png").stat().st_size > 1000
    assert (out / "checkpoints" / "last.ckpt").is_file()

    # latents streamed from the store for the validation split, and from the template AnnData
    from atlasmix.training.ldvae import latent_representation
    from atlasmix.training.loader import MixtureLoader

    cats = {"dataset_id": list(model.adata.obs["batch"].cat.categories)}
    val = MixtureLoader(store, path, "validation", shuffle=False, batch_size=64, io_batch_size=256,
                        var_joinids=model.adata.var["soma_joinid"].to_numpy(), categories=cats)
    z = latent_representation(model, val)
    assert z.shape == (run["n_cells"]["validation"], 10) and np.isfinite(z.to_numpy()).all()
    assert np.array_equal(z.index.to_numpy(), val.cells)
    assert model.get_latent_representation().shape == (model.adata.n_obs, 10)
    # the same cell gives the same latent mean either way
    tid = model.adata.obs["soma_joinid"].to_numpy()
    tr = MixtureLoader(store, path, "train", shuffle=False, batch_size=64, io_batch_size=256,
                       var_joinids=model.adata.var["soma_joinid"].to_numpy(), categories=cats)
    zt = latent_representation(model, tr)
    np.testing.assert_allclose(zt.loc[tid].to_numpy(), model.get_latent_representation(), rtol=1e-4, atol=1e-5)

    # refuses to overwrite a run
    again = run_cli("train", "ldvae", "--store", store.uri, "--mixture", path, "--out", out, *SMALL)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_resume_matches_uninterrupted_run(mix, tmp_path):
    from atlasmix.training.ldvae import train_ldvae

    store, path, _, genes = mix
    kw = dict(n_hidden=16, n_layers=1, batch_size=128, io_batch_size=512, checkpoint_every=1, progress=False,
              accelerator="cpu", genes=genes, seed=7, prior_cells=2000)
    full = train_ldvae(store, path, tmp_path / "full", max_epochs=3, **kw)
    # the interrupted run reads X through an x cache projection (same minibatches, so same weights)
    cut = train_ldvae(store, path, tmp_path / "cut", max_epochs=2, x_cache=tmp_path / "xc", **kw)  # "killed" after epoch 2
    # ... and is resumed streaming every epoch (in_memory=False), where the others held their splits in memory
    resumed = train_ldvae(store, path, tmp_path / "cut", max_epochs=3, resume=True, x_cache=tmp_path / "xc",
                          in_memory=False, **kw)
    assert full["epochs_run_this_call"] == 3 and resumed["resumed"]
    assert full["in_memory"]["train"]["held"] and cut["in_memory"]["train"]["held"] and resumed["in_memory"] == {}
    assert cut["x_cache"]["train"]["built"] and not resumed["x_cache"]["train"]["built"]
    assert cut["x_cache"]["train"]["n_vars"] == len(genes) and "validation" in cut["x_cache"]
    a = torch.load(tmp_path / "full" / "model" / "model.pt", weights_only=False)["model_state_dict"]
    b = torch.load(tmp_path / "cut" / "model" / "model.pt", weights_only=False)["model_state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    ca = pd.read_csv(tmp_path / "full" / "training_curve.csv")
    cb = pd.read_csv(tmp_path / "cut" / "training_curve.csv")
    assert np.allclose(cb["epoch"], [1, 2, 3], atol=0.01)  # the restored callback kept the first two points
    np.testing.assert_allclose(ca[["train_loss", "validation_loss"]], cb[["train_loss", "validation_loss"]], rtol=1e-4)
    assert resumed["training"]["cells_seen"] == full["training"]["cells_seen"]


def test_datamodule_shards_per_ddp_rank_and_restarts_validation(mix):
    from types import SimpleNamespace

    from atlasmix.training.ldvae import StoreDataModule
    from atlasmix.training.loader import MixtureLoader

    store, path, _, genes = mix
    opts = dict(batch_size=32, io_batch_size=128, genes=genes)
    per_rank = []
    for rank in range(2):
        dm = StoreDataModule(MixtureLoader(store, path, "train", **opts),
                             MixtureLoader(store, path, "validation", shuffle=False, **opts))
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=0,
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
        dm.setup("fit")
        assert (dm.train_loader.rank, dm.train_loader.world_size) == (rank, 2)
        assert dm.n_vars == 150 and dm.n_batch == 3
        tl = dm.train_dataloader()
        per_rank.append((len(tl), sum(1 for _ in tl)))  # first epoch
        batches = list(tl)  # second epoch
        assert all(set(b) == {"X", "batch", "labels"} and b["batch"].shape == (len(b["X"]), 1) for b in batches)
        vl = dm.val_dataloader()
        it = iter(vl)
        next(it)  # a pass stopped early (Lightning's sanity check) ...
        del it
        assert sum(len(b["X"]) for b in vl) == dm.val_loader.shard_size  # ... does not shorten the next
    assert per_rank[0] == per_rank[1]  # equal batch counts on both ranks


# a training script as a user writes one: Lightning's DDP launcher re-runs it for rank 1
DDP_SCRIPT = '''
import sys
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback

from atlasmix.store import Store
from atlasmix.training.ldvae import train_ldvae


class RecordShard(Callback):
    """Saves the positions (into the split's cells) and soma_joinids this rank serves in each epoch."""

    def __init__(self, out):
        self.out = out

    def on_train_epoch_start(self, trainer, pl_module):
        L = trainer.datamodule.train_loader
        e, r = trainer.current_epoch, trainer.global_rank
        pos = L.shard_positions(e)
        np.save(self.out / f"positions_rank{r}_epoch{e}.npy", pos)
        np.save(self.out / f"served_rank{r}_epoch{e}.npy", L.cells[pos])


if __name__ == "__main__":
    store, manifest, genes, out, epochs, resume = sys.argv[1:7]
    rec = Path(out + "_served")
    rec.mkdir(exist_ok=True)
    run = train_ldvae(Store(store), manifest, out, accelerator="cpu", devices=2, max_epochs=int(epochs),
                      resume=resume == "resume", genes=Path(genes).read_text().split(), n_hidden=16, n_layers=1,
                      batch_size=64, io_batch_size=256, checkpoint_every=1, progress=False, seed=3,
                      prior_cells=2000, callbacks=[RecordShard(rec)])
    print("RANK", run.get("global_rank", 0), "DONE", flush=True)
'''


def test_ddp_two_processes_train_disjoint_shards_and_resume_to_the_same_weights(mix, tmp_path):
    """Two real DDP processes (gloo on the CPU): each rank serves its own shard of whole blocks,
    rank 0 writes a model that scvi-tools loads, and a run stopped after epoch 1 and resumed on two
    ranks ends with the weights of an uninterrupted run."""
    import subprocess
    import sys

    import scvi

    store, path, genes_file, _ = mix
    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT)

    def run(out, epochs, resume=""):
        r = subprocess.run([sys.executable, str(script), store.uri, str(path), str(genes_file), str(tmp_path / out),
                            str(epochs), resume], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "RANK 0 DONE" in r.stdout  # rank 0 returns only after rank 1 ended (exit status 0)
        return json.loads((tmp_path / out / "run.json").read_text())

    full = run("full", 2)
    # scvi-tools' DDP history lands in the run folder, never in the working directory
    assert (tmp_path / "full" / "lightning_logs").is_dir() and not (tmp_path / "lightning_logs").exists()
    assert full["options"]["devices"] == 2 and full["options"]["strategy"] == "ddp_find_unused_parameters_true"
    per_rank = full["budget"]["cells_per_rank_per_epoch"]
    train_ids = pd.read_parquet(path).query("split == 'train'")["soma_joinid"].to_numpy()
    for e in range(2):
        a, b = (np.load(tmp_path / "full_served" / f"served_rank{r}_epoch{e}.npy") for r in range(2))
        assert len(a) == len(b) == per_rank  # equal shards, hence equal batch counts
        assert not np.intersect1d(a, b).size  # disjoint
        union = np.union1d(a, b)
        assert np.isin(union, train_ids).all()
        assert len(train_ids) - len(union) < 2 * 64  # at most one block per rank waits for another epoch
        pos = np.sort(np.load(tmp_path / "full_served" / f"positions_rank0_epoch{e}.npy"))
        starts = np.flatnonzero(np.diff(pos, prepend=-2) != 1)  # runs of consecutive manifest cells
        assert np.diff(np.append(starts, len(pos))).min() >= 64  # whole 64-cell blocks, not single cells
    assert full["training"]["cells_seen"] == 2 * 2 * per_rank  # every rank's cells counted
    assert full["budget"]["batches_per_epoch"] == -(-per_rank // 64)
    assert not any((tmp_path / "full").glob("*rank*"))  # one set of outputs (rank 0's)
    scvi.model.LinearSCVI.load(str(tmp_path / "full" / "model"))

    run("cut", 1)  # stopped after epoch 1 (a checkpoint holds both ranks' positions) ...
    resumed = run("cut", 2, "resume")  # ... and resumed on two ranks
    assert resumed["resumed"] and resumed["training"]["cells_seen"] == full["training"]["cells_seen"]
    a = torch.load(tmp_path / "full" / "model" / "model.pt", weights_only=False)["model_state_dict"]
    b = torch.load(tmp_path / "cut" / "model" / "model.pt", weights_only=False)["model_state_dict"]
    for k in a:
        if torch.is_tensor(a[k]):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ca, cb = (pd.read_csv(tmp_path / d / "training_curve.csv") for d in ("full", "cut"))
    pd.testing.assert_frame_equal(ca, cb)


def test_rda_downsamples_the_training_minibatches(mix, tmp_path):
    """Read-depth-aware downsampling as the loader's augmentation: same cells in the same order, fewer
    counts (never more), library size = the downsampled counts, reproducible per epoch; train ldvae
    --rda trains with it and records it."""
    from atlasmix.training.loader import MixtureLoader
    from atlasmix.training.rda import ReadDepthAugment

    store, path, genes_file, genes = mix
    var = store.var()
    vj = np.sort(var.index.to_numpy()[var["feature_id"].isin(genes).to_numpy()])
    kw = dict(var_joinids=vj, batch_size=64, io_batch_size=256, seed=1, obs_columns=(), library="counts")

    def epoch(loader):  # dense CPU minibatches live in reused buffers: copy them
        return [dict(b, X=b["X"].clone()) for b in loader]

    plain = epoch(MixtureLoader(store, path, "train", **kw))
    aug = MixtureLoader(store, path, "train", augment=ReadDepthAugment(p=1.0, min_total=0, seed=2), **kw)
    a0 = epoch(aug)
    aug.set_epoch(0)  # (a loader steps to the next epoch by itself after a full pass)
    a0_again = epoch(aug)  # the same epoch again: the same draws
    aug.set_epoch(1)
    a1 = epoch(aug)
    ratios = []
    for p, a, b in zip(plain, a0, a0_again):
        assert torch.equal(p["soma_joinid"], a["soma_joinid"]) and torch.equal(a["X"], b["X"])
        assert (a["X"] <= p["X"]).all() and torch.allclose(a["library_size"].ravel(), a["X"].sum(1))
        ok = p["X"].sum(1) > 0
        ratios += (a["X"].sum(1)[ok] / p["X"].sum(1)[ok]).tolist()
    assert 0.4 < np.mean(ratios) < 0.6  # Beta(2, 2): half of the counts kept on average
    order1 = {int(j): x for b in a1 for j, x in zip(b["soma_joinid"], b["X"])}
    order0 = {int(j): x for b in a0 for j, x in zip(b["soma_joinid"], b["X"])}
    assert any(not torch.equal(order0[j], order1[j]) for j in order0)  # another epoch, other draws

    out = tmp_path / "run"
    r = run_cli("train", "ldvae", "--store", store.uri, "--mixture", path, "--out", out, "--genes", genes_file,
                *SMALL, "--rda", "--rda-p", "0.8")
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["rda"] == {"p": 0.8, "beta": [2.0, 2.0], "min_total": 1000.0}
