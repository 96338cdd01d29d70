//! A tracepoint's `format` description (tracefs `events/SYS/NAME/format`, as
//! stored in perf.data's tracing data): its fields with their offsets and
//! sizes, and its `print fmt` compiled into a small program that reads the
//! fields of a raw record and prints them as libtraceevent prints them.
//!
//! The program is compiled once per event. [`Program::render`] prints a
//! whole record (what `perf script` shows after the event name);
//! [`Program::convs`] exposes each conversion with the `key=` text before it,
//! so a caller can read just the keys it needs ([`Program::value`],
//! [`Program::render_conv`]) without printing the rest.
//!
//! # Kernel
//! Format files: `kernel/trace/trace_events.c` (`f_show`: `\tfield:TYPE
//! NAME;\toffset:N;\tsize:N;\tsigned:N;`, a blank line after the common
//! fields, then `print fmt: "..." , args`). Printing:
//! `tools/lib/traceevent/event-parse.c` (libtraceevent, as perf 6.1 uses it):
//! `eval_num_arg` (u64 arithmetic; a cast masks to u8/u16/u32 for
//! `u8/s8/char`, `u16/s16/short`, `u32/s32/int` and leaves everything else;
//! an unknown identifier such as `vmemmap_base` evaluates to 0 via strtoull),
//! `print_str_arg` (`__print_flags`: names of the set bits joined by the
//! delimiter, leftover bits as `0x%llx`; `__print_symbolic`: the matching
//! name or `0x%llx`; `cond ? "a" : "b"` picks a string), `pretty_print`
//! (integer conversions are cast to the conversion's length: none = int,
//! `l`/`z` = long, `ll` = long long, `h`/`hh` = short/char), `print_function`
//! (`%pS`: `name+0x%llx` or `0x%llx`), glibc's `%p` (`0x%lx`, `(nil)` for 0).
//!
//! SIMPLIFICATION: print fmt constructs libtraceevent knows but no kmem,
//! percpu or vmalloc event uses (`__print_hex`, `__get_bitmask`, `%pM`, `%pI4`,
//! arrays indexed in the fmt, `sizeof`, functions registered by plugins) do
//! not compile; the caller then prints the fields by their struct names.
//!
//! # Invariants
//! - tp-format-1: compiling and running a program never panics, whatever
//!   the format text and the record bytes (reads outside the record give 0
//!   or an empty string).
#![forbid(unsafe_code)]

use std::fmt::Write as _;

/// How a field's bytes are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// A number of `size` bytes (1, 2, 4 or 8; anything else reads as 0).
    Scalar,
    /// `TYPE name[N]` (`char comm[16]` prints as a string).
    Array,
    /// `__data_loc TYPE name[]`: a u32 `(len << 16) | offset` from the record start.
    DataLoc,
    /// `__rel_loc TYPE name[]`: the same, the offset counted from the field's end.
    RelLoc,
}

/// One field of a format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// The declaration, e.g. `unsigned long call_site`.
    pub decl: String,
    pub offset: usize,
    pub size: usize,
    pub signed: bool,
    pub kind: FieldKind,
    /// A common field (`common_pid`, ...), before the format's blank line.
    pub common: bool,
}

/// A parsed format file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Format {
    pub name: String,
    pub id: u32,
    pub fields: Vec<Field>,
    /// The text after `print fmt: `.
    pub print_fmt: String,
    pub big_endian: bool,
    /// sizeof(long) on the recorded machine (4 or 8).
    pub long_size: u8,
}

impl Format {
    /// Parse a format file. None if it has no `name:` or `ID:`.
    pub fn parse(text: &str, big_endian: bool, long_size: u8) -> Option<Format> {
        let mut f = Format { big_endian, long_size, ..Default::default() };
        let mut id = None;
        let mut common = true;
        let mut in_format = false;
        for line in text.lines() {
            let t = line.trim();
            if let Some(v) = t.strip_prefix("name:") {
                f.name = v.trim().to_string();
            } else if let Some(v) = t.strip_prefix("ID:") {
                id = v.trim().parse::<u32>().ok();
            } else if t == "format:" {
                in_format = true;
            } else if let Some(v) = t.strip_prefix("print fmt:") {
                f.print_fmt = v.trim().to_string();
                in_format = false;
            } else if in_format && t.is_empty() {
                common = false;
            } else if in_format && t.starts_with("field") {
                if let Some(field) = parse_field_line(t, common) {
                    f.fields.push(field);
                }
            }
        }
        f.id = id?;
        (!f.name.is_empty()).then_some(f)
    }

    pub fn field(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|x| x.name == name)
    }

    /// The smallest record that holds every fixed part of every field.
    pub fn min_len(&self) -> usize {
        self.fields.iter().map(|x| x.offset.saturating_add(x.size)).max().unwrap_or(0)
    }

    /// A field as an unsigned number (sign-extended if signed); 0 if the
    /// record is too short or the field is not a 1/2/4/8-byte scalar.
    #[inline]
    pub fn read_num(&self, raw: &[u8], i: usize) -> u64 {
        let Some(f) = self.fields.get(i) else { return 0 };
        read_scalar(raw, f.offset, f.size, f.signed, self.big_endian)
    }

    /// A field's bytes as a string: fixed char arrays and `__data_loc`
    /// strings up to the first NUL. Out-of-record parts are cut off.
    pub fn read_str<'a>(&self, raw: &'a [u8], i: usize) -> &'a [u8] {
        let Some(f) = self.fields.get(i) else { return b"" };
        let bytes: &[u8] = match f.kind {
            FieldKind::Scalar | FieldKind::Array => {
                let end = f.offset.saturating_add(f.size).min(raw.len());
                raw.get(f.offset..end).unwrap_or(b"")
            }
            FieldKind::DataLoc | FieldKind::RelLoc => {
                let v = read_scalar(raw, f.offset, 4.min(f.size.max(2)), false, self.big_endian);
                let (len, mut off) = if f.size >= 4 { ((v >> 16) as usize, (v & 0xffff) as usize) } else { (usize::MAX, v as usize) };
                if f.kind == FieldKind::RelLoc {
                    off = off.saturating_add(f.offset + f.size);
                }
                let end = off.saturating_add(len).min(raw.len());
                raw.get(off..end).unwrap_or(b"")
            }
        };
        let n = bytes.iter().position(|&c| c == 0).unwrap_or(bytes.len());
        &bytes[..n]
    }
}

