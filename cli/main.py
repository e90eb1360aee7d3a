"""The ``seedtune`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import sys
from pathlib import Path

from seedtune.common.errors import SeedtuneError
from seedtune.common.paths import check_creatable

EXIT_USAGE = 2
EXIT_CLOSED_PIPE = 128 + 13  # what a shell reports for a command that SIGPIPE ended (`yes | head -1`)


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None and _SIMULATED:
        # The command itself (not a caller in this process) after a simulation: Ray and Flower leave
        # native state whose teardown at interpreter exit took 2.5 s more after Ctrl-C. Every file
        # is closed and every ledger and log committed by now; only the streams need flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


_SIMULATED = False  # set once this process has run a Flower simulation


def _main(argv: list[str] | None) -> int:
    try:
        try:
            args = _parser().parse_args(argv)
            if getattr(args, "out", None) is not None and not getattr(args, "resume", False):
                check_creatable(args.out)  # before the work, not after it
            return args.run(args)
        except SeedtuneError as error:
            print(f"seedtune: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # a pipe of our own (a child process, a socket) broke: that is a failure to see
        # The reader left (`seedtune show RUN | head`): stop quietly; point stdout at /dev/null so
        # that the interpreter's last flush at exit has somewhere to go.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLOSED_PIPE


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (polled, Linux reports POLLERR; some systems POLLHUP)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor: captured or replaced stdout
        return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seedtune",
        description="Private, forward-only fine-tuning: only seeds and noised scalars leave a silo.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_simulate, _add_partition, _add_export, _add_show, _add_bench, _add_budget,
                _add_audit, _add_silo):
        add(commands)
    return parser


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train one silo privately, on this machine")
    _settings(train, "default (MiniLM on Rotten Tomatoes) or tiny", "privacy.epsilon=2")
    train.add_argument("--out", type=Path, help="run directory (default: runs/<preset>-<time>)")
    train.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    train.add_argument("--public-size", type=int, metavar="N",
                       help="divide releases by q*N, a size you publish, instead of the training set's exact size")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)


def _add_simulate(commands) -> None:
    simulate = commands.add_parser("simulate", help="a federation of silos on this machine (Flower simulation)")
    _settings(simulate, "default (MiniLM, Rotten Tomatoes, 3 silos) or tiny", "federation.partition=label-skew")
    simulate.add_argument("--silos", "--clients", dest="silos", type=int,
                          help="number of silos (federation.silos; --clients is its old name)")
    simulate.add_argument("--rounds", type=int, help="number of rounds (schedule.steps)")
    simulate.add_argument("--out", type=Path, help="run directory (default: runs/sim-<preset>-<time>)")
    simulate.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    simulate.add_argument("--no-progress", action="store_true", help="no progress bar")
    simulate.set_defaults(run=_simulate)


def _add_partition(commands) -> None:
    partition = commands.add_parser(
        "partition", help="write each silo's share of a preset's data to its own file (for a deployment)")
    _settings(partition, "whose data and split to use (default, tiny)", "federation.partition=quantity-skew")
    partition.add_argument("--silos", "--clients", dest="silos", type=int,
                           help="number of silos (federation.silos; --clients is its old name)")
    partition.add_argument("--out", type=Path, required=True, help="folder for silo-<i>.jsonl")
    partition.set_defaults(run=_partition)


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="rebuild a run's model from its base and log alone")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, required=True, help="directory to write the model to")
    export.set_defaults(run=_export)


def _add_show(commands) -> None:
    show = commands.add_parser("show", help="a run's config, privacy spent, and per-step seeds and scalars")
    show.add_argument("run_dir", type=Path)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--steps", type=int, default=10, help="how many steps to list (text output; -1 = all)")
    show.set_defaults(run=_show)


COST_BENCHES = {
    "step": "time of a ZO step over two plain forward passes (MiniLM, batch 16 x 64): every parameter, "
            "1% mask, LoRA, K=4, and the naive MeZO step",
    "memory": "memory above the model during a step: ZO, inference, backpropagation, DP-SGD (Opacus), "
              "each in a fresh process",
    "comm": "bytes per client per round on the serialized Flower messages, K in {1, 4, 16}, against FedAvg; "
            "totals over 1,000 rounds",
    "server": "coordinator time per round against a client step; catch-up replay speed against a model download",
    "scale": "simulated federations of 2, 4 and 8 silos (tiny preset): framework time against forward passes, "
             "memory per silo",
    "sweep": "step time and memory against batch size for ZO, inference, backpropagation and DP-SGD, with a plot",
    "noise": "what the default discrete Gaussian costs against floating-point noise: time per release, extra "
             "noise, extra sigma for a budget",
    "robust": "one silo of 5 sends the largest finite, sign-flipped or NaN scalars: final test accuracy under "
              "the mean, the median and the trimmed mean (tiny preset)",
    "deploy": "seconds per round on a loopback deployment (TLS, node auth, resident engines) against the "
              "simulation engine, the same job: tiny and default presets, tau 1 and 6",
    "secure": "federated accuracy at equal epsilon per silo and equal total data, 3 and 10 silos: per-silo noise, "
              "secure aggregation with distributed noise, and one silo holding all the data; bytes and seconds "
              "per round beside it",
}


def _add_bench(commands) -> None:
    bench = commands.add_parser("bench", help="measure seedtune: accuracy against privacy and other methods; "
                                              "time, memory and traffic against their limits")
    benches = bench.add_subparsers(dest="bench", required=True)
    _add_bench_utility(benches)
    _add_bench_recipe(benches)
    for name, text in COST_BENCHES.items():
        command = benches.add_parser(name, help=text.replace("%", "%%"), description=text)  # help is %-formatted
        command.add_argument("--quick", action="store_true", help="fewer repeats, rounds and sizes: a smoke test")
        command.add_argument("--json", action="store_true", help="print the results as JSON")
        command.add_argument("--out", type=Path, help=f"write {name}.json (and for sweep, sweep.png) here")
        command.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "server":
            command.add_argument("--profile", action="store_true",
                                 help="also print torch's profile of the every-parameter replay")
        if name == "secure":
            command.add_argument("--preset", default="default",
                                 help="the run to compare on (default: simulate's default, head only)")
        if name in ("robust", "deploy", "secure"):
            command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                                 help="override a setting of every run, e.g. --set data.synthetic_size=1500")
        if name == "deploy":
            command.add_argument("--job", action="store_true",
                                 help="instead, deploy the default preset's whole job (with --set) and time it")
        command.set_defaults(run=_bench_cost)


def _add_bench_utility(benches) -> None:
    utility = benches.add_parser(
        "utility", help="test accuracy of zero-shot, the first-order ceiling, MeZO, DPZero, DP-ZOSO, DP-SGD "
                        "(Opacus) and the federated recipe at epsilon 2 and 6, on the preset's trainable set")
    utility.add_argument("--quick", action="store_true", help="slices and one seed: a few minutes")
    utility.add_argument("--preset", default="default", help="the model, data and subset to compare on")
    utility.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a setting of every run, e.g. --set schedule.steps=500")
    utility.add_argument("--methods", default=",".join(("zero-shot", "ceiling", "mezo", "dpzero", "dp-zoso",
                                                          "dp-sgd", "one-silo", "federated")),
                         help="comma-separated subset of the methods")
    utility.add_argument("--epsilons", help="comma-separated budgets of the private methods (default 2,6)")
    utility.add_argument("--seeds", type=int, help="runs per method and epsilon (default 1)")
    utility.add_argument("--dpzero-lr", type=float, help="DPZero's step size (default 0.2, chosen on validation)")
    utility.add_argument("--dpsgd-lr", type=float, help="DP-SGD's step size (default 2, chosen on validation)")
    utility.add_argument("--jobs", type=int, default=1,
                         help="runs at once, each a fresh process on its share of the cores (default 1)")
    utility.add_argument("--out", type=Path, help="folder for utility.json, utility.png and the runs "
                                                  "(default: runs/bench-utility-<time>)")
    utility.add_argument("--json", action="store_true", help="print the results as JSON")
    utility.add_argument("--no-progress", action="store_true", help="no progress bar")
    utility.set_defaults(run=_bench_utility)


def _add_bench_recipe(benches) -> None:
    recipe = benches.add_parser(
        "recipe", help="choose a head-only recipe on the validation split: each point of a grid replayed "
                       "privately on the frozen encoder's embeddings, seconds a run; never reads the test split")
    _settings(recipe, "the run to start from: default (simulate's, 3 silos) or a --config", "privacy.epsilon=2")
    recipe.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                        help="a setting to vary, e.g. --vary lr=10,20 (repeatable; keys: steps, lr, kind, stages, "
                             "probes, sample_rate, clip_bound, epsilon, silos)")
    recipe.add_argument("--method", choices=("zeroth-order", "dp-sgd"), default="zeroth-order",
                        help="what to replay: the private zeroth-order run (default) or the DP-SGD baseline through "
                             "Opacus on one silo (keys: steps, lr, sample_rate, clip_bound, epsilon)")
    recipe.add_argument("--seeds", type=int, default=4, help="replays per point (default 4)")
    recipe.add_argument("--time-steps", action="store_true",
                        help="also time one real silo step at each point's K and q (the real model, prefix kept)")
    recipe.add_argument("--json", action="store_true", help="print the results as JSON")
    recipe.add_argument("--out", type=Path, help="write recipe.json here")
    recipe.add_argument("--no-progress", action="store_true", help="no progress bar")
    recipe.set_defaults(run=_bench_recipe)


def _bench_recipe(args) -> int:
    from seedtune.bench.recipe import bench_recipe
    from seedtune.cli.reports import print_recipe

    if args.seeds < 1:
        raise SeedtuneError(f"--seeds {args.seeds} must be >= 1")
    report = bench_recipe(args.preset, args.config, args.overrides, args.vary, args.seeds,
                          progress=not args.no_progress, time_steps=args.time_steps, method=args.method)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "recipe.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_recipe(report)
    return 0


def _add_budget(commands) -> None:
    budget = commands.add_parser("budget", help="sigma for a privacy budget, or epsilon for a sigma")
    target = budget.add_mutually_exclusive_group(required=True)
    target.add_argument("--epsilon", type=float, help="target epsilon: prints the noise multiplier sigma")
    target.add_argument("--sigma", type=float, help="noise multiplier: prints the epsilon it spends")
    budget.add_argument("--delta", type=float, required=True)
    budget.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q")
    budget.add_argument("--steps", type=int, required=True)
    budget.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")
    budget.add_argument("--noise", choices=("discrete", "gaussian"), default="discrete",
                        help="the noise a release draws (privacy.noise; 'pld' needs 'gaussian')")
    budget.set_defaults(run=_budget)


def _add_audit(commands) -> None:
    audit = commands.add_parser(
        "audit", help="empirical privacy audit of real silos: a lower bound on epsilon beside what they charge")
    _settings(audit, "whose silos to audit (default, tiny)", "privacy.noise=gaussian")
    audit.add_argument("--epsilon", type=float,
                       help="calibrate sigma so that the one audited release spends this epsilon (default 2)")
    audit.add_argument("--attack", default="none", choices=("none", "noise-seed", "nonfinite", "padding"),
                       help="what the adversarial coordinator tries (default none; docs/audit.md)")
    audit.add_argument("--beta", type=float, help="the request's ZO scale (default: the attack's, else the schedule's)")
    audit.add_argument("--trials", type=int, default=2_000, help="releases per dataset, D and D' (default 2000)")
    audit.add_argument("--sample-rate", type=float, default=1.0,
                       help="Poisson rate q of the audited release (default 1: the sharpest test)")
    audit.add_argument("--noise-off", action="store_true", help="audit a non-private run: no clipping, no noise")
    audit.add_argument("--confidence", type=float, default=0.95, help="of the lower bounds (default 0.95)")
    audit.add_argument("--json", action="store_true", help="machine-readable output")
    audit.add_argument("--no-progress", action="store_true", help="no progress bar")
    audit.set_defaults(run=_audit)


def _add_silo(commands) -> None:
    silo = commands.add_parser("silo", help="a silo's resident engine, beside its SuperNode (docs/deploy.md)")
    actions = silo.add_subparsers(dest="action", required=True)
    serve = actions.add_parser("serve", help="hold this silo's model, data and ledger; answer its ClientApp over "
                                             "a Unix socket (mode 0600) until stopped")
    serve.add_argument("--socket", type=Path, required=True,
                       help="the socket to create; give the same path to the SuperNode as node config engine")
    serve.add_argument("--node-config", default="", metavar='"KEY=VALUE ..."',
                       help='the silo\'s settings, as a SuperNode takes them: state-dir, data-path, public-size, '
                            'epsilon, limits (docs/deploy.md lists them)')
    serve.set_defaults(run=_silo_serve)
    ping = actions.add_parser("ping", help="exit 0 if an engine answers at --socket (a healthcheck)")
    ping.add_argument("--socket", type=Path, required=True)
    ping.set_defaults(run=_silo_ping)
    supernode = actions.add_parser(  # every argument is flower-supernode's, --help included
        "supernode", prefix_chars="\0", add_help=False,
        help="Flower's flower-supernode, waiting less between rounds (client/supernode.py); takes its arguments")
    supernode.add_argument("arguments", nargs="*", help="flower-supernode's arguments")
    supernode.set_defaults(run=_silo_supernode)


def _silo_serve(args) -> int:
    import logging
    import signal

    from flwr.common.config import parse_config_args

    from seedtune.client.engine import SiloEngine

    try:
        node_config = parse_config_args([args.node_config]) if args.node_config.strip() else {}
    except ValueError as error:
        raise SeedtuneError(f"--node-config {args.node_config!r}: {error}; write KEY=VALUE pairs, "
                            'strings in double quotes: state-dir="/state" epsilon=6.0') from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = SiloEngine(args.socket, node_config)
    engine.listen()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: engine.stop())
    print(f"seedtune: silo engine {engine.name!r} answers at {args.socket} (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    engine.serve()
    print(f"seedtune: silo engine {engine.name!r} stopped", file=sys.stderr)
    return 0


def _silo_supernode(args) -> int:
    from seedtune.client.supernode import run_supernode

    run_supernode(args.arguments)
    return 0


def _silo_ping(args) -> int:
    from seedtune.client.channel import EngineUnavailable, ask

    try:
        header, _ = ask(str(args.socket), "ping")
    except EngineUnavailable as error:
        raise SeedtuneError(str(error)) from None
    print(f"silo engine {header.get('silo')!r} answers at {args.socket} (pid {header.get('pid')})")
    return 0


def _settings(command: argparse.ArgumentParser, presets: str, example: str) -> None:
    """--preset, --config and --set: where a command's configuration comes from."""
    command.add_argument("--preset", default="default", help=presets)
    command.add_argument("--config", type=Path, help="a TOML file of settings, applied over the preset")
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help=f"override one setting, e.g. --set {example} (repeatable)")


