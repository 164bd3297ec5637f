//! Game of 24: expression parsing with exact rational arithmetic, the verifier, the solver.
//!
//! Answers are untrusted model text, so nothing here panics on any input: nesting is bounded
//! and every operation is checked. The arithmetic is exact because floats would misjudge
//! answers such as `8 / (3 - 8 / 3)`, which is 24 only with exact fractions.

use std::fmt;

/// The value every solution must reach.
const TARGET: Rational = Rational::integer(24);

/// Deepest parenthesis nesting accepted; bounds the parser's recursion on hostile input.
const MAX_DEPTH: usize = 64;

/// Why an expression is not a solution.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Game24Error {
    /// Nothing but whitespace (or a bare "= 24").
    #[error("the expression is empty")]
    Empty,
    /// Not an arithmetic expression; `at` counts characters from the start.
    #[error("cannot parse the expression at character {at}: {reason}")]
    Parse { at: usize, reason: String },
    /// The numbers used are not the puzzle's numbers, each exactly once.
    #[error("the expression uses {used:?}, but must use each of {expected:?} exactly once")]
    WrongNumbers { expected: Vec<u32>, used: Vec<u32> },
    /// A well-formed expression with the right numbers but another value.
    #[error("the expression equals {value}, not 24")]
    NotTwentyFour { value: String },
    /// Some division has a zero divisor.
    #[error("the expression divides by zero")]
    DivisionByZero,
    /// An intermediate value does not fit in 64-bit fractions.
    #[error("arithmetic overflow while evaluating the expression")]
    Overflow,
}

/// An exact fraction in lowest terms with a positive denominator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rational {
    numer: i64,
    denom: i64,
}

impl Rational {
    /// `numer / denom` reduced; a zero denominator is an error.
    pub fn new(numer: i64, denom: i64) -> Result<Self, Game24Error> {
        Self::reduced(i128::from(numer), i128::from(denom))
    }

    /// The integer `n`.
    pub const fn integer(n: i64) -> Self {
        Self { numer: n, denom: 1 }
    }

    /// The numerator (carries the sign).
    pub fn numer(self) -> i64 {
        self.numer
    }

    /// The denominator (always positive).
    pub fn denom(self) -> i64 {
        self.denom
    }

    /// `self + other`, or `Overflow`.
    pub fn checked_add(self, other: Self) -> Result<Self, Game24Error> {
        let (a, b, c, d) = self.wide(other);
        Self::reduced(a * d + c * b, b * d)
    }

    /// `self - other`, or `Overflow`.
    pub fn checked_sub(self, other: Self) -> Result<Self, Game24Error> {
        let (a, b, c, d) = self.wide(other);
        Self::reduced(a * d - c * b, b * d)
    }

    /// `self * other`, or `Overflow`.
    pub fn checked_mul(self, other: Self) -> Result<Self, Game24Error> {
        let (a, b, c, d) = self.wide(other);
        Self::reduced(a * c, b * d)
    }

    /// `self / other`, or `DivisionByZero` / `Overflow`.
    pub fn checked_div(self, other: Self) -> Result<Self, Game24Error> {
        let (a, b, c, d) = self.wide(other);
        Self::reduced(a * d, b * c)
    }

    /// Both operands widened: products of two i64 values always fit in i128.
    fn wide(self, other: Self) -> (i128, i128, i128, i128) {
        (
            i128::from(self.numer),
            i128::from(self.denom),
            i128::from(other.numer),
            i128::from(other.denom),
        )
    }

    /// Lowest terms of `numer / denom`, narrowed back to i64.
    fn reduced(numer: i128, denom: i128) -> Result<Self, Game24Error> {
        if denom == 0 {
            return Err(Game24Error::DivisionByZero);
        }
        // The gcd divides the non-zero denominator, so it is at least 1 and fits in i128.
        let divisor = i128::try_from(gcd(numer.unsigned_abs(), denom.unsigned_abs()))
            .map_err(|_| Game24Error::Overflow)?;
        let sign = if denom < 0 { -1 } else { 1 };
        let narrow = |v: i128| i64::try_from(v).map_err(|_| Game24Error::Overflow);
        Ok(Self {
            numer: narrow(sign * (numer / divisor))?,
            denom: narrow(sign * (denom / divisor))?,
        })
    }
}

impl fmt::Display for Rational {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.denom == 1 {
            write!(f, "{}", self.numer)
        } else {
            write!(f, "{}/{}", self.numer, self.denom)
        }
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The four operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

impl Op {
    const ALL: [Op; 4] = [Op::Add, Op::Sub, Op::Mul, Op::Div];

