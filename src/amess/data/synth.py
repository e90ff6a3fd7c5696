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

`generate_mintrec2` applies the same design to MIntRec2.0's layout: 30 intents in 8 groups,
multi-party dialogues split at dialogue level, out-of-scope rows whose words belong to no
group (or to two) and whose cues lie along a direction no intent uses; its frames can also be
streamed (`iter_mintrec2_features`) instead of pickled.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from amess.data.mintrec import MINTREC_HEADER, MINTREC_LABELS
from amess.data.mintrec2 import MINTREC2_HEADER, MINTREC2_LABELS

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
             cue_strength: float = 3.0, text_noise: float = 0.05, no_video_rate: float = 0.02,
             video_len: tuple[int, ...] = (8, 48), audio_len: tuple[int, ...] = (20, 100)) -> dict:
    """Write `train/dev/test.tsv`, `video_data/video_feats.pkl`, `audio_data/audio_feats.pkl`
    and `synth_info.json` under `out`. Splits are 60/20/20, stratified by intent.

    `video_len` / `audio_len`: frame counts, `(min, max)` uniform or `(min, mean, max)`; the
    defaults keep the demo fast, MIntRec's real ones reach 225 video and 477 audio frames."""
    _check_len_spec("video_len", video_len)
    _check_len_spec("audio_len", audio_len)
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
        n_v = 0 if rng.random() < no_video_rate else _draw_len(rng, video_len)
        n_a = _draw_len(rng, audio_len)
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

    The oracle reads the group from the text cue words (it knows which group's words were
    used), and each cue bit by a likelihood-ratio test with the true cue vectors; it then
    takes the most frequent intent of the group that agrees with the bits it read. It is a
    reference for what the generated data allow, close to but not exactly Bayes-optimal.
    """
    vb = [_oracle_bit(np.concatenate(v, 0) if len(v) else np.zeros((0, VIDEO_DIM), np.float32), vcue) for v in video]
    ab = [_oracle_bit(a, acue) for a in audio]
    return _oracle_table(y, text_group, vb, ab, prior)


def _oracle_bit(frames: np.ndarray, cue: np.ndarray) -> int | None:
    """The cue bit an oracle reads from `(T, dim)` frames, or None when they do not tell.

    A likelihood-ratio test under the generative model: each frame is noise N(0, I), or
    N(c_b, I) for about half of the frames when the cue of bit b is present. The bit with
    the higher likelihood wins when it beats "no cue at all".
    """
    if len(frames) == 0:
        return None
    x = frames.astype(np.float64)
    ll = []
    for c in cue.astype(np.float64):
        lr = x @ c - 0.5 * float(c @ c)  # log N(x; c, I) - log N(x; 0, I), per frame
        ll.append(float(np.logaddexp(np.log(0.5), np.log(0.5) + lr).sum()))
    best = int(np.argmax(ll))
    return best if ll[best] > 0.0 else None


def _oracle_table(y: np.ndarray, text_group: list[int], vb: list[int | None], ab: list[int | None],
                  prior: np.ndarray) -> dict[str, float]:
    """Oracle accuracy per modality subset (each stream alone included) from the text groups
    and the bits read per row (intent = 4 * group + 2 * audio bit + video bit; ids past the
    label count do not exist). Without text, every group stays possible."""
    res = {}
    n_groups = (len(prior) + 3) // 4
    for k in range(1, 4):
        for subset in combinations(("text", "video", "audio"), k):
            correct = 0
            for i in range(len(y)):
                groups = [text_group[i]] if "text" in subset else range(n_groups)
                cands = [4 * g + j for g in groups for j in range(4) if 4 * g + j < len(prior)]
                # a misread bit can rule out every candidate (a group with fewer than 4
                # intents): the oracle then keeps what it had
                if "video" in subset and vb[i] is not None:
                    cands = [c for c in cands if c % 2 == vb[i]] or cands
                if "audio" in subset and ab[i] is not None:
                    cands = [c for c in cands if (c % 4) // 2 == ab[i]] or cands
                pred = max(cands, key=lambda c: prior[c])
                correct += int(pred == y[i])
            res["+".join(subset)] = round(correct / max(1, len(y)), 4)
    return res


# --- MIntRec2.0 --------------------------------------------------------------------------
#
# Same fusion design on MIntRec2.0's 30 intents: 8 groups of intents 4g .. 4g+3 in official
# order (group 7 holds only Thank and Warn), text names the group, the video bit and audio bit
# resolve within it. Out-of-scope rows (`UNK`) speak words of no group (their own vocabulary)
# or of two groups at once, and their cues lie along a direction orthogonal to the bit cues.
# Utterances come in multi-party dialogues, split at dialogue level like the real release.

MINTREC2_GROUP_WORDS = (
    ("right", "sure", "should", "agreed", "sorry", "true", "exactly", "suggest"),
    ("schedule", "help", "think", "opinion", "arrange", "feeling", "need", "alright"),
    ("unfair", "terrible", "worry", "confirm", "wrong", "awful", "fine", "annoying"),
    ("doubt", "seriously", "because", "actually", "best", "mean", "reason", "honestly"),
    ("hello", "hi", "meet", "announce", "news", "welcome", "come", "name"),
    ("funny", "goodbye", "leaving", "no", "plan", "tomorrow", "against", "kidding"),
    ("great", "stop", "refuse", "loser", "amazing", "wait", "never", "brilliant"),
    ("thanks", "thank", "careful", "warning", "dangerous", "grateful", "watch", "appreciate"),
)
OOS_WORDS = ("banana", "weather", "purple", "guitar", "ocean", "pizza", "dinosaur", "laundry", "traffic",
             "elevator", "umbrella", "volcano")
# A plausible frequency ranking of the 30 intents; class weights fall as 1 / rank ** zipf.
MINTREC2_RANKING = (
    "Inform", "Explain", "Complain", "Agree", "Acknowledge", "Confirm", "Doubt", "Ask for help",
    "Asking for opinions", "Oppose", "Praise", "Taunt", "Joke", "Criticize", "Emphasize", "Advise", "Plan",
    "Arrange", "Thank", "Care", "Apologise", "Greet", "Invite", "Leave", "Refuse", "Comfort", "Introduce", "Warn",
    "Prevent", "Flaunt",
)
MINTREC2_SOURCES = {
    "Superstore": ("Amy", "Jonah", "Dina", "Glenn", "Garrett", "Mateo", "Cheyenne", "Sandra"),
    "The Big Bang Theory": ("Sheldon", "Leonard", "Penny", "Howard", "Raj", "Bernadette", "Amy"),
    "Friends": ("Rachel", "Monica", "Phoebe", "Joey", "Chandler", "Ross"),
}
MINTREC2_SPLIT_SHARES = {"train": 6165, "dev": 1106, "test": 2033}  # in-scope rows of the real release
MINTREC2_VIDEO_FILE = "total/video_data/swin_roi.pkl"
MINTREC2_AUDIO_FILE = "total/audio_data/wavlm_feats.pkl"
MINTREC2_SUBSET_DIRS = {"total": "total", "in-scope": "in-scope", "out-of-scope": "out-of-scope/MIntRec2.0-OOD"}
AUDIO_FPS = 50  # WavLM frames per second: an utterance lasts audio frames / 50 seconds
# (min, mean, max) frame counts close to the real release, for benchmarks at scale
REAL_VIDEO_LEN = (10, 60, 180)
REAL_AUDIO_LEN = (40, 200, 400)
_DIMS = {"video": VIDEO_DIM, "audio": AUDIO_DIM}
_STREAM = {"video": 1, "audio": 2}  # per-sample seeds: (seed, stream, utterance index)


@dataclass
class _Plan2:
    """Everything about a MIntRec2.0-format dataset except the frames, which are drawn per
    utterance from their own seed (so they can be streamed in any order, one at a time)."""

    settings: dict
    rows: list[tuple[str, ...]]  # the 8 TSV columns
    ids: list[str]
    labels: np.ndarray  # (N,) int, len(MINTREC2_LABELS) = out-of-scope
    text_group: list[int | None]  # the group the text names; None for out-of-scope vocabulary or mixed
    split: list[str]
    frames: dict[str, np.ndarray]  # modality -> (N,) frame counts
    cued: dict[str, np.ndarray]  # modality -> (N,) bool: the sample's frames carry a cue
    video_3d: np.ndarray  # (N,) bool: video stored as (T, 1, 256)
    cues: dict[str, np.ndarray]  # modality -> (2, dim) bit cues
    oos_cues: dict[str, np.ndarray]  # modality -> (dim,) out-of-scope cue, orthogonal to the bit cues
    prior: np.ndarray  # (30,) intent sampling distribution


def generate_mintrec2(out: str | Path, *, seed: int = 0, size: int = 3000, oos_rate: float = 0.38,
                      cue_rate: float = 0.85, cue_strength: float = 3.0, text_noise: float = 0.05,
                      oos_mixed_rate: float = 0.3, no_video_rate: float = 0.02, video_3d_rate: float = 0.25,
                      zipf: float = 0.8, video_len: tuple[int, ...] = (8, 48), audio_len: tuple[int, ...] = (20, 100),
                      write_pickles: bool = True) -> dict:
    """Write a synthetic dataset in the full MIntRec2.0 layout under `out`.

    `size` utterances in dialogues of 4-15 turns (2-4 speakers of one show); a share
    `oos_rate` is out-of-scope (`UNK`). Written: `{in-scope, out-of-scope/MIntRec2.0-OOD,
    total}/{train,dev,test}.tsv` (total holds both), one feature pair
    `total/video_data/swin_roi.pkl` (id -> float32 `(T, 256)`, a share `video_3d_rate` as
    `(T, 1, 256)`) and `total/audio_data/wavlm_feats.pkl` (id -> `(T, 768)`), and
    `synth_info.json`. Splits are at dialogue level, sized like the real in-scope
    6165 / 1106 / 2033 rows.

    `video_len` / `audio_len` are frame counts: `(min, max)` uniform, or `(min, mean, max)`
    from a scaled Beta (`REAL_VIDEO_LEN`, `REAL_AUDIO_LEN` approach the real release). Each
    pickle is built and written in turn (peak memory: one modality). With
    `write_pickles=False` no feature file is written; stream the same frames with
    `iter_mintrec2_features(out, modality)`, e.g. into `amess.data.store.convert_arrays`.
    Returns the contents of `synth_info.json`.
    """
    out = Path(out)
    settings = dict(seed=seed, size=size, oos_rate=oos_rate, cue_rate=cue_rate, cue_strength=cue_strength,
                    text_noise=text_noise, oos_mixed_rate=oos_mixed_rate, no_video_rate=no_video_rate,
                    video_3d_rate=video_3d_rate, zipf=zipf, video_len=list(video_len), audio_len=list(audio_len))
    plan = _plan_mintrec2(settings)
    C = len(MINTREC2_LABELS)
    splits = ("train", "dev", "test")

    subsets = {"total": lambda y: True, "in-scope": lambda y: y < C, "out-of-scope": lambda y: y == C}
    subset_counts: dict[str, dict[str, int]] = {}
    for subset, keep in subsets.items():
        folder = out / MINTREC2_SUBSET_DIRS[subset]
        folder.mkdir(parents=True, exist_ok=True)
        subset_counts[subset] = {}
        for split in splits:
            idx = [i for i in range(len(plan.ids)) if plan.split[i] == split and keep(plan.labels[i])]
            with open(folder / f"{split}.tsv", "w", encoding="utf-8") as f:
                f.write("\t".join(MINTREC2_HEADER) + "\n")
                f.writelines("\t".join(plan.rows[i]) + "\n" for i in idx)
            subset_counts[subset][split] = len(idx)

    # features, one modality at a time; the oracle reads the bits of the in-scope test rows
    test_idx = [i for i in range(len(plan.ids)) if plan.split[i] == "test" and plan.labels[i] < C]
    bits: dict[str, dict[int, int | None]] = {}
    for modality, rel in (("video", MINTREC2_VIDEO_FILE), ("audio", MINTREC2_AUDIO_FILE)):
        wanted = set(test_idx)
        bits[modality] = {}
        feats: dict[str, np.ndarray] | None = {} if write_pickles else None
        for i in (range(len(plan.ids)) if write_pickles else test_idx):
            x = _mintrec2_frames(plan, i, modality)
            if feats is not None:
                feats[plan.ids[i]] = x
            if i in wanted:
                bits[modality][i] = _oracle_bit(x.reshape(x.shape[0], x.shape[-1]), plan.cues[modality])
        if feats is not None:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            with open(out / rel, "wb") as f:
                pickle.dump(feats, f, protocol=4)
            del feats
            log.info("wrote %s", out / rel)

    oracle = _oracle_table(plan.labels[test_idx], [plan.text_group[i] for i in test_idx],
                           [bits["video"][i] for i in test_idx], [bits["audio"][i] for i in test_idx], plan.prior)
    labels = np.asarray(plan.labels)
    split_arr = np.array(plan.split)
    info = {
        "generator": "amess.data.synth.generate_mintrec2", "settings": settings,
        "splits": {s: {"rows": int((split_arr == s).sum()), "in_scope": int(((split_arr == s) & (labels < C)).sum()),
                       "oos": int(((split_arr == s) & (labels == C)).sum()),
                       "dialogues": len({plan.rows[i][0] for i in np.flatnonzero(split_arr == s)})}
                   for s in splits},
        "subsets": subset_counts,
        "label_counts": {n: int((labels == c).sum()) for c, n in enumerate(MINTREC2_LABELS + ("UNK",))},
        "feature_files": {"video": MINTREC2_VIDEO_FILE, "audio": MINTREC2_AUDIO_FILE} if write_pickles else None,
        "oracle_test_accuracy": oracle,
    }
    (out / "synth_info.json").write_text(json.dumps(info, indent=2))
    log.info("wrote synthetic MIntRec2.0-format data to %s", out)
    return info


def iter_mintrec2_features(source: str | Path | Mapping[str, Any], modality: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(sample_id, frames)` of one modality for every utterance of a generated dataset,
    one at a time, exactly as `generate_mintrec2` pickles them.

    `source` is the generated folder, its `synth_info.json`, or that file's contents (or
    just its `settings`). Memory stays at one sample's frames, so this feeds
    `amess.data.store.convert_arrays` at real scale without any pickle.
    """
    if modality not in _DIMS:
        raise ValueError(f"modality must be `video` or `audio`, got {modality!r}")
    if isinstance(source, Mapping):
        settings = dict(source.get("settings", source))
    else:
        p = Path(source)
        p = p / "synth_info.json" if p.is_dir() else p
        settings = json.loads(p.read_text())["settings"]
    plan = _plan_mintrec2(settings)
    for i, sid in enumerate(plan.ids):
        yield sid, _mintrec2_frames(plan, i, modality)


