"""Output of ``fastbp bench``: the printed tables, a Markdown summary, the JSON file and the plot.

Everything here reads the record :func:`fastbp.bench.run` returns (or a saved
JSON of one), so ``fastbp report FILE.json`` prints a past run exactly as it was.
Records written before a key existed (optimizer, contended, JAX forms) print without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any

from . import machine
from .config import jsonable

LARGE_BATCH = 256  # from here on a training step is GEMM-bound enough for a FLOP rate to mean something


# ---------------------------------------------------------------------------- number formats
def si(x: float | None) -> str:
    """3 significant digits with a k/M/G suffix: 3.12k, 48.2k, 1.23M."""
    if x is None or not math.isfinite(x):
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _g3(x: float) -> str:
    """About 3 significant digits, never in exponent notation."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 1:
        return 1.0, "s"
    if seconds >= 1e-3:
        return 1e3, "ms"
    return 1e6, "us"


def _fmt_time(seconds: float) -> str:
    scale, unit = _time_unit(seconds)
    return f"{_g3(seconds * scale)} {unit}"


def _fmt_time_spread(stats: dict[str, float]) -> str:
    """``41.2 ms [40.8-42]``: the median, then min-max in the median's unit."""
    scale, unit = _time_unit(stats["median"])
    return f"{_g3(stats['median'] * scale)} {unit} [{_g3(stats['min'] * scale)}-{_g3(stats['max'] * scale)}]"


