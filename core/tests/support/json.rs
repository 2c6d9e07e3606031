//! Structure-aware mutation of a JSON document (a Kubernetes object, a resource rendered as
//! proto3 JSON): values replaced by extreme or malformed ones, keys dropped, list items
//! dropped or repeated, subtrees moved. Byte mutation of YAML or protobuf mostly breaks the
//! syntax; this keeps the document well-formed so that the checks behind the parser run.
//! Included next to `rng.rs` (see there).

// why: each including test uses the part it needs.
#![allow(dead_code)]

use serde_json::{Value, json};

use super::rng::Rng;

/// Values that often break a field's checks: wrong types, limits, bad durations, CIDRs,
/// regexes, and text with multi-byte characters.
fn interesting(rng: &mut Rng) -> Value {
    let pick = [
        json!(null),
        json!(true),
        json!(0),
        json!(-1),
        json!(1),
        json!(65536),
        json!(4_294_967_296_u64),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(1e308),
        json!(-0.5),
        json!(100.5),
        json!(""),
        json!("*"),
        json!("-1s"),
        json!("0s"),
        json!("1.5.5s"),
        json!("9223372036854775807s"),
        json!("315576000001s"),
        json!("99999999999h"),
        json!("NaN"),
        json!("Infinity"),
        json!("10.0.0.0/33"),
        json!("::/0"),
        json!("(?:("),
        json!("a{1000}{1000}"),
        json!("é/ü"),
        json!("x".repeat(300)),
        json!({}),
        json!([]),
        json!([null]),
    ];
    rng.pick(&pick).clone()
}

/// JSON pointers of every node of `v` (the root is "").
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                let key = k.replace('~', "~0").replace('/', "~1");
                pointers(c, format!("{at}/{key}"), out);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                pointers(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// Apply one to four structural mutations to `doc`.
pub fn mutate(rng: &mut Rng, doc: &mut Value) {
    for _ in 0..(1 + rng.below(4)) {
        let mut all = Vec::new();
        pointers(doc, String::new(), &mut all);
        let at = rng.pick(&all).clone();
        let from = rng.pick(&all).clone();
        let other = doc.pointer(&from).cloned().unwrap_or(Value::Null);
        let Some(node) = doc.pointer_mut(&at) else {
            continue;
        };
        match rng.below(6) {
            0 => *node = interesting(rng),
            // Another part of the document here (a list where a string was, a sibling's
            // value): the shapes the format has, in the wrong places.
            1 if !at.is_empty() => *node = other,
            2 => match node {
                Value::Object(m) if !m.is_empty() => {
                    let key = m
                        .keys()
                        .nth(rng.below(m.len()))
                        .cloned()
                        .unwrap_or_default();
                    m.remove(&key);
                }
                Value::Array(a) if !a.is_empty() => {
                    let i = rng.below(a.len());
                    if rng.one_in(2) {
                        a.remove(i);
                    } else {
                        let item = a[i].clone();
                        a.push(item);
                    }
                }
                _ => *node = interesting(rng),
            },
            3 => match node {
                Value::String(s) => {
                    let m = rng.mutate(s.as_bytes());
                    *s = String::from_utf8_lossy(&m).into_owned();
                }
                Value::Number(n) => {
                    let x = n.as_f64().unwrap_or(0.0);
                    *node = [json!(x + 1.0), json!(-x), json!(x * 1e9), json!(x.trunc())]
                        [rng.below(4)]
                    .clone();
                }
                _ => *node = interesting(rng),
            },
            // A new key next to the others: unknown fields, duplicates of known ones.
            4 => {
                if let Value::Object(m) = node {
                    let key = ["x", "name", "port", "weight", "host", "", "é"][rng.below(7)];
                    m.insert(key.to_string(), interesting(rng));
                }
            }
            _ => *node = interesting(rng),
        }
    }
}