/// `field:TYPE NAME;\toffset:N;\tsize:N;\tsigned:N;`
fn parse_field_line(line: &str, common: bool) -> Option<Field> {
    let (mut decl, mut offset, mut size, mut signed) = (None, None, None, false);
    for part in line.split(';') {
        let Some((k, v)) = part.split_once(':') else { continue };
        match k.trim() {
            "field" | "field special" => decl = Some(v.trim().to_string()),
            "offset" => offset = v.trim().parse::<usize>().ok(),
            "size" => size = v.trim().parse::<usize>().ok(),
            "signed" => signed = v.trim() == "1",
            _ => {}
        }
    }
    let decl = decl?;
    let (offset, size) = (offset?, size?);
    // The name: the last identifier once the `[...]` parts are removed
    // (`char comm[16]`, `__data_loc char[] name`).
    let mut head = String::with_capacity(decl.len());
    let mut depth = 0u32;
    for c in decl.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            _ if depth == 0 => head.push(c),
            _ => {}
        }
    }
    let name: String = head
        .trim_end()
        .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("")
        .to_string();
    if name.is_empty() {
        return None;
    }
    let kind = if decl.starts_with("__data_loc") {
        FieldKind::DataLoc
    } else if decl.starts_with("__rel_loc") {
        FieldKind::RelLoc
    } else if decl.contains('[') {
        FieldKind::Array
    } else {
        FieldKind::Scalar
    };
    Some(Field { name, decl, offset, size, signed, kind, common })
}

#[inline]
fn read_scalar(raw: &[u8], off: usize, size: usize, signed: bool, be: bool) -> u64 {
    let Some(b) = off.checked_add(size).and_then(|end| raw.get(off..end)) else { return 0 };
    macro_rules! rd {
        ($t:ty, $st:ty) => {{
            let a: [u8; std::mem::size_of::<$t>()] = b.try_into().unwrap_or_default();
            let v = if be { <$t>::from_be_bytes(a) } else { <$t>::from_le_bytes(a) };
            if signed {
                v as $st as i64 as u64
            } else {
                v as u64
            }
        }};
    }
    match size {
        1 => rd!(u8, i8),
        2 => rd!(u16, i16),
        4 => rd!(u32, i32),
        8 => rd!(u64, i64),
        _ => 0,
    }
}

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Str(String),
    Num(String),
    Ident(String),
    Punct(&'static str),
}

const PUNCTS: [&str; 30] = [
    "->", "<<", ">>", "<=", ">=", "==", "!=", "&&", "||", "(", ")", "{", "}", "[", "]", ",", "?", ":", "+", "-", "*",
    "/", "%", "&", "|", "^", "!", "~", "<", ">",
];

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'"' {
            let mut v = Vec::new();
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err("unterminated string".into()),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        let e = *b.get(i + 1).ok_or("unterminated string")?;
                        v.push(match e {
                            b'n' => b'\n',
                            b't' => b'\t',
                            b'r' => b'\r',
                            b'0' => 0,
                            other => other,
                        });
                        i += 2;
                    }
                    Some(&x) => {
                        v.push(x);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(String::from_utf8_lossy(&v).into_owned()));
        } else if c.is_ascii_digit() {
            let st = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Num(s[st..i].to_string()));
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let st = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(s[st..i].to_string()));
        } else {
            let rest = &s[i..];
            match PUNCTS.iter().find(|p| rest.starts_with(**p)) {
                Some(p) => {
                    out.push(Tok::Punct(p));
                    i += p.len();
                }
                None => {
                    let ch = rest.chars().next().unwrap_or('?');
                    return Err(format!("unexpected '{ch}'"));
                }
            }
        }
    }
    Ok(out)
}

/// strtoull(s, NULL, 0): the longest valid prefix, 0 if none.
fn strtoull(s: &str) -> u64 {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    let mut v: u64 = 0;
    for c in digits.chars() {
        let Some(d) = c.to_digit(radix) else { break };
        v = v.wrapping_mul(radix as u64).wrapping_add(d as u64);
    }
    v
}

// ---------------------------------------------------------------------------
// Expressions
// ---------------------------------------------------------------------------

/// A binary operator of the print fmt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bin {
    Or,
    And,
    BitOr,
    BitXor,
    BitAnd,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Shl,
    Shr,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

/// An argument of the print fmt.
#[derive(Clone, Debug)]
pub enum Expr {
    Num(u64),
    Str(String),
    /// `REC->name` (index into the format's fields).
    Field(usize),
    /// `__get_str(name)`.
    GetStr(usize),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    BitNot(Box<Expr>),
    /// A cast: the mask it applies (u64::MAX for none).
    Cast(u64, Box<Expr>),
    Bin(Bin, Box<Expr>, Box<Expr>),
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
    /// `__print_flags(val, delim, {v, "name"}, ...)`.
    Flags(Box<Expr>, String, Vec<(u64, String)>),
    /// `__print_symbolic(val, {v, "name"}, ...)`.
    Symbolic(Box<Expr>, Vec<(u64, String)>),
}

