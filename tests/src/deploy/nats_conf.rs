//! nats.conf: a minimal reader of the NATS server config format into JSON, and sizes.

use serde_json::{Value as Json, json};

/// A minimal reader of the NATS server config format (maps, arrays, quoted and bare values,
/// `#` and `//` comments) into JSON.
struct ConfReader {
    c: Vec<char>,
    at: usize,
}

pub fn nats_conf(text: &str) -> Result<Json, String> {
    ConfReader {
        c: text.chars().collect(),
        at: 0,
    }
    .map(None)
}

impl ConfReader {
    fn peek(&self) -> Option<char> {
        self.c.get(self.at).copied()
    }

    fn skip_line(&mut self) {
        while self.peek().is_some_and(|c| c != '\n') {
            self.at += 1;
        }
    }

    fn skip(&mut self) {
        loop {
            match self.peek() {
                Some(c) if c.is_whitespace() || c == ',' || c == ';' => self.at += 1,
                Some('#') => self.skip_line(),
                Some('/') if self.c.get(self.at + 1) == Some(&'/') => self.skip_line(),
                _ => return,
            }
        }
    }

    fn blanks(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.at += 1;
        }
    }

    fn map(&mut self, close: Option<char>) -> Result<Json, String> {
        let mut m = serde_json::Map::new();
        loop {
            self.skip();
            match self.peek() {
                None if close.is_none() => return Ok(Json::Object(m)),
                None => return Err("an unclosed {".into()),
                Some(c) if Some(c) == close => {
                    self.at += 1;
                    return Ok(Json::Object(m));
                }
                _ => {}
            }
            let start = self.at;
            while self
                .peek()
                .is_some_and(|c| !c.is_whitespace() && !matches!(c, ':' | '=' | '{'))
            {
                self.at += 1;
            }
            let key: String = self.c[start..self.at].iter().collect();
            if key.is_empty() {
                return Err(format!("a value without a key at character {}", self.at));
            }
            self.blanks();
            if matches!(self.peek(), Some(':' | '=')) {
                self.at += 1;
            }
            let value = self.value()?;
            m.insert(key, value);
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.blanks();
        match self.peek() {
            Some('{') => {
                self.at += 1;
                self.map(Some('}'))
            }
            Some('[') => {
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    self.skip();
                    match self.peek() {
                        Some(']') => {
                            self.at += 1;
                            return Ok(Json::Array(items));
                        }
                        None => return Err("an unclosed [".into()),
                        _ => items.push(self.value()?),
                    }
                }
            }
            Some(q @ ('"' | '\'')) => {
                self.at += 1;
                let start = self.at;
                while self.peek().is_some_and(|c| c != q) {
                    self.at += 1;
                }
                let s: String = self.c[start..self.at].iter().collect();
                self.at += 1;
                Ok(json!(s))
            }
            _ => {
                let start = self.at;
                while self
                    .peek()
                    .is_some_and(|c| !matches!(c, '\n' | ',' | ';' | '}' | ']' | '#'))
                {
                    self.at += 1;
                }
                let s: String = self.c[start..self.at].iter().collect();
                let s = s.trim();
                Ok(s.parse::<i64>().map_or_else(|_| json!(s), |n| json!(n)))
            }
        }
    }
}

/// Bytes of a NATS size ("8GB") or a Kubernetes quantity ("10Gi"), powers of 1024.
pub fn bytes(size: &str) -> Option<u64> {
    let split = size
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(size.len());
    let (n, unit) = size.split_at(split);
    let n: u64 = n.parse().ok()?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches(['B', 'I'])
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    Some(n << shift)
}