def _plan_mintrec2(settings: Mapping[str, Any]) -> _Plan2:
    """Draw dialogues, speakers, labels, texts, timestamps, frame counts, cue flags and splits."""
    s = dict(settings)
    video_len, audio_len = tuple(s["video_len"]), tuple(s["audio_len"])
    for name, spec in (("video_len", video_len), ("audio_len", audio_len)):
        _check_len_spec(name, spec)
    if s["size"] < 1:
        raise ValueError(f"size must be >= 1, got {s['size']}")
    if not 0 <= s["oos_rate"] < 1:
        raise ValueError(f"oos_rate must lie in [0, 1), got {s['oos_rate']}")
    rng = np.random.default_rng(s["seed"])
    cues = {m: _cue_dirs(rng, 2, d, s["cue_strength"]) for m, d in _DIMS.items()}
    oos_cues = {m: _orthogonal_dir(rng, cues[m], s["cue_strength"]) for m in _DIMS}
    C, n_groups = len(MINTREC2_LABELS), len(MINTREC2_GROUP_WORDS)
    w = np.array([1.0 / (MINTREC2_RANKING.index(n) + 1) ** s["zipf"] for n in MINTREC2_LABELS])
    prior = w / w.sum()

    rows: list[tuple[str, ...]] = []
    labels, text_group, dialogue_of = [], [], []
    n_v, n_a, cued_v, cued_a, v3d = [], [], [], [], []
    for d, n_utt in enumerate(_dialogue_lengths(rng, s["size"])):
        source = list(MINTREC2_SOURCES)[int(rng.integers(len(MINTREC2_SOURCES)))]
        speakers = [str(x) for x in rng.choice(MINTREC2_SOURCES[source], int(rng.integers(2, 5)), replace=False)]
        t = float(rng.uniform(5.0, 1200.0))  # dialogue start within the episode, seconds
        speaker: str | None = None
        for u in range(n_utt):
            if speaker is None or rng.random() < 0.8:  # mostly turn-taking, sometimes the same speaker goes on
                speaker = str(rng.choice([x for x in speakers if x != speaker]))
            if rng.random() < s["oos_rate"]:
                y, tg = C, None
                if rng.random() < s["oos_mixed_rate"]:
                    pair = rng.choice(n_groups, 2, replace=False)
                    text = _mixed_sentence(rng, [MINTREC2_GROUP_WORDS[int(g)] for g in pair])
                else:
                    text = _sentence(rng, 0, (OOS_WORDS,))
            else:
                y = int(rng.choice(C, p=prior))
                tg = int(rng.integers(n_groups)) if rng.random() < s["text_noise"] else y // 4
                text = _sentence(rng, tg, MINTREC2_GROUP_WORDS)
            n_v.append(0 if rng.random() < s["no_video_rate"] else _draw_len(rng, video_len))
            n_a.append(_draw_len(rng, audio_len))
            cued_v.append(rng.random() < s["cue_rate"])
            cued_a.append(rng.random() < s["cue_rate"])
            v3d.append(rng.random() < s["video_3d_rate"])
            end = t + n_a[-1] / AUDIO_FPS
            rows.append((str(d), str(u), text, (MINTREC2_LABELS + ("UNK",))[y], _timestamp(t), _timestamp(end),
                         source, speaker))
            t = end + float(rng.uniform(0.1, 1.5))
            labels.append(y)
            text_group.append(tg)
            dialogue_of.append(d)

    labels_arr = np.array(labels, dtype=np.int64)
    in_scope = np.bincount(np.array(dialogue_of), weights=(labels_arr < C).astype(float))
    split_of_dialogue = _dialogue_splits(rng, in_scope)
    return _Plan2(
        settings=s, rows=rows, ids=[f"dia{r[0]}_utt{r[1]}" for r in rows], labels=labels_arr,
        text_group=text_group, split=[split_of_dialogue[d] for d in dialogue_of],
        frames={"video": np.array(n_v), "audio": np.array(n_a)},
        cued={"video": np.array(cued_v), "audio": np.array(cued_a)}, video_3d=np.array(v3d),
        cues=cues, oos_cues=oos_cues, prior=prior,
    )


