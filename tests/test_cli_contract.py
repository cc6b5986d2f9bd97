"""The command line's promises: one error line (never a traceback), one vocabulary for every model,
a gene axis that always works, and training that survives ``kill -9``.

Runs on a small simulated store (no ../shared/data): two datasets whose gene panels do not overlap,
so that the default gene axis (genes measured in every dataset) is empty.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pytest

from atlasmix.cli import main
from atlasmix.errors import AtlasmixError
from atlasmix.mixing.genes import GeneAxis
from tests.conftest import ROOT, run_cli

LDVAE_SMALL = ["--n-hidden", "16", "--n-layers", "1", "--batch-size", "64", "--io-batch-size", "512",
               "--no-progress", "--accelerator", "cpu"]
GF_TINY = ["--preset", "tiny", "--mode", "v1", "--max-len", "256", "--batch-size", "8", "--group-batches", "2",
           "--io-batch-size", "256", "--lr", "1e-3", "--warmup-steps", "2", "--accelerator", "cpu", "--no-bf16"]


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errs) == 1, r.stderr
    return errs[0]


@pytest.fixture(scope="module")
def panels(tmp_path_factory):
    """A store of two simulated datasets (blood_a, malignant) measuring disjoint halves of 600 genes,
    and manifests: ``both`` (cells of both), ``blood`` (blood_a only)."""
    from atlasmix.ingest import DatasetRequest, ingest
    from atlasmix.mixing import loads_spec, resolve, write_manifest
    from atlasmix.simulate import simulate_atlas
    from atlasmix.store import Store

    d = tmp_path_factory.mktemp("panels")
    info = simulate_atlas(d / "sim", 2400, sources="blood_a,malignant", seed=3, n_genes=600)
    files = {p.stem: p for p in (d / "sim").glob("*.h5ad")}
    assert set(files) == {"blood_a", "malignant"}, info
    reqs = []
    for i, (name, f) in enumerate(sorted(files.items())):
        a = ad.read_h5ad(f)
        half = a.n_vars // 2
        a = a[:, :half] if i == 0 else a[:, half:]
        out = d / f"{name}_panel.h5ad"
        a.copy().write_h5ad(out)
        reqs.append(DatasetRequest(dataset_id=name, source=str(out)))
    store = Store.create(str(d / "store"))
    ingest(store, reqs, chunk_size=1000)
    paths = {}
    for key, where in {"both": "qc_pass", "blood": "dataset_id = 'blood_a' AND qc_pass"}.items():
        spec = loads_spec(f'name = "{key}"\nseed = 0\nvalidation_fraction = 0.1\n[[components]]\nname = "c"\n'
                          f'where = "{where}"\n', f"{key}.toml")
        paths[key] = d / f"{key}.parquet"
        write_manifest(resolve(spec, store), paths[key])
    return store, paths


# ------------------------------------------------------------------------------------------ one error line
def test_unexpected_exception_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys, tmp_path):
    from atlasmix.store import Store

    def broken(self):
        raise KeyError("soma_joinid")

    Store.create(str(tmp_path / "s"))
    monkeypatch.setattr(Store, "info", broken)
    with pytest.raises(SystemExit) as e:
        main(["store", "info", str(tmp_path / "s")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: 'soma_joinid' (KeyError); rerun with --debug for the traceback"]
    with pytest.raises(KeyError):  # --debug anywhere lets the exception (and its traceback) through
        main(["store", "--debug", "info", str(tmp_path / "s")])


def test_user_errors_stay_one_line_and_debug_raises_them(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["store", "info", str(tmp_path / "nothing")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--debug" not in err[0]
    with pytest.raises(AtlasmixError):
        main(["--debug", "store", "info", str(tmp_path / "nothing")])


def test_unexpected_exception_in_a_subprocess_prints_no_traceback(tmp_path):
    """A failure deep inside a library (here: a manifest parquet that is not parquet) reaches the user as
    one line naming the exception type."""
    bad = tmp_path / "m.parquet"
    bad.write_bytes(b"not a parquet file")
    (tmp_path / "m.json").write_text("{}")
    r = run_cli("mix", "show", bad)
    line = _one_error_line(r)
    assert line.startswith("error: ")
    r = run_cli("mix", "show", bad, "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_usage_errors_are_clicks_message_not_a_traceback():
    """typer 0.2x raises its own copy of click's exceptions; they must still print as usage errors."""
    for args, msg in [(["store", "info"], "Missing argument"), (["--version"], "No such option"),
                      (["train", "ldvae", "--no-such-flag"], "No such option")]:
        r = run_cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert msg in r.stderr


# ------------------------------------------------------------------------------------------ one vocabulary
@pytest.mark.parametrize("cmd", [["train", "ldvae"], ["train", "geneformer"], ["geneformer", "embed"],
                                 ["eval", "run"], ["study", "run"]])
