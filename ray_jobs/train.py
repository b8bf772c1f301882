"""Train the nucleus U-Net and one Attention DeepLabv3+ per scale with Ray Train; write a bundle.

    python -m ray_jobs.train --data URI --out BUNDLE_URI [--stage nucleus|cytoplasm|all]
        [--preset tiny|paper] [--scales 0.5 1.75 ...] [--num-workers N] [--use-gpu]
        [--epochs E] [--batch-size B] [--resume] [--equalize] [--stain-normalize macenko|reinhard]
        [--encoder-weights W]
        [--final --epochs-from BUNDLE_OR_CHECKPOINTS]

Each stage (the nucleus network, then each scale) is one data-parallel ``TorchTrainer``
run fed by Ray Data: the driver only lists the images; CPU tasks decode them and build
the examples once (materialised in the object store), and re-run guidance jitter, crops
and augmentation every epoch while the workers stream their shards. Every epoch is
validated with the official and strict metrics and checkpointed (latest training state
plus the best weights so far) under ``--checkpoints``; ``--resume`` continues interrupted
runs from their last checkpoint. The finished bundle is validated end to end (each scale
alone, the rules, and the rule around the true nuclei) and the figures go into its
provenance. ``--final`` retrains on train + validation for the epochs chosen on the split.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from ray_jobs.faults import fault_at
from segpc.config import Config, preset
from segpc.errors import InputError, exit_status
from segpc.io.storage import filesystem
from segpc.models.bundle import Bundle, load_bundle, network_name, new_bundle, read_bundle_meta, save_bundle
from segpc.training.guidance import GuidanceJitter
from segpc.training.splits import SampleRef, Splits

# Ray Data's share of the CPUs: decoding runs before the workers start, a CPU a task (and as
# few task processes as CPUs: each imports the libraries); the per-epoch tasks run beside
# the workers, which leave them a whole CPU: with half of one, two workers on 2 cores waited
# for their batches and trained at a third of the speed (benchmarks/train_ingest.py).
DECODE_CPUS, AUGMENT_CPUS, DATA_HEADROOM = 1.0, 0.25, 1.0
MAX_BLOCKS = 2000  # one image a block (fine-grained block-order shuffling) up to this many
EPOCH_BATCH = 32  # examples a per-epoch task jitters, crops and augments: 8 cost 2x in task overhead
_INPUT_ERROR = re.compile(r"segpc\.errors\.InputError: (.+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="SegPC root with train/ and validation/, or a flat synthetic archive "
                        "(x/, y/, slides.csv; split by slide); local path or s3://")
    p.add_argument("--out", required=True, help="bundle folder to write (local or s3://)")
    p.add_argument("--stage", choices=["nucleus", "cytoplasm", "all"], default="all")
    p.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="cytoplasm scales to train (default: all of the preset's)")
    p.add_argument("--num-workers", type=int, default=1, help="data-parallel workers per run")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--autoscale", action="store_true",
                   help="with --use-gpu: do not require the GPUs to exist yet (autoscaling cluster)")
    p.add_argument("--epochs", type=int, default=None, help="default: 30 (tiny), 100 (paper)")
    p.add_argument("--nucleus-epochs", type=int, default=None,
                   help="epochs of the nucleus U-Net (default: --epochs); it learns slowest")
    p.add_argument("--final", action="store_true",
                   help="retrain on train + validation for the epochs chosen on the split: each "
                        "network's best epoch from --epochs-from, or explicit --epochs/--nucleus-epochs")
    p.add_argument("--epochs-from", default=None, metavar="URI",
                   help="with --final: a bundle, or a --checkpoints folder, of a run on the split")
    p.add_argument("--equalize", action="store_true",
                   help="per-channel histogram equalisation of the cytoplasm crops (training and inference)")
    p.add_argument("--stain-normalize", choices=["macenko", "reinhard"], default=None,
                   help="recolour every image to a stain reference fitted on the training split (kept in "
                        "the bundle; inference applies it too): for bundles that will see other labs' stains")
    p.add_argument("--encoder-weights", default=None, metavar="imagenet|PATH|s3://URI",
                   help="starting weights of both stages' encoders (default: random); a file fits one "
                        "encoder, so for the paper preset's two give one per stage:")
    p.add_argument("--nucleus-encoder-weights", default=None, metavar="imagenet|PATH|s3://URI",
                   help="the U-Net encoder's starting weights (default: --encoder-weights)")
    p.add_argument("--cytoplasm-encoder-weights", default=None, metavar="imagenet|PATH|s3://URI",
                   help="the Attention DeepLabv3+ encoders' starting weights (default: --encoder-weights)")
    p.add_argument("--batch-size", type=int, default=None, help="per worker; default 8")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate, cosine decay; default 1e-3 (tiny, from scratch), 1e-4 (paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoints", default=None,
                   help="where Ray Train keeps checkpoints (default: <out>-checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the runs found under --checkpoints")
    p.add_argument("--max-failures", type=int, default=2,
                   help="worker-group restarts Ray Train may do within a run (from its last checkpoint)")
    p.add_argument("--restart", action="store_true", help="discard earlier runs under --checkpoints")
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="flat archives only: share of slides held out for validation")
    p.add_argument("--mpp", type=float, default=None, metavar="UM",
                   help="pixel size of the training images in micrometres per pixel, recorded in the "
                        "bundle: whole slides are then read at this pixel size (default: unknown; "
                        "SegPC-2021 does not state it)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)  # --s3-endpoint takes effect in main(), for the job's duration
    args.explicit_epochs = args.epochs is not None
    if args.epochs_from and not args.final:
        p.error("--epochs-from is for --final")
    if args.epochs is None:
        args.epochs = 30 if args.preset == "tiny" else 100
    if args.nucleus_epochs is None:
        args.nucleus_epochs = args.epochs
    if args.batch_size is None:
        args.batch_size = 8
    if args.lr is None:
        args.lr = 1e-3 if args.preset == "tiny" else 1e-4
    if args.checkpoints is None:
        args.checkpoints = args.out.rstrip("/") + "-checkpoints"
    if args.mpp is not None and not 0 < args.mpp < float("inf"):
        p.error("--mpp must be a positive number of micrometres per pixel")
    if args.num_workers < 1 or args.epochs < 1 or args.batch_size < 2:
        p.error("--num-workers and --epochs must be >= 1, --batch-size >= 2")
    return args


def configure(args: argparse.Namespace) -> Config:
    """The preset with the flags that change the method (histogram equalisation)."""
    cfg = preset(args.preset)
    cfg.cytoplasm.equalize = args.equalize
    return cfg


def stages(args: argparse.Namespace, cfg: Config) -> list[tuple[str, float | None]]:
    """(stage, scale) of every network to train, in order: the nucleus U-Net first."""
    scales = args.scales or list(cfg.cytoplasm.scales)
    return ([("nucleus", None)] if args.stage in ("nucleus", "all") else []) + \
           ([("cytoplasm", s) for s in scales] if args.stage in ("cytoplasm", "all") else [])


def check_inputs(args: argparse.Namespace, cfg: Config) -> tuple[Splits, dict[str, int], dict]:
    """Everything that can be wrong before training starts: data, --final, encoder weights,
    output, GPUs, scales. Returns the data's listing, the epochs of each network and the
    encoders' provenance. Reads no image: the decoding tasks check each one."""
    import ray

    from segpc.models import encoder_provenance
    from segpc.training.splits import check_trainable, list_splits

    bad = [s for s in (args.scales or []) if s not in cfg.cytoplasm.scales]
    if bad:
        raise InputError(f"--scales {bad}: the {cfg.preset} preset has scales {list(cfg.cytoplasm.scales)}")
    splits = list_splits(args.data, args.val_fraction)
    if args.final and not splits.has_validation:
        raise InputError(f"--final retrains on train + validation for the epochs chosen on the validation "
                         f"split, but {args.data} has no validation split to have chosen them on")
    check_trainable(splits.train, f"{args.data} (training split)")
    if not splits.has_validation:
        raise InputError(f"{args.data}: no validation split (a SegPC root needs validation/ beside train/; "
                         "a flat archive needs --val-fraction > 0)")
    epochs = network_epochs(args, cfg)
    train = splits.train + (splits.validation if args.final else [])
    n_cells = sum(r.n_cells for r in train)
    if len(train) < args.num_workers or n_cells < 2 * args.num_workers:
        raise InputError(f"{args.data}: {len(train)} training images / {n_cells} cells are too few "
                         f"for {args.num_workers} workers")
    print(f"[train] data: {len(train)} training images ({n_cells} cells), "
          f"{0 if args.final else len(splits.validation)} validation images"
          f"{' (--final: validation split trained on)' if args.final else ''}", flush=True)
    for weights in {encoder_weights(args, stage) for stage, _ in stages(args, cfg)} - {None, "imagenet"}:
        check_weights_file(weights)
    encoders = {"nucleus": encoder_provenance(encoder_weights(args, "nucleus"), cfg.nucleus.encoder),
                "cytoplasm": encoder_provenance(encoder_weights(args, "cytoplasm"), cfg.cytoplasm.encoder)}
    fs, root = filesystem(args.out)
    try:
        fs.makedirs(root, exist_ok=True)
        probe = f"{root}/.write-test"
        fs.pipe(probe, b"ok")
        fs.rm(probe)
    except Exception as exc:
        raise InputError(f"{args.out}: bundle location is not writable ({exc})") from None
    if args.use_gpu and not args.autoscale:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < args.num_workers:
            raise InputError(f"--use-gpu with {args.num_workers} worker(s) needs as many GPUs; the "
                             f"Ray cluster has {gpus:g} (pass --autoscale on an autoscaling cluster)")
    return splits, epochs, encoders


