//! Generated evaluation suites: small, automatically checkable problems (arithmetic, nested
//! arithmetic, Game of 24, last-letter concatenation, grade-school word problems).
//!
//! Generation is deterministic: item k depends only on (suite, seed, k), never on how many items
//! were asked for, so a shorter run is a prefix of a longer one and runs can be compared item by
//! item. Prompts state the problem only; the answer-format instruction is added by the caller.

use std::fmt;
use std::str::FromStr;

use council_councils::parse::AnswerFormat;
use council_councils::rng::{SplitMix, hash_str, mix};

use super::game24;
use super::item::{EvalItem, Expected};

/// A generated suite of evaluation items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suite {
    /// Flat integer expressions `a+b*c+d-e*f` testing operator precedence.
    Arithmetic,
    /// Nested integer expressions with 3–5 operations and parentheses.
    Multistep,
    /// Game of 24 on solvable hands of four numbers from 1 to 13.
    Game24,
    /// Concatenate the last letters of 2–4 names.
    LastLetters,
    /// Grade-school word problems with integer answers.
    WordProblems,
}

impl Suite {
    /// Every suite, in a stable order.
    pub const ALL: [Suite; 5] = [
        Suite::Arithmetic,
        Suite::Multistep,
        Suite::Game24,
        Suite::LastLetters,
        Suite::WordProblems,
    ];

    /// The suite's name on the command line, in item ids and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Suite::Arithmetic => "arithmetic",
            Suite::Multistep => "multistep",
            Suite::Game24 => "game24",
            Suite::LastLetters => "last_letters",
            Suite::WordProblems => "word_problems",
        }
    }
}

impl FromStr for Suite {
    type Err = String;

    /// Parses a suite name (case-insensitive; '-' may stand for '_').
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace('-', "_");
        Suite::ALL
            .into_iter()
            .find(|suite| suite.as_str() == wanted)
            .ok_or_else(|| {
                let names: Vec<&str> = Suite::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown suite {s:?}; valid suites: {}", names.join(", "))
            })
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first `limit` items of `suite` for `seed`. Item k depends only on (suite, seed, k).
pub fn generate(suite: Suite, limit: usize, seed: u64) -> Vec<EvalItem> {
    (0..limit).map(|k| item(suite, seed, k)).collect()
}

fn item(suite: Suite, seed: u64, k: usize) -> EvalItem {
    let mut draw = Draw(SplitMix::new(mix(&[
        seed,
        hash_str(suite.as_str()),
        k as u64,
    ])));
    let problem = match suite {
        Suite::Arithmetic => arithmetic(&mut draw),
        Suite::Multistep => multistep(&mut draw),
        Suite::Game24 => game24_hand(&mut draw),
        Suite::LastLetters => last_letters(&mut draw),
        Suite::WordProblems => word_problem(&mut draw),
    };
    EvalItem {
        id: format!("{suite}-{k:05}"),
        suite: suite.as_str().to_owned(),
        prompt: problem.prompt,
        answer_format: Some(problem.format),
        expected: Some(problem.expected),
        role: None,
        rubric: String::new(),
        requirements: Vec::new(),
    }
}

/// A generated problem before it becomes an item.
#[derive(Debug)]
struct Problem {
    prompt: String,
    format: AnswerFormat,
    expected: Expected,
}

impl Problem {
    fn integer(prompt: String, answer: i64) -> Self {
        Self {
            prompt,
            format: AnswerFormat::Integer,
            expected: Expected::Exact {
                answer: answer.to_string(),
            },
        }
    }
}

/// Uniform draws from one item's generator.
#[derive(Debug)]
struct Draw(SplitMix);

impl Draw {
    /// A value in `lo..=hi` (modulo bias is negligible for these tiny ranges).
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        let span = (hi - lo + 1) as u64;
        lo + (self.0.next_u64() % span) as i64
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.0.next_u64() % items.len() as u64) as usize]
    }

    fn coin(&mut self) -> bool {
        self.0.next_u64() & 1 == 1
    }

    /// `count` different names.
    fn names(&mut self, count: usize) -> Vec<&'static str> {
        let mut names = Vec::with_capacity(count);
        while names.len() < count {
            let name = self.pick(NAMES);
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }
}

