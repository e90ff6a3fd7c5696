"""CPU speed of the OFFICIAL MAG-BERT (thuiar/MIntRec@8d30e9b) and TCL-MAP (thuiar/TCL-MAP@37095a5)
code, to compare with amess's benchmarks/bench.py on the same machine, the same day
(benchmarks/official/README.md).

    python benchmarks/official/bench_official.py --repo mintrec|tclmap --mode train|infer|rss \\
        --official-root ROOT --workdir WORK [--pylib DIR] [--threads 2] [--reps 3] [--steps 20]

ROOT holds the two patched clones as ROOT/MIntRec and ROOT/TCL-MAP; WORK is the folder made by
prepare.py (./bert-base-uncased, ./data/MIntRec, ./runs), the working directory of the official
code; --pylib: folder(s) (os.pathsep-separated) with the extra imports of the official code
(easydict, pandas), put first on sys.path like PYTHONPATH. Each also comes from an environment
variable: AMESS_OFFICIAL_ROOT, AMESS_OFFICIAL_WORKDIR, AMESS_OFFICIAL_PYLIB.
AMESS_BENCH_PAUSE_CMD (optional): a command run as `CMD stop` right before the timed part and
`CMD cont` right after (e.g. to pause other jobs on the machine); unset: nothing is run.

Everything (args, data, model, optimizer, scheduler, loss) is built by the official code itself:
  * args: the official run.py parse_arguments() with the flags of the official
    examples/run_mag_bert.sh / examples/run_TCL_MAP_MIntRec.sh (+ --data_path data, --num_workers),
    then ParamManager (configs/base.py) and, for TCL-MAP, add_config_param and run.py set_up;
  * data: the official DataManager (data/base.py: tokenisation, padding to the benchmark's fixed
    lengths) and its DataLoaders (train batch 16 shuffled, eval batch 8);
  * model, optimizer, scheduler, criterion: the official method manager's __init__
    (MIntRec methods/MAG_BERT/manager.py MAG_BERT; TCL-MAP methods/TCL_MAP/manager.py TCL_MAP_manager);
  * one training step = the body of the manager's _train inner loop (copied below; loss_record and
    the epoch/early-stop bookkeeping left out);
  * one inference step = the body of the manager's _get_outputs loop (forward only, model.eval(),
    torch.set_grad_enabled(False); collecting logits/labels left out).
Modes: train / infer: samples/s over --steps steps, --reps times (median, min, max), after --warmup
untimed steps; rss: --steps training steps, no warm-up, no pause, for the peak RSS (run it alone).
Prints one line `RESULT {json}`.
"""
import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_DIRS = {"mintrec": "MIntRec", "tclmap": "TCL-MAP"}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--repo", choices=sorted(REPO_DIRS), required=True)
p.add_argument("--mode", choices=["train", "infer", "rss"], required=True)
p.add_argument("--official-root", default=os.environ.get("AMESS_OFFICIAL_ROOT"),
               help="folder with the patched clones MIntRec/ and TCL-MAP/ (env AMESS_OFFICIAL_ROOT)")
p.add_argument("--workdir", default=os.environ.get("AMESS_OFFICIAL_WORKDIR"),
               help="working folder made by prepare.py (env AMESS_OFFICIAL_WORKDIR)")
p.add_argument("--pylib", default=os.environ.get("AMESS_OFFICIAL_PYLIB"),
               help="pip --target folder with easydict, pandas (env AMESS_OFFICIAL_PYLIB)")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--reps", type=int, default=3)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--num_workers", type=int, default=0, help="official DataLoader workers (official default: 8)")
opt = p.parse_args()
if not opt.official_root or not opt.workdir:
    p.error("--official-root and --workdir (or AMESS_OFFICIAL_ROOT, AMESS_OFFICIAL_WORKDIR) are required")
repo_dir = os.path.abspath(os.path.join(opt.official_root, REPO_DIRS[opt.repo]))
workdir = os.path.abspath(opt.workdir)
for d in (repo_dir, os.path.join(workdir, "data", "MIntRec")):
    if not os.path.isdir(d):
        p.error(f"{d}: no such folder")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark: the timers below never synchronize a GPU
