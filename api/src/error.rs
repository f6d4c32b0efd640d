//! API errors: a status and a machine-readable code, rendered as
//! `{"error": {"code", "message"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::types::{ErrorBody, ErrorDetail};

/// An error answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429 answers).
    pub retry_after: Option<u64>,
}

/// Which parser refused an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A five-field cron expression ([`crate::cron::Cron::parse`]).
    Cron,
    /// A snapshot schedule as a whole (interval or cron, not both).
    Schedule,
    /// A VM grouping (`os`, `app`, `keyword:WORD`, `path`, `pool`).
    Grouping,
    /// A VM category selector (`KIND:VALUE`).
    Category,
}

/// An input the API's parsers refuse: which parser (`kind`) and why
/// (`message`, written for people and shown as is). Callers that answer
/// HTTP turn it into a 400 with the same message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InputError {
    pub kind: InputKind,
    pub message: String,
}

impl InputError {
    pub fn new(kind: InputKind, message: impl Into<String>) -> InputError {
        InputError {
            kind,
            message: message.into(),
        }
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> ApiError {
        ApiError::bad_request(e.message)
    }
}

/// Result of backend and handler calls.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// 429 `too_many_requests`, to be retried after `secs` seconds.
    pub fn too_many_requests(m: impl Into<String>, secs: u64) -> ApiError {
        ApiError {
            retry_after: Some(secs),
            ..ApiError::new(429, "too_many_requests", m)
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(400, "bad_request", m)
    }
    pub fn unauthorized(m: impl Into<String>) -> ApiError {
        ApiError::new(401, "unauthorized", m)
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(403, "forbidden", m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(404, "not_found", m)
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(409, "conflict", m)
    }
    pub fn unsupported(m: impl Into<String>) -> ApiError {
        ApiError::new(501, "unsupported", m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(500, "internal", m)
    }
    pub fn unavailable(m: impl Into<String>) -> ApiError {
        ApiError::new(503, "unavailable", m)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut resp = (status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}
