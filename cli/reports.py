"""What the ``seedtune`` command prints: each job's and bench's result as text."""

from __future__ import annotations

import math
import re
import sys

from seedtune.common.config import Config
from seedtune.jobs.audit import AuditResult

# The columns each bench prints: (heading, key, format).
COLUMNS = {
    "step": [("variant", "variant", "{:<42}"), ("trainable", "trainable", "{:>10}"),
             ("step ms", "step_s", "{:>9.0f}"), ("2 fwd ms", "baseline_s", "{:>9.0f}"),
             ("ratio", "ratio", "{:>7.3f}")],
    "memory": [("method", "method", "{:<11}"), ("step s", "step_s", "{:>8.3f}"),
               ("MiB above model", "peak_above_model_mib", "{:>16.1f}"), ("x inference", "vs_inference", "{:>12.2f}")],
    "sweep": [("method", "method", "{:<11}"), ("batch", "batch", "{:>6}"), ("step s", "step_s", "{:>8.3f}"),
              ("MiB above model", "peak_above_model_mib", "{:>16.1f}")],
    "comm": [("K", "probes", "{:>3}"), ("down B", "down_bytes", "{:>8}"), ("up B", "up_bytes", "{:>6}"),
             ("first contact B", "first_contact_bytes", "{:>16}"),
             ("1000 rounds, every round", "total_every_round_bytes", "{:>25,}"),
             ("every 3rd round", "total_every_third_round_bytes", "{:>16,}"),
             ("join at round 1000", "join_at_the_end_bytes", "{:>19,}")],
    "server": [("trainable set", "trainable_set", "{:<22}"), ("K", "probes", "{:>3}"),
               ("server ms/round", "server_round_s", "{:>16.2f}"), ("client ms/step", "client_step_s", "{:>15.1f}"),
               ("replay rounds/s", "replay_rounds_per_s", "{:>16.1f}"), ("1000 rounds s", "replay_1000_s", "{:>14.2f}"),
               ("apply one by one/s", "apply_one_at_a_time_rounds_per_s", "{:>19.1f}"),
               ("apply_all/s", "apply_all_rounds_per_s", "{:>12.1f}")],
    "scale": [("silos", "clients", "{:>6}"), ("round s", "round_s", "{:>8.3f}"),
              ("forward s", "forward_s_per_round", "{:>10.3f}"), ("framework s", "framework_s_per_round", "{:>12.3f}"),
              ("framework/compute", "framework_over_compute", "{:>18.2f}"),
              ("tree MiB", "peak_tree_mib", "{:>9.0f}"), ("MiB/silo", "peak_mib_per_client", "{:>9.0f}")],
    "noise": [("K", "probes", "{:>3}"), ("discrete ms", "discrete_ms", "{:>12.3f}"),
              ("gaussian ms", "gaussian_ms", "{:>12.3f}"), ("ratio", "ratio", "{:>7.1f}"),
              ("extra noise %", "noise_inflation_pct", "{:>14.3f}")],
    "robust": [("attack", "attack", "{:<10}"), ("rule", "rule", "{:<13}"), ("accuracy", "accuracy", "{:>9.3f}"),
               ("vs honest", "change", "{:>10.3f}"), ("rounds", "rounds", "{:>7}"), ("refused", "refused", "{:>8}")],
    "deploy": [("case", "case", "{:<22}"), ("silos", "silos", "{:>6}"), ("rounds", "rounds", "{:>7}"),
               ("simulated s", "simulated_s", "{:>12.2f}"), ("deployed s", "deployed_s", "{:>11.2f}"),
               ("ratio", "ratio", "{:>6.2f}"), ("engine s", "engine_s", "{:>9.2f}"),
               ("way back s", "way_back_s", "{:>11.2f}"), ("way out s", "way_out_s", "{:>10.2f}")],
    "deploy-job": [("case", "case", "{:<20}"), ("silos", "silos", "{:>6}"), ("steps", "steps", "{:>6}"),
                   ("rounds", "rounds", "{:>7}"), ("minutes", "wall_min", "{:>8.1f}"),
                   ("test before", "test_before", "{:>12.4f}"), ("test after", "test_after", "{:>11.4f}"),
                   ("epsilon", "epsilon", "{:>8.3f}")],
    "secure": [("epsilon", "epsilon", "{:>7g}"), ("silos", "silos", "{:>6}"), ("noise", "mode", "{:<9}"),
               ("multiplier", "multiplier", "{:>11.3f}"), ("sum's noise /C", "summed_noise", "{:>15.3f}"),
               ("val accuracy", "validation_accuracy", "{:>13.4f}"), ("smallest", "smallest", "{:>9.4f}"),
               ("up B/round", "bytes_up", "{:>11.0f}"), ("down B/round", "bytes_down", "{:>13.0f}"),
               ("s/round", "seconds", "{:>8.3f}"), ("mask ms", "mask_ms", "{:>8.2f}"),
               ("unmask ms", "unmask_ms", "{:>10.2f}"), ("first round B", "first_round_bytes", "{:>14.0f}")],
}
MILLISECONDS = {("step", "step_s"), ("step", "baseline_s"), ("server", "server_round_s"),
                ("server", "client_step_s")}  # stored in seconds, printed in ms



