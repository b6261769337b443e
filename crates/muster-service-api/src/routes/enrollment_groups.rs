//! `/enrollmentGroups`: enrollment groups (get, create or update, delete, attestation
//! mechanism, query, bulk).

use axum::routing::{get, post};
use axum::Router;
use muster_proto::EnrollmentGroup;

use super::generic;
use crate::ServiceApi;

pub(super) fn routes() -> Router<ServiceApi> {
    type G = EnrollmentGroup;
    Router::new()
        .route("/enrollmentGroups", post(generic::bulk::<G>))
        .route("/enrollmentGroups/query", post(generic::query::<G>))
        .route(
            "/enrollmentGroups/{id}",
            get(generic::get::<G>)
                .put(generic::put::<G>)
                .delete(generic::delete::<G>),
        )
        .route(
            "/enrollmentGroups/{id}/attestationmechanism",
            post(generic::attestation_mechanism::<G>),
        )
}