/// Common first names, ASCII only so lowercasing is unambiguous.
const NAMES: &[&str] = &[
    "Ada", "Alice", "Amir", "Bella", "Bob", "Carol", "Chen", "David", "Diego", "Elena", "Emma",
    "Farid", "Frank", "George", "Grace", "Greta", "Hannah", "Hugo", "Ingrid", "Isaac", "Jamal",
    "Julia", "Keiko", "Kevin", "Laura", "Leon", "Linus", "Maya", "Michael", "Nina", "Noah",
    "Olivia", "Oscar", "Paul", "Priya", "Quinn", "Rachel", "Raj", "Sara", "Simon", "Tessa",
    "Tomas", "Uma", "Victor", "Wei", "Wendy", "Xavier", "Yara", "Yusuf", "Zoe",
];

fn arithmetic(draw: &mut Draw) -> Problem {
    let [a, b, c, d, e, f] = std::array::from_fn(|_| draw.int(0, 29));
    let value = a + b * c + d - e * f;
    Problem::integer(format!("What is {a}+{b}*{c}+{d}-{e}*{f}?"), value)
}

/// A subexpression: its text, value and height in operations (0 for a number).
#[derive(Debug, Clone)]
struct Node {
    text: String,
    value: i64,
    height: u32,
}

impl Node {
    fn leaf(draw: &mut Draw) -> Self {
        let value = draw.int(1, 20);
        Self {
            text: value.to_string(),
            value,
            height: 0,
        }
    }

    /// The text as an operand: every operation is parenthesised, so nothing hinges on precedence.
    fn operand(&self) -> String {
        if self.height == 0 {
            self.text.clone()
        } else {
            format!("({})", self.text)
        }
    }

    /// `left op right` with a random operator; a product that would be large becomes a sum or
    /// difference, to keep the numbers small.
    fn join(draw: &mut Draw, left: &Node, right: &Node) -> Node {
        let mut op = draw.pick(&['+', '-', '*']);
        if op == '*' && (left.value * right.value).abs() > 300 {
            op = if draw.coin() { '+' } else { '-' };
        }
        let value = match op {
            '+' => left.value + right.value,
            '-' => left.value - right.value,
            _ => left.value * right.value,
        };
        Node {
            text: format!("{} {op} {}", left.operand(), right.operand()),
            value,
            height: 1 + left.height.max(right.height),
        }
    }
}

/// 3–5 operations; the first three form a chain, so parentheses nest at least two deep.
fn multistep(draw: &mut Draw) -> Problem {
    let (a, b) = (Node::leaf(draw), Node::leaf(draw));
    let mut tree = Node::join(draw, &a, &b);
    let mut ops_left = draw.int(3, 5) - 1;
    while ops_left > 0 {
        let other = if tree.height >= 3 && ops_left >= 2 && draw.coin() {
            ops_left -= 2;
            let (a, b) = (Node::leaf(draw), Node::leaf(draw));
            Node::join(draw, &a, &b)
        } else {
            ops_left -= 1;
            Node::leaf(draw)
        };
        tree = if draw.coin() {
            Node::join(draw, &tree, &other)
        } else {
            Node::join(draw, &other, &tree)
        };
    }
    Problem::integer(format!("What is the value of {}?", tree.text), tree.value)
}

