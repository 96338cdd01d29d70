//! A tracepoint's `format` description (tracefs `events/SYS/NAME/format`, as
//! stored in perf.data's tracing data): its fields with their offsets and
//! sizes, and its `print fmt` compiled into a small program that reads the
//! fields of a raw record and prints them exactly as libtraceevent prints
//! them for `perf script`.
//!
//! The program is compiled once per event. [`Program::render`] prints a
//! whole record (what `perf script` shows after the event name);
//! [`Program::convs`] exposes each conversion with the `key=` text before it,
//! so a caller can read just the keys it needs ([`Program::value`],
//! [`Spec::cast`], [`Program::render_conv`]) without printing the rest.
//!
//! # Kernel
//! Format files: `kernel/trace/trace_events.c` (`f_show`: `\tfield:TYPE
//! NAME;\toffset:N;\tsize:N;\tsigned:N;`, a blank line after the common
//! fields, then `print fmt: "..." , args`). Parsing and printing follow
//! libtraceevent as perf 6.1 links it (`tools/lib/traceevent/event-parse.c`),
//! function by function, because its grouping is not C's: `__read_token`
//! (token classes, `->`, doubled and `=`-ended operators, adjacent strings
//! joined), `process_arg_token`/`process_paren` (a parenthesised atom
//! followed by an operand is a typecast; `(void *)` via the `*` + `)` rule),
//! `process_op` (priorities of `get_op_prio`, and the "rotate ops according
//! to the priority" step: in `a < (b < c ? d : e)` the `?` ends up at the
//! top, so perf prints `fragmenting=10` for mm_page_alloc_extfrag),
//! `process_cond`, `process_flags`/`process_symbols`/`process_fields` (flag
//! tables through `arg_eval`/`arg_num_eval`, long long arithmetic),
//! `eval_num_arg` (u64 arithmetic, fields read unsigned, casts by
//! `eval_type_str`, unknown atoms such as `vmemmap_base` are 0),
//! `print_str_arg` (`__print_flags`: names of the set bits joined by the
//! delimiter, leftover bits `0x%llx`; `__print_symbolic`: the name or
//! `0x%llx`; a `long`-sized field under `%s` prints `%llx`),
//! `parse_arg_format` (`h`/`l`/`L` set the cast, `z` does not: `%zu` of
//! 0x100000005 prints 5; an unknown conversion letter prints `>c<`),
//! `print_arg_number` then glibc's printf, `print_function` (`%pS`:
//! `name+0x%llx` or `0x%llx`), glibc's `%p` (`0x%lx`, `(nil)` for 0).
//!
//! SIMPLIFICATION: print fmt constructs libtraceevent knows but no kmem,
//! percpu or vmalloc event uses (`__print_hex`, `__print_array`,
//! `__get_bitmask`, `__get_dynamic_array`, `%pM`/`%pI`/`%pU`/`%ph`, `*`
//! widths, `[` indexing, functions registered by plugins) do not compile;
//! the caller then prints the fields as libtraceevent's `tep_print_fields`
//! does ([`render_fields`]).
//!
//! # Invariants
//! - tp-format-1: compiling and running a program never panics, whatever
//!   the format text and the record bytes (reads outside the record give 0
//!   or an empty string; nesting is bounded).
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

    /// A field as libtraceevent's `tep_read_number` reads it: unsigned.
    #[inline]
    pub fn read_unsigned(&self, raw: &[u8], i: usize) -> u64 {
        let Some(f) = self.fields.get(i) else { return 0 };
        read_scalar(raw, f.offset, f.size, false, self.big_endian)
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
// Tokens (event-parse.c get_type, __read_token)
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tt {
    None,
    Op,
    Delim,
    Item,
    Dquote,
    Squote,
}

impl Tt {
    /// event_item_type: ITEM, DQUOTE, SQUOTE.
    fn is_item(self) -> bool {
        matches!(self, Tt::Item | Tt::Dquote | Tt::Squote)
    }
}

fn char_type(c: u8) -> Option<Tt> {
    Some(match c {
        _ if c.is_ascii_alphanumeric() || c == b'_' => Tt::Item,
        b'\'' => Tt::Squote,
        b'"' => Tt::Dquote,
        b'(' | b')' | b',' => Tt::Delim,
        _ if c.is_ascii_graphic() => Tt::Op,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// The argument tree (struct tep_print_arg)
// ---------------------------------------------------------------------------

/// One print fmt argument, as libtraceevent parses it.
#[derive(Clone, Debug, Default)]
pub enum Arg {
    #[default]
    Null,
    Atom(String),
    /// `REC->name`: a field index.
    Field(usize),
    /// `(type)item`.
    Type(String, Box<Arg>),
    Op {
        op: String,
        left: Option<Box<Arg>>,
        right: Option<Box<Arg>>,
        prio: i32,
    },
    /// `__print_flags(field, delim, {value, str}...)`.
    Flags(Box<Arg>, Option<String>, Vec<(String, String)>),
    /// `__print_symbolic(field, {value, str}...)`.
    Symbol(Box<Arg>, Vec<(String, String)>),
    /// `__get_str(field)` (None: no such field, prints nothing).
    Str(Option<usize>),
}

/// get_op_prio
fn op_prio(op: &str) -> i32 {
    match op {
        "~" | "!" => 4,
        "*" | "/" | "%" => 6,
        "+" | "-" => 7,
        "<<" | ">>" => 8,
        "<" | ">" | "<=" | ">=" => 9,
        "==" | "!=" => 10,
        "&" => 11,
        "^" => 12,
        "|" => 13,
        "&&" => 14,
        "||" => 15,
        "?" => 16,
        "++" | "--" => 3,
        _ => -1,
    }
}

const BINARY: &[&str] =
    &[">>", "<<", "&", "|", "&&", "||", "-", "+", "*", "^", "/", "%", "<", ">", "<=", ">=", "==", "!="];

type R = Result<(Tt, String), String>;

/// The print fmt parser: a port of libtraceevent's recursive `process_*`
/// functions, quirks included (its operator "rotation" and the
/// typecast-after-parenthesis rule decide how an expression groups).
struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    fmt: &'a Format,
    depth: u32,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    /// read_token_item: the next token, spaces and newlines skipped.
    fn token(&mut self) -> (Tt, String) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
        let Some(ch) = self.peek() else { return (Tt::None, String::new()) };
        let Some(ty) = char_type(ch) else {
            self.pos = self.s.len();
            return (Tt::None, String::new());
        };
        self.pos += 1;
        let mut buf = vec![ch];
        match ty {
            Tt::Delim => {}
            Tt::Op => {
                let test_equal = |p: &mut Self, buf: &mut Vec<u8>| {
                    if p.peek() == Some(b'=') {
                        buf.push(b'=');
                        p.pos += 1;
                    }
                };
                match ch {
                    b'-' if self.peek() == Some(b'>') => {
                        buf.push(b'>');
                        self.pos += 1;
                    }
                    b'-' | b'+' | b'|' | b'&' | b'>' | b'<' => {
                        if self.peek() == Some(ch) {
                            buf.push(ch);
                            self.pos += 1;
                            if ch == b'<' || ch == b'>' {
                                test_equal(self, &mut buf);
                            }
                        } else {
                            test_equal(self, &mut buf);
                        }
                    }
                    b'!' | b'=' => test_equal(self, &mut buf),
                    _ => {}
                }
            }
            Tt::Dquote | Tt::Squote => {
                buf.clear();
                loop {
                    let mut last = 0u8;
                    loop {
                        // An unterminated string ends the print fmt (libtraceevent
                        // would read past the end).
                        let Some(c) = self.peek() else { return (Tt::None, String::new()) };
                        self.pos += 1;
                        if c == ch && last != b'\\' {
                            break;
                        }
                        buf.push(c);
                        last = if c == b'\\' && last == b'\\' { 0 } else { c };
                    }
                    // Adjacent strings concatenate.
                    if ty != Tt::Dquote {
                        break;
                    }
                    let save = self.pos;
                    while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                        self.pos += 1;
                    }
                    if self.peek() == Some(b'"') {
                        self.pos += 1;
                        continue;
                    }
                    self.pos = save;
                    break;
                }
            }
            Tt::Item => {
                while self.peek().and_then(char_type) == Some(Tt::Item) {
                    buf.push(self.s[self.pos]);
                    self.pos += 1;
                }
            }
            Tt::None => {}
        }
        (ty, String::from_utf8_lossy(&buf).into_owned())
    }

    fn expect(&self, got: &(Tt, String), ty: Tt, tok: &str) -> Result<(), String> {
        if got.0 == ty && got.1 == tok {
            Ok(())
        } else {
            Err(format!("expected '{tok}' but read '{}'", got.1))
        }
    }

    fn deeper(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > 400 {
            return Err("print fmt nested too deeply".into());
        }
        Ok(())
    }

    fn process_arg(&mut self, arg: &mut Arg) -> R {
        let (ty, tok) = self.token();
        self.process_arg_token(arg, tok, ty)
    }

    fn process_arg_token(&mut self, arg: &mut Arg, tok: String, ty: Tt) -> R {
        self.deeper()?;
        let r = match ty {
            Tt::Item if tok == "REC" => self.process_entry(arg),
            Tt::Item => {
                let mut atom = tok;
                let (mut ty, mut t) = self.token();
                if ty == Tt::Delim && t == "(" {
                    self.process_function(arg, &atom)
                } else {
                    while ty == Tt::Item {
                        atom.push(' ');
                        atom.push_str(&t);
                        (ty, t) = self.token();
                    }
                    *arg = Arg::Atom(atom);
                    Ok((ty, t))
                }
            }
            Tt::Dquote | Tt::Squote => {
                *arg = Arg::Atom(tok);
                Ok(self.token())
            }
            Tt::Delim if tok == "(" => self.process_paren(arg),
            Tt::Delim | Tt::Op => {
                *arg = Arg::Op { op: tok.clone(), left: None, right: None, prio: 0 };
                self.process_op(arg, tok)
            }
            Tt::None => Err("unexpected end of the print fmt".into()),
        };
        self.depth -= 1;
        r
    }

    fn process_entry(&mut self, arg: &mut Arg) -> R {
        let t = self.token();
        self.expect(&t, Tt::Op, "->")?;
        let (ty, name) = self.token();
        if ty != Tt::Item {
            return Err("expected a field name after REC->".into());
        }
        let i = self.fmt.field(&name).ok_or_else(|| format!("field {name} not found"))?;
        *arg = Arg::Field(i);
        Ok(self.token())
    }

    fn process_paren(&mut self, arg: &mut Arg) -> R {
        let (mut ty, mut t) = self.process_arg(arg)?;
        if ty == Tt::Op {
            (ty, t) = self.process_op(arg, t)?;
        }
        self.expect(&(ty, t), Tt::Delim, ")")?;
        let (ty, t) = self.token();
        if ty.is_item() || (ty == Tt::Delim && t == "(") {
            // The parenthesis was a typecast.
            let Arg::Atom(typ) = std::mem::take(arg) else {
                return Err("a typecast of something that is not a type".into());
            };
            let mut item = Arg::Null;
            let r = self.process_arg_token(&mut item, t, ty)?;
            *arg = Arg::Type(typ, Box::new(item));
            return Ok(r);
        }
        Ok((ty, t))
    }

    fn process_function(&mut self, arg: &mut Arg, name: &str) -> R {
        match name {
            "__print_flags" => {
                let mut field = Arg::Null;
                let (mut ty, mut t) = self.process_arg(&mut field)?;
                while ty == Tt::Op {
                    (ty, t) = self.process_op(&mut field, t)?;
                }
                self.expect(&(ty, t), Tt::Delim, ",")?;
                let (mut ty, mut t) = self.token();
                let mut delim = None;
                if ty.is_item() {
                    delim = Some(t);
                    (ty, t) = self.token();
                }
                self.expect(&(ty, t), Tt::Delim, ",")?;
                let (flags, r) = self.process_fields()?;
                self.expect(&r, Tt::Delim, ")")?;
                *arg = Arg::Flags(Box::new(field), delim, flags);
                Ok(self.token())
            }
            "__print_symbolic" => {
                let mut field = Arg::Null;
                let (mut ty, mut t) = self.process_arg(&mut field)?;
                while ty == Tt::Op {
                    (ty, t) = self.process_op(&mut field, t)?;
                }
                self.expect(&(ty, t), Tt::Delim, ",")?;
                let (syms, r) = self.process_fields()?;
                self.expect(&r, Tt::Delim, ")")?;
                *arg = Arg::Symbol(Box::new(field), syms);
                Ok(self.token())
            }
            "__get_str" | "__get_rel_str" => {
                let (ty, name) = self.token();
                if ty != Tt::Item {
                    return Err("__get_str of something that is not a field".into());
                }
                *arg = Arg::Str(self.fmt.field(&name));
                let t = self.token();
                self.expect(&t, Tt::Delim, ")")?;
                Ok(self.token())
            }
            "__builtin_expect" => {
                let (ty, t) = self.process_arg(arg)?;
                self.expect(&(ty, t), Tt::Delim, ",")?;
                let (ty, _) = self.token();
                if ty != Tt::Item {
                    return Err("bad __builtin_expect".into());
                }
                let t = self.token();
                self.expect(&t, Tt::Delim, ")")?;
                Ok(self.token())
            }
            other => Err(format!("function {other}() is not supported")),
        }
    }

    /// process_fields: `{value, str}, ...` (each side through arg_eval).
    #[allow(clippy::type_complexity)]
    fn process_fields(&mut self) -> Result<(Vec<(String, String)>, (Tt, String)), String> {
        let mut list = Vec::new();
        loop {
            let t = self.token();
            if self.expect(&t, Tt::Op, "{").is_err() {
                return Ok((list, t));
            }
            let mut a = Arg::Null;
            let (mut ty, mut t) = self.process_arg(&mut a)?;
            if ty == Tt::Op {
                (ty, t) = self.process_op(&mut a, t)?;
            }
            self.expect(&(ty, t), Tt::Delim, ",")?;
            let value = arg_eval(&a).ok_or("a flag value that is not a constant")?;
            let mut b = Arg::Null;
            let r = self.process_arg(&mut b)?;
            self.expect(&r, Tt::Op, "}")?;
            let name = arg_eval(&b).ok_or("a flag name that is not a constant")?;
            list.push((value, name));
            let t = self.token();
            if !(t.0 == Tt::Delim && t.1 == ",") {
                return Ok((list, t));
            }
        }
    }

    /// process_cond: `top` is the `?` node; parses `a : b` into its right.
    fn process_cond(&mut self, top: &mut Arg) -> R {
        let mut left = Arg::Null;
        let (mut ty, mut t) = self.process_arg(&mut left)?;
        while ty == Tt::Op && t != ":" {
            (ty, t) = self.process_op(&mut left, t)?;
        }
        self.expect(&(ty, t), Tt::Op, ":")?;
        let mut right = Arg::Null;
        let r = self.process_arg(&mut right)?;
        if let Arg::Op { right: r_slot, .. } = top {
            *r_slot = Some(Box::new(Arg::Op {
                op: ":".into(),
                left: Some(Box::new(left)),
                right: Some(Box::new(right)),
                prio: 0,
            }));
        }
        Ok(r)
    }

    fn process_op(&mut self, arg: &mut Arg, tok: String) -> R {
        self.deeper()?;
        let r = self.process_op_inner(arg, tok);
        self.depth -= 1;
        r
    }

    fn process_op_inner(&mut self, arg: &mut Arg, tok: String) -> R {
        // Which child of `arg` is the "right" the continuation may recurse into.
        #[derive(PartialEq)]
        enum Side {
            None,
            Left,
            Right,
        }
        let side;
        let (ty, t);
        let unary = matches!(arg, Arg::Op { left: None, .. });
        if unary {
            if !matches!(tok.as_str(), "~" | "!" | "+" | "-") {
                return Err(format!("bad op token {tok}"));
            }
            let mut right = Arg::Null;
            (ty, t) = self.process_arg(&mut right)?;
            if let Arg::Op { left, right: r, .. } = arg {
                *left = Some(Box::new(Arg::Null));
                *r = Some(Box::new(right));
            }
            side = Side::Right;
        } else if tok == "?" {
            let left = std::mem::take(arg);
            *arg = Arg::Op { op: tok, left: Some(Box::new(left)), right: None, prio: 0 };
            (ty, t) = self.process_cond(arg)?;
            side = Side::None;
        } else if BINARY.contains(&tok.as_str()) {
            let left = std::mem::take(arg);
            let prio = if matches!(left, Arg::Null) { 0 } else { op_prio(&tok) };
            let (nty, nt) = self.token();
            if tok == "*" && nty == Tt::Delim && nt == ")" {
                // A pointer type: `(void *)`.
                let Arg::Atom(mut a) = left else { return Err("bad pointer type".into()) };
                a.push_str(" *");
                *arg = Arg::Atom(a);
                return Ok((nty, nt));
            }
            let mut right = Arg::Null;
            (ty, t) = self.process_arg_token(&mut right, nt, nty)?;
            let rotate = matches!(&right, Arg::Op { op, .. } if op_prio(&tok) < op_prio(op));
            if rotate {
                // "rotate ops according to the priority"
                let Arg::Op { op: rop, left: rleft, right: rright, prio: rprio } = right else { unreachable!() };
                let inner = Arg::Op { op: tok, left: Some(Box::new(left)), right: rleft, prio };
                *arg = Arg::Op { op: rop, left: Some(Box::new(inner)), right: rright, prio: rprio };
                side = Side::Left;
            } else {
                *arg = Arg::Op { op: tok, left: Some(Box::new(left)), right: Some(Box::new(right)), prio };
                side = Side::Right;
            }
        } else {
            return Err(format!("operator '{tok}' is not supported"));
        }
        if ty == Tt::Op && t != ":" {
            let prio = op_prio(&t);
            let arg_prio = match arg {
                Arg::Op { prio, .. } => *prio,
                _ => 0,
            };
            if prio > arg_prio {
                return self.process_op(arg, t);
            }
            let child = match (arg, side) {
                (Arg::Op { left: Some(l), .. }, Side::Left) => l,
                (Arg::Op { right: Some(r), .. }, Side::Right) => r,
                _ => return Err(format!("cannot attach operator '{t}'")),
            };
            return self.process_op(child, t);
        }
        Ok((ty, t))
    }
}

/// strtoull/strtoll(s, NULL, 0): the longest valid prefix, 0 if none.
fn strtoull(s: &str) -> u64 {
    let s = s.trim_start();
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
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
        v = v.saturating_mul(radix as u64).saturating_add(d as u64);
    }
    if neg {
        v.wrapping_neg()
    } else {
        v
    }
}