    fn apply(self, a: Rational, b: Rational) -> Result<Rational, Game24Error> {
        match self {
            Op::Add => a.checked_add(b),
            Op::Sub => a.checked_sub(b),
            Op::Mul => a.checked_mul(b),
            Op::Div => a.checked_div(b),
        }
    }

    fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
            Op::Div => '/',
        }
    }

    fn is_additive(self) -> bool {
        matches!(self, Op::Add | Op::Sub)
    }

    fn commutes(self) -> bool {
        matches!(self, Op::Add | Op::Mul)
    }
}

/// A lexical token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Num(u32),
    Op(Op),
    Open,
    Close,
    Equals,
}

/// A token and the character position it starts at.
#[derive(Debug, Clone, Copy)]
struct Token {
    tok: Tok,
    at: usize,
}

fn parse_error(at: usize, reason: impl Into<String>) -> Game24Error {
    Game24Error::Parse {
        at,
        reason: reason.into(),
    }
}

/// Splits an expression into tokens. 'x' is multiplication only right after an operand: there
/// are no variables, so it cannot mean anything else there.
fn tokenize(expression: &str) -> Result<Vec<Token>, Game24Error> {
    let mut tokens: Vec<Token> = Vec::new();
    let mut chars = expression.chars().enumerate().peekable();
    while let Some((at, c)) = chars.next() {
        let after_operand = tokens
            .last()
            .is_some_and(|t| matches!(t.tok, Tok::Num(_) | Tok::Close));
        let tok = match c {
            c if c.is_whitespace() => continue,
            '0'..='9' => Tok::Num(read_number(c, at, &mut chars)?),
            '+' => Tok::Op(Op::Add),
            '-' | '\u{2212}' | '\u{2013}' => Tok::Op(Op::Sub),
            '*' | '×' | '·' | '\u{22c5}' | '\u{2217}' => Tok::Op(Op::Mul),
            'x' | 'X' if after_operand => Tok::Op(Op::Mul),
            '/' | '÷' => Tok::Op(Op::Div),
            '(' => Tok::Open,
            ')' => Tok::Close,
            '=' => Tok::Equals,
            // A sentence-ending period after the whole expression ("(8-4)*(7-1).").
            '.' if after_operand && chars.peek().is_none() => continue,
            _ => return Err(parse_error(at, format!("unexpected character {c:?}"))),
        };
        tokens.push(Token { tok, at });
    }
    Ok(tokens)
}

/// The decimal number starting with `first`; the iterator is left after its last digit.
fn read_number(
    first: char,
    at: usize,
    chars: &mut std::iter::Peekable<impl Iterator<Item = (usize, char)>>,
) -> Result<u32, Game24Error> {
    let mut value = digit(first);
    while let Some(&(_, c)) = chars.peek().filter(|(_, c)| c.is_ascii_digit()) {
        chars.next();
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(digit(c)))
            .ok_or_else(|| parse_error(at, "number too large"))?;
    }
    Ok(value)
}

fn digit(c: char) -> u32 {
    c.to_digit(10).unwrap_or(0)
}

/// Drops a trailing "= 24"; any other '=' is an error.
fn strip_trailing_equation(tokens: &mut Vec<Token>) -> Result<(), Game24Error> {
    if let [.., eq, last] = tokens.as_slice()
        && eq.tok == Tok::Equals
        && last.tok == Tok::Num(24)
    {
        tokens.truncate(tokens.len() - 2);
    }
    match tokens.iter().find(|t| t.tok == Tok::Equals) {
        Some(t) => Err(parse_error(
            t.at,
            "'=' is allowed only as a trailing \"= 24\"",
        )),
        None => Ok(()),
    }
}

/// Recursive descent over the tokens, evaluating as it goes.
#[derive(Debug)]
struct Parser<'t> {
    tokens: &'t [Token],
    pos: usize,
    /// Position just past the input, for errors at the end.
    end: usize,
    depth: usize,
    used: Vec<u32>,
}

