//! Strict field validation against the generated CRD schema, the way the API server does it:
//! a field the schema does not know is an error at any depth, in list items and in flattened
//! structs too (serde drops those silently, and a misspelt limit must never be ignored).

use std::fmt::Write as _;

use serde_json::Value as Schema;
use serde_yaml::Value;

/// The fields of `doc` that `schema` (an `openAPIV3Schema`) does not know, as paths in
/// kubectl's notation (`spec.upstreams[0].limits.burst`), in document order.
pub fn unknown_fields(doc: &Value, schema: &Schema) -> Vec<String> {
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

/// A serde path (from `serde_ignored` or `serde_path_to_error`) in kubectl's notation: list
/// indices in brackets, and no `?` for the options and newtypes serde passes through.
pub fn kubectl_path(serde_path: &str) -> String {
    let mut out = String::new();
    for segment in serde_path.split('.') {
        // serde_path_to_error prints indices as `[0]` already; serde_ignored as `.0`.
        let segment = segment.trim_matches('?');
        if segment.is_empty() {
            continue;
        }
        if segment.starts_with('[') || (!out.is_empty() && segment.bytes().all(|b| b.is_ascii_digit())) {
            if segment.starts_with('[') {
                out.push_str(segment);
            } else {
                let _ = write!(out, "[{segment}]");
            }
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_like_kubectls() {
        assert_eq!(kubectl_path("spec.upstreams.?.0.limits.?.burst"), "spec.upstreams[0].limits.burst");
        assert_eq!(kubectl_path("spec.clients.?.default.bogus2"), "spec.clients.default.bogus2");
        assert_eq!(kubectl_path("spec.upstreams[1].url"), "spec.upstreams[1].url");
        assert_eq!(kubectl_path("spec.limits?.rpm"), "spec.limits.rpm");
        assert_eq!(kubectl_path("spec.upstreams.?[0].url"), "spec.upstreams[0].url");
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