/// eval_type_str: what a cast keeps.
fn eval_type(val: u64, typ: &str) -> u64 {
    if typ.ends_with('*') || typ.starts_with("struct") {
        return val;
    }
    match typ {
        "u8" | "s8" => return val & 0xff,
        "u16" | "s16" => return val & 0xffff,
        "u32" | "s32" => return val & 0xffff_ffff,
        _ => {}
    }
    match typ.strip_prefix("unsigned ").unwrap_or(typ) {
        "char" => val & 0xff,
        "short" => val & 0xffff,
        "int" => val & 0xffff_ffff,
        _ => val,
    }
}

/// arg_num_eval (long long arithmetic, used for flag tables); None where
/// libtraceevent gives up.
fn arg_num_eval(a: &Arg) -> Option<i64> {
    match a {
        Arg::Atom(s) => Some(strtoull(s) as i64),
        Arg::Type(t, item) => Some(eval_type(arg_num_eval(item)? as u64, t) as i64),
        Arg::Op { op, left, right, .. } => {
            let l = || left.as_deref().and_then(arg_num_eval);
            let r = || right.as_deref().and_then(arg_num_eval);
            let lz = || match left.as_deref() {
                Some(Arg::Null) => Some(0),
                x => x.and_then(arg_num_eval),
            };
            Some(match op.as_str() {
                "|" => l()? | r()?,
                "||" => (l()? != 0 || r()? != 0) as i64,
                "&" => l()? & r()?,
                "&&" => (l()? != 0 && r()? != 0) as i64,
                "<" => (l()? < r()?) as i64,
                "<<" => l()?.wrapping_shl(r()? as u32),
                "<=" => (l()? <= r()?) as i64,
                ">" => (l()? > r()?) as i64,
                ">>" => l()?.wrapping_shr(r()? as u32),
                ">=" => (l()? >= r()?) as i64,
                "==" => (l()? == r()?) as i64,
                "!=" => (l()? != r()?) as i64,
                "-" => lz()?.wrapping_sub(r()?),
                "+" => lz()?.wrapping_add(r()?),
                "~" => !r()?,
                _ => return None,
            })
        }
        _ => None,
    }
}