def encoder_weights(args: argparse.Namespace, stage: str) -> str | None:
    """The starting weights of ``stage``'s encoder: its own flag, else --encoder-weights."""
    return getattr(args, f"{stage}_encoder_weights") or args.encoder_weights


def check_weights_file(uri: str) -> None:
    """An encoder weight file that exists and is safetensors, from its header alone (the
    weights themselves are loaded by each worker; whether they fit is checked there)."""
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise ValueError(f"header size {size}")
            json.loads(f.read(size))
    except FileNotFoundError:
        raise InputError(f"--encoder-weights {uri}: not found") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"--encoder-weights {uri}: not a readable safetensors file "
                         f"({type(exc).__name__}: {exc})") from None


def network_epochs(args: argparse.Namespace, cfg: Config) -> dict[str, int]:
    """Epochs per network: the flags; with --final, each network's best epoch of the run
    named by --epochs-from (or the explicit flags)."""
    names = [network_name(scale) for _, scale in stages(args, cfg)]
    if not args.final or not args.epochs_from:
        if args.final and not args.explicit_epochs:
            raise InputError("--final needs the epoch counts chosen on the validation split: pass "
                             "--epochs-from BUNDLE_OR_CHECKPOINTS or explicit --epochs (and --nucleus-epochs)")
        return {n: args.nucleus_epochs if n == "nucleus" else args.epochs for n in names}
    chosen = chosen_epochs(args.epochs_from)
    missing = [n for n in names if n not in chosen]
    if missing:
        raise InputError(f"--epochs-from {args.epochs_from}: no best epoch recorded for {missing} "
                         f"(it has {sorted(chosen)})")
    return {n: chosen[n] for n in names}


