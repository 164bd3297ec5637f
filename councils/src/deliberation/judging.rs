//! The score phase: the judging calls (a written ranking and rubric scores per judge, or
//! rankings and rubric scores read off log-probabilities), what their replies add to the
//! judgements, and the ranking of the proposals that ends a deliberation.

use std::collections::BTreeMap;

use super::labels::{label, split_sections};
use super::{CallKind, CallMeta, Deliberation, NewCall};
use crate::aggregate::{self, Ballot};
use crate::checks::{CheckReport, pass_rate};
use crate::outcome::{Decision, Judging, MethodScores, Outcome, RankedProposal};
use crate::parse::{extract_answer, parse_ranking, parse_scores};
use crate::prompts;
use crate::rng::{SplitMix, mix};
use crate::spec::JudgeMode;

/// Scores gathered in the score phase.
#[derive(Debug, Clone, Default)]
pub(super) struct Judgements {
    pub(super) ballots: Vec<Ballot>,
    /// (author, criterion) -> scores in [0, 1] from each judge.
    pub(super) rubric: BTreeMap<(usize, usize), Vec<f64>>,
    /// Log-prob rankings by judge: for each presentation order, the log-probability (normalised
    /// over the labels) that each author's proposal is the best; `None` once one of the judge's
    /// orders could not be read.
    pub(super) listwise: BTreeMap<usize, Option<Vec<Order>>>,
    /// Asked and read, ranking by log-probs aside (counted when the ballots are formed).
    pub(super) counts: Judging,
}

/// One presentation order of a log-prob ranking: (author, normalised log-probability that its
/// proposal is the best) for each peer shown.
type Order = Vec<(usize, f64)>;

impl Judgements {
    /// Every ballot: the parsed text rankings, then one per judge whose every presentation
    /// order was read, ordering the peers by their mean normalised log-probability of being
    /// the best. A judge whose means tie exactly gives no ballot (a tie is not an order).
    pub(super) fn ballots(&self) -> (Vec<Ballot>, Judging) {
        let mut ballots = self.ballots.clone();
        let mut counts = self.counts;
        for (&judge, orders) in &self.listwise {
            counts.rankings_asked += 1;
            let Some(orders) = orders else { continue };
            let mut mean: BTreeMap<usize, f64> = BTreeMap::new();
            for order in orders {
                for &(author, lp) in order {
                    *mean.entry(author).or_default() += lp / orders.len() as f64;
                }
            }
            let mut order: Vec<(usize, f64)> = mean.into_iter().collect();
            order.sort_by(|a, b| b.1.total_cmp(&a.1));
            if order.windows(2).any(|w| w[0].1 == w[1].1) {
                continue;
            }
            counts.rankings_read += 1;
            ballots.push(Ballot {
                voter: Some(judge),
                order: order.into_iter().map(|(a, _)| a).collect(),
            });
        }
        (ballots, counts)
    }
}

/// The log-probabilities of `logprobs` normalised over themselves (a log-softmax); `None`
/// unless every one is finite.
fn normalised(logprobs: &[f64]) -> Option<Vec<f64>> {
    if logprobs.is_empty() || !logprobs.iter().all(|l| l.is_finite()) {
        return None;
    }
    let top = logprobs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = logprobs.iter().map(|l| (l - top).exp()).sum();
    let log_total = top + total.ln();
    Some(logprobs.iter().map(|l| l - log_total).collect())
}

/// Steepness of the Bradley-Terry margin on combined scores in [0, 1].
const MARGIN_SCALE: f64 = 10.0;

impl Deliberation {
    /// Takes a rubric score read off the log-probabilities of "1".."10" (`None` when the
    /// backend gave none that can be read).
    pub(super) fn apply_choice(
        &mut self,
        author: usize,
        criterion: usize,
        logprobs: Option<&[f64]>,
    ) {
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        let expected = logprobs.and_then(|lp| aggregate::expected_score(&values, lp));
        self.judgements.counts.scores_asked += 1;
        if let Some(e) = expected {
            self.judgements.counts.scores_read += 1;
            self.judgements
                .rubric
                .entry((author, criterion))
                .or_default()
                .push((e - 1.0) / 9.0);
        }
    }

