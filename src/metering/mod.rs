//! Metered billing (docs/marketplace.md §9): usage in from the ISV's product, hourly totals
//! in PostgreSQL, exactly-once submission to Microsoft through the outbox.
//!
//! - this module: the pure parts — parsing a usage report (JSON or CSV), the clock hour
//!   of a usage, the 24-hour window, the batches of at most 25 hours, a plan's dimensions
//!   as listAvailablePlans gives them.
//! - [`ingest`]: validates reports against the subscription's plan and stores them.
//! - [`submit`]: closes hours after the grace period and queues their batches.
//! - the submission itself is the `submit_usage` effect
//!   ([`crate::worker::protocol::metering`]).

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::store::usage::DueHour;

pub mod ingest;
pub mod submit;

/// Microsoft accepts an event whose `effectiveStartTime` is at most this old (§9).
pub const WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Items in one `batchUsageEvent` (§9.2).
pub const MAX_BATCH: usize = 25;
/// Usage events in one request or file.
pub const MAX_EVENTS_PER_REQUEST: usize = 1000;
/// How far in the future a usage may claim to be (clock skew).
pub const FUTURE_SKEW: Duration = Duration::from_secs(300);

/// How metering behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct MeteringConfig {
    /// An hour closes (is frozen and submitted) this long after its end; usage arriving
    /// later for it is reported as late.
    pub grace: Duration,
    /// Between two looks for closed hours.
    pub tick: Duration,
    /// How long the dimensions learned from listAvailablePlans are trusted.
    pub dimensions_ttl: Duration,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(300),
            tick: Duration::from_secs(1),
            dimensions_ttl: Duration::from_secs(3600),
        }
    }
}

/// One usage report as the API and the CSV take it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawUsage {
    #[serde(default)]
    pub subscription_id: Option<Value>,
    #[serde(default)]
    pub dimension: Option<Value>,
    #[serde(default)]
    pub quantity: Option<Value>,
    #[serde(default)]
    pub effective_at: Option<Value>,
    #[serde(default)]
    pub idempotency_key: Option<Value>,
}

/// A usage report that parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub subscription_id: Uuid,
    pub dimension: String,
    pub quantity: f64,
    pub effective_at: OffsetDateTime,
    pub idempotency_key: String,
}

/// The clock hour (minute 00–59) a time falls in: Microsoft's bucket (§9).
pub fn hour_of(at: OffsetDateTime) -> OffsetDateTime {
    let secs = at.unix_timestamp().div_euclid(3600) * 3600;
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(at)
}

fn text(value: &Option<Value>) -> Option<String> {
    match value {
        Some(Value::String(s)) => Some(s.trim().to_owned()).filter(|s| !s.is_empty()),
        _ => None,
    }
}

impl RawUsage {
    /// Parses one report at `now`, or says what is wrong with it.
    pub fn parse(&self, now: OffsetDateTime) -> Result<Usage, String> {
        let subscription_id = text(&self.subscription_id)
            .ok_or("subscriptionId is required (the SaaS subscription GUID)")?;
        let subscription_id = Uuid::parse_str(&subscription_id)
            .map_err(|_| format!("subscriptionId must be a GUID, got {subscription_id:?}"))?;
        let dimension = text(&self.dimension).ok_or("dimension is required")?;
        let quantity = match &self.quantity {
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            _ => None,
        }
        .ok_or("quantity is required and must be a number")?;
        if !quantity.is_finite() || quantity <= 0.0 {
            return Err(format!(
                "quantity must be greater than 0 (Microsoft bills only usage > 0), got {quantity}"
            ));
        }
        let effective = text(&self.effective_at)
            .ok_or("effectiveAt is required (RFC 3339, e.g. 2026-12-06T08:30:00Z)")?;
        let effective_at = OffsetDateTime::parse(&effective, &Rfc3339).map_err(|_| {
            format!("effectiveAt must be an RFC 3339 time with an offset, got {effective:?}")
        })?;
        let idempotency_key = text(&self.idempotency_key)
            .ok_or("idempotencyKey is required (any string unique to this usage, ≤ 200 chars)")?;
        if idempotency_key.chars().count() > 200 {
            return Err("idempotencyKey is longer than 200 characters".into());
        }
        check_window(hour_of(effective_at), effective_at, now)?;
        Ok(Usage {
            subscription_id,
            dimension,
            quantity,
            effective_at,
            idempotency_key,
        })
    }
}

/// A usage Microsoft would refuse for its time: its hour started more than 24 h ago
/// (we submit the hour's start as `effectiveStartTime`), or it lies in the future.
pub fn check_window(
    hour: OffsetDateTime,
    effective_at: OffsetDateTime,
    now: OffsetDateTime,
) -> Result<(), String> {
    if hour < now - WINDOW {
        return Err(format!(
            "effectiveAt {} is outside Microsoft's 24-hour window (its hour started more \
             than 24 h ago): Microsoft would answer Expired",
            effective_at.format(&Rfc3339).unwrap_or_default()
        ));
    }
    if effective_at > now + FUTURE_SKEW {
        return Err("effectiveAt is in the future".into());
    }
    Ok(())
}

