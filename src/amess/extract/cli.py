"""`amess extract`: the command line over `amess.extract.pipeline.extract_dataset`."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def build_extractors(args: argparse.Namespace) -> dict:
    from amess.extract.registry import get_extractor

    face = {"fps": args.fps, "max_side": args.max_side}
    out = {}
    if args.audio_extractor != "none":
        out["audio"] = get_extractor("audio", args.audio_extractor, threads=args.threads)
    if args.video_extractor != "none":
        out["video"] = get_extractor("video", args.video_extractor, threads=args.threads, **face)
    if args.asr:
        out["text"] = get_extractor("text", args.asr, threads=args.threads)
    return out


def cmd_extract(args: argparse.Namespace) -> int:
    from amess.extract.pipeline import extract_dataset

    if bool(args.transcripts) == bool(args.asr):
        raise ValueError("amess extract: give --transcripts TSV (columns id, text) or --asr, one of them")
    summary = extract_dataset(args.clips, args.out, extractors=build_extractors(args), transcripts=args.transcripts,
                              labels=args.labels, split=args.split, max_seconds=args.max_seconds,
                              progress=not args.no_progress, skip_errors=args.skip_errors, overwrite=args.overwrite)
    print(f"wrote {summary.out}: {summary.clips} clips ({summary.extracted} extracted now, {summary.cached} from "
          f"the resume cache), splits {summary.splits}")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} unreadable clip(s): {', '.join(summary.skipped[:10])}")
    if summary.no_face:
        print(f"{summary.no_face} clip(s) without a face (no video frames; the masks handle them)")
    if summary.media_seconds:
        print("speed, seconds of media per second of compute: " +
              ", ".join(f"{k} {v:.2f}" for k, v in summary.speed().items()))
    print(f"check it: amess data check --dataset custom --data-dir {summary.out}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("extract", help="clips -> a dataset folder (custom layout) with audio/video features and text")
    p.add_argument("--clips", nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="clip files, or folders searched recursively; a clip's id is its file name without extension")
    p.add_argument("--transcripts", default=None, help="TSV with columns id, text")
    p.add_argument("--asr", nargs="?", const="whisper", default=None, metavar="EXTRACTOR",
                   help="transcribe the clips (default whisper: the packaged whisper tiny.en; "
                        "whisper:FOLDER_OR_SIZE for another)")
    p.add_argument("--labels", default=None, help="TSV with columns id, label (and optionally split: train/dev/test)")
    p.add_argument("--split", default="train", choices=["train", "dev", "test"],
                   help="split of the clips the labels TSV gives none (default train)")
    p.add_argument("--out", required=True, help="dataset folder to write (rerun the same command to resume)")
    p.add_argument("--audio-extractor", default="whisper",
                   help="whisper (offline, 384-d at 50/s), hf:NAME_OR_FOLDER (wav2vec 2.0, WavLM, HuBERT) or none")
    p.add_argument("--video-extractor", default="dlib",
                   help="dlib (offline 128-d face descriptor), hf:NAME_OR_FOLDER (vision backbone on the speaker "
                        "crop) or none")
    p.add_argument("--fps", type=float, default=4.0, help="video frames sampled per second (default 4)")
    p.add_argument("--max-side", type=int, default=640, help="frames downscaled to this longer side (default 640)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="clips are cut after this many seconds")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the models")
    p.add_argument("--skip-errors", action="store_true", help="skip clips that cannot be decoded, naming them")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder extracted with other settings (extracts every clip again)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_extract)
