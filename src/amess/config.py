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
    known_ratio: float | None = None
    """Open-intent protocol (thuiar's TEXTOIR): per seed, round(R * C) of the C intents are drawn as
    known (`numpy.random.default_rng(seed)`); the model learns only those, rows of the others leave
    train and dev and are out-of-scope in every test split. None = all intents known."""
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
        if ":" in self.dev_split:
            split, frac = self.dev_split.split(":", 1)
            try:
                f = float(frac)
            except ValueError:
                f = float("nan")
            if split != self.train_split or not 0 < f < 1:
                raise ValueError(f"data.dev_split {self.dev_split!r}: expected a split name, or "
                                 f"{self.train_split}:FRACTION with 0 < FRACTION < 1 (e.g. {self.train_split}:0.1)")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.known_ratio is not None:
            if not 0 < self.known_ratio < 1:
                raise ValueError(f"--known-ratio {self.known_ratio:g}: expected a share of the intents strictly "
                                 "between 0 and 1 (e.g. 0.25, 0.5, 0.75)")
            if self.holdout_labels:
                raise ValueError("--known-ratio and --holdout-labels cannot be combined: the first draws the unseen "
                                 "intents at random per seed (open intent), the second names them (zero-shot)")


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
    """`fp32`, `bf16` or `fp16` (mixed precision through accelerate: autocast around each forward
    and loss, weights and optimiser state stay float32). `bf16` works on a CPU and on a GPU; `fp16`
    needs a CUDA GPU (with a gradient scaler) and is refused on a CPU, where accelerate would
    silently run fp32."""
    tf32: bool = True
    """On a CUDA GPU, let float32 matrix products and convolutions use TensorFloat-32 (cuBLAS and
    cuDNN; Ampere and later): several times faster at about 10 bits of mantissa. Set when the
    accelerator is created; no effect on a CPU. false = full float32 (IEEE) products."""
    compile: bool = False
    """`torch.compile` the model's forward after it is placed on its device (in place,
    `nn.Module.compile`: the module, its `.loss`, its state_dict keys and the saved checkpoints
    stay as they are). The first steps are slow while the graphs are compiled, again for
    evaluation and for new batch shapes; pays off on a GPU over long runs. A run folder may be
    resumed with or without it."""
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
        for name in ("tf32", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name} must be true or false, got {getattr(self, name)!r}")
        from amess.metrics import CLASSIFICATION_KEYS

        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"train.seeds has duplicates: {self.seeds}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                    "patience": self.patience, "max_steps": self.max_steps, "threads": self.threads}
        for name, v in positive.items():
            if v is not None and v < 1:
                raise ValueError(f"train.{name} must be >= 1, got {v}")
        for name, v in {"lr": self.lr, "encoder_lr": self.encoder_lr}.items():
            if v is not None and not (v > 0 and v < float("inf")):
                raise ValueError(f"train.{name} must be a positive number, got {v}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (self.weight_decay >= 0 and self.grad_clip >= 0):
            raise ValueError(f"train.weight_decay and train.grad_clip must be >= 0, got "
                             f"{self.weight_decay} and {self.grad_clip}")
        if self.monitor not in CLASSIFICATION_KEYS:
            raise ValueError(f"train.monitor {self.monitor!r} is not a dev metric; choose one of "
                             f"{list(CLASSIFICATION_KEYS)}")
        if self.mmap_threshold_kb is not None and not 0 <= self.mmap_threshold_kb <= 32768:
            raise ValueError(f"train.mmap_threshold_kb must be in 0..32768 (glibc's limit is 32 MiB) or null, "
                             f"got {self.mmap_threshold_kb}")


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
            raise ValueError("ood.tune_metric must be one of oos_acc, f1_is, f1_oos, f1_overall")


@dataclass
class Config:
    """The run's settings: four fixed sections and one section per method that has settings.

    A method's settings dataclass is declared by the method itself (`IntentModel.Settings`,
    see `amess.models.base`); its section is named after the method (`amess:` in YAML,
    `--set amess.num_anchors=8`), and `cfg.<method>` returns it (`cfg.amess.tau`). Only the
    active method's section and sections given explicitly are written out.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ood: OODConfig = field(default_factory=OODConfig)
    methods: dict[str, Any] = field(default_factory=dict)
    """Method name -> that method's settings dataclass instance."""

    def __post_init__(self) -> None:
        from amess.models import method_class

        cls = method_class(self.model.method)  # unknown names list the known ones
        if cls.Settings is not None and self.model.method not in self.methods:
            self.methods = {**self.methods, self.model.method: cls.Settings()}
        for name, settings in self.methods.items():
            expected = method_class(name).Settings
            if expected is None or not isinstance(settings, expected):
                raise ValueError(f"config section {name!r}: expected {getattr(expected, '__name__', 'no settings')}, "
                                 f"got {type(settings).__name__}")

    def __getattr__(self, name: str) -> Any:
        """`cfg.<method>`: that method's settings (its defaults when not given)."""
        if name.startswith("_") or name in ("data", "model", "train", "ood", "methods"):
            raise AttributeError(name)
        return self.settings_for(name)

    def settings_for(self, method: str) -> Any:
        """The settings of `method` in this config (its defaults when not given)."""
        from amess.models import method_class

        if method in self.methods:
            return self.methods[method]
        cls = method_class(method).Settings
        if cls is None:
            raise AttributeError(f"method {method!r} has no settings")
        return cls()

    @property
    def method_settings(self) -> Any:
        """The active method's settings, or None for a method without settings."""
        return self.methods.get(self.model.method)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "methods"}
        d.update({name: dataclasses.asdict(s) for name, s in self.methods.items()})
        return d

    def save(self, path: str | Path) -> None:
        from amess.training.artifacts import write_text

        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        from amess.models import METHODS

        if not isinstance(d, dict):
            raise ValueError(f"config: expected a mapping of sections, got {type(d).__name__}")
        fixed = [f for f in dataclasses.fields(cls) if f.name != "methods"]
        kwargs: dict[str, Any] = {}
        for f in fixed:
            kwargs[f.name] = _section(f.name, f.default_factory(), d.get(f.name))  # type: ignore[misc]
        methods = {}
        for name in set(d) - {f.name for f in fixed}:
            if name not in METHODS:
                raise ValueError(f"config: unknown section {name!r}; known: {[f.name for f in fixed]} and the "
                                 f"settings of the methods {sorted(n for n, c in METHODS.items() if c.Settings)}")
            if METHODS[name].Settings is None:
                raise ValueError(f"config: method {name!r} has no settings, but the config has a section for it")
            methods[name] = _section(name, METHODS[name].Settings(), d[name])
        return cls(**kwargs, methods=methods)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            return cls.from_dict(raw or {})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def override(self, dotted: dict[str, Any]) -> "Config":
        """Return a new Config with `section.key=value` overrides applied (values YAML-parsed).

        A section may be any method with settings (`amess.tau=0.05`), active or not."""
        from amess.models import METHODS

        d = self.to_dict()
        for key, value in dotted.items():
            if "." not in key:
                raise ValueError(f"override {key!r}: expected section.key=value")
            section, name = key.split(".", 1)
            if section not in d and section in METHODS and METHODS[section].Settings is not None:
                d[section] = dataclasses.asdict(METHODS[section].Settings())
            if section not in d or name not in d[section]:
                known = sorted(d[section]) if section in d else sorted(d)
                raise ValueError(f"override {key!r}: no such setting; known: {known}")
            if isinstance(value, str):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    raise ValueError(f"override {key}={value!r}: not a valid value") from None
            d[section][name] = value
        # the method may have changed: its settings section is added by __post_init__
        return Config.from_dict(d)


