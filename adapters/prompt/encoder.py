"""Soft prompts: plain embeddings (prompt tuning) or reparameterised ones (P-tuning v1).

    prompt tuning:  embedding (N, hidden) ─────────────────────────────────────► prompt
    P-tuning mlp:   embedding ─► Linear ─► ReLU ─► Linear ─► ReLU ─► Linear ─────► prompt
    P-tuning lstm:  embedding ─► bi-LSTM ─► Linear ─► ReLU ─► Linear ───────────► prompt

N = num_virtual_tokens * num_transformer_submodules rows (PEFT's layout: an
encoder-decoder keeps a second block of P rows that PEFT never feeds to the
model; it is kept so checkpoints load both ways). The encoder runs over all
N rows at once (the bi-LSTM mixes them); the model receives the first P.
"""

from __future__ import annotations

import torch
from torch import nn


class PromptEncoder(nn.Module):
    """Trainable soft prompt of ``num_virtual_tokens`` embeddings.

    Args:
        num_virtual_tokens: P, the prompt length the model sees.
        total_tokens: N >= P rows kept (see the module docstring).
        hidden_size: the model's embedding width.
        kind: "none", "mlp" or "lstm".
        encoder_hidden_size: width inside the reparameterisation.
        lstm_layers: LSTM depth (``kind="lstm"``).
        dropout: dropout between LSTM layers.
    """

    def __init__(self, num_virtual_tokens: int, total_tokens: int, hidden_size: int, kind: str = "none",
                 encoder_hidden_size: int | None = None, lstm_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(total_tokens, hidden_size)
        width = encoder_hidden_size or hidden_size
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if kind == "lstm":
            self.lstm_head = nn.LSTM(hidden_size, width, num_layers=lstm_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.ReLU(), nn.Linear(2 * width, hidden_size))
        elif kind == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                          nn.Linear(width, hidden_size))

    def forward(self) -> torch.Tensor:
        """All N prompt rows, ``(N, hidden)``."""
        x = self.embedding.weight
        if self.lstm_head is not None:
            x = self.lstm_head(x.unsqueeze(0))[0][0]
        return self.mlp_head(x) if self.mlp_head is not None else x

    def prompt(self) -> torch.Tensor:
        """The rows the model receives, ``(P, hidden)``.

        Called as a module (not ``self.forward()``), so hooks on the encoder run: tensor
        parallelism's boundary hands the model a plain tensor of its replicated rows.
        """
        return self()[: self.num_virtual_tokens]

    @property
    def folded(self) -> bool:
        return self.mlp_head is None

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterisation by the embeddings it produces (outputs unchanged)."""
        if self.mlp_head is None:
            return
        rows = self.forward().detach()
        self.embedding.weight.copy_(rows)
        self.lstm_head = self.mlp_head = None

    @torch.no_grad()
    def init_from(self, word_embeddings: nn.Embedding, token_ids: torch.Tensor) -> None:
        """Start from the word embeddings of ``token_ids`` (N ids), kept in fp32."""
        self.embedding.weight.copy_(word_embeddings(token_ids.to(word_embeddings.weight.device)).float())