/// The body of `POST /api/v1/usage`: one report, an array, or `{"events": [...]}`.
pub fn reports_of_json(body: &Value) -> Result<Vec<RawUsage>, String> {
    let items = match body {
        Value::Array(items) => items.clone(),
        Value::Object(map) if map.contains_key("events") => match &map["events"] {
            Value::Array(items) => items.clone(),
            _ => return Err("`events` must be an array of usage events".into()),
        },
        Value::Object(_) => vec![body.clone()],
        _ => {
            return Err(
                "the body must be a usage event, an array of them, or {\"events\": [...]}".into(),
            );
        }
    };
    if items.is_empty() {
        return Err("no usage events in the body".into());
    }
    if items.len() > MAX_EVENTS_PER_REQUEST {
        return Err(format!(
            "at most {MAX_EVENTS_PER_REQUEST} usage events per request, got {}",
            items.len()
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            serde_json::from_value::<RawUsage>(item)
                .map_err(|e| format!("event {i}: not a usage event object: {e}"))
        })
        .collect()
}

/// The CSV of `fulfillment usage import`: a header naming the columns
/// `subscriptionId,dimension,quantity,effectiveAt,idempotencyKey` (any order), then one
/// usage per line. No quoting: no field holds a comma. Blank lines and lines starting
/// with `#` are skipped. Returns `(line number, report)`.
pub fn reports_of_csv(text: &str) -> Result<Vec<(usize, RawUsage)>, String> {
    const COLUMNS: [&str; 5] = [
        "subscriptionId",
        "dimension",
        "quantity",
        "effectiveAt",
        "idempotencyKey",
    ];
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
    let (_, header) = lines.next().ok_or("the file is empty")?;
    let header: Vec<&str> = header.split(',').map(str::trim).collect();
    let mut positions = [0usize; 5];
    for (slot, column) in positions.iter_mut().zip(COLUMNS) {
        *slot = header.iter().position(|h| *h == column).ok_or_else(|| {
            format!(
                "the header lacks the column {column}; it must name {}",
                COLUMNS.join(",")
            )
        })?;
    }
    let mut reports = Vec::new();
    for (number, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != header.len() {
            return Err(format!(
                "line {number}: {} fields, the header has {}",
                fields.len(),
                header.len()
            ));
        }
        let field = |i: usize| Some(Value::String(fields[positions[i]].to_owned()));
        reports.push((
            number,
            RawUsage {
                subscription_id: field(0),
                dimension: field(1),
                quantity: field(2),
                effective_at: field(3),
                idempotency_key: field(4),
            },
        ));
        if reports.len() > 100_000 {
            return Err("more than 100000 usage lines: split the file".into());
        }
    }
    Ok(reports)
}

/// The ids of `planComponents.meteringDimensions` of a listAvailablePlans plan (§3.6).
pub fn dimensions_of_plan(plan_components: Option<&Value>) -> Vec<String> {
    plan_components
        .and_then(|c| c.get("meteringDimensions"))
        .and_then(Value::as_array)
        .map(|dims| {
            dims.iter()
                .filter_map(|d| d.get("id").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Splits due hours (oldest first) into batches: one subscription each, at most
/// [`MAX_BATCH`] hours, oldest hours in the first batches.
pub fn plan_batches(hours: Vec<DueHour>) -> Vec<Vec<DueHour>> {
    let mut by_subscription: Vec<(Uuid, Vec<DueHour>)> = Vec::new();
    for hour in hours {
        match by_subscription
            .iter_mut()
            .find(|(id, _)| *id == hour.subscription_id)
        {
            Some((_, list)) => list.push(hour),
            None => by_subscription.push((hour.subscription_id, vec![hour])),
        }
    }
    let mut batches = Vec::new();
    for (_, mut list) in by_subscription {
        list.sort_by_key(|h| (h.hour, h.dimension.clone()));
        for chunk in list.chunks(MAX_BATCH) {
            batches.push(chunk.to_vec());
        }
    }
    batches.sort_by_key(|b| b.first().map(|h| h.hour));
    batches
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-12-06 10:20:00 UTC);

    fn raw(v: Value) -> RawUsage {
        serde_json::from_value(v).unwrap()
    }

    fn report() -> Value {
        json!({"subscriptionId": "0f8e7d6c-0000-4000-8000-000000000001", "dimension": "api-calls",
               "quantity": 2.5, "effectiveAt": "2026-12-06T09:59:59Z", "idempotencyKey": "k1"})
    }

    #[test]
    fn a_usage_falls_in_its_clock_hour() {
        assert_eq!(
            hour_of(datetime!(2026-12-06 09:59:59.9 UTC)),
            datetime!(2026-12-06 09:00 UTC)
        );
        assert_eq!(
            hour_of(datetime!(2026-12-06 10:00 UTC)),
            datetime!(2026-12-06 10:00 UTC)
        );
        assert_eq!(
            hour_of(datetime!(2026-12-06 11:30 +01:00)),
            datetime!(2026-12-06 10:00 UTC)
        );
    }

    #[test]
    fn reports_parse_or_name_what_is_wrong() {
        let usage = raw(report()).parse(NOW).unwrap();
        assert_eq!(usage.quantity, 2.5);
        assert_eq!(usage.dimension, "api-calls");
        let with = |key: &str, value: Value| {
            let mut body = report();
            body[key] = value;
            raw(body).parse(NOW).unwrap_err()
        };
        assert!(with("quantity", json!(0)).contains("greater than 0"));
        assert!(with("quantity", json!(-1)).contains("greater than 0"));
        assert!(with("subscriptionId", json!("nope")).contains("GUID"));
        assert!(with("effectiveAt", json!("2026-12-06 09:00")).contains("RFC 3339"));
        assert!(with("idempotencyKey", json!("")).contains("idempotencyKey"));
        assert!(with("dimension", Value::Null).contains("dimension"));
    }

    #[test]
    fn the_24_hour_window_counts_from_the_hour_start() {
        // 24 h ago, but its hour started 24 h 20 min ago: Microsoft would say Expired.
        let mut body = report();
        body["effectiveAt"] = json!("2026-12-05T10:20:00Z");
        assert!(raw(body).parse(NOW).unwrap_err().contains("24-hour window"));
        let mut body = report();
        body["effectiveAt"] = json!("2026-12-05T11:00:00Z");
        assert!(raw(body).parse(NOW).is_ok());
        let mut body = report();
        body["effectiveAt"] = json!("2026-12-06T11:00:00Z");
        assert!(raw(body).parse(NOW).unwrap_err().contains("future"));
    }

    #[test]
    fn bodies_hold_one_report_an_array_or_events() {
        assert_eq!(reports_of_json(&report()).unwrap().len(), 1);
        assert_eq!(
            reports_of_json(&json!([report(), report()])).unwrap().len(),
            2
        );
        assert_eq!(
            reports_of_json(&json!({"events": [report()]}))
                .unwrap()
                .len(),
            1
        );
        assert!(reports_of_json(&json!([])).is_err());
        assert!(reports_of_json(&json!("x")).is_err());
    }

    #[test]
    fn csv_columns_are_found_by_name() {
        let csv = "# usage\nidempotencyKey,subscriptionId,dimension,quantity,effectiveAt\n\
                   k1,0f8e7d6c-0000-4000-8000-000000000001,api-calls,3,2026-12-06T09:10:00Z\n\n";
        let reports = reports_of_csv(csv).unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].0, 3);
        assert_eq!(reports[0].1.parse(NOW).unwrap().quantity, 3.0);
        assert!(
            reports_of_csv("a,b\n")
                .unwrap_err()
                .contains("subscriptionId")
        );
        assert!(
            reports_of_csv("subscriptionId,dimension,quantity,effectiveAt,idempotencyKey\nx,y\n")
                .unwrap_err()
                .contains("line 2")
        );
    }

    #[test]
    fn dimensions_come_from_the_plan_components() {
        let components = json!({"meteringDimensions": [{"id": "api-calls"}, {"id": "storage-gb"}]});
        assert_eq!(
            dimensions_of_plan(Some(&components)),
            vec!["api-calls", "storage-gb"]
        );
        assert!(dimensions_of_plan(None).is_empty());
    }

    #[test]
    fn batches_hold_one_subscription_and_at_most_25_hours_oldest_first() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let hour = |sub: Uuid, h: i64| DueHour {
            id: Uuid::new_v4(),
            subscription_id: sub,
            plan_id: "gold".into(),
            dimension: "api-calls".into(),
            hour: NOW - time::Duration::hours(h),
            quantity: 1.0,
        };
        let mut hours: Vec<DueHour> = (1..=23).rev().map(|h| hour(a, h)).collect();
        hours.extend((1..=23).rev().map(|h| hour(a, h)));
        hours.push(hour(b, 2));
        let batches = plan_batches(hours);
        assert_eq!(batches.len(), 3);
        assert!(batches.iter().all(|b| b.len() <= MAX_BATCH));
        assert!(batches.iter().all(|batch| {
            batch
                .iter()
                .all(|h| h.subscription_id == batch[0].subscription_id)
        }));
        assert_eq!(batches[0].len(), 25);
        assert_eq!(batches[0][0].hour, NOW - time::Duration::hours(23));
    }
}
