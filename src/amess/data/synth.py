"""A synthetic dataset in exactly the MIntRec on-disk layout, built as a fair test of fusion.

Design (MIntRec's 20 labels, its class imbalance, its file formats):

- The 20 intents form 5 groups of 4 (official order, `4g .. 4g+3`). The index inside the
  group is two bits: `v` (video bit) and `a` (audio bit), intent = 4g + 2a + v.
- Text names the group (cue words of the group among neutral filler, with `text_noise` of
  rows using another group's words) and says nothing about the bits, so text alone can tell
  at best which group, leaving 4 intents ambiguous.
- Video frames (256-d, one `(1, 256)` array per keyframe, 8-48 frames) are Gaussian noise;
  in a share `cue_rate` of the samples a cue vector for the `v` bit is added to a random 30-70%
  of the frames. Audio frames (768-d, 20-100 frames) carry the `a` bit the same way. Some
  samples have no video frame at all (no speaker detected), as in the real release.
- So: text+video+audio resolves nearly everything; text+one stream half of the ambiguity.

`synth_info.json` records the generator settings and the accuracy an oracle (which knows
the generative rule and the cue directions) reaches on the test split with each subset of
modalities: the ceiling a model can approach, measured on the generated data.
"""

from __future__ import annotations

import json
import logging
import pickle
from itertools import combinations
from pathlib import Path

import numpy as np

from amess.data.mintrec import MINTREC_HEADER, MINTREC_LABELS

log = logging.getLogger(__name__)

# Class totals of the real MIntRec (SOURCE.md), used as the sampling distribution.
MINTREC_COUNTS = {
    "Complain": 286, "Inform": 284, "Praise": 213, "Apologise": 136, "Thank": 124, "Advise": 122,
    "Criticize": 117, "Arrange": 110, "Introduce": 105, "Care": 95, "Comfort": 88, "Leave": 85,
    "Prevent": 73, "Taunt": 62, "Greet": 60, "Agree": 59, "Flaunt": 52, "Oppose": 51, "Joke": 51,
    "Ask for help": 51,
}

GROUP_WORDS = (
    ("sorry", "unfair", "terrible", "broken", "annoying", "awful", "wrong", "mess"),
    ("great", "wonderful", "amazing", "funny", "brilliant", "nice", "best", "lucky"),
    ("listen", "problem", "worry", "maybe", "careful", "help", "hurt", "fine"),
    ("store", "shift", "schedule", "meeting", "register", "aisle", "tomorrow", "manager"),
    ("goodbye", "hello", "stop", "please", "door", "leaving", "welcome", "wait"),
)
FILLER = ("the", "a", "you", "i", "we", "it", "is", "was", "that", "this", "so", "just", "really", "and",
          "to", "of", "on", "for", "with", "they", "now", "here", "there", "well", "like", "okay", "yeah")

VIDEO_DIM, AUDIO_DIM = 256, 768


def _sentence(rng: np.random.Generator, group: int, groups: tuple[tuple[str, ...], ...] = GROUP_WORDS) -> str:
    """2-3 cue words of `groups[group]` among 4-8 filler words, shuffled."""
    n_cue = int(rng.integers(2, 4))
    n_fill = int(rng.integers(4, 9))
    words = list(rng.choice(groups[group], n_cue)) + list(rng.choice(FILLER, n_fill))
    rng.shuffle(words)
    return " ".join(words) + "."