struct P<'a> {
    t: &'a [Tok],
    i: usize,
    fmt: &'a Format,
    depth: u32,
}

const TYPE_WORDS: &[&str] = &[
    "unsigned", "signed", "int", "long", "short", "char", "void", "struct", "enum", "union", "const", "volatile", "bool",
    "_Bool", "u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "__u8", "__u16", "__u32", "__u64", "__s8", "__s16",
    "__s32", "__s64",
];

impl<'a> P<'a> {
    fn peek(&self) -> Option<&'a Tok> {
        self.t.get(self.i)
    }
    fn punct(&self, p: &str) -> bool {
        matches!(self.peek(), Some(Tok::Punct(q)) if *q == p)
    }
    fn eat(&mut self, p: &str) -> Result<(), String> {
        if self.punct(p) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected '{p}' at token {}", self.i))
        }
    }

    fn expr(&mut self) -> Result<Expr, String> {
        self.depth += 1;
        if self.depth > 200 {
            return Err("expression nested too deeply".into());
        }
        let c = self.binary(0)?;
        let r = if self.punct("?") {
            self.i += 1;
            let a = self.expr()?;
            self.eat(":")?;
            let b = self.expr()?;
            Expr::Cond(Box::new(c), Box::new(a), Box::new(b))
        } else {
            c
        };
        self.depth -= 1;
        Ok(r)
    }

    fn bin_op(&self) -> Option<(Bin, u8)> {
        let Some(Tok::Punct(p)) = self.peek() else { return None };
        Some(match *p {
            "||" => (Bin::Or, 1),
            "&&" => (Bin::And, 2),
            "|" => (Bin::BitOr, 3),
            "^" => (Bin::BitXor, 4),
            "&" => (Bin::BitAnd, 5),
            "==" => (Bin::Eq, 6),
            "!=" => (Bin::Ne, 6),
            "<" => (Bin::Lt, 7),
            ">" => (Bin::Gt, 7),
            "<=" => (Bin::Le, 7),
            ">=" => (Bin::Ge, 7),
            "<<" => (Bin::Shl, 8),
            ">>" => (Bin::Shr, 8),
            "+" => (Bin::Add, 9),
            "-" => (Bin::Sub, 9),
            "*" => (Bin::Mul, 10),
            "/" => (Bin::Div, 10),
            "%" => (Bin::Rem, 10),
            _ => return None,
        })
    }

    fn binary(&mut self, min: u8) -> Result<Expr, String> {
        let mut l = self.unary()?;
        while let Some((op, prec)) = self.bin_op() {
            if prec <= min {
                break;
            }
            self.i += 1;
            let r = self.binary(prec)?;
            l = Expr::Bin(op, Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        self.depth += 1;
        if self.depth > 200 {
            return Err("expression nested too deeply".into());
        }
        let r = match self.peek() {
            Some(Tok::Punct("-")) => {
                self.i += 1;
                Expr::Neg(Box::new(self.unary()?))
            }
            Some(Tok::Punct("+")) => {
                self.i += 1;
                self.unary()?
            }
            Some(Tok::Punct("!")) => {
                self.i += 1;
                Expr::Not(Box::new(self.unary()?))
            }
            Some(Tok::Punct("~")) => {
                self.i += 1;
                Expr::BitNot(Box::new(self.unary()?))
            }
            Some(Tok::Punct("(")) => {
                if let Some((mask, after)) = self.cast_at(self.i) {
                    self.i = after;
                    Expr::Cast(mask, Box::new(self.unary()?))
                } else {
                    self.i += 1;
                    let e = self.expr()?;
                    self.eat(")")?;
                    e
                }
            }
            _ => self.primary()?,
        };
        self.depth -= 1;
        Ok(r)
    }

    /// `( type words [*] )` at token `at`: the mask and the index after `)`.
    fn cast_at(&self, at: usize) -> Option<(u64, usize)> {
        let mut j = at + 1;
        let mut words: Vec<&str> = Vec::new();
        let mut pointer = false;
        loop {
            match self.t.get(j)? {
                Tok::Ident(w) if !pointer => words.push(w),
                Tok::Punct("*") => pointer = true,
                Tok::Punct(")") => break,
                _ => return None,
            }
            j += 1;
        }
        let first = *words.first()?;
        let is_type = pointer || TYPE_WORDS.contains(&first) || first.ends_with("_t");
        if !is_type {
            return None;
        }
        // The next token must start an operand.
        match self.t.get(j + 1)? {
            Tok::Punct("(") | Tok::Punct("-") | Tok::Punct("!") | Tok::Punct("~") => {}
            Tok::Punct(_) => return None,
            _ => {}
        }
        // eval_type_str: pointers and structs pass through, the rest by name.
        let ty = words.join(" ");
        let ty = ty.strip_prefix("unsigned ").unwrap_or(&ty);
        let mask = if pointer || ty.starts_with("struct") {
            u64::MAX
        } else {
            match ty {
                "u8" | "s8" | "char" => 0xff,
                "u16" | "s16" | "short" => 0xffff,
                "u32" | "s32" | "int" => 0xffff_ffff,
                _ => u64::MAX,
            }
        };
        Some((mask, j + 1))
    }

    fn field_name(&mut self) -> Result<usize, String> {
        match self.peek() {
            Some(Tok::Ident(n)) => {
                self.i += 1;
                self.fmt.field(n).ok_or_else(|| format!("no field '{n}'"))
            }
            _ => Err("expected a field name".into()),
        }
    }

    fn table(&mut self) -> Result<Vec<(u64, String)>, String> {
        let mut v = Vec::new();
        while self.punct(",") {
            self.i += 1;
            self.eat("{")?;
            let val = eval_const(&self.expr()?);
            self.eat(",")?;
            let name = match self.expr()? {
                Expr::Str(s) => Some(s),
                _ => None, // `{ 0, ((void *)0) }`: never printed
            };
            self.eat("}")?;
            if let Some(name) = name {
                v.push((val, name));
            }
        }
        Ok(v)
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let Some(t) = self.peek() else { return Err("unexpected end".into()) };
        self.i += 1;
        Ok(match t {
            Tok::Num(n) => Expr::Num(strtoull(n)),
            Tok::Str(s) => {
                let mut s = s.clone();
                while let Some(Tok::Str(more)) = self.peek() {
                    s.push_str(more);
                    self.i += 1;
                }
                Expr::Str(s)
            }
            Tok::Ident(id) if id == "REC" => {
                self.eat("->")?;
                Expr::Field(self.field_name()?)
            }
            Tok::Ident(id) if self.punct("(") => {
                self.i += 1;
                let e = match id.as_str() {
                    "__get_str" => Expr::GetStr(self.field_name()?),
                    "__print_flags" => {
                        let v = self.expr()?;
                        self.eat(",")?;
                        let delim = match self.expr()? {
                            Expr::Str(s) => s,
                            _ => return Err("__print_flags: delimiter is not a string".into()),
                        };
                        Expr::Flags(Box::new(v), delim, self.table()?)
                    }
                    "__print_symbolic" => {
                        let v = self.expr()?;
                        Expr::Symbolic(Box::new(v), self.table()?)
                    }
                    other => return Err(format!("function {other}() is not supported")),
                };
                self.eat(")")?;
                e
            }
            // An atom libtraceevent cannot know (vmemmap_base): strtoull -> 0.
            Tok::Ident(_) => Expr::Num(0),
            Tok::Punct(p) => return Err(format!("unexpected '{p}'")),
        })
    }
}

fn eval_const(e: &Expr) -> u64 {
    eval(e, &Format::default(), &[])
}

/// eval_num_arg: u64 arithmetic on the record's fields.
fn eval(e: &Expr, f: &Format, raw: &[u8]) -> u64 {
    match e {
        Expr::Num(n) => *n,
        Expr::Str(_) | Expr::GetStr(_) | Expr::Flags(..) | Expr::Symbolic(..) => 0,
        Expr::Field(i) => f.read_num(raw, *i),
        Expr::Neg(x) => eval(x, f, raw).wrapping_neg(),
        Expr::Not(x) => (eval(x, f, raw) == 0) as u64,
        Expr::BitNot(x) => !eval(x, f, raw),
        Expr::Cast(mask, x) => eval(x, f, raw) & mask,
        Expr::Cond(c, a, b) => {
            if eval(c, f, raw) != 0 {
                eval(a, f, raw)
            } else {
                eval(b, f, raw)
            }
        }
        Expr::Bin(op, l, r) => {
            let a = eval(l, f, raw);
            let b = eval(r, f, raw);
            match op {
                Bin::Or => (a != 0 || b != 0) as u64,
                Bin::And => (a != 0 && b != 0) as u64,
                Bin::BitOr => a | b,
                Bin::BitXor => a ^ b,
                Bin::BitAnd => a & b,
                Bin::Eq => (a == b) as u64,
                Bin::Ne => (a != b) as u64,
                Bin::Lt => (a < b) as u64,
                Bin::Gt => (a > b) as u64,
                Bin::Le => (a <= b) as u64,
                Bin::Ge => (a >= b) as u64,
                Bin::Shl => a.checked_shl(b as u32).unwrap_or(0),
                Bin::Shr => a.checked_shr(b as u32).unwrap_or(0),
                Bin::Add => a.wrapping_add(b),
                Bin::Sub => a.wrapping_sub(b),
                Bin::Mul => a.wrapping_mul(b),
                Bin::Div => a.checked_div(b).unwrap_or(0),
                Bin::Rem => a.checked_rem(b).unwrap_or(0),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Conversions and the program
// ---------------------------------------------------------------------------

/// A printf conversion of the print fmt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub minus: bool,
    pub zero: bool,
    pub plus: bool,
    pub space: bool,
    pub hash: bool,
    pub width: usize,
    pub precision: Option<usize>,
    /// Integer width in bits from the length modifier (none = int).
    pub bits: u8,
    /// d i u x X o c s p
    pub conv: u8,
    /// `%p` extension: S s F f B (function names), or 0.
    pub ext: u8,
}

impl Spec {
    pub fn signed(&self) -> bool {
        matches!(self.conv, b'd' | b'i')
    }
    pub fn is_integer(&self) -> bool {
        matches!(self.conv, b'd' | b'i' | b'u' | b'x' | b'X' | b'o')
    }
    /// A plain `%p` (glibc's pointer text).
    pub fn is_pointer(&self) -> bool {
        self.conv == b'p' && self.ext == 0
    }
    /// `%pS`/`%ps`/`%pF`/`%pf`/`%pB`: a function name.
    pub fn is_function(&self) -> bool {
        self.conv == b'p' && self.ext != 0
    }
    /// The value as the conversion sees it: masked to its length, and for a
    /// signed conversion sign-extended.
    pub fn cast(&self, v: u64) -> u64 {
        if !self.is_integer() || self.bits >= 64 {
            return v;
        }
        let mask = (1u64 << self.bits) - 1;
        let v = v & mask;
        if self.signed() && v >> (self.bits - 1) & 1 == 1 {
            v | !mask
        } else {
            v
        }
    }
}

/// One conversion with the text before it.
#[derive(Clone, Debug)]
pub struct Conv {
    /// The key this value is printed after (`ptr` for `ptr=%p`, `va_start`
    /// for `va_start: %lu`), or "" when the literal before it has none.
    pub key: String,
    /// Literal text between `key=` and the conversion (`0x` in `pfn=0x%lx`).
    pub prefix: String,
    /// Literal text right after the conversion, up to a space (`B` in `%ldB`).
    pub suffix: String,
    pub spec: Spec,
    pub arg: Expr,
}

#[derive(Clone, Debug)]
enum Seg {
    Lit(String),
    Conv(usize),
}

/// A compiled print fmt.
#[derive(Clone, Debug)]
pub struct Program {
    segs: Vec<Seg>,
    convs: Vec<Conv>,
}

/// Resolves `%pS` addresses: (name, symbol start).
pub trait Symbols {
    fn lookup(&self, addr: u64) -> Option<(&str, u64)>;
}

/// No symbols: every `%pS` prints the raw address.
pub struct NoSymbols;
impl Symbols for NoSymbols {
    fn lookup(&self, _: u64) -> Option<(&str, u64)> {
        None
    }
}

/// A value as a key's conversion prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Val {
    Num(u64),
    Str(String),
}

fn parse_fmt_string(s: &str) -> Result<(Vec<Seg>, Vec<Spec>), String> {
    let b = s.as_bytes();
    let mut segs = Vec::new();
    let mut specs = Vec::new();
    let mut lit = String::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            let st = i;
            while i < b.len() && b[i] != b'%' {
                i += 1;
            }
            lit.push_str(&s[st..i]);
            continue;
        }
        i += 1;
        if b.get(i) == Some(&b'%') {
            lit.push('%');
            i += 1;
            continue;
        }
        let mut sp = Spec {
            minus: false,
            zero: false,
            plus: false,
            space: false,
            hash: false,
            width: 0,
            precision: None,
            bits: 32,
            conv: 0,
            ext: 0,
        };
        while let Some(&c) = b.get(i) {
            match c {
                b'-' => sp.minus = true,
                b'0' => sp.zero = true,
                b'+' => sp.plus = true,
                b' ' => sp.space = true,
                b'#' => sp.hash = true,
                _ => break,
            }
            i += 1;
        }
        while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            sp.width = sp.width.saturating_mul(10).saturating_add((c - b'0') as usize).min(4096);
            i += 1;
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            let mut p = 0usize;
            while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
                p = p.saturating_mul(10).saturating_add((c - b'0') as usize).min(4096);
                i += 1;
            }
            sp.precision = Some(p);
        }
        if b.get(i) == Some(&b'*') {
            return Err("'*' widths are not supported".into());
        }
        let mut ls = 0i8;
        while let Some(&c) = b.get(i) {
            match c {
                b'h' => ls -= 1,
                b'l' | b'z' | b'Z' | b't' | b'j' => ls += 1,
                b'L' | b'q' => ls += 2,
                _ => break,
            }
            i += 1;
        }
        sp.bits = match ls {
            i8::MIN..=-2 => 8,
            -1 => 16,
            0 => 32,
            _ => 64,
        };
        let Some(&conv) = b.get(i) else { return Err("conversion at the end of the format".into()) };
        i += 1;
        match conv {
            b'd' | b'i' | b'u' | b'x' | b'X' | b'o' | b'c' | b's' => {}
            b'p' => {
                sp.bits = 64;
                match b.get(i) {
                    Some(&e @ (b'S' | b's' | b'F' | b'f' | b'B')) => {
                        sp.ext = e;
                        i += 1;
                    }
                    Some(b'K') => i += 1,
                    Some(e) if e.is_ascii_alphabetic() => {
                        return Err(format!("%p{} is not supported", *e as char));
                    }
                    _ => {}
                }
            }
            other => return Err(format!("conversion '%{}' is not supported", other as char)),
        }
        sp.conv = conv;
        if !lit.is_empty() {
            segs.push(Seg::Lit(std::mem::take(&mut lit)));
        }
        segs.push(Seg::Conv(specs.len()));
        specs.push(sp);
    }
    if !lit.is_empty() {
        segs.push(Seg::Lit(lit));
    }
    Ok((segs, specs))
}

