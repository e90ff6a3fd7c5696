"""`amess` command line: thin subcommands over the library.

    amess data synth --out DIR [--dataset mintrec|mintrec2] [--seed S] [--size N]
    amess data check --dataset mintrec|mintrec2|custom --data-dir DIR [--modalities ...] [--subset in-scope]
    amess data convert --dataset D --data-dir DIR --out STORE
    amess data augment --dataset D --data-dir DIR --endpoint URL --model NAME [--n N] --out FILE.tsv
    amess data embed-descriptions --descriptions DIR --out FILE.pkl [--granularity field|sentence|token]
    amess train --dataset D --data-dir DIR --method NAME --out RUN_DIR [--known-ratio R] [...]
    amess evaluate RUN_DIR [--split test] [--set amess.inference=both]
    amess predict RUN_DIR --text "..." | --tsv FILE [--video F.npy --audio F.npy] | --clip F.mp4 | --clips DIR
    amess methods [show NAME]
    amess compare --dataset D --data-dir DIR --methods text,amess --seeds 0 1 2 --out DIR
    amess ablate --dataset D --data-dir DIR --seeds 0 1 2 --out DIR
    amess demo [--out demo_runs]
    amess serve RUN_DIR [--host 127.0.0.1 --port 8000]
    amess extract --clips DIR_OR_FILES [--transcripts TSV | --asr] [--labels TSV] --out DATA_DIR
    amess labels generate --labels FILE --endpoint URL --model NAME --out FILE
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from pickle import UnpicklingError

log = logging.getLogger("amess")


def _add_data_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--dataset", default=None, help="benchmark reader: mintrec, mintrec2 or custom (default: mintrec)")
    p.add_argument("--data-dir", required=required, help="the dataset folder as downloaded")
    p.add_argument("--modalities", default=None,
                   help="comma-separated subset of text,video,audio (default: all three)")
    p.add_argument("--task", choices=["intent", "binary"], default=None, help="fine-grained or coarse labels")
    p.add_argument("--video-file", default=None, help="video feature file, relative to --data-dir")
    p.add_argument("--audio-file", default=None, help="audio feature file, relative to --data-dir")


def _data_overrides(args: argparse.Namespace) -> dict[str, object]:
    o: dict[str, object] = {"data.dataset": args.dataset} if args.dataset else {}
    if getattr(args, "data_dir", None):
        o["data.data_dir"] = args.data_dir
    if args.modalities:
        o["data.modalities"] = [m.strip() for m in args.modalities.split(",") if m.strip()]
    for k in ("task", "video_file", "audio_file"):
        if getattr(args, k, None) is not None:
            o[f"data.{k}"] = getattr(args, k)
    return o


def cmd_synth(args: argparse.Namespace) -> int:
    from amess.data import synth

    if args.dataset == "mintrec2":
        info = synth.generate_mintrec2(args.out, seed=args.seed, size=3000 if args.size is None else args.size)
    else:
        info = synth.generate(args.out, seed=args.seed, size=1000 if args.size is None else args.size)
    print(f"wrote {args.out}: splits {info['splits']}")
    print("oracle test accuracy by modalities: " +
          ", ".join(f"{k} {100 * v:.2f}%" for k, v in info["oracle_test_accuracy"].items()))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from amess.config import Config
    from amess.data.check import check_dataset

    overrides = _data_overrides(args)
    if args.subset:
        overrides["data.subset"] = args.subset
    cfg = Config().override(overrides)
    rep = check_dataset(cfg.data)
    print(rep.text())
    return 0 if rep.ok else 1


def cmd_convert(args: argparse.Namespace) -> int:
    """One pickle at a time into a memory-mapped store (resumable, checksummed)."""
    from amess.config import Config
    from amess.data import get_reader
    from amess.data.store import verify_store

    cfg = Config().override(_data_overrides(args))
    reader = get_reader(cfg.data)
    converted = reader.convert_features(Path(args.out), dtype=args.dtype, progress=not args.no_progress)
    for modality, path, info in converted:
        state = "up to date, skipped" if info.get("skipped") else "written"
        print(f"{modality}: {path} -> {args.out} ({state})")
    done = len(converted)
    problems = verify_store(args.out)
    for p in problems:
        print(f"problem: {p}")
    if done:
        print(f"train from it with --feature-store {args.out}")
    return 1 if problems else 0


def cmd_embed_descriptions(args: argparse.Namespace) -> int:
    """Clip descriptions (a video LLM's words) -> a video-stream feature pickle, frozen encoder."""
    from amess.data.clip_descriptions import embed_description_folder, provenance_path

    given = {k: getattr(args, k) for k in ("granularity", "max_len", "batch_size") if getattr(args, k) is not None}
    prov = embed_description_folder(args.descriptions, args.out, text_encoder=args.text_encoder, device=args.device,
                                    progress=not args.no_progress, **given)
    print(f"wrote {args.out}: {prov['samples']} samples, each (T, {prov['hidden_size']}) with median T "
          f"{prov['frames']['median']:g} ({prov['granularity']}); provenance in {provenance_path(args.out)}")
    print("train with it as the video stream: --modalities text,video --video-file PATH_FROM_DATA_DIR")
    return 0


def build_train_config(args: argparse.Namespace):
    from amess.config import Config, flag_overrides, parse_overrides

    cfg = Config.load(args.config) if args.config else Config()
    o = _data_overrides(args)
    if getattr(args, "method", None):
        o["model.method"] = args.method
    if args.text_encoder:
        o["model.text_encoder"] = args.text_encoder
    o.update(flag_overrides(args, (
        ("seeds", "train.seeds"), ("epochs", "train.epochs"), ("batch_size", "train.batch_size"),
        ("lr", "train.lr"), ("encoder_lr", "train.encoder_lr"), ("patience", "train.patience"),
        ("precision", "train.precision"), ("max_steps", "train.max_steps"), ("threads", "train.threads"),
        ("compile", "train.compile"),
        ("dev_split", "data.dev_split"), ("test_splits", "data.test_splits"), ("monitor", "train.monitor"),
        ("known_ratio", "data.known_ratio"))))
    if args.holdout_labels:
        o["data.holdout_labels"] = [s.strip() for s in args.holdout_labels.split(",") if s.strip()]
    if args.label_descriptions:
        o["data.label_descriptions"] = args.label_descriptions
    if args.no_progress:
        o["train.progress"] = False
    if args.ood_detector:  # `msp energy` or `msp,energy`
        o["ood.detectors"] = [d.strip() for item in args.ood_detector for d in item.split(",") if d.strip()]
    if args.outlier_exposure:
        o["ood.outlier_exposure"] = True
    if args.feature_store:
        o["data.feature_store"] = args.feature_store
    o.update(parse_overrides(args.set))
    return cfg.override(o)


def cmd_train(args: argparse.Namespace) -> int:
    from amess.training import format_ood_table, format_table, run

    cfg = build_train_config(args)
    summary = run(cfg, args.out, overwrite=args.overwrite)
    report = [s for s in cfg.data.test_splits if s in summary] or [k for k in summary if k != "seeds"][:1]
    if cfg.data.known_ratio is not None:
        print(_open_intent_note(Path(args.out), cfg))
    for split in report:
        print(f"\n{cfg.model.method} on {cfg.data.dataset} {split} ({len(cfg.train.seeds)} seed(s), mean ± std, %)")
        print(format_table({cfg.model.method: summary}, split))
        ood = format_ood_table(summary, split)
        if ood:
            print(f"\nout-of-scope detection on {split} (thresholds tuned on {cfg.data.dev_split}, mean ± std, %)")
            print(ood)
    print(f"\nrun folder: {args.out}")
    return 0


def _open_intent_note(out: Path, cfg) -> str:
    """What the tables mean under --known-ratio, with each seed's known intents."""
    import json

    lines = [f"\nopen intent, known ratio {cfg.data.known_ratio:g}: the in-scope table is over the rows of known "
             "intents (argmax over them); the out-of-scope table over known + open, K+1 classes (oos_acc = "
             "accuracy, f1_is = F1-known, f1_oos = F1-open, f1_overall = macro F1)"]
    for seed in cfg.train.seeds:
        try:
            m = json.loads((out / f"seed_{seed}" / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if m.get("known_labels") is not None:
            lines.append(f"seed {seed}: {len(m['known_labels'])} of {len(m['all_labels'])} intents known: "
                         + ", ".join(m["known_labels"]))
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    import dataclasses

    from amess.config import field_docs
    from amess.models import METHODS, method_class

    if args.action == "show":
        if not args.name:
            raise ValueError("amess methods show NAME: name a method; `amess methods` lists them")
        cls = method_class(args.name)
        print(f"{args.name}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
        print(f"  reads: {', '.join(cls.reads)}   requires: {', '.join(cls.requires)}"
              + (" + video or audio" if cls.needs_nonverbal else "")
              + (f"   encoder parts: {', '.join(cls.encoder_parts)}" if cls.encoder_parts else "")
              + ("   label descriptions: yes" if cls.uses_descriptions else ""))
        print(f"  defined in: {cls.__module__}")
        if cls.Settings is None:
            print("  settings: none")
            return 0
        docs = field_docs(cls.Settings)
        print(f"  settings (--set {args.name}.KEY=VALUE):")
        for f in dataclasses.fields(cls.Settings):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            print(f"    {f.name} = {default!r}\n        {docs.get(f.name, '')}")
        return 0
    for name in sorted(METHODS):
        cls = METHODS[name]
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        n = len(dataclasses.fields(cls.Settings)) if cls.Settings is not None else 0
        print(f"{name:10s} reads {','.join(cls.reads):17s} {n:2d} settings  {doc}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import json

    import numpy as np

    from amess.predictor import load_run

    p = load_run(args.run_dir, seed=args.seed)
    if args.clip or args.clips:
        from amess.extract.clips import cmd_predict_clips

        return cmd_predict_clips(p, args)
    if bool(args.text) == bool(args.tsv):
        raise ValueError("amess predict: give --text \"...\" (one or more) or --tsv FILE")
    if args.tsv:
        texts, ids = _read_predict_tsv(Path(args.tsv))
    else:
        texts, ids = list(args.text), [str(i) for i in range(len(args.text))]
    feats = {}
    for name in ("video", "audio"):
        path = getattr(args, name)
        if path is None:
            continue
        if len(texts) != 1:
            raise ValueError(f"--{name} FILE.npy gives the features of one utterance; give one --text with it")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable .npy array of {name} features ({e})") from None
        from amess.extract.clips import check_feature_file

        check_feature_file(p, name, Path(path))  # features from another extractor than the run's are refused
        feats[name] = [arr]
    preds = p.predict(texts, **feats)
    if args.json:
        print(json.dumps([dict(id=i, **r.to_dict(args.top)) for i, r in zip(ids, preds)], indent=2))
        return 0
    if args.tsv and args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "text", "intent", "probability"] + [f"oos_{d}" for d in p.detectors])
            for i, r in zip(ids, preds):
                w.writerow([i, r.text, r.label, f"{r.ranked[0][1]:.5f}"] + [int(v) for v in r.ood.values()])
        print(f"wrote {len(preds)} predictions to {args.out}")
        return 0
    for i, r in zip(ids, preds):
        print(f"{i}: {r.text}")
        for name, prob in r.ranked[: args.top]:
            print(f"    {prob:7.2%}  {name}")
        if r.anchors:
            print(f"    anchor words: {' '.join(r.anchors)}")
        for det, oos in r.ood.items():
            thr = p.detectors[det].threshold
            print(f"    out-of-scope ({det}): {'yes' if oos else 'no'} (score {r.ood_scores[det]:.4f}, threshold {thr:.4f})")
    return 0


def _read_predict_tsv(path: Path) -> tuple[list[str], list[str]]:
    """Rows of a TSV with a `text` column (and optionally an `id` column), any other columns ignored."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise ValueError(f"{path}: empty; expected a header with a `text` column")
    header = [h.strip().lower() for h in rows[0]]
    if "text" not in header:
        raise ValueError(f"{path}: line 1: expected a header with a `text` column, got {rows[0]}")
    t, k = header.index("text"), header.index("id") if "id" in header else None
    texts, ids = [], []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}: line {n}: {len(row)} fields, expected {len(header)} as in the header")
        texts.append(row[t])
        ids.append(row[k] if k is not None else str(n - 1))
    if not texts:
        raise ValueError(f"{path}: no rows under the header")
    return texts, ids


def cmd_evaluate(args: argparse.Namespace) -> int:
    from amess.config import parse_overrides
    from amess.evaluate import evaluate_run
    from amess.training import format_ood_table, format_table

    overrides = parse_overrides(args.set)
    summary = evaluate_run(Path(args.run_dir), args.split, overrides)
    with_set = f", with {' '.join(f'{k}={v}' for k, v in overrides.items())}" if overrides else ""
    print(f"\n{args.run_dir} on {args.split}{with_set} (mean ± std over seeds, %)")
    print(format_table({Path(args.run_dir).name: summary}, args.split))
    ood = format_ood_table(summary, args.split)
    if ood:
        print(f"\nout-of-scope detection on {args.split}{' (detectors refitted with the settings above)' if overrides else ''}")
        print(ood)
    print("acc per seed: " + ", ".join(f"{s} {100 * m[args.split]['acc']:.2f}" for s, m in summary["per_seed"].items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from amess.demo import run_demo

    methods = tuple(m.strip() for m in args.methods.split(","))
    from amess.config import parse_overrides

    print(run_demo(args.out, size=args.size, seeds=args.seeds, epochs=args.epochs, methods=methods,
                   settings=parse_overrides(args.set)))
    return 0


def add_train_args(p: argparse.ArgumentParser, *, with_method: bool = True) -> None:
    """The flags of `amess train` (shared by `amess compare`, which applies them to each method)."""
    _add_data_args(p)
    p.add_argument("--config", default=None, help="YAML config (flags override it)")
    if with_method:
        p.add_argument("--method", default=None, help="method name (see `amess methods`)")
    p.add_argument("--text-encoder", default=None, help="Hugging Face name or local folder (default packaged:minilm)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="learning rate of the new layers")
    p.add_argument("--encoder-lr", type=float, default=None, help="learning rate of the text encoder")
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--monitor", default=None, help="dev metric for early stopping (default f1_macro)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model's forward (GPU; the first steps are slow)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimiser steps (smoke tests)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--dev-split", default=None, help="early-stopping split, or train:FRACTION to hold back part of train")
    p.add_argument("--test-splits", nargs="+", default=None, help="splits reported at the end (default: test)")
    p.add_argument("--holdout-labels", default=None, help="comma-separated intents unseen in training (zero-shot)")
    p.add_argument("--known-ratio", type=float, default=None, metavar="R",
                   help="open intent (TEXTOIR's protocol): per seed, train on round(R*C) intents drawn at random; "
                        "the others are out-of-scope at test time (0 < R < 1; not with --holdout-labels)")
    p.add_argument("--label-descriptions", default=None, help="YAML/JSON file label -> description")
    p.add_argument("--ood-detector", nargs="+", default=None,
                   help="out-of-scope detectors to evaluate (space- or comma-separated): msp maxlogit energy "
                        "mahalanobis doc desc_sim")
    p.add_argument("--outlier-exposure", action="store_true", help="train on the out-of-scope training rows too")
    p.add_argument("--feature-store", default=None,
                   help="read features from a store made by `amess data convert`; `auto` converts the pickles into "
                        "DATA_DIR/amess_feature_store on first use (keeps features out of memory)")
    p.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE", help="any config setting")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume it)")
    p.add_argument("--overwrite", action="store_true", help="replace a run of another configuration in --out")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amess", description="multimodal intent recognition (A-MESS and baselines)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="synthetic data, checks and conversion").add_subparsers(dest="data_cmd", required=True)
    s = data.add_parser("synth", help="write a synthetic dataset in the MIntRec or MIntRec2.0 layout")
    s.add_argument("--out", required=True)
    s.add_argument("--dataset", default="mintrec", choices=["mintrec", "mintrec2"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=None,
                   help="number of utterances, all splits (default: 1000 for mintrec, 3000 for mintrec2)")
    s.set_defaults(func=cmd_synth)
    c = data.add_parser("check", help="report counts, shapes and problems of a dataset folder")
    _add_data_args(c)
    c.add_argument("--subset", choices=["total", "in-scope", "out-of-scope"], default=None,
                   help="MIntRec2.0 folder to check (default total)")
    c.set_defaults(func=cmd_check)
    v = data.add_parser("convert", help="turn feature pickles into a memory-mapped store (resumable)")
    _add_data_args(v)
    v.add_argument("--out", required=True, help="store folder")
    v.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=cmd_convert)
    from amess.data.augment import add_cli as add_augment_cli

    add_augment_cli(data)  # amess data augment: SDIF-DA's LLM paraphrases, offline
    ed = data.add_parser("embed-descriptions", help="clip descriptions (TSV) -> a feature pickle for the video "
                                                    "stream, with a frozen text encoder")
    ed.add_argument("--descriptions", required=True,
                    help="folder of {train,dev,test}.tsv: id column(s), then text fields")
    ed.add_argument("--out", required=True, help="feature pickle to write; provenance goes to OUT.json")
    ed.add_argument("--text-encoder", default=None,
                    help="Hugging Face name or local folder (default packaged:minilm)")
    ed.add_argument("--granularity", choices=["field", "sentence", "token"], default=None,
                    help="one vector per field (mean-pooled), per sentence, or per token (default field)")
    ed.add_argument("--max-len", type=int, default=None,
                    help="max tokens of one encoded field or sentence (default 128)")
    ed.add_argument("--batch-size", type=int, default=None, help="texts per encoder call (default 64)")
    ed.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    ed.add_argument("--no-progress", action="store_true")
    ed.set_defaults(func=cmd_embed_descriptions)

    t = sub.add_parser("train", help="train a method over one or more seeds")
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a run folder's checkpoints on a split")
    e.add_argument("run_dir")
    e.add_argument("--split", default="test")
    e.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                   help="score the same checkpoints with an inference-time setting switched "
                        "(amess.inference=similarity); the out-of-scope detectors are refitted on the "
                        "seed's train rows and early-stopping split with it; the run folder is left as it is")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="ranked intents (and out-of-scope verdicts) from a trained run")
    pr.add_argument("run_dir", help="a run folder (its first seed) or a seed folder")
    pr.add_argument("--text", nargs="+", default=None, help="one or more utterances")
    pr.add_argument("--tsv", default=None, help="a TSV with a `text` column (and optionally `id`)")
    pr.add_argument("--video", default=None, help="video features of the one utterance, a (frames, d) .npy file")
    pr.add_argument("--audio", default=None, help="audio features of the one utterance, a (frames, d) .npy file")
    pr.add_argument("--clip", default=None, help="an audio/video clip: the run's extractors, ASR, then predict")
    pr.add_argument("--clips", nargs="+", default=None, metavar="DIR_OR_FILE",
                    help="clips or folders of clips (with --out: a CSV)")
    pr.add_argument("--threads", type=int, default=None, help="CPU threads for the extractors")
    pr.add_argument("--seed", type=int, default=None, help="which seed's model (default: the first)")
    pr.add_argument("--top", type=int, default=5, help="intents shown per utterance")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.add_argument("--out", default=None, help="with --tsv or --clips: write a CSV here instead of printing")
    pr.set_defaults(func=cmd_predict)

    ms = sub.add_parser("methods", help="list the methods, or show one's settings")
    ms.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    ms.add_argument("name", nargs="?", default=None)
    ms.set_defaults(func=cmd_methods)

    d = sub.add_parser("demo", help="synthetic data, train text and amess, print the results table")
    d.add_argument("--out", default="demo_runs")
    d.add_argument("--size", type=int, default=1000)
    d.add_argument("--seeds", type=int, nargs="+", default=[0])
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--methods", default="text,amess", help="comma-separated methods")
    d.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE", help="any config setting")
    d.set_defaults(func=cmd_demo)

    from amess.ablate import add_cli as add_ablate_cli
    from amess.compare import add_cli as add_compare_cli
    from amess.extract.cli import add_cli as add_extract_cli
    from amess.labels.generate import add_cli as add_labels_cli
    from amess.serve import add_cli as add_serve_cli

    add_ablate_cli(sub)
    add_compare_cli(sub)
    add_extract_cli(sub)
    add_labels_cli(sub)
    add_serve_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        log.error("interrupted; every file written so far is complete. Rerun the same command to resume.")
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, UnpicklingError) as e:
        from amess.data import DataError
        from amess.training import RunFolderError, TrainingError

        # a refused or unreadable file is bad input, named in the message: no traceback
        if isinstance(e, (DataError, FileNotFoundError, UnpicklingError, TrainingError, RunFolderError)) \
                or not args.verbose:
            log.error("%s", e)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