def _mintrec2_frames(plan: _Plan2, i: int, modality: str) -> np.ndarray:
    """Frames of utterance `i`: `(T, 768)` audio, `(T, 256)` or `(T, 1, 256)` video, float32."""
    rng = np.random.default_rng([plan.settings["seed"], _STREAM[modality], i])
    y = int(plan.labels[i])
    cue = None
    if plan.cued[modality][i]:
        if y == len(MINTREC2_LABELS):
            cue = plan.oos_cues[modality]
        else:
            cue = plan.cues[modality][y % 2 if modality == "video" else (y % 4) // 2]
    x = _frames(rng, int(plan.frames[modality][i]), _DIMS[modality], cue)
    return x[:, None, :] if modality == "video" and plan.video_3d[i] else x


def _mixed_sentence(rng: np.random.Generator, groups: list[tuple[str, ...]]) -> str:
    """One cue word of each group among 4-8 filler words, shuffled."""
    words = [str(rng.choice(g)) for g in groups] + list(rng.choice(FILLER, int(rng.integers(4, 9))))
    rng.shuffle(words)
    return " ".join(words) + "."


def _orthogonal_dir(rng: np.random.Generator, cues: np.ndarray, cue_strength: float) -> np.ndarray:
    """A random direction orthogonal to the rows of `cues`, with the norm `_cue_dirs` gives."""
    dim = cues.shape[1]
    q, _ = np.linalg.qr(cues.T.astype(np.float64))  # (dim, k) orthonormal basis of the cue span
    u = rng.standard_normal(dim)
    u -= q @ (q.T @ u)
    return (cue_strength * u / np.linalg.norm(u) * np.sqrt(dim) / 4).astype(np.float32)


def _check_len_spec(name: str, spec: tuple[int, ...]) -> None:
    ok = (len(spec) == 2 and 0 <= spec[0] <= spec[1]) or (len(spec) == 3 and 0 <= spec[0] < spec[1] < spec[2])
    if not ok:
        raise ValueError(f"{name} must be (min, max) or (min, mean, max) frame counts with min < mean < max, "
                         f"got {spec}")


def _draw_len(rng: np.random.Generator, spec: tuple[int, ...]) -> int:
    """A frame count: uniform on [min, max], or min + (max - min) * Beta with the given mean."""
    if len(spec) == 2:
        return int(rng.integers(spec[0], spec[1] + 1))
    lo, mean, hi = spec
    m = (mean - lo) / (hi - lo)
    return lo + int(round((hi - lo) * rng.beta(5 * m, 5 * (1 - m))))


def _dialogue_lengths(rng: np.random.Generator, size: int) -> list[int]:
    """Dialogue lengths of 4-15 turns summing to `size` (fewer only when size < 4)."""
    out, rem = [], size
    while rem > 0:
        n = int(rng.integers(4, 16))
        if rem - n < 4:
            n = rem if rem <= 15 else rem - 4
        out.append(n)
        rem -= n
    return out


def _dialogue_splits(rng: np.random.Generator, in_scope: np.ndarray) -> list[str]:
    """Split of each dialogue: dialogues in random order, each to the split furthest below its
    share of in-scope rows (`MINTREC2_SPLIT_SHARES`)."""
    names = list(MINTREC2_SPLIT_SHARES)
    share = np.array([MINTREC2_SPLIT_SHARES[n] for n in names], dtype=np.float64)
    target = share / share.sum() * in_scope.sum()
    got = np.zeros(len(names))
    out = [""] * len(in_scope)
    for d in rng.permutation(len(in_scope)):
        k = int(np.argmax(target - got))
        out[d] = names[k]
        got[k] += in_scope[d]
    return out


def _timestamp(seconds: float) -> str:
    """`H:MM:SS.mmm` within the episode."""
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"
