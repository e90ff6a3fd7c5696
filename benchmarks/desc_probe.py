"""How much a clip-description stream tells about intent, cheaply: a linear probe.

A logistic regression is fitted on the train split and scored on dev, over frozen vectors:
the utterance (the text encoder's mean-pooled last hidden states) alone, each description
stream alone, and both side by side (the stream's `(T, d)` frames mean-pooled over T).
Nothing is fine-tuned, so it compares granularities in seconds once the feature pickles
exist (`amess data embed-descriptions`); it measures information, not A-MESS.

    python benchmarks/desc_probe.py --data-dir MINTREC2_ROOT \
        --stream field=in-scope/video_data/desc_field.pkl --stream sentence=... --stream token=...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def pooled(path: Path, ids: list[str]) -> np.ndarray:
    """`(n, d)`: each sample's frames averaged over time (zeros for a sample without frames)."""
    from amess.data.features import InMemoryFeatures

    src = InMemoryFeatures(path, keep=ids, dtype=np.float32)
    return np.stack([src.get(i).mean(0) if src.length(i) else np.zeros(src.dim, np.float32) for i in ids])


def probe(x_tr: np.ndarray, y_tr: np.ndarray, x_dev: np.ndarray, y_dev: np.ndarray, num_labels: int,
          seed: int) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from amess.metrics import classification_metrics

    scale = StandardScaler().fit(x_tr)
    clf = LogisticRegression(max_iter=2000, C=0.1, random_state=seed).fit(scale.transform(x_tr), y_tr)
    return classification_metrics(y_dev, clf.predict(scale.transform(x_dev)), num_labels)


def main() -> None:
    from amess.config import DataConfig
    from amess.data import get_reader
    from amess.data.clip_descriptions import DescriptionRow, embed_rows
    from amess.models.encoders import DEFAULT_TEXT_ENCODER, load_text_encoder

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="MIntRec2.0 root (in-scope/{train,dev}.tsv)")
    p.add_argument("--stream", action="append", default=[], metavar="NAME=PICKLE",
                   help="a description feature pickle, relative to --data-dir")
    p.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    reader = get_reader(DataConfig(dataset="mintrec2", data_dir=args.data_dir, subset="in-scope", modalities=["text"]))
    data = reader.load(["train", "dev"])
    ids = {s: [x.id for x in sd.samples] for s, sd in data.items()}
    y = {s: sd.label_ids() for s, sd in data.items()}
    t0 = time.perf_counter()
    enc = load_text_encoder(args.text_encoder)
    text = {s: np.concatenate([a for _, a in embed_rows([DescriptionRow(x.id, (x.text,), 0) for x in sd.samples],
                                                         enc, granularity="field", progress=False)])
            for s, sd in data.items()}
    print(f"utterances encoded in {time.perf_counter() - t0:.0f} s")
    rows = {"text": {s: text[s] for s in text}}
    for item in args.stream:
        name, rel = item.split("=", 1)
        path = Path(args.data_dir) / rel
        stream = {s: pooled(path, ids[s]) for s in ids}
        rows[f"{name} alone"] = stream
        rows[f"text + {name}"] = {s: np.concatenate([text[s], stream[s]], 1) for s in ids}
    n = len(reader.label_names)
    print(f"| probe input | dev acc | dev f1_macro | dev f1_weighted |\n|---|---|---|---|")
    results = {}
    for name, x in rows.items():
        m = probe(x["train"], y["train"], x["dev"], y["dev"], n, args.seed)
        results[name] = m
        print(f"| {name} | {100 * m['acc']:.2f} | {100 * m['f1_macro']:.2f} | {100 * m['f1_weighted']:.2f} |")
    print(json.dumps({k: {m: round(v, 4) for m, v in r.items()} for k, r in results.items()}))


if __name__ == "__main__":
    main()
