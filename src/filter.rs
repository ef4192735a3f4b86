//! Filter expressions over versions, in Benji's language:
//! `name == "db" and labels["env"] == "prod" and not protected == true`.
//! Comparisons (`== != < <= > >=`) between a field and a value, combined with `and`, `or`,
//! `not` and parentheses. Errors name the column where the expression went wrong.

use crate::error::{Error, Result};
use crate::units::parse_size;
use crate::version::{Version, VersionUid};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use std::cmp::Ordering;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Op(&'static str),
    LParen,
    RParen,
    LBracket,
    RBracket,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Uid,
    Name,
    Snapshot,
    Size,
    BlockSize,
    Status,
    Protected,
    Storage,
    Date,
}

#[derive(Clone, Debug, PartialEq)]
enum Operand {
    Field(Field),
    Label(String),
    Str(String),
    Num(String),
    Bool(bool),
}

#[derive(Clone, Debug, PartialEq)]
enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp { subject: Operand, op: &'static str, value: Value },
}

/// A literal already converted to the type of the field it is compared with.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Int(u64),
    Str(String),
    Bool(bool),
    Date(DateTime<Utc>),
}

/// A parsed filter, ready to test versions.
#[derive(Clone, Debug)]
pub struct Filter {
    expr: Expr,
}

fn err(src: &str, col: usize, msg: &str) -> Error {
    Error::Invalid(format!("filter: {msg} at column {} of '{src}'", col + 1))
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>> {
    let b: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let tok = match c {
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '[' => Tok::LBracket,
            ']' => Tok::RBracket,
            '"' | '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err(err(src, start, "unterminated string")),
                        Some('\\') if b.get(i + 1).is_some() => {
                            s.push(b[i + 1]);
                            i += 2;
                        }
                        Some(&q) if q == c => break,
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                Tok::Str(s)
            }
            '=' | '!' | '<' | '>' => {
                let two: String = b[i..(i + 2).min(b.len())].iter().collect();
                let op = match two.as_str() {
                    "==" => "==",
                    "!=" => "!=",
                    "<=" => "<=",
                    ">=" => ">=",
                    _ if c == '<' => "<",
                    _ if c == '>' => ">",
                    _ => return Err(err(src, start, "expected ==, !=, <, <=, > or >=")),
                };
                i += op.len();
                out.push((Tok::Op(op), start));
                continue;
            }
            c if c.is_ascii_digit() => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '.') {
                    i += 1;
                }
                out.push((Tok::Num(b[start..i].iter().collect()), start));
                continue;
            }
            c if c.is_alphabetic() || c == '_' => {
                while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                    i += 1;
                }
                out.push((Tok::Ident(b[start..i].iter().collect()), start));
                continue;
            }
            other => return Err(err(src, start, &format!("unexpected character '{other}'"))),
        };
        i += 1;
        out.push((tok, start));
    }
    Ok(out)
}

/// How deeply parentheses and `not` may nest. The parser and evaluation recurse once per
/// level; without a bound, a few thousand `(` overflow the stack and abort the process.
pub const MAX_DEPTH: usize = 64;