impl Program {
    /// Compile a format's print fmt.
    pub fn compile(f: &Format) -> Result<Program, String> {
        let toks = tokenize(&f.print_fmt)?;
        let mut p = P { t: &toks, i: 0, fmt: f, depth: 0 };
        let fmt = match p.primary()? {
            Expr::Str(s) => s,
            _ => return Err("print fmt does not start with a string".into()),
        };
        let (segs, specs) = parse_fmt_string(&fmt)?;
        let mut args = Vec::new();
        while p.punct(",") {
            p.i += 1;
            args.push(p.expr()?);
        }
        if p.i != toks.len() {
            return Err(format!("unexpected tokens after the arguments (token {})", p.i));
        }
        if args.len() != specs.len() {
            return Err(format!("{} conversions but {} arguments", specs.len(), args.len()));
        }
        let mut convs: Vec<Conv> = Vec::with_capacity(specs.len());
        for (k, (spec, arg)) in specs.into_iter().zip(args).enumerate() {
            // The literal text before and after this conversion.
            let pos = segs.iter().position(|s| matches!(s, Seg::Conv(c) if *c == k)).unwrap_or(0);
            let before = match pos.checked_sub(1).and_then(|j| segs.get(j)) {
                Some(Seg::Lit(l)) => l.as_str(),
                _ => "",
            };
            let after = match segs.get(pos + 1) {
                Some(Seg::Lit(l)) => l.as_str(),
                Some(Seg::Conv(_)) => "\u{0}", // glued to the next conversion
                None => "",
            };
            let tok = before.rsplit(' ').next().unwrap_or("");
            let (key, prefix) = match tok.split_once('=') {
                Some((k, pre)) => (k.to_string(), pre.to_string()),
                None if tok.is_empty() && before.ends_with(' ') => {
                    // `va_start: %lu`: the key is the token before the space.
                    let t = before.trim_end();
                    let prev = t.rsplit(' ').next().unwrap_or("");
                    (prev.strip_suffix(':').unwrap_or("").to_string(), String::new())
                }
                None => (String::new(), tok.to_string()),
            };
            let suffix = after.split(' ').next().unwrap_or("").to_string();
            convs.push(Conv { key, prefix, suffix, spec, arg });
        }
        Ok(Program { segs, convs })
    }