/// arg_eval: a flag table entry as text.
fn arg_eval(a: &Arg) -> Option<String> {
    match a {
        Arg::Atom(s) => Some(s.clone()),
        Arg::Type(_, item) => arg_eval(item),
        Arg::Op { .. } => arg_num_eval(a).map(|v| v.to_string()),
        _ => None,
    }
}

/// eval_flag: a flag value string as a number.
fn eval_flag(s: &str) -> i64 {
    if s.as_bytes().first().is_some_and(|c| c.is_ascii_digit()) {
        return strtoull(s) as i64;
    }
    const SOFTIRQ: [&str; 10] = [
        "HI_SOFTIRQ", "TIMER_SOFTIRQ", "NET_TX_SOFTIRQ", "NET_RX_SOFTIRQ", "BLOCK_SOFTIRQ", "IRQ_POLL_SOFTIRQ",
        "TASKLET_SOFTIRQ", "SCHED_SOFTIRQ", "HRTIMER_SOFTIRQ", "RCU_SOFTIRQ",
    ];
    if let Some(i) = SOFTIRQ.iter().position(|n| *n == s) {
        return i as i64;
    }
    match s {
        "HRTIMER_NORESTART" => 0,
        "HRTIMER_RESTART" => 1,
        _ => -1,
    }
}

