//! The OpenAPI document, generated from the handlers' annotations and the
//! resource types.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// Adds the bearer-token security scheme the routes refer to.
pub struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let comps = doc.components.get_or_insert_with(Default::default);
        comps.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON.
pub fn document() -> serde_json::Value {
    let mut doc = crate::routes::ApiDoc::openapi();
    doc.merge(crate::control_routes::ControlDoc::openapi());
    doc.merge(crate::replication_routes::ReplicationDoc::openapi());
    doc.merge(crate::drills::DrillDoc::openapi());
    doc.merge(crate::vm_recovery::VmRecoveryDoc::openapi());
    doc.merge(crate::appliance::ApplianceDoc::openapi());
    doc.merge(crate::tier::TierDoc::openapi());
    serde_json::to_value(doc).unwrap_or_else(
        |e| serde_json::json!({"error": {"code": "internal", "message": e.to_string()}}),
    )
}