impl Parser<'_> {
    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.pos).copied()
    }

    /// The next token's operator if it is one `accept` allows; consumes it.
    fn take_op(&mut self, accept: fn(Op) -> bool) -> Option<Op> {
        match self.peek()?.tok {
            Tok::Op(op) if accept(op) => {
                self.pos += 1;
                Some(op)
            }
            _ => None,
        }
    }

    /// expr := term (('+' | '-') term)*
    fn expr(&mut self) -> Result<Rational, Game24Error> {
        let mut value = self.term()?;
        while let Some(op) = self.take_op(Op::is_additive) {
            value = op.apply(value, self.term()?)?;
        }
        Ok(value)
    }

    /// term := factor (('*' | '/') factor)*
    fn term(&mut self) -> Result<Rational, Game24Error> {
        let mut value = self.factor()?;
        while let Some(op) = self.take_op(|op| !op.is_additive()) {
            value = op.apply(value, self.factor()?)?;
        }
        Ok(value)
    }

    /// factor := number | '(' expr ')'
    fn factor(&mut self) -> Result<Rational, Game24Error> {
        let Some(token) = self.peek() else {
            return Err(parse_error(self.end, "expected a number or '(' at the end"));
        };
        self.pos += 1;
        match token.tok {
            Tok::Num(n) => {
                self.used.push(n);
                Ok(Rational::integer(i64::from(n)))
            }
            Tok::Open => self.parenthesised(token.at),
            Tok::Op(Op::Sub) => Err(parse_error(token.at, "unary minus is not allowed")),
            _ => Err(parse_error(token.at, "expected a number or '('")),
        }
    }

    /// The rest of a parenthesised expression whose '(' is at `open`.
    fn parenthesised(&mut self, open: usize) -> Result<Rational, Game24Error> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(parse_error(open, "parentheses nested too deeply"));
        }
        let value = self.expr()?;
        match self.peek() {
            Some(Token {
                tok: Tok::Close, ..
            }) => {
                self.pos += 1;
                self.depth -= 1;
                Ok(value)
            }
            Some(t) => Err(parse_error(t.at, "expected an operator or ')'")),
            None => Err(parse_error(open, "this '(' is never closed")),
        }
    }
}

/// Evaluates `expression` exactly: its value and the numbers it uses, in order of appearance.
///
/// Accepts non-negative integers, `+ - * /` (also `× · ÷`, and `x` between operands),
/// parentheses and whitespace, an optional trailing `= 24` and a sentence-ending '.'. Unary
/// minus and decimals are rejected.
pub fn evaluate(expression: &str) -> Result<(Rational, Vec<u32>), Game24Error> {
    let mut tokens = tokenize(expression)?;
    strip_trailing_equation(&mut tokens)?;
    if tokens.is_empty() {
        return Err(Game24Error::Empty);
    }
    let mut parser = Parser {
        tokens: &tokens,
        pos: 0,
        end: expression.chars().count(),
        depth: 0,
        used: Vec::new(),
    };
    let value = parser.expr()?;
    if let Some(t) = parser.peek() {
        let reason = match t.tok {
            Tok::Close => "this ')' has no matching '('",
            _ => "expected an operator",
        };
        return Err(parse_error(t.at, reason));
    }
    Ok((value, parser.used))
}

/// Ok when `expression` uses each of `numbers` exactly once and equals 24.
pub fn verify(numbers: &[u32; 4], expression: &str) -> Result<(), Game24Error> {
    let (value, used) = evaluate(expression)?;
    let (mut want, mut got) = (numbers.to_vec(), used.clone());
    want.sort_unstable();
    got.sort_unstable();
    if want != got {
        return Err(Game24Error::WrongNumbers {
            expected: numbers.to_vec(),
            used,
        });
    }
    if value != TARGET {
        return Err(Game24Error::NotTwentyFour {
            value: value.to_string(),
        });
    }
    Ok(())
}

/// One solver step: combine the values at positions `i` and `j` (in that order) with `op`; the
/// result replaces both at the end of the list.
#[derive(Debug, Clone, Copy)]
struct Step {
    i: usize,
    op: Op,
    j: usize,
}

/// An expression over `numbers` that `verify` accepts, or None if there is none. Tries every
/// way to combine two of the remaining values, which covers all orders and bracketings.
pub fn solve(numbers: &[u32; 4]) -> Option<String> {
    let values: Vec<Rational> = numbers
        .iter()
        .map(|&n| Rational::integer(i64::from(n)))
        .collect();
    // The search works on values alone; the text is built only for the solution found.
    let steps = search(&values)?;
    Some(render(numbers, &steps))
}

fn search(values: &[Rational]) -> Option<Vec<Step>> {
    if let [only] = values {
        return (*only == TARGET).then(Vec::new);
    }
    for step in steps(values.len()) {
        let Ok(value) = step.op.apply(values[step.i], values[step.j]) else {
            continue;
        };
        if let Some(mut rest) = search(&replace_pair(values, step, value)) {
            rest.insert(0, step);
            return Some(rest);
        }
    }
    None
}

/// Every step on `n` values; `+` and `*` commute, so one order of each pair suffices for them.
fn steps(n: usize) -> impl Iterator<Item = Step> {
    (0..n).flat_map(move |i| {
        (0..n).filter(move |&j| j != i).flat_map(move |j| {
            Op::ALL
                .into_iter()
                .filter(move |op| i < j || !op.commutes())
                .map(move |op| Step { i, op, j })
        })
    })
}

