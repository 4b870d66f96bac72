//! Deterministic JSON as dstack's SDKs produce it for `app-compose.json`
//! (`json.dumps(sort_keys, separators=(",", ":"), ensure_ascii=False)`): object keys sorted by code point,
//! no whitespace, non-ASCII written as UTF-8, only `"`, `\` and control characters escaped.
//!
//! Keys are sorted here explicitly so the output does not depend on serde_json's `preserve_order` feature,
//! which another crate in the workspace could switch on.

use serde_json::Value;

/// Writes `value` deterministically. UTF-8 byte order equals code point order, which is Python's order.
pub fn to_canonical_string(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, k);
                out.push(':');
                write_value(out, v);
            }
            out.push('}');
        }
    }
}

/// Python's `ensure_ascii=False` escaping: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, other C0 controls as
/// `\u00xx` (lowercase hex); everything else, DEL and U+2028/2029 included, verbatim.
fn write_string(out: &mut String, s: &str) {
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
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_nested_keys_and_is_compact() {
        let v: Value = serde_json::from_str(r#"{"b": {"z": 1, "a": [true, null]}, "a": "x"}"#).unwrap();
        assert_eq!(to_canonical_string(&v), r#"{"a":"x","b":{"a":[true,null],"z":1}}"#);
    }

    #[test]
    fn escapes_like_python_ensure_ascii_false() {
        // Expected strings written by hand from Python's json encoder rules (ESCAPE_DCT in json/encoder.py).
        let v = Value::String("é\"\\\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}\u{2028}😀".into());
        assert_eq!(
            to_canonical_string(&v),
            "\"é\\\"\\\\\\n\\r\\t\\b\\f\\u0001\\u001f\u{7f}\u{2028}😀\""
        );
    }

    #[test]
    fn sorts_by_code_point_not_utf16() {
        // U+FF21 sorts before U+1F600 by code point (Python), but after it by UTF-16 unit (JS).
        let v: Value = serde_json::from_str("{\"\u{1F600}\":1,\"\u{FF21}\":2}").unwrap();
        assert_eq!(to_canonical_string(&v), "{\"\u{FF21}\":2,\"\u{1F600}\":1}");
    }
}