/// Draws hands until one is solvable; about three in four are, so this ends quickly, and the
/// draws come from the item's own generator, so the result is deterministic.
fn game24_hand(draw: &mut Draw) -> Problem {
    let numbers = loop {
        let hand: [u32; 4] = std::array::from_fn(|_| draw.int(1, 13) as u32);
        if game24::solve(&hand).is_some() {
            break hand;
        }
    };
    let [a, b, c, d] = numbers;
    let prompt = format!(
        "Use the numbers {a}, {b}, {c} and {d}, each exactly once, with +, -, *, / and \
         parentheses to make an expression whose value is exactly 24. Give the expression \
         itself as your answer, not the number 24."
    );
    Problem {
        prompt,
        format: AnswerFormat::Text,
        expected: Expected::Game24 { numbers },
    }
}

fn last_letters(draw: &mut Draw) -> Problem {
    let count = draw.int(2, 4) as usize;
    let words = draw.names(count);
    let answer: String = words
        .iter()
        .filter_map(|w| w.chars().last())
        .flat_map(char::to_lowercase)
        .collect();
    let prompt = format!(
        "Take the last letter of each word in \"{}\" and concatenate them.",
        words.join(" ")
    );
    Problem {
        prompt,
        format: AnswerFormat::Text,
        expected: Expected::Exact { answer },
    }
}

/// A word-problem template: the prompt and its answer, always a non-negative integer.
type Template = fn(&mut Draw) -> (String, i64);

const TEMPLATES: [Template; 7] = [shopping, sharing, rates, ages, savings, recipe, garden];

fn word_problem(draw: &mut Draw) -> Problem {
    let template = draw.pick(&TEMPLATES);
    let (prompt, answer) = template(draw);
    Problem::integer(prompt, answer)
}

fn shopping(draw: &mut Draw) -> (String, i64) {
    let name = draw.pick(NAMES);
    let (count, price, bag) = (draw.int(2, 9), draw.int(2, 15), draw.int(3, 30));
    let cost = count * price + bag;
    // A round amount above the cost, so the change is positive.
    let paid = (cost / 10 + draw.int(1, 5)) * 10;
    let prompt = format!(
        "{name} buys {count} notebooks that cost {price} dollars each and a backpack that costs \
         {bag} dollars. {name} pays with {paid} dollars. How many dollars of change does {name} \
         get back?"
    );
    (prompt, paid - cost)
}

fn sharing(draw: &mut Draw) -> (String, i64) {
    let (students, share) = (draw.int(2, 9), draw.int(2, 12));
    let total = students * share;
    // total is a product of two factors >= 2, so it has a divisor in 2..=total/2.
    let sizes: Vec<i64> = (2..=total / 2).filter(|d| total % d == 0).collect();
    let per_box = draw.pick(&sizes);
    let boxes = total / per_box;
    let prompt = format!(
        "A teacher has {boxes} boxes of crayons with {per_box} crayons in each box. She shares \
         all the crayons equally among {students} students. How many crayons does each student \
         get?"
    );
    (prompt, share)
}

fn rates(draw: &mut Draw) -> (String, i64) {
    let (per_minute, hours, minutes) = (draw.int(2, 12), draw.int(1, 3), draw.int(1, 59));
    let prompt = format!(
        "A machine fills {per_minute} bottles every minute. How many bottles does it fill in \
         {hours} hours and {minutes} minutes?"
    );
    (prompt, per_minute * (60 * hours + minutes))
}

fn ages(draw: &mut Draw) -> (String, i64) {
    let names = draw.names(3);
    let (a, b, c) = (names[0], names[1], names[2]);
    let age = draw.int(4, 30);
    let mut gap = draw.int(2, 20);
    // B's age must be even so that "half as old" is a whole number.
    gap += (age + gap) % 2;
    let years = draw.int(1, 10);
    let prompt = format!(
        "{a} is {age} years old. {b} is {gap} years older than {a}, and {c} is half as old as \
         {b}. How old will {c} be in {years} years?"
    );
    (prompt, (age + gap) / 2 + years)
}

