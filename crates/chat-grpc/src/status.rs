//! The one mapping between chat error codes and gRPC statuses.
//!
//! Each [`ErrorCode`] maps to the gRPC code that fits it, and the status
//! carries the stable code itself twice, so clients in any language can
//! branch on it: in the `chat-error-code` metadata entry, and as the reason
//! of a `google.rpc.ErrorInfo` detail (domain [`ERROR_DOMAIN`], reason in
//! upper case as AIP-193 asks).

use std::collections::HashMap;

use chat_core::client::ClientError;
use chat_core::{ChatError, ErrorCode};
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Metadata key carrying the stable error code.
pub const ERROR_CODE_KEY: &str = "chat-error-code";
/// The `ErrorInfo` domain of chat errors.
pub const ERROR_DOMAIN: &str = "chat.v1";

/// The gRPC code for a chat error code.
pub fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::InvalidUsername
        | ErrorCode::InvalidMessage
        | ErrorCode::MessageTooLong
        | ErrorCode::InvalidPattern
        | ErrorCode::Malformed => Code::InvalidArgument,
        ErrorCode::UsernameTaken => Code::AlreadyExists,
        ErrorCode::SendIdReused => Code::InvalidArgument,
        ErrorCode::NoSuchUser => Code::NotFound,
        ErrorCode::AlreadyLoggedIn
        | ErrorCode::SessionLoggedIn
        | ErrorCode::UnsupportedVersion
        | ErrorCode::HandshakeRequired => Code::FailedPrecondition,
        ErrorCode::NotLoggedIn | ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::QueueFull
        | ErrorCode::FrameTooLarge
        | ErrorCode::ServerFull
        | ErrorCode::RateLimited
        | ErrorCode::AccountLimit
        | ErrorCode::TooManyAttempts => Code::ResourceExhausted,
        ErrorCode::InvalidPassword => Code::InvalidArgument,
        ErrorCode::WrongPassword => Code::PermissionDenied,
        ErrorCode::PasswordNotSet => Code::FailedPrecondition,
        ErrorCode::StoreUnavailable
        | ErrorCode::ShuttingDown
        | ErrorCode::IdleTimeout
        | ErrorCode::HandshakeTimeout => Code::Unavailable,
        ErrorCode::UnknownOperation => Code::Unimplemented,
        _ => Code::Internal,
    }
}

/// A status for `code` with `message`, carrying the stable code. Every
/// error the server answers a request with is made here, so it is counted
/// here (`chat_errors_total`); the end of a stream is [`ending_status`].
pub fn to_status(code: ErrorCode, message: impl Into<String>) -> Status {
    chat_core::metrics::count_error("grpc", code);
    ending_status(code, message)
}

/// [`to_status`] for the status that ends a stream (a session over, the
/// server stopping): news, not a refused request, so not counted as an
/// error.
pub fn ending_status(code: ErrorCode, message: impl Into<String>) -> Status {
    let details = ErrorDetails::with_error_info(
        code.as_str().to_ascii_uppercase(),
        ERROR_DOMAIN,
        HashMap::<String, String>::new(),
    );
    let mut status = Status::with_error_details(grpc_code(code), message, details);
    status
        .metadata_mut()
        .insert(ERROR_CODE_KEY, MetadataValue::from_static(code.as_str()));
    status
}

/// The status for an engine error.
pub fn from_chat_error(err: &ChatError) -> Status {
    to_status(err.code(), err.to_string())
}

/// The stable chat code a status carries, if any: from the metadata entry,
/// else from the `ErrorInfo` detail.
pub fn chat_code(status: &Status) -> Option<ErrorCode> {
    if let Some(code) = status
        .metadata()
        .get(ERROR_CODE_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorCode::from_name)
    {
        return Some(code);
    }
    let info = status.get_details_error_info()?;
    if info.domain != ERROR_DOMAIN {
        return None;
    }
    ErrorCode::from_name(&info.reason.to_ascii_lowercase())
}

/// What a client sees for a failed call.
pub fn to_client_error(status: &Status) -> ClientError {
    match chat_code(status) {
        Some(code) => ClientError::Server {
            code,
            message: status.message().to_string(),
        },
        None if matches!(
            status.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown
        ) =>
        {
            ClientError::Connection(format!("{}: {}", status.code(), status.message()))
        }
        // Every error the server makes carries its code; an `internal`
        // without one is this side's HTTP/2 connection failing under the
        // call (a server that stops resets its streams).
        None if status.code() == Code::Internal
            && (std::error::Error::source(status).is_some()
                || status.message().contains("h2 protocol error")) =>
        {
            ClientError::Connection(format!("{}: {}", status.code(), status.message()))
        }
        None => ClientError::Protocol(format!("{}: {}", status.code(), status.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_survives_the_round_trip() {
        for &code in ErrorCode::ALL {
            let status = to_status(code, "why");
            assert_eq!(status.code(), grpc_code(code));
            assert_eq!(chat_code(&status), Some(code));
            // Clients that only read the ErrorInfo detail get it too.
            let mut bare = status.clone();
            bare.metadata_mut().remove(ERROR_CODE_KEY);
            assert_eq!(chat_code(&bare), Some(code), "{code}");
        }
    }

    #[test]
    fn statuses_without_a_chat_code_are_transport_failures() {
        let err = to_client_error(&Status::unavailable("connection refused"));
        assert!(matches!(err, ClientError::Connection(_)), "{err:?}");
    }
}
