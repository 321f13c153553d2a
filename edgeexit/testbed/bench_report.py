"""The benchmark's numbers and pictures: per condition statistics, the headline JSON, Markdown and a PNG."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgeexit.reports import bandwidth_axes, figure, fmt, markdown_table
from edgeexit.testbed.bench_stats import ConditionStats, condition_stats, headline

PLANNER = "edgeexit"
HEADLINE_KEYS = ("worst_over_oracle", "mean_over_oracle", "distinct_winners", "best_speedup_over_baselines",
                 "mean_speedup_over_baselines", "cost_model_error", "samples_per_condition", "emulation")


def analyse(runs: list[Any], options: Any, seed: int = 0) -> dict[str, Any]:
    """Statistics per condition (device x network) and the headline figures over all of them."""
    from edgeexit.profiles import load_network

    conditions: list[ConditionStats] = []
    per_condition: list[dict[str, Any]] = []
    for run in runs:
        names = sorted({r.strategy for r in run.rows})
        adaptive = [n for n in names if n in ("edgeexit", "bandit")]
        static = [n for n in names if n not in adaptive and n != "neurosurgeon"]
        c = condition_stats(f"{run.device} / {run.network}", run.rows, static, adaptive, seed=seed)
        for name, ms in run.predicted.items():
            if name in c.strategies:
                c.strategies[name].predicted_ms = ms
        conditions.append(c)
        n = load_network(run.network)
        per_condition.append({
            "device": run.device, "network": run.network, "up_mbit": n.up_mbit, "down_mbit": n.down_mbit,
            "rtt_ms": n.rtt_ms, "jitter_ms": n.jitter_ms, "emulation": run.emulation.get("description"),
            "planner_choice": run.choice, "neurosurgeon_is": run.neurosurgeon, "best_static": c.best_static,
            "best_static_is_a_tie": c.winner_is_tie, "hindsight_bound_ms": round(c.hindsight_ms, 3),
            "over_best_static": {k: [round(v, 4) for v in r] for k, r in c.adaptive_over_best_static.items()},
            "strategies": {k: asdict(v) for k, v in c.strategies.items()},
        })
    head = headline(conditions, PLANNER)
    samples = min(st.n for c in conditions for st in c.strategies.values())
    emulation = {run.device: run.emulation for run in runs}  # one per class: calibrated once, cached
    head.update({"samples_per_condition": samples,
                 "emulation": "; ".join(e.get("description", d) for d, e in emulation.items())})
    within_noise = [f"{c.condition}" for c in conditions
                    if (r := c.adaptive_over_best_static.get(PLANNER)) and r[1] <= 1.0 <= r[2]]
    return {"headline": {k: head[k] for k in HEADLINE_KEYS}, "conditions": per_condition,
            "edgeexit_within_noise_of_best_static": within_noise, "emulation_detail": emulation,
            "options": {"samples": options.samples, "warmup": options.warmup, "deadline_ms": options.deadline_ms,
                        "devices": options.devices, "networks": options.networks, "bandit": options.bandit,
                        "parallel": options.parallel},
            "_conditions": conditions}


def markdown(result: dict[str, Any]) -> str:
    h = result["headline"]
    lines = [f"# edgeexit bench: {result['model']}\n",
             f"Data: {result['dataset']}. Device speed EMULATED ({h['emulation']}); the cloud is this host. "
             f"{h['samples_per_condition']} requests per strategy and condition, interleaved request by request "
             f"on long-lived agents, {result['options']['warmup']} warm-up requests per agent excluded. Latency is "
             "what the app saw; [lo, hi] are 95% bootstrap intervals; 'pred' is the planner's expected latency.\n",
             "| figure | value |", "|---|---:|"]
    lines += [f"| {k} | {fmt(v) if not isinstance(v, str) else v} |" for k, v in h.items() if k != "emulation"]
    for c in result["conditions"]:
        ratio = c["over_best_static"].get(PLANNER)
        verdict = "" if ratio is None else (
            f"; edgeexit / best static {ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]"
            + (" (within noise)" if ratio[1] <= 1.0 <= ratio[2] else ""))
        lines += [f"\n## {c['device']} / {c['network']} (up {c['up_mbit']:g} Mbit/s, RTT {c['rtt_ms']:g} ms)\n",
                  f"Best static: **{c['best_static']}**{' (a tie with the runner-up)' if c['best_static_is_a_tie'] else ''}"  # noqa: E501
                  f"; per-request hindsight bound {c['hindsight_bound_ms']:.1f} ms; planner's choice "
                  f"{c['planner_choice']}; neurosurgeon = {c['neurosurgeon_is']}{verdict}.\n"]
        rows = []
        for name, s in sorted(c["strategies"].items(), key=lambda kv: kv[1]["mean_ms"]):
            pred = s["predicted_ms"]
            rows.append([name, f"{s['mean_ms']:.1f} [{s['mean_ci'][0]:.1f}, {s['mean_ci'][1]:.1f}]",
                         f"{s['p95_ms']:.1f} [{s['p95_ci'][0]:.1f}, {s['p95_ci'][1]:.1f}]",
                         "-" if pred is None else f"{pred:.1f}", f"{100 * s['accuracy']:.1f}%",
                         f"{100 * s['offloaded']:.0f}%", f"{s['bytes_mean']:.0f}",
                         ", ".join(f"{k}:{v}" for k, v in s["splits"].items()) if name in ("edgeexit", "bandit")
                         else ""])
        lines.append(markdown_table(["strategy", "mean ms [95% CI]", "p95 ms [95% CI]", "pred ms", "accuracy",
                                     "to cloud", "bytes/req", "splits used"], rows, left=1))
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Latency vs uplink bandwidth per strategy, one panel per device class; the planner's choice marked."""
    devices = list(dict.fromkeys(c["device"] for c in result["conditions"]))
    with figure(path, len(devices), size=(5.4 * len(devices), 4.6), dpi=110,
                title=f"{result['model']}: measured mean latency (EMULATED devices)") as axes:
        for ax, device in zip(axes, devices, strict=True):
            conds = sorted((c for c in result["conditions"] if c["device"] == device), key=lambda c: c["up_mbit"])
            names = list(dict.fromkeys(n for c in conds for n in c["strategies"]))
            for name in names:
                pts = [(c["up_mbit"], c["strategies"][name]["mean_ms"]) for c in conds if name in c["strategies"]]
                bold = name == PLANNER
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="*" if bold else "o", label=name,
                        markersize=9 if bold else 3, linewidth=2.6 if bold else 1.0, zorder=3 if bold else 2)
            for c in conds:
                at = (c["up_mbit"], c["strategies"][PLANNER]["mean_ms"])
                ax.annotate(f"{c['network']}: {c['planner_choice']}", at, textcoords="offset points", xytext=(4, 6),
                            fontsize=6)
            bandwidth_axes(ax, "mean latency per request (ms)", f"EMULATED {device}")
        axes[0].legend(fontsize=6, ncol=2)
    return path


def write_outputs(result: dict[str, Any], out: Path) -> str:
    """bench.json, bench.md and bench.png into ``out``; returns the Markdown."""
    result = {k: v for k, v in result.items() if not k.startswith("_")}
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "bench.md").write_text(md)
    plot(result, out / "bench.png")
    return md