def chosen_epochs(uri: str) -> dict[str, int]:
    """{network: best epoch (1-based)} of a bundle's training provenance, or of the latest
    checkpoint of each run in a checkpoints folder."""
    try:
        training = read_bundle_meta(uri).get("provenance", {}).get("training", {})
        return {n: int(t["best_epoch"]) for n, t in training.items() if "best_epoch" in t}
    except InputError:
        pass
    fs, root = filesystem(uri)
    out = {}
    try:
        for state in sorted(fs.glob(f"{root}/*/checkpoint_*/state.json")):
            network = state[len(root) + 1:].split("/", 1)[0]
            with fs.open(state) as f:
                out[network] = int(json.load(f)["best_epoch"]) + 1  # later checkpoints win
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"--epochs-from {uri}: cannot read its checkpoints ({exc})") from None
    if not out:
        raise InputError(f"--epochs-from {uri}: neither a bundle nor a folder of training checkpoints")
    return out


def base_bundle(args: argparse.Namespace, cfg: Config) -> Bundle:
    """The bundle to train into: the existing one at --out (partial retraining), or new."""
    try:
        meta = read_bundle_meta(args.out)
    except InputError:
        return new_bundle(cfg)
    existing = Config.from_dict(meta["config"])
    if existing.preset != cfg.preset:
        raise InputError(f"{args.out} holds a {existing.preset!r} bundle; refusing to mix in "
                         f"{cfg.preset!r} networks (choose another --out)")
    if existing.cytoplasm.equalize != cfg.cytoplasm.equalize:
        raise InputError(f"{args.out} holds a bundle trained {'with' if existing.cytoplasm.equalize else 'without'}"
                         " --equalize; pass the same setting or choose another --out")
    if existing.stain.method != (args.stain_normalize or "none"):
        raise InputError(f"{args.out} holds a bundle trained with stain normalisation {existing.stain.method!r}; "
                         "pass the same --stain-normalize or choose another --out")
    return load_bundle(args.out)