def test_every_model_command_takes_accelerator_and_not_device(cmd):
    r = run_cli(*cmd, "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "--accelerator" in r.stdout
    assert "--device " not in r.stdout  # the old spelling is a hidden alias at most
    if cmd[0] == "train":
        assert "--devices" in r.stdout


def test_bad_devices_or_strategy_is_one_line(panels, tmp_path):
    store, paths = panels
    r = run_cli("train", "ldvae", "--store", store.uri, "--mixture", paths["blood"], "--out", tmp_path / "o",
                "--devices", "0", *LDVAE_SMALL)
    assert "--devices must be >= 1" in _one_error_line(r)
    r = run_cli("train", "ldvae", "--store", store.uri, "--mixture", paths["blood"], "--out", tmp_path / "o",
                "--devices", "2", "--strategy", "ddp_spawn", *LDVAE_SMALL)
    assert "--strategy must be" in _one_error_line(r)
    r = run_cli("train", "geneformer", "--store", store.uri, "--mixture", paths["blood"], "--out", tmp_path / "g",
                "--devices", "2", "--accelerator", "cpu")
    assert "torchrun" in _one_error_line(r)
    r = run_cli("train", "geneformer", "--store", store.uri, "--mixture", paths["blood"], "--out", tmp_path / "g",
                "--accelerator", "tpu")
    assert "--accelerator 'tpu'" in _one_error_line(r)
    for flag, value, msg in [("--max-steps", "0", "--max-steps must be >= 1"), ("--lr", "0", "learning rate")]:
        r = run_cli("train", "geneformer", "--store", store.uri, "--mixture", paths["blood"], "--out",
                    tmp_path / f"g{flag}", flag, value, "--accelerator", "cpu")
        assert msg in _one_error_line(r)


# ------------------------------------------------------------------------------------------ the gene axis
def test_gene_axis_rules_parse_and_refuse(tmp_path):
    assert GeneAxis.parse(None).kind == "all-shared"
    assert GeneAxis.parse("all-shared").kind == "all-shared"
    a = GeneAxis.parse("hvg:500")
    assert (a.kind, a.n_hvg, a.min_dataset_fraction) == ("hvg", 500, 0.5)
    a = GeneAxis.parse("hvg:20,min-datasets=0.25")
    assert (a.n_hvg, a.min_dataset_fraction, a.describe()) == (20, 0.25, "hvg:20,min-datasets=0.25")
    f = tmp_path / "g.txt"
    f.write_text("CD3E\n")
    assert GeneAxis.parse(str(f)).kind == "file"
    for bad in ["hvg:", "hvg:10,min-datasets=2", "hvg:0", "hvg:ten", "no_such_file.txt"]:
        with pytest.raises(AtlasmixError):
            GeneAxis.parse(bad)


@pytest.mark.slow
def test_disjoint_panels_train_on_an_hvg_axis_not_the_empty_default(panels, tmp_path):
    store, paths = panels
    r = run_cli("train", "ldvae", "--store", store.uri, "--mixture", paths["both"], "--out", tmp_path / "default",
                "--budget", "steps=3", *LDVAE_SMALL)
    line = _one_error_line(r)
    assert "no gene in common" in line and "--genes hvg:" in line
    out = tmp_path / "hvg"
    r = run_cli("train", "ldvae", "--store", store.uri, "--mixture", paths["both"], "--out", out,
                "--budget", "steps=3", "--genes", "hvg:80,min-datasets=0.5", *LDVAE_SMALL)
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["n_genes"] == 80
    # the axis draws from both panels' genes (each is measured in 1 of 2 datasets = 0.5)
    import pandas as pd

    load = pd.read_parquet(out / "loadings.parquet")
    pres = store.presence().toarray().astype(bool)
    var = store.var()
    jid = var.reset_index().set_index("feature_id").loc[load.index, "soma_joinid"].to_numpy()
    assert pres[:, jid].sum(axis=1).min() > 0
    # a stricter rule keeps no gene and says which knob to turn
    r = run_cli("train", "ldvae", "--store", store.uri, "--mixture", paths["both"], "--out", tmp_path / "strict",
                "--budget", "steps=3", "--genes", "hvg:80,min-datasets=1", *LDVAE_SMALL)
    assert "min-datasets" in _one_error_line(r)


@pytest.mark.slow
def test_geneformer_medians_follow_the_gene_axis(panels, tmp_path):
    store, paths = panels
    r = run_cli("geneformer", "medians", "--store", store.uri, "--mixture", paths["both"], "--out", tmp_path / "m",
                "--genes", "hvg:40")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["n_genes"] == 40
    r = run_cli("geneformer", "medians", "--store", store.uri, "--mixture", paths["both"], "--out", tmp_path / "m2",
                "--genes", "all-shared")
    assert "no gene in common" in _one_error_line(r)


def test_an_error_inside_ldvae_training_is_not_masked(panels, tmp_path):
    """scvi's checkpoint callback used to replace any training error by an AttributeError of its own."""
    from lightning.pytorch.callbacks import Callback

    from atlasmix.training.ldvae import train_ldvae

    class Boom(Callback):
        def on_train_batch_end(self, *a, **k):
            raise RuntimeError("boom at the first step")

    store, paths = panels
    with pytest.raises(RuntimeError, match="boom at the first step"):
        train_ldvae(store, paths["blood"], tmp_path / "o", budget="steps=3", n_hidden=16, n_layers=1,
                    batch_size=64, checkpoint_every=1, progress=False, accelerator="cpu", callbacks=[Boom()])
    r = run_cli("train", "ldvae", "--store", store.uri, "--mixture", paths["blood"], "--out", tmp_path / "lr",
                "--lr", "-1", *LDVAE_SMALL)
    assert "learning rate must be > 0" in _one_error_line(r)


# ------------------------------------------------------------------------------------------ kill -9, resume
def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "atlasmix.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fail if it ended first (nothing was interrupted)."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"run ended before it could be killed: {proc.communicate()[1][-2000:]}"
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    assert proc.poll() is None, "run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_ldvae_killed_mid_run_resumes_to_the_uninterrupted_weights(panels, tmp_path):
    import torch

    store, paths = panels
    args = ["train", "ldvae", "--store", store.uri, "--mixture", paths["blood"], "--budget", "epochs=4",
            "--checkpoint-every", "1", "--seed", "5", *LDVAE_SMALL]
    r = run_cli(*args, "--out", tmp_path / "full")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed"
    p = _start([*args, "--out", out])
    _kill_when(p, lambda: (out / "checkpoints" / "epoch0000.ckpt").is_file())
    assert not (out / "model").exists()
    # the kill may land before or after Lightning copies epoch0000.ckpt to last.ckpt; take the
    # "before" case always: resume must then start from the newest epoch checkpoint
    (out / "checkpoints" / "last.ckpt").unlink(missing_ok=True)
    r = run_cli(*args, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / "full" / "model" / "model.pt", weights_only=False)["model_state_dict"]
    b = torch.load(out / "model" / "model.pt", weights_only=False)["model_state_dict"]
    assert a.keys() == b.keys()
    for k in a:  # exactly equal (nested dicts of tensors too)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert json.loads((out / "run.json").read_text())["resumed"] is True


@pytest.mark.slow
def test_geneformer_killed_mid_epoch_resumes_to_the_uninterrupted_weights(panels, tmp_path):
    from transformers import BertForMaskedLM

    store, paths = panels
    args = ["train", "geneformer", "--store", store.uri, "--mixture", paths["blood"], "--max-steps", "16",
            "--checkpoint-every", "4", "--log-every", "2", "--seed", "7", *GF_TINY]
    r = run_cli(*args, "--out", tmp_path / "full")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed"
    p = _start([*args, "--out", out])
    _kill_when(p, lambda: (out / "checkpoints" / "last.pt").is_file())
    assert not (out / "model" / "config.json").exists()
    r = run_cli(*args, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    a = BertForMaskedLM.from_pretrained(tmp_path / "full" / "model").state_dict()
    b = BertForMaskedLM.from_pretrained(out / "model").state_dict()
    for k in a:
        assert np.array_equal(a[k].numpy(), b[k].numpy()), k


@pytest.mark.slow
def test_geneformer_torchrun_two_ranks_killed_resumes_to_the_uninterrupted_weights(panels, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo, CPU): the gene medians the ranks compute together equal
    the single-process medians, and a 2-rank run killed after a checkpoint (both processes) and
    resumed on 2 ranks ends with the weights of an uninterrupted 2-rank run."""
    from transformers import BertForMaskedLM

    from atlasmix.training.geneformer.dictionaries import load_dictionaries
    from atlasmix.training.geneformer.medians import gene_medians, species_genes

    store, paths = panels
    args = ["train", "geneformer", "--store", store.uri, "--mixture", paths["blood"], "--max-steps", "12",
            "--checkpoint-every", "4", "--log-every", "2", "--seed", "5", *GF_TINY]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")

    def torchrun(out, *extra) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "atlasmix.cli", *map(str, args), "--out", str(out),
                                 *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # its own process group: killed as a whole below

    p = torchrun(tmp_path / "full")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    run = json.loads((tmp_path / "full" / "run.json").read_text())
    assert run["options"]["world_size"] == 2 and run["steps"] == 12
    assert run["medians"]["ranks"] == 2 and run["medians"]["passes"] == 2

    # medians: computed once by both ranks (each a contiguous half of the cells) = one process's
    d = load_dictionaries(tmp_path / "full" / "dictionaries")
    med = gene_medians(store, paths["blood"], "train", species_genes(store, "human"))
    med = med[med["n_nonzero"] > 0]
    assert len(med) > 100 and d.median == dict(zip(med["feature_id"], med["median"]))

    out = tmp_path / "killed"
    p = torchrun(out)
    t0 = time.time()
    while not (out / "checkpoints" / "last.pt").is_file():
        assert p.poll() is None, f"run ended before it could be killed: {p.communicate()[1][-2000:]}"
        assert time.time() - t0 < 300
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # torchrun and both ranks
    p.wait()
    assert not (out / "model" / "config.json").exists()
    p = torchrun(out, "--resume")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    a = BertForMaskedLM.from_pretrained(tmp_path / "full" / "model").state_dict()
    b = BertForMaskedLM.from_pretrained(out / "model").state_dict()
    for k in a:
        assert np.array_equal(a[k].numpy(), b[k].numpy()), k
    assert json.loads((out / "run.json").read_text())["resumed"] is True
