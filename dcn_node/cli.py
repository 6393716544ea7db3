"""Command line: ``dcn-node serve | receive | worker | status | retry | healthcheck |
check-config | echo | phantom | analyze | train | evaluate``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dcn_node import __version__
from dcn_node.config import DEFAULT_CONFIG_PATH, Settings, load_config, security_warnings
from dcn_node.errors import ConfigError, StoreUnavailableError
from dcn_node.ops.logs import configure_logging

LOGGER = logging.getLogger("dcn_node.cli")


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"YAML configuration (default: {DEFAULT_CONFIG_PATH})",
    )


def _settings(args: argparse.Namespace) -> Settings:
    return load_config(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    """``serve`` (all in one) and ``receive`` (no model: the broker's workers run it)."""
    from dcn_node.node import Node

    settings = _settings(args)
    configure_logging(settings.logging.level, settings.logging.format)
    for warning in security_warnings(settings, args.config or DEFAULT_CONFIG_PATH):
        logging.getLogger("dcn_node.config").warning("%s", warning)
    Node(settings, role=args.command).serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker on the broker's queue: the model and the encoder, one job at a time."""
    from dcn_node.node import WorkerNode

    settings = _settings(args)
    configure_logging(settings.logging.level, settings.logging.format)
    WorkerNode(settings, queue=args.queue).serve_forever()
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Ask the running node's /readyz (or /healthz with --live); exit 0 when OK. Used as
    the container's HEALTHCHECK (no curl in slim images)."""
    import urllib.error
    import urllib.request

    metrics = _settings(args).metrics
    host = metrics.host if metrics.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{metrics.port}/{'healthz' if args.live else 'readyz'}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            code, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read()
    except OSError as exc:
        print(f"{url}: {exc}")
        return 1
    print(f"{url}: {code} {body.decode(errors='replace')}")
    return 0 if code == 200 else 1


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(f"{args.config or DEFAULT_CONFIG_PATH}: OK")
    node = settings.node
    print(f"  listens as {node.ae_title} on {node.host}:{node.port}")
    print(f"  spool {settings.storage.spool_dir.resolve()} (fsync {settings.storage.fsync})")
    print(f"  index {'in PostgreSQL (store.url)' if settings.store.url else 'index.sqlite3'}")
    if settings.broker.url:
        from dcn_node.pipeline.broker import sanitized

        print(f"  jobs through {sanitized(settings.broker.url)}, queue {settings.broker.queue}")
    for dest in settings.destinations:
        print(f"  sends to {dest.name}: {dest.ae_title}@{dest.host}:{dest.port}")
    for warning in security_warnings(settings, args.config or DEFAULT_CONFIG_PATH):
        print(f"  WARNING: {warning}")
    return 0


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_status(args: argparse.Namespace) -> int:
    from dcn_node.store.outbox import Outbox
    from dcn_node.store.quarantine import QUARANTINE_DIR, quarantine_usage
    from dcn_node.store.spool import Spool

    settings = _settings(args)
    spool_dir = settings.storage.spool_dir
    series, outbox, timelines, dead = [], {}, {}, []
    quarantined, quarantine_bytes = quarantine_usage(spool_dir)
    if settings.store.url is None and not (spool_dir / "index.sqlite3").exists():
        print(f"no spool at {spool_dir.resolve()} yet", file=sys.stderr)
    else:
        spool = Spool(spool_dir, url=settings.store.url)
        box = Outbox(spool)
        series = spool.list_series()
        outbox = box.counts()
        dead = box.deliveries(state="dead")
        timelines = {
            s.series_instance_uid: spool.timeline(s.study_instance_uid, s.series_instance_uid)
            for s in series
        }
        spool.close()
    if args.json:
        payload = {
            "series": [
                {
                    "study_instance_uid": s.study_instance_uid,
                    "series_instance_uid": s.series_instance_uid,
                    "state": s.state,
                    "instances": s.instances,
                    "reason": s.reason,
                    "generation": s.generation,
                    "first_received_at": s.first_received_at,
                    "last_received_at": s.last_received_at,
                    "completed_at": s.completed_at,
                    "timeline": [
                        {"generation": g, "event": e, "at": at, "detail": d}
                        for g, e, at, d in timelines.get(s.series_instance_uid, [])
                    ],
                }
                for s in series
            ],
            "outbox": outbox,
            "dead_letters": [
                {"destination": d.destination, "kind": d.kind,
                 "sop_instance_uid": d.sop_instance_uid,
                 "series_instance_uid": d.series_instance_uid, "reason": d.last_error}
                for d in dead
            ],
            "quarantine": {"instances": quarantined, "bytes": quarantine_bytes,
                           "path": str(spool_dir / QUARANTINE_DIR)},
        }
        print(json.dumps(payload, indent=2))
        return 0
    now = time.time()
    print(f"{'SERIES INSTANCE UID':<64}  {'STATE':<10} {'INST':>5} {'LAST':>6}  REASON")
    for s in series:
        print(
            f"{s.series_instance_uid:<64}  {s.state:<10} {s.instances:>5} "
            f"{_age(now - s.last_received_at):>6}  {s.reason or ''}"
        )
        if args.timeline:
            events = timelines.get(s.series_instance_uid, [])
            start = events[0][2] if events else 0.0
            for _, event, at, detail in events:
                print(f"    +{at - start:8.2f} s  {event:<18} {detail or ''}")
    if not series:
        print("(no series received)")
    print()
    print("OUTBOX (objects per destination)")
    names = [d.name for d in settings.destinations] + sorted(set(outbox) - {
        d.name for d in settings.destinations})
    for name in names:
        counts = outbox.get(name, {})
        print(f"  {name:<16} " + "  ".join(
            f"{state} {counts.get(state, 0)}" for state in ("pending", "sent", "dead",
                                                            "superseded")))
    for d in dead[:20]:
        print(f"  dead: {d.destination} {d.kind} {d.sop_instance_uid}: {d.last_error}")
    if len(dead) > 20:
        print(f"  ... {len(dead) - 20} more dead letters (see --json)")
    print()
    print(f"QUARANTINE: {quarantined} refused instance(s), {quarantine_bytes / 1e6:.1f} MB "
          f"(limit {settings.storage.quarantine_max_bytes / 1e6:.0f} MB) in "
          f"{spool_dir / QUARANTINE_DIR}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from dcn_node.store.outbox import Outbox
    from dcn_node.store.spool import Spool

    settings = _settings(args)
    spool = Spool(settings.storage.spool_dir)
    count = Outbox(spool).retry_dead(args.destination)
    spool.close()
    print(f"{count} dead letter(s) re-queued"
          + (f" for {args.destination}" if args.destination else "")
          + "; a running node sends them within a few seconds")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made in globals()

    ae = AE(ae_title=args.aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate(args.host, args.port, ae_title=args.aec)
    if not assoc.is_established:
        print(f"C-ECHO {args.aec}@{args.host}:{args.port}: association not established")
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    code = getattr(status, "Status", None)
    print(
        f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{code:04X}"
        if code is not None
        else f"C-ECHO {args.aec}@{args.host}:{args.port}: no response"
    )
    return 0 if code == 0 else 1


def cmd_phantom(args: argparse.Namespace) -> int:
    from dcn_train.phantom import generate_phantom

    started = time.perf_counter()
    case = generate_phantom(
        args.out_dir,
        args.seed,
        slices=args.slices,
        thickness_mm=args.thickness,
        normal=args.normal,
        matrix=args.matrix,
    )
    print(
        f"wrote {case.slices} slices to {case.series_dir} "
        f"(label {case.label}, series {case.series_instance_uid}) "
        f"in {time.perf_counter() - started:.1f} s; ground truth {case.ground_truth_path}"
    )
    return 0


#: Phantom seeds used for training start here; evaluation seeds start at EVAL_SEED_BASE,
#: so the held-out set never overlaps the training set.
TRAIN_SEED_BASE = 1000
EVAL_SEED_BASE = 900000


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from dcn_train.cases import Case, manifest_cases, phantom_cases
    from dcn_train.trainer import Trainer, TrainSettings

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.log or args.out / f"train-{args.profile}.log"
    configure_logging("INFO", log_file=log_path)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    from dcn_node.inference.networks import PROFILES

    size = PROFILES[args.profile].input_size
    if args.manifest:
        paths = manifest_cases(args.manifest, args.cache, size)
    elif args.corpus == "v5":
        from dcn_train.corpus import training_corpus

        paths = training_corpus(args.cache, size, args.phantoms, args.real_ct,
                                seed_base=args.seed_base)
    else:
        first = TRAIN_SEED_BASE + args.seed
        seeds = list(range(first, first + args.phantoms))
        paths = phantom_cases(args.cache, seeds, size)
    if args.folds > 1:
        # k-fold: fold i (every k-th case from i) is held out; train on the rest.
        held_out = [p for i, p in enumerate(paths) if i % args.folds == args.fold]
        paths = [p for i, p in enumerate(paths) if i % args.folds != args.fold]
        (args.out / f"fold-{args.fold}-of-{args.folds}-held-out.txt").write_text(
            "\n".join(p.name for p in held_out) + "\n"
        )
        LOGGER.info("fold %d of %d: %d cases held out", args.fold, args.folds, len(held_out))
    cases = [Case.load(p) for p in paths]
    LOGGER.info("training on %d cases (%d slices); log %s", len(cases),
                sum(len(c.image) for c in cases), log_path)
    settings = TrainSettings(
        profile=args.profile, lung_epochs=args.lung_epochs, dcn_epochs=args.dcn_epochs,
        spm_epochs=args.spm_epochs, lung_slices_per_epoch=args.lung_slices_per_epoch,
        dcn_positives_per_epoch=args.dcn_positives_per_epoch, seed=args.seed,
        lung_lesion_fraction=args.lung_lesion_fraction, lung_real_share=args.lung_real_share,
        lung_dense_dice_weight=args.lung_dense_dice_weight,
        device=args.device, learning_rate=args.learning_rate, lr_decay=args.lr_decay,
        init_from=str(args.init_from or ""),
        negative_slice_dice_weight=args.negative_slice_dice_weight,
        lung_mask_jitter=args.lung_mask_jitter,
        hard_negative_share=args.hard_negative_share,
    )
    manifest = Trainer(cases, args.out, settings).run()
    print(f"weights and manifest: {manifest}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from dcn_node.inference.analysis import write_analysis
    from dcn_node.inference.engine import DEFAULT_MODELS_DIR, Engine
    from dcn_node.results import build_results
    from dcn_node.volume import load_dicom_folder

    settings = _settings(args)
    engine = Engine(args.models or DEFAULT_MODELS_DIR, settings.inference.profile,
                    settings.inference.device, quality_gate=settings.inference.quality_gate)
    volume = load_dicom_folder(args.dicom_dir)
    result = engine.analyze(volume)
    summary = write_analysis(args.out, volume, result)
    # The DICOM objects the node would send: OUT/seg/, OUT/sc/, OUT/sr/.
    paths = build_results(volume, result, settings.results).write(args.out)
    summary["dicom_objects"] = [str(p.relative_to(args.out)) for p in paths]
    print(json.dumps(summary, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dcn_node.inference.engine import DEFAULT_MODELS_DIR, Engine
    from dcn_train.evaluation import evaluate_on_phantoms

    configure_logging("INFO")
    models = args.models or DEFAULT_MODELS_DIR
    engine = Engine(models, args.profile, args.device)
    baseline = (Engine(models, args.profile, args.device, optimized=False)
                if args.compare_naive else None)
    first_seed = args.first_seed if args.first_seed is not None else EVAL_SEED_BASE + args.seed
    report = evaluate_on_phantoms(engine, args.out, args.cases, first_seed,
                                  keep_cases=args.keep_cases, baseline=baseline,
                                  held_out=args.held_out, keep_outputs=args.keep_outputs)
    print(report)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from dcn_node.inference.engine import DEFAULT_MODELS_DIR, Engine
    from dcn_node.inference.pattern import pattern_probability
    from dcn_train.calibration import (
        calibrate,
        fit_pattern,
        saved_case_features,
        slabs_probabilities,
    )
    from dcn_train.corpus import VALIDATION_SEED_BASE
    from dcn_train.evaluation import evaluate_on_phantoms

    configure_logging("INFO")
    models = args.models or DEFAULT_MODELS_DIR
    cases_json = args.out / "cases.json"
    if not args.refit:
        engine = Engine(models, args.profile, args.device, mapping="fcn")
        engine.calibration = None  # raw probabilities: what the calibration maps
        evaluate_on_phantoms(engine, args.out, args.cases, VALIDATION_SEED_BASE + args.seed,
                             held_out="v5", keep_outputs=True)
    elif not cases_json.exists():
        print(f"--refit: no {cases_json} from an earlier calibration run", file=sys.stderr)
        return 2
    rows = json.loads(cases_json.read_text())
    labels = np.array([row["label"] for row in rows])
    raw = {"fcn": np.array([row["probability"] for row in rows]),
           "max": np.array([row["max_slice_probability"] for row in rows]),
           "slabs": slabs_probabilities(rows, args.out / "outputs")}
    pattern = None
    if args.pattern_from:
        # Fitted on cases the networks never trained on, then scored on these validation
        # cases like the other mappings.
        _, fit_labels, fit_rows, _ = saved_case_features(args.pattern_from / "outputs")
        pattern = fit_pattern(fit_rows, fit_labels, l2=args.pattern_l2)
        seeds, _, validation_rows, spm = saved_case_features(args.out / "outputs")
        if seeds != [row["seed"] for row in rows]:
            print(f"--pattern-from: {args.out / 'outputs'} does not hold this run's cases",
                  file=sys.stderr)
            return 2
        raw["pattern"] = np.array([pattern_probability(row, pattern)
                                   for row in validation_rows])
        # The SPM's own output as saved (a cases.json of `dcn-node evaluate` holds the
        # calibrated probability; the saved outputs always hold the uncalibrated one).
        raw["fcn"] = spm
    if args.mapping != "auto":  # a mapping fixed by the caller (e.g. a release gate's veto)
        raw = {args.mapping: raw[args.mapping]}
    print(json.dumps(calibrate(Path(models), args.profile, labels, raw, args.out,
                               args.min_specificity, pattern=pattern), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcn-node",
        description="DICOM node running the DCN COVID-19 CT model (not for diagnostic use).",
    )
    parser.add_argument("--version", action="version", version=f"dcn-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the node (Storage SCP and workers)")
    _add_config_argument(serve)
    serve.set_defaults(func=cmd_serve)

    receive = sub.add_parser("receive", help="cluster role: Storage SCP, completion and "
                             "sending; the model runs in `dcn-node worker` processes")
    _add_config_argument(receive)
    receive.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="cluster role: a Celery worker taking inference "
                            "jobs from the broker (one per GPU)")
    _add_config_argument(worker)
    worker.add_argument("--queue", help="the queue to consume (default: broker.queue)")
    worker.set_defaults(func=cmd_worker)

    status = sub.add_parser("status", help="list received series and their states")
    _add_config_argument(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--timeline", action="store_true",
                        help="show each series' timeline")
    status.set_defaults(func=cmd_status)

    retry = sub.add_parser("retry", help="re-queue dead letters for delivery")
    _add_config_argument(retry)
    retry.add_argument("--destination", help="only this destination (default: all)")
    retry.set_defaults(func=cmd_retry)

    check = sub.add_parser("check-config", help="validate a configuration file")
    _add_config_argument(check)
    check.set_defaults(func=cmd_check_config)

    health = sub.add_parser("healthcheck", help="ask a running node's /readyz (exit 0: ready)")
    _add_config_argument(health)
    health.add_argument("--live", action="store_true", help="ask /healthz (alive) instead")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds")
    health.set_defaults(func=cmd_healthcheck)

    echo = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    echo.add_argument("host")
    echo.add_argument("port", type=int)
    echo.add_argument("--aec", default="ANY-SCP", help="called AE title")
    echo.add_argument("--aet", default="DCN_NODE", help="our (calling) AE title")
    echo.set_defaults(func=cmd_echo)

    phantom = sub.add_parser("phantom", help="write a synthetic chest CT series")
    phantom.add_argument("out_dir", type=Path)
    phantom.add_argument("--seed", type=int, required=True)
    phantom.add_argument("--slices", type=int, default=None)
    phantom.add_argument("--thickness", type=float, default=5.0, help="slice thickness, mm")
    phantom.add_argument("--normal", action="store_true", help="no lesions")
    phantom.add_argument("--matrix", type=int, default=512, help="rows = columns")
    phantom.set_defaults(func=cmd_phantom)

    analyze = sub.add_parser("analyze", help="run the model on a DICOM folder, offline")
    analyze.add_argument("dicom_dir", type=Path)
    analyze.add_argument("--out", type=Path, required=True)
    analyze.add_argument("--models", type=Path,
                         help="weights folder (default: the shipped dcn_node/models/)")
    _add_config_argument(analyze)
    analyze.set_defaults(func=cmd_analyze)

    evaluate = sub.add_parser("evaluate", help="paper metrics on held-out phantoms")
    evaluate.add_argument("--out", type=Path, default=Path("var/evaluation"))
    evaluate.add_argument("--models", type=Path,
                          help="weights folder (default: the shipped dcn_node/models/)")
    evaluate.add_argument("--profile", choices=["lite", "paper"], default="lite")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--cases", type=int, default=40, help="half with lesions, half not")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--keep-cases", action="store_true")
    evaluate.add_argument("--keep-outputs", action="store_true",
                          help="each case's masks, HU and slice probabilities (subsampled) "
                               "to OUT/outputs/SEED.npz, for fitting a patient-level mapping")
    evaluate.add_argument("--first-seed", type=int, default=None,
                          help="first phantom seed (default: the held-out seeds, 900000 + "
                               "--seed)")
    evaluate.add_argument("--held-out", choices=["v5", "phantoms-v2"], default="v5",
                          help="v5: COVID-19, normal and other-disease phantoms (corpus "
                          "v5); "
                          "phantoms-v2: the earlier held-out set")
    evaluate.add_argument("--compare-naive", action="store_true",
                          help="also run the naive float32 path and print the metric deltas")
    evaluate.set_defaults(func=cmd_evaluate)

    calibrate = sub.add_parser("calibrate", help="calibrate the probability and set the "
                               "decision threshold on validation phantoms (updates the "
                               "manifest)")
    calibrate.add_argument("--models", type=Path, required=True, help="weights folder")
    calibrate.add_argument("--out", type=Path, default=Path("var/calibration"))
    calibrate.add_argument("--profile", choices=["lite", "paper"], default="lite")
    calibrate.add_argument("--device", default="auto")
    calibrate.add_argument("--cases", type=int, default=80)
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--min-specificity", type=float, default=0.95)
    # The names of engine.INDIVIDUAL_MAPPINGS, spelled out: importing torch to build the
    # parser would slow every command.
    calibrate.add_argument("--mapping", choices=["auto", "fcn", "max", "slabs", "pattern"],
                           default="auto",
                           help="individual-level mapping: auto = the best validation AUC")
    calibrate.add_argument("--pattern-from", type=Path, default=None,
                           help="a `dcn-node evaluate --keep-outputs` folder of phantoms the "
                                "networks never trained on (e.g. --first-seed 20000): the "
                                "pattern mapping is fitted there and competes")
    calibrate.add_argument("--pattern-l2", type=float, default=1.0,
                           help="L2 penalty of the pattern mapping's standardised weights")
    calibrate.add_argument("--refit", action="store_true",
                           help="fit again from OUT/cases.json of an earlier run of the same "
                                "weights (no inference)")
    calibrate.set_defaults(func=cmd_calibrate)

    train = sub.add_parser("train", help="train the lung U-Net, DCN and SPM (resumable)")
    train.add_argument("--out", type=Path, default=Path("var/models"),
                       help="weights folder (the shipped ones: dcn_node/models)")
    train.add_argument("--profile", choices=["lite", "paper"], default="lite")
    train.add_argument("--manifest", type=Path, help="CSV of real cases (image,lung_mask,"
                       "lesion_mask,label); default: generated phantoms")
    train.add_argument("--phantoms", type=int, default=60, help="phantom cases to train on")
    train.add_argument("--corpus", choices=["v5", "phantoms-v2"], default="v5",
                       help="v5: phantoms with and without COVID-19 and with other disease, "
                       "plus real CTs with --real-ct; phantoms-v2: the earlier phantoms only")
    train.add_argument("--real-ct", type=Path, help="cache folder of the real CTs "
                       "(fetched when missing; see docs/real-ct.md); default: none used")
    train.add_argument("--seed-base", type=int, default=None,
                       help="v5: first phantom seed (default 10000: training seeds)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--cache", type=Path, default=Path("var/train-cache"))
    train.add_argument("--lung-epochs", type=int, default=50)
    train.add_argument("--dcn-epochs", type=int, default=100)
    train.add_argument("--spm-epochs", type=int, default=20)
    train.add_argument("--lung-slices-per-epoch", type=int, default=0, help="0 = all")
    train.add_argument("--dcn-positives-per-epoch", type=int, default=0, help="0 = all")
    train.add_argument("--folds", type=int, default=1, help="k for k-fold (1 = no folds)")
    train.add_argument("--fold", type=int, default=0, help="which fold to hold out")
    train.add_argument("--lung-lesion-fraction", type=float, default=0.5,
                       help="share of each lung epoch drawn from slices with lesions")
    train.add_argument("--lung-real-share", type=float, default=0.0,
                       help="share of each lung epoch drawn from the real CTs (cases named "
                            "real-*; 0 = in proportion)")
    train.add_argument("--lung-dense-dice-weight", type=float, default=0.0,
                       help="weight of a second lung Dice over the dense pixels alone (-320 HU "
                            "and up: consolidation against chest wall and heart; 0 = off)")
    train.add_argument("--negative-slice-dice-weight", type=float, default=0.0,
                       help="weight of the lesion Dice on lesion-free slices of cases with a "
                            "complete lesion mask (0 = the paper: only lesion slices count)")
    train.add_argument("--lung-mask-jitter", type=int, default=0,
                       help="grow or shrink the DCN's lung mask by up to this many pixels "
                            "on half the training slices (0 = the truth mask)")
    train.add_argument("--hard-negative-share", type=float, default=0.0,
                       help="share of each DCN epoch's lesion-free slices drawn by their "
                            "classification loss (hard negatives: tumours, lobar pneumonia; "
                            "0 = all drawn uniformly, as in the paper)")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's initial lr")
    train.add_argument("--lr-decay", type=float, default=0.95, help="lr factor per epoch")
    train.add_argument("--init-from", type=Path, help="weights folder whose networks start "
                       "the stages (fine-tuning); checkpoints still resume first")
    train.add_argument("--device", default="cpu")
    train.add_argument("--threads", type=int, default=0)
    train.add_argument("--log", type=Path, help="log file (default OUT/train-PROFILE.log)")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("serve", "receive", "worker"):
        configure_logging("WARNING")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except StoreUnavailableError:
        # At start-up (serve, status, retry) there is nothing to wait for yet: the store
        # has logged where and why (never the password); exit, so that systemd or the
        # orchestrator restarts the node once the database is back.
        print(f"dcn-node {args.command}: stopped, the store is unreachable", file=sys.stderr)
        return 3
