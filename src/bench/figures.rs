//! The rows of the performance table: what was measured, the baseline the
//! issue recorded before this work, the target, and whether it is met.

use serde_json::{Value, json};

use super::BenchArgs;

#[derive(Debug, Clone)]
pub struct Figure {
    pub name: &'static str,
    pub measured: String,
    pub baseline: &'static str,
    pub target: &'static str,
    /// `None`: not decided by this run (see `measured`).
    pub met: Option<bool>,
    pub values: Value,
}

/// The planner's passes over one window, seen from outside.
#[derive(Debug, Clone, Copy)]
pub struct Passes {
    /// Passes of the Safe's planner (the count of its `/metrics` histogram).
    pub passes: u64,
    /// Their total time (the histogram's sum).
    pub seconds: f64,
    /// Requests the Safe Transaction Service received meanwhile.
    pub calls: usize,
}

/// How `serve` learnt of new blocks, and how often they came.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    NewHeads,
    Polling,
    PollingSlowBlocks,
}

#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Figure>,
}

impl Table {
    pub fn push(&mut self, figure: Figure) {
        eprintln!("bench: {}: {}", figure.name, figure.measured);
        self.rows.push(figure);
    }

    /// A Markdown table, as the README shows it.
    pub fn render(&self) -> String {
        let mut out =
            String::from("| figure | measured | target | met | before |\n|---|---|---|---|---|\n");
        for row in &self.rows {
            let met = match row.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "n/a",
            };
            out.push_str(&format!(
                "| {} | {} | {} | {met} | {} |\n",
                row.name, row.measured, row.target, row.baseline
            ));
        }
        out
    }

    pub fn json(&self, args: &BenchArgs) -> Value {
        json!({
            "settings": {
                "nodes": args.nodes, "slots": args.slots, "rounds": args.rounds,
                "polling_rounds": args.polling_rounds, "slow_rounds": args.slow_rounds,
                "burst": args.burst,
                "open_proposals": args.open_proposals, "block_time_secs": 1, "confirmations": 2,
            },
            "figures": self.rows.iter().map(|r| json!({
                "figure": r.name, "measured": r.measured, "target": r.target,
                "met": r.met, "before": r.baseline, "values": r.values,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The `q` quantile (0..=1) of `values`, nearest rank.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Figure {
    pub fn commit_delay(how: Pace, delays: &[f64]) -> Figure {
        let (p50, p99) = (quantile(delays, 0.5), quantile(delays, 0.99));
        Figure {
            name: match how {
                Pace::NewHeads => {
                    "commit call after the confirmation block (newHeads, 1 s blocks; p50 / p99, block times)"
                }
                Pace::Polling => {
                    "commit call after the confirmation block (polling, 1 s blocks; p50 / p99, block times)"
                }
                Pace::PollingSlowBlocks => {
                    "commit call after the confirmation block (polling, 12 s blocks; p50 / p99, block times)"
                }
            },
            measured: format!("{p50:.2} / {p99:.2} (n = {})", delays.len()),
            baseline: "0.52 / 1.00",
            target: "p50 ≤ 0.25, p99 ≤ 0.5",
            met: Some(p50 <= 0.25 && p99 <= 0.5),
            values: json!({"p50": p50, "p99": p99, "samples": delays}),
        }
    }

    pub fn execution_to_done(to_done: &[f64], after_running: &[f64]) -> Figure {
        let done = quantile(to_done, 0.5);
        let after = quantile(after_running, 0.5);
        Figure {
            name: "execution block → `done`, one replica (p50)",
            measured: format!("{done:.1} s; done {after:.1} s after the replica runs"),
            baseline: "7.5 s; 5.0 s provisioning poll",
            target: "done ≤ 1 s after the replica runs",
            met: Some(after <= 1.0),
            values: json!({"to_done_secs": to_done, "after_running_secs": after_running}),
        }
    }

    /// `how`: how `serve` learnt of blocks, and their pace, as the name's
    /// parenthesis says it.
    pub fn rpc_per_block(how: Pace, per_open: &[(u32, (f64, f64))]) -> Figure {
        let worst = per_open
            .iter()
            .map(|(_, (calls, _))| *calls)
            .fold(0.0, f64::max);
        let measured = per_open
            .iter()
            .map(|(open, (calls, polls))| {
                format!("{calls:.2} with {open} open ({polls:.2} eth_blockNumber)")
            })
            .collect::<Vec<_>>()
            .join("; ");
        Figure {
            name: match how {
                Pace::NewHeads => "JSON-RPC calls per new block (newHeads, 1 s blocks)",
                Pace::Polling => "JSON-RPC calls per new block (polling, 1 s blocks)",
                Pace::PollingSlowBlocks => "JSON-RPC calls per new block (polling, 12 s blocks)",
            },
            measured,
            baseline: "2.25–3.0 with 1 s blocks, 26 with 12 s blocks; 6 per pass even with no new block",
            target: "≤ 2.5 per new block, every call; 1 per poll with no new block",
            met: Some(worst <= 2.5),
            values: json!(per_open.iter().map(|(open, (calls, polls))| json!({
                "open_proposals": open, "calls_per_block": calls, "block_number_per_block": polls,
            })).collect::<Vec<_>>()),
        }
    }

    /// The planner's passes at each count of open proposals. "Flat" is
    /// read as: at the most open proposals, a pass takes at most half as
    /// long again, and costs at most half as many Safe-service calls again,
    /// as at the fewest.
    pub fn planner_passes(levels: &[(u32, Passes)]) -> Figure {
        let ms = |p: &Passes| p.seconds * 1000.0 / p.passes.max(1) as f64;
        let calls = |p: &Passes| p.calls as f64 / p.passes.max(1) as f64;
        let measured = levels
            .iter()
            .map(|(open, p)| format!("{:.1} ms, {:.2} calls with {open} open", ms(p), calls(p)))
            .collect::<Vec<_>>()
            .join("; ");
        let (time_ratio, calls_ratio) = match (levels.first(), levels.last()) {
            (Some((_, fewest)), Some((_, most))) => (
                ms(most) / ms(fewest),
                calls(most) / calls(fewest).max(f64::MIN_POSITIVE),
            ),
            _ => (f64::NAN, f64::NAN),
        };
        let (fewest, most) = (
            levels.first().map_or(0, |(open, _)| *open),
            levels.last().map_or(0, |(open, _)| *open),
        );
        Figure {
            name: "planner pass (mean time; Safe-service calls per pass, confirmations read every 3 s)",
            measured: format!(
                "{measured} ({most} / {fewest} open: {time_ratio:.2}× the time, {calls_ratio:.2}× the calls)"
            ),
            baseline: "1 Safe-service GET per open proposal per pass (5 rps: about 10 s a pass with 50 open)",
            target: "flat: ≤ 1.5× the time and the calls with 100 open as with 1",
            met: Some(time_ratio <= 1.5 && calls_ratio <= 1.5),
            values: json!({
                "levels": levels.iter().map(|(open, p)| json!({
                    "open_proposals": open, "passes": p.passes, "pass_seconds_total": p.seconds,
                    "mean_pass_ms": ms(p), "safe_service_calls": p.calls,
                    "calls_per_pass": calls(p),
                })).collect::<Vec<_>>(),
                "time_ratio": time_ratio, "calls_ratio": calls_ratio,
            }),
        }
    }

    pub fn intake(intake_rate: f64, insert_rate: f64, latencies: &mut [f64]) -> Figure {
        let ratio = intake_rate / insert_rate;
        let p99 = quantile(latencies, 0.99) * 1000.0;
        Figure {
            name: "intake POST /api/v1/replicas, 50 clients, ratio to a bare INSERT",
            measured: format!(
                "{ratio:.2} ({intake_rate:.0}/s vs {insert_rate:.0}/s), p99 {p99:.0} ms"
            ),
            baseline: "0.37 (1,500/s vs 4,000/s)",
            target: "≥ 0.5",
            met: Some(ratio >= 0.5),
            values: json!({"ratio": ratio, "intake_per_sec": intake_rate,
                           "insert_per_sec": insert_rate, "p99_ms": p99}),
        }
    }

    pub fn batch(
        prepares: usize,
        refused: usize,
        transactions: usize,
        calls: usize,
        first_to_last: f64,
        execution_to_last: f64,
    ) -> Figure {
        Figure {
            name: "24 batched replicas of one source (7 nodes)",
            measured: format!(
                "{prepares} prepares, {refused} × 466, {transactions} Safe tx with {calls} inner calls; last done {first_to_last:.1} s after the first ({execution_to_last:.1} s after execution)"
            ),
            baseline: "21–22 re-prepares; last done 13–15 s after execution",
            target: "no 466; last ≤ 2 s after the first",
            met: Some(refused == 0 && first_to_last <= 2.0),
            values: json!({"prepares": prepares, "refused_466": refused,
                           "safe_transactions": transactions, "inner_calls": calls,
                           "first_to_last_done_secs": first_to_last,
                           "execution_to_last_done_secs": execution_to_last}),
        }
    }

    /// `unloaded`: the p50 of [`Figure::commit_delay`], in the same run.
    /// "Unchanged" is read as: still within that figure's p99 target.
    pub fn under_load(delay: f64, unloaded: f64) -> Figure {
        Figure {
            name: "commit delay with an intake burst queued (block times)",
            measured: format!("{delay:.2}, against {unloaded:.2} without load"),
            baseline: "27.5 with 4,000 queued (0.82 without)",
            target: "unchanged by load (≤ 0.5)",
            met: Some(delay <= 0.5),
            values: json!({"block_times": delay, "unloaded_p50_block_times": unloaded}),
        }
    }

    /// The intake's p99 with Phala answering at once (`fast`) and
    /// `slower_ms` later (`slow`), every lookup fresh. "Does not grow" is
    /// read as: less than a quarter of Phala's extra latency shows (a POST
    /// that waited for Phala would add all of it).
    pub fn intake_latency(fast: &mut [f64], slow: &mut [f64], slower_ms: f64) -> Figure {
        let fast_p99 = quantile(fast, 0.99) * 1000.0;
        let slow_p99 = quantile(slow, 0.99) * 1000.0;
        Figure {
            name: "intake p99 when Phala answers 500 ms later, lookups fresh",
            measured: format!(
                "{slow_p99:.0} ms, against {fast_p99:.0} ms at Phala's normal speed (n = {} each)",
                slow.len()
            ),
            baseline: "each POST waited on two Phala calls",
            target: "does not grow (by < a quarter of the extra latency)",
            met: Some(slow_p99 < fast_p99 + slower_ms / 4.0),
            values: json!({"p99_ms": slow_p99, "p99_ms_normal": fast_p99,
                           "phala_extra_latency_ms": slower_ms}),
        }
    }

    pub fn gas(pairs: &[(u64, u64)]) -> Figure {
        let worst = pairs
            .iter()
            .map(|(estimate, used)| (*estimate as f64 - *used as f64).abs() / *used as f64)
            .fold(0.0, f64::max);
        let shown = pairs
            .last()
            .map(|(estimate, used)| format!("{estimate} shown vs {used} used; "))
            .unwrap_or_default();
        Figure {
            name: "gas estimate shown to signers",
            measured: format!(
                "{shown}worst of {} off by {:.1}%",
                pairs.len(),
                worst * 100.0
            ),
            baseline: "330,683 shown vs 262,294 used",
            target: "within 10% of the gas used",
            met: Some(!pairs.is_empty() && worst <= 0.10),
            values: json!(
                pairs
                    .iter()
                    .map(|(e, u)| json!({"estimate": e, "used": u}))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let values = [0.4, 0.1, 0.3, 0.2];
        assert_eq!(quantile(&values, 0.5), 0.2);
        assert_eq!(quantile(&values, 0.99), 0.4);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn the_planner_pass_figure_compares_the_most_open_proposals_with_the_fewest() {
        let at = |passes, seconds, calls| Passes {
            passes,
            seconds,
            calls,
        };
        let flat = Figure::planner_passes(&[
            (1, at(15, 0.030, 5)),
            (10, at(15, 0.090, 5)),
            (100, at(16, 0.040, 5)),
        ]);
        assert_eq!(flat.met, Some(true), "{}", flat.measured);
        let slower = Figure::planner_passes(&[(1, at(15, 0.030, 5)), (100, at(15, 0.060, 5))]);
        assert_eq!(slower.met, Some(false), "{}", slower.measured);
        let costlier = Figure::planner_passes(&[(1, at(15, 0.030, 5)), (100, at(15, 0.030, 500))]);
        assert_eq!(costlier.met, Some(false), "{}", costlier.measured);
    }
}
