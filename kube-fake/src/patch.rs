//! Patch semantics: JSON merge patch (RFC 7386; also used for strategic-merge and server-side
//! apply, which is close enough for tests that do not rely on list merge keys or field
//! ownership) and JSON patch (RFC 6902).

use serde_json::Value;

/// RFC 7386: objects merge recursively, `null` removes a key, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(t) = target else {
        return;
    };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// RFC 6902 (`add`, `remove`, `replace`, `test`); the error says which operation failed.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array")?;
    for (i, op) in ops.iter().enumerate() {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or(format!("operation {i}: missing path"))?;
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        let (parent, last) = match path.rfind('/') {
            Some(at) => (&path[..at], unescape(&path[at + 1..])),
            None => return Err(format!("operation {i}: bad path {path:?}")),
        };
        match kind {
            "test" => {
                if target.pointer(path) != Some(&value) {
                    return Err(format!("operation {i}: test failed at {path}"));
                }
            }
            "add" | "replace" | "remove" => {
                let container = target
                    .pointer_mut(parent)
                    .ok_or(format!("operation {i}: no parent for {path}"))?;
                match container {
                    Value::Object(m) => match kind {
                        "remove" => {
                            m.remove(&last)
                                .ok_or(format!("operation {i}: nothing at {path}"))?;
                        }
                        _ => {
                            m.insert(last, value);
                        }
                    },
                    Value::Array(a) => {
                        let idx = if last == "-" {
                            a.len()
                        } else {
                            last.parse::<usize>()
                                .map_err(|_| format!("operation {i}: bad index in {path}"))?
                        };
                        match kind {
                            "add" if idx <= a.len() => a.insert(idx, value),
                            "replace" if idx < a.len() => a[idx] = value,
                            "remove" if idx < a.len() => {
                                a.remove(idx);
                            }
                            _ => return Err(format!("operation {i}: index out of range: {path}")),
                        }
                    }
                    _ => {
                        return Err(format!(
                            "operation {i}: parent of {path} is not a container"
                        ));
                    }
                }
            }
            other => return Err(format!("operation {i}: unsupported op {other:?}")),
        }
    }
    Ok(())
}

fn unescape(s: &str) -> String {
    s.replace("~1", "/").replace("~0", "~")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge(&mut t, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(t, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops() {
        let mut t = json!({"metadata": {"labels": {"a/b": "x"}}, "l": [1]});
        json_patch(
            &mut t,
            &json!([
                {"op": "add", "path": "/metadata/labels/c", "value": "y"},
                {"op": "remove", "path": "/metadata/labels/a~1b"},
                {"op": "add", "path": "/l/-", "value": 2},
                {"op": "test", "path": "/l/1", "value": 2}
            ]),
        )
        .unwrap();
        assert_eq!(t, json!({"metadata": {"labels": {"c": "y"}}, "l": [1, 2]}));
        assert!(json_patch(&mut t, &json!([{"op": "remove", "path": "/nope"}])).is_err());
    }
}