    pub fn convs(&self) -> &[Conv] {
        &self.convs
    }

    /// The conversion printed after `key=`.
    pub fn conv(&self, key: &str) -> Option<usize> {
        self.convs.iter().position(|c| c.key == key)
    }

    /// A conversion's argument as a number (eval_num_arg).
    #[inline]
    pub fn value(&self, f: &Format, raw: &[u8], conv: usize) -> u64 {
        self.convs.get(conv).map_or(0, |c| eval(&c.arg, f, raw))
    }

    /// The fields a conversion's argument reads (for memoizing by them).
    pub fn fields_read(&self, conv: usize) -> Vec<usize> {
        fn walk(e: &Expr, out: &mut Vec<usize>) {
            match e {
                Expr::Field(i) | Expr::GetStr(i) => {
                    if !out.contains(i) {
                        out.push(*i)
                    }
                }
                Expr::Num(_) | Expr::Str(_) => {}
                Expr::Neg(x) | Expr::Not(x) | Expr::BitNot(x) | Expr::Cast(_, x) => walk(x, out),
                Expr::Bin(_, a, b) => {
                    walk(a, out);
                    walk(b, out)
                }
                Expr::Cond(c, a, b) => {
                    walk(c, out);
                    walk(a, out);
                    walk(b, out)
                }
                Expr::Flags(x, ..) | Expr::Symbolic(x, _) => walk(x, out),
            }
        }
        let mut v = Vec::new();
        if let Some(c) = self.convs.get(conv) {
            walk(&c.arg, &mut v);
        }
        v
    }