sys.path.insert(0, HERE)  # tf5_compat
for d in reversed((opt.pylib or "").split(os.pathsep)):
    if d:
        sys.path.insert(0, os.path.abspath(d))

import torch  # noqa: E402

torch.set_num_threads(opt.threads)
import tf5_compat  # noqa: E402,F401  (must precede the official imports)
import warnings  # noqa: E402

warnings.filterwarnings("ignore")
sys.path.insert(0, repo_dir)
os.chdir(workdir)  # ./bert-base-uncased and ./data resolve here
common = ["--data_path", "data", "--num_workers", str(opt.num_workers),
          "--log_path", "runs/logs", "--output_path", "runs/outputs", "--cache_path", "runs/cache"]

if opt.repo == "mintrec":
    # flags of examples/run_mag_bert.sh (without --save_results); flow of run.py run()
    sys.argv = ["run.py", "--dataset", "MIntRec", "--logger_name", "mag_bert", "--method", "mag_bert",
                "--data_mode", "multi-class", "--train", "--seed", "0", "--gpu_id", "0",
                "--video_feats_path", "video_feats.pkl", "--audio_feats_path", "audio_feats.pkl",
                "--text_backbone", "bert-base-uncased", "--config_file_name", "mag_bert",
                "--results_file_name", "mag_bert.csv", *common]
    import run as official_run
    from configs.base import ParamManager
    from data.base import DataManager
    from backbones.base import ModelManager
    from methods import method_map
    from utils.functions import set_torch_seed

    args = ParamManager(official_run.parse_arguments()).args
    official_run.set_logger(args)
    args.pred_output_path, args.model_output_path = official_run.set_output_path(args)
    set_torch_seed(args.seed)
    data = DataManager(args)
    model = ModelManager(args)
    method = method_map[args.method](args, data, model)
else:
    # flags of examples/run_TCL_MAP_MIntRec.sh (without --save_results); flow of run.py __main__
    sys.argv = ["run.py", "--dataset", "MIntRec", "--logger_name", "tcl_map", "--method", "tcl_map", "--tune",
                "--train", "--seed", "0", "--gpu_id", "0", "--text_backbone", "bert-base-uncased",
                "--config_file_name", "TCL_MAP_MIntRec", "--results_file_name", "results_MIntRec.csv", *common]
    import run as official_run
    from configs.base import ParamManager, add_config_param
    from data.base import DataManager
    from methods import method_map
    from utils.functions import set_torch_seed

    args = official_run.parse_arguments()
    args = ParamManager(args).args
    args = add_config_param(args, args.config_file_name)
    args = official_run.set_up(args)
    data = DataManager(args)
    official_run.set_logger(args)
    # official run.py run(): the --tune grid (itertools.product of the config's lists); each list in
    # configs/TCL_MAP_MIntRec.py has one value, so the grid is one point
    for k, v in list(args.items()):
        if isinstance(v, list):
            assert len(v) == 1, f"config list {k}={v}: more than one grid point"
            args[k] = v[0]
    set_torch_seed(args.seed)
    method = method_map[args.method](args, data)

device = method.device
rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after data + model + optimizer
nparams = sum(p.numel() for p in method.model.parameters())


def batches(loader):
    while True:
        yield from loader


train_it = batches(method.train_dataloader)


