"""MIntRec (ACM MM 2022): 20 intents, Superstore clips, `season_episode_clip` ids.

Takes the folder as downloaded, in either release layout:
`video_data/video_feats.pkl` + `audio_data/audio_feats.pkl` (first release), the same
files flat beside the TSVs, or `video_data/swin_feats.pkl` + `audio_data/wavlm_feats.pkl`.
"""

from __future__ import annotations

from pathlib import Path

from amess.data.base import DatasetReader, DatasetSpec, register_dataset
from amess.data.batch import Sample

MINTREC_LABELS = (
    "Complain", "Praise", "Apologise", "Thank", "Criticize", "Agree", "Taunt", "Flaunt", "Joke", "Oppose",
    "Comfort", "Care", "Inform", "Advise", "Arrange", "Introduce", "Leave", "Prevent", "Greet", "Ask for help",
)
_EMOTION = ("Complain", "Praise", "Apologise", "Thank", "Criticize", "Agree", "Taunt", "Flaunt", "Joke",
            "Oppose", "Care")
MINTREC_BINARY_MAP = {name: ("Emotion" if name in _EMOTION else "Goal") for name in MINTREC_LABELS}
MINTREC_HEADER = ["season", "episode", "clip", "text", "label"]

MINTREC_SPEC = DatasetSpec(
    name="mintrec",
    labels=MINTREC_LABELS,
    text_max_len=30,
    video_max_len=230,
    audio_max_len=480,
    video_files=("video_data/video_feats.pkl", "video_feats.pkl", "video_data/swin_feats.pkl", "swin_feats.pkl"),
    audio_files=("audio_data/audio_feats.pkl", "audio_feats.pkl", "audio_data/wavlm_feats.pkl", "wavlm_feats.pkl"),
    binary_labels=("Emotion", "Goal"),
    binary_map=MINTREC_BINARY_MAP,
)


@register_dataset("mintrec")
class MIntRecReader(DatasetReader):
    spec = MINTREC_SPEC
    header = MINTREC_HEADER

    def parse_row(self, row: dict[str, str], path: Path) -> Sample:
        sid = "_".join([row["season"], row["episode"], row["clip"]])
        label = self.label_id(row["label"], path=path, row=int(row["_line"]), sample_id=sid)
        return Sample(id=sid, text=row["text"], label=label)