    /// The text one conversion prints (without the literal around it).
    pub fn render_conv(&self, f: &Format, raw: &[u8], conv: usize, syms: &dyn Symbols, out: &mut String) {
        if let Some(c) = self.convs.get(conv) {
            print_conv(&c.spec, &c.arg, f, raw, syms, out);
        }
    }

    /// The literal text with each conversion `k` replaced by `\u{1}k\u{2}`.
    pub(crate) fn render_template(&self, out: &mut String) {
        for s in &self.segs {
            match s {
                Seg::Lit(l) => out.push_str(l),
                Seg::Conv(k) => {
                    let _ = write!(out, "\u{1}{k}\u{2}");
                }
            }
        }
    }

    /// The whole text, as `perf script` prints it after `system:event: `.
    pub fn render(&self, f: &Format, raw: &[u8], syms: &dyn Symbols, out: &mut String) {
        for s in &self.segs {
            match s {
                Seg::Lit(l) => out.push_str(l),
                Seg::Conv(k) => self.render_conv(f, raw, *k, syms, out),
            }
        }
    }
}

/// The string value of a `%s` argument (print_str_arg).
fn str_arg(e: &Expr, f: &Format, raw: &[u8], out: &mut String) {
    match e {
        Expr::Str(s) => out.push_str(s),
        Expr::GetStr(i) => out.push_str(&String::from_utf8_lossy(f.read_str(raw, *i))),
        Expr::Field(i) if f.fields.get(*i).is_some_and(|x| x.kind != FieldKind::Scalar) => {
            out.push_str(&String::from_utf8_lossy(f.read_str(raw, *i)))
        }
        Expr::Cond(c, a, b) => {
            if eval(c, f, raw) != 0 {
                str_arg(a, f, raw, out)
            } else {
                str_arg(b, f, raw, out)
            }
        }
        Expr::Flags(v, delim, table) => {
            let mut val = eval(v, f, raw);
            let mut printed = false;
            for (fv, name) in table {
                let fv = *fv;
                if val == 0 && (fv as i64) < 0 {
                    out.push_str(name);
                    break;
                }
                if (fv as i64) > 0 && val & fv == fv {
                    if printed {
                        out.push_str(delim);
                    }
                    out.push_str(name);
                    printed = true;
                    val &= !fv;
                }
            }
            if val != 0 {
                if printed {
                    out.push_str(delim);
                }
                let _ = write!(out, "0x{val:x}");
            }
        }
        Expr::Symbolic(v, table) => {
            let val = eval(v, f, raw);
            match table.iter().find(|(fv, _)| *fv == val) {
                Some((_, name)) => out.push_str(name),
                None => {
                    let _ = write!(out, "0x{val:x}");
                }
            }
        }
        other => {
            let _ = write!(out, "{}", eval(other, f, raw));
        }
    }
}

fn pad(out: &mut String, body: &str, sp: &Spec, numeric: bool) {
    let n = body.chars().count();
    if sp.width <= n {
        out.push_str(body);
    } else if sp.minus {
        out.push_str(body);
        out.extend(std::iter::repeat_n(' ', sp.width - n));
    } else if sp.zero && numeric {
        // Zeros go after a sign or 0x.
        let split = if body.starts_with("0x") || body.starts_with("0X") {
            2
        } else if body.starts_with(['-', '+', ' ']) {
            1
        } else {
            0
        };
        out.push_str(&body[..split]);
        out.extend(std::iter::repeat_n('0', sp.width - n));
        out.push_str(&body[split..]);
    } else {
        out.extend(std::iter::repeat_n(' ', sp.width - n));
        out.push_str(body);
    }
}

