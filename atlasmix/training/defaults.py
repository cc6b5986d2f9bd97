"""LDVAE defaults of the scFM-datamix study, kept free of torch so that the CLI starts fast.

scvi-tools ``LinearSCVI`` with n_latent=10, n_layers=2, n_hidden=128, negative-binomial likelihood,
gene-wise dispersion, learning rate 5e-3, 250 epochs, no early stopping (scFM-datamix; scvi-tools'
own default minibatch of 128 cells and encoder dropout 0.1).
"""

from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, Any] = {"n_latent": 10, "n_layers": 2, "n_hidden": 128, "dropout_rate": 0.1,
                            "gene_likelihood": "nb", "dispersion": "gene", "lr": 5e-3, "max_epochs": 250,
                            "batch_size": 128, "early_stopping": False}

#: Lightning's accelerator names (``--accelerator``), shared by every command that runs a model.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


def torch_device_name(accelerator: str, legacy_device: str | None = None) -> str:
    """The torch device string for a Lightning-style ``--accelerator`` value.

    Parameters
    ----------
    accelerator : str
        ``auto`` (CUDA when present), ``cpu``, ``gpu`` or ``cuda`` (also ``cuda:N``).
    legacy_device : str, optional
        The value of the old ``--device`` spelling (kept as a hidden alias); wins when given.

    Returns
    -------
    str
        ``"auto"``, ``"cpu"`` or ``"cuda"``/``"cuda:N"``.

    Raises
    ------
    atlasmix.errors.AtlasmixError
        An unknown accelerator.
    """
    value = (legacy_device or accelerator).strip().lower()
    if value == "gpu":
        return "cuda"
    if value in ("auto", "cpu", "cuda") or value.startswith("cuda:"):
        return value
    from atlasmix.errors import AtlasmixError

    raise AtlasmixError(f"--accelerator {value!r}: expected one of {', '.join(ACCELERATORS)}")