def _bench_utility(args) -> int:
    from datetime import datetime

    from seedtune.bench.utility import bench_utility
    from seedtune.cli.reports import print_utility

    out = args.out or Path("runs") / f"bench-utility-{datetime.now():%Y%m%d-%H%M%S}"
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    summary = bench_utility(out, quick=args.quick, preset=args.preset, overrides=tuple(args.overrides),
                            methods=methods, seeds=args.seeds, dpzero_lr=args.dpzero_lr, dpsgd_lr=args.dpsgd_lr,
                            jobs=args.jobs, epsilons=_floats("--epsilons", args.epsilons), progress=not args.no_progress)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_utility(summary)
        print(f"\n{out / 'utility.json'}, {out / 'utility.png'} ({summary['wall_s']:.0f} s)")
    return 0


def _floats(flag: str, text: str | None) -> tuple[float, ...] | None:
    """``1,2.5`` into (1.0, 2.5); a one-line error naming ``flag`` otherwise."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise SeedtuneError(f"{flag} {text!r}: expected comma-separated numbers, e.g. {flag} 2,6") from None


def _bench_cost(args) -> int:
    from seedtune.bench.run import run_bench
    from seedtune.cli.reports import print_bench

    name = "deploy-job" if getattr(args, "job", False) else args.bench
    report = run_bench(name, quick=args.quick, out=args.out, progress=not args.no_progress,
                       profile=getattr(args, "profile", False), overrides=tuple(getattr(args, "overrides", ())),
                       preset=getattr(args, "preset", "default"))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_bench(report)
    return 0


def _train(args) -> int:
    from datetime import datetime

    from seedtune.cli.reports import print_training
    from seedtune.jobs.train import train
    from seedtune.common.config import load_config

    if args.resume:
        if args.out is None:
            raise SeedtuneError("--resume needs --out RUN_DIR, the run to continue")
        from seedtune.common.config import Config

        config = Config()  # replaced by the run's own config
    else:
        config = load_config(args.preset, args.config, args.overrides)
    if args.public_size is not None and args.public_size < 1:
        raise SeedtuneError(f"--public-size {args.public_size} must be >= 1")
    out = args.out or Path("runs") / f"{args.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    result = train(config, out, resume=args.resume, progress=not args.no_progress, public_size=args.public_size)
    print_training(result)
    return 0


def _simulate(args) -> int:
    global _SIMULATED
    from datetime import datetime

    from seedtune.cli.reports import print_simulation
    from seedtune.jobs.simulate import simulate
    from seedtune.common.config import Config, load_config

    if args.resume and args.out is None:
        raise SeedtuneError("--resume needs --out RUN_DIR, the run to continue")
    for flag, value in (("--silos", args.silos), ("--rounds", args.rounds)):
        if value is not None and value < 1:
            raise SeedtuneError(f"{flag} {value} must be >= 1")
    config = Config() if args.resume else load_config(args.preset, args.config, args.overrides, command="simulate")
    out = args.out or Path("runs") / f"sim-{args.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    _SIMULATED = True
    result = simulate(config, out, silos=args.silos, rounds=args.rounds, resume=args.resume,
                      progress=not args.no_progress)
    print_simulation(result)
    return 0


def _partition(args) -> int:
    from seedtune.common import components
    from seedtune.common.config import load_config

    if args.silos is not None and args.silos < 1:
        raise SeedtuneError(f"--silos {args.silos} must be >= 1")
    overrides = list(args.overrides) + ([f"federation.silos={args.silos}"] if args.silos else [])
    config = load_config(args.preset, args.config, overrides, command="simulate")
    silos = config.federation.silos
    names = components.load_data(config).label_names
    existing = [args.out / f"silo-{i}.jsonl" for i in range(silos) if (args.out / f"silo-{i}.jsonl").exists()]
    if existing:
        raise SeedtuneError(f"{existing[0]} already exists: a silo's data is not overwritten; choose another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    for silo in range(silos):
        rows = [row for split in ("train", "validation")
                for row in components.silo_shard(config, split, silo, silos)]
        path = args.out / f"silo-{silo}.jsonl"
        partial = path.with_name(path.name + ".partial")
        with partial.open("w") as file:  # labels by name, so a silo's file means the same to everyone
            for row in rows:
                file.write(json.dumps({"text": row["text"], "label": names[row["label"]]}) + "\n")
        partial.replace(path)
        print(f"{path}: {len(rows)} examples")
    return 0


def _export(args) -> int:
    from seedtune.jobs.export import export

    steps = export(args.run_dir, args.out)
    print(f"rebuilt {args.out} from the base model and {steps} logged steps")
    return 0


def _show(args) -> int:
    from seedtune.cli.reports import print_run
    from seedtune.jobs.export import describe

    report = describe(args.run_dir)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print_run(report, args.run_dir, args.steps)
    return 0


def _budget(args) -> int:
    from seedtune.common.privacy.accounting import (
        calibrate_noise_multiplier,
        epsilon_for,
    )

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SeedtuneError(message)

    need(0 < args.delta < 1, f"--delta {args.delta} must be in (0, 1), e.g. 1e-5")
    need(0 < args.sample_rate <= 1, f"--sample-rate {args.sample_rate} must be in (0, 1]")
    need(args.steps >= 1, f"--steps {args.steps} must be >= 1")
    need(not (args.accountant == "pld" and args.noise == "discrete"),
         "--accountant pld models the continuous Gaussian only: add --noise gaussian, or use --accountant rdp")
    if args.epsilon is not None:
        need(args.epsilon > 0 and math.isfinite(args.epsilon), f"--epsilon {args.epsilon} must be a finite number > 0")
        sigma = calibrate_noise_multiplier(args.epsilon, args.delta, args.sample_rate, args.steps, args.accountant,
                                           noise=args.noise)
        print(f"{sigma:.4f}")
    else:
        need(args.sigma > 0, f"--sigma {args.sigma} must be > 0")
        print(f"{epsilon_for(args.sigma, args.sample_rate, args.steps, args.delta, args.accountant, args.noise):.4f}")
    return 0


def _audit(args) -> int:
    from seedtune.cli.reports import print_audit
    from seedtune.jobs.audit import run_audit, validate
    from seedtune.common.config import load_config

    validate(epsilon=args.epsilon, trials=args.trials, sample_rate=args.sample_rate, noise_off=args.noise_off,
             confidence=args.confidence, attack=args.attack, beta=args.beta)
    config = load_config(args.preset, args.config, args.overrides)
    result = run_audit(config, epsilon=args.epsilon, trials=args.trials, sample_rate=args.sample_rate,
                       noise_off=args.noise_off, confidence=args.confidence, attack=args.attack, beta=args.beta,
                       progress=not args.no_progress)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_audit(result, config)
    return 0 if result.consistent else 1


if __name__ == "__main__":
    sys.exit(main())