def _fmt_x(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x" if x < 100 else f"{x:,.0f}x"


def _pct(fig: dict[str, Any]) -> str:
    pct = fig.get("pct_of_matmul")
    return "-" if pct is None else f"{pct:.0f}%"


def _batch_label(batch: int, n_samples: int) -> str:
    return f"{batch} (full)" if batch >= n_samples else str(batch)


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """Plain-text table; ``align`` has one ``l``/``r`` per column (first column left by default)."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _ok(result: dict[str, Any]) -> dict[str, Any]:
    return {n: r for n, r in result["backends"].items() if r.get("status") == "ok"}


def _ok_peers(result: dict[str, Any]) -> dict[str, Any]:
    return {n: r for n, r in result.get("peers", {}).items() if r.get("status") == "ok"}


def _row(rec: dict[str, Any], batch: int) -> dict[str, Any] | None:
    return next((r for r in rec.get("training", []) if r["batch_size"] == batch and "samples_per_s" in r), None)


def _optimizer_label(result: dict[str, Any]) -> str:
    """``sgd, lr 0.05`` / ``momentum 0.9, lr 0.05`` / ``adam (0.9, 0.999), lr 0.001``."""
    opt = result.get("optimizer") or {"name": "sgd", "lr": result["config"]["lr"]}
    extra = {"momentum": f" {opt.get('momentum')}", "adam": f" betas {tuple(opt.get('betas') or ())}"}
    return f"{opt['name']}{extra.get(opt['name'], '')}, lr {opt['lr']}"


def _peer_cell(row: dict[str, Any]) -> str:
    """A peer's median samples/s, and its form where it has several (JAX: jit or scan)."""
    return si(row["samples_per_s"]["median"]) + (f" ({row['form']})" if row.get("form") else "")


# ---------------------------------------------------------------------------- the printed report
def format_report(result: dict[str, Any]) -> str:
    """The human-readable report ``fastbp bench`` prints."""
    cfg, mach = result["config"], result["machine"]
    sizes = "-".join(str(s) for s in cfg["sizes"])
    out: list[str] = []
    out.append(f"fastbp {result['fastbp_version']} bench: MLP {sizes}, {cfg['activation']} hidden, {cfg['loss']} "
               f"loss, {cfg['dtype']}, {cfg['n_samples']} synthetic samples, {_optimizer_label(result)}"
               + (" [quick]" if cfg.get("quick") else ""))
    src = result.get("source")
    if src:
        out.append(f"source: git {src['commit'][:12]}"
                   + (f" with {len(src['changed_files'])} changed or new files" if src["dirty"] else ", clean"))
    cpus = mach["cpus"]
    out.append(f"machine: {mach['cpu_model']}, {cpus['usable']} usable of {cpus['logical']} logical CPUs; "
               f"GPU {machine.gpu_summary(mach['gpu'])}")
    out.append(f"BLAS: {machine.blas_summary(mach['blas'])}")
    load0, load1 = mach.get("load_average"), mach.get("load_average_end")
    if load0:
        out.append(f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in load0)} at start, "
                   f"{' '.join(f'{x:.2f}' for x in load1) if load1 else '?'} at end")
    other = mach.get("other_cpu_seconds")
    if other is not None and cpus.get("usable"):
        share = other / (cpus["usable"] * result["elapsed_s"])
        out.append(f"other processes used {other:.1f} CPU-s during the run ({100 * share:.0f}% of "
                   f"{cpus['usable']} CPUs x {result['elapsed_s']:.0f} s)"
                   + ("; figures may be low and noisy" if share > 0.1 else ""))
    for device, peak in result["matmul_peak"].items():
        out.append(f"reference matmul rate ({device}): {peak['gflops_best']:.1f} GFLOP/s best, "
                   f"{peak['gflops_median']:.1f} median of {len(peak['gflops'])} [{peak['how']}]")
    threads = "library defaults" if cfg.get("threads") is None else f"capped at {cfg['threads']}"
    where = "each backend in its own process" if cfg.get("isolate", True) else "all in one process"
    out.append(f"threads: {threads}; {where}; warm-up first, {cfg['repeat']} timed repeats, median [min-max]; "
               f"FLOPs per example {result['flops']['per_example']:,} (matrix products only)")

    ok = _ok(result)
    for name, rec in result["backends"].items():
        if rec.get("status") == "unavailable":
            out.append(f"backend {name}: unavailable here: {rec['reason']}")
        elif rec.get("status") == "error":
            out.append(f"backend {name}: FAILED: {rec['error']}")
            if rec.get("stderr_tail"):
                out.append("  " + rec["stderr_tail"].strip().splitlines()[-1])

    out.append("")
    for name, rec in ok.items():
        jit = rec["jit"]
        out.append(f"JIT compile / warm-up, {name}: {jit['seconds']:.3f} s ({jit['method']}); first calls "
                   f"after it added {rec['first_call_excess_s']:.3f} s over steady state")
    for name, rec in ok.items():
        if rec.get("worker_stderr"):
            last = rec["worker_stderr"].strip().splitlines()[-1]
            out.append(f"note: the {name} worker wrote to stderr (kept in the JSON): {last[:120]}")

    if ok:
        gb = next(iter(ok.values()))["gradient"]["batch"]
        out.append("")
        graph = any("graph" in rec["gradient"] for rec in ok.values())
        out.append(f"One gradient of the mean cost, batch {gb}: naive per-example loop vs vectorized pass"
                   + (" (and the computation graph, fastbp.graph)" if graph else ""))
        rows = []
        for name, rec in ok.items():
            g = rec["gradient"]
            rows.append([name, _fmt_time_spread(g["loop"]["seconds"]), _fmt_time_spread(g["vectorized"]["seconds"])]
                        + ([_fmt_time_spread(g["graph"]["seconds"]) if "graph" in g else "-"] if graph else [])
                        + [_fmt_x(g["speedup"]), f"{g['gflops']:.1f}", _pct(g)])
        out += _table(["backend", "loop", "vectorized"] + (["graph"] if graph else [])
                      + ["speedup", "GFLOP/s", "% matmul"], rows)

    for name, rec in ok.items():
        out.append("")
        out.append(f"Training throughput, {name} (MLP.fit, samples/s)")
        rows = []
        base = _row(rec, 1)
        for r in rec["training"]:
            label = _batch_label(r["batch_size"], cfg["n_samples"])
            if "error" in r:
                rows.append([label, "FAILED", r["error"][:70], "", "", ""])
                continue
            s = r["samples_per_s"]
            large = r["batch_size"] >= LARGE_BATCH
            rows.append([label, si(s["median"]), f"[{si(s['min'])}-{si(s['max'])}]",
                         f"{r['gflops']:.1f}" if large else "-", _pct(r) if large else "-",
                         _fmt_x(s["median"] / base["samples_per_s"]["median"]) if base else "-"])
        out += _table(["batch", "samples/s", "[min-max]", "GFLOP/s", "% matmul", "vs batch 1"], rows)

    peers = result.get("peers", {})
    ok_peers = _ok_peers(result)
    columns = [(n, r, n) for n, r in ok.items()] + [(n, r, f"{n} (peer)") for n, r in ok_peers.items()]
    if len(columns) > 1:
        out.append("")
        out.append("Throughput by backend" + (" and peer" if ok_peers else "") + " (median samples/s)")
        rows = []
        for batch in cfg["batch_sizes_resolved"]:
            cells = [_batch_label(batch, cfg["n_samples"])]
            for _, rec, _ in columns:
                row = _row(rec, batch)
                cells.append(_peer_cell(row) if row else "-")
            rows.append(cells)
        out += _table(["batch"] + [title for _, _, title in columns], rows)
    for peer, rec in peers.items():
        if rec.get("status") != "ok":
            out.append(f"peer {peer}: {rec.get('status')}: {rec.get('reason') or rec.get('error')}")
            continue
        for r in rec["training"]:
            if "error" in r:
                out.append(f"peer {peer}, batch {r['batch_size']}: FAILED: {r['error']}")
            elif r.get("variants"):
                forms = ", ".join(f"{form} {si(v['samples_per_s']['median'])}"
                                  + (f" (compile {v['compile_s']:.2f} s)" if "compile_s" in v else "")
                                  for form, v in r["variants"].items())
                out.append(f"peer {peer}, batch {r['batch_size']}: {forms} samples/s; the faster, "
                           f"{r['form']}, is the peer's figure (compile time excluded)")
    out += _contended_lines(result)

    summary = result.get("summary", {})
    if summary:
        out.append("")
        out.append("Speedups (ratios of medians)")
        cols = list(summary)
        lines = [
            ("vectorized vs per-example loop (one gradient)", "vectorized_vs_loop", _fmt_x),
            ("best mini-batch vs per-example SGD (training)", "best_batch_vs_per_example_sgd", _fmt_x),
            ("  at batch size", "best_batch", lambda v: "-" if v is None else str(v)),
            ("vs numpy backend: vectorized gradient", "vs_numpy_gradient_vectorized", _fmt_x),
            ("vs numpy backend: loop gradient", "vs_numpy_gradient_loop", _fmt_x),
            ("vs numpy backend: per-example SGD", "vs_numpy_per_example_sgd", _fmt_x),
            ("vs numpy backend: best mini-batch", "vs_numpy_best", _fmt_x),
            ("one gradient: computation graph time / vectorized time", "graph_vs_vectorized", _fmt_x),
            ("under load: lowest fraction of quiet throughput", "contended_min_fraction",
             lambda v: "-" if v is None else f"{100 * v:.0f}%"),
        ]
        rows = [[title] + [fmt(summary[c].get(key)) for c in cols]
                for title, key, fmt in lines if any(summary[c].get(key) is not None for c in cols)]
        out += _table([""] + [c[5:] + " (peer)" if c.startswith("peer:") else c for c in cols], rows)
    out.append("")
    out.append(f"finished in {result['elapsed_s']:.1f} s")
    return "\n".join(out)