struct Parser<'a> {
    src: &'a str,
    toks: Vec<(Tok, usize)>,
    pos: usize,
    /// Parentheses and `not`s open around the current token.
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.0)
    }
    fn col(&self) -> usize {
        self.toks.get(self.pos).map(|t| t.1).unwrap_or(self.src.chars().count())
    }
    fn keyword(&self, k: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(s)) if s.eq_ignore_ascii_case(k))
    }
    fn or(&mut self) -> Result<Expr> {
        let mut e = self.and()?;
        while self.keyword("or") {
            self.pos += 1;
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }
    fn and(&mut self) -> Result<Expr> {
        let mut e = self.not()?;
        while self.keyword("and") {
            self.pos += 1;
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Ok(e)
    }
    /// Enters one more level of nesting, refusing to go past [`MAX_DEPTH`].
    fn deeper(&mut self) -> Result<()> {
        if self.depth >= MAX_DEPTH {
            return Err(err(
                self.src,
                self.col(),
                &format!("more than {MAX_DEPTH} nested parentheses or 'not's; simplify the expression"),
            ));
        }
        self.depth += 1;
        Ok(())
    }
    fn not(&mut self) -> Result<Expr> {
        if self.keyword("not") {
            self.deeper()?;
            self.pos += 1;
            let e = Expr::Not(Box::new(self.not()?));
            self.depth -= 1;
            return Ok(e);
        }
        self.primary()
    }
    fn primary(&mut self) -> Result<Expr> {
        if self.peek() == Some(&Tok::LParen) {
            self.deeper()?;
            self.pos += 1;
            let e = self.or()?;
            if self.peek() != Some(&Tok::RParen) {
                return Err(err(self.src, self.col(), "expected ')'"));
            }
            self.pos += 1;
            self.depth -= 1;
            return Ok(e);
        }
        let left_col = self.col();
        let left = self.operand()?;
        let op_col = self.col();
        let op = match self.peek() {
            Some(Tok::Op(op)) => *op,
            _ => {
                return Err(err(self.src, op_col, "expected a comparison (==, !=, <, <=, >, >=)"));
            }
        };
        self.pos += 1;
        let right_col = self.col();
        let right = self.operand()?;
        // Put the field on the left: `"db" == name` is `name == "db"`.
        let (subject, op, literal, lit_col) = match (&left, &right) {
            (Operand::Field(_) | Operand::Label(_), Operand::Field(_) | Operand::Label(_)) => {
                return Err(err(self.src, right_col, "compare a field with a value, not with another field"));
            }
            (Operand::Field(_) | Operand::Label(_), _) => (left, op, right, right_col),
            (_, Operand::Field(_) | Operand::Label(_)) => (right, mirror(op), left, left_col),
            _ => {
                return Err(err(self.src, left_col, "one side of a comparison must be a field"));
            }
        };
        let value = typed(&subject, &literal).map_err(|m| err(self.src, lit_col, &m))?;
        if matches!(value, Value::Bool(_)) && !matches!(op, "==" | "!=") {
            return Err(err(self.src, op_col, "true/false can only be compared with == or !="));
        }
        Ok(Expr::Cmp { subject, op, value })
    }
    fn operand(&mut self) -> Result<Operand> {
        let col = self.col();
        let tok = self.peek().cloned();
        self.pos += 1;
        Ok(match tok {
            Some(Tok::Str(s)) => Operand::Str(s),
            Some(Tok::Num(n)) => Operand::Num(n),
            Some(Tok::Ident(id)) => match id.as_str() {
                "true" | "True" => Operand::Bool(true),
                "false" | "False" => Operand::Bool(false),
                "uid" => Operand::Field(Field::Uid),
                "name" => Operand::Field(Field::Name),
                "snapshot" | "snapshot_name" => Operand::Field(Field::Snapshot),
                "size" => Operand::Field(Field::Size),
                "block_size" => Operand::Field(Field::BlockSize),
                "status" => Operand::Field(Field::Status),
                "protected" => Operand::Field(Field::Protected),
                "storage" => Operand::Field(Field::Storage),
                "date" => Operand::Field(Field::Date),
                "labels" => {
                    let bad = |p: &Parser| err(p.src, p.col(), "expected labels[\"name\"]");
                    if self.peek() != Some(&Tok::LBracket) {
                        return Err(bad(self));
                    }
                    self.pos += 1;
                    let Some(Tok::Str(k)) = self.peek().cloned() else {
                        return Err(bad(self));
                    };
                    self.pos += 1;
                    if self.peek() != Some(&Tok::RBracket) {
                        return Err(bad(self));
                    }
                    self.pos += 1;
                    Operand::Label(k)
                }
                uid if uid.len() > 1 && uid.starts_with(['V', 'v']) && uid[1..].bytes().all(|b| b.is_ascii_digit()) => {
                    Operand::Str(uid.to_string())
                }
                "and" | "or" | "not" => {
                    return Err(err(self.src, col, &format!("expected a field or value before '{id}'")));
                }
                other => {
                    return Err(err(
                        self.src,
                        col,
                        &format!(
                            "unknown field '{other}' (fields: uid, name, snapshot, size, block_size, status, protected, storage, date, labels[\"k\"]; quote strings)"
                        ),
                    ));
                }
            },
            Some(_) => return Err(err(self.src, col, "expected a field or a value")),
            None => return Err(err(self.src, col, "expression ends too early")),
        })
    }
}

fn mirror(op: &'static str) -> &'static str {
    match op {
        "<" => ">",
        "<=" => ">=",
        ">" => "<",
        ">=" => "<=",
        o => o,
    }
}

fn lit_text(l: &Operand) -> String {
    match l {
        Operand::Str(s) | Operand::Num(s) => s.clone(),
        Operand::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// Parses an ISO 8601 date or date-time; one without a zone is UTC.
pub fn parse_date(s: &str) -> std::result::Result<DateTime<Utc>, String> {
    if let Ok(d) = DateTime::parse_from_rfc3339(s) {
        return Ok(d.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
        if let Ok(d) = NaiveDateTime::parse_from_str(s, f) {
            return Ok(d.and_utc());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).map(|d| d.and_utc()).unwrap_or_default());
    }
    Err(format!("'{s}' is not an ISO 8601 date (e.g. 2026-11-22 or 2026-11-22T13:05:00Z)"))
}

fn typed(subject: &Operand, lit: &Operand) -> std::result::Result<Value, String> {
    let text = lit_text(lit);
    match subject {
        Operand::Field(Field::Uid) => VersionUid::parse(&text).map(|u| Value::Int(u.0)).map_err(|e| e.to_string()),
        Operand::Field(Field::Size | Field::BlockSize) => match lit {
            Operand::Bool(_) => Err("expected a size".into()),
            _ => parse_size(&text).map(Value::Int),
        },
        Operand::Field(Field::Protected) => match lit {
            Operand::Bool(b) => Ok(Value::Bool(*b)),
            Operand::Num(n) if n == "0" || n == "1" => Ok(Value::Bool(n == "1")),
            _ => Err("protected is compared with true or false".into()),
        },
        Operand::Field(Field::Date) => parse_date(&text).map(Value::Date),
        Operand::Field(Field::Status) => match crate::version::Status::parse(&text) {
            Some(_) => Ok(Value::Str(text)),
            None => Err(format!("'{text}' is not a status (incomplete, valid, invalid)")),
        },
        _ => match lit {
            Operand::Bool(_) => Err("expected a string".into()),
            _ => Ok(Value::Str(text)),
        },
    }
}

fn compare(ord: Option<Ordering>, op: &str) -> bool {
    let Some(o) = ord else { return op == "!=" };
    match op {
        "==" => o == Ordering::Equal,
        "!=" => o != Ordering::Equal,
        "<" => o == Ordering::Less,
        "<=" => o != Ordering::Greater,
        ">" => o == Ordering::Greater,
        ">=" => o != Ordering::Less,
        _ => false,
    }
}

impl Filter {
    pub fn parse(src: &str) -> Result<Filter> {
        let toks = lex(src)?;
        if toks.is_empty() {
            return Err(err(src, 0, "the expression is empty"));
        }
        let mut p = Parser { src, toks, pos: 0, depth: 0 };
        let expr = p.or()?;
        if p.pos < p.toks.len() {
            return Err(err(src, p.col(), "expected 'and', 'or' or the end"));
        }
        Ok(Filter { expr })
    }

    pub fn matches(&self, v: &Version) -> bool {
        eval(&self.expr, v)
    }
}

fn eval(e: &Expr, v: &Version) -> bool {
    match e {
        Expr::And(a, b) => eval(a, v) && eval(b, v),
        Expr::Or(a, b) => eval(a, v) || eval(b, v),
        Expr::Not(a) => !eval(a, v),
        Expr::Cmp { subject, op, value } => {
            let ord = match (subject, value) {
                (Operand::Field(Field::Uid), Value::Int(n)) => Some(v.uid.0.cmp(n)),
                (Operand::Field(Field::Size), Value::Int(n)) => Some(v.size.cmp(n)),
                (Operand::Field(Field::BlockSize), Value::Int(n)) => Some((v.block_size as u64).cmp(n)),
                (Operand::Field(Field::Protected), Value::Bool(b)) => Some(v.protected.cmp(b)),
                (Operand::Field(Field::Date), Value::Date(d)) => Some(v.date.cmp(d)),
                (Operand::Field(Field::Name), Value::Str(s)) => Some(v.name.as_str().cmp(s)),
                (Operand::Field(Field::Snapshot), Value::Str(s)) => Some(v.snapshot.as_str().cmp(s)),
                (Operand::Field(Field::Status), Value::Str(s)) => Some(v.status.as_str().cmp(s)),
                (Operand::Field(Field::Storage), Value::Str(s)) => Some(v.storage.as_str().cmp(s)),
                (Operand::Label(k), Value::Str(s)) => v.labels.get(k).map(|l| l.as_str().cmp(s)),
                _ => None,
            };
            compare(ord, op)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{Stats, Status};

    fn v(uid: u64, name: &str, env: Option<&str>) -> Version {
        Version {
            uid: VersionUid(uid),
            date: parse_date("2026-11-20T10:00:00Z").unwrap(),
            name: name.into(),
            snapshot: "snap1".into(),
            size: 10 << 30,
            block_size: 4 << 20,
            status: Status::Valid,
            protected: uid == 2,
            storage: "default".into(),
            labels: env.map(|e| [("env".to_string(), e.to_string())].into()).unwrap_or_default(),
            stats: Stats::default(),
            expire: None,
            host: None,
        }
    }

    fn m(f: &str, ver: &Version) -> bool {
        Filter::parse(f).unwrap().matches(ver)
    }

    #[test]
    fn evaluates() {
        let a = v(1, "db", Some("prod"));
        let b = v(2, "web", None);
        assert!(m(r#"name == "db" and labels["env"] == "prod""#, &a));
        assert!(!m(r#"name == "db" and labels["env"] == "prod""#, &b));
        assert!(m(r#"labels["env"] != "prod""#, &b), "a missing label is != anything");
        assert!(!m(r#"labels["env"] == "prod""#, &b));
        assert!(m("protected == true", &b));
        assert!(m("not protected == true", &a));
        assert!(m("uid > V0000000001 or name == 'db'", &b));
        assert!(m("uid >= V0000000002 and uid <= 'V0000000002'", &b));
        assert!(m("size >= 10G and block_size == 4M", &a));
        assert!(m(r#"date < "2026-11-21" and date >= "2026-11-20T10:00:00Z""#, &a));
        assert!(m(r#"(name == "x" or name == "db") and status == "valid""#, &a));
        assert!(m(r#""db" == name"#, &a));
        assert!(m("5G < size", &a));
    }

    /// A filter nested thousands deep used to overflow the stack (abort, exit 134).
    #[test]
    fn nesting_is_bounded_and_long_chains_work() {
        let a = v(1, "db", None);
        let nested = |n: usize| format!("{}name == 'db'{}", "(".repeat(n), ")".repeat(n));
        assert!(m(&nested(MAX_DEPTH), &a));
        for n in [MAX_DEPTH + 1, 7000] {
            let e = Filter::parse(&nested(n)).unwrap_err().to_string();
            assert!(e.contains("nested") && e.contains(&format!("column {}", MAX_DEPTH + 1)), "{e}");
        }
        let nots = format!("{}name == 'db'", "not ".repeat(7000));
        assert!(Filter::parse(&nots).unwrap_err().to_string().contains("nested"));
        // As long as a command line allows (128 KiB), a flat chain is no nesting.
        let chain = vec!["name == 'x'"; 10_000].join(" or ") + " or name == 'db'";
        assert!(m(&chain, &a));
    }

    #[test]
    fn errors_point_at_the_column() {
        let e = Filter::parse(r#"name = "db""#).unwrap_err().to_string();
        assert!(e.contains("column 6"), "{e}");
        let e = Filter::parse(r#"name == "db" and"#).unwrap_err().to_string();
        assert!(e.contains("ends too early"), "{e}");
        let e = Filter::parse(r#"colour == "red""#).unwrap_err().to_string();
        assert!(e.contains("unknown field 'colour'") && e.contains("column 1"), "{e}");
        let e = Filter::parse(r#"date > "yesterday""#).unwrap_err().to_string();
        assert!(e.contains("column 8"), "{e}");
        for bad in [
            "",
            "(name == 'a'",
            "name == 'a' name",
            "labels[env] == 'x'",
            "size < true",
            "protected < true",
            "'a' == 'b'",
            "name == \"x",
            "uid == 2",
        ] {
            let e = Filter::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("filter: ") && !e.contains('\n'), "{bad}: {e}");
        }
    }
}
