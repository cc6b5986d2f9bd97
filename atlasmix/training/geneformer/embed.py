"""Cell embeddings of a Geneformer model for cells of the store.

As Geneformer's zero-shot evaluations (``EmbExtractor`` with ``emb_layer=-1``): the cell
embedding is the mean, over the cell's gene tokens (not ``<pad>``, ``<cls>``, ``<eos>``), of the
hidden states of the second-to-last layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from atlasmix.training.geneformer.tokenizer import GeneformerStream, vocabulary_axis
from atlasmix.training.stream import cells_to_embed, embedding_loader, embedding_table


def embed_cells(model_path: str | Path, store, joinids: np.ndarray, *, batch_size: int = 64,
                device: str = "auto", io_batch_size: int = 4096, obs_columns=("dataset_id", "cell_type")) -> pd.DataFrame:
    """Embeddings of cells streamed from the store (rank value encoded on the fly).

    Parameters
    ----------
    model_path : path
        ``atlasmix train geneformer`` output (``OUT`` or ``OUT/model``) or any Geneformer model folder
        holding ``config.json`` and the two dictionaries.
    store : atlasmix.store.Store
    joinids : numpy.ndarray of int64
        Cells to embed.
    batch_size : int
        Cells per forward pass.
    device : str
        ``auto``, ``cpu``, ``cuda``.
    obs_columns : sequence of str
        obs columns copied into the result.

    Returns
    -------
    pandas.DataFrame
        Index ``soma_joinid`` (sorted); ``obs_columns``; ``n_tokens``; ``emb_0..emb_{H-1}`` float32.
        Cells without any vocabulary gene get ``n_tokens = 0`` and NaN embeddings.

    Raises
    ------
    AtlasmixError
        No cells, or no vocabulary gene in the store.
    """
    from atlasmix.training.geneformer.pretrain import load_model
    from atlasmix.training.pretrain_loop import device_of

    joinids = cells_to_embed(joinids)
    model, dicts, meta = load_model(model_path)
    dev = device_of(device)
    model.to(dev)
    axis = vocabulary_axis(store, dicts)
    loader = embedding_loader(store, joinids, axis["var_joinids"], batch_size=batch_size, io_batch_size=io_batch_size,
                              library="total_counts")
    stream = GeneformerStream(loader, axis, dicts, mode=meta["mode"], max_len=int(meta["max_len"]),
                              batch_size=batch_size, group_by_length=False, drop_empty=True)
    special = torch.tensor(dicts.special_ids)
    H = int(model.config.hidden_size)
    embs, ids, ntok = [], [], []
    with torch.inference_mode():
        for b in stream:
            x = b["input_ids"].to(dev)
            att = b["attention_mask"].to(dev)
            hs = model.bert(input_ids=x, attention_mask=att, output_hidden_states=True).hidden_states[-2]
            keep = (att.bool() & ~torch.isin(x, special.to(dev))).unsqueeze(-1).to(hs.dtype)
            e = (hs * keep).sum(1) / keep.sum(1).clamp(min=1)
            embs.append(e.float().cpu().numpy())
            ids.append(b["soma_joinid"].numpy())
            ntok.append(keep.sum((1, 2)).cpu().numpy().astype(np.int64))
    return embedding_table(store, joinids, ids, embs, ntok, H, obs_columns)