def _contended_lines(result: dict[str, Any]) -> list[str]:
    """The --contended table: each backend's and peer's throughput under load, as a share of quiet."""
    cont = result.get("contended")
    if not cont:
        return []
    load = cont["load"]
    held = ", ".join("?" if c is None else f"{c:.2f}" for c in load.get("cores_held", []))
    out = ["", f"Under load: the same runs beside {load['what']} (it held {held} cores); "
               "throughput as a share of the quiet run (median over median)"]
    fractions = cont.get("fractions", {})
    if not fractions:
        return out + ["  no figure ran both quiet and under load"]
    cols = list(fractions)
    batches = sorted({int(b) for f in fractions.values() for b in f["training"]})
    n_samples = result["config"]["n_samples"]
    rows = [[_batch_label(b, n_samples)] + [f"{100 * fractions[c]['training'][str(b)]:.0f}%"
                                            if str(b) in fractions[c]["training"] else "-" for c in cols]
            for b in batches]
    for strategy in ("vectorized", "loop", "graph"):
        key = f"gradient_{strategy}"
        if any(key in fractions[c] for c in cols):
            rows.append([f"gradient, {strategy}"] + [f"{100 * fractions[c][key]:.0f}%" if key in fractions[c] else "-"
                                                    for c in cols])
    out += _table(["batch"] + [c[5:] + " (peer)" if c.startswith("peer:") else c for c in cols], rows)
    for where in ("backends", "peers"):
        for name, rec in cont.get(where, {}).items():
            if rec.get("status") == "error":
                out.append(f"under load, {name}: FAILED: {rec.get('error')}")
    return out