def fit_stain(args: argparse.Namespace, cfg: Config, bundle: Bundle, splits: Splits) -> dict | None:
    """With --stain-normalize: the stain reference every network of the bundle trains and runs
    with. A bundle being added to keeps its own; else it is fitted on training-split images
    (never validation ones, even with --final). Returns its provenance."""
    from segpc.training.data import stain_reference

    if not args.stain_normalize:
        return None
    if bundle.config.stain.method == args.stain_normalize:  # partial retraining: keep it
        cfg.stain = replace(bundle.config.stain)
        return bundle.provenance.get("stain")
    reference, ids = stain_reference(splits.train, args.stain_normalize)
    cfg.stain.method, cfg.stain.reference = args.stain_normalize, reference
    bundle.config.stain = replace(cfg.stain)
    print(f"[train] {args.stain_normalize} stain reference fitted on {len(ids)} training images", flush=True)
    return {"method": args.stain_normalize, "images": ids}


def training_dataset(refs: list[SampleRef], stage: str, scale: float | None, cfg: Config):
    """The Ray Dataset a run trains on: one row per example, uint8 ``x``, ``y`` and ``row``.

    Decoding and building the examples (stage 1: fitted images; stage 2: each cell's
    context) is done once and materialised in the object store (which spills to disk, so the
    data may outgrow memory): re-reading and re-decoding camera-size BMPs every epoch would
    cost more CPU than the training itself on small networks, and the decoded contexts are
    a few hundred KB per cell. Guidance jitter, the crop and augmentation are cheap, random
    and must differ every epoch, so they stay lazy and re-run as each epoch streams; bad
    images and masks surface here, before any worker starts, as an InputError.
    """
    import ray.data

    from ray_jobs.common import worker_runtime_env
    from segpc.training.ingest import CellContexts, CellCrops, NucleusExamples, augment_examples, ref_rows

    if stage == "nucleus":
        decode, per_epoch = NucleusExamples(cfg.nucleus.input_size, cfg.stain), augment_examples
    else:  # images without labelled cells have no stage-2 example
        refs = [r for r in refs if r.masks]
        jitter = GuidanceJitter()
        decode, per_epoch = CellContexts(scale, cfg, jitter), CellCrops(scale, cfg, jitter)
    rows = ref_rows(refs)
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
    # the object-storage settings, for the tasks that read
    common = {"batch_format": "numpy", "runtime_env": worker_runtime_env() or None}
    try:
        examples = ds.map_batches(decode, batch_size=1, num_cpus=DECODE_CPUS, **common).materialize()
    except Exception as exc:
        bad = _input_error(exc)
        if bad is None:
            raise
        raise bad from None
    if examples.count() == 0:
        raise InputError(f"{network_name(scale)}: no training examples (no labelled cells)")
    return examples.randomize_block_order().map_batches(per_epoch, batch_size=EPOCH_BATCH, num_cpus=AUGMENT_CPUS,
                                                        **common)


