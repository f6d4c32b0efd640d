//! cdmctl's errors and the exit code each one gives.

use cdm_api::client::ClientError;

#[derive(Debug)]
pub(crate) enum CliError {
    Client(ClientError),
    Usage(String),
    NoToken(String),
    JobFailed(String),
    Other(String),
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(e)
    }
}

impl CliError {
    pub(crate) fn code(&self) -> u8 {
        match self {
            CliError::Client(e) => e.exit_code() as u8,
            CliError::Usage(_) => 2,
            CliError::NoToken(_) => 3,
            CliError::JobFailed(_) | CliError::Other(_) => 1,
        }
    }
    pub(crate) fn message(&self) -> String {
        match self {
            CliError::Client(ClientError::Api { message, .. }) => message.clone(),
            CliError::Client(e) => e.to_string(),
            CliError::Usage(m)
            | CliError::NoToken(m)
            | CliError::JobFailed(m)
            | CliError::Other(m) => m.clone(),
        }
    }
}
