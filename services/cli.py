"""The `muserve` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services import __version__


def _set(env: dict[str, str], key: str, value: object) -> None:
    if value is not None:
        env[key] = str(value)


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    """CLI flags become MUSERVE_* variables, so child processes see them too."""
    env: dict[str, str] = {}
    _set(env, "MUSERVE_NATS_URL", getattr(args, "nats_url", None))
    _set(env, "MUSERVE_CACHE", getattr(args, "cache", None))
    _set(env, "MUSERVE_WORKER__MODEL", getattr(args, "model", None))
    _set(env, "MUSERVE_WORKER__MAX_SEQS", getattr(args, "max_seqs", None))
    _set(env, "MUSERVE_WORKER__NUM_HIDDEN_LAYERS", getattr(args, "layers", None))
    _set(env, "MUSERVE_WORKER__DTYPE", getattr(args, "dtype", None))
    _set(env, "MUSERVE_WORKER__GPU", getattr(args, "gpu", None))
    if getattr(args, "noop", False):
        env["MUSERVE_WORKER__MODE"] = "noop"
    _set(env, "MUSERVE_GATEWAY__PORT", getattr(args, "port", None))
    _set(env, "MUSERVE_OTEL__EXPORTER", getattr(args, "otel", None))
    return env


def _apply(env: dict[str, str]) -> None:
    os.environ.update(env)


def _worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="catalogue model to serve (default: smollm2-135m-instruct)")
    p.add_argument("--max-seqs", type=int, help="batch slots (concurrent sequences)")
    p.add_argument("--layers", type=int, help="keep only the first N layers (fast tests; nonsense text)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"])
    p.add_argument("--noop", action="store_true", help="no model: answer at once (control-plane benchmark)")


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PACKAGE_ARTIFACT = Path(__file__).resolve().parent / "predictor" / "artifacts" / "default"


def _predictor_commands(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """`muserve predictor` runs the service; its subcommands build and judge the model."""
    psub = p.add_subparsers(dest="predictor_cmd", required=False)
    col = psub.add_parser("collect", parents=[common], help="record a served model's output lengths")
    col.add_argument(
        "--prompts",
        type=Path,
        default=DATA / "alpaca_eval_prompts.jsonl",
        help="AlpacaEval .jsonl (idx, instruction) or ShareGPT .json",
    )
    col.add_argument("--out", type=Path, help="JSONL to append to (default: <cache>/collect/<model>.jsonl)")
    col.add_argument("--model", default=None, help="catalogue model (default: the worker's model)")
    col.add_argument("--url", help="collect through this running muserve gateway instead of in-process")
    col.add_argument("--max-tokens", type=int, default=2048)
    col.add_argument("--temperature", type=float, default=0.7)
    col.add_argument("--top-p", type=float, default=0.9)
    col.add_argument("--seed", type=int, default=0)
    col.add_argument("--batch", type=int, default=16, help="sequences at once (engine) / requests in flight")
    col.add_argument("--limit", type=int, help="at most this many new prompts")
    tr = psub.add_parser("train", parents=[common], help="train the proxy length predictor (CPU, minutes)")
    tr.add_argument("--data", type=Path, default=DATA, help="folder with the AlpacaEval files")
    tr.add_argument(
        "--collected", type=Path, nargs="*", help="collect files (default: <cache>/collect/*.jsonl)"
    )
    tr.add_argument(
        "--out",
        type=Path,
        help="artifact folder (default: that encoder's shipped one, artifacts/default or artifacts/minilm)",
    )
    tr.add_argument(
        "--encoder",
        choices=["minilm", "smollm2"],
        default="smollm2",
        help="smollm2: the served LLM's own first layers (the default artifact); minilm: LoRA-tuned sentence "
        "encoder (fast)",
    )
    tr.add_argument(
        "--layers", type=int, help="encoder layers kept (default: minilm 4, smollm2 16, smollm2 --tune 4)"
    )
    tr.add_argument(
        "--tune",
        action="store_true",
        help="smollm2: LoRA-tune the kept layers (a few-layer student of the frozen 16-layer teacher, "
        "--teacher auto: the shipped SmolLM2 artifact)",
    )
    tr.add_argument("--classes", type=int, default=5)
    tr.add_argument("--objective", default="listmle", help="ranking (listmle) or regression (mse) loss")
    tr.add_argument("--epochs", type=int, help="default: minilm 8, smollm2 60")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=1, help="torch threads")
    tr.add_argument(
        "--teacher",
        default="auto",
        help="artifact folder to distil from (same split): its predictions on the train prompts, the "
        "--unlabeled prompts and their variants become extra targets; auto: the shipped SmolLM2 one for "
        "--encoder minilm, none for smollm2; none: no teacher",
    )
    tr.add_argument(
        "--unlabeled",
        choices=["sharegpt", "none"],
        default="sharegpt",
        help="prompts without answers the teacher labels (sharegpt: ShareGPT's 1,000 first turns)",
    )
    tr.add_argument(
        "--synthetic",
        type=int,
        default=0,
        help="with --unlabeled sharegpt: that many more prompts written by the served LLM after examples "
        "from the train prompts and ShareGPT (self-instruct; 2000 take ~17 min once, then cached; measured "
        "with 2000: validation up, test down, not the default); 0: none",
    )
    tr.add_argument("--distill-weight", type=float, default=2.0, help="weight of the teacher's targets")
    tr.add_argument(
        "--augment", type=int, default=1, help="word-dropout variants per prompt the teacher labels (0: none)"
    )
    ev = psub.add_parser("eval", parents=[common], help="held-out evaluation vs baselines (report + PNG)")
    ev.add_argument("--data", type=Path, default=DATA)
    ev.add_argument("--collected", type=Path, nargs="*")
    ev.add_argument("--artifact", type=Path, help="artifact folder (default: the shipped one)")
    ev.add_argument("--out", type=Path, default=Path("bench/results"))
    ev.add_argument("--seed", type=int, default=0, help="the artifact's split seed")
    ev.add_argument(
        "--compare",
        nargs="*",
        default=None,
        metavar="NAME=DIR",
        help="more artifacts scored and timed side by side (default with the shipped artifact: the shipped "
        "MiniLM one, as minilm; none: --compare with no value)",
    )
    cv = psub.add_parser(
        "cv", parents=[common], help="train and score the recipe on several splits (mean, sd, range)"
    )
    cv.add_argument("--data", type=Path, default=DATA)
    cv.add_argument("--collected", type=Path, nargs="*")
    cv.add_argument("--encoder", choices=["minilm", "smollm2"], default="smollm2")
    cv.add_argument(
        "--distil",
        action="store_true",
        help="minilm: each split's student distils a SmolLM2 teacher trained on that split, with ShareGPT's "
        "prompts (the shipped recipe; ~25 min a split on 2 cores)",
    )
    cv.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="split seeds")
    cv.add_argument("--threads", type=int, default=1, help="torch threads")
    cv.add_argument("--work", type=Path, help="per-split artifacts (default: <cache>/predictor-cv)")
    cv.add_argument("--out", type=Path, default=Path("bench/results"), help="report folder")
    cv.add_argument(
        "--add",
        action="store_true",
        help="merge these splits into the report already in --out (same recipe): a long cv over sessions; "
        "splits already trained and scored in --work are reused either way",
    )


def build_parser() -> argparse.ArgumentParser:
    """All subcommands."""
    parser = argparse.ArgumentParser(prog="muserve", description="Power-aware model serving over NATS.")
    parser.add_argument("--version", action="version", version=f"muserve {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--nats-url", help="NATS server to use (`up`/`demo`: instead of an embedded one)")
    common.add_argument("--otel", choices=["none", "console", "otlp"], help="trace exporter")
    common.add_argument("--cache", type=Path, help="model cache folder (env MUSERVE_CACHE)")
    sub = parser.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", parents=[common], help="embedded NATS + every service, in the foreground")
    up.add_argument("--port", type=int, default=8000, help="gateway HTTP port (default 8000)")
    up.add_argument("--nats-port", type=int, default=14222, help="embedded nats-server port (default 14222)")
    up.add_argument("--data-dir", type=Path, help="JetStream store etc. (default ~/.local/share/muserve)")
    up.add_argument("--no-embeddings", action="store_true", help="skip the MiniLM embedding worker")
    up.add_argument("--no-powerd", action="store_true", help="skip the power daemon")
    _worker_flags(up)

    demo = sub.add_parser(
        "demo", parents=[common], help="start everything, send a short mixed workload, print a summary, stop"
    )
    demo.add_argument("--requests", type=int, default=8, help="chat requests in the workload")
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--logs", type=Path, help="keep service logs here (default: a temp dir)")
    _worker_flags(demo)

    for name, text in (
        ("gateway", "OpenAI-compatible HTTP gateway"),
        ("scheduler", "queues (FCFS/SSJF), JetStream durability, dispatch"),
        ("predictor", "output-length predictor (NATS queue group)"),
        ("powerd", "per-node GPU clock daemon"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        if name == "gateway":
            p.add_argument("--port", type=int)
        if name == "predictor":
            _predictor_commands(p, common)
    worker = sub.add_parser("worker", parents=[common], help="serve one model on one GPU")
    _worker_flags(worker)
    worker.add_argument("--gpu", type=int)

    sub.add_parser("prepare", parents=[common], help="convert packaged model weights into the cache once")
    cal = sub.add_parser(
        "calibrate", parents=[common], help="measure the worker engine's step latency for `muserve sim`"
    )
    cal.add_argument("--out", type=Path, default=Path("bench/results/calibration.json"), help="JSON to write")
    cal.add_argument("--max-seqs", type=int, default=8, help="largest batch measured (the worker's max_seqs)")
    cal.add_argument(
        "--layers", type=int, help="keep only the first N layers (as MUSERVE_WORKER__NUM_HIDDEN_LAYERS)"
    )
    cal.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16 (the worker's default)")
    cal.add_argument("--prompt-tokens", default="16,128,512", help="prompt lengths, comma separated")
    cal.add_argument("--decode-tokens", type=int, default=48, help="tokens decoded per sequence")
    cal.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    cal.add_argument(
        "--clock-share", type=float, help="part of a step that scales with the clock (default: model's s)"
    )
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    ov = bsub.add_parser("overhead", parents=[common], help="control-plane latency with a no-op worker")
    ov.add_argument("--rates", default="50,100,200", help="request rates (req/s), comma separated")
    ov.add_argument("--duration", type=float, default=10.0, help="seconds per rate and path")
    ov.add_argument("--repeats", type=int, default=3, help="runs per rate (median reported)")
    ov.add_argument("--out", type=Path, default=Path("bench/results"), help="report folder")
    rp = bsub.add_parser("replay", parents=[common], help="FCFS vs SSJF vs oracle SJF on a replayed trace")
    rp.add_argument("--data", type=Path, default=DATA, help="folder with the AlpacaEval and Azure files")
    rp.add_argument("--lengths", default="vicuna-13b", help="LLM whose true output lengths are replayed")
    rp.add_argument("--arrivals", default="azure-conv", help="azure-conv, azure-code, poisson or gamma")
    rp.add_argument("--load", type=float, default=0.9, help="arrival rate / measured capacity")
    rp.add_argument("--requests", type=int, default=100)
    rp.add_argument("--max-len", type=int, default=512, help="cap on replayed output lengths")
    rp.add_argument("--max-seqs", type=int, default=2, help="worker batch slots (a capped batch)")
    rp.add_argument("--layers", type=int, default=4, help="SmolLM2 layers kept (30 = full model)")
    rp.add_argument("--aging-factor", type=float, default=6.0, help="promote after this x predicted exec")
    rp.add_argument("--repeats", type=int, default=1, help="passes over the policies, pooled")
    rp.add_argument("--policies", default="fcfs,ssjf,oracle")
    rp.add_argument(
        "--mode",
        choices=("simultaneous", "sequential"),
        default="simultaneous",
        help="policies at once (a worker each: the machine's drift hits all alike) or one after the other",
    )
    rp.add_argument("--slo-scale", type=float, default=5.0)
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--out", type=Path, default=Path("bench/results"), help="report folder")
    _powerloop_command(bsub, common)
    ag = bsub.add_parser("aging", parents=[common], help="SSJF aging factor: mean vs p99 JCT (simulated)")
    ag.add_argument("--data", type=Path, default=DATA, help="folder with the AlpacaEval and Azure files")
    ag.add_argument("--lengths", default="vicuna-13b,text_davinci_003", help="LLMs whose lengths are used")
    ag.add_argument("--aging", default="2,4,6,8,12,16", help="aging factors, comma separated")
    ag.add_argument("--load", type=float, default=0.9, help="load factor (x the worker's capacity)")
    ag.add_argument("--requests", type=int, default=2000, help="requests per run")
    ag.add_argument("--seeds", type=int, default=3, help="runs per setting (median reported)")
    ag.add_argument("--calibration", type=Path, help="step-model JSON (default: measure the replay's worker)")
    ag.add_argument("--out", type=Path, default=Path("bench/results"), help="report folder")
    _sim_and_profile_commands(sub)
    return parser


def _powerloop_command(
    bsub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """`muserve bench powerloop`: the live closed loop, slo-aware vs max-clock on a simulated GPU."""
    pl = bsub.add_parser(
        "powerloop", parents=[common], help="live closed loop: slo-aware vs max-clock clocks (simulated GPU)"
    )
    pl.add_argument("--data", type=Path, default=DATA, help="folder with the AlpacaEval files")
    # Short answers (median 81 tokens) keep requests short without a cap: a binding cap would make the
    # scheduler's (uncapped) length predictions too long, and with them the clock policy's load estimate.
    pl.add_argument("--lengths", default="alpaca-7b", help="LLM whose true output lengths are replayed")
    pl.add_argument("--max-len", type=int, default=512, help="cap on replayed output lengths")
    pl.add_argument("--max-seqs", type=int, default=2, help="worker batch slots")
    pl.add_argument("--layers", type=int, default=4, help="SmolLM2 layers kept (30 = full model)")
    pl.add_argument("--low-load", type=float, default=0.15, help="load of the low phases (x capacity)")
    pl.add_argument("--burst-load", type=float, default=0.8, help="load of the burst (x capacity)")
    pl.add_argument("--low-s", type=float, default=45.0, help="seconds of each low phase")
    pl.add_argument("--burst-s", type=float, default=40.0, help="seconds of the burst")
    pl.add_argument("--slo-scale", type=float, default=5.0, help="SLO: JCT <= this x time alone at max clock")
    pl.add_argument(
        "--sensitivity", type=float, default=0.6, help="the model's s (worker stretch and policy)"
    )
    pl.add_argument("--warmup", type=int, default=16, help="warm-up requests per run (exec-time fit)")
    pl.add_argument("--policies", default="max-clock,slo-aware")
    pl.add_argument("--no-twin", action="store_true", help="skip the simulator run of the same workload")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--out", type=Path, default=Path("bench/results"), help="report folder")


def _run_powerloop(args: argparse.Namespace) -> None:
    """Run `muserve bench powerloop`."""
    from bench.powerloop import Phase, run_powerloop

    run_powerloop(
        data_dir=args.data,
        out_dir=args.out,
        lengths_model=args.lengths,
        max_len=args.max_len,
        max_seqs=args.max_seqs,
        layers=args.layers if args.layers < 30 else None,
        phases=[
            Phase("low", args.low_s, args.low_load),
            Phase("burst", args.burst_s, args.burst_load),
            Phase("low again", args.low_s, args.low_load),
        ],
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        slo_scale=args.slo_scale,
        sensitivity=args.sensitivity,
        warmup=args.warmup,
        twin_sim=not args.no_twin,
        seed=args.seed,
        command=" ".join(["muserve", *sys.argv[1:]]),
    )


def _sim_and_profile_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`muserve sim` (discrete-event simulator) and `muserve profile` (frequency sensitivity)."""
    sim = sub.add_parser("sim", help="simulate {fcfs,ssjf,oracle} x {max-clock,queue-threshold,slo-aware}")
    sim.add_argument("--data", type=Path, default=DATA, help="folder with the Azure trace CSVs")
    sim.add_argument("--out", type=Path, default=Path("bench/results"), help="report folder")
    sim.add_argument("--workload", default="azure-conv", help="azure-conv, azure-code, poisson or gamma")
    sim.add_argument("--requests", type=int, help="requests of the workload (default: the whole trace)")
    sim.add_argument("--profile", default="V100", help="GPU profile: V100, A100 or H100")
    sim.add_argument(
        "--model", default="llama-3.2-3b", help="built-in model shape or an HF folder/config.json"
    )
    sim.add_argument("--slots", type=int, default=8, help="sequences per GPU (the worker's max_seqs)")
    sim.add_argument("--gpus", type=int, help="cluster size (default: smallest meeting the SLO at max clock)")
    sim.add_argument("--low-load", type=float, default=0.5, help="low load as a fraction of the trace's rate")
    sim.add_argument(
        "--slo-scale", type=float, default=5.0, help="SLO: JCT <= this x time alone at max clock"
    )
    sim.add_argument("--sensitivity", type=float, help="s given to the policy (default: roofline estimate)")
    sim.add_argument("--confusion", type=Path, help="predictor confusion matrix JSON (default: shipped)")
    sim.add_argument("--calibration", type=Path, help="step-model calibration JSON (default: roofline)")
    sim.add_argument("--sweep-loads", default="0.25,0.75,1.25", help="extra SSJF loads to compare")
    sim.add_argument("--speed-gpus", type=int, default=1000, help="speed run cluster size (0: skip)")
    sim.add_argument("--speed-requests", type=int, default=1_000_000, help="speed run requests (0: skip)")
    sim.add_argument(
        "--speed-groups",
        type=int,
        help="speed run as N independent model groups, a process each (default: cores)",
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    prof = sub.add_parser("profile", help="a model's frequency sensitivity: NVML-measured, else roofline")
    prof.add_argument("--model", default="llama-3.2-3b", help="built-in model shape or an HF folder")
    prof.add_argument("--profile", default="V100", help="GPU profile for the roofline estimate")
    prof.add_argument("--gpu", type=int, default=0, help="NVML device index to measure on")
    prof.add_argument("--batch", type=int, default=8)
    prof.add_argument("--context", type=int, default=1024, help="context tokens per sequence")
    prof.add_argument("--prompt-tokens", type=float, help="with --output-tokens: a request's GPU-time mix")
    prof.add_argument("--output-tokens", type=float)
    prof.add_argument("--clocks", type=int, default=5, help="locked clocks to measure at")
    prof.add_argument("--repeats", type=int, default=20)
    prof.add_argument("--json", action="store_true", help="print the result as JSON")


def _sim_or_profile(args: argparse.Namespace) -> int:
    """Run `muserve sim` or `muserve profile`."""
    if args.cmd == "profile":
        import json

        from services.powerd.sensitivity import run_profile
        from services.powerd.sim_gpu import get_profile

        result = run_profile(
            args.model,
            get_profile(args.profile),
            gpu_index=args.gpu,
            batch=args.batch,
            context_tokens=args.context,
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens,
            clocks=args.clocks,
            repeats=args.repeats,
            log=(lambda _m: None) if args.json else print,
        )
        if args.json:
            print(json.dumps(result, indent=1))
        return 0
    from services.sim.report import SimPlan, parse_loads, run_sim

    run_sim(
        SimPlan(
            data_dir=args.data,
            out_dir=args.out,
            profile=args.profile,
            model=args.model,
            workload=args.workload,
            requests=args.requests,
            slots=args.slots,
            gpus=args.gpus,
            low_load=args.low_load,
            slo_scale=args.slo_scale,
            sensitivity=args.sensitivity,
            confusion=args.confusion,
            calibration=args.calibration,
            sweep_loads=parse_loads(args.sweep_loads),
            speed_gpus=args.speed_gpus,
            speed_requests=args.speed_requests,
            speed_groups=args.speed_groups,
            seed=args.seed,
            progress=not args.no_progress,
            command=" ".join(["muserve", *sys.argv[1:]]),
        )
    )
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `muserve` console script."""
    args = build_parser().parse_args(argv)
    env = _overrides(args)
    _apply(env)
    cmd = args.cmd
    if cmd in ("sim", "profile"):
        sys.exit(_sim_or_profile(args))
    if cmd == "predictor" and args.predictor_cmd:
        sys.exit(_predictor(args))
    if cmd in ("gateway", "scheduler", "predictor", "powerd", "worker"):
        from importlib import import_module

        module = import_module(f"services.{cmd}.service")
        module.main()
        return
    if cmd == "up":
        from services.common.settings import Settings
        from services.launcher import run_up

        settings = Settings()
        nats_url = args.nats_url
        data_dir = args.data_dir or settings.data_dir
        sys.exit(
            run_up(
                env,
                nats_url=nats_url,
                nats_port=args.nats_port,
                gateway_port=args.port,
                data_dir=data_dir,
                with_embeddings=not args.no_embeddings,
                with_powerd=not args.no_powerd,
            )
        )
    if cmd == "demo":
        from services.demo import run_demo

        sys.exit(run_demo(env, requests=args.requests, max_tokens=args.max_tokens, log_dir=args.logs))
    if cmd == "calibrate":
        from services.common.settings import Settings
        from services.sim.calibrate import calibrate_worker

        try:
            prompts = [int(x) for x in args.prompt_tokens.split(",") if x.strip()]
        except ValueError:
            sys.exit(f"muserve calibrate: --prompt-tokens must be integers, got {args.prompt_tokens!r}")
        try:
            calibrate_worker(
                args.out,
                cache_dir=Settings().cache,
                dtype=args.dtype,
                num_hidden_layers=args.layers,
                max_seqs=args.max_seqs,
                prompt_tokens=prompts,
                decode_tokens=args.decode_tokens,
                threads=args.threads,
                clock_share=args.clock_share,
                show_progress=not args.no_progress,
            )
        except ValueError as exc:
            sys.exit(f"muserve calibrate: {exc}")
        return
    if cmd == "prepare":
        from services.common.settings import Settings
        from services.launcher import prepare_models

        prepare_models(Settings().cache)
        return
    if cmd == "bench" and args.bench == "replay":
        from bench.replay import run_replay

        run_replay(
            data_dir=args.data,
            out_dir=args.out,
            lengths_model=args.lengths,
            arrivals=args.arrivals,
            load=args.load,
            requests=args.requests,
            max_len=args.max_len,
            max_seqs=args.max_seqs,
            layers=args.layers if args.layers < 30 else None,
            policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
            slo_scale=args.slo_scale,
            seed=args.seed,
            aging_factor=args.aging_factor,
            repeats=args.repeats,
            mode=args.mode,
            command=" ".join(["muserve", *sys.argv[1:]]),
        )
        return
    if cmd == "bench" and args.bench == "aging":
        from bench.aging import run_aging

        try:
            run_aging(
                data_dir=args.data,
                out_dir=args.out,
                lengths_models=tuple(m.strip() for m in args.lengths.split(",") if m.strip()),
                aging=tuple(float(a) for a in args.aging.split(",") if a.strip()),
                load=args.load,
                requests=args.requests,
                seeds=args.seeds,
                calibration=args.calibration,
                command=" ".join(["muserve", *sys.argv[1:]]),
            )
        except ValueError as exc:
            sys.exit(f"muserve bench aging: {exc}")
        return
    if cmd == "bench" and args.bench == "powerloop":
        _run_powerloop(args)
        return
    if cmd == "bench":
        from bench.overhead import run_overhead

        rates = [float(r) for r in args.rates.split(",") if r.strip()]
        sys.exit(run_overhead(rates, duration_s=args.duration, repeats=args.repeats, out_dir=args.out))


def _predictor(args: argparse.Namespace) -> int:
    """The predictor's offline commands."""
    from services.common.settings import Settings

    settings = Settings()
    if args.predictor_cmd == "collect":
        from services.predictor.collect import collect_engine, collect_http, read_prompts
        from services.worker.catalog import resolve_model_dir

        name = args.model or settings.worker.model
        spec = settings.model(name)
        if spec is None or spec.kind != "chat":
            print(f"unknown chat model {name!r}", file=sys.stderr)
            return 2
        out = args.out or settings.cache / "collect" / f"{name}.jsonl"
        prompts = read_prompts(args.prompts)
        common = dict(
            model_name=name,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            limit=args.limit,
        )
        if args.url:
            n = collect_http(prompts, out, url=args.url, concurrency=args.batch, **common)  # type: ignore[arg-type]
        else:
            model_dir = resolve_model_dir(spec, settings.cache)
            n = collect_engine(
                prompts,
                out,
                model_dir=model_dir,
                batch=args.batch,  # type: ignore[arg-type]
                dtype=settings.worker.dtype,
                **common,
            )
        print(f"collected {n} new answers into {out}")
        return 0
    collected = args.collected
    if collected is None:
        collected = sorted((settings.cache / "collect").glob("*.jsonl"))
    if args.predictor_cmd == "train":
        from services.predictor.artifacts import MINILM_ARTIFACT_DIR
        from services.predictor.train import train

        if args.tune and args.out is None:
            # The default --out would overwrite the teacher it distils from.
            raise SystemExit("--tune writes a new artifact: give --out")
        out = args.out or (MINILM_ARTIFACT_DIR if args.encoder == "minilm" else PACKAGE_ARTIFACT)
        teacher: Path | None = None
        if args.teacher == "auto":
            teacher = PACKAGE_ARTIFACT if args.encoder == "minilm" or args.tune else None
        elif args.teacher != "none":
            teacher = Path(args.teacher)
        unlabeled: list[str] = []
        if teacher is not None and args.unlabeled == "sharegpt":
            from services.predictor.synth import distillation_prompts
            from services.worker.models import ensure_smollm2

            # Every AlpacaEval prompt is excluded, held-out ones included.
            unlabeled = distillation_prompts(
                args.data,
                split_seed=args.seed,
                synthetic=args.synthetic,
                model_dir=ensure_smollm2(settings.cache) if args.synthetic > 0 else None,
                cache_dir=settings.cache,
            )
        train(
            args.data,
            out,
            collected=collected,
            encoder=args.encoder,
            layers=args.layers,
            classes=args.classes,
            objective=args.objective,
            epochs=args.epochs,
            seed=args.seed,
            threads=args.threads,
            log=print,
            cache_dir=settings.cache,
            teacher=teacher,
            unlabeled=unlabeled,
            distill_weight=args.distill_weight,
            augment=args.augment if teacher is not None else 0,
            tune=True if args.tune else None,
        )
        print(f"artifact written to {out}")
        return 0
    if args.predictor_cmd == "cv":
        import torch

        from services.predictor.crossval import cross_validate

        torch.set_num_threads(args.threads)
        unlabeled_cv: list[str] = []
        if args.distil:
            from services.predictor.synth import distillation_prompts

            # ShareGPT's first turns, as train's default; no synthetic prompts (they depend on the split).
            unlabeled_cv = distillation_prompts(
                args.data, split_seed=0, synthetic=0, model_dir=None, cache_dir=settings.cache
            )
        cross_validate(
            args.data,
            args.work or settings.cache / "predictor-cv",
            args.out,
            seeds=args.seeds,
            encoder=args.encoder,
            distil=args.distil,
            unlabeled=unlabeled_cv,
            collected=collected,
            cache_dir=settings.cache,
            add=args.add,
        )
        print(f"report written to {args.out / 'predictor-cv.md'}")
        return 0
    if args.predictor_cmd == "eval":
        from services.predictor.artifacts import MINILM_ARTIFACT_DIR
        from services.predictor.evaluate import evaluate

        compare: dict[str, Path] = {}
        if args.compare is None:
            compare = {} if args.artifact is not None else {"minilm": MINILM_ARTIFACT_DIR}
        for spec in args.compare or []:
            name, sep, folder = spec.partition("=")
            if not sep or not name or not folder:
                raise SystemExit(f"--compare wants NAME=DIR, got {spec!r}")
            compare[name] = Path(folder)
        evaluate(args.data, args.artifact, args.out, collected=collected, seed=args.seed, compare=compare)
        print(f"report written to {args.out / 'predictor-eval.md'}")
        return 0
    return 2


if __name__ == "__main__":
    main()
