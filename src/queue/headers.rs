//! The AMQP headers we set and read, and their conversion to and from lapin's `FieldTable`.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::collections::BTreeMap;

/// W3C trace context of the request that produced the message.
pub const TRACEPARENT: &str = "traceparent";
pub const SUBSCRIPTION_ID: &str = "x-subscription-id";
/// `InboundMessage::type_name`.
pub const MESSAGE_TYPE: &str = "x-message-type";
/// How many times a worker already failed on this message (0 on first publish); in the
/// dead-letter queue, the attempts made in all.
pub const ATTEMPT: &str = "x-attempt";
pub const LAST_ERROR: &str = "x-last-error";
pub const DEAD_LETTERED_AT: &str = "x-dead-lettered-at";
pub const FAILURE_REASON: &str = "x-failure-reason";
/// The Marketplace API response that made the failure permanent, when there was one.
pub const MARKETPLACE_RESPONSE: &str = "x-marketplace-response";
/// When a worker first failed on this message (RFC 3339); kept across retry tiers.
pub const FIRST_FAILED_AT: &str = "x-first-failed-at";
/// How many times an operator replayed the message from a dead-letter queue.
pub const REPLAY_COUNT: &str = "x-replay-count";
pub const REPLAYED_AT: &str = "x-replayed-at";
pub const REPLAYED_BY: &str = "x-replayed-by";

/// Header values longer than this are cut (an error text or a response body must not make a
/// message huge).
pub const MAX_HEADER_VALUE_BYTES: usize = 4096;

pub(crate) fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(truncate(value, MAX_HEADER_VALUE_BYTES)))
}

pub(crate) fn set(table: &mut FieldTable, key: &str, value: AMQPValue) {
    table.insert(ShortString::from(key), value);
}

/// Cuts `value` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(value: &str, max: usize) -> &str {
    if value.len() <= max {
        return value;
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// The headers as text, for logs, the DLQ tooling and tests. Nested values (such as
/// RabbitMQ's `x-death`) are rendered as JSON.
pub fn stringify(table: Option<&FieldTable>) -> BTreeMap<String, String> {
    table
        .map(|t| {
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), value_to_string(v)))
                .collect()
        })
        .unwrap_or_default()
}

/// `x-attempt` as a number; absent or unreadable counts as 0.
pub fn attempt(table: Option<&FieldTable>) -> u32 {
    count(table, ATTEMPT)
}

/// A counter header (`x-attempt`, `x-delivery-count`, …) as a number; absent or unreadable
/// counts as 0.
pub fn count(table: Option<&FieldTable>, key: &str) -> u32 {
    let Some(value) = table.and_then(|t| t.inner().get(key)) else {
        return 0;
    };
    let n: i128 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => (*v).into(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes())
            .trim()
            .parse()
            .unwrap_or(0),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().unwrap_or(0),
        _ => 0,
    };
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// A header that is text (long or short string).
pub fn text(table: Option<&FieldTable>, key: &str) -> Option<String> {
    match table?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn value_to_string(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => match value_to_json(other) {
            serde_json::Value::String(s) => s,
            json => json.to_string(),
        },
    }
}

fn value_to_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::ShortShortInt(v) => Value::from(*v),
        AMQPValue::ShortShortUInt(v) => Value::from(*v),
        AMQPValue::ShortInt(v) => Value::from(*v),
        AMQPValue::ShortUInt(v) => Value::from(*v),
        AMQPValue::LongInt(v) => Value::from(*v),
        AMQPValue::LongUInt(v) => Value::from(*v),
        AMQPValue::LongLongInt(v) => Value::from(*v),
        AMQPValue::Float(v) => Value::from(*v),
        AMQPValue::Double(v) => Value::from(*v),
        AMQPValue::DecimalValue(d) => Value::from(format!("{}e-{}", d.value, d.scale)),
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => Value::from(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), value_to_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => Value::from(
            b.as_slice()
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect::<String>(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    #[test]
    fn attempt_reads_any_integer_width_and_defaults_to_zero() {
        let mut t = FieldTable::default();
        assert_eq!(attempt(Some(&t)), 0);
        assert_eq!(attempt(None), 0);
        set(&mut t, ATTEMPT, AMQPValue::LongLongInt(3));
        assert_eq!(attempt(Some(&t)), 3);
        set(&mut t, ATTEMPT, AMQPValue::ShortShortUInt(2));
        assert_eq!(attempt(Some(&t)), 2);
        set(&mut t, ATTEMPT, AMQPValue::LongInt(-4));
        assert_eq!(attempt(Some(&t)), 0);
    }

    #[test]
    fn nested_headers_become_json_text() {
        let mut death = FieldTable::default();
        set(&mut death, "count", AMQPValue::LongLongInt(1));
        set(&mut death, "reason", long_string("expired"));
        let mut array = FieldArray::default();
        array.push(AMQPValue::FieldTable(death));
        let mut t = FieldTable::default();
        set(&mut t, "x-death", AMQPValue::FieldArray(array));
        set(&mut t, TRACEPARENT, long_string("00-abc-def-01"));
        let s = stringify(Some(&t));
        assert_eq!(s["traceparent"], "00-abc-def-01");
        assert_eq!(s["x-death"], r#"[{"count":1,"reason":"expired"}]"#);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
