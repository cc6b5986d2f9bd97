"""scGPT's transformer, built from torch components (the ``scgpt`` package pins ``scvi-tools<1.0`` and
``torchtext`` and cannot share atlasmix's environment).

Following Cui et al. 2024 (*Nature Methods* 21:1470) and scGPT's ``scgpt/model/model.py``
(``TransformerModel``):

* **input**: per token the gene embedding (``GeneEncoder``: ``nn.Embedding`` + ``LayerNorm``) plus the
  value embedding of its binned value (``ContinuousValueEncoder``: ``Linear(1, d)`` -> ReLU ->
  ``Linear(d, d)`` -> ``LayerNorm`` -> dropout, values clipped at 512), summed;
* **encoder**: ``nn.TransformerEncoder`` of post-norm layers (``d_hid`` feed-forward, ReLU, dropout),
  ``<pad>`` tokens masked out of attention;
* **gene expression prediction (GEP) head** (``ExprDecoder``): ``Linear(d, d)`` -> LeakyReLU ->
  ``Linear(d, d)`` -> LeakyReLU -> ``Linear(d, 1)`` per token;
* **cell embedding**: the ``<cls>`` token's output (``cell_emb_style="cls"``).

Not built: the GEPC / MVC head, the ECS and DAB objectives, batch tokens and domain-specific batch
norm, flash attention (scGPT's optional ``FlashMHA``); the masked-value objective is the one its
pretraining uses (:mod:`atlasmix.training.scgpt.pretrain`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atlasmix.errors import AtlasmixError

#: Model sizes. ``scgpt``: the published whole-human model (12 layers, 8 heads, 512 dims, feed-forward
#: 512, dropout 0.2: scGPT's ``args.json`` of ``scGPT_human``); ``tiny`` for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, n_heads=2, d_hid=64, n_layers=2, dropout=0.1),
    "scgpt": dict(d_model=512, n_heads=8, d_hid=512, n_layers=12, dropout=0.2),
}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class ScGPTModel(nn.Module):
    """scGPT's encoder with its GEP head (module doc).

    Parameters
    ----------
    n_tokens : int
        Vocabulary size (gene tokens and special tokens).
    pad_id : int
        The ``<pad>`` token (no gradient to its embedding, masked from attention).
    d_model, n_heads, d_hid, n_layers, dropout
        Transformer sizes (:data:`PRESETS`).
    max_value : float
        Values are clipped to this before the value encoder (scGPT: 512).
    """

    def __init__(self, n_tokens: int, pad_id: int, *, d_model: int = 512, n_heads: int = 8, d_hid: int = 512,
                 n_layers: int = 12, dropout: float = 0.2, max_value: float = 512.0):
        super().__init__()
        self.config = dict(n_tokens=int(n_tokens), pad_id=int(pad_id), d_model=int(d_model), n_heads=int(n_heads),
                           d_hid=int(d_hid), n_layers=int(n_layers), dropout=float(dropout),
                           max_value=float(max_value))
        self.gene_emb = nn.Embedding(n_tokens, d_model, padding_idx=pad_id)
        self.gene_norm = nn.LayerNorm(d_model)
        self.value_lin1 = nn.Linear(1, d_model)
        self.value_lin2 = nn.Linear(d_model, d_model)
        self.value_norm = nn.LayerNorm(d_model)
        self.value_drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_hid, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.decoder = nn.Sequential(nn.Linear(d_model, d_model), nn.LeakyReLU(), nn.Linear(d_model, d_model),
                                     nn.LeakyReLU(), nn.Linear(d_model, 1))
        self.max_value = float(max_value)
        self.pad_id = int(pad_id)

    def encode(self, genes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Token outputs, float (B, L, d_model), of gene ids int64 (B, L) and values float (B, L)."""
        g = self.gene_norm(self.gene_emb(genes))
        v = values.float().clamp(max=self.max_value).unsqueeze(-1)
        v = self.value_drop(self.value_norm(self.value_lin2(torch.relu(self.value_lin1(v)))))
        return self.encoder(g + v, src_key_padding_mask=genes.eq(self.pad_id))

    def forward(self, genes: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"gep": predicted values (B, L), "cell_emb": <cls> outputs (B, d_model)}``."""
        h = self.encode(genes, values)
        return {"gep": self.decoder(h).squeeze(-1), "cell_emb": h[:, 0, :]}

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """``config.json`` (sizes + ``extra``) and ``model.safetensors`` in folder ``path``."""
        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        (p / CONFIG_FILE).write_text(json.dumps({"model": "scgpt", **self.config, **(extra or {})}, indent=1) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(p / WEIGHTS_FILE))


def load_scgpt(path: str | Path, device: str | torch.device = "cpu") -> tuple[ScGPTModel, dict[str, Any]]:
    """A saved :class:`ScGPTModel` (eval mode) and its ``config.json``.

    Parameters
    ----------
    path : path
        The model folder, or a run folder holding ``model/``.

    Raises
    ------
    AtlasmixError
        No scGPT model there.
    """
    from safetensors.torch import load_file

    p = Path(path)
    d = next((c for c in (p / "model", p) if (c / CONFIG_FILE).is_file() and (c / WEIGHTS_FILE).is_file()), None)
    try:
        cfg = json.loads((d / CONFIG_FILE).read_text()) if d is not None else {}
    except (OSError, ValueError) as e:
        raise AtlasmixError(f"{d / CONFIG_FILE} is not readable JSON: {e}") from None
    if d is None or not isinstance(cfg, dict) or cfg.get("model") != "scgpt":
        raise AtlasmixError(f"no scGPT model (config.json + model.safetensors) in {p} or {p / 'model'}")
    keys = ("d_model", "n_heads", "d_hid", "n_layers", "dropout", "max_value")
    try:
        m = ScGPTModel(cfg["n_tokens"], cfg["pad_id"], **{k: cfg[k] for k in keys})
        m.load_state_dict(load_file(str(d / WEIGHTS_FILE)))
    except (KeyError, TypeError, RuntimeError, OSError) as e:
        raise AtlasmixError(f"the scGPT model in {d} does not load: {type(e).__name__}: {e}") from None
    m.eval()
    return m.to(device), cfg | {"folder": str(d)}
