"""GPU-ready switches, checked on a CPU: bf16 autocast through every method, fp16 refused
without CUDA, TF32 flags only on CUDA, pinned memory and non-blocking copies only for CUDA,
and `train.compile` keeping the IntentModel and its checkpoint keys."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from amess.config import Config
from amess.data.batch import Batch
from amess.models import METHODS, IntentModel
from amess.training.data import make_loader
from amess.training.distributed import make_accelerator, prepare_model, set_tf32
from amess.training.loop import make_optimizer, train_step
from amess.training.runner import setup_seed


@pytest.fixture(scope="module")
def pooled_encoder_dir(tmp_path_factory):
    """A random 2-layer BERT (hidden 32) *with* a pooler (MAG-BERT, TCL-MAP, SDIF-DA ask for it)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from amess.models.encoders import resolve_encoder_path

    d = tmp_path_factory.mktemp("tiny_bert_pooled")
    tok = AutoTokenizer.from_pretrained(resolve_encoder_path("packaged:minilm"))
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=128)
    BertModel(cfg, add_pooling_layer=True).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def short_synth_dir(tmp_path_factory):
    """A small synthetic MIntRec dataset with short streams (bf16 is emulated on most CPUs)."""
    from amess.data.synth import generate

    d = tmp_path_factory.mktemp("synth_short")
    generate(d, seed=0, size=80, video_len=(2, 6), audio_len=(3, 8))
    return d


def _cfg(data_dir, encoder, method: str, **extra) -> Config:
    return Config().override({"data.data_dir": str(data_dir), "model.method": method,
                              "model.text_encoder": str(encoder), "train.batch_size": 4,
                              "train.progress": False, "data.test_splits": [], **extra})


@pytest.mark.parametrize("method", sorted(m for m in METHODS if m in
                                          ("text", "amess", "mag_bert", "mult", "misa", "tcl_map", "sdif_da")))
def test_every_method_trains_and_predicts_under_bf16_autocast_on_a_cpu(method, short_synth_dir,
                                                                       pooled_encoder_dir):
    overrides = {"mag_bert": {"mag_bert.align": "ctc"},  # the aligner with an LSTM
                 "sdif_da": {"sdif_da.cross_heads": 2, "sdif_da.self_heads": 2},
                 "mult": {"mult.dst_feature_dims": 8, "mult.nheads": 2, "mult.n_levels": 1},
                 "misa": {"misa.hidden_size": 16, "misa.rnn_hidden": 8}}.get(method, {})
    cfg = _cfg(short_synth_dir, pooled_encoder_dir, method, **{"train.precision": "bf16", **overrides})
    acc = make_accelerator(cfg)
    assert acc.mixed_precision == "bf16"
    data, model, collator, _ = setup_seed(cfg, 0)
    opt, sched = make_optimizer(cfg, model, 10)
    model = prepare_model(model, acc)
    loader = make_loader(data.train, cfg, collator, shuffle=True, seed=0, batch_size=4, device=acc.device)
    it = iter(loader)
    for _ in range(2):
        loss = train_step(cfg, model, next(it), opt, sched, acc, len(data.label_names))
        assert torch.isfinite(torch.tensor(loss))
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    model.eval()
    batch = next(it)
    inner = acc.unwrap_model(model)
    with torch.no_grad(), acc.autocast():
        out = model(batch)
        scores = inner.predict_scores(out).float()
        inner.decision_logits(out)
    assert scores.shape == (len(batch), len(data.label_names)) and torch.isfinite(scores).all()
    if method == "text":  # autocast really acted: the head ran in bf16
        assert out.logits.dtype == torch.bfloat16


def test_fp16_is_refused_on_a_cpu_with_a_clear_error(short_synth_dir, pooled_encoder_dir):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: fp16 is allowed")
    cfg = _cfg(short_synth_dir, pooled_encoder_dir, "text", **{"train.precision": "fp16"})
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU.*bf16"):
        make_accelerator(cfg)
    assert make_accelerator(cfg, training=False).mixed_precision == "no"  # evaluation runs in fp32


def test_tf32_and_compile_settings_are_validated():
    assert Config().train.tf32 is True and Config().train.compile is False
    for key in ("train.tf32", "train.compile"):
        with pytest.raises(ValueError, match=key):
            Config().override({key: "3"})
        assert getattr(Config().override({key: "false"}).train, key.split(".")[1]) is False


def test_compile_is_result_neutral_for_run_folders():
    from amess.training.runner import comparable

    assert comparable(Config()) == comparable(Config().override({"train.compile": True}))
    assert comparable(Config()) != comparable(Config().override({"train.tf32": False}))


