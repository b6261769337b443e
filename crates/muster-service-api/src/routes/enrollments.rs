//! `/enrollments`: individual enrollments (get, create or update, delete, attestation
//! mechanism, query, bulk).

use axum::routing::{get, post};
use axum::Router;
use muster_proto::IndividualEnrollment;

use super::generic;
use crate::ServiceApi;

pub(super) fn routes() -> Router<ServiceApi> {
    type E = IndividualEnrollment;
    Router::new()
        .route("/enrollments", post(generic::bulk::<E>))
        .route("/enrollments/query", post(generic::query::<E>))
        .route(
            "/enrollments/{id}",
            get(generic::get::<E>)
                .put(generic::put::<E>)
                .delete(generic::delete::<E>),
        )
        .route(
            "/enrollments/{id}/attestationmechanism",
            post(generic::attestation_mechanism::<E>),
        )
}
