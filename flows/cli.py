"""The ``radsynth`` console script: one subcommand per stage, the same ``key=value`` overrides everywhere.

With ``--json`` the last line printed to stdout is one JSON object (paths written, counts, figures) for
scripts and schedulers. User errors print one line to stderr and exit with code 2; Prefect is imported only
by the subcommands that run a flow.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from radsynth.configs import RadsynthConfig, UserInputError, apply_overrides, config_to_yaml, load_config

if TYPE_CHECKING:
    from accelerate import PartialState

USER_ERROR_EXIT = 2
BUG_EXIT = 1
GATE_REFUSED_EXIT = 3  # the command ran correctly and its answer is "no" (a release the gate refused)
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "free disk space and run again (finished work is kept)",
                      errno.EDQUOT: "free quota and run again (finished work is kept)",
                      errno.EACCES: "a folder this user may write (runtime.output_dir)",
                      errno.EROFS: "a writable file system (runtime.output_dir)",
                      errno.ENOTDIR: "a folder where a folder is expected, not a file"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return USER_ERROR_EXIT
    config = None
    try:
        # `score` audits plain folders and has no config file; every other command starts from one.
        config = load_config(args.config, args.overrides) if hasattr(args, "config") else None
        result = args.run(config, args)
    except UserInputError as error:
        print(f"radsynth: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRNOS:
            return _bug(error, config)
        # Disk full, no permission, a file where a folder must be: the machine's state, not a bug.
        print(f"radsynth: error: {error.filename or '<disk>'}: {error.strerror}; "
              f"{ENVIRONMENT_ERRNOS[error.errno]}", file=sys.stderr)
        return USER_ERROR_EXIT
    except Exception as error:  # a bug: one line here, the traceback in a log file
        return _bug(error, config)
    exit_code = result.pop("exit_code", 0)
    if args.json and result.pop("answers", True):
        print(json.dumps(result, default=str))
    return exit_code


def _bug(error: BaseException, config: RadsynthConfig | None) -> int:
    """One line and the traceback's log file: a bug in radsynth, not something the user did wrong."""
    folder = config.output_dir / "logs" if config is not None else Path(tempfile.gettempdir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    log = folder / f"radsynth-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log.write_text("".join(traceback.format_exception(error)))
    first = (str(error).splitlines() or [""])[0]
    print(f"radsynth: internal error: {type(error).__name__}: {first}; this is a bug, the traceback is in {log}",
          file=sys.stderr)
    return BUG_EXIT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radsynth", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    config = commands.add_parser("config", help="inspect configs").add_subparsers(title="config commands")
    _command(config, "show", _show_config, "print the resolved config (preset + overrides), validated")
    _command(commands, "ingest", _ingest, "read the data source, check, split by patient, preprocess, cache")
    _command(commands, "train", _train, "train the autoencoder and the text-conditioned diffusion model")
    distill = _command(commands, "distill", _distill, "distil the trained model into a few-step student (sampling.student)")
    distill.add_argument("--model", default=None, help="the trained model folder (default: what `radsynth train` wrote)")
    generate = _command(commands, "generate", _generate, "sample N synthetic images with JSON sidecars")
    generate.add_argument("--n", type=int, default=None, help="number of samples (default: sampling.num_samples)")
    generate.add_argument("--model", default=None, help="model folder (default: <output_dir>/model, or the student "
                          "with sampling.student)")
    generate.add_argument("--out", default=None, help="sample folder (default: <output_dir>/samples)")
    generate.add_argument("--pairs", action="store_true",
                          help="image + label-map pairs (sampling.pairs; a model trained with conditioning.use_masks), "
                               "masks from sampling.mask_source: bank or generated")
    generate.add_argument("--inpaint", action="store_true",
                          help="generate the lesion edits into real training images, the rest kept (sampling.inpaint; "
                               "derived from real)")
    generate.add_argument("--lesion", action="append", default=None, metavar="REQUEST",
                          help="lesion edit of each pair's mask, e.g. 'nodule 8 mm in right lung' (repeatable; "
                               "default: sampling.lesions)")
    evaluate = _command(commands, "evaluate", _evaluate, "score a build's samples: realism, adherence, privacy, utility")
    evaluate.add_argument("--model", default=None, help="model folder (default: <output_dir>/model)")
    evaluate.add_argument("--samples", default=None, help="sample folder (default: scoring.sample_dir or <output_dir>/samples)")
    evaluate.add_argument("--out", default=None, help="scorecard folder (default: <output_dir>/eval)")
    _score_command(commands)
    release = _command(commands, "release", _release, "filter, gate and publish the scored samples as a versioned dataset")
    release.add_argument("--samples", default=None, help="sample folder (default: scoring.sample_dir or <output_dir>/samples)")
    release.add_argument("--eval", default=None, help="scorecard folder (default: <output_dir>/eval)")
    translate = _command(commands, "translate", _translate, "translate a folder of one modality into another: image + "
                         "label pairs carrying the source's labels (derived from real)")
    translate.add_argument("--from", dest="source_modality", required=True, metavar="MODALITY",
                           help="the source folder's modality: ct, mri or xray")
    translate.add_argument("--to", dest="target_modality", required=True, metavar="MODALITY",
                           help="the modality to translate into")
    translate.add_argument("--source", required=True, help="an MSD / nnU-Net raw folder (imagesTr/, labelsTr/, "
                           "dataset.json) of the source modality")
    translate.add_argument("--model", default=None, help="the multi-modality model (default: what `radsynth train` "
                           "wrote; translation.method: diffusion)")
    translate.add_argument("--out", default=None, help="sample folder (default: <output_dir>/translation/"
                           "<from>-to-<to>-<method>)")
    _command(commands, "build", _build, "train, generate, evaluate and release in one Prefect flow (cached, resumable)")
    serve = _command(commands, "serve", _serve, "register a scheduled build on a Prefect server and run its runs")
    serve.add_argument("--cron", required=True, help='a cron schedule, e.g. "0 2 * * 0" (Sundays 02:00)')
    serve.add_argument("--name", default=None, help="deployment name (default: the config file's name)")
    return parser


def _command(commands, name: str, run: Callable, help_text: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text, description=help_text)
    command.add_argument("config", metavar="CONFIG", help="a YAML file or a preset name (demo, cxr, ...)")
    command.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. runtime.seed=3 data.root=/data")
    command.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    command.set_defaults(run=run)
    return command


def _score_command(commands) -> None:
    help_text = "score any folders of images (PNG or NIfTI; masks in a sibling labels/ or masks/ folder)"
    command = commands.add_parser("score", help=help_text, description=help_text)
    command.add_argument("--synthetic", required=True, help="the images to audit")
    command.add_argument("--train", required=True, help="the generator's training images")
    command.add_argument("--holdout", required=True, help="real images the generator never saw (privacy reference)")
    command.add_argument("--test", default=None, help="more unseen real images (evaluation of real-trained models)")
    command.add_argument("--out", default="scorecard", help="folder for scorecard.json, scorecard.md, per_sample.csv")
    command.add_argument("--modality", choices=("ct", "mri", "xray"), default=None,
                         help="ct maps intensities through the CT window; otherwise percentiles of --train")
    command.add_argument("--attributes", nargs="*", default=[], help="metadata.csv columns to stratify and score on")
    command.add_argument("overrides", nargs="*", metavar="scoring.key=value", help="e.g. scoring.bootstrap_samples=100")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    command.set_defaults(run=_score)


def _show_config(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    if not args.json:
        print(config_to_yaml(config), end="")
    return config.model_dump(mode="json", by_alias=True)


def _ingest(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    from radsynth.pipelines.data.ingest import ingest
    from radsynth.pipelines.data.summary import format_summary

    result = ingest(config, progress=not args.json)
    print(format_summary(result.summary))
    return {"command": "ingest", "preprocessed_now": result.preprocessed,
            "summary_path": str(result.summary_path), **result.summary}


def _train(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    from radsynth.flows.launch import launched_here
    from radsynth.generators.trainer import check_device, process_group
    from radsynth.pipelines.data.ingest import ingest
    from radsynth.pipelines.training import train

    config.check_trainable()  # before ingest writes anything
    check_device(config.runtime.device)
    if config.runtime.launch.distributed and not launched_here():
        ingest(config, progress=not args.json)  # once, before the ranks start (they find the cache)
        return _launch(config, args)
    processes = process_group(config.runtime.device)
    # Under a launch every rank runs this: the main one ingests (a no-op when the cache is current), the others
    # then find the cache.
    with processes.main_process_first():
        ingest(config, progress=not args.json and processes.is_main_process)
    if config.finetune.from_:
        return _finetune(config, args, processes)
    result = train(config, progress=not args.json)
    # Every rank holds the same model; the main one answers (a launcher reads one JSON line).
    if processes.is_main_process:
        print(f"model {result.model_dir} (hash {result.model_hash[:12]}), {result.diffusion_steps} diffusion steps"
              + (f", resumed from step {result.resumed_from}" if result.resumed_from else "")
              + (f", {processes.num_processes} processes" if processes.num_processes > 1 else ""))
        print("autoencoder on holdout: " + (", ".join(f"{k} {v:.4g}" for k, v in result.autoencoder_holdout.items())
                                            or "not measured (no holdout cases)"))
    return {"command": "train", "model_dir": str(result.model_dir), "model_hash": result.model_hash,
            "diffusion_steps": result.diffusion_steps, "resumed_from": result.resumed_from,
            "scaling_factor": result.scaling_factor, "autoencoder_holdout": result.autoencoder_holdout,
            "processes": processes.num_processes, "answers": processes.is_main_process}


def _launch(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    import logging

    from radsynth.flows.launch import launch_training

    logging.basicConfig(level=logging.INFO, format="radsynth: %(message)s")
    result = launch_training(config)
    if not args.json and "model_dir" in result:
        print(f"model {result['model_dir']} (hash {result['model_hash'][:12]}), trained by {result['processes']} "
              "processes")
    return result


def _finetune(config: RadsynthConfig, args: argparse.Namespace, processes: PartialState) -> dict:
    from radsynth.pipelines.finetuning import finetune

    result = finetune(config, progress=not args.json)
    if processes.is_main_process:
        print(f"fine-tuned model {result.model_dir} (hash {result.model_hash[:12]}) from base "
              f"{result.base_model_hash[:12]} on {result.cases} cases, {result.steps} steps")
    return {"command": "train", "finetune": True, "model_dir": str(result.model_dir), "model_hash": result.model_hash,
            "base_model_hash": result.base_model_hash, "cases": result.cases, "steps": result.steps,
            "processes": processes.num_processes, "answers": processes.is_main_process}


def _distill(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    from radsynth.pipelines.distillation import distill

    result = distill(config, args.model, progress=not args.json)
    print(f"student {result.model_dir} (hash {result.model_hash[:12]}) of {result.teacher_hash[:12]}: "
          f"{result.steps} distillation steps, samples in {config.distill.steps} steps (sampling.student=true)")
    return {"command": "distill", "model_dir": str(result.model_dir), "model_hash": result.model_hash,
            "teacher_hash": result.teacher_hash, "steps": result.steps, "student_steps": config.distill.steps,
            "guidance_scale": result.guidance_scale}


def _generate(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    from radsynth.pipelines.sampling.generate import generate
    from radsynth.pipelines.training import sampling_model_dir

    n_samples = args.n if args.n is not None else config.sampling.num_samples
    if n_samples < 1:
        raise UserInputError("--n", f"{n_samples} samples", "a positive number")
    if args.lesion and not args.pairs:
        raise UserInputError("--lesion", "lesion edits apply to pairs", "add --pairs")
    if args.inpaint and not (args.pairs and (args.lesion or config.sampling.lesions)):
        raise UserInputError("--inpaint", "inpainting generates lesion edits into real images",
                             "add --pairs and --lesion REQUEST")
    if args.lesion:
        config = config.model_copy(update={"sampling": config.sampling.model_copy(update={"lesions": args.lesion})})
    switches = [f"sampling.{name}=true" for name in ("pairs", "inpaint") if getattr(args, name)]
    config = apply_overrides(config, switches, where="--inpaint" if args.inpaint else "--pairs") if switches else config
    result = generate(config, args.model or sampling_model_dir(config), n_samples, args.out or config.output_dir / "samples",
                      progress=not args.json)
    print(f"{len(result.written)} samples written to {result.sample_dir} ({result.skipped} already there); "
          f"latent std {result.latent_std if result.latent_std is None else round(result.latent_std, 3)}")
    return {"command": "generate", "sample_dir": str(result.sample_dir), "written": len(result.written),
            "skipped": result.skipped, "model_hash": result.model_hash, "latent_std": result.latent_std}


def _translate(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    from radsynth.pipelines.translation import translate

    result = translate(config, args.source, args.source_modality, args.target_modality, model_dir=args.model,
                       sample_dir=args.out, progress=not args.json)
    print(f"{len(result.written)} of {result.source_cases} {args.source_modality} cases translated to "
          f"{args.target_modality} ({result.method}) into {result.sample_dir}; derived from real: internal releases only")
    return {"command": "translate", "sample_dir": str(result.sample_dir), "written": len(result.written),
            "source_cases": result.source_cases, "method": result.method, "model_hash": result.model_hash}


def _evaluate(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    from radsynth.pipelines.scoring.evaluate import evaluate

    result = evaluate(config, model_dir=args.model, sample_dir=args.samples, out_dir=args.out,
                      log=(lambda _: None) if args.json else print)
    return _scored("evaluate", result)


def _score(config: None, args: argparse.Namespace) -> dict:
    from radsynth.configs import load_scoring_config
    from radsynth.pipelines.scoring.evaluate import ScoringInputs, score
    from radsynth.pipelines.scoring.loading import folder_set

    settings = load_scoring_config(args.overrides)
    train = folder_set(args.train, "train", is_synthetic=False, modality=args.modality)
    sets = {name: folder_set(path, name, is_synthetic=name == "synthetic", reference=train,
                             memory_mb=settings.synthetic_memory_mb if name == "synthetic" else None)
            for name, path in (("synthetic", args.synthetic), ("holdout", args.holdout), ("test", args.test)) if path}
    inputs = ScoringInputs(sets["synthetic"], train, sets["holdout"], sets.get("test"), attributes=args.attributes)
    result = score(inputs, settings, args.out, seed=args.seed, log=(lambda _: None) if args.json else print)
    return _scored("score", result)


def _scored(command: str, result) -> dict:
    card = result.scorecard
    for name, verdict in card.verdicts.items():
        print(f"{name}: {'PASS' if verdict['passed'] else 'FAIL'}" + "".join(f"; {r}" for r in verdict.get("reasons", [])))
    print(f"scorecard {result.paths['json']} ({len(card.rows)} numbers, "
          f"{sum(bool(r.get('flagged')) for r in card.per_sample)} of {len(card.per_sample)} samples flagged)")
    return {"command": command, **{k: str(v) for k, v in result.paths.items()}, "sizes": card.sizes,
            "verdicts": card.verdicts, "seconds": result.seconds}


def _release(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    from radsynth.pipelines.release import ReleaseRefused, release

    try:
        result = release(config, samples_dir=args.samples, eval_dir=args.eval)
    except ReleaseRefused as refused:
        print(f"radsynth: release refused: {len(refused.gate.failed)} gate checks failed; report {refused.report}",
              file=sys.stderr)
        for check in refused.gate.failed:
            print(f"  {check.name} [{check.stratum}]: {check.reason}", file=sys.stderr)
        return {"command": "release", "gate_passed": False, "report": str(refused.report),
                "failed": [check.name for check in refused.gate.failed], "exit_code": GATE_REFUSED_EXIT}
    summary = result.summary()
    print(f"{'already released as' if summary['reused'] else 'released'} {summary['release']}: "
          f"{summary['n_released']} of {summary['n_scored']} samples ({summary['dropped']} dropped), "
          f"formats {', '.join(summary['formats'])}")
    return {"command": "release", **summary}


def _build(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    from radsynth.flows.settings import configure_prefect

    configure_prefect(config.output_dir)
    from radsynth.flows.build import build_flow
    from radsynth.flows.settings import quiet_user_errors

    quiet_user_errors()
    result = build_flow(config)
    ran = [name for name, state in result["tasks"].items() if state != "Cached"]
    print(f"tasks run: {', '.join(ran) or 'none'}; from cache: {len(result['tasks']) - len(ran)}")
    for name, verdict in result["verdicts"].items():
        print(f"{name}: {'PASS' if verdict['passed'] else 'FAIL'}" + "".join(f"; {r}" for r in verdict.get("reasons", [])))
    released = result["release"]
    if not result["gate_passed"]:
        print(f"radsynth: release refused: {len(released['failed'])} gate checks failed; report {released['report']}",
              file=sys.stderr)
        for reason in released["failed"]:
            print(f"  {reason}", file=sys.stderr)
        return {**result, "exit_code": GATE_REFUSED_EXIT}
    print(f"{'already released as' if released['reused'] else 'released'} {released['release']}: "
          f"{released['n_released']} of {released['n_scored']} samples; report {released['report']}")
    return result


def _serve(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    from radsynth.flows.settings import configure_prefect

    configure_prefect(config.output_dir)
    from radsynth.flows.serve import serve_build

    serve_build(args.config, args.overrides, args.cron, args.name)  # returns when interrupted
    return {"command": "serve"}


if __name__ == "__main__":
    sys.exit(main())