# ---------------------------------------------------------------------------- Markdown
def format_markdown(result: dict[str, Any]) -> str:
    """The headline figures as a Markdown table (for a README), with the run's conditions."""
    cfg, mach = result["config"], result["machine"]
    ok, ok_peers = _ok(result), _ok_peers(result)
    cols = [(n, r) for n, r in ok.items()] + [(f"{n} (peer)", r) for n, r in ok_peers.items()]
    sizes = "-".join(str(s) for s in cfg["sizes"])
    head = "| | " + " | ".join(f"`{n}`" if "(peer)" not in n else n for n, _ in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    if ok:
        gb = next(iter(ok.values()))["gradient"]["batch"]

        def grad_cell(rec, strategy):
            g = rec.get("gradient")
            return _fmt_time(g[strategy]["seconds"]["median"]) if g else "-"

        lines.append(f"| one gradient, batch {gb}: per-example loop | "
                     + " | ".join(grad_cell(r, "loop") for _, r in cols) + " |")
        lines.append(f"| one gradient, batch {gb}: vectorized | "
                     + " | ".join(grad_cell(r, "vectorized") for _, r in cols) + " |")
        if any("graph" in (r.get("gradient") or {}) for _, r in cols):
            lines.append(f"| one gradient, batch {gb}: computation graph | "
                         + " | ".join(grad_cell(r, "graph") if "graph" in (r.get("gradient") or {}) else "-"
                                      for _, r in cols) + " |")
        lines.append("| **speedup, vectorized vs loop** | "
                     + " | ".join(f"**{_fmt_x(r['gradient']['speedup'])}**" if r.get("gradient") else "-"
                                  for _, r in cols) + " |")
    for batch in _headline_batches(cfg["batch_sizes_resolved"], cfg["n_samples"]):
        label = "per-example SGD (batch 1)" if batch == 1 else (
            f"full batch ({batch})" if batch >= cfg["n_samples"] else f"batch {batch}")
        cells = []
        for _, rec in cols:
            row = _row(rec, batch)
            cells.append("-" if row is None else _peer_cell(row)
                         + (f" ({_pct(row)})" if batch >= LARGE_BATCH and row.get("pct_of_matmul") else ""))
        lines.append(f"| training samples/s, {label} | " + " | ".join(cells) + " |")
    fractions = (result.get("contended") or {}).get("fractions")
    if fractions:
        keys = [n if "(peer)" not in n else f"peer:{n[:-7]}" for n, _ in cols]
        lines.append("| under load (one busy process): lowest share of quiet throughput | "
                     + " | ".join(f"{100 * fractions[k]['min_training']:.0f}%" if "min_training" in fractions.get(k, {})
                                  else "-" for k in keys) + " |")
    peak = result["matmul_peak"].get("cpu")
    load = mach.get("load_average") or []
    notes = [
        f"MLP {sizes}, {cfg['activation']}/{cfg['loss']}, {cfg['dtype']}, {cfg['n_samples']} synthetic samples, "
        f"{_optimizer_label(result)}; median of {cfg['repeat']} timed repeats after warm-up"
        + ("; JAX: the faster of its per-step jit and whole-epoch scan forms, compile time excluded"
           if "jax" in ok_peers else "") + ".",
        f"{mach['cpu_model']}, {mach['cpus']['usable']} CPUs, BLAS {machine.blas_summary(mach['blas'])}"
        + (f"; load average at start {load[0]:.2f}" if load else "")
        + (f"; other processes used {mach['other_cpu_seconds']:.0f} CPU-s during the {result['elapsed_s']:.0f} s run"
           if mach.get("other_cpu_seconds") is not None else "") + ".",
    ]
    if peak:
        notes.append(f"(%) = share of this machine's measured {cfg['dtype']} GEMM rate, "
                     f"{peak['gflops_best']:.0f} GFLOP/s, counting only the matrix products.")
    if result.get("command"):
        notes.append(f"Command: `{' '.join(result['command'])}`; record written {result['created_utc']}.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _headline_batches(batches: list[int], n_samples: int) -> list[int]:
    """A few telling batch sizes: 1 (per-example SGD), those nearest 32 and 256, and full batch."""
    if len(batches) <= 4:
        return batches
    picks = [batches[0], batches[-1]]
    for target in (32, 256):
        picks.append(min(batches, key=lambda b: abs(math.log(b) - math.log(target))))
    return sorted(set(picks))


# ---------------------------------------------------------------------------- files
def write_json(result: dict[str, Any], path: str) -> None:
    """Write the record to ``path`` (parents created; written beside it first, then renamed)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(jsonable(result), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def matplotlib_missing() -> str | None:
    """Why ``--plot`` cannot work here, or None when matplotlib is installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib, which is not installed. To fix: pip install matplotlib (or pip install '.[plot]' in the fastbp checkout)"
    return None


def plot(result: dict[str, Any], path: str) -> None:
    """Training throughput against batch size, one line per backend and peer, min-max as a band."""
    from matplotlib.figure import Figure  # lazily: matplotlib is an optional extra

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    series = [(n, r) for n, r in _ok(result).items()] + [(f"{p} (peer)", r) for p, r in _ok_peers(result).items()]
    for label, rec in series:
        rows = [r for r in rec["training"] if "samples_per_s" in r]
        if not rows:
            continue
        x = [r["batch_size"] for r in rows]
        line, = ax.plot(x, [r["samples_per_s"]["median"] for r in rows], marker="o", label=label,
                        linestyle="--" if "(peer)" in label else "-")
        ax.fill_between(x, [r["samples_per_s"]["min"] for r in rows], [r["samples_per_s"]["max"] for r in rows],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    cfg, mach = result["config"], result["machine"]
    ax.set_xscale("log", base=2)
    ticks = cfg["batch_sizes_resolved"]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel(f"batch size (1 = per-example SGD, {cfg['n_samples']} = full batch)")
    ax.set_ylabel("training throughput (samples/s)")
    sizes = "-".join(str(s) for s in cfg["sizes"])
    other = mach.get("other_cpu_seconds")
    busy = "" if other is None else \
        f"; other processes used {100 * other / (mach['cpus']['usable'] * result['elapsed_s']):.0f}% of the CPUs"
    ax.set_title(f"fastbp {result['fastbp_version']}: MLP {sizes} {cfg['activation']}/{cfg['loss']} {cfg['dtype']}\n"
                 f"{mach['cpu_model']}, {mach['cpus']['usable']} CPUs; median of {cfg['repeat']}, band = min-max{busy}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