def print_bench(report: dict, file=None) -> None:
    """A cost bench's report (:func:`seedtune.bench.run.run_bench`) as a table, then its targets."""
    file = file or sys.stdout
    columns = COLUMNS[report["bench"]]
    print(" ".join(_heading(title, fmt) for title, _, fmt in columns), file=file)
    for row in report["rows"]:
        cells = []
        for _, key, fmt in columns:
            value = row[key] * 1e3 if (report["bench"], key) in MILLISECONDS else row[key]
            cells.append(fmt.format(value))
        print(" ".join(cells), file=file)
    if report["bench"] == "comm":
        fedavg = report["fedavg_round_bytes"]
        print(f"FedAvg (full model each way): {fedavg['down']:,} B down and up per round, "
              f"{fedavg['total_1000_rounds']:,} B over 1000 rounds", file=file)
    if report["bench"] == "server":
        setup = report["setup"]
        print(f"model download at 100 Mbit/s: {setup['model_download_s_at_100_mbit']:.2f} s "
              f"({setup['model_bytes']:,} B)", file=file)
    for row in report.get("presets", []):
        print(f"preset {row['preset']} (epsilon {row['epsilon']:g}, q {row['sample_rate']:g}, {row['steps']} steps): "
              f"sigma {row['sigma_gaussian']:.4f} gaussian -> {row['sigma_discrete']:.4f} discrete "
              f"(+{row['sigma_increase_pct']:.2f}%)", file=file)
    if "timing" in report:
        timing = report["timing"]
        print(f"timing of one exact draw at the default preset's sigma ({timing['sigma_lattice_units']:.0f} lattice "
              f"units, {timing['draws']} draws): median {timing['median_us']:.1f} us; rank correlation with |z| "
              f"{timing['spearman_time_vs_magnitude']:.2f}; median by |z|/sigma: " + ", ".join(
                  f"[{band['low']:g}, {band['high']:g}) {band['median_us']:.1f} us" for band in timing["bands"]),
              file=file)
    if report["bench"] == "deploy":
        print(f"a fresh flwr-clientapp process imports Flower for {report['setup']['clientapp_import_s']:.2f} s "
              f"(part of the way out); deployed over simulated, default preset: {report['ratio']:.2f}", file=file)
    if report["bench"] == "secure":
        for fall in report["falls"]:
            print(f"epsilon {fall['epsilon']:g}, {fall['silos']} silos: per-silo noise ends "
                  f"{100 * fall['per_silo_below_one_silo']:.2f} points below one silo holding all the data, secure "
                  f"aggregation {100 * fall['secure_below_one_silo']:.2f}", file=file)
    if report["bench"] == "robust":
        print(f"test accuracy before training: {report['rows'][0]['before']:.3f}", file=file)
        for row in report["rows"]:
            if row["attack"] == "honest":
                print(row["cost"], file=file)
    for row in report["rows"]:
        if "replay_profile" in row:
            print(f"\nwhere replay time goes ({row['trainable_set']}, torch profiler):\n{row['replay_profile']}", file=file)
    for target in report["targets"]:
        relation = ">=" if target["at_least"] else "<="
        print(f"[{'met' if target['met'] else 'NOT met'}] {target['claim']}: {target['value']:.4g} "
              f"(target {relation} {target['limit']:g})", file=file)