/// eval_num_arg: u64 arithmetic on the record's fields (read unsigned).
fn eval(a: &Arg, f: &Format, raw: &[u8]) -> u64 {
    match a {
        Arg::Null | Arg::Flags(..) | Arg::Symbol(..) | Arg::Str(_) => 0,
        Arg::Atom(s) => strtoull(s),
        Arg::Field(i) => f.read_unsigned(raw, *i),
        Arg::Type(t, item) => eval_type(eval(item, f, raw), t),
        Arg::Op { op, left, right, .. } => {
            let ev = |x: &Option<Box<Arg>>| x.as_deref().map_or(0, |x| eval(x, f, raw));
            if op == "?" {
                let c = ev(left);
                return match right.as_deref() {
                    Some(Arg::Op { left: a, right: b, .. }) => {
                        if c != 0 {
                            ev(a)
                        } else {
                            ev(b)
                        }
                    }
                    _ => 0,
                };
            }
            let (l, r) = (ev(left), ev(right));
            match op.as_str() {
                "!" => (r == 0) as u64,
                "!=" => (l != r) as u64,
                "~" => !r,
                "|" => l | r,
                "||" => (l != 0 || r != 0) as u64,
                "&" => l & r,
                "&&" => (l != 0 && r != 0) as u64,
                "<" => (l < r) as u64,
                "<<" => l.wrapping_shl(r as u32),
                "<=" => (l <= r) as u64,
                ">" => (l > r) as u64,
                ">>" => l.wrapping_shr(r as u32),
                ">=" => (l >= r) as u64,
                "==" => (l == r) as u64,
                "-" => l.wrapping_sub(r),
                "+" => l.wrapping_add(r),
                "/" => l.checked_div(r).unwrap_or(0),
                "%" => l.checked_rem(r).unwrap_or(0),
                "*" => l.wrapping_mul(r),
                _ => 0,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Conversions and the program (parse_args, print_event_cache)
// ---------------------------------------------------------------------------

/// A printf conversion as libtraceevent hands it to glibc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub minus: bool,
    pub zero: bool,
    pub hash: bool,
    pub width: usize,
    pub precision: Option<usize>,
    /// libtraceevent's `ls` (h = -1, hh = -2, l = 1, ll/L = 2): how the value is cast.
    pub ls: i8,
    /// The bits glibc reads for this conversion (from its length modifiers).
    pub read_bits: u8,
    /// d i u x X o s p
    pub conv: u8,
    /// `%p` extension: S s F f (function names), or 0.
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
    /// `%pS`/`%ps`/`%pF`/`%pf`: a function name.
    pub fn is_function(&self) -> bool {
        self.conv == b'p' && self.ext != 0
    }
    /// The number printf prints for an integer conversion: cast by `ls`
    /// (print_arg_number), passed through varargs, read back by glibc at
    /// its own length; signed conversions give the bits of an i64.
    pub fn cast(&self, v: u64) -> u64 {
        if !self.is_integer() {
            return v;
        }
        // What lands in the 64-bit argument slot.
        let reg = match self.ls {
            i8::MIN..=-2 => v as i8 as i32 as u32 as u64,
            -1 => v as i16 as i32 as u32 as u64,
            0 => v as u32 as u64,
            _ => v,
        };
        let s = self.signed();
        match self.read_bits {
            8 => if s { reg as i8 as i64 as u64 } else { reg as u8 as u64 },
            16 => if s { reg as i16 as i64 as u64 } else { reg as u16 as u64 },
            32 => if s { reg as u32 as i32 as i64 as u64 } else { reg as u32 as u64 },
            _ => reg,
        }
    }
}

/// One conversion with the literal text around it.
#[derive(Clone, Debug)]
pub struct Conv {
    /// The key this value is printed after (`ptr` for `ptr=%p`, `va_start`
    /// for `va_start: %lu`), or "" when the literal before it has none.
    pub key: String,
    /// Literal text between `key=` and the conversion (`0x` in `pfn=0x%lx`).
    pub prefix: String,
    /// Literal text right after the conversion, up to a space (`B` in
    /// `%ldB`); `\0` when another conversion follows directly.
    pub suffix: String,
    pub spec: Spec,
    pub arg: Arg,
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

/// parse_arg_string's escapes (`\n`, `\t`, `\r`, `\\`, `\x` -> x).
fn unescape(s: &str, out: &mut String) {
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(o) => out.push(o),
            None => {}
        }
    }
}

/// A format split into segments, and each conversion with its argument.
type Parsed = (Vec<Seg>, Vec<(Spec, Arg)>);

/// parse_args: the format split into literals and conversions, each
/// conversion taking the next argument. Unknown conversion letters print
/// as `>c<` and take no argument, as libtraceevent does.
fn parse_format(fmt: &str, args: Vec<Arg>) -> Result<Parsed, String> {
    let b = fmt.as_bytes();
    let mut args = args.into_iter();
    let mut segs = Vec::new();
    let mut convs = Vec::new();
    let mut lit = String::new();
    let mut i = 0;
    let flush = |lit: &mut String, segs: &mut Vec<Seg>| {
        if !lit.is_empty() {
            let mut u = String::new();
            unescape(lit, &mut u);
            segs.push(Seg::Lit(u));
            lit.clear();
        }
    };
    while i < b.len() {
        if b[i] != b'%' {
            let st = i;
            while i < b.len() && b[i] != b'%' {
                i += 1;
            }
            lit.push_str(&fmt[st..i]);
            continue;
        }
        if b.get(i + 1) == Some(&b'%') {
            lit.push('%');
            i += 2;
            continue;
        }
        i += 1;
        let mut sp =
            Spec { minus: false, zero: false, hash: false, width: 0, precision: None, ls: 0, read_bits: 32, conv: 0, ext: 0 };
        let (mut h, mut l, mut z) = (0u8, 0u8, false);
        let mut in_width = false;
        let mut done = false;
        while i < b.len() && !done {
            let c = b[i];
            i += 1;
            match c {
                b'#' => sp.hash = true,
                b'h' => {
                    sp.ls -= 1;
                    h += 1
                }
                b'l' => {
                    sp.ls += 1;
                    l += 1
                }
                b'L' => {
                    sp.ls = 2;
                    l = 2
                }
                b'z' | b'Z' => z = true,
                b'-' => sp.minus = true,
                b'.' => {
                    sp.precision = Some(0);
                    in_width = false;
                }
                b'0'..=b'9' => {
                    let d = (c - b'0') as usize;
                    if let Some(p) = sp.precision.as_mut() {
                        *p = (*p * 10 + d).min(4096);
                    } else if c == b'0' && !in_width {
                        sp.zero = true;
                    } else {
                        in_width = true;
                        sp.width = (sp.width * 10 + d).min(4096);
                    }
                }
                b'*' => return Err("'*' widths are not supported".into()),
                b'p' => {
                    match b.get(i) {
                        Some(&e @ (b'S' | b's' | b'F' | b'f')) => {
                            sp.ext = e;
                            i += 1;
                        }
                        Some(b'M' | b'm' | b'I' | b'i' | b'U' | b'h') => {
                            return Err("%pM/%pI/%pU/%ph are not supported".into())
                        }
                        _ => {}
                    }
                    sp.conv = b'p';
                    done = true;
                }
                b'd' | b'u' | b'i' | b'x' | b'X' | b'o' | b's' => {
                    sp.conv = c;
                    done = true;
                }
                _ => {
                    // libtraceevent prints ">c<" and carries on (everything
                    // before this byte in the conversion was ASCII).
                    let ch = fmt.get(i - 1..).and_then(|r| r.chars().next()).unwrap_or('?');
                    i = i - 1 + ch.len_utf8();
                    lit.push('>');
                    lit.push(ch);
                    lit.push('<');
                    break;
                }
            }
        }
        if !done {
            continue;
        }
        if !(-2..=2).contains(&sp.ls) {
            return Err(format!("bad length count {}", sp.ls));
        }
        sp.read_bits = if l > 0 || z {
            64
        } else if h >= 2 {
            8
        } else if h == 1 {
            16
        } else {
            32
        };
        let arg = args.next().ok_or("a conversion without an argument")?;
        flush(&mut lit, &mut segs);
        segs.push(Seg::Conv(convs.len()));
        convs.push((sp, arg));
    }
    flush(&mut lit, &mut segs);
    Ok((segs, convs))
}

impl Program {
    /// Compile a format's print fmt (event_read_print, event_read_print_args).
    pub fn compile(f: &Format) -> Result<Program, String> {
        let mut p = Parser { s: f.print_fmt.as_bytes(), pos: 0, fmt: f, depth: 0 };
        let (ty, fmt) = p.token();
        if ty != Tt::Dquote {
            return Err("print fmt does not start with a string".into());
        }
        let (mut ty, mut t) = p.token();
        let mut args = Vec::new();
        if ty != Tt::None {
            p.expect(&(ty, t), Tt::Delim, ",")?;
            loop {
                let mut a = Arg::Null;
                (ty, t) = p.process_arg(&mut a)?;
                if ty == Tt::Op {
                    (ty, t) = p.process_op(&mut a, t)?;
                }
                args.push(a);
                if args.len() > 256 {
                    return Err("too many arguments".into());
                }
                if ty == Tt::Delim && t == "," {
                    continue;
                }
                if ty == Tt::None {
                    break;
                }
                return Err(format!("unexpected '{t}' after an argument"));
            }
        }
        let (segs, specs) = parse_format(&fmt, args)?;
        let mut convs: Vec<Conv> = Vec::with_capacity(specs.len());
        for (k, (spec, arg)) in specs.into_iter().enumerate() {
            let pos = segs.iter().position(|s| matches!(s, Seg::Conv(c) if *c == k)).unwrap_or(0);
            let before = match pos.checked_sub(1).and_then(|j| segs.get(j)) {
                Some(Seg::Lit(l)) => l.as_str(),
                _ => "",
            };
            let after = match segs.get(pos + 1) {
                Some(Seg::Lit(l)) => l.as_str(),
                Some(Seg::Conv(_)) => "\u{0}",
                None => "",
            };
            let tok = before.rsplit(' ').next().unwrap_or("");
            let (key, prefix) = match tok.split_once('=') {
                Some((k, pre)) => (k.to_string(), pre.to_string()),
                None if tok.is_empty() && before.ends_with(' ') => {
                    // `va_start: %lu`: the key is the token before the space.
                    let prev = before.trim_end().rsplit(' ').next().unwrap_or("");
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
        fn walk(a: &Arg, out: &mut Vec<usize>) {
            match a {
                Arg::Field(i) | Arg::Str(Some(i)) => {
                    if !out.contains(i) {
                        out.push(*i)
                    }
                }
                Arg::Type(_, x) | Arg::Flags(x, ..) | Arg::Symbol(x, _) => walk(x, out),
                Arg::Op { left, right, .. } => {
                    for x in [left, right].into_iter().flatten() {
                        walk(x, out);
                    }
                }
                Arg::Null | Arg::Atom(_) | Arg::Str(None) => {}
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

/// glibc's `%s` with this conversion's width, precision and `-`.
fn put_str(out: &mut String, s: &str, sp: &Spec) {
    let s = match sp.precision {
        Some(p) => match s.char_indices().nth(p) {
            Some((i, _)) => &s[..i],
            None => s,
        },
        None => s,
    };
    let n = s.chars().count();
    if sp.width > n && !sp.minus {
        out.extend(std::iter::repeat_n(' ', sp.width - n));
    }
    out.push_str(s);
    if sp.width > n && sp.minus {
        out.extend(std::iter::repeat_n(' ', sp.width - n));
    }
}

/// A C string: bytes up to the first NUL.
fn c_str(b: &[u8]) -> String {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..n]).into_owned()
}

/// print_str_arg
fn str_arg(a: &Arg, f: &Format, raw: &[u8], sp: &Spec, out: &mut String) {
    match a {
        Arg::Atom(s) => put_str(out, s, sp),
        Arg::Field(i) => {
            let Some(x) = f.fields.get(*i) else { return };
            if x.kind == FieldKind::Scalar && x.size == f.long_size as usize {
                let _ = write!(out, "{:x}", f.read_unsigned(raw, *i));
            } else {
                let end = if x.size == 0 { raw.len() } else { x.offset.saturating_add(x.size).min(raw.len()) };
                put_str(out, &c_str(raw.get(x.offset..end).unwrap_or(b"")), sp);
            }
        }
        Arg::Flags(v, delim, table) => {
            let mut val = eval(v, f, raw) as i64;
            let mut printed = false;
            for (fv, name) in table {
                let fv = eval_flag(fv);
                if val == 0 && fv < 0 {
                    put_str(out, name, sp);
                    break;
                }
                if fv > 0 && val & fv == fv {
                    if printed {
                        if let Some(d) = delim {
                            out.push_str(d);
                        }
                    }
                    put_str(out, name, sp);
                    printed = true;
                    val &= !fv;
                }
            }
            if val != 0 {
                if printed {
                    if let Some(d) = delim {
                        out.push_str(d);
                    }
                }
                let _ = write!(out, "0x{:x}", val as u64);
            }
        }
        Arg::Symbol(v, table) => {
            let val = eval(v, f, raw) as i64;
            match table.iter().find(|(fv, _)| eval_flag(fv) == val) {
                Some((_, name)) => put_str(out, name, sp),
                None => {
                    let _ = write!(out, "0x{:x}", val as u64);
                }
            }
        }
        Arg::Str(Some(i)) => {
            let Some(x) = f.fields.get(*i) else { return };
            let v = read_scalar(raw, x.offset, 4, false, f.big_endian);
            let mut off = (v & 0xffff) as usize;
            if x.kind == FieldKind::RelLoc {
                off = off.saturating_add(x.offset + x.size);
            }
            put_str(out, &c_str(raw.get(off..).unwrap_or(b"")), sp);
        }
        Arg::Op { op, left, right, .. } if op == "?" => {
            let c = left.as_deref().map_or(0, |x| eval(x, f, raw));
            if let Some(Arg::Op { left: a, right: b, .. }) = right.as_deref() {
                let pick = if c != 0 { a } else { b };
                if let Some(x) = pick.as_deref() {
                    str_arg(x, f, raw, sp, out);
                }
            }
        }
        _ => {}
    }
}

fn print_conv(sp: &Spec, arg: &Arg, f: &Format, raw: &[u8], syms: &dyn Symbols, out: &mut String) {
    match sp.conv {
        b's' => str_arg(arg, f, raw, sp, out),
        b'p' => {
            let v = eval(arg, f, raw);
            if sp.is_function() {
                let with_off = matches!(sp.ext, b'S' | b'F');
                super::kallsyms::format_ps(out, v, syms.lookup(v), with_off);
            } else if v == 0 {
                out.push_str("(nil)");
            } else {
                let _ = write!(out, "0x{v:x}");
            }
        }
        _ => {
            let v = sp.cast(eval(arg, f, raw));
            let mut digits = String::new();
            let mut sign = "";
            let mut prefix = "";
            match sp.conv {
                b'd' | b'i' => {
                    let x = v as i64;
                    if x < 0 {
                        sign = "-";
                    }
                    let _ = write!(digits, "{}", x.unsigned_abs());
                }
                b'u' => {
                    let _ = write!(digits, "{v}");
                }
                b'x' => {
                    if sp.hash && v != 0 {
                        prefix = "0x";
                    }
                    let _ = write!(digits, "{v:x}");
                }
                b'X' => {
                    if sp.hash && v != 0 {
                        prefix = "0X";
                    }
                    let _ = write!(digits, "{v:X}");
                }
                _ => {
                    let _ = write!(digits, "{v:o}");
                    if sp.hash && !digits.starts_with('0') {
                        digits.insert(0, '0');
                    }
                }
            }
            if let Some(p) = sp.precision {
                if p == 0 && v == 0 {
                    digits.clear();
                }
                while digits.len() < p {
                    digits.insert(0, '0');
                }
            }
            let n = sign.len() + prefix.len() + digits.len();
            let pad = sp.width.saturating_sub(n);
            if sp.minus {
                out.push_str(sign);
                out.push_str(prefix);
                out.push_str(&digits);
                out.extend(std::iter::repeat_n(' ', pad));
            } else if sp.zero && sp.precision.is_none() {
                out.push_str(sign);
                out.push_str(prefix);
                out.extend(std::iter::repeat_n('0', pad));
                out.push_str(&digits);
            } else {
                out.extend(std::iter::repeat_n(' ', pad));
                out.push_str(sign);
                out.push_str(prefix);
                out.push_str(&digits);
            }
        }
    }
}

/// The fields of a record as libtraceevent's `tep_print_fields` prints them
/// (` name=value` per field, less the leading space), for events whose print
/// fmt does not compile here.
pub fn render_fields(f: &Format, raw: &[u8], out: &mut String) {
    let mut first = true;
    for (i, x) in f.fields.iter().enumerate().filter(|(_, x)| !x.common) {
        if !first {
            out.push(' ');
        }
        first = false;
        out.push_str(&x.name);
        out.push('=');
        let v = f.read_unsigned(raw, i);
        let is_long = x.decl.contains("long");
        match x.kind {
            FieldKind::Array | FieldKind::DataLoc | FieldKind::RelLoc => {
                out.push_str(&String::from_utf8_lossy(f.read_str(raw, i)));
            }
            FieldKind::Scalar if x.decl.contains('*') => {
                let _ = write!(out, "0x{v:x}");
            }
            FieldKind::Scalar if x.signed => match x.size {
                4 if is_long => {
                    let _ = write!(out, "0x{:x}", v as u32);
                }
                4 => {
                    let _ = write!(out, "{}", v as u32 as i32);
                }
                2 => {
                    let _ = write!(out, "{:2}", v as u16 as i16);
                }
                1 => {
                    let _ = write!(out, "{}", v as u8 as i8);
                }
                _ => {
                    let _ = write!(out, "{}", v as i64);
                }
            },
            FieldKind::Scalar if is_long => {
                let _ = write!(out, "0x{v:x}");
            }
            FieldKind::Scalar => {
                let _ = write!(out, "{v}");
            }
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

    /// What perf 6.1 printed for mm_page_alloc_extfrag records of warm2 with
    /// fallback_order rewritten (perf script on the edited perf.data):
    /// 0 -> fragmenting=9, 1, 3, 8, 9, 10, 11, -1 -> fragmenting=10.
    #[test]
    fn extfrag_fragmenting_groups_as_libtraceevent_does() {
        let text = "name: mm_page_alloc_extfrag\nID: 650\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:unsigned long pfn;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:int alloc_order;\toffset:16;\tsize:4;\tsigned:1;\n\tfield:int fallback_order;\toffset:20;\tsize:4;\tsigned:1;\n\tfield:int alloc_migratetype;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:int fallback_migratetype;\toffset:28;\tsize:4;\tsigned:1;\n\tfield:int change_ownership;\toffset:32;\tsize:4;\tsigned:1;\n\nprint fmt: \"page=%p pfn=0x%lx alloc_order=%d fallback_order=%d pageblock_order=%d alloc_migratetype=%d fallback_migratetype=%d fragmenting=%d change_ownership=%d\", (((struct page *)vmemmap_base) + (REC->pfn)), REC->pfn, REC->alloc_order, REC->fallback_order, (((unsigned int)((21 - 12))) < ((unsigned int)(10)) ? ((unsigned int)((21 - 12))) : ((unsigned int)(10))), REC->alloc_migratetype, REC->fallback_migratetype, REC->fallback_order < (((unsigned int)((21 - 12))) < ((unsigned int)(10)) ? ((unsigned int)((21 - 12))) : ((unsigned int)(10))), REC->change_ownership\n";
        let f = Format::parse(text, false, 8).unwrap();
        let p = Program::compile(&f).unwrap();
        for (fallback, expect) in [(0i32, 9), (1, 10), (3, 10), (8, 10), (9, 10), (10, 10), (11, 10), (-1, 10)] {
            let mut raw = vec![0u8; 36];
            raw[8..16].copy_from_slice(&0x1c6800u64.to_le_bytes());
            raw[16..20].copy_from_slice(&2i32.to_le_bytes());
            raw[20..24].copy_from_slice(&fallback.to_le_bytes());
            raw[24..28].copy_from_slice(&2i32.to_le_bytes());
            raw[28..32].copy_from_slice(&1i32.to_le_bytes());
            raw[32..36].copy_from_slice(&1i32.to_le_bytes());
            let mut s = String::new();
            p.render(&f, &raw, &NoSymbols, &mut s);
            assert_eq!(
                s,
                format!("page=0x1c6800 pfn=0x1c6800 alloc_order=2 fallback_order={fallback} pageblock_order=9 alloc_migratetype=2 fallback_migratetype=1 fragmenting={expect} change_ownership=1")
            );
        }
    }

    /// `%zu` takes its cast from `ls` only (perf printed bytes_req=5 for
    /// 0x100000005), `%d` of node -2 is -2.
    #[test]
    fn z_does_not_widen() {
        let f = Format::parse(KMALLOC, false, 8).unwrap();
        let p = Program::compile(&f).unwrap();
        let raw = record(0, 1, 0x1_0000_0005, 32, 0xcc0, -2);
        let mut s = String::new();
        p.render(&f, &raw, &NoSymbols, &mut s);
        assert!(s.contains(" bytes_req=5 bytes_alloc=32 ") && s.contains(" node=-2 "), "{s}");
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
        assert_eq!(s, "call_site=0x1 ptr=0x2 bytes_req=3 bytes_alloc=4 gfp_flags=0x5 node=-6");
    }
}
