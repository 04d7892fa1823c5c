"""The README's peers table, rendered from a record of ``benchmarks/peers_cpu.py``.

    python benchmarks/peers_table.py benchmarks/results/cpu-peers-<stamp>.json

One row per workload: fastbp's samples/s for each optimizer, its ratio to the faster form of JAX
and of PyTorch (**bold** where under the bar), the share of quiet throughput kept beside a busy
process (PyTorch's own share in brackets), and the compiled step's time over its GEMMs alone.
Then the digits-vs-scikit-learn ratios, the JIT costs and the machine, one line each.
"""
from __future__ import annotations

import json
import sys


def _name(cfg: dict) -> str:
    loss = f" {cfg['loss']}" if cfg.get("loss") not in (None, "mse", "cross_entropy") else ""
    return f"{'-'.join(map(str, cfg['sizes']))} {cfg['activation']}{loss}, batch {cfg['batch']}"


def _rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def _ratio(entry: dict | None) -> str:
    if not entry:
        return "-"
    r = entry["ratio_median"]
    text = f"{r:.2f}x" if r < 10 else f"{r:.0f}x"
    return f"**{text}**" if entry.get("met") is False else text


def _share(by_opt: dict | None, o: str) -> str:
    if not by_opt or o not in by_opt:
        return "-"
    e = by_opt[o]
    torch = e.get("torch_best_fraction")
    return f"{100 * e['fastbp']:.0f}%" + (f" ({100 * torch:.0f}%)" if torch is not None else "")


def table(record: dict) -> str:
    opts = record["args"]["optimizer"]
    slash = " / ".join(opts)
    lines = [f"| workload (float32) | fastbp samples/s {slash} | vs JAX best {slash} | vs PyTorch {slash} "
             f"| busy machine, share of quiet {slash} (PyTorch's) | step / GEMMs alone |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, rec in record["workloads"].items():
        cmp_ = rec.get("comparison", {})  # an optimizer whose fastbp run failed has no entry: "-" in its place
        rates = " / ".join(_rate(cmp_[o]["fastbp_samples_per_s"]) if o in cmp_ else "-" for o in opts)
        jax = " / ".join(_ratio(cmp_.get(o, {}).get("peers", {}).get("jax")) for o in opts)
        torch = " / ".join(_ratio(cmp_.get(o, {}).get("peers", {}).get("torch")) for o in opts)
        busy = " / ".join(_share(rec.get("contended", {}).get("by_optimizer"), o) for o in opts)
        steps = rec.get("fastbp_step_vs_gemm", {})
        gemm = " / ".join(f"{steps[o]['step_over_gemm']:.2f}" if o in steps else "-" for o in opts)
        gemm = gemm if rec["config"]["batch"] > 1 and steps else "-"  # batch 1 runs no GEMM
        lines.append(f"| {_name(rec['config'])} | {rates} | {jax} | {torch} | {busy} | {gemm} |")
    return "\n".join(lines)


def extras(record: dict) -> str:
    out = []
    digits = record.get("digits_vs_sklearn", {})
    if digits:  # an entry without a ratio says why ("unavailable": scikit-learn missing)
        out.append("digits vs scikit-learn: " + ", ".join(
            f"{o} {e['time_ratio_sklearn_over_fastbp']:.1f}x" if "time_ratio_sklearn_over_fastbp" in e
            else f"{o} - ({e.get('unavailable') or e.get('error') or 'no ratio'})" for o, e in digits.items()))
    timed = {k: v for k, v in record.get("jit", {}).items() if isinstance(v, dict) and "process_to_first_fit_s" in v}
    cold = {k.split("/")[0]: v["process_to_first_fit_s"] for k, v in timed.items() if k.endswith("/cold_cache")}
    warm = [v["process_to_first_fit_s"] for k, v in timed.items() if k.endswith("/warm_cache")]
    if cold:
        out.append("JIT cold, process start to first fit: " + ", ".join(f"{k} {v:.1f} s" for k, v in cold.items())
                   + (f"; warm cache {min(warm):.2f}-{max(warm):.2f} s" if warm else ""))
    m = record.get("machine", {})
    src = record.get("source", {})
    best = [record.get(k, {}).get("gflops_best") for k in ("sgemm_start", "sgemm_end")]
    out.append(f"machine: {m.get('cpu_model')}, {m.get('cpus', {}).get('usable')} usable CPUs; best SGEMM at start / end "
               f"{' / '.join(f'{g:.0f}' if g else '?' for g in best)} GFLOP/s; commit {src.get('commit', '?')}{' (dirty)' if src.get('dirty') else ''}")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        record = json.load(f)
    print(table(record))
    print()
    print(extras(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