def _heading(title: str, fmt: str) -> str:
    """``title`` aligned and padded like the values that ``fmt`` formats."""
    align, width = re.match(r"\{:([<>]?)(\d+)", fmt).groups()
    return f"{title:{align or '>'}{width}}"


def print_utility(summary: dict, file=None) -> None:
    file = file or sys.stdout  # looked up at call time, so redirection (and pytest's capture) applies
    print(f"{'method':<11}{'epsilon':>8}{'accuracy':>18}{'of ceiling':>12}{'eps spent':>11}{'peak MiB':>10}"
          f"{'wall s':>9}", file=file)
    for row in summary["table"]:
        epsilon = "-" if row["epsilon"] is None else f"{row['epsilon']:g}"
        spent = "inf" if row["epsilon_spent"] is None else f"{row['epsilon_spent']:.3f}"
        share = f"{row['of_ceiling']:.2f}" if "of_ceiling" in row else "-"
        print(f"{row['method']:<11}{epsilon:>8}{row['accuracy']:>11.4f} ± {row['accuracy_std']:.4f}{share:>12}"
              f"{spent:>11}{row['peak_memory_mib']:>10.0f}{row['wall_s']:>9.1f}", file=file)
    if summary.get("jobs", 1) > 1:
        print(f"({summary['jobs']} runs at once: each wall time is on its share of the cores)", file=file)


def print_audit(result: AuditResult, config: Config) -> None:
    r = result
    if r.noise == "off":
        noise = "no noise (--noise-off: a non-private run)"
    else:
        kind = {"discrete": "discrete Gaussian noise", "gaussian": "Gaussian noise (floating point)"}[r.noise]
        noise = f"{kind}, sigma={r.noise_multiplier:.4f}"
        if r.noise_scale != 1.0:
            noise += f", drawn at {r.noise_scale:g} x sigma (a broken silo)"
    print(f"audit of one release by real silos: {config.model.name} on {config.data.name}, attack: {r.attack}")
    print(f"neighbours:    D = {r.examples} examples; D' = D + the canary {r.canary!r} "
          f"(|s| = {r.canary_norm:.3g} C)")
    print(f"request:       Poisson q={r.sample_rate:g}, clip C={r.clip_bound:g}, K={r.probes} probes, "
          f"beta={r.beta:g}, {noise}")
    if r.refused:
        print(f"refused:       {r.refused}")
        print(r.verdict)
        return
    level = 100 * (1 - (1 - r.confidence) / 2)
    print(f"trials:        {r.trials} per dataset ({r.trials - r.test_trials} choose the statistic and threshold, "
          f"{r.test_trials} test them); {r.releases_charged} releases charged to the audited silos' ledgers")
    print(f"test:          D' when {r.statistic} score >= {r.threshold:.6g}: false positives {r.false_positives}/"
          f"{r.test_trials} (FPR <= {r.fpr_upper:.4g}), false negatives {r.false_negatives}/{r.test_trials} "
          f"(FNR <= {r.fnr_upper:.4g}), each at {level:g}%")
    if r.nonfinite_releases:
        print(f"non-finite:    {r.nonfinite_releases} releases held NaN or infinite values")
    if r.rows_zeroed:
        print(f"zeroed:        {r.rows_zeroed} per-example rows were not finite and counted as zero (in the silos' "
              "ledgers; not released)")
    accountant = "inf (no noise)" if math.isinf(r.epsilon_accountant) else f"{r.epsilon_accountant:.4f}"
    print(f"epsilon:       charged {accountant} at delta={r.delta:g}; lower bounds ({100 * r.confidence:g}% "
          f"confidence): {r.epsilon_lower:.4f} assumption-free (at most {r.epsilon_ceiling:.2f} with these trials), "
          f"{_num(r.epsilon_gaussian)} Gaussian (mu >= {_num(r.mu_lower)})")
    if r.flagged_scale:
        print(f"power:         a release noised at <= {r.flagged_scale:.2f} x its sigma would be flagged "
              "(in expectation, Gaussian bound)")
    print(r.verdict)


