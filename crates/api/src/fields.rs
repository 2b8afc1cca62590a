//! Strict field validation against the generated CRD schema, the way the API server does it:
//! a field the schema does not know is an error at any depth, in list items and in flattened
//! structs too (serde drops those silently, and a misspelt limit must never be ignored).

use std::fmt::Write as _;

use serde_json::Value as Schema;
use serde_yaml::Value;

/// The fields of `doc` that `schema` (an `openAPIV3Schema`) does not know, as paths in
/// kubectl's notation (`spec.upstreams[0].limits.burst`), in document order.
pub(crate) fn unknown_fields(doc: &Value, schema: &Schema) -> Vec<String> {
    let mut found = Vec::new();
    // The API server handles these itself; `metadata` is ObjectMeta, checked by its own type.
    let builtin = ["apiVersion", "kind", "metadata"];
    if let Value::Mapping(map) = doc {
        for (key, value) in map {
            let name = key_text(key);
            if builtin.contains(&name.as_str()) {
                continue;
            }
            match schema.get("properties").and_then(|p| p.get(&name)) {
                Some(s) => walk(value, s, &name, &mut found),
                None => found.push(name),
            }
        }
    }
    found
}

fn walk(doc: &Value, schema: &Schema, path: &str, found: &mut Vec<String>) {
    // Free-form parts (ints-or-strings, preserved unknowns) have nothing to check.
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Schema::Bool(true)) {
        return;
    }
    match doc {
        Value::Mapping(map) => {
            let properties = schema.get("properties").and_then(Schema::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            if properties.is_none() && additional.is_none() {
                return;
            }
            for (key, value) in map {
                let name = key_text(key);
                let child = format!("{path}.{name}");
                match properties.and_then(|p| p.get(&name)).or(additional) {
                    Some(s) => walk(value, s, &child, found),
                    None => found.push(child),
                }
            }
        }
        Value::Sequence(items) => {
            if let Some(item) = schema.get("items") {
                for (i, value) in items.iter().enumerate() {
                    let mut child = path.to_owned();
                    let _ = write!(child, "[{i}]");
                    walk(value, item, &child, found);
                }
            }
        }
        Value::Tagged(tagged) => walk(&tagged.value, schema, path, found),
        _ => {}
    }
}

fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other).map(|s| s.trim_end().to_owned()).unwrap_or_default(),
    }
}

/// One step of a path into a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// A field of an object, or a key of a map.
    Field(String),
    /// An item of a list.
    Index(usize),
}

/// A path in kubectl's notation: fields joined by dots, list indices in brackets
/// (`spec.upstreams[0].limits.burst`).
pub(crate) fn kubectl_path(steps: impl IntoIterator<Item = Step>) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
            Step::Field(name) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&name);
            }
        }
    }
    out
}

/// The steps of a `serde_ignored` path; the options and newtypes serde passes through are
/// no steps of the document.
pub(crate) fn ignored_steps(path: &serde_ignored::Path<'_>) -> Vec<Step> {
    use serde_ignored::Path;
    let mut steps = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_steps(parent),
    };
    match path {
        Path::Seq { index, .. } => steps.push(Step::Index(*index)),
        Path::Map { key, .. } => steps.push(Step::Field(key.clone())),
        _ => {}
    }
    steps
}

/// The steps of a `serde_path_to_error` path (segments it could not name are left out).
pub(crate) fn error_steps(path: &serde_path_to_error::Path) -> Vec<Step> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Map { key } => Some(Step::Field(key.clone())),
            Segment::Enum { variant } => Some(Step::Field(variant.clone())),
            Segment::Unknown => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_like_kubectls() {
        let f = |s: &str| Step::Field(s.to_owned());
        let steps = [f("spec"), f("upstreams"), Step::Index(0), f("limits"), f("burst")];
        assert_eq!(kubectl_path(steps), "spec.upstreams[0].limits.burst");
        let steps = [f("spec"), f("limits"), f("models"), f("gpt-4.1"), f("rpm")];
        assert_eq!(kubectl_path(steps), "spec.limits.models.gpt-4.1.rpm", "a dotted key stays one key");
    }

    #[test]
    fn unknown_fields_are_found_at_every_depth_and_maps_are_free() {
        let schema = serde_json::json!({"properties": {"spec": {"properties": {
            "items": {"items": {"properties": {"name": {}}}},
            "models": {"additionalProperties": {"properties": {"rpm": {}}}},
            "free": {"x-kubernetes-preserve-unknown-fields": true},
        }}}});
        let doc: Value = serde_yaml::from_str(
            "kind: X\nmetadata: {name: a}\nspec:\n  items: [{name: a}, {name: b, bogus: 1}]\n  models: {m: {rpm: 1, rpn: 2}}\n  free: {anything: 1}\n  top: 1\nstray: 2\n",
        )
        .unwrap_or_default();
        assert_eq!(
            unknown_fields(&doc, &schema),
            ["spec.items[1].bogus", "spec.models.m.rpn", "spec.top", "stray"]
        );
    }
}
