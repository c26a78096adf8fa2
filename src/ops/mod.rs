//! Operator tools behind `fulfillment dlq …`, `fulfillment effects …`, `fulfillment
//! subscription …`, `fulfillment status`, `fulfillment reconcile` and `fulfillment doctor` (design.md guarantees 7 and 8): each is a library function that
//! returns a report, which the CLI prints as a table or, with `--json`, as JSON.
//!
//! - [`dlq`]: list, show, replay and purge dead letters; every replay and purge is
//!   journalled in `operator_actions`.
//! - [`subscription`]: list, show (the timeline from the event log) and publisher commands
//!   through the queue and the machine.
//! - [`reconcile`]: compares Microsoft's List Subscriptions with our state and heals drift by
//!   feeding observations through the machine.
//! - [`doctor`]: a read-only preflight of a deployment (settings, PostgreSQL, RabbitMQ,
//!   Entra, the Fulfillment API, the webhook JWKS and audiences, the public URLs).
//! - [`usage`]: metered usage: import a CSV, list and show hours, reconcile with
//!   Microsoft's usage records.
//! - [`endpoint`]: the ISV's webhook endpoints: add, list, show, rotate the secret,
//!   disable, test, the delivery log and replay (journalled).
//! - [`effects`]: dead effects (outbox rows the runner gave up on): list, show, retry and
//!   abandon, each change journalled.
//! - [`status`]: what needs a person now, each with the command to run.
//! - [`overview`]: the console's overview (states, ACK times, backlog, drift, attention).
//! - [`render`]: tables wrapped to the terminal and time formatting.
//!
//! Exit codes: 0 fine, 1 drift or failures found, 2 usage error ([`UsageError`]).

pub mod dlq;
pub mod doctor;
pub mod effects;
pub mod endpoint;
pub mod overview;
pub mod reconcile;
pub mod render;
pub mod status;
pub mod subscription;
pub mod usage;

use std::time::Duration;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A command line that parses but makes no sense (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Who runs this process, for the journal: `cli:<user>@<host>`.
pub fn cli_actor() -> String {
    let user = ["FULFILLMENT_OPERATOR", "USER", "LOGNAME"]
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("cli:{}@{host}", user.trim())
}

/// `--since`: an RFC 3339 instant, or an age such as `90s`, `15m`, `2h`, `7d` before `now`.
pub fn parse_since(raw: &str, now: OffsetDateTime) -> Result<OffsetDateTime, UsageError> {
    let raw = raw.trim();
    if let Ok(at) = OffsetDateTime::parse(raw, &Rfc3339) {
        return Ok(at);
    }
    parse_age(raw)
        .map(|age| now - age)
        .ok_or_else(|| {
            UsageError::new(format!(
                "--since takes an RFC 3339 time (2026-01-31T08:00:00Z) or an age such as 30m, 2h, 7d; got {raw:?}"
            ))
        })
}

/// `90s`, `15m`, `2h`, `7d`.
pub fn parse_age(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = raw.split_at(split);
    let number: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => number,
        "m" => number.checked_mul(60)?,
        "h" => number.checked_mul(3600)?,
        "d" => number.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(seconds))
}

pub fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn since_takes_an_instant_or_an_age() {
        let now = datetime!(2026-03-01 12:00 UTC);
        assert_eq!(
            parse_since("2026-02-28T08:00:00Z", now).unwrap(),
            datetime!(2026-02-28 08:00 UTC)
        );
        assert_eq!(
            parse_since("2h", now).unwrap(),
            datetime!(2026-03-01 10:00 UTC)
        );
        assert_eq!(
            parse_since("1d", now).unwrap(),
            datetime!(2026-02-28 12:00 UTC)
        );
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_since("5w", now).is_err());
        assert_eq!(parse_age("90s"), Some(Duration::from_secs(90)));
    }

    #[test]
    fn the_actor_names_the_cli() {
        assert!(cli_actor().starts_with("cli:"));
    }
}
