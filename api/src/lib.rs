//! The cdm HTTP API: JSON resources ([`types`]), errors, roles, the axum
//! routes over a [`backend::Backend`], the OpenAPI document, and the
//! blocking [`client`] that `cdmctl` and tests use.

pub mod appliance;
pub mod auth;
pub mod backend;
pub mod client;
pub mod control;
pub mod control_backend;
pub mod control_routes;
pub mod cron;
pub mod drills;
pub mod error;
pub mod instant;
pub mod openapi;
pub mod replication;
pub mod replication_backend;
pub mod replication_routes;
pub mod routes;
pub mod tier;
pub mod types;
pub mod vm_recovery;
pub mod vms;
pub mod web;

pub use error::{ApiError, ApiResult, InputError, InputKind};