/// `items` without the step's pair, followed by `combined`.
fn replace_pair<T: Clone>(items: &[T], step: Step, combined: T) -> Vec<T> {
    items
        .iter()
        .enumerate()
        .filter(|&(k, _)| k != step.i && k != step.j)
        .map(|(_, item)| item.clone())
        .chain([combined])
        .collect()
}

/// Replays `steps` on the numbers' texts, parenthesising every combination but the last.
fn render(numbers: &[u32; 4], steps: &[Step]) -> String {
    let mut texts: Vec<String> = numbers.iter().map(u32::to_string).collect();
    for (k, &step) in steps.iter().enumerate() {
        let (a, op, b) = (&texts[step.i], step.op.symbol(), &texts[step.j]);
        let text = if k + 1 == steps.len() {
            format!("{a} {op} {b}")
        } else {
            format!("({a} {op} {b})")
        };
        texts = replace_pair(&texts, step, text);
    }
    texts.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(expression: &str) -> String {
        evaluate(expression)
            .expect("expression evaluates")
            .0
            .to_string()
    }

    #[test]
    fn rationals_are_reduced_and_displayed() {
        let r = Rational::new(6, -4).expect("non-zero denominator");
        assert_eq!((r.numer(), r.denom()), (-3, 2));
        assert_eq!(r.to_string(), "-3/2");
        assert_eq!(Rational::new(48, 2).expect("ok"), TARGET);
        assert_eq!(Rational::new(1, 0), Err(Game24Error::DivisionByZero));
        let big = Rational::integer(i64::MAX);
        assert_eq!(big.checked_add(big), Err(Game24Error::Overflow));
        assert_eq!(
            Rational::integer(i64::MIN).checked_mul(Rational::integer(-1)),
            Err(Game24Error::Overflow)
        );
    }

    #[test]
    fn expressions_evaluate_exactly_with_precedence() {
        assert_eq!(value("7/2"), "7/2");
        assert_eq!(value("1 - 3"), "-2");
        assert_eq!(value("2+3*4"), "14");
        assert_eq!(value("(2+3)*4"), "20");
        assert_eq!(value("8-4-2"), "2");
        assert_eq!(value("8/4/2"), "1");
        assert_eq!(value("8 / (3 - 8 / 3)"), "24");
        assert_eq!(value(" ( ( 5 ) ) "), "5");
        let (_, used) = evaluate("(8 - 4) * (7 - 1)").expect("parses");
        assert_eq!(used, vec![8, 4, 7, 1]);
    }

    #[test]
    fn alternative_operator_spellings_are_accepted() {
        assert_eq!(value("8 × 3 ÷ 2 · 2"), "24");
        assert_eq!(value("8x3x1x1"), "24");
        assert_eq!(value("(1+2) X 8"), "24");
        assert_eq!(value("9 \u{2212} 3"), "6");
        assert!(matches!(
            evaluate("x 8"),
            Err(Game24Error::Parse { at: 0, .. })
        ));
        assert!(matches!(
            evaluate("8 * x"),
            Err(Game24Error::Parse { at: 4, .. })
        ));
    }

    #[test]
    fn malformed_expressions_are_parse_errors() {
        for bad in [
            "banana",
            "8 4",
            "8 +",
            "* 8",
            "((8-4)*(7-1)",
            "(8-4))*(7-1)",
            "()",
            "-(4-8)*(7-1)",
            "8.5 * 3",
            "24 = (8-4)*(7-1)",
            "(8-4)*(7-1) = 25",
            "(8-4)*(7-1) == 24",
            "99999999999 * 1",
        ] {
            assert!(
                matches!(evaluate(bad), Err(Game24Error::Parse { .. })),
                "{bad}: {:?}",
                evaluate(bad)
            );
        }
        assert_eq!(evaluate(""), Err(Game24Error::Empty));
        assert_eq!(evaluate("  = 24"), Err(Game24Error::Empty));
    }

    #[test]
    fn errors_point_at_the_problem() {
        let err = evaluate("(8-4)) * 6").expect_err("unbalanced");
        assert_eq!(err, parse_error(5, "this ')' has no matching '('"), "{err}");
        assert!(err.to_string().contains("character 5"));
        let err = evaluate("2 + 3 ? 4").expect_err("bad char");
        assert!(err.to_string().contains("'?'"), "{err}");
    }

    #[test]
    fn hostile_input_is_rejected_without_panicking() {
        let deep = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
        assert!(matches!(evaluate(&deep), Err(Game24Error::Parse { .. })));
        let ok = format!("{}1{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert_eq!(value(&ok), "1");
        for weird in [
            "\u{0}",
            "((((",
            "))))",
            "1/",
            "=",
            "24=",
            "4294967295*4294967295",
        ] {
            assert!(evaluate(weird).is_err(), "{weird}");
        }
        assert_eq!(
            evaluate("4294967295*4294967295*4294967295"),
            Err(Game24Error::Overflow)
        );
    }

    #[test]
    fn verify_accepts_solutions_in_common_forms() {
        assert_eq!(verify(&[8, 4, 7, 1], "(8-4)*(7-1) = 24"), Ok(()));
        assert_eq!(verify(&[8, 4, 7, 1], "(8 - 4) * (7 - 1)=24"), Ok(()));
        assert_eq!(verify(&[7, 1, 4, 8], "(8 - 4) * (7 - 1)."), Ok(()));
        assert_eq!(verify(&[8, 3, 1, 1], "8 × 3 × 1 × 1"), Ok(()));
        assert_eq!(verify(&[1, 2, 3, 4], "((1+2)+3)*4"), Ok(()));
        assert_eq!(verify(&[3, 3, 8, 8], "8/(3-8/3)"), Ok(()));
    }

    fn wrong_numbers(numbers: &[u32; 4], expression: &str) -> bool {
        matches!(
            verify(numbers, expression),
            Err(Game24Error::WrongNumbers { .. })
        )
    }

    #[test]
    fn verify_rejects_the_wrong_numbers() {
        assert!(wrong_numbers(&[6, 4, 1, 2], "6*4*(2/2)*1"), "used twice");
        assert!(wrong_numbers(&[3, 8, 1, 2], "3*8*1"), "missing");
        assert!(wrong_numbers(&[8, 4, 7, 2], "(8-4)*(7-1)"), "foreign");
        assert!(wrong_numbers(&[4, 7, 8, 8], "24"), "24 alone");
        assert!(wrong_numbers(&[4, 7, 8, 8], "24 = 24"), "24 alone");
        let err = verify(&[3, 8, 1, 2], "3*8*1").expect_err("missing");
        assert_eq!(
            err,
            Game24Error::WrongNumbers {
                expected: vec![3, 8, 1, 2],
                used: vec![3, 8, 1]
            }
        );
    }

    #[test]
    fn verify_rejects_other_values_and_bad_arithmetic() {
        let err = verify(&[1, 2, 3, 4], "1+2+3+4").expect_err("10");
        assert_eq!(
            err,
            Game24Error::NotTwentyFour {
                value: "10".to_owned()
            }
        );
        assert!(err.to_string().contains("equals 10"), "{err}");
        let err = verify(&[1, 2, 3, 4], "1/2+3+4").expect_err("15/2");
        assert!(err.to_string().contains("15/2"), "{err}");
        assert_eq!(
            verify(&[1, 1, 2, 3], "3/(1-1)*2"),
            Err(Game24Error::DivisionByZero)
        );
        assert!(matches!(
            verify(&[4, 7, 8, 8], "garbage"),
            Err(Game24Error::Parse { .. })
        ));
        assert!(matches!(
            verify(&[8, 4, 7, 1], "((8-4)*(7-1)"),
            Err(Game24Error::Parse { .. })
        ));
        assert!(matches!(
            verify(&[8, 4, 7, 1], "(8-4)*(7-1))"),
            Err(Game24Error::Parse { .. })
        ));
    }

    #[test]
    fn solver_knows_classic_instances() {
        assert_eq!(solve(&[1, 1, 1, 1]), None);
        assert_eq!(solve(&[1, 1, 1, 2]), None);
        for numbers in [[4, 7, 8, 8], [1, 2, 3, 4], [3, 3, 8, 8], [1, 5, 5, 5]] {
            let expression = solve(&numbers).expect("solvable");
            assert_eq!(verify(&numbers, &expression), Ok(()), "{expression}");
        }
    }

    #[test]
    fn solver_finds_exactly_the_1362_solvable_hands_from_1_to_13() {
        let mut solvable = 0;
        for a in 1..=13 {
            for b in a..=13 {
                for c in b..=13 {
                    for d in c..=13 {
                        let numbers = [a, b, c, d];
                        if let Some(expression) = solve(&numbers) {
                            assert_eq!(verify(&numbers, &expression), Ok(()), "{expression}");
                            solvable += 1;
                        }
                    }
                }
            }
        }
        // The known count: 458 of the 1820 hands have no solution.
        assert_eq!(solvable, 1362);
    }
}