def measure_diameter(refs: list[SampleRef], cfg: Config) -> dict:
    """The median diameter of the training nuclei at the U-Net's input, and the most common
    training field shape (Ray Data tasks read the masks; one number per nucleus and one shape
    per image come back)."""
    import numpy as np
    import ray.data

    from ray_jobs.common import worker_runtime_env
    from segpc.training.ingest import NucleusDiameters, ref_rows

    rows = ref_rows([r for r in refs if r.masks])
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
    batches = list(ds.map_batches(
        NucleusDiameters(cfg.nucleus.input_size), batch_size=4, num_cpus=DECODE_CPUS, batch_format="numpy",
        runtime_env=worker_runtime_env() or None).iter_batches(batch_format="numpy"))
    cols = {k: np.concatenate([b[k] for b in batches] or [np.zeros(0)]) for k in ("d", "h", "w")}
    d, fields = cols["d"][~np.isnan(cols["d"])], np.isnan(cols["d"])
    if not d.size:
        raise InputError("no labelled nucleus in the training split to measure nuclei on")
    shapes, counts = np.unique(np.stack([cols["h"][fields], cols["w"][fields]], 1), axis=0, return_counts=True)
    return {"px_at_input": round(float(np.median(d)), 2), "nuclei": int(d.size),
            "input_size": cfg.nucleus.input_size, "field_shape": [int(v) for v in shapes[counts.argmax()]]}


def check_decodes(refs: list[SampleRef]) -> None:
    """Every image and mask of ``refs`` decodes and fits (Ray Data tasks, in parallel): the
    validation split is otherwise read only at the end of the first epoch."""
    import ray.data

    from ray_jobs.common import worker_runtime_env
    from segpc.training.ingest import decodes, ref_rows

    rows = ref_rows(refs)
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
    try:
        ds.map_batches(decodes, batch_size=1, num_cpus=DECODE_CPUS, batch_format="numpy",
                       runtime_env=worker_runtime_env() or None).materialize()
    except Exception as exc:
        bad = _input_error(exc)
        if bad is None:
            raise
        raise bad from None


def _input_error(exc: BaseException) -> InputError | None:
    """The InputError behind a Ray Data or Ray Train failure, if that is what it was. Ray
    keeps a task's own exception only as the text of its traceback, so that is read too."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        found = _INPUT_ERROR.findall(str(e))
        if found:
            return InputError(found[-1].strip())
        if isinstance(e, InputError):
            return InputError(str(e))
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def run_stage(args: argparse.Namespace, cfg: Config, splits: Splits, stage: str, scale: float | None,
              epochs: int):
    """One TorchTrainer run; returns (best network weights as a state dict, last metrics)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ray_jobs.common import pyarrow_filesystem, worker_runtime_env
    from ray_jobs.train_loop import train_loop

    name = network_name(scale) + ("-final" if args.final else "")
    storage_fs, storage_path = pyarrow_filesystem(args.checkpoints)
    if storage_fs is None:
        storage_path = str(Path(storage_path).resolve())
        Path(storage_path).mkdir(parents=True, exist_ok=True)
    _guard_previous_run(args, name)
    train_refs = splits.train + (splits.validation if args.final else [])
    dataset = training_dataset(train_refs, stage, scale, cfg)
    cluster = min(_cluster_cpus(), os.cpu_count() or 1)
    # one CPU left to Ray Data's per-epoch tasks: a worker whose torch threads take every core
    # starves them, and waits for its next batch (2.6x slower measured on 2 cores)
    threads = max(1, int((cluster - 1) // args.num_workers))
    # a worker's CPU claim leaves Ray Data room for the per-epoch tasks beside it
    worker_cpus = max(0.25, min(1.0, (_cluster_cpus() - DATA_HEADROOM) / args.num_workers))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict(), "stage": stage, "scale": scale, "epochs": epochs,
                           "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                           "threads": threads, "name": name, "amp": args.use_gpu,
                           "encoder_weights": encoder_weights(args, stage),
                           "validation": [] if args.final else [r.to_json() for r in splits.validation],
                           # test-only fault hook (ray_jobs/faults.py): fail once after this epoch
                           "fail_after_epoch": fault_at("epoch")},
        datasets={"train": dataset},
        scaling_config=ray.train.ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                               resources_per_worker={"CPU": worker_cpus}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
            # the epoch lines are the progress; Ray Train's INFO lines go to logs/train/ only
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env=worker_runtime_env()),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        bad_input = _input_error(exc)
        if bad_input is not None:
            raise bad_input from None
        raise RunFailed(f"{name}: training failed ({str(exc).splitlines()[0][:300]}); its checkpoints "
                        f"are kept under {args.checkpoints}/{name}: rerun with --resume") from exc
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training produced no checkpoint")
    from segpc.training.checkpoint import load_best

    with result.checkpoint.as_directory() as d:
        weights, state = load_best(d)
    return weights, state