def test_tf32_flags_are_set_on_cuda_only(monkeypatch, short_synth_dir, pooled_encoder_dir):
    calls = []
    monkeypatch.setattr("amess.training.distributed.set_tf32", calls.append)
    make_accelerator(_cfg(short_synth_dir, pooled_encoder_dir, "text"))
    assert calls == ([True] if torch.cuda.is_available() else [])
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        torch.get_float32_matmul_precision()  # still readable (no mix of torch's two TF32 APIs)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_pinned_memory_and_non_blocking_copies_only_for_cuda(monkeypatch, short_synth_dir, pooled_encoder_dir):
    cfg = _cfg(short_synth_dir, pooled_encoder_dir, "amess")
    data, _, collator, _ = setup_seed(cfg, 0)
    for device, pin in ((None, False), ("cpu", False), (torch.device("cpu"), False), ("cuda", True),
                        (torch.device("cuda", 0), True)):
        assert make_loader(data.train, cfg, collator, shuffle=False, seed=0, batch_size=4,
                           device=device).pin_memory is pin
    batch = collator([data.train.samples[i] for i in range(3)])
    batch.extras["extra"] = torch.ones(3)
    seen = []

    def fake_to(self, *args, **kwargs):
        seen.append(kwargs.get("non_blocking"))
        return self

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    batch.to("cuda")
    n = len(seen)
    assert n >= 5 and all(seen)  # every tensor, extras included
    batch.to("cpu")
    assert seen[n:] and not any(seen[n:])
    batch.to("cuda", non_blocking=False)
    assert not any(seen[2 * n:])
    monkeypatch.undo()
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    pinned = batch.pin_memory()  # what the DataLoader calls on each batch with pin_memory=True
    assert isinstance(pinned, Batch) and pinned.ids == batch.ids and pinned.input_ids is not batch.input_ids
    assert torch.equal(pinned.input_ids, batch.input_ids) and torch.equal(pinned.extras["extra"], batch.extras["extra"])
    from torch.utils.data._utils.pin_memory import pin_memory

    assert isinstance(pin_memory(batch), Batch)


def _eager_compile(monkeypatch):
    """torch.compile with dynamo's graph capture but no code generation: the same module
    wrapping and tracing as inductor, in seconds on a CPU."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()


def test_compiled_model_keeps_the_intent_model_and_its_state_dict_keys(monkeypatch, short_synth_dir,
                                                                        pooled_encoder_dir):
    _eager_compile(monkeypatch)
    cfg = _cfg(short_synth_dir, pooled_encoder_dir, "amess", **{"train.compile": True})
    acc = make_accelerator(cfg)
    data, model, collator, _ = setup_seed(cfg, 0)
    keys = list(model.state_dict())
    opt, sched = make_optimizer(cfg, model, 10)
    model = prepare_model(model, acc, compile=cfg.train.compile)
    assert model._compiled_call_impl is not None  # the forward is compiled
    inner = acc.unwrap_model(model)
    assert isinstance(inner, IntentModel) and inner is model
    assert list(inner.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    loader = make_loader(data.train, cfg, collator, shuffle=True, seed=0, batch_size=4, device=acc.device)
    it = iter(loader)
    loss = train_step(cfg, model, next(it), opt, sched, acc, len(data.label_names))
    assert torch.isfinite(torch.tensor(loss))
    torch._dynamo.reset()


def test_compiled_training_run_writes_loadable_checkpoints(monkeypatch, tmp_path, short_synth_dir,
                                                           pooled_encoder_dir):
    from amess.cli import main

    _eager_compile(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(short_synth_dir), "--method", "text", "--text-encoder",
                 str(pooled_encoder_dir), "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--compile",
                 "--no-progress", "--set", "train.plots=false", "--out", str(out)]) == 0
    assert json.loads((out / "seed_0" / "metrics.json").read_text())["steps"] == 2
    state = torch.load(out / "seed_0" / "model.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in state)
    import amess

    p = amess.load_run(out)  # a fresh, uncompiled model loads the checkpoint
    assert p.config.train.compile is True
    assert len(p.predict(["could you help me carry these?"])[0].ranked) == 20
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_training_step_on_a_cpu(short_synth_dir, pooled_encoder_dir):
    """The real torch.compile (inductor, C++ code generation on a CPU: a minute or more)."""
    torch._dynamo.reset()
    cfg = _cfg(short_synth_dir, pooled_encoder_dir, "text", **{"train.compile": True})
    acc = make_accelerator(cfg)
    data, model, collator, _ = setup_seed(cfg, 0)
    opt, sched = make_optimizer(cfg, model, 10)
    model = prepare_model(model, acc, compile=True)
    it = iter(make_loader(data.train, cfg, collator, shuffle=True, seed=0, batch_size=4, device=acc.device))
    for _ in range(2):
        assert torch.isfinite(torch.tensor(train_step(cfg, model, next(it), opt, sched, acc, len(data.label_names))))
    assert isinstance(acc.unwrap_model(model), IntentModel)
    assert not any("_orig_mod" in k for k in acc.unwrap_model(model).state_dict())
    torch._dynamo.reset()
