"""scGPT pretraining from the store (tiny model, CPU): the masked-value loss falls, the model saves and
reloads, a stopped run resumes to the uninterrupted run's weights, cells embed (<cls>) from the CLI
and directly; scGPT's masking rule."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import in_sql, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
KW = dict(preset="tiny", max_len=64, batch_size=16, group_batches=4, warmup_steps=2, lr=3e-2, log_every=5,
          checkpoint_every=5, device="cpu", io_batch_size=512)


@pytest.fixture(scope="module")
def mix(lake, tmp_path_factory):
    """(store, manifest) of 300 cells of the first three datasets (shared data or simulated)."""
    from atlasmix.mixing import loads_spec, resolve, write_manifest

    store, names = lake
    spec = loads_spec(f'name = "sg"\nseed = 5\nvalidation_fraction = 0.1\n[[components]]\nname = "c"\n'
                      f'where = "{in_sql(names[:3])}"\nn_cells = 300\n', "sg.toml")
    path = tmp_path_factory.mktemp("sg") / "sg.parquet"
    write_manifest(resolve(spec, store), path)
    return store, path


def test_mask_values_follows_scgpt():
    from atlasmix.training.scgpt.pretrain import mask_values

    v = torch.full((5, 40), -2.0)
    lens = [40, 1, 10, 23, 3]
    for i, n in enumerate(lens):
        v[i, :n] = torch.arange(n, dtype=torch.float32) % 7
    masked, mask = mask_values(v, 0.4, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [int(0.4 * n) for n in lens]  # int(n * mask_ratio) per cell
    assert (masked[mask] == -1).all() and (masked[~mask] == v[~mask]).all() and not mask[v == -2].any()
    again, _ = mask_values(v, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(again, masked)


def test_pretrain_save_reload_embed_and_the_cli(mix, tmp_path):
    from atlasmix.training.scgpt.model import load_scgpt
    from atlasmix.training.scgpt.pretrain import embed_cells, train_scgpt

    store, path = mix
    out = tmp_path / "run"
    r = run_cli("train", "scgpt", "--store", store.uri, "--mixture", path, "--out", out, "--preset", "tiny",
                "--max-len", "64", "--batch-size", "16", "--group-batches", "4", "--warmup-steps", "2", "--lr", "3e-2",
                "--log-every", "5", "--checkpoint-every", "10", "--accelerator", "cpu", "--io-batch-size", "512",
                "--max-steps", "20", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    side = json.loads(path.with_suffix(".json").read_text())
    assert run["manifest"]["sha256"] == side["manifest"]["sha256"] and run["steps"] == 20
    assert run["config"]["n_layers"] == 2 and run["config"]["d_model"] == 32 and run["options"]["mask_ratio"] == 0.4
    curve = pd.read_csv(out / "training_curve.csv")
    assert len(curve) == 4 and curve["loss"].iloc[-1] < 0.5 * curve["loss"].iloc[0]  # masked-value MSE falls
    model, cfg = load_scgpt(out)
    assert cfg["n_bins"] == 51 and cfg["max_len"] == 64 and cfg["manifest_sha256"] == side["manifest"]["sha256"]
    # in process: 5 more steps from the checkpoint; a second fresh run into the same folder is refused
    from atlasmix.errors import AtlasmixError

    run2 = train_scgpt(store, path, out, max_steps=25, resume=True, **KW)
    assert run2["steps"] == 25 and run2["resumed"]
    assert list(pd.read_csv(out / "training_curve.csv")["step"]) == [5, 10, 15, 20, 25]
    with pytest.raises(AtlasmixError, match="not empty"):
        train_scgpt(store, path, out, max_steps=5, **KW)

    # embeddings: CLI == direct == the reloaded model's <cls> output on the encoded cells
    names = sorted(set(store.catalog()["dataset_id"]))
    r = run_cli("scgpt", "embed", "--model", out, "--store", store.uri, "--where", f"dataset_id = '{names[0]}'",
                "--out", tmp_path / "emb.parquet", "--accelerator", "cpu", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    emb = pd.read_parquet(tmp_path / "emb.parquet")
    E = emb.filter(like="emb_").to_numpy()
    assert E.shape[1] == 32 and np.isfinite(E[emb["n_tokens"] > 0]).all() and (emb["n_tokens"] > 0).mean() > 0.9
    ids = emb["soma_joinid"].to_numpy()[:4]
    one = embed_cells(out, store, ids, device="cpu")
    np.testing.assert_allclose(one.filter(like="emb_").to_numpy(), E[:4], rtol=1e-4, atol=1e-5)
    from atlasmix.training.loader import MixtureLoader
    from atlasmix.training.scgpt.encoding import ScGPTEncoder, load_vocab, vocabulary_axis
    from atlasmix.training.scgpt.pretrain import ScGPTStream

    model, cfg = load_scgpt(out)
    vocab = load_vocab(out / "model" / "vocab.json")
    axis = vocabulary_axis(store, vocab)
    L = MixtureLoader(store, ids, var_joinids=axis["var_joinids"], batch_size=4, shuffle=False, obs_columns=(),
                      sparse=True)
    b = next(iter(ScGPTStream(L, ScGPTEncoder(axis, vocab, max_len=64), group_by_length=False)))
    with torch.no_grad():
        h = model.encode(b["genes"], b["values"])
    np.testing.assert_allclose(h[:, 0].numpy(), one.filter(like="emb_").to_numpy(), rtol=1e-4, atol=1e-5)
    r = run_cli("scgpt", "embed", "--model", tmp_path, "--store", store.uri, "--where", "dataset_id = 'x'",
                "--out", tmp_path / "e2.parquet", env=ONE_THREAD)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


def test_stopped_and_resumed_equals_uninterrupted(mix, tmp_path):
    from atlasmix.training.scgpt.model import load_scgpt
    from atlasmix.training.scgpt.pretrain import train_scgpt

    store, path = mix
    kw = {**KW, "checkpoint_every": 0}
    train_scgpt(store, path, tmp_path / "a", max_steps=12, **kw)
    train_scgpt(store, path, tmp_path / "b", max_steps=12, stop_after=7, **kw)  # stopped mid-epoch
    part = load_scgpt(tmp_path / "b")[0].state_dict()
    run = train_scgpt(store, path, tmp_path / "b", max_steps=12, resume=True, **kw)
    assert run["steps"] == 12
    a, b = load_scgpt(tmp_path / "a")[0].state_dict(), load_scgpt(tmp_path / "b")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], part[k]) for k in a)


def test_resume_with_other_settings_is_refused(mix, tmp_path):
    from atlasmix.errors import AtlasmixError
    from atlasmix.training.scgpt.pretrain import train_scgpt

    store, path = mix
    kw = {**KW, "checkpoint_every": 0}
    train_scgpt(store, path, tmp_path / "r", max_steps=4, stop_after=2, **kw)
    with pytest.raises(AtlasmixError, match="other settings.*n_layers 2 -> 3"):
        train_scgpt(store, path, tmp_path / "r", max_steps=4, resume=True, config_overrides={"n_layers": 3}, **kw)
    with pytest.raises(AtlasmixError, match="not a multiple of n_heads"):
        train_scgpt(store, path, tmp_path / "x", max_steps=4, config_overrides={"d_model": 33}, **kw)


def test_masked_prediction_baseline_leaves_the_scored_cell_out():
    """The per-gene mean baseline of a cell comes from the *other* sampled cells; genes only the cell
    itself holds are not scored (a baseline holding the answer would beat every model)."""
    import scipy.sparse as sp

    from atlasmix.evaluation.pretrained_outputs import cell_keys, masked_prediction_outputs

    truth = np.array([[1.0, 2.0, 3.0, 4.0, 9.0], [2.0, 4.0, 6.0, 8.0, 0.0], [3.0, 5.0, 7.0, 1.0, 0.0]])

    class Model:  # gene k at position k; every gene masked; the prediction is the truth itself
        kind, feature_ids = "scgpt", np.array(["g0", "g1", "g2", "g3", "g4"], dtype=object)

        def masked_prediction(self, counts, keys, frac, rng):
            t = truth[np.asarray(keys)]
            keys_ = np.broadcast_to(np.arange(5), t.shape)
            return keys_, t, t.copy(), t > 0

    class EvalSet:
        n_cells = 3
        obs = pd.DataFrame({"soma_joinid": [0, 1, 2]})

        def iter_counts(self, fids, batch_size):
            yield slice(0, 3), sp.csr_matrix(np.ones((3, 5)))

    out = masked_prediction_outputs(Model(), EvalSet(), max_cells=None)
    np.testing.assert_allclose(out["pred"], 1.0)
    # cell 0: gene 4 (9.0) only it holds -> left out; leave-one-out means of genes 0..3 from cells 1, 2
    base0 = np.array([2.5, 4.5, 6.5, 4.5])
    np.testing.assert_allclose(out["baseline"][0], np.corrcoef(base0, truth[0, :4])[0, 1])
    ev = EvalSet()
    ev.obs = pd.DataFrame({"soma_joinid": [-1, -1, -1]})  # a file set: no joinids, keys are positions
    assert cell_keys(ev).tolist() == [0, 1, 2] and cell_keys(EvalSet()).tolist() == [0, 1, 2]


def test_a_split_with_no_training_batch_is_an_error_not_an_endless_loop(mix, tmp_path):
    """A vocabulary of genes no training cell expresses: every cell is dropped as empty, so no pass
    over the split gives a training batch. A step budget used to loop forever and an epoch budget
    to "train" 0 steps; both are one AtlasmixError."""
    import scipy.sparse as sp

    from atlasmix.errors import AtlasmixError
    from atlasmix.mixing import read_manifest
    from atlasmix.training.scgpt.pretrain import train_scgpt

    store, path = mix
    table, _ = read_manifest(path, store=store)
    ids = np.unique(table["soma_joinid"].to_numpy())
    used = np.asarray(sp.vstack([m for _, m in store.iter_X(ids)]).sum(axis=0)).ravel() > 0
    var = store.var()
    silent = sorted(set(var["feature_name"].astype(str)[~used]) - set(var["feature_name"].astype(str)[used]))[:3]
    assert len(silent) == 3
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({g: i for i, g in enumerate(silent)}))
    for budget in ({"max_steps": 5}, {"epochs": 2}):
        with pytest.raises(AtlasmixError, match="no training batch"):
            train_scgpt(store, path, tmp_path / str(budget), vocab=vocab, **{**KW, "checkpoint_every": 0}, **budget)


def test_stream_length_and_state_follow_its_batch_split(mix):
    """len() counts the epoch's last, shorter megabatch as it is split (the learning-rate schedule of
    an epoch budget is sized from it), and a state saved with another split of the megabatches is
    refused instead of resuming at the wrong place."""
    from atlasmix.errors import AtlasmixError
    from atlasmix.training.stream import EncodedStream, train_loader

    store, path = mix

    class Rows(EncodedStream):  # one token per cell: every cell kept, only the batching is tested
        n_special = 0
        thread_name = "test-stream"

        def encode(self, b):
            n = int(b["soma_joinid"].shape[0])
            return {"row": np.arange(n)[:, None]}, np.ones(n, dtype=np.int64)

    def stream(batch_size, group_batches):
        L = train_loader(store, path, store.var().index.to_numpy()[:100], batch_size=batch_size,
                         group_batches=group_batches, io_batch_size=512, block_size=64, seed=0)
        return Rows(L, batch_size=batch_size)

    s = stream(16, 4)
    assert s.loader.shard_size % s.loader.batch_size  # (the last megabatch is short here)
    assert len(s) == sum(1 for _ in s)  # every batch counted, no more
    st = s.state_dict()
    with pytest.raises(AtlasmixError, match="batch_size"):
        stream(32, 2).load_state_dict(st)
