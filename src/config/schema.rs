//! The config file's JSON Schema (draft 2020-12): what `larder schema`
//! prints and `docs/config.schema.json` holds, so editors complete and check
//! the file as it is written.
//!
//! Derived from the `raw` types (their doc comments become descriptions,
//! their serde defaults the defaults), so it cannot drift from what loads.
//! It describes the shape of the file and the form of each value; rules that
//! span keys (a route's upstream must exist, exactly one of `upstream` and
//! `source`) stay with `larder check`. Loading never reads the schema.
//!
//! Two habits of the loader are written into it by hand, after derivation:
//! - `${NAME}` is substituted in the text before the YAML is read, so a
//!   number, a boolean, a choice of words or a duration may be written as a
//!   reference: each such value also accepts a string holding `${NAME}`.
//! - serde_yaml reads an empty value (`header:`) as an empty map or list, so
//!   every map and list also accepts null.
//!
//! `patternErrorMessage` is the YAML language server's keyword (other tools
//! ignore it): its default message for a pattern is the regular expression.

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use super::raw::RawConfig;

/// The dialect the schema is written in (`$schema`).
pub const DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

/// A `${NAME}` reference anywhere in the text, as `env::interpolate` finds them.
const ENV_REFERENCE_PATTERN: &str = r"\$\{[A-Za-z_][A-Za-z0-9_]*\}";

/// The name of the definition every constrained scalar also accepts.
const ENV_REFERENCE: &str = "EnvReference";

/// The whole file's schema, as `larder schema` prints it.
pub fn json_schema() -> Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let mut schema = generator.into_root_schema_for::<RawConfig>().to_value();
    adapt(&mut schema);
    unwrap_descriptions(&mut schema);
    if let Value::Object(root) = &mut schema {
        // No title: the YAML language server puts the root's title at the
        // head of every hover, once per alternative of the value.
        root.remove("title");
        root.insert(
            "description".into(),
            json!(
                "The YAML file `larder -c FILE` reads. Printed by `larder schema`; \
                 the reference for every key is docs/config.md. `larder check` \
                 applies the rules a schema cannot (names that must exist, \
                 values that must parse)."
            ),
        );
        let defs = root
            .entry("$defs")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(defs) = defs {
            defs.insert(
                ENV_REFERENCE.into(),
                // A `$comment`, not a description: editors would add a
                // description to the hover of every value that accepts it.
                json!({
                    "type": "string",
                    "pattern": ENV_REFERENCE_PATTERN,
                    "$comment": "Text holding a `${NAME}` reference: the \
                        environment variable NAME is substituted before the \
                        file is read, so the value's own form is checked then \
                        (by `larder check`), not here."
                }),
            );
        }
    }
    schema
}

/// Writes the loader's two habits (see the module comment) into a derived
/// schema, walking every subschema that describes a part of the file.
fn adapt(schema: &mut Value) {
    let Value::Object(map) = schema else {
        return;
    };
    if is_constrained_scalar(map) {
        accept_env_reference(map);
        return;
    }
    if let Some(Value::String(kind)) = map.get("type")
        && (kind == "object" || kind == "array")
    {
        let kinds = json!([kind, "null"]);
        map.insert("type".into(), kinds);
    }
    for key in ["properties", "patternProperties", "$defs"] {
        if let Some(Value::Object(children)) = map.get_mut(key) {
            children.values_mut().for_each(adapt);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = map.get_mut(key) {
            adapt(child);
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(children)) = map.get_mut(key) {
            children.iter_mut().for_each(adapt);
        }
    }
}

/// Doc comments wrap at 80 columns; an editor's hover should not. Lines of
/// one paragraph are joined, paragraphs kept apart.
fn unwrap_descriptions(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::String(text)) = map.get_mut("description") {
                *text = text
                    .split("\n\n")
                    .map(|paragraph| paragraph.split('\n').collect::<Vec<_>>().join(" "))
                    .collect::<Vec<_>>()
                    .join("\n\n");
            }
            map.values_mut().for_each(unwrap_descriptions);
        }
        Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

/// A number, a boolean, a choice of words or text of a pattern: a value
/// whose form a `${NAME}` reference would not match as written. Plain text
/// needs nothing (a reference is text); neither do maps and lists (a
/// reference must be quoted to hold `{`, `[` or `: `, so it cannot make one).
fn is_constrained_scalar(schema: &Map<String, Value>) -> bool {
    let scalar = |kind: &Value| matches!(kind.as_str(), Some("integer" | "number" | "boolean"));
    let typed = match schema.get("type") {
        Some(Value::Array(kinds)) => kinds.iter().any(scalar),
        Some(kind) => scalar(kind),
        None => false,
    };
    let alternatives = ["anyOf", "oneOf"].iter().any(|key| {
        matches!(schema.get(*key), Some(Value::Array(alternatives))
            if !alternatives.is_empty()
                && alternatives.iter().all(|a| a.as_object().is_some_and(is_constrained_scalar)))
    });
    typed
        || alternatives
        || ["enum", "const", "pattern"]
            .iter()
            .any(|key| schema.contains_key(*key))
}

/// `{...}` becomes `{ anyOf: [{...}, EnvReference] }`, the annotations an
/// editor shows (description, default, examples) kept outside.
fn accept_env_reference(schema: &mut Map<String, Value>) {
    let mut outer = Map::new();
    for key in ["title", "description", "default", "examples"] {
        if let Some(value) = schema.remove(key) {
            outer.insert(key.into(), value);
        }
    }
    let form = std::mem::take(schema);
    outer.insert(
        "anyOf".into(),
        json!([form, { "$ref": format!("#/$defs/{ENV_REFERENCE}") }]),
    );
    *schema = outer;
}