    /// Takes one presentation order of judge `judge`'s log-prob ranking; an order that cannot
    /// be read voids the judge's ranking.
    pub(super) fn apply_rank(
        &mut self,
        judge: usize,
        authors: Vec<usize>,
        logprobs: Option<&[f64]>,
    ) {
        let read = logprobs
            .filter(|lp| lp.len() == authors.len())
            .and_then(normalised);
        let entry = self
            .judgements
            .listwise
            .entry(judge)
            .or_insert_with(|| Some(Vec::new()));
        match (read, entry.as_mut()) {
            (Some(lp), Some(orders)) => orders.push(authors.into_iter().zip(lp).collect()),
            _ => *entry = None,
        }
    }

    /// Counts a judgement whose call failed or came back empty: asked, not read.
    pub(super) fn count_unread(&mut self, judge: usize, meta: &CallMeta) {
        let counts = &mut self.judgements.counts;
        match meta {
            CallMeta::Score { labels, .. } => {
                counts.rankings_asked += 1;
                if self.config.judge == JudgeMode::Text {
                    counts.scores_asked += (labels.len() * self.criteria.len()) as u64;
                }
            }
            CallMeta::Choice { .. } => counts.scores_asked += 1,
            CallMeta::Rank { .. } => {
                self.judgements.listwise.insert(judge, None);
            }
            CallMeta::Propose | CallMeta::Critique { .. } | CallMeta::Revise => {}
        }
    }

    pub(super) fn apply_score(
        &mut self,
        judge: usize,
        text: &str,
        labels: &[String],
        authors: &[usize],
    ) {
        self.judgements.counts.rankings_asked += 1;
        if let Some(order) = parse_ranking(text, labels) {
            self.judgements.counts.rankings_read += 1;
            let order = order.into_iter().map(|i| authors[i]).collect();
            self.judgements.ballots.push(Ballot {
                voter: Some(judge),
                order,
            });
        }
        if self.config.judge == JudgeMode::Text {
            self.judgements.counts.scores_asked += (labels.len() * self.criteria.len()) as u64;
            for (section, &author) in split_sections(text, labels).iter().zip(authors) {
                let Some(section) = section else { continue };
                for (criterion, score) in parse_scores(section, &self.criteria)
                    .into_iter()
                    .enumerate()
                {
                    if let Some(s) = score {
                        self.judgements.counts.scores_read += 1;
                        self.judgements
                            .rubric
                            .entry((author, criterion))
                            .or_default()
                            .push((s - 1.0) / 9.0);
                    }
                }
            }
        }
    }

    pub(super) fn score_calls(&self) -> Vec<NewCall> {
        let working = self.working();
        if working.len() < 2 {
            return Vec::new();
        }
        let mut calls = Vec::new();
        for &judge in &working {
            let others: Vec<usize> = working.iter().copied().filter(|&a| a != judge).collect();
            let mut authors = others;
            SplitMix::new(mix(&[self.seed, 3, u64::from(self.round), judge as u64]))
                .shuffle(&mut authors);
            let labels: Vec<String> = (0..authors.len()).map(label).collect();
            let peers = self.labelled(&labels, &authors);
            let agent = &self.council.agents[judge];
            if self.config.judge == JudgeMode::LogProb {
                // The ranking: which peer is best, asked in the shuffled order and in its
                // reverse, so that neither the first place nor the first letter can decide.
                if authors.len() >= 2 {
                    let reversed: Vec<usize> = authors.iter().rev().copied().collect();
                    for order in [authors.clone(), reversed] {
                        let shown = self.labelled(&labels, &order);
                        let messages = prompts::judge_rank(
                            agent,
                            &self.task,
                            &shown,
                            &self.criteria,
                            self.round,
                        );
                        calls.push((
                            judge,
                            messages,
                            CallMeta::Rank { authors: order },
                            CallKind::ScoreChoices {
                                choices: labels.clone(),
                            },
                        ));
                    }
                }
                for (l, &author) in labels.iter().zip(&authors) {
                    let text = self.agents[author].proposal.as_deref().unwrap_or_default();
                    for (ci, criterion) in self.criteria.iter().enumerate() {
                        let messages = prompts::judge_choice(
                            agent, &self.task, l, text, criterion, self.round,
                        );
                        let choices = (1..=10).map(|v| v.to_string()).collect();
                        calls.push((
                            judge,
                            messages,
                            CallMeta::Choice {
                                author,
                                criterion: ci,
                            },
                            CallKind::ScoreChoices { choices },
                        ));
                    }
                }
                continue;
            }
            let messages = prompts::score(agent, &self.task, &peers, &self.criteria, self.round);
            calls.push((
                judge,
                messages,
                CallMeta::Score { labels, authors },
                CallKind::Generate,
            ));
        }
        calls
    }

