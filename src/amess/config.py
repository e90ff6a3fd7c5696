"""Run configuration: dataclasses, one docstring per field.

Configuration flows one way: dataclass defaults, then a YAML file, then command-line
flags and dotted overrides (`--set train.lr=1e-4`). Derived facts (label count, feature
sizes) come from the dataset and are passed to the model; they are never written back
here. Contradictions are rejected in `__post_init__` / `validate()`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODALITIES = ("text", "video", "audio")


@dataclass
class DataConfig:
    dataset: str = "mintrec"
    """Reader: `mintrec`, `mintrec2` or `custom` (your own labels; see `amess.data.DATASETS`)."""
    data_dir: str = ""
    """Folder holding the dataset as downloaded (the TSVs, and feature files unless text-only)."""
    modalities: list[str] = field(default_factory=lambda: ["text", "video", "audio"])
    """Streams to use. `text` is always required; a text-only run never opens feature files."""
    task: str = "intent"
    """`intent` (fine-grained labels) or `binary` (MIntRec's Emotion/Goal coarse task)."""
    text_max_len: int | None = None
    """Max text tokens including special tokens; None = the dataset's default."""
    video_max_len: int | None = None
    """Max video frames (truncation); None = the dataset's default."""
    audio_max_len: int | None = None
    """Max audio frames (truncation); None = the dataset's default."""
    video_file: str | None = None
    """Video feature file name or path relative to data_dir; None = look for the known names."""
    audio_file: str | None = None
    """Audio feature file name or path relative to data_dir; None = look for the known names."""
    train_split: str = "train"
    """Split used for training."""
    dev_split: str = "dev"
    """Split used for early stopping. `train:0.1` holds back 10% of train (stratified, seeded)."""
    test_splits: list[str] = field(default_factory=lambda: ["test"])
    """Splits evaluated at the end with the best checkpoint; missing ones are skipped with a warning."""
    num_workers: int = 0
    """DataLoader worker processes."""
    feature_store: str | None = None
    """Folder made by `amess data convert` (memory-mapped features); when set, video and audio are read
    from it instead of the pickles. A relative path is taken from the working directory if it exists
    there, else from data_dir. `auto`: convert the pickles into data_dir/amess_feature_store on first
    use (skipped while the pickles are unchanged) and read from there: features never sit in memory."""
    holdout_labels: list[str] = field(default_factory=list)
    """Intents removed from train and dev and scored at test time from their descriptions alone
    (generalised zero-shot)."""
    label_descriptions: str | None = None
    """YAML/JSON file label -> description; None = the descriptions shipped for the dataset."""
    context: bool = False
    """Multi-turn: pair each utterance with the previous utterance of the same speaker in its dialogue."""
    subset: str = "total"
    """MIntRec2.0 folder to read: total (in-scope + out-of-scope), in-scope, or out-of-scope."""

    def __post_init__(self) -> None:
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad:
            raise ValueError(f"unknown modalities {bad}; expected a subset of {list(MODALITIES)}")
        if "text" not in self.modalities:
            raise ValueError("modalities must include `text` (every method reads the utterance)")
        if self.task not in ("intent", "binary"):
            raise ValueError(f"task must be `intent` or `binary`, got {self.task!r}")


@dataclass
class ModelConfig:
    method: str = "text"
    """Method name from the registry (`amess.models.METHODS`)."""
    text_encoder: str = "packaged:minilm"
    """Hugging Face name or local folder; `packaged:minilm` is the offline all-MiniLM-L6-v2."""
    pooling: str = "cls"
    """How the encoder output is pooled: `cls` or `mean`."""
    dropout: float = 0.1
    """Dropout before the classifier head."""

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be `cls` or `mean`, got {self.pooling!r}")


@dataclass
class TrainConfig:
    seeds: list[int] = field(default_factory=lambda: [0])
    """One run per seed; summary.json reports mean and std over them."""
    epochs: int = 20
    """Maximum epochs (early stopping usually ends sooner)."""
    batch_size: int = 16
    """Per-process batch size."""
    eval_batch_size: int = 32
    """Batch size for evaluation (A-MESS attends over up to 480 audio frames per sample: larger
    batches raise peak memory more than they speed anything up on a CPU)."""
    lr: float = 1e-4
    """Learning rate of the new layers (head, fusion)."""
    encoder_lr: float | None = 5e-5
    """Learning rate of the pretrained text encoder; None = `lr`. Chosen on MIntRec dev for MiniLM."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_ratio: float = 0.1
    """Share of the total steps with a linear warm-up, then linear decay."""
    grad_clip: float = 1.0
    """Gradient norm clipping; 0 disables it."""
    patience: int = 8
    """Early stopping: epochs without improvement of `monitor` on dev."""
    monitor: str = "f1_macro"
    """Dev metric that selects the best epoch (any key of `amess.metrics.classification_metrics`)."""
    precision: str = "fp32"
    """`fp32`, `bf16` or `fp16` (mixed precision through accelerate)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps in total (smoke tests); None = no limit."""
    threads: int | None = None
    """torch intra-op threads; None = torch's default."""
    mmap_threshold_kb: int | None = 1024
    """glibc only: memory blocks of at least this size are mapped on their own and handed back
    to the OS when freed. glibc's own threshold rises (up to 32 MiB) each time a large block
    is freed, after which activation-sized blocks stay on the heap and a run's peak memory
    piles up (a MIntRec-sized A-MESS run: 3.0 GB instead of 2.0 GB, BENCHMARKS.md). None =
    leave the allocator alone; MALLOC_MMAP_THRESHOLD_ in the environment always wins."""
    plots: bool = True
    """Write the training-curve and confusion-matrix PNGs into each seed folder."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if self.mmap_threshold_kb is not None and not 0 <= self.mmap_threshold_kb <= 32768:
            raise ValueError(f"train.mmap_threshold_kb must be in 0..32768 (glibc's limit is 32 MiB) or null, "
                             f"got {self.mmap_threshold_kb}")


ANCHOR_MODES = ("topk", "learned", "all", "none")
SS_LOSSES = ("none", "triplet", "margin")
DESC_ENCODERS = ("shared", "frozen")
INFERENCE_MODES = ("head", "similarity", "both")


@dataclass
class AmessConfig:
    """A-MESS switches (docs/amess-method.md). Read only by `--method amess`."""

    anchor_mode: str = "topk"
    """A-ME anchors: `topk` (text tokens most relevant to the non-verbal streams), `learned`
    (k learned vectors inserted after [CLS]), `all` (every word token: dense fusion) or
    `none` (no fusion: the ablation row)."""
    num_anchors: int = 4
    """k, the number of anchors for `topk` and `learned`."""
    fusion_heads: int = 4
    """Attention heads of the anchor cross-attention and of the non-verbal layer; must divide
    the encoder's embedding size."""
    nonverbal_layer: bool = True
    """Run one light Transformer layer over each projected non-verbal stream."""
    ss_loss: str = "triplet"
    """SS loss: `triplet` (z_m and z_t against descriptions, plus z_m-z_t InfoNCE), `margin`
    (z_m, gold description, hardest negative description) or `none`."""
    ss_lambda: float = 0.5
    """Weight of the SS loss: L = CE + ss_lambda * L_SS."""
    tau: float = 0.1
    """Temperature of the SS similarities (initial value when `learn_tau`)."""
    learn_tau: bool = True
    """Learn the logit scale 1/tau (CLIP style, clamped to [1, 100]) with the triplet loss; False,
    or the margin loss (raw cosines, no temperature), keeps `tau` fixed."""
    proj_dim: int = 128
    """p, the size of the shared semantic space."""
    text_view: bool = True
    """Use the text-only view z_t (a second encoder pass) in the triplet loss; ignored otherwise."""
    desc_encoder: str = "shared"
    """Description encoder: `shared` (the trained text encoder, re-encoded every step) or
    `frozen` (the pretrained encoder, encoded once at construction and cached)."""
    desc_max_len: int = 64
    """Max tokens of a label description, special tokens included."""
    inference: str = "head"
    """Scores at evaluation: `head` (classifier softmax), `similarity` (softmax over the scaled
    cosine similarities to the descriptions) or `both` (the average of the two)."""
    margin: float = 0.2
    """Cosine margin of the `margin` SS loss."""
    gate_init: float = -2.0
    """Initial bias of the fusion gate: sigmoid(-2) = 0.12, so training starts near the text model."""

    def __post_init__(self) -> None:
        choices = {"anchor_mode": ANCHOR_MODES, "ss_loss": SS_LOSSES, "desc_encoder": DESC_ENCODERS,
                   "inference": INFERENCE_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"amess.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.anchor_mode in ("topk", "learned") and self.num_anchors < 1:
            raise ValueError(f"amess.num_anchors must be >= 1 with anchor_mode {self.anchor_mode!r}, "
                             f"got {self.num_anchors}")
        if self.fusion_heads < 1:
            raise ValueError(f"amess.fusion_heads must be >= 1, got {self.fusion_heads}")
        if self.ss_lambda < 0:
            raise ValueError(f"amess.ss_lambda must be >= 0, got {self.ss_lambda}")
        if not self.tau > 0:
            raise ValueError(f"amess.tau must be > 0, got {self.tau}")
        if self.learn_tau and not 0.01 <= self.tau <= 1.0:
            raise ValueError(f"amess.tau must lie in [0.01, 1] with learn_tau (the scale 1/tau is "
                             f"clamped to [1, 100]), got {self.tau}")
        if self.proj_dim < 1:
            raise ValueError(f"amess.proj_dim must be >= 1, got {self.proj_dim}")
        if self.desc_max_len < 3:
            raise ValueError(f"amess.desc_max_len must be >= 3, got {self.desc_max_len}")
        if self.ss_loss == "margin" and not 0 < self.margin <= 2:
            raise ValueError(f"amess.margin must lie in (0, 2] (a cosine margin), got {self.margin}")
        if self.inference != "head" and self.ss_loss == "none":
            raise ValueError(f"amess.inference={self.inference!r} scores by similarity to the label "
                             "descriptions, a space that amess.ss_loss=none never trains; use "
                             "inference=head or an SS loss")


@dataclass
class OODConfig:
    detectors: list[str] = field(default_factory=list)
    """Out-of-scope detectors evaluated after training (`amess.ood.DETECTORS`: msp, maxlogit, energy,
    mahalanobis, doc, desc_sim); each is fitted on training outputs and its threshold tuned on dev."""
    outlier_exposure: bool = False
    """Also train on the out-of-scope training rows, pushing their predictions towards the uniform
    distribution over the in-scope intents (outlier exposure). Off: OOS rows are dropped from train."""
    oe_weight: float = 0.5
    """Weight of the outlier-exposure term."""
    tune_metric: str = "f1_overall"
    """Dev metric the thresholds maximise (any key of `amess.metrics.oos_metrics`)."""

    def __post_init__(self) -> None:
        from amess.ood import DETECTORS

        unknown = [d for d in self.detectors if d not in DETECTORS]
        if unknown:
            raise ValueError(f"unknown OOD detector(s) {unknown}; known: {sorted(DETECTORS)}")
        if self.tune_metric not in ("oos_acc", "f1_is", "f1_oos", "f1_overall"):
            raise ValueError(f"ood.tune_metric must be one of oos_acc, f1_is, f1_oos, f1_overall")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    amess: AmessConfig = field(default_factory=AmessConfig)
    ood: OODConfig = field(default_factory=OODConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        kwargs = {}
        for f in dataclasses.fields(cls):
            section = d.get(f.name, {}) or {}
            sub = f.default_factory()  # type: ignore[misc]
            known = {g.name for g in dataclasses.fields(sub)}
            unknown = set(section) - known
            if unknown:
                raise ValueError(f"config section {f.name!r}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
            hints = typing.get_type_hints(type(sub))
            values = {k: _coerce(v, hints[k], f"{f.name}.{k}") for k, v in section.items()}
            kwargs[f.name] = type(sub)(**{**dataclasses.asdict(sub), **values})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"config: unknown sections {sorted(unknown)}")
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    def override(self, dotted: dict[str, Any]) -> "Config":
        """Return a new Config with `section.key=value` overrides applied (values YAML-parsed)."""
        d = self.to_dict()
        for key, value in dotted.items():
            if "." not in key:
                raise ValueError(f"override {key!r}: expected section.key=value")
            section, name = key.split(".", 1)
            if section not in d or name not in d[section]:
                raise ValueError(f"override {key!r}: no such setting")
            d[section][name] = yaml.safe_load(value) if isinstance(value, str) else value
        return Config.from_dict(d)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a setting against its field type; numbers written as strings (YAML reads `1e-4`
    as a string) become numbers, anything else of the wrong type is an error naming the key."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key}: a value is required")
    base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not list else hint
    if base is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if base is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
    if base is bool and not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    return value


def flag_overrides(args: Any, pairs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """`{setting: value}` for each (attribute, setting) pair whose command-line flag was given."""
    return {key: getattr(args, flag) for flag, key in pairs if getattr(args, flag, None) is not None}


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out