def _frames(rng: np.random.Generator, n: int, dim: int, cue: np.ndarray | None) -> np.ndarray:
    """`(n, dim)` Gaussian frames; with a cue, it is added to a random 30-70% of them (at least one)."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    if cue is not None and n > 0:
        share = rng.uniform(0.3, 0.7)
        on = rng.random(n) < share
        on[rng.integers(n)] = True
        x[on] += cue
    return x


def _cue_dirs(rng: np.random.Generator, n: int, dim: int, cue_strength: float) -> np.ndarray:
    """`(n, dim)` random cue directions, each of norm `cue_strength * sqrt(dim) / 4`."""
    u = rng.standard_normal((n, dim))
    return (cue_strength * u / np.linalg.norm(u, axis=1, keepdims=True) * np.sqrt(dim) / 4).astype(np.float32)


def generate(out: str | Path, *, seed: int = 0, size: int = 1000, cue_rate: float = 0.85,
             cue_strength: float = 3.0, text_noise: float = 0.05, no_video_rate: float = 0.02) -> dict:
    """Write `train/dev/test.tsv`, `video_data/video_feats.pkl`, `audio_data/audio_feats.pkl`
    and `synth_info.json` under `out`. Splits are 60/20/20, stratified by intent."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    names = list(MINTREC_LABELS)
    p = np.array([MINTREC_COUNTS[n] for n in names], dtype=np.float64)
    labels = rng.choice(len(names), size=size, p=p / p.sum())
    vcue, acue = _cue_dirs(rng, 2, VIDEO_DIM, cue_strength), _cue_dirs(rng, 2, AUDIO_DIM, cue_strength)

    rows, video, audio, truth = [], {}, {}, []
    clip = 0
    for i, y in enumerate(labels):
        y = int(y)
        g, a_bit, v_bit = y // 4, (y % 4) // 2, y % 2
        text_group = int(rng.integers(5)) if rng.random() < text_noise else g
        season, episode = f"S0{4 + i % 3}", f"E{1 + (i // 3) % 22:02d}"
        clip += int(rng.integers(1, 4))
        sid = f"{season}_{episode}_{clip}"
        has_v, has_a = rng.random() < cue_rate, rng.random() < cue_rate
        n_v = 0 if rng.random() < no_video_rate else int(rng.integers(8, 49))
        n_a = int(rng.integers(20, 101))
        v = _frames(rng, n_v, VIDEO_DIM, vcue[v_bit] if has_v else None)
        video[sid] = [v[t : t + 1] for t in range(n_v)]  # MIntRec: list of (1, 256) arrays
        audio[sid] = _frames(rng, n_a, AUDIO_DIM, acue[a_bit] if has_a else None)
        rows.append((season, episode, str(clip), _sentence(rng, text_group), names[y]))
        truth.append((y, text_group))

    # stratified 60/20/20 split
    split_of = np.empty(size, dtype=object)
    for c in range(len(names)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_tr, n_dev = int(round(0.6 * len(idx))), int(round(0.2 * len(idx)))
        split_of[idx[:n_tr]] = "train"
        split_of[idx[n_tr : n_tr + n_dev]] = "dev"
        split_of[idx[n_tr + n_dev :]] = "test"

    (out / "video_data").mkdir(parents=True, exist_ok=True)
    (out / "audio_data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        with open(out / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("\t".join(MINTREC_HEADER) + "\n")
            for i in np.flatnonzero(split_of == split):
                f.write("\t".join(rows[i]) + "\n")
    with open(out / "video_data" / "video_feats.pkl", "wb") as f:
        pickle.dump(video, f, protocol=4)
    with open(out / "audio_data" / "audio_feats.pkl", "wb") as f:
        pickle.dump(audio, f, protocol=4)

    test_idx = np.flatnonzero(split_of == "test")
    ids = ["_".join(rows[i][:3]) for i in test_idx]
    oracle = _oracle_accuracies(labels[test_idx], [truth[i][1] for i in test_idx],
                                [video[s] for s in ids], [audio[s] for s in ids], vcue, acue, p / p.sum())
    info = {
        "generator": "amess.data.synth", "seed": seed, "size": size, "cue_rate": cue_rate,
        "cue_strength": cue_strength, "text_noise": text_noise, "no_video_rate": no_video_rate,
        "splits": {s: int((split_of == s).sum()) for s in ("train", "dev", "test")},
        "oracle_test_accuracy": oracle,
    }
    (out / "synth_info.json").write_text(json.dumps(info, indent=2))
    log.info("wrote synthetic MIntRec-format data to %s", out)
    return info


def _oracle_accuracies(y: np.ndarray, text_group: list[int], video: list, audio: list,
                       vcue: np.ndarray, acue: np.ndarray, prior: np.ndarray) -> dict[str, float]:
    """Accuracy of the generative-rule oracle on the given rows for each modality subset.

    The oracle reads the group from the text cue words, and a bit from a stream when the
    mean frame is clearly closer to one cue than the other; otherwise it takes the more
    frequent intent of the group that agrees with the bits it knows.
    """
    vb = [_oracle_bit(np.concatenate(v, 0) if len(v) else np.zeros((0, VIDEO_DIM), np.float32), vcue) for v in video]
    ab = [_oracle_bit(a, acue) for a in audio]
    return _oracle_table(y, text_group, vb, ab, prior)


def _oracle_bit(frames: np.ndarray, cue: np.ndarray) -> int | None:
    """The cue bit an oracle reads from `(T, dim)` frames, or None when they do not tell."""
    if len(frames) == 0:
        return None
    proj = frames @ (cue[1] - cue[0]) / np.linalg.norm(cue[1] - cue[0])
    top = np.sort(proj)[-max(1, len(proj) // 4):].mean()  # cue frames stand out
    low = np.sort(proj)[: max(1, len(proj) // 4)].mean()
    thr = np.linalg.norm(cue[1] - cue[0]) / 2
    if top > thr and low > -thr:
        return 1
    if low < -thr and top < thr:
        return 0
    return None


def _oracle_table(y: np.ndarray, text_group: list[int], vb: list[int | None], ab: list[int | None],
                  prior: np.ndarray) -> dict[str, float]:
    """Oracle accuracy per modality subset from the text groups and the bits read per row
    (intent = 4 * group + 2 * audio bit + video bit; ids past the label count do not exist)."""
    res = {}
    for k in range(0, 3):
        for subset in combinations(("video", "audio"), k):
            correct = 0
            for i in range(len(y)):
                g = text_group[i]
                cands = [4 * g + j for j in range(4) if 4 * g + j < len(prior)]
                if "video" in subset and vb[i] is not None:
                    cands = [c for c in cands if c % 2 == vb[i]]
                if "audio" in subset and ab[i] is not None:
                    cands = [c for c in cands if (c % 4) // 2 == ab[i]]
                pred = max(cands, key=lambda c: prior[c])
                correct += int(pred == y[i])
            res["+".join(("text",) + subset)] = round(correct / max(1, len(y)), 4)
    return res
