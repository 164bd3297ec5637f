//! The Markdown report of an evaluation run (`report.md`), written from a [`Summary`] alone:
//! settings, one row per arm, accuracy by round, the majority arm's budget, paired comparisons,
//! links to the plots and a note on how to read the figures.
//!
//! Sections without data (no rounds, no budget, no comparisons) are left out; a figure that is
//! `None` is written as "–".

use super::plots::{ACCURACY_FILE, PLOTS_DIR, ROUNDS_FILE, TOKENS_FILE};
use super::record::BudgetKind;
use super::summary::{ArmSummary, BudgetSummary, Comparison, RunInfo, Summary};

/// Written in place of a figure that does not exist.
const NONE: &str = "–";

/// The Markdown report of `summary`.
pub fn markdown(summary: &Summary) -> String {
    let sections = [
        header(&summary.run),
        settings(&summary.run),
        arms_table(&summary.arms),
        rounds_table(&summary.arms),
        budget_table(&summary.arms),
        pool_table(&summary.arms),
        comparisons_table(&summary.comparisons),
        free_form_table(&summary.arms),
        plot_links(),
        how_to_read(),
    ];
    let mut out = sections
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn header(run: &RunInfo) -> String {
    let mut out = String::from("# Evaluation report\n");
    if !run.complete {
        out.push_str(
            "\n**INCOMPLETE — interrupted or still running; rerun with --resume to finish**\n",
        );
    }
    out
}

fn settings(run: &RunInfo) -> String {
    let arms = run
        .arms
        .iter()
        .map(|a| a.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let rows = [
        ("model", run.model.clone()),
        ("backend", run.backend.clone()),
        ("source", run.source.clone()),
        ("seed", run.seed.to_string()),
        ("items", run.items.to_string()),
        ("arms", arms),
        ("agents", run.agents.to_string()),
        ("rounds", run.rounds.to_string()),
        ("refine rounds", run.refine_rounds.to_string()),
        ("vote match", budget_kind(run.vote_match).to_string()),
        ("max tokens per call", run.max_tokens_per_call.to_string()),
        ("wall time", format!("{:.1} s", run.wall_time_s)),
    ];
    let rows = rows
        .into_iter()
        .map(|(k, v)| vec![k.to_string(), v])
        .collect();
    section("Settings", &table(&["setting", "value"], rows))
}

fn arms_table(arms: &[ArmSummary]) -> String {
    const HEADERS: [&str; 12] = [
        "arm",
        "accuracy ± stderr",
        "correct / scored",
        "parse failures",
        "failed",
        "skipped",
        "consensus",
        "mean calls",
        "prompt tokens",
        "cached tokens",
        "completion tokens",
        "latency p50 / p95 (ms)",
    ];
    let rows = arms.iter().map(arm_row).collect();
    section("Results by arm", &table(&HEADERS, rows))
}

fn arm_row(a: &ArmSummary) -> Vec<String> {
    vec![
        a.arm.as_str().to_string(),
        accuracy(a.accuracy, a.stderr),
        format!("{} / {}", a.correct, a.scored),
        percent(a.parse_failure_rate),
        a.failed.to_string(),
        a.skipped.to_string(),
        percent(a.consensus_rate),
        format!("{:.2}", a.mean_calls),
        a.prompt_tokens.to_string(),
        a.cached_prompt_tokens.to_string(),
        a.completion_tokens.to_string(),
        format!(
            "{} / {}",
            or_none(a.latency_p50_ms),
            or_none(a.latency_p95_ms)
        ),
    ]
}

fn rounds_table(arms: &[ArmSummary]) -> String {
    const HEADERS: [&str; 6] = [
        "arm",
        "round",
        "accuracy",
        "correct / scored",
        "correct → wrong",
        "wrong → correct",
    ];
    let rows: Vec<Vec<String>> = arms
        .iter()
        .flat_map(|a| a.rounds.iter().map(move |r| (a.arm, r)))
        .map(|(arm, r)| {
            vec![
                arm.as_str().to_string(),
                r.round.to_string(),
                percent(r.accuracy),
                format!("{} / {}", r.correct, r.scored),
                r.correct_to_wrong.to_string(),
                r.wrong_to_correct.to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    section("Accuracy by round", &table(&HEADERS, rows))
}

/// The pool oracle beside each pooled arm's accuracy: what a perfect picker would have scored,
/// and where right answers were lost.
fn pool_table(arms: &[ArmSummary]) -> String {
    const HEADERS: [&str; 7] = [
        "arm",
        "runs",
        "some first answer right",
        "some final answer right",
        "picked right",
        "lost by picking",
        "lost in review",
    ];
    let rows: Vec<Vec<String>> = arms
        .iter()
        .filter_map(|a| {
            let p = a.pool.as_ref()?;
            let share = |n: u64| format!("{n} ({})", percent(Some(n as f64 / p.runs as f64)));
            Some(vec![
                a.arm.as_str().to_string(),
                p.runs.to_string(),
                share(p.first_correct),
                share(p.last_correct),
                share(p.picked_correct),
                p.lost_by_picking.to_string(),
                p.lost_in_review.to_string(),
            ])
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let note = "\nThe pool oracle: a run counts when some answer it had in hand was right (the \
council: some agent's first proposal, or some agent's final one; the majority: some sample). \
*Lost by picking*: a right final answer was in the pool and the chosen one was wrong (a bad \
judge, a wrong majority). *Lost in review*: some first answer was right and no final one was \
(agents argued out of it).\n";
    let mut out = section("Pool oracle", &table(&HEADERS, rows));
    out.push_str(note);
    out
}

fn budget_table(arms: &[ArmSummary]) -> String {
    const HEADERS: [&str; 7] = [
        "arm",
        "matched",
        "target calls",
        "actual calls",
        "target tokens",
        "actual tokens",
        "mean samples",
    ];
    let rows: Vec<Vec<String>> = arms
        .iter()
        .filter_map(|a| a.budget.as_ref().map(|b| budget_row(a, b)))
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    section("Majority budget", &table(&HEADERS, rows))
}

fn budget_row(a: &ArmSummary, b: &BudgetSummary) -> Vec<String> {
    vec![
        a.arm.as_str().to_string(),
        budget_kind(b.matched).to_string(),
        b.target_calls.to_string(),
        b.actual_calls.to_string(),
        or_none(b.target_tokens),
        b.actual_tokens.to_string(),
        format!("{:.2}", b.mean_samples),
    ]
}

fn comparisons_table(comparisons: &[Comparison]) -> String {
    const HEADERS: [&str; 9] = [
        "a vs b",
        "pairs",
        "both",
        "only a",
        "only b",
        "neither",
        "difference (pp)",
        "McNemar p",
        "95 % CI (pp)",
    ];
    if comparisons.is_empty() {
        return String::new();
    }
    let rows = comparisons.iter().map(comparison_row).collect();
    section("Paired comparisons", &table(&HEADERS, rows))
}

fn comparison_row(c: &Comparison) -> Vec<String> {
    vec![
        format!("{} vs {}", c.a.as_str(), c.b.as_str()),
        c.pairs.to_string(),
        c.both_correct.to_string(),
        c.only_a.to_string(),
        c.only_b.to_string(),
        c.neither.to_string(),
        format!("{:+.1}", c.difference * 100.0),
        significant3(c.mcnemar_p),
        format!("[{:+.1}, {:+.1}]", c.ci_low * 100.0, c.ci_high * 100.0),
    ]
}

fn free_form_table(arms: &[ArmSummary]) -> String {
    let rows: Vec<Vec<String>> = arms
        .iter()
        .filter(|a| a.mean_score.is_some() || a.mean_margin.is_some())
        .map(|a| {
            let fixed = |v: Option<f64>| v.map_or_else(|| NONE.to_string(), |v| format!("{v:.3}"));
            vec![
                a.arm.as_str().to_string(),
                fixed(a.mean_score),
                fixed(a.mean_margin),
            ]
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let headers = ["arm", "mean winner score", "mean margin"];
    section("Free-form measures", &table(&headers, rows))
}

fn plot_links() -> String {
    let links = [
        ("Accuracy by arm", ACCURACY_FILE),
        ("Accuracy by round", ROUNDS_FILE),
        ("Mean tokens against accuracy", TOKENS_FILE),
    ];
    let body: String = links
        .into_iter()
        .map(|(name, file)| format!("- [{name}]({PLOTS_DIR}/{file})\n"))
        .collect();
    section("Plots", &body)
}

fn how_to_read() -> String {
    let body = "\
- Accuracy is correct / scored, ± one standard error, in percent. A final answer that does not \
parse counts as wrong, and so does a failed run; skipped runs are not scored.
- The majority arm's budget (calls or tokens, see \"vote match\") is matched to what the council \
spent on the same item, so the two compare at equal compute.
- Paired comparisons use only the items both arms scored. The difference is accuracy(a) − \
accuracy(b) in percentage points; the p-value is an exact two-sided McNemar test on the \
discordant pairs; the interval is a 95 % paired bootstrap.
";
    section("How to read this", body)
}

/// A `## title` section followed by `body`.
fn section(title: &str, body: &str) -> String {
    format!("## {title}\n\n{body}")
}

/// A Markdown table; `|` inside a cell is escaped.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    out.push_str(&line(headers.iter().map(|_| "---".to_string()).collect()));
    for row in rows {
        out.push_str(&line(
            row.into_iter().map(|c| c.replace('|', "\\|")).collect(),
        ));
    }
    out
}

fn budget_kind(kind: BudgetKind) -> &'static str {
    match kind {
        BudgetKind::Tokens => "tokens",
        BudgetKind::Calls => "calls",
    }
}

fn or_none<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| NONE.to_string(), |v| v.to_string())
}

/// A share as a percentage with one decimal: `0.625` → "62.5 %".
fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| NONE.to_string(), |p| format!("{:.1} %", p * 100.0))
}

/// "62.5 % ± 4.1" (both in percent); the stderr is left out when it is unknown.
fn accuracy(accuracy: Option<f64>, stderr: Option<f64>) -> String {
    match (accuracy, stderr) {
        (Some(p), Some(se)) => format!("{:.1} % ± {:.1}", p * 100.0, se * 100.0),
        (p, _) => percent(p),
    }
}

/// `x` with three significant digits: 0.04321 → "0.0432", 1.0 → "1.00", 1.234e-5 → "1.23e-5".
fn significant3(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    if x.abs() < 1e-3 {
        return format!("{x:.2e}");
    }
    let magnitude = x.abs().log10().floor() as i32;
    let decimals = usize::try_from(2 - magnitude).unwrap_or(0);
    let text = format!("{x:.decimals$}");
    // Rounding can carry into a new digit (0.09996 → "0.1000"): one decimal fewer then.
    let carried = text
        .trim_start_matches(['-', '0', '.'])
        .replace('.', "")
        .len()
        > 3;
    if carried && decimals > 0 {
        return format!("{x:.prec$}", prec = decimals - 1);
    }
    text
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::eval::record::Arm;
    use crate::eval::summary::RoundSummary;

    fn round(round: u32, correct: u64, flips: (u64, u64)) -> RoundSummary {
        RoundSummary {
            round,
            scored: 40,
            correct,
            accuracy: Some(correct as f64 / 40.0),
            correct_to_wrong: flips.0,
            wrong_to_correct: flips.1,
        }
    }

    /// An arm with 40 scored runs, `correct` of them right, and round data.
    fn arm(arm: Arm, correct: u64, stderr: f64, rounds: Vec<RoundSummary>) -> ArmSummary {
        ArmSummary {
            arm,
            runs: 41,
            failed: 1,
            skipped: 1,
            scored: 40,
            correct,
            accuracy: Some(correct as f64 / 40.0),
            stderr: Some(stderr),
            parse_failures: 2,
            parse_failure_rate: Some(0.05),
            consensus_rate: None,
            rounds,
            calls: 40,
            failed_calls: 0,
            prompt_tokens: 12_000,
            cached_prompt_tokens: 3_000,
            completion_tokens: 8_000,
            mean_calls: 1.0,
            mean_tokens: 500.0,
            latency_p50_ms: Some(850),
            latency_p95_ms: Some(2_100),
            latency_sum_s: 40.0,
            budget: None,
            mean_score: None,
            mean_margin: None,
            pool: None,
        }
    }

    fn arms() -> Vec<ArmSummary> {
        let refine = (0..3)
            .map(|r| round(r, 20 + 2 * r as u64, (1, 3)))
            .collect();
        let mut single = arm(Arm::Single, 20, 0.0791, vec![round(0, 20, (0, 0))]);
        single.latency_p50_ms = None;
        let mut refine = arm(Arm::SelfRefine, 23, 0.0782, refine);
        refine.calls = 120;
        refine.mean_calls = 3.0;
        refine.mean_tokens = 1_400.0;
        let mut majority = arm(Arm::Majority, 24, 0.0774, vec![round(0, 24, (0, 0))]);
        majority.calls = 118;
        majority.mean_calls = 2.95;
        majority.mean_tokens = 1_180.0;
        majority.consensus_rate = Some(0.45);
        majority.budget = Some(BudgetSummary {
            matched: BudgetKind::Tokens,
            target_calls: 120,
            target_tokens: Some(48_000),
            actual_calls: 118,
            actual_tokens: 47_250,
            mean_samples: 2.95,
        });
        let rounds = vec![
            round(0, 21, (0, 0)),
            round(1, 23, (1, 3)),
            round(2, 25, (1, 3)),
        ];
        let mut council = arm(Arm::Council, 25, 0.0766, rounds);
        council.calls = 120;
        council.mean_calls = 3.0;
        council.mean_tokens = 1_200.0;
        council.consensus_rate = Some(0.7);
        council.mean_score = Some(7.25);
        council.mean_margin = Some(1.5);
        vec![single, refine, majority, council]
    }

    fn comparison(b: Arm, mcnemar_p: f64, ci: (f64, f64)) -> Comparison {
        Comparison {
            a: Arm::Council,
            b,
            pairs: 40,
            both_correct: 18,
            only_a: 7,
            only_b: 2,
            neither: 13,
            difference: 0.125,
            mcnemar_p,
            ci_low: ci.0,
            ci_high: ci.1,
        }
    }

    /// Four arms, all with round data, a majority budget and three comparisons; complete.
    pub(crate) fn summary() -> Summary {
        Summary {
            run: RunInfo {
                model: "Qwen/Qwen2.5-0.5B-Instruct".to_string(),
                backend: "engine".to_string(),
                source: "game24".to_string(),
                seed: 7,
                items: 40,
                arms: Arm::ALL.to_vec(),
                agents: 3,
                rounds: 2,
                refine_rounds: 2,
                vote_match: BudgetKind::Tokens,
                max_tokens_per_call: 512,
                wall_time_s: 93.25,
                complete: true,
            },
            arms: arms(),
            comparisons: vec![
                comparison(Arm::Single, 0.1797, (-0.025, 0.275)),
                comparison(Arm::Majority, 1.0, (-0.1, 0.15)),
                comparison(Arm::SelfRefine, 0.000_012_34, (0.05, 0.2)),
            ],
        }
    }

    /// The same arms with nothing scored (every run skipped), no rounds and no comparisons.
    pub(crate) fn empty_summary() -> Summary {
        let mut summary = summary();
        for arm in &mut summary.arms {
            *arm = ArmSummary {
                skipped: arm.runs,
                scored: 0,
                correct: 0,
                accuracy: None,
                stderr: None,
                parse_failures: 0,
                parse_failure_rate: None,
                consensus_rate: None,
                rounds: Vec::new(),
                latency_p50_ms: None,
                latency_p95_ms: None,
                budget: None,
                mean_score: None,
                mean_margin: None,
                pool: None,
                ..arm.clone()
            };
        }
        summary.comparisons.clear();
        summary
    }

    #[test]
    fn arm_rows_show_name_accuracy_and_stderr() {
        let md = markdown(&summary());
        for (name, accuracy) in [
            ("single", "50.0 % ± 7.9"),
            ("self_refine", "57.5 % ± 7.8"),
            ("majority", "60.0 % ± 7.7"),
            ("council", "62.5 % ± 7.7"),
        ] {
            let row = format!("| {name} | {accuracy} | ");
            assert!(md.contains(&row), "no row {row:?} in\n{md}");
        }
        let council = "| council | 62.5 % ± 7.7 | 25 / 40 | 5.0 % | 1 | 1 | 70.0 % | 3.00 \
                       | 12000 | 3000 | 8000 | 850 / 2100 |";
        assert!(md.contains(council), "{md}");
    }

    #[test]
    fn missing_figures_are_dashes() {
        let md = markdown(&summary());
        // single: no consensus, no p50.
        assert!(md.contains("| 5.0 % | 1 | 1 | – | 1.00 |"), "{md}");
        assert!(md.contains("| – / 2100 |"), "{md}");
        let md = markdown(&empty_summary());
        assert!(
            md.contains("| single | – | 0 / 0 | – | 1 | 41 | – |"),
            "{md}"
        );
        assert!(md.contains("| – / – |"), "{md}");
    }

    #[test]
    fn incomplete_line_only_when_incomplete() {
        let line = "INCOMPLETE — interrupted or still running; rerun with --resume to finish";
        let mut summary = summary();
        assert!(!markdown(&summary).contains("INCOMPLETE"));
        summary.run.complete = false;
        assert!(markdown(&summary).contains(line));
    }

    #[test]
    fn settings_are_listed() {
        let md = markdown(&summary());
        for row in [
            "| model | Qwen/Qwen2.5-0.5B-Instruct |",
            "| seed | 7 |",
            "| arms | single, self_refine, majority, council |",
            "| refine rounds | 2 |",
            "| vote match | tokens |",
            "| max tokens per call | 512 |",
            "| wall time | 93.2 s |",
        ] {
            assert!(md.contains(row), "no {row:?} in\n{md}");
        }
    }

    #[test]
    fn rounds_budget_and_free_form_figures() {
        let md = markdown(&summary());
        assert!(
            md.contains("| council | 2 | 62.5 % | 25 / 40 | 1 | 3 |"),
            "{md}"
        );
        assert!(
            md.contains("| self_refine | 0 | 50.0 % | 20 / 40 | 1 | 3 |"),
            "{md}"
        );
        let budget = "| majority | tokens | 120 | 118 | 48000 | 47250 | 2.95 |";
        assert!(md.contains(budget), "{md}");
        assert!(md.contains("| council | 7.250 | 1.500 |"), "{md}");
    }

    #[test]
    fn the_pool_oracle_sits_beside_the_pooled_arms() {
        let mut summary = summary();
        assert!(
            !markdown(&summary).contains("## Pool oracle"),
            "no pool, no section"
        );
        let council = summary
            .arms
            .iter_mut()
            .find(|a| a.arm == Arm::Council)
            .expect("council");
        council.pool = Some(crate::eval::summary::PoolSummary {
            runs: 40,
            first_correct: 30,
            first_accuracy: 0.75,
            last_correct: 28,
            last_accuracy: 0.7,
            picked_correct: 25,
            lost_by_picking: 3,
            lost_in_review: 4,
        });
        let md = markdown(&summary);
        assert!(md.contains("## Pool oracle"), "{md}");
        let row = "| council | 40 | 30 (75.0 %) | 28 (70.0 %) | 25 (62.5 %) | 3 | 4 |";
        assert!(md.contains(row), "{md}");
        assert!(md.contains("*Lost by picking*"), "{md}");
    }

    #[test]
    fn comparisons_show_counts_difference_p_and_interval() {
        let md = markdown(&summary());
        let row = "| council vs single | 40 | 18 | 7 | 2 | 13 | +12.5 | 0.180 | [-2.5, +27.5] |";
        assert!(md.contains(row), "{md}");
        assert!(md.contains("| 1.00 | [-10.0, +15.0] |"), "{md}");
        assert!(md.contains("| 1.23e-5 |"), "{md}");
    }

    #[test]
    fn links_the_plots_and_explains() {
        let md = markdown(&summary());
        for link in [
            "(plots/accuracy.svg)",
            "(plots/rounds.svg)",
            "(plots/tokens.svg)",
        ] {
            assert!(md.contains(link), "no {link} in\n{md}");
        }
        assert!(md.contains("## How to read this"));
        assert!(md.contains("counts as wrong"));
    }

    #[test]
    fn empty_sections_are_left_out() {
        let md = markdown(&empty_summary());
        for title in [
            "## Accuracy by round",
            "## Majority budget",
            "## Paired comparisons",
            "## Free-form",
        ] {
            assert!(!md.contains(title), "{title} in\n{md}");
        }
        assert!(md.contains("## Results by arm"));
        assert!(md.contains("(plots/tokens.svg)"));
    }

    #[test]
    fn pipes_in_cells_are_escaped() {
        let mut summary = summary();
        summary.run.source = "tasks|v2.jsonl".to_string();
        assert!(markdown(&summary).contains("| source | tasks\\|v2.jsonl |"));
    }

    #[test]
    fn three_significant_digits() {
        assert_eq!(significant3(0.04321), "0.0432");
        assert_eq!(significant3(0.5), "0.500");
        assert_eq!(significant3(1.0), "1.00");
        assert_eq!(significant3(0.09996), "0.100");
        assert_eq!(significant3(0.001), "0.00100");
        assert_eq!(significant3(0.000_012_34), "1.23e-5");
        assert_eq!(significant3(0.0), "0");
    }
}
