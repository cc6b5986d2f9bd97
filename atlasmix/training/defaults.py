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
