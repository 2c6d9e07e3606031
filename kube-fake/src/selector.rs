//! Label and field selectors as list and watch requests carry them (equality-based and
//! existence terms; set-based `in`/`notin` too, since kube-rs emits them).

use serde_json::Value;

/// Parsed `labelSelector` / `fieldSelector` query parameters.
#[derive(Default, Debug)]
pub struct Selectors {
    labels: Vec<Term>,
    fields: Vec<Term>,
}

#[derive(Debug)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selectors {
    pub fn from_query(query: &std::collections::HashMap<String, String>) -> Selectors {
        Selectors {
            labels: query
                .get("labelSelector")
                .map(|s| parse(s))
                .unwrap_or_default(),
            fields: query
                .get("fieldSelector")
                .map(|s| parse(s))
                .unwrap_or_default(),
        }
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let field = |k: &str| {
            let pointer = format!("/{}", k.replace('.', "/"));
            obj.pointer(&pointer).and_then(Value::as_str)
        };
        self.labels.iter().all(|t| t.matches(&label))
            && self.fields.iter().all(|t| t.matches(&field))
    }
}

impl Term {
    fn matches<'a>(&self, get: &impl Fn(&str) -> Option<&'a str>) -> bool {
        match self {
            Term::Eq(k, v) => get(k) == Some(v.as_str()),
            Term::Ne(k, v) => get(k) != Some(v.as_str()),
            Term::Exists(k) => get(k).is_some(),
            Term::NotExists(k) => get(k).is_none(),
            Term::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Term::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        }
    }
}

/// Split on commas outside parentheses, then parse each term.
fn parse(s: &str) -> Vec<Term> {
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(term)
        .collect()
}

fn term(t: &str) -> Term {
    let set = |rest: &str| -> Vec<String> {
        rest.trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(',')
            .map(|v| v.trim().to_string())
            .collect()
    };
    if let Some((k, v)) = t.split_once("!=") {
        return Term::Ne(k.trim().into(), v.trim().into());
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        return Term::Eq(k.trim().into(), v.trim().into());
    }
    if let Some((k, rest)) = t.split_once(" notin ") {
        return Term::NotIn(k.trim().into(), set(rest));
    }
    if let Some((k, rest)) = t.split_once(" in ") {
        return Term::In(k.trim().into(), set(rest));
    }
    match t.strip_prefix('!') {
        Some(k) => Term::NotExists(k.trim().into()),
        None => Term::Exists(t.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors_match_like_the_api_server() {
        let obj = json!({"metadata": {"name": "w", "namespace": "shop",
                         "labels": {"app": "a", "tier": "web"}}});
        let q = |l: &str, f: &str| {
            let mut m = std::collections::HashMap::new();
            m.insert("labelSelector".to_string(), l.to_string());
            m.insert("fieldSelector".to_string(), f.to_string());
            Selectors::from_query(&m).matches(&obj)
        };
        assert!(q("app=a,tier", "metadata.name=w"));
        assert!(q("app in (a,b),!missing", "metadata.namespace==shop"));
        assert!(!q("app notin (a)", ""));
        assert!(!q("tier!=web", ""));
        assert!(!q("", "metadata.name=x"));
    }
}