fn print_conv(sp: &Spec, arg: &Expr, f: &Format, raw: &[u8], syms: &dyn Symbols, out: &mut String) {
    match sp.conv {
        b's' => {
            let mut s = String::new();
            str_arg(arg, f, raw, &mut s);
            if let Some(p) = sp.precision {
                if let Some((i, _)) = s.char_indices().nth(p) {
                    s.truncate(i);
                }
            }
            pad(out, &s, sp, false);
        }
        b'c' => {
            let v = eval(arg, f, raw) as u8;
            pad(out, &(v as char).to_string(), sp, false);
        }
        b'p' => {
            let v = eval(arg, f, raw);
            let mut s = String::new();
            if sp.is_function() {
                let with_off = matches!(sp.ext, b'S' | b'F' | b'B');
                super::kallsyms::format_ps(&mut s, v, syms.lookup(v), with_off);
            } else if v == 0 {
                s.push_str("(nil)");
            } else {
                let _ = write!(s, "0x{v:x}");
            }
            pad(out, &s, sp, false);
        }
        _ => {
            let v = sp.cast(eval(arg, f, raw));
            let mut s = String::new();
            match sp.conv {
                b'd' | b'i' => {
                    let x = v as i64;
                    if x >= 0 && sp.plus {
                        s.push('+');
                    } else if x >= 0 && sp.space {
                        s.push(' ');
                    }
                    let _ = write!(s, "{x}");
                }
                b'u' => {
                    let _ = write!(s, "{v}");
                }
                b'x' => {
                    if sp.hash && v != 0 {
                        s.push_str("0x");
                    }
                    let _ = write!(s, "{v:x}");
                }
                b'X' => {
                    if sp.hash && v != 0 {
                        s.push_str("0X");
                    }
                    let _ = write!(s, "{v:X}");
                }
                _ => {
                    if sp.hash && v != 0 {
                        s.push('0');
                    }
                    let _ = write!(s, "{v:o}");
                }
            }
            pad(out, &s, sp, true);
        }
    }
}

