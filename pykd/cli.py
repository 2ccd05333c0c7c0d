"""pykd's command line.

    pykd finetune [CONFIG.yaml] [--set key=value ...]   fine-tune teacher.path on the task
    pykd distill  [CONFIG.yaml] [--set key=value ...]   distil into a student (run under torchrun for DDP)
    pykd demo [--output DIR] [--set key=value ...]      fine-tune, distil, evaluate and report
    pykd config                                         print the embedded default configuration
    pykd mlm-head [--output DIR] [--set key=value ...]  fit a masked-LM head on the packaged teacher's frozen encoder
    pykd nas train  [CONFIG.yaml] [--set ...]           one SuperLM per sub-space, sandwich rule (torchrun for DDP)
    pykd nas search [CONFIG.yaml] [--set ...]           score candidates, Pareto table and plot, best under budget
    pykd nas export [CONFIG.yaml] --arch A --output DIR [--pad-ffn]   a plain transformers student cut from the SuperLM
    pykd nas demo [--output DIR] [--set ...]            train, search, export, fine-tune and report on MiniLM-L6
    pykd hpo [CONFIG.yaml] --trials N [--space S.yaml] [--storage URL] [--set ...]   Optuna search of the KD pipeline
    pykd recommend [CONFIG.yaml] --data DATASET [--student ...] [--top-k K] [--table T]   AutoDistiller's top-k
    pykd runs-table [--datasets ...] [--output T.csv] ...   the KD runs table recommend learns from (--help)

Without CONFIG the embedded default is used; --set overrides any key (YAML values).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

DEMO_COMMON = ["train.batch_size=32", "data.max_length=64"]
DEMO_FINETUNE = ["train.steps=150", "train.lr=5e-5", "train.eval_every=1000", *DEMO_COMMON]
DEMO_DISTILL = ["train.steps=300", "train.lr=2e-4", "train.eval_every=100", *DEMO_COMMON]


# The `kd` extra of pyproject.toml, as the modules its distributions install (tests check they agree).
KD_MODULES = {"transformers": "transformers", "datasets": "datasets", "sklearn": "scikit-learn", "scipy": "scipy",
              "yaml": "pyyaml", "tqdm": "tqdm", "matplotlib": "matplotlib", "optuna": "optuna"}


class MissingExtraError(RuntimeError):
    def __init__(self, modules: list[str]):
        listed = ", ".join(repr(m) for m in modules)
        super().__init__(f"the KD engine needs `pip install 'pykd-distill[kd]'` "
                         f"({'module' if len(modules) == 1 else 'modules'} {listed} "
                         f"{'is' if len(modules) == 1 else 'are'} missing)")


def _require_kd_extra() -> None:
    """Every command needs the kd extra somewhere; a run must not fail on a missing module after it
    has trained (the demo's report needs matplotlib at its very end), so all are looked up first."""
    missing = [name for name in KD_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(missing)


def _missing_kd_module(error: ModuleNotFoundError) -> str | None:
    """The kd-extra module whose absence raised `error` (an import deep inside a dependency too), if any."""
    top = (error.name or "").split(".")[0]
    return top if top in KD_MODULES else None


def _run_config():
    """The KD engine's config module; its dependencies come with the `kd` extra, not with the kernels."""
    from .distill import config

    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pykd", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("finetune", "distill"):
        command = commands.add_parser(name)
        command.add_argument("config", nargs="?", help="YAML run configuration (default: the embedded one)")
        command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    demo = commands.add_parser("demo", help="fine-tune the packaged MiniLM-L6 teacher, distil, report")
    demo.add_argument("--output", default="runs/demo")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    commands.add_parser("config")
    head = commands.add_parser("mlm-head", help="fit a masked-LM head on the packaged MiniLM-L6 encoder (frozen); "
                                                "DIR/model is an AutoModelForMaskedLM for data.kind mlm")
    head.add_argument("--output", default="runs/mlm-head")
    head.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    _nas_parser(commands.add_parser("nas", help="architecture search: train SuperLMs, search, export, demo"))
    _pipeline_search_parsers(commands)
    return parser


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _pipeline_search_parsers(commands) -> None:
    hpo = commands.add_parser("hpo", help="Optuna search over the KD pipeline (pykd.distiller.hpo)")
    hpo.add_argument("config", nargs="?", help="base run configuration (teacher, student, data, train)")
    hpo.add_argument("--trials", type=_at_least_one, required=True, help="finished trials the study should hold")
    hpo.add_argument("--space", help="space file (study and space sections; default: the embedded space)")
    hpo.add_argument("--storage", help="sqlite:///PATH, any SQLAlchemy URL, or journal:PATH (overrides study.storage)")
    hpo.add_argument("--study-name", help="overrides study.name")
    hpo.add_argument("--output", help="overrides study.output (trial runs, trials.csv, plots, default storage)")
    hpo.add_argument("--seed", type=int, help="overrides study.seed (give parallel workers different seeds)")
    hpo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    recommend = commands.add_parser("recommend", help="AutoDistiller: rank KD pipelines for a dataset")
    recommend.add_argument("config", nargs="?", help="base run configuration (needs teacher.finetuned)")
    recommend.add_argument("--data", required=True, help="the dataset (any data.dataset value)")
    recommend.add_argument("--student", help="layers=L,hidden=H,heads=A,ffn=F (default: the config's student)")
    recommend.add_argument("--top-k", type=_at_least_one, default=3)
    recommend.add_argument("--table", help="a KD runs table to learn from (`pykd runs-table`; default: the one "
                                           "shipped with pykd)")
    recommend.add_argument("--output", default="runs/recommend", help="where the top-k configs are written")
    recommend.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    # Its options are pykd.distiller.runs_table's own parser's (main passes them on unparsed).
    commands.add_parser("runs-table", add_help=False, help="build a KD runs table (`pykd runs-table --help`)")


def _pipeline_search(args) -> None:
    if args.command == "hpo":
        from .distill.config import load_values
        from .distill.distributed import init_distributed
        from .distiller import hpo

        spec = hpo.load_space(args.space)
        for key, value in (("storage", args.storage), ("name", args.study_name), ("output", args.output),
                           ("seed", args.seed)):
            if value is not None:
                spec.study[key] = value
        init_distributed()
        result = hpo.run_study(load_values(args.config, args.overrides), spec, args.trials)
        if result:
            hpo.print_summary(result)
        return
    from .distiller import autodistiller

    autodistiller.print_recommendations(autodistiller.recommend_cli(
        args.config, args.overrides, args.data, args.student, args.top_k, args.table, args.output))


def _nas_parser(nas: argparse.ArgumentParser) -> None:
    actions = nas.add_subparsers(dest="nas_command", required=True)
    for name in ("train", "search", "export"):
        action = actions.add_parser(name)
        action.add_argument("config", nargs="?", help="YAML run configuration (default: the embedded one)")
        action.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
        if name == "export":
            action.add_argument("--arch", required=True, help="e.g. layers=4,hidden=256,ffn_ratio=3,heads=8")
            action.add_argument("--output", required=True, help="a new directory for the student")
            action.add_argument("--pad-ffn", action="store_true",
                                help="a per-layer architecture whose FFN widths differ: zero-pad them to the widest")
    demo = actions.add_parser("demo", help="the whole chain on the packaged MiniLM-L6 teacher, with a report")
    demo.add_argument("--output", default="runs/nas-demo")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")


def _nas(args, run_config) -> None:
    if args.nas_command == "demo":
        from .nas.demo import run_demo

        run_demo(args.output, args.overrides)
        return
    config = run_config.load(args.config, args.overrides)
    if args.nas_command == "train":
        from .distill.distributed import init_distributed
        from .nas.train import train_supernets

        init_distributed()
        train_supernets(config)
    elif args.nas_command == "search":
        from .nas.search import print_summary, run_search

        print_summary(run_search(config))
    else:
        from .nas.search import export_candidate

        print(f"[nas export] {export_candidate(config, args.arch, args.output, args.pad_ffn)}", flush=True)


def _train(mode: str, config) -> None:
    from .distill.distributed import init_distributed
    from .distill.trainer import Trainer

    init_distributed()
    Trainer(config, mode).train()


def demo(output: str, overrides: list[str]) -> str:
    """The main job end to end; returns the report's path."""
    run_config = _run_config()
    from .distill.report import write_report

    teacher_dir, student_dir = f"{output}/teacher", f"{output}/student"
    print(f"[demo] 1/3 fine-tuning the teacher into {teacher_dir}", flush=True)
    finetune = run_config.load(None, DEMO_FINETUNE + [f"train.output_dir={teacher_dir}"] + overrides)
    _train("finetune", finetune)
    print(f"[demo] 2/3 distilling into a 3-layer student in {student_dir}", flush=True)
    distill = run_config.load(None, DEMO_DISTILL + [f"train.output_dir={student_dir}",
                                                    f"teacher.finetuned={teacher_dir}/model"] + overrides)
    _train("distill", distill)
    print("[demo] 3/3 evaluating both and writing the report", flush=True)
    path = write_report(output, distill, teacher_dir, student_dir)
    print(f"[demo] report: {path}", flush=True)
    return path


def main(argv=None) -> int:
    from .distill.corpora import FetchError  # needs numpy only
    from .distill.stopping import TrainingInterrupted  # needs nothing from the kd extra

    parser = _parser()
    args, passed_on = parser.parse_known_args(argv)
    if passed_on and args.command != "runs-table":
        parser.error(f"unrecognized arguments: {' '.join(passed_on)}")
    command = f"nas {args.nas_command}" if args.command == "nas" else args.command
    try:
        _require_kd_extra()
        run_config = _run_config()
        if args.command == "config":
            import yaml

            yaml.safe_dump(run_config.to_dict(run_config.DEFAULT), sys.stdout, sort_keys=False)
        elif args.command == "demo":
            demo(args.output, args.overrides)
        elif args.command == "mlm-head":
            from .distill.mlm_head import fit_head

            print(f"[mlm-head] {fit_head(args.output, args.overrides)}", flush=True)
        elif args.command == "nas":
            _nas(args, run_config)
        elif args.command in ("hpo", "recommend"):
            _pipeline_search(args)
        elif args.command == "runs-table":
            from .distiller import runs_table

            return runs_table.main(passed_on)
        else:
            _train(args.command, run_config.load(args.config, args.overrides))
        from .distill.distributed import leave_process_group

        leave_process_group()
    except TrainingInterrupted as stop:
        print(f"pykd {command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except ModuleNotFoundError as error:
        if _missing_kd_module(error) is None:
            raise
        print(f"pykd {command}: error: {MissingExtraError([_missing_kd_module(error)])}", file=sys.stderr)
        return 2
    except FetchError as error:  # the network or a package registry failed, not the input: exit 1
        print(f"pykd {command}: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, MissingExtraError) as error:
        print(f"pykd {command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
