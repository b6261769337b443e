//! Muster's issued-certificate extension of the service API (`/certificates/issued`): list
//! (optionally one registration's) page by page, show one by serial, revoke one.

use muster_proto::query::{HEADER_CONTINUATION, HEADER_MAX_ITEM_COUNT};
use muster_proto::{IssuedCertificate, RevokeRequest};
use reqwest::Method;

use crate::error::Result;
use crate::service::{read_json, segment, ServiceClient};

impl ServiceClient {
    /// `GET /certificates/issued`: one page by serial number, and the continuation token of
    /// the next page, if any.
    pub async fn issued_certificates_page(
        &self,
        registration_id: Option<&str>,
        page_size: Option<u32>,
        continuation: Option<&str>,
    ) -> Result<(Vec<IssuedCertificate>, Option<String>)> {
        let path = match registration_id {
            Some(id) => format!("/certificates/issued?registrationId={}", segment(id)),
            None => "/certificates/issued".to_string(),
        };
        let mut req = self.request(Method::GET, &path);
        if let Some(n) = page_size {
            req = req.header(HEADER_MAX_ITEM_COUNT, n.to_string());
        }
        if let Some(c) = continuation {
            req = req.header(HEADER_CONTINUATION, c);
        }
        let what = "list issued certificates";
        let resp = self.send(what, req).await?;
        let next = resp
            .headers()
            .get(HEADER_CONTINUATION)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        Ok((read_json(what, resp).await?, next))
    }

    /// `GET /certificates/issued/{serial}`.
    pub async fn issued_certificate(&self, serial: &str) -> Result<IssuedCertificate> {
        let path = format!("/certificates/issued/{}", segment(serial));
        let resp = self
            .send("show issued certificate", self.request(Method::GET, &path))
            .await?;
        read_json("show issued certificate", resp).await
    }

    /// `POST /certificates/issued/{serial}/revoke`: the record as stored.
    pub async fn revoke_issued_certificate(
        &self,
        serial: &str,
        reason: Option<&str>,
    ) -> Result<IssuedCertificate> {
        let path = format!("/certificates/issued/{}/revoke", segment(serial));
        let body = RevokeRequest {
            reason: reason.map(str::to_string),
        };
        let req = self.request(Method::POST, &path).json(&body);
        let resp = self.send("revoke issued certificate", req).await?;
        read_json("revoke issued certificate", resp).await
    }
}
