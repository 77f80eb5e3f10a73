//! Python's `json.dumps` and `repr(float)` over template values, so that `tojson` and printed
//! floats come out byte for byte as under Hugging Face transformers (minijinja's own `tojson`
//! escapes HTML characters and spaces its output differently).

use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// Most bytes one `tojson` call may produce: templates come from downloaded model files, and
/// `tojson(x, indent=…)` multiplies the indentation by the nesting depth on every line, a size
/// the engine's fuel only sees after the text exists.
pub const MAX_TOJSON_BYTES: usize = 16 << 20;

/// Deepest nesting `tojson` serializes (Python's recursion limit is 1000; JSON from requests is
/// at most 128 deep).
const MAX_TOJSON_DEPTH: usize = 256;

/// The options of `json.dumps` that HF's `tojson` filter passes through.
struct Options {
    ensure_ascii: bool,
    /// `None`: one line; `Some(unit)`: a newline and `unit` per nesting level.
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// The `tojson` filter: `tojson(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, positionally or by keyword, as in HF's `_compile_jinja_template`.
pub fn tojson_filter(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > NAMES.len() {
        return Err(invalid(format!(
            "tojson takes at most {} arguments after the value ({} given)",
            NAMES.len(),
            args.len()
        )));
    }
    let mut given: [Option<Value>; 4] = Default::default();
    for (slot, arg) in given.iter_mut().zip(args.iter()) {
        *slot = Some(arg.clone());
    }
    for (i, name) in NAMES.iter().enumerate() {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            if given[i].is_some() {
                return Err(invalid(format!("tojson got multiple values for '{name}'")));
            }
            given[i] = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = given;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(indent_unit(&v)?),
    };
    // Python's defaults: `", "` between items on one line, `","` before the newline when indenting.
    let (mut item_sep, mut key_sep) = (
        if indent.is_some() { "," } else { ", " }.to_owned(),
        ": ".to_owned(),
    );
    if let Some(seps) = separators.filter(|v| !v.is_none()) {
        let pair: Vec<Value> = seps
            .try_iter()
            .map_err(|_| invalid("tojson separators must be an (item, key) pair of strings"))?
            .collect();
        match pair.as_slice() {
            [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                item_sep = a.as_str().unwrap_or_default().to_owned();
                key_sep = b.as_str().unwrap_or_default().to_owned();
            }
            _ => {
                return Err(invalid(
                    "tojson separators must be an (item, key) pair of strings",
                ))
            }
        }
    }
    let opts = Options {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    encode(&mut out, value, &opts, 0)?;
    if out.len() > MAX_TOJSON_BYTES {
        return Err(invalid(format!(
            "tojson: the output would exceed {MAX_TOJSON_BYTES} bytes"
        )));
    }
    Ok(Value::from(out))
}

/// `indent` as Python takes it: a count of spaces (negative: none) or the string itself.
fn indent_unit(v: &Value) -> Result<String, Error> {
    if let Some(s) = v.as_str() {
        return Ok(s.to_owned());
    }
    if v.kind() == ValueKind::Number && v.is_integer() {
        let n = i64::try_from(v.clone()).unwrap_or(i64::MAX);
        if n > 1024 {
            return Err(invalid(format!(
                "tojson indent {n} is too large (at most 1024 spaces)"
            )));
        }
        return Ok(" ".repeat(n.max(0) as usize));
    }
    Err(invalid(format!(
        "tojson indent must be an integer or a string, not {}",
        v.kind()
    )))
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

fn encode(out: &mut String, v: &Value, opts: &Options, level: usize) -> Result<(), Error> {
    if level > MAX_TOJSON_DEPTH {
        return Err(invalid(format!(
            "tojson: the value is nested more than {MAX_TOJSON_DEPTH} levels deep"
        )));
    }
    if out.len() > MAX_TOJSON_BYTES {
        return Err(invalid(format!(
            "tojson: the output would exceed {MAX_TOJSON_BYTES} bytes"
        )));
    }
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => push_number(out, v),
        ValueKind::String => push_string(out, v.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                separate(out, opts, level + 1, i == 0);
                encode(out, item, opts, level + 1)?;
            }
            newline_indent(out, opts, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in v.try_iter()? {
                let value = v.get_item(&key)?;
                entries.push((key, value));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                // Python sorts the original keys; JSON objects only have string keys.
                if entries.iter().any(|(k, _)| k.as_str().is_none()) {
                    return Err(invalid("tojson(sort_keys=true) needs string keys"));
                }
                entries.sort_by(|a, b| a.0.as_str().cmp(&b.0.as_str()));
            }
            out.push('{');
            for (i, (key, value)) in entries.iter().enumerate() {
                separate(out, opts, level + 1, i == 0);
                push_key(out, key, opts.ensure_ascii)?;
                out.push_str(&opts.key_sep);
                encode(out, value, opts, level + 1)?;
            }
            newline_indent(out, opts, level);
            out.push('}');
        }
        kind => {
            return Err(invalid(format!(
            "tojson cannot serialize a value of type {kind} (Python's json.dumps would fail too)"
        )))
        }
    }
    Ok(())
}

/// What comes before an item: the item separator (not before the first) and, when indenting, a
/// newline and the indentation of `level`.
fn separate(out: &mut String, opts: &Options, level: usize, first: bool) {
    if !first {
        out.push_str(&opts.item_sep);
    }
    newline_indent(out, opts, level);
}

/// When indenting: a newline and the indentation of `level`.
fn newline_indent(out: &mut String, opts: &Options, level: usize) {
    if let Some(unit) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            // Stop growing; `encode` reports the overflow at its next value.
            if out.len() > MAX_TOJSON_BYTES {
                return;
            }
            out.push_str(unit);
        }
    }
}