/// The fields of a record by their struct names, for events whose print
/// fmt does not compile: numbers in decimal, strings as text.
pub fn render_fields(f: &Format, raw: &[u8], out: &mut String) {
    let mut first = true;
    for (i, x) in f.fields.iter().enumerate().filter(|(_, x)| !x.common) {
        if !first {
            out.push(' ');
        }
        first = false;
        out.push_str(&x.name);
        out.push('=');
        match x.kind {
            FieldKind::Scalar => {
                let v = f.read_num(raw, i);
                if x.signed {
                    let _ = write!(out, "{}", v as i64);
                } else {
                    let _ = write!(out, "{v}");
                }
            }
            _ => out.push_str(&String::from_utf8_lossy(f.read_str(raw, i))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KMALLOC: &str = r#"name: kmalloc
ID: 658
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:unsigned long call_site;	offset:8;	size:8;	signed:0;
	field:const void * ptr;	offset:16;	size:8;	signed:0;
	field:size_t bytes_req;	offset:24;	size:8;	signed:0;
	field:size_t bytes_alloc;	offset:32;	size:8;	signed:0;
	field:unsigned long gfp_flags;	offset:40;	size:8;	signed:0;
	field:int node;	offset:48;	size:4;	signed:1;

print fmt: "call_site=%pS ptr=%p bytes_req=%zu bytes_alloc=%zu gfp_flags=%s node=%d accounted=%s", (void *)REC->call_site, REC->ptr, REC->bytes_req, REC->bytes_alloc, (REC->gfp_flags) ? __print_flags(REC->gfp_flags, "|", {( unsigned long)((( gfp_t)(((((1UL))) << (10))|((((1UL))) << (11)))) | (( gfp_t)((((1UL))) << (6))) | (( gfp_t)((((1UL))) << (7)))), "GFP_KERNEL"}, {( unsigned long)(( gfp_t)((((1UL))) << (8))), "__GFP_ZERO"}, { 0, ((void *)0) } ) : "none", REC->node, (1 && (REC->gfp_flags & ( unsigned long)(( gfp_t)((((1UL))) << (22))))) ? "true" : "false"
"#;

    struct OneSym;
    impl Symbols for OneSym {
        fn lookup(&self, a: u64) -> Option<(&str, u64)> {
            (0xffffffff81001000..0xffffffff81002000).contains(&a).then_some(("sched_setaffinity", 0xffffffff81001000))
        }
    }

    fn record(call_site: u64, ptr: u64, req: u64, alloc: u64, gfp: u64, node: i32) -> Vec<u8> {
        let mut r = vec![0u8; 52];
        r[8..16].copy_from_slice(&call_site.to_le_bytes());
        r[16..24].copy_from_slice(&ptr.to_le_bytes());
        r[24..32].copy_from_slice(&req.to_le_bytes());
        r[32..40].copy_from_slice(&alloc.to_le_bytes());
        r[40..48].copy_from_slice(&gfp.to_le_bytes());
        r[48..52].copy_from_slice(&node.to_le_bytes());
        r
    }

    #[test]
    fn kmalloc_prints_as_perf_script() {
        let f = Format::parse(KMALLOC, false, 8).unwrap();
        assert_eq!((f.name.as_str(), f.id, f.fields.len()), ("kmalloc", 658, 10));
        assert!(f.fields[3].common && !f.fields[4].common);
        let p = Program::compile(&f).unwrap();
        let raw = record(0xffffffff81001127, 0xffff8881048edda0, 32, 32, 0xcc0, -1);
        let mut s = String::new();
        p.render(&f, &raw, &OneSym, &mut s);
        assert_eq!(
            s,
            "call_site=sched_setaffinity+0x127 ptr=0xffff8881048edda0 bytes_req=32 bytes_alloc=32 gfp_flags=GFP_KERNEL node=-1 accounted=false"
        );
        let raw = record(0x1234, 0, 8, 8, 0xcc0 | 0x100 | 0x400000 | 0x1000000, 0);
        s.clear();
        p.render(&f, &raw, &NoSymbols, &mut s);
        assert_eq!(
            s,
            "call_site=0x1234 ptr=(nil) bytes_req=8 bytes_alloc=8 gfp_flags=GFP_KERNEL|__GFP_ZERO|0x1400000 node=0 accounted=true"
        );
        let raw = record(0x1234, 0, 8, 8, 0, 0);
        s.clear();
        p.render(&f, &raw, &NoSymbols, &mut s);
        assert!(s.contains("gfp_flags=none "), "{s}");
        let c = p.conv("node").unwrap();
        assert_eq!(p.convs()[c].spec.cast(p.value(&f, &raw, c)), 0);
        assert_eq!(p.conv("accounted"), Some(6));
        assert_eq!(p.fields_read(4), vec![8]);
    }

    #[test]
    fn keys_prefixes_and_colon_keys() {
        let text = "name: x\nID: 1\nformat:\n\tfield:unsigned long addr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:long size;\toffset:16;\tsize:8;\tsigned:1;\n\nprint fmt: \"va_start: %lu pfn=0x%lx size=%ldB\", REC->addr, REC->addr, REC->size\n";
        let f = Format::parse(text, false, 8).unwrap();
        let p = Program::compile(&f).unwrap();
        let keys: Vec<(&str, &str, &str)> =
            p.convs().iter().map(|c| (c.key.as_str(), c.prefix.as_str(), c.suffix.as_str())).collect();
        assert_eq!(keys, vec![("va_start", "", ""), ("pfn", "0x", ""), ("size", "", "B")]);
        let mut raw = vec![0u8; 24];
        raw[8..16].copy_from_slice(&0xffffc90000000000u64.to_le_bytes());
        raw[16..24].copy_from_slice(&(-4096i64).to_le_bytes());
        let mut s = String::new();
        p.render(&f, &raw, &NoSymbols, &mut s);
        assert_eq!(s, "va_start: 18446683600570023936 pfn=0xffffc90000000000 size=-4096B");
    }

    #[test]
    fn casts_ternaries_symbolic_and_widths() {
        let text = "name: y\nID: 2\nformat:\n\tfield:unsigned long pfn;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:int member;\toffset:16;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] name;\toffset:20;\tsize:4;\tsigned:0;\n\nprint fmt: \"page=%p pfn=0x%lx order=%d type=%s name=%s w=%-4d|%05x\", REC->pfn != -1UL ? (((struct page *)vmemmap_base) + (REC->pfn)) : ((void *)0), REC->pfn != -1UL ? REC->pfn : 0, (((unsigned int)((21 - 12))) < ((unsigned int)(10)) ? ((unsigned int)((21 - 12))) : ((unsigned int)(10))), __print_symbolic(REC->member, { 0, \"MM_FILEPAGES\" }, { 1, \"MM_ANONPAGES\" }), __get_str(name), REC->member, REC->member\n";
        let f = Format::parse(text, false, 8).unwrap();
        assert_eq!(f.fields[2].kind, FieldKind::DataLoc);
        let p = Program::compile(&f).unwrap();
        let mut raw = vec![0u8; 32];
        raw[8..16].copy_from_slice(&0x1fb111u64.to_le_bytes());
        raw[16..20].copy_from_slice(&1i32.to_le_bytes());
        raw[20..24].copy_from_slice(&((4u32 << 16) | 24).to_le_bytes());
        raw[24..28].copy_from_slice(b"dma\0");
        let mut s = String::new();
        p.render(&f, &raw, &NoSymbols, &mut s);
        assert_eq!(s, "page=0x1fb111 pfn=0x1fb111 order=9 type=MM_ANONPAGES name=dma w=1   |00001");
        raw[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        raw[16..20].copy_from_slice(&7i32.to_le_bytes());
        s.clear();
        p.render(&f, &raw, &NoSymbols, &mut s);
        assert!(s.starts_with("page=(nil) pfn=0x0 order=9 type=0x7 "), "{s}");
    }

    #[test]
    fn unsupported_formats_are_errors_not_panics() {
        for pf in [
            "\"%pM\", REC->a",
            "\"x=%d\", foo(REC->a)",
            "\"x=%d\"",
            "\"x=%d\", REC->nope",
            "\"x=%*d\", 1, 2",
            "\"unterminated",
            "REC->a",
            "\"x=%d\", ((((((",
            "",
        ] {
            let text = format!("name: z\nID: 3\nformat:\n\tfield:int a;\toffset:8;\tsize:4;\tsigned:1;\n\nprint fmt: {pf}\n");
            let f = Format::parse(&text, false, 8).unwrap();
            assert!(Program::compile(&f).is_err(), "{pf}");
        }
        // A short record reads zeros, never out of bounds.
        let f = Format::parse(KMALLOC, false, 8).unwrap();
        let p = Program::compile(&f).unwrap();
        let mut s = String::new();
        p.render(&f, &[1, 2, 3], &NoSymbols, &mut s);
        assert!(s.starts_with("call_site=0x0 ptr=(nil)"), "{s}");
        s.clear();
        render_fields(&f, &record(1, 2, 3, 4, 5, -6), &mut s);
        assert_eq!(s, "call_site=1 ptr=2 bytes_req=3 bytes_alloc=4 gfp_flags=5 node=-6");
    }
}