def _num(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4f}"


def print_training(result) -> None:
    """``seedtune train``'s summary (:class:`seedtune.jobs.train.TrainResult`)."""
    print(f"run directory: {result.run_dir}")
    print(f"steps: {result.steps}   epsilon spent: {_number(result.epsilon)}")
    for name in ("accuracy", "loss"):
        if name in result.before:
            print(f"test {name}: {result.before[name]:.4f} before -> {result.after[name]:.4f} after")


def print_simulation(result) -> None:
    """``seedtune simulate``'s summary and per-silo table (:class:`seedtune.jobs.simulate.SimulationResult`)."""
    federation = result.federation
    print(f"run directory: {result.run_dir}")
    print(f"steps: {federation.steps}   rejected replies: {len(federation.rejections)}")
    if federation.stopped_early:
        print(f"stopped early: {federation.stopped_early}")
    if federation.aggregation is not None:
        print(federation.aggregation.summary())
    for name in ("accuracy", "loss"):
        if name in federation.before:
            print(f"test {name}: {federation.before[name]:.4f} before -> {federation.after[name]:.4f} after")
    if federation.silo_evaluation:
        evaluation = federation.silo_evaluation
        kind = "noised, charged" if evaluation["private"] else "NOT private"
        print(f"accuracy on the silos' own held-out data ({kind}): {evaluation['accuracy']:.4f}")
    secure = bool(federation.epsilons_if_all_collude)
    if secure:
        print(f"secure aggregation: epsilon holds with at least {federation.secure_honest} honest participants a "
              "round; 'if all collude' is each silo's own share of the noise alone")
    print()
    print(f"{'silo':<14}{'releases':>9}{'epsilon (silo)':>16}{'epsilon (server)':>18}"
          + (f"{'if all collude':>16}" if secure else "") + f"{'up B/round':>12}{'down B/round':>14}")
    for silo in sorted(set(federation.epsilons) | set(result.silo_ledgers)):  # each silo once, by its name
        ledger = result.silo_ledgers.get(silo, {"releases": 0, "epsilon": float("nan")})
        releases, own = ledger["releases"], ledger["epsilon"]
        traffic = federation.traffic.get(silo, {"messages": 0, "bytes_up": 0, "bytes_down": 0})
        messages = max(traffic["messages"], 1)
        colluding = ledger.get("epsilon_if_all_collude", federation.epsilons_if_all_collude.get(silo, float("nan")))
        print(f"{silo:<14}{releases:>9}{_number(own):>16}{_number(federation.epsilons.get(silo, float('nan'))):>18}"
              + (f"{_number(colluding):>16}" if secure else "")
              + f"{traffic['bytes_up'] / messages:>12.0f}{traffic['bytes_down'] / messages:>14.0f}")


def _status(report: dict, run_dir) -> str:
    progress = f"{report['steps']} of {report['planned_steps']} steps"
    if report["status"] == "running":
        driver = report["driver"]
        return (f"running, {progress}, in pid {driver.get('pid')} on {driver.get('host')} ({driver.get('command')})"
                if driver else f"starting, {progress}")
    if report["status"] == "stopped":
        command = report.get("command")
        again = (f"`{command} --resume --out {run_dir}`" if command in ("seedtune train", "seedtune simulate")
                 else f"the federation's ServerApp again with run-dir={run_dir}")
        return f"stopped at {progress}, no process is running it: resume with {again}"
    return f"{report['status']}, {progress}"


