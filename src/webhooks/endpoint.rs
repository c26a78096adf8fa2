//! What an endpoint is registered with, parsed at the edge (style principle 3): its URL
//! (HTTPS, or plain HTTP only on loopback or when explicitly allowed) and its topic filter.

use std::net::IpAddr;

use fulfillment_state_machine::DomainEventKind;
use url::{Host, Url};

/// A URL deliveries may go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl(Url);

/// Why a URL is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointUrlError {
    #[error("`url` is not a URL: {0}")]
    Malformed(String),
    #[error("`url` must be https:// (plain http:// only on a loopback host, or with `insecure`)")]
    NotHttps,
    #[error("`url` has no host")]
    NoHost,
    #[error("`url` must not carry credentials")]
    Credentials,
}

impl EndpointUrl {
    /// `insecure`: plain HTTP allowed on any host (the explicit switch).
    pub fn parse(text: &str, insecure: bool) -> Result<Self, EndpointUrlError> {
        let url =
            Url::parse(text.trim()).map_err(|e| EndpointUrlError::Malformed(e.to_string()))?;
        let host = url.host().ok_or(EndpointUrlError::NoHost)?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(EndpointUrlError::Credentials);
        }
        match url.scheme() {
            "https" => {}
            "http" if insecure || is_loopback(&host) => {}
            _ => return Err(EndpointUrlError::NotHttps),
        }
        Ok(Self(url))
    }

    pub fn as_url(&self) -> &Url {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

fn is_loopback(host: &Host<&str>) -> bool {
    match host {
        Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        Host::Ipv4(ip) => IpAddr::V4(*ip).is_loopback(),
        Host::Ipv6(ip) => IpAddr::V6(*ip).is_loopback(),
    }
}

/// The topics an endpoint wants: `*` (everything), `subscription.*`, or exact routing keys
/// (`subscription.plan_changed`, …). Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter(Vec<String>);

/// Why a topic filter is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicFilterError {
    #[error("`topics` must name at least one topic")]
    Empty,
    #[error("unknown topic `{0}` (use `*`, `subscription.*` or a routing key from docs/events.md)")]
    Unknown(String),
}

impl TopicFilter {
    pub fn parse<S: AsRef<str>>(topics: &[S]) -> Result<Self, TopicFilterError> {
        let mut parsed = Vec::new();
        for topic in topics {
            let topic = topic.as_ref().trim();
            let known = topic == "*"
                || topic == "subscription.*"
                || DomainEventKind::ALL
                    .iter()
                    .any(|k| k.routing_key() == topic);
            if !known {
                return Err(TopicFilterError::Unknown(topic.to_owned()));
            }
            if !parsed.iter().any(|t| t == topic) {
                parsed.push(topic.to_owned());
            }
        }
        if parsed.is_empty() {
            return Err(TopicFilterError::Empty);
        }
        Ok(Self(parsed))
    }

    /// Whether an event of this routing key goes to the endpoint.
    pub fn matches(&self, topic: &str) -> bool {
        self.0
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => pattern == topic,
            })
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_is_accepted_and_plain_http_only_on_loopback_or_when_allowed() {
        assert!(EndpointUrl::parse("https://isv.example/hooks", false).is_ok());
        assert!(EndpointUrl::parse("http://127.0.0.1:8080/hooks", false).is_ok());
        assert!(EndpointUrl::parse("http://[::1]:8080/hooks", false).is_ok());
        assert!(EndpointUrl::parse("http://localhost/hooks", false).is_ok());
        assert_eq!(
            EndpointUrl::parse("http://isv.example/hooks", false),
            Err(EndpointUrlError::NotHttps)
        );
        assert!(EndpointUrl::parse("http://isv.example/hooks", true).is_ok());
        assert_eq!(
            EndpointUrl::parse("ftp://isv.example/", true),
            Err(EndpointUrlError::NotHttps)
        );
        assert_eq!(
            EndpointUrl::parse("https://u:p@isv.example/", false),
            Err(EndpointUrlError::Credentials)
        );
        assert!(matches!(
            EndpointUrl::parse("not a url", false),
            Err(EndpointUrlError::Malformed(_))
        ));
    }

    #[test]
    fn topic_filters_match_exact_keys_and_wildcards() {
        let all = TopicFilter::parse(&["*"]).unwrap();
        assert!(all.matches("subscription.activated"));
        let subs = TopicFilter::parse(&["subscription.*"]).unwrap();
        assert!(subs.matches("subscription.suspended"));
        let plan = TopicFilter::parse(&["subscription.plan_changed"]).unwrap();
        assert!(plan.matches("subscription.plan_changed"));
        assert!(!plan.matches("subscription.quantity_changed"));
        assert_eq!(
            TopicFilter::parse(&["subscription.no-such-topic"]),
            Err(TopicFilterError::Unknown(
                "subscription.no-such-topic".into()
            ))
        );
        assert_eq!(
            TopicFilter::parse::<&str>(&[]),
            Err(TopicFilterError::Empty)
        );
    }
}
