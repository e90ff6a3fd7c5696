"""Shared fixtures: a tiny BERT saved as a local folder (the real loading path, in
milliseconds), small synthetic datasets, and the path of the real MIntRec text."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_MINTREC = REPO.parent / "shared" / "data" / "mintrec"


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A random 2-layer BERT (hidden 32) with the packaged model's uncased WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from amess.models.encoders import resolve_encoder_path

    d = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(resolve_encoder_path("packaged:minilm"))
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=128)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from amess.data.synth import generate

    d = tmp_path_factory.mktemp("synth")
    generate(d, seed=0, size=160)
    return d


@pytest.fixture()
def real_mintrec_text(tmp_path) -> Path:
    if not (SHARED_MINTREC / "train.tsv").is_file():
        pytest.skip("shared MIntRec text not present")
    d = tmp_path / "mintrec"
    d.mkdir()
    for f in ("train.tsv", "dev.tsv"):
        shutil.copy(SHARED_MINTREC / f, d / f)
    return d