class RunFailed(RuntimeError):
    """A training run stopped; what it checkpointed can be resumed."""


def _cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 1)


def _guard_previous_run(args: argparse.Namespace, name: str) -> None:
    """Ray Train resumes a run of the same name by itself; make that an explicit choice."""
    fs, root = filesystem(args.checkpoints)
    run_dir = f"{root}/{name}"
    if not fs.exists(run_dir):
        if args.resume:
            print(f"[train] {name}: no earlier run at {args.checkpoints}/{name}; starting fresh",
                  flush=True)
        return
    if args.resume:
        print(f"[train] {name}: resuming from {args.checkpoints}/{name}", flush=True)
    elif args.restart:
        fs.rm(run_dir, recursive=True)
    else:
        raise InputError(f"an earlier training run exists at {args.checkpoints}/{name}: pass --resume "
                         "to continue it or --restart to discard it")


def main(argv: list[str] | None = None) -> int:
    from ray_jobs.common import job_environment

    args = parse_args(argv)
    with job_environment(args):
        return exit_status(lambda: _main(args), failures=(RunFailed,))


def _main(args: argparse.Namespace) -> None:
    from ray_jobs.common import init_ray

    t0 = time.time()
    cfg = configure(args)
    init_ray()
    splits, epochs, encoders = check_inputs(args, cfg)
    bundle = base_bundle(args, cfg)
    stain = fit_stain(args, cfg, bundle, splits)
    if not args.final:  # (with --final it is training data, decoded with the rest)
        check_decodes(splits.validation)
    history = dict(bundle.provenance.get("training", {}))
    diameter = bundle.provenance.get("nucleus_diameter")
    if any(stage == "nucleus" for stage, _ in stages(args, cfg)):
        # the splitter's scale for this U-Net: validation uses it from the first epoch on
        diameter = measure_diameter(splits.train, cfg)
        cfg.nucleus.diameter = bundle.config.nucleus.diameter = diameter["px_at_input"]
        print(f"[train] median nucleus diameter: {diameter['px_at_input']:.1f} px at the U-Net's "
              f"{cfg.nucleus.input_size}x{cfg.nucleus.input_size} input ({diameter['nuclei']} nuclei)",
              flush=True)
    for stage, scale in stages(args, cfg):
        name = network_name(scale)
        print(f"[train] === {name} ({args.num_workers} worker(s), {'GPU' if args.use_gpu else 'CPU'}, "
              f"{epochs[name]} epochs) ===", flush=True)
        weights, state = run_stage(args, cfg, splits, stage, scale, epochs[name])
        net = bundle.nucleus if scale is None else bundle.cytoplasm[scale]
        net.load_state_dict(weights)
        history[name] = {"best_epoch": state["best_epoch"] + 1, "epochs": state["epoch"] + 1,
                         "best": state["best_metrics"], "history": state["history"], "final": args.final}
    bundle.provenance = {"data": args.data, "preset": args.preset, "epochs": args.epochs,
                         "nucleus_epochs": args.nucleus_epochs, "network_epochs": epochs,
                         "batch_size": args.batch_size, "lr": args.lr, "num_workers": args.num_workers,
                         "use_gpu": args.use_gpu, "seed": args.seed, "equalize": args.equalize,
                         "encoders": encoders, "guidance_jitter": asdict(GuidanceJitter()),
                         "final": args.final, "epochs_from": args.epochs_from, "training": history,
                         "nucleus_diameter": diameter, "stain": stain,
                         "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if diameter and diameter.get("field_shape"):
        bundle.field_shape = tuple(diameter["field_shape"])
    if args.mpp is not None:  # else an existing bundle's (partial retraining) stays
        bundle.mpp = args.mpp
    if args.final:  # nothing was held out: the split run's figures and calibration carry over
        bundle.provenance["validation"] = {}
        carry_calibration(args, bundle)
    else:
        rules, calibration = validate_bundle(args, bundle, splits)
        bundle.provenance["validation"] = rules
        bundle.provenance["true_nuclei_gap"] = true_nuclei_gap(rules, bundle.config.aggregation.mode)
        bundle.config.aggregation = replace(bundle.config.aggregation, **calibration["chosen"]["setting"])
        bundle.provenance["calibration"] = calibration
        was, now = calibration["default"]["scores"], calibration["chosen"]["scores"]
        print(f"[train] calibrated on the validation split: {calibration['chosen']['setting']} "
              f"(strict F1 {was['f1']} -> {now['f1']}, mIoU {was['miou']} -> {now['miou']})", flush=True)
    save_bundle(bundle, args.out)
    print(f"[train] bundle written to {args.out} in {time.time() - t0:.0f}s", flush=True)
    print(json.dumps({k: bundle.provenance.get(k) for k in ("validation", "true_nuclei_gap")}, indent=2),
          flush=True)


def carry_calibration(args: argparse.Namespace, bundle: Bundle) -> None:
    """With --final there is no split left to calibrate on: take the aggregation settings the
    --epochs-from bundle was calibrated to, if it is a calibrated bundle."""
    try:
        meta = read_bundle_meta(args.epochs_from) if args.epochs_from else None
    except InputError:  # a checkpoints folder
        meta = None
    if meta and "calibration" in meta.get("provenance", {}):
        bundle.config.aggregation = Config.from_dict(meta["config"]).aggregation
        bundle.provenance["calibration"] = {"from": args.epochs_from, **meta["provenance"]["calibration"]}
        print(f"[train] aggregation settings calibrated on the split, from {args.epochs_from}", flush=True)


def true_nuclei_gap(validation: dict, mode: str) -> dict:
    """How much better the bundle's rule (``mode``) does around the true nuclei than end to
    end: what stage 1 costs, in F1 and mIoU."""
    from segpc.evaluation.validation import TRUE_NUCLEI

    rule, truth = validation[mode], validation[TRUE_NUCLEI]
    return {k: round((truth[k] or 0) - (rule[k] or 0), 4) for k in ("f1", "miou")}


def validate_bundle(args: argparse.Namespace, bundle: Bundle, splits: Splits) -> tuple[dict, dict]:
    """End-to-end validation of the bundle (each scale alone, the rules, its rule around the
    true nuclei) and its calibration on the validation split."""
    import ray

    from ray_jobs.common import worker_runtime_env
    from ray_jobs.train_loop import evaluate_bundle_task

    with tempfile.TemporaryDirectory() as tmp:
        save_bundle(bundle, tmp)
        task = ray.remote(num_cpus=1, num_gpus=1 if args.use_gpu else 0,
                          runtime_env=worker_runtime_env())(evaluate_bundle_task)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
        return ray.get(task.remote(files, [r.to_json() for r in splits.validation], splits.slides, args.data))


if __name__ == "__main__":
    sys.exit(main())
