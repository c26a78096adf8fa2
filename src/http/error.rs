//! `ApiError`: every JSON error the ingress answers with (webhook, entitlement API,
//! readiness). Callers pick the class; the body never leaks internals, which are logged
//! once, here, for the 500s.

use axum::Json;
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// How long callers should wait before retrying a 503 (seconds). Microsoft retries
/// webhooks about once a minute regardless; our own clients honour it.
pub const RETRY_AFTER_SECS: u64 = 5;

/// An error answer of a JSON surface.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401: no or an invalid credential. `reason` is a stable machine-readable word.
    #[error("unauthorized ({reason}): {message}")]
    Unauthorized {
        reason: &'static str,
        message: String,
    },
    /// 403: the credential is valid but may not do this. `reason` is a stable word.
    #[error("forbidden ({reason}): {message}")]
    Forbidden {
        reason: &'static str,
        message: String,
    },
    /// 400: the request itself is wrong; `message` says how.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 404.
    #[error("not found: {0}")]
    NotFound(String),
    /// 409: the request conflicts with the resource's state; `reason` is a stable word.
    #[error("conflict ({reason}): {message}")]
    Conflict {
        reason: &'static str,
        message: String,
    },
    /// 422: well-formed, but its values cannot be accepted; `message` says why.
    #[error("unprocessable: {0}")]
    Unprocessable(String),
    /// 413: the body is larger than `limit` bytes.
    #[error("the body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 503 with `Retry-After`: a dependency (RabbitMQ, PostgreSQL) is unavailable; nothing
    /// was accepted, so the caller must retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// 500: a bug or an unexpected failure; logged with its source chain, hidden from the
    /// caller.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest(message.into())
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(message.into())
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable(message.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn body(&self) -> Value {
        match self {
            Self::Unauthorized { reason, message } => {
                json!({ "error": "unauthorized", "reason": reason, "message": message })
            }
            Self::Forbidden { reason, message } => {
                json!({ "error": "forbidden", "reason": reason, "message": message })
            }
            Self::BadRequest(message) => json!({ "error": "bad_request", "message": message }),
            Self::NotFound(message) => json!({ "error": "not_found", "message": message }),
            Self::Conflict { reason, message } => {
                json!({ "error": "conflict", "reason": reason, "message": message })
            }
            Self::Unprocessable(message) => {
                json!({ "error": "unprocessable", "message": message })
            }
            Self::PayloadTooLarge { limit } => json!({
                "error": "payload_too_large",
                "message": format!("the body exceeds the limit of {limit} bytes"),
            }),
            Self::Unavailable(message) => json!({
                "error": "unavailable",
                "message": message,
                "retryAfterSeconds": RETRY_AFTER_SECS,
            }),
            Self::Internal(_) => json!({
                "error": "internal",
                "message": "internal error; see the service logs",
            }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(error) = &self {
            tracing::error!(error = format!("{error:#}"), "request failed");
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        if matches!(self, Self::Unavailable(_)) {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_answers_503_with_retry_after() {
        let response = ApiError::unavailable("RabbitMQ is down").into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "5");
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let error = ApiError::from(anyhow::anyhow!("password=hunter2 in a query"));
        assert!(!error.body().to_string().contains("hunter2"));
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