def train_step():
    """Body of the official manager._train inner loop (as official, apart from loss_record)."""
    batch = next(train_it)
    if opt.repo == "mintrec":  # methods/MAG_BERT/manager.py MAG_BERT._train
        text_feats = batch['text_feats'].to(device)
        video_feats = batch['video_feats'].to(device)
        audio_feats = batch['audio_feats'].to(device)
        label_ids = batch['label_ids'].to(device)
        with torch.set_grad_enabled(True):
            logits = method.model(text_feats, video_feats, audio_feats)
            loss = method.criterion(logits, label_ids)
            method.optimizer.zero_grad()
            loss.backward()
            loss.item()
            method.optimizer.step()
            method.scheduler.step()
    else:  # methods/TCL_MAP/manager.py TCL_MAP_manager._train
        text_feats = batch['text_feats'].to(device)
        cons_text_feats = batch['cons_text_feats'].to(device)
        condition_idx = batch['condition_idx'].to(device)
        video_feats = batch['video_feats'].to(device)
        audio_feats = batch['audio_feats'].to(device)
        label_ids = batch['label_ids'].to(device)
        with torch.set_grad_enabled(True):
            logits, _, condition, cons_condition = method.model(text_feats, video_feats, audio_feats,
                                                                cons_text_feats, condition_idx)
            cons_feature = torch.cat((condition.unsqueeze(1), cons_condition.unsqueeze(1)), dim=1)
            cons_loss = method.cons_criterion(cons_feature)
            cls_loss = method.criterion(logits, label_ids)
            loss = cls_loss + cons_loss
            method.optimizer.zero_grad()
            loss.backward()
            loss.item(); cons_loss.item(); cls_loss.item()  # noqa: E702
            if args.grad_clip != -1.0:
                torch.nn.utils.clip_grad_value_([p for p in method.model.parameters() if p.requires_grad],
                                                args.grad_clip)
            method.optimizer.step()
            method.scheduler.step()
    return label_ids.size(0)


def infer_step(batch):
    """Body of the official manager._get_outputs loop (forward only; eval mode, no grad)."""
    with torch.set_grad_enabled(False):
        if opt.repo == "mintrec":
            method.model(batch['text_feats'].to(device), batch['video_feats'].to(device),
                         batch['audio_feats'].to(device))
        else:
            method.model(batch['text_feats'].to(device), batch['video_feats'].to(device),
                         batch['audio_feats'].to(device), batch['cons_text_feats'].to(device),
                         batch['condition_idx'].to(device))
    return batch['label_ids'].size(0)


PAUSE_CMD = os.environ.get("AMESS_BENCH_PAUSE_CMD", "").strip()


def pause(sig):
    if PAUSE_CMD:
        subprocess.run([*shlex.split(PAUSE_CMD), sig], check=False, stdout=subprocess.DEVNULL)


info = {"repo": opt.repo, "mode": opt.mode, "threads": torch.get_num_threads(), "params": nparams,
        "num_workers": opt.num_workers, "train_batch_size": args.train_batch_size,
        "eval_batch_size": args.eval_batch_size, "text_feat_dim": args.text_feat_dim,
        "video_seq_len": args.video_seq_len, "audio_seq_len": args.audio_seq_len,
        "text_len": int(next(iter(method.train_dataloader))['text_feats'].shape[-1]),
        "attn_impl": sorted({m.config._attn_implementation for m in method.model.modules()
                             if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")})}
rates = []
if opt.mode == "rss":
    method.model.train()
    t = time.perf_counter()
    n = sum(train_step() for _ in range(opt.steps))
    info.update(steps=opt.steps, samples_per_s=round(n / (time.perf_counter() - t), 2))
elif opt.mode == "train":
    method.model.train()
    for _ in range(opt.warmup):
        train_step()
    pause("stop")
    try:
        for _ in range(opt.reps):
            t = time.perf_counter()  # batch assembly by the official DataLoader included
            n = sum(train_step() for _ in range(opt.steps))
            rates.append(n / (time.perf_counter() - t))
    finally:
        pause("cont")
else:
    method.model.eval()
    loader = method.eval_dataloader  # dev split: 199 synthetic samples = 25 batches of 8
    if opt.steps > len(loader):
        p.error(f"--steps {opt.steps} > {len(loader)} eval batches")
    it = iter(loader)
    for _ in range(min(opt.warmup, len(loader))):
        infer_step(next(it))
    pause("stop")
    try:
        for _ in range(opt.reps):
            it = iter(loader)
            t = time.perf_counter()  # batch assembly by the official DataLoader included, as in training
            n = sum(infer_step(next(it)) for _ in range(opt.steps))
            rates.append(n / (time.perf_counter() - t))
    finally:
        pause("cont")
if rates:
    info.update(steps=opt.steps, reps=opt.reps, rates=[round(r, 2) for r in rates],
                median=round(statistics.median(rates), 2), min=round(min(rates), 2), max=round(max(rates), 2))
info["peak_rss_after_setup_mib"] = round(rss_setup, 1)
info["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print("RESULT " + json.dumps(info), flush=True)
