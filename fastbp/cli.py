"""The ``fastbp`` command line: ``fastbp bench``, ``fastbp info`` and ``fastbp report``.

    fastbp bench [--quick] [--backends numpy,numba] [--sizes 784,128,10] [--batch-sizes 1,32,full]
                 [--dtype float32] [--repeat 5] [--out bench.json] [--plot bench.png] [--peers torch,jax,sklearn]
                 [--optimizer sgd|momentum|adam] [--threads N] [--contended]
    fastbp info [--json]
    fastbp report FILE.json [--markdown]

Argument errors exit with status 2 and a message naming the option, what was
received and what was expected; a benchmark whose backend fails exits with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any

import fastbp as fb

from . import bench
from .bench import machine
from .bench import optimizer as bench_optimizer
from .bench import report as bench_report
from .kernels.base import ELEMENTWISE_ACTIVATIONS, LOSSES


# ---------------------------------------------------------------------------- argument types
def _int_list(option: str, text: str, *, min_len: int = 1, allow_full: bool = False) -> list:
    parts = [p.strip() for p in text.split(",")]
    values: list = []
    for part in parts:
        if allow_full and part.lower() == bench.FULL:
            values.append(bench.FULL)
            continue
        try:
            value = int(part)
        except ValueError:
            value = None
        if value is None or value < 1:
            expected = "positive ints" + (" or 'full'" if allow_full else "")
            raise argparse.ArgumentTypeError(
                f"bad entry {part!r}. Received: {option} {text!r}. Expected comma-separated {expected}, "
                f"e.g. {'1,32,256,full' if allow_full else '784,128,10'}")
        values.append(value)
    if len(values) < min_len:
        raise argparse.ArgumentTypeError(
            f"needs at least {min_len} entries. Received: {option} {text!r}. Expected e.g. 784,128,10 "
            "(inputs, hidden layers..., outputs)")
    return values


def _sizes(text: str) -> list[int]:
    return _int_list("--sizes", text, min_len=2)


def _batch_sizes(text: str) -> list:
    return _int_list("--batch-sizes", text, allow_full=True)


def _names(option: str, valid: tuple[str, ...], extra: tuple[str, ...] = ()):
    def parse(text: str) -> list[str]:
        names = [p.strip().lower() for p in text.split(",") if p.strip()]
        bad = [n for n in names if n not in valid + extra]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown name {bad[0] if bad else text!r}. Received: {option} {text!r}. "
                f"Expected a comma-separated list from {list(valid + extra)}")
        return list(dict.fromkeys(names))
    return parse


def _positive(kind, option: str, *, minimum=None):
    """A parser for ints or floats > 0 (or >= ``minimum``)."""
    expected = f"an int >= {minimum}" if minimum is not None else f"a positive {'int' if kind is int else 'number'}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = value is not None and math.isfinite(value) and (value >= minimum if minimum is not None else value > 0)
        if not ok:
            raise argparse.ArgumentTypeError(f"Received: {option} {text!r}. Expected {expected}")
        return value
    return parse


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastbp", description="fastbp: fast, clear backpropagation for multilayer perceptrons.")
    parser.add_argument("--version", action="version", version=f"fastbp {fb.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench,info,report}")

    d, q = bench.DEFAULT, bench.QUICK
    b = sub.add_parser(
        "bench", help="time the per-example loop vs the vectorized pass and training throughput per backend",
        description=(
            "Benchmark every usable backend: one gradient with the naive per-example loop vs the vectorized "
            "pass (same model, same batch), and MLP.fit training throughput from per-example SGD (batch 1) "
            "to full batch. Warm-up first; JIT compile time reported on its own; medians with min-max over "
            "repeats; FLOP rates against the machine's measured matmul rate. Prints tables; --out writes "
            "every raw figure and the machine description as JSON."))
    b.add_argument("--backends", type=_names("--backends", fb.BACKEND_NAMES, ("all",)), default=None,
                   help="comma-separated backends to run (default: every backend usable here; "
                        "unavailable ones are listed with the reason)")
    b.add_argument("--sizes", type=_sizes, default=None,
                   help=f"layer sizes, inputs first (default {','.join(map(str, d.sizes))})")
    b.add_argument("--activation", choices=ELEMENTWISE_ACTIVATIONS, default=d.activation,
                   help=f"hidden-layer activation (default {d.activation})")
    b.add_argument("--loss", choices=LOSSES, default=d.loss, help=f"loss (default {d.loss})")
    b.add_argument("--batch-sizes", type=_batch_sizes, default=None,
                   help="training batch sizes; 'full' = the whole training set (default "
                        f"{','.join(map(str, d.batch_sizes))}; --quick {','.join(map(str, q.batch_sizes))})")
    b.add_argument("--samples", type=_positive(int, "--samples"), default=None,
                   help=f"synthetic training-set size (default {d.n_samples}, --quick {q.n_samples}, "
                        "or the largest batch size if that is larger)")
    b.add_argument("--grad-batch", type=_positive(int, "--grad-batch"), default=None,
                   help=f"batch of the loop-vs-vectorized gradient (default {d.grad_batch}, --quick {q.grad_batch})")
    b.add_argument("--dtype", choices=bench.DTYPES, default=d.dtype, help=f"floating-point type (default {d.dtype})")
    b.add_argument("--repeat", type=_positive(int, "--repeat"), default=None,
                   help=f"timed repeats per figure (default {d.repeat}, --quick {q.repeat})")
    b.add_argument("--min-time", type=_positive(float, "--min-time"), default=None,
                   help=f"seconds each timed repeat lasts at least (default {d.min_time}, --quick {q.min_time})")
    b.add_argument("--lr", type=_positive(float, "--lr"), default=None,
                   help=f"learning rate for training (default {d.lr}; {bench_optimizer.ADAM_DEFAULT_LR} with "
                        "--optimizer adam)")
    b.add_argument("--optimizer", choices=bench_optimizer.NAMES, default=d.optimizer,
                   help=f"update rule for fastbp and every peer alike: plain SGD, SGD with momentum "
                        f"{bench_optimizer.DEFAULT_MOMENTUM}, or Adam (torch.optim's formulas; default {d.optimizer})")
    b.add_argument("--seed", type=_positive(int, "--seed", minimum=0), default=d.seed,
                   help=f"seed of the model and the synthetic data (default {d.seed})")
    b.add_argument("--threads", type=_positive(int, "--threads"), default=None,
                   help="cap BLAS/OpenMP threads (threadpoolctl semantics) and Numba threads for the run, "
                        "torch's threads and (for 1) JAX's (default: the libraries' own settings, recorded "
                        "in the JSON)")
    b.add_argument("--contended", action="store_true",
                   help="after the quiet run, run everything again while one busy-loop process occupies a "
                        "core, and report each throughput under load as a share of the quiet one")
    b.add_argument("--quick", action="store_true", help="a short smoke run: fewer batch sizes, repeats, samples")
    b.add_argument("--peers", type=_names("--peers", bench.PEERS, ("none",)), default=None,
                   help="also measure these libraries on the same model, data and optimizer (when "
                        "installed; JAX in both its per-step jit and whole-epoch scan forms, the faster "
                        "named): " + ",".join(bench.PEERS))
    b.add_argument("--out", metavar="FILE.json", default=None, help="write the full record (JSON) here")
    b.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw throughput against batch size per backend (needs matplotlib)")
    b.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr")
    b.add_argument("--in-process", dest="isolate", action="store_false",
                   help="run every backend in this process instead of one fresh worker process each "
                        "(quicker to start; one backend's idle BLAS threads may then slow the next)")
    b.set_defaults(func=_cmd_bench, subparser=b)

    i = sub.add_parser("info", help="versions, backends usable here (and why not), BLAS, threads, GPU",
                       description="Describe this installation and machine: fastbp and library versions, "
                                   "which backends are usable (and for the others why not), BLAS and "
                                   "thread settings, GPU name and memory.")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=_cmd_info, subparser=i)

    r = sub.add_parser("report", help="print a saved `fastbp bench --out` record again",
                       description="Print the tables of a saved benchmark record (the JSON `fastbp bench --out` "
                                   "writes), or with --markdown its headline figures as a Markdown table.")
    r.add_argument("file", metavar="FILE.json", help="a record written by fastbp bench --out")
    r.add_argument("--markdown", action="store_true", help="the headline figures as a Markdown table")
    r.add_argument("--plot", metavar="FILE.png", default=None, help="also draw its throughput plot")
    r.set_defaults(func=_cmd_report, subparser=r)
    return parser


def _config(args, parser) -> bench.BenchConfig:
    preset = bench.QUICK if args.quick else bench.DEFAULT
    backends = None if args.backends in (None, ["all"]) else tuple(n for n in args.backends if n != "all")
    batch_sizes = tuple(args.batch_sizes) if args.batch_sizes else preset.batch_sizes
    numeric = [x for x in batch_sizes if x != bench.FULL]
    if args.samples is not None:
        n_samples = args.samples
        too_big = [x for x in numeric if x > n_samples]
        if too_big:
            parser.error(f"argument --batch-sizes: batch size {too_big[0]} is larger than the training set. "
                         f"Received: --batch-sizes {','.join(map(str, batch_sizes))} with --samples {n_samples}. "
                         f"Expected batch sizes <= {n_samples} (or 'full')")
    else:
        n_samples = max([preset.n_samples] + numeric)
    grad_batch = args.grad_batch if args.grad_batch is not None else min(preset.grad_batch, n_samples)
    if grad_batch > n_samples:
        parser.error(f"argument --grad-batch: Received: --grad-batch {grad_batch} with {n_samples} samples. "
                     f"Expected at most {n_samples}")
    peers = () if args.peers in (None, ["none"]) else tuple(p for p in args.peers if p != "none")
    why_not = bench_optimizer.fastbp_support(args.optimizer)
    if why_not:
        parser.error(f"argument --optimizer: {why_not}")
    lr = args.lr if args.lr is not None else bench_optimizer.default_lr(args.optimizer, preset.lr)
    return dataclasses.replace(
        preset, backends=backends, sizes=tuple(args.sizes) if args.sizes else preset.sizes,
        activation=args.activation, loss=args.loss, batch_sizes=batch_sizes, n_samples=n_samples,
        grad_batch=grad_batch, dtype=args.dtype, repeat=args.repeat or preset.repeat,
        min_time=args.min_time or preset.min_time, lr=lr, optimizer=args.optimizer, seed=args.seed,
        peers=peers, threads=args.threads, isolate=args.isolate, contended=args.contended)


def _cmd_bench(args, parser) -> int:
    cfg = _config(args, parser)
    if args.plot:
        why = bench_report.matplotlib_missing()
        if why:
            parser.error(f"argument --plot: {why}")
    requested = os.environ.get("FASTBP_BACKEND", "auto").strip().lower() or "auto"
    if not cfg.backends and requested in fb.BACKEND_NAMES and requested != "auto":
        # the environment chose a backend: benchmark that one, never quietly another
        cfg = dataclasses.replace(cfg, backends=(requested,))
        source = f"FASTBP_BACKEND={requested}"
    else:
        source = "argument --backends"
    if cfg.backends:
        status = bench.backend_status()
        for name in cfg.backends:
            if status.get(name) is not None:
                parser.error(f"{source}: backend {name!r} is unavailable here: {status[name]}. "
                             f"Usable here: {[n for n, why in status.items() if why is None]}")
    result = bench.run(cfg, progress=args.progress, argv=["fastbp"] + list(args.argv))
    written = []  # files first: a closed stdout must not lose the record
    if args.out:
        bench_report.write_json(result, args.out)
        written.append(args.out)
    if args.plot:
        bench_report.plot(result, args.plot)
        written.append(args.plot)
    print(bench_report.format_report(result))
    for path in written:
        print(f"wrote {path}")
    sys.stdout.flush()
    passes = [("", result["backends"])] + ([("under load: ", result["contended"]["backends"])]
                                           if "contended" in result else [])
    failed = [f"{tag}{n}" for tag, recs in passes for n, r in recs.items() if r.get("status") == "error"]
    failed += [f"{tag}{n} batch {row['batch_size']}" for tag, recs in passes for n, r in recs.items()
               for row in r.get("training", []) if "error" in row]
    if failed:
        print(f"fastbp bench: failures: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args, parser) -> int:
    try:
        with open(args.file, encoding="utf-8") as f:
            result = json.load(f)
    except OSError as exc:
        parser.error(f"argument FILE.json: cannot read {args.file!r}: {exc.strerror}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        parser.error(f"argument FILE.json: {args.file!r} is not JSON text ({exc})")
    if not isinstance(result, dict) or result.get("schema") != bench.SCHEMA:
        found = result.get("schema") if isinstance(result, dict) else type(result).__name__
        parser.error(f"argument FILE.json: {args.file!r} is not a fastbp bench record. Received: schema "
                     f"{found!r}. Expected {bench.SCHEMA!r}")
    if args.plot:
        why = bench_report.matplotlib_missing()
        if why:
            parser.error(f"argument --plot: {why}")
        bench_report.plot(result, args.plot)
    print(bench_report.format_markdown(result) if args.markdown else bench_report.format_report(result))
    return 0


# ---------------------------------------------------------------------------- info
def info_record() -> dict[str, Any]:
    """What ``fastbp info`` reports, as a dict."""
    status = bench.backend_status()
    backends: dict[str, Any] = {}
    for name, why in status.items():
        entry: dict[str, Any] = {"usable": why is None, "why_not": why}
        if why is None:
            try:
                with fb.use_backend(name) as be:
                    entry["info"] = be.info()
                    entry["is_gpu"] = bool(getattr(be, "is_gpu", False))
            except Exception as exc:
                entry["info"] = {"error": f"{type(exc).__name__}: {exc}"}
        backends[name] = entry
    try:
        active = fb.get_backend().name
    except Exception as exc:  # FASTBP_BACKEND names something unusable: say so, do not crash
        active = f"error: {exc}"
    return {
        "fastbp": fb.__version__,
        "fastbp_backend_env": os.environ.get("FASTBP_BACKEND", "auto (unset)"),
        "active_backend": active,
        "backends": backends,
        "numba": machine.numba_info() if machine.versions().get("numba") else {"error": "not installed"},
        "machine": machine.describe(deep_gpu=True),
    }


def _cmd_info(args, parser) -> int:
    rec = info_record()
    if args.json:
        print(json.dumps(bench.jsonable(rec), indent=1))
        return 0
    m = rec["machine"]
    v = m["versions"]
    out = [f"fastbp {rec['fastbp']}",
           f"python {m['python']} ({sys.executable}), {m['platform']}",
           "versions: " + ", ".join(f"{k} {v[k] or 'not installed'}"
                                    for k in ("numpy", "numba", "cupy", "threadpoolctl", "tqdm",
                                              "scikit-learn", "torch", "jax", "matplotlib")),
           "",
           f"backends (FASTBP_BACKEND={rec['fastbp_backend_env']}; active: {rec['active_backend']}):"]
    for name, entry in rec["backends"].items():
        if not entry["usable"]:
            out.append(f"  {name:6s} unavailable: {entry['why_not']}")
            continue
        out.append(f"  {name:6s} usable" + (" (GPU)" if entry.get("is_gpu") else ""))
        for key, val in (entry.get("info") or {}).items():
            if key not in ("name", "blas"):  # BLAS is listed once, below
                shown = val if isinstance(val, str) else json.dumps(bench.jsonable(val))
                out.append(f"         {key}: {shown}")
    nb = rec["numba"]
    cpus = m["cpus"]
    out += ["",
            f"CPU: {m['cpu_model']}; {cpus['logical']} logical CPUs, {cpus['usable']} usable by this process",
            f"BLAS: {machine.blas_summary(m['blas'])}",
            "numba: " + (f"{nb['version']}; thread pool of {nb['num_threads']} (NUMBA_NUM_THREADS)"
                         if "version" in nb else nb["error"]),
            "thread settings: " + (", ".join(f"{k}={val}" for k, val in m["thread_env"].items()) or
                                   "no OMP/OPENBLAS/MKL/NUMBA thread variables set (libraries use their defaults)"),
            f"GPU: {machine.gpu_summary(m['gpu'])}",
            f"load average: {' '.join(f'{x:.2f}' for x in m['load_average']) if m['load_average'] else 'n/a'}"]
    print("\n".join(out))
    return 0


# ---------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Run the ``fastbp`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\nfastbp: error: choose a command: bench, info or report", file=sys.stderr)
        return 2
    args.argv = argv
    try:
        return args.func(args, args.subparser)  # its errors name the subcommand
    except KeyboardInterrupt:
        print("fastbp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fastbp bench | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