/// Object keys as Python converts them: strings as they are, numbers, booleans and None as text.
fn push_key(out: &mut String, key: &Value, ensure_ascii: bool) -> Result<(), Error> {
    let text = match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_owned(),
        ValueKind::None => "null".to_owned(),
        ValueKind::Number => {
            let mut s = String::new();
            push_number(&mut s, key);
            s
        }
        kind => {
            return Err(invalid(format!(
                "tojson: keys must be str, int, float, bool or None, not {kind}"
            )))
        }
    };
    push_string(out, &text, ensure_ascii);
    Ok(())
}

/// `json.dumps` of a number: integers in full, floats as `repr` (NaN and infinities spelled as
/// Python's encoder does).
fn push_number(out: &mut String, v: &Value) {
    if v.is_integer() {
        match i128::try_from(v.clone()) {
            Ok(i) => out.push_str(&i.to_string()),
            Err(_) => out.push_str(&v.to_string()),
        }
        return;
    }
    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
    out.push_str(&match f {
        f if f.is_nan() => "NaN".to_owned(),
        f if f.is_infinite() => if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned(),
        f => float_repr(f),
    });
}

/// Python's `repr(float)`: the shortest round-tripping digits, in positional notation for
/// decimal exponents -4..16 (with at least one fractional digit) and scientific notation outside
/// (`1e+16`, `1.5e-05`).
pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    // Rust's `{:e}` gives the same shortest digits: `d[.ddd]e<exp>`.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            let (int, frac) = digits.split_at((exp + 1) as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs())
    }
}

/// A JSON string as Python's encoder writes it: `"` `\` and control characters escaped (the
/// usual short escapes where they exist, else `\u00XX`); with `ensure_ascii` also everything
/// outside printable ASCII, as `\uXXXX` (UTF-16 surrogate pairs above the BMP).
fn push_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::float_repr;

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345.6, "123456789012345.6"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (f64::INFINITY, "inf"),
        ];
        for (f, want) in cases {
            assert_eq!(float_repr(f), want, "{f:e}");
        }
    }
}
