//! The domain-event contract of `docs/events/`: the JSON Schemas compiled once per test
//! binary, and a CloudEvent checked against the schema its `type` names. Included only by
//! the test binaries that check events, so the others do not compile a validator.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

/// `type` = this prefix + the routing key.
pub const TYPE_PREFIX: &str = "com.fulfillment.";
/// Every event type's schema is `docs/events/<routing key>` + this (besides the shared
/// `envelope.schema.json`, which is no event type).
pub const SCHEMA_SUFFIX: &str = ".schema.json";

fn schema_path(event_type: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/events");
    dir.join(format!("{event_type}{SCHEMA_SUFFIX}"))
}

/// The event types (routing keys) that have a schema file, sorted.
pub fn types_with_schemas() -> Vec<String> {
    let dir = std::fs::read_dir(schema_path("").parent().unwrap()).expect("docs/events/");
    let names = dir.map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned());
    let types = names.filter_map(|name| name.strip_suffix(SCHEMA_SUFFIX).map(str::to_owned));
    let mut types: Vec<String> = types.filter(|name| name != "envelope").collect();
    types.sort();
    types
}

/// The schema file of one event type, parsed.
pub fn schema_of(event_type: &str) -> Value {
    let path = schema_path(event_type);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every schema of `docs/events/`, compiled (draft 2020-12, `format` asserted).
pub struct Contract {
    schemas: boon::Schemas,
    by_type: BTreeMap<String, boon::SchemaIndex>,
}

impl Contract {
    /// Compiles every schema; panics with the compiler's explanation if one is not valid
    /// JSON Schema.
    pub fn load() -> Self {
        let mut schemas = boon::Schemas::new();
        let mut compiler = boon::Compiler::new();
        compiler.set_default_draft(boon::Draft::V2020_12);
        compiler.enable_format_assertions();
        let mut by_type = BTreeMap::new();
        for event_type in types_with_schemas() {
            let path = schema_path(&event_type);
            let index = compiler
                .compile(path.to_str().expect("a UTF-8 path"), &mut schemas)
                .unwrap_or_else(|e| panic!("{} is not a valid schema: {e:#}", path.display()));
            by_type.insert(event_type, index);
        }
        Self { schemas, by_type }
    }

    /// Checks `event` against the schema of the type it names.
    pub fn validate(&self, event: &Value) -> Result<(), String> {
        let name = event["type"].as_str().unwrap_or_default();
        let routing_key = (name.strip_prefix(TYPE_PREFIX))
            .ok_or_else(|| format!("type {name:?} does not start with {TYPE_PREFIX:?}"))?;
        self.validate_as(event, routing_key)
    }

    /// Checks `event` against the schema of `event_type`, whatever type it names.
    pub fn validate_as(&self, event: &Value, event_type: &str) -> Result<(), String> {
        let index = (self.by_type.get(event_type))
            .ok_or_else(|| format!("no schema docs/events/{event_type}{SCHEMA_SUFFIX}"))?;
        (self.schemas.validate(event, *index)).map_err(|e| format!("{e:#}\nevent: {event:#}"))
    }

    /// Panics listing every event that does not match its schema.
    pub fn assert_valid<'a>(&self, events: impl IntoIterator<Item = &'a Value>) {
        let failures = events
            .into_iter()
            .filter_map(|event| self.validate(event).err());
        let failures: Vec<String> = failures.collect();
        let n = failures.len();
        let list = failures.join("\n\n");
        assert!(
            n == 0,
            "{n} domain event(s) break their schema in docs/events/:\n{list}"
        );
    }
}