    pub(super) fn ranked(&self, base: Outcome) -> Outcome {
        let working = self.working();
        let n = self.agents.len();
        let (ballots, _) = self.judgements.ballots();
        let has_ballots = !ballots.is_empty();
        let borda = aggregate::borda(n, &ballots);
        let copeland = aggregate::copeland(n, &ballots);
        let answers: Vec<Option<String>> = working
            .iter()
            .map(|&i| {
                let format = self.task.answer_format.as_ref()?;
                extract_answer(self.agents[i].proposal.as_deref()?, format)
            })
            .collect();
        let majority = self
            .task
            .answer_format
            .as_ref()
            .map(|_| aggregate::majority_vote(&answers));
        let w = self.config.weights;
        let mut proposals = Vec::with_capacity(working.len());
        for (k, &i) in working.iter().enumerate() {
            let content = self.agents[i].proposal.clone().unwrap_or_default();
            let checks: Vec<CheckReport> = self
                .checks
                .iter()
                .map(|c| CheckReport {
                    name: c.name().to_owned(),
                    status: c.run(&self.task, &content),
                })
                .collect();
            let rubric: Vec<f64> = (0..self.criteria.len())
                .filter_map(|c| self.judgements.rubric.get(&(i, c)))
                .flatten()
                .copied()
                .collect();
            let scores = MethodScores {
                peer_ranking: has_ballots.then(|| borda[i]),
                condorcet: has_ballots.then(|| copeland[i]),
                rubric: (!rubric.is_empty())
                    .then(|| rubric.iter().sum::<f64>() / rubric.len() as f64),
                majority: majority
                    .as_ref()
                    .filter(|m| m.winner.is_some())
                    .map(|m| f64::from(u8::from(m.agrees[k]))),
                checks: pass_rate(&checks),
            };
            let score = aggregate::combine(&[
                (w.peer_ranking, scores.peer_ranking),
                (w.rubric, scores.rubric),
                (w.majority, scores.majority),
                (w.checks, scores.checks),
            ])
            .unwrap_or(0.0);
            let spec = &self.council.agents[i];
            proposals.push(RankedProposal {
                agent: spec.id.clone(),
                role: spec.role.clone(),
                content,
                revisions: self.agents[i].revisions.clone(),
                rank: 0,
                score,
                scores,
                answer: answers[k].clone(),
                checks,
                round: self.agents[i].round,
            });
        }
        // Ties: Condorcet (Copeland) score, then a seeded hash of the agent id.
        let primary: Vec<f64> = proposals.iter().map(|p| p.score).collect();
        let secondary: Vec<f64> = proposals
            .iter()
            .map(|p| p.scores.condorcet.unwrap_or(0.0))
            .collect();
        let keys: Vec<u64> = proposals
            .iter()
            .map(|p| mix(&[self.seed, crate::rng::hash_str(p.agent.as_str())]))
            .collect();
        let order = aggregate::rank_order(&primary, &secondary, &keys);
        let mut ranked: Vec<RankedProposal> = order.iter().map(|&j| proposals[j].clone()).collect();
        for (r, p) in ranked.iter_mut().enumerate() {
            p.rank = r as u32 + 1;
        }
        let margin = match ranked.as_slice() {
            [] => None,
            [_] => Some(1.0),
            [a, b, ..] => Some(aggregate::win_probability(a.score, b.score, MARGIN_SCALE)),
        };
        let decided_by = match ranked.as_slice() {
            [] => None,
            [_] => Some(Decision::Alone),
            [a, b, ..] if a.score != b.score => Some(Decision::Score),
            [a, b, ..]
                if a.scores.condorcet.unwrap_or(0.0) != b.scores.condorcet.unwrap_or(0.0) =>
            {
                Some(Decision::Condorcet)
            }
            _ => Some(Decision::TieBreak),
        };
        Outcome {
            winner: ranked.first().map(|p| p.agent.clone()),
            decided_by,
            margin,
            majority_answer: majority.and_then(|m| m.winner),
            proposals: ranked,
            ..base
        }
    }
}