def print_run(report: dict, run_dir, steps: int) -> None:
    """``seedtune show``: a run's report (:func:`seedtune.jobs.export.describe`) as text."""
    privacy = report["privacy"]
    print(f"run {run_dir}  ({_status(report, run_dir)})")
    print(f"model {report['config']['model']['name']} · task {report['config']['model']['task']} · "
          f"data {report['config']['data']['name']} · schedule {report['config']['schedule']['kind']}")
    print(f"trainable coordinates: {report['trainable_coordinates']}")
    if privacy.get("epsilon_per_silo"):
        print("privacy per silo (coordinator's view, from reported events): " + ", ".join(
            f"{silo}={_number(value)}" for silo, value in privacy["epsilon_per_silo"].items()))
    if privacy.get("ledger_per_silo"):
        print("privacy per silo (each silo's own ledger): " + ", ".join(
            f"{silo}={_number(entry['epsilon'])} in {entry['releases']} releases"
            for silo, entry in privacy["ledger_per_silo"].items()))
    if privacy.get("secure_aggregation"):
        print(f"secure aggregation: the epsilons above hold with at least {privacy['secure_aggregation']['honest']} "
              "honest participants a round; if every other party colluded, each silo's own share alone gives: "
              + ", ".join(f"{silo}={_number(value)}"
                          for silo, value in privacy.get("epsilon_per_silo_if_all_collude", {}).items()))
    if "federation" in report:
        for silo in report["federation"]["silos"]:
            print(f"  {silo['silo']}: {silo['releases']} releases, {silo['bytes_up']} B up and "
                  f"{silo['bytes_down']} B down in {silo['messages']} messages")
        print(f"rejected replies: {len(report['federation']['rejections'])}")
    if privacy["enabled"]:
        print(f"privacy: epsilon={_number(privacy['epsilon'])} of {privacy['budget_epsilon']} at "
              f"delta={privacy['delta']:g}; sigma={privacy['noise_multiplier']:.6g}, q={privacy['sample_rate']:g}, "
              f"releases={privacy['releases']}, accountant={privacy['accountant']}")
    else:
        print("privacy: off (non-private run)")
    for key in ("test_before", "test_after"):
        if report.get(key):
            print(f"{key.replace('_', ' ')}: " + ", ".join(f"{k}={v:.4f}" for k, v in report[key].items()))
    rows = report["steps_detail"] if steps < 0 else report["steps_detail"][: steps]
    if rows:
        print(f"{'step':>6} {'stage':>5} {'lr':>10} {'beta':>10}  seeds -> projected gradients")
        for row in rows:
            pairs = ", ".join(f"{s}:{g:+.5g}" for s, g in zip(row["probe_seeds"], row["projected_grads"]))
            print(f"{row['step']:>6} {row['stage']:>5} {row['lr']:>10.4g} {row['beta']:>10.4g}  {pairs}")
        if len(rows) < report["steps"]:
            print(f"... {report['steps'] - len(rows)} more (--steps -1 for all, --json for everything)")


def _number(value: float) -> str:
    if math.isnan(value):
        return "-"
    return "inf (non-private)" if math.isinf(value) else f"{value:.4f}"




def print_recipe(report: dict, file=None) -> None:
    file = file or sys.stdout
    keys = list(report["grid"])
    print(f"validation accuracy of each {report.get('method', 'zeroth-order')} recipe ({report['seeds']} replays each; "
          f"the non-private ceiling of the readout: "
          f"{report['validation_ceiling']:.4f})", file=file)
    print("".join(f"{key:>13}" for key in keys) + f"{'mean':>9}{'smallest':>10}{'loss':>8}{'sigma':>8}"
          f"{'reply bytes':>13}", file=file)
    for point in report["points"]:
        print("".join(f"{point[key]!s:>13}" for key in keys)
              + f"{point['validation_accuracy']:>9.4f}{point['smallest']:>10.4f}{point['validation_loss']:>8.4f}"
              + f"{point['sigma']:>8.3f}"
              + f"{'—' if point['uplink_bytes'] is None else point['uplink_bytes']:>13}"
              + (f"{point['step_seconds']:>9.3f} s" if "step_seconds" in point else ""), file=file)