def _section(name: str, default: Any, given: Any) -> Any:
    """One section: the dataclass `default` with the `given` mapping's entries, type-checked."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ValueError(f"config section {name!r}: expected a mapping of settings, got {given!r}")
    known = {g.name for g in dataclasses.fields(default)}
    unknown = set(given) - known
    if unknown:
        raise ValueError(f"config section {name!r}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    hints = typing.get_type_hints(type(default))
    values = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in given.items()}
    return type(default)(**{**{g.name: getattr(default, g.name) for g in dataclasses.fields(default)}, **values})


def field_docs(cls: type) -> dict[str, str]:
    """`{field: docstring}` of a settings dataclass: the string literal under each field
    (the litgpt convention this project follows; it becomes `amess methods show`)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a setting against its field type; numbers written as strings (YAML reads `1e-4`
    as a string) become numbers, anything else of the wrong type is an error naming the key
    (`epochs: true`, `epochs: 2.5`, `seeds: 5` are refused, not cast)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key}: a value is required")
    if typing.get_origin(hint) is list:
        (item,) = args or (Any,)
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(base) is list:
        return _coerce(value, base, key)
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float, str)):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{key}: expected a number, got {value!r}") from None
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{key}: expected an integer, got {value!r}") from None
        if not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if base is bool and not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if base is str and not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value


def flag_overrides(args: Any, pairs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """`{setting: value}` for each (attribute, setting) pair whose command-line flag was given."""
    return {key: getattr(args, flag) for flag, key in pairs if getattr(args, flag, None) is not None}


def parse_variant(spec: str) -> tuple[str, str, dict[str, str]]:
    """`NAME=METHOD[:section.key=value,...]` -> (name, method, overrides): a named method
    with settings, for `amess compare --variant` and `make bench`. Commas inside brackets
    belong to the value (`data.modalities=[text,video]`)."""
    name, eq, rest = spec.partition("=")
    method, _, kvs = rest.partition(":")
    name, method = name.strip(), method.strip()
    if not eq or not name or not method:
        raise ValueError(f"--variant {spec!r}: expected NAME=METHOD[:section.key=value,...]")
    items, depth, cur = [], 0, ""
    for ch in kvs:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    try:
        return name, method, parse_overrides([i for i in items if i.strip()])
    except ValueError as e:
        raise ValueError(f"--variant {spec!r}: {e}") from None


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out