fn savings(draw: &mut Draw) -> (String, i64) {
    let name = draw.pick(NAMES);
    let (weekly, weeks) = (draw.int(5, 25), draw.int(3, 12));
    let saved = weekly * weeks;
    let bike = draw.int(saved / 3, saved);
    let prompt = format!(
        "{name} saves {weekly} dollars every week for {weeks} weeks and then spends {bike} \
         dollars on a bike. How many dollars does {name} have left?"
    );
    (prompt, saved - bike)
}

fn recipe(draw: &mut Draw) -> (String, i64) {
    let (eggs, batch, times) = (draw.int(2, 6), draw.int(4, 12), draw.int(2, 6));
    let pancakes = batch * times;
    let prompt = format!(
        "A recipe uses {eggs} eggs to make {batch} pancakes. How many eggs are needed to make \
         {pancakes} pancakes?"
    );
    (prompt, eggs * times)
}

fn garden(draw: &mut Draw) -> (String, i64) {
    let name = draw.pick(NAMES);
    let (rows, per_row) = (draw.int(3, 12), draw.int(4, 15));
    let picked = draw.int(1, rows * per_row);
    let planted = draw.int(1, 30);
    let prompt = format!(
        "A garden has {rows} rows of tulips with {per_row} tulips in each row. {name} picks \
         {picked} tulips for a bouquet and then plants {planted} new tulips. How many tulips are \
         in the garden now?"
    );
    (prompt, rows * per_row - picked + planted)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use council_councils::parse::extract_answer;

    use super::*;

    const SEEDS: [u64; 3] = [0, 1, 42];
    const COUNT: usize = 200;

    /// Every (suite, seed) batch of `COUNT` items.
    fn batches() -> Vec<(Suite, u64, Vec<EvalItem>)> {
        Suite::ALL
            .into_iter()
            .flat_map(|suite| SEEDS.map(|seed| (suite, seed, generate(suite, COUNT, seed))))
            .collect()
    }

    fn exact_answer(item: &EvalItem) -> &str {
        match &item.expected {
            Some(Expected::Exact { answer }) => answer,
            other => panic!("{}: expected an exact answer, got {other:?}", item.id),
        }
    }

    fn game24_numbers(item: &EvalItem) -> [u32; 4] {
        match &item.expected {
            Some(Expected::Game24 { numbers }) => *numbers,
            other => panic!("{}: expected a Game24 answer, got {other:?}", item.id),
        }
    }

    /// The integers written in `text`, in order.
    fn integers_in(text: &str) -> Vec<i64> {
        text.split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("small integer"))
            .collect()
    }

    /// The expression in "What is ...?": from the first digit or '(' to the final '?'.
    fn expression_in(prompt: &str) -> &str {
        let start = prompt
            .find(|c: char| c.is_ascii_digit() || c == '(')
            .expect("prompt has an expression");
        let end = prompt.rfind('?').expect("prompt ends with a question");
        &prompt[start..end]
    }

    /// Evaluates the prompt's expression with the independent Game-of-24 parser.
    fn evaluated(prompt: &str) -> String {
        let (value, _) = game24::evaluate(expression_in(prompt)).expect("expression parses");
        assert_eq!(value.denom(), 1, "{prompt}");
        value.numer().to_string()
    }

    #[test]
    fn suite_names_round_trip() {
        for suite in Suite::ALL {
            assert_eq!(suite.as_str().parse::<Suite>(), Ok(suite));
            assert_eq!(suite.to_string(), suite.as_str());
        }
        assert_eq!("Last-Letters".parse::<Suite>(), Ok(Suite::LastLetters));
        let err = "chess".parse::<Suite>().expect_err("unknown suite");
        assert!(err.contains("\"chess\""), "{err}");
        for suite in Suite::ALL {
            assert!(err.contains(suite.as_str()), "{err}");
        }
    }

    #[test]
    fn items_have_unique_ids_and_fixed_fields() {
        for (suite, seed, items) in batches() {
            assert_eq!(items.len(), COUNT);
            let ids: HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
            assert_eq!(ids.len(), COUNT, "{suite} seed {seed}");
            for (k, item) in items.iter().enumerate() {
                assert_eq!(item.id, format!("{}-{k:05}", suite.as_str()));
                assert_eq!(item.suite, suite.as_str());
                assert!(item.answer_format.is_some() && item.expected.is_some());
                assert!(item.role.is_none() && item.rubric.is_empty());
                assert!(item.requirements.is_empty());
                assert!(!item.prompt.contains("ANSWER"), "{}", item.prompt);
            }
        }
        assert_eq!(generate(Suite::Game24, 4, 0)[3].id, "game24-00003");
    }

    #[test]
    fn generation_is_deterministic_and_prefix_stable() {
        for (suite, seed, items) in batches() {
            assert_eq!(generate(suite, COUNT, seed), items, "{suite} seed {seed}");
            assert_eq!(
                generate(suite, 10, seed),
                items[..10],
                "{suite} seed {seed}"
            );
            assert_eq!(generate(suite, 0, seed), Vec::new());
        }
    }

    #[test]
    fn seeds_and_items_differ() {
        for suite in Suite::ALL {
            let [a, b, c] = SEEDS.map(|seed| generate(suite, COUNT, seed));
            for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
                let differing = x
                    .iter()
                    .zip(y)
                    .filter(|(p, q)| p.prompt != q.prompt)
                    .count();
                assert!(differing > COUNT * 9 / 10, "{suite}: {differing}");
            }
            let distinct: HashSet<&str> = a.iter().map(|i| i.prompt.as_str()).collect();
            assert!(
                distinct.len() > COUNT * 9 / 10,
                "{suite}: {}",
                distinct.len()
            );
        }
    }

    #[test]
    fn arithmetic_answers_match_an_independent_evaluation() {
        for seed in SEEDS {
            for item in generate(Suite::Arithmetic, COUNT, seed) {
                let expression = expression_in(&item.prompt);
                let numbers = integers_in(expression);
                assert_eq!(numbers.len(), 6, "{}", item.prompt);
                assert!(numbers.iter().all(|n| (0..=29).contains(n)));
                let ops: String = expression.chars().filter(|c| !c.is_ascii_digit()).collect();
                assert_eq!(ops, "+*+-*", "{}", item.prompt);
                assert_eq!(item.answer_format, Some(AnswerFormat::Integer));
                assert_eq!(exact_answer(&item), evaluated(&item.prompt));
            }
        }
    }

    /// Deepest parenthesis nesting in `text`.
    fn nesting(text: &str) -> i32 {
        text.chars()
            .scan(0, |depth, c| {
                *depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                Some(*depth)
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn multistep_answers_match_an_independent_evaluation() {
        for seed in SEEDS {
            for item in generate(Suite::Multistep, COUNT, seed) {
                let expression = expression_in(&item.prompt);
                let ops = expression.chars().filter(|c| "+-*".contains(*c)).count();
                assert!((3..=5).contains(&ops), "{expression}");
                assert!(nesting(expression) >= 2, "{expression}");
                assert!(integers_in(expression).iter().all(|n| (1..=20).contains(n)));
                assert_eq!(item.answer_format, Some(AnswerFormat::Integer));
                assert_eq!(exact_answer(&item), evaluated(&item.prompt));
            }
        }
    }

    #[test]
    fn game24_hands_are_solvable_and_shown_in_order() {
        for seed in SEEDS {
            for item in generate(Suite::Game24, COUNT, seed) {
                let numbers = game24_numbers(&item);
                assert!(numbers.iter().all(|n| (1..=13).contains(n)), "{numbers:?}");
                let shown: Vec<i64> = integers_in(&item.prompt);
                let expected: Vec<i64> = numbers.iter().map(|&n| i64::from(n)).collect();
                assert_eq!(shown[..4], expected[..], "{}", item.prompt);
                assert_eq!(shown[4..], [24, 24], "{}", item.prompt);
                let solution = game24::solve(&numbers).expect("only solvable hands");
                assert_eq!(game24::verify(&numbers, &solution), Ok(()));
                assert_eq!(item.answer_format, Some(AnswerFormat::Text));
            }
        }
    }

    #[test]
    fn last_letters_match_the_quoted_words() {
        for seed in SEEDS {
            for item in generate(Suite::LastLetters, COUNT, seed) {
                let quoted = item.prompt.split('"').nth(1).expect("quoted words");
                let words: Vec<&str> = quoted.split(' ').collect();
                assert!((2..=4).contains(&words.len()), "{quoted}");
                let letters: String = words
                    .iter()
                    .map(|w| w.chars().last().expect("non-empty word"))
                    .collect::<String>()
                    .to_lowercase();
                assert_eq!(exact_answer(&item), letters);
                assert_eq!(item.answer_format, Some(AnswerFormat::Text));
            }
        }
        assert!(NAMES.len() >= 40);
        assert_eq!(NAMES.iter().collect::<HashSet<_>>().len(), NAMES.len());
    }

    /// Recomputes a word problem's answer from the numbers in its prompt, recognising the
    /// template by a phrase; None for an unknown template or a non-integer step.
    fn recompute(prompt: &str) -> Option<(&'static str, i64)> {
        let n = integers_in(prompt);
        let exact = |a: i64, b: i64| (a % b == 0).then(|| a / b);
        let answer = if prompt.contains("change") {
            ("shopping", n[3] - (n[0] * n[1] + n[2]))
        } else if prompt.contains("crayons") {
            ("sharing", exact(n[0] * n[1], n[2])?)
        } else if prompt.contains("bottles") {
            ("rates", n[0] * (60 * n[1] + n[2]))
        } else if prompt.contains("half as old") {
            ("ages", exact(n[0] + n[1], 2)? + n[2])
        } else if prompt.contains("saves") {
            ("savings", n[0] * n[1] - n[2])
        } else if prompt.contains("pancakes") {
            ("recipe", exact(n[0] * n[2], n[1])?)
        } else if prompt.contains("tulips") {
            ("garden", n[0] * n[1] - n[2] + n[3])
        } else {
            return None;
        };
        Some(answer)
    }

    #[test]
    fn word_problem_answers_are_recomputed_from_the_prompt() {
        let mut templates = HashSet::new();
        for seed in SEEDS {
            for item in generate(Suite::WordProblems, COUNT, seed) {
                let answer = exact_answer(&item);
                let value: i64 = answer.parse().expect("integer answer");
                assert!(value >= 0 && value.to_string() == answer, "{answer}");
                let (template, recomputed) = recompute(&item.prompt).expect("known template");
                assert_eq!(recomputed, value, "{}", item.prompt);
                assert_eq!(item.answer_format, Some(AnswerFormat::Integer));
                templates.insert(template);
            }
        }
        assert_eq!(templates.len(), TEMPLATES.len(), "{templates:?}");
    }

    #[test]
    fn answers_round_trip_through_the_real_extraction() {
        for (suite, seed, items) in batches() {
            for item in items {
                let expected = item.expected.as_ref().expect("known answer");
                let answer = match expected {
                    Expected::Exact { answer } => answer.clone(),
                    Expected::Game24 { numbers } => game24::solve(numbers).expect("solvable"),
                };
                let reply = format!("Working...\nANSWER: {answer}");
                let format = item.answer_format.as_ref().expect("declared format");
                let extracted = extract_answer(&reply, format)
                    .unwrap_or_else(|| panic!("{suite} seed {seed}: nothing in {reply:?}"));
                assert!(expected.is_correct(&extracted), "{}: {extracted}", item.id);
            }
        }
    }
}
