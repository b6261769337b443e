//! [`Engine`]: authenticate → find the enrollment → apply the reprovision policy → allocate a
//! hub → write the device and its twin into that hub → persist the record → answer.
//!
//! The first answer already says `assigned` when everything finished within the request; a
//! registration throttled by its hub's rate limit is persisted as `assigning` with its plan and
//! finished in order by that hub's worker (also after a restart: [`Engine::resume_pending`]).
//!
//! Intent before effect: every plan is saved (record `assigning` + its `PendingAssignments`
//! marker, one transaction) before any hub is written, so a crash between the hub write and
//! the final record is finished at the next start instead of leaving a hub device without a
//! record. For a hub whose device and twin are two calls (REST), whether the hub lacked the
//! device is saved with the plan before the put, so a retry still writes the initial twin.
//! `deprovision` (in `engine/deprovision.rs`) follows the same rule, and deletes a hub device
//! only while its etag is the one read before the record went.
//!
//! Several nodes on one store (`engine/claims.rs`): a marker is written claimed by the node
//! that saved it (a lease it renews while it works), and a periodic [`Engine::sweep`] claims
//! the markers and hub removals whose lease lapsed (a dead node's), so each intent is worked
//! on by one node and taken over when that node dies. As a backstop, finishing a plan is
//! conditional on the record's and marker's etags as read before the hub writes: a record
//! another node changed meanwhile is never overwritten.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_attestation::symmetric_key;
use muster_proto::device::{
    DeviceRegistrationResult, RegistrationOperationStatus, SymmetricKeyRegistrationResult,
    TpmRegistrationResult,
};
use muster_proto::linked_hub::LinkedHub;
use muster_proto::runtime::{random_hex, Clock, Entropy};
use muster_proto::service_settings::{ServiceSettings, SERVICE_SETTINGS_KEY};
use muster_proto::{
    AllocationPolicy, AttestationType, DeviceRegistrationState, EnrollmentGroup, ErrorCode,
    IdScope, IndividualEnrollment, InitialTwin, RegistrationId, RegistrationStatus,
    RegistrationSubstatus, ReprovisionPolicy,
};
use muster_store::records;
use muster_store::{Collection, Expect, ListQuery, Record, Store, Write, WriteOutcome};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, Semaphore};
use tracing::{info, warn};

use crate::allocation::{self, custom};
use crate::device_auth::{self, Attestation, Attested, Matched};
use crate::group_cache::GroupCache;
use crate::hub_client::{
    HubAuthentication, HubClient, HubConnection, HubDeviceSpec, RestHub, TwinWrite,
};
use crate::issuance::{self, IssuingCa};
use crate::metrics;
use crate::record::{EnrollmentRef, PendingAssignment, RegistrationRecord, TwinOutcome, TwinPlan};
use crate::throttle::Limiter;
use crate::{
    DeviceCredential, DeviceFailure, DeviceRegistrar, DeviceReply, RegisterRequest, StatusRequest,
};

mod certificates;
mod claims;
mod deprovision;
pub use certificates::{Revocation, ISSUE_AUDIT_ROUTE};
pub use deprovision::Deprovisioned;

/// A hub refusing every device would otherwise write a line per registration.
/// Reads and commits of [`Engine::assign_in_one_write`] before it leaves a device that keeps
/// changing to the intent path.
const ONE_WRITE_ATTEMPTS: usize = 3;

static ASSIGNMENT_FAILED_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub id_scope: IdScope,
    /// Used when an enrollment sets no allocation policy and the service settings name none
    /// (DPS's default is hashed).
    pub default_policy: AllocationPolicy,
    /// This node's region, for `geoLatency`.
    pub region: Option<String>,
    pub webhook: custom::WebhookPolicy,
    /// Registrations processed at once; beyond it devices get 429 with `retry-after`.
    pub max_in_flight: usize,
    /// `retry-after` (seconds) for registrations left `assigning`.
    pub retry_after_secs: u32,
    /// This node's name in claims on shared work (see [`Engine::sweep`]); unique per node of
    /// a store shared by several, and best kept across restarts (a restarted node then takes
    /// its own work back at once instead of after its leases lapse).
    pub node_id: String,
    /// How long a claim on an intent holds without renewal: a dead node's work waits this
    /// long before another node takes it over.
    pub lease: Duration,
    /// How often a node renews its claims and looks for work whose lease lapsed; well under
    /// `lease`.
    pub sweep_interval: Duration,
}

impl EngineConfig {
    pub fn new(id_scope: IdScope) -> Self {
        Self {
            id_scope,
            default_policy: AllocationPolicy::Hashed,
            region: None,
            webhook: custom::WebhookPolicy::default(),
            max_in_flight: 4096,
            retry_after_secs: 2,
            node_id: "local".into(),
            lease: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Clone)]
pub struct Engine(Arc<Inner>);

struct Inner {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    entropy: Arc<dyn Entropy>,
    config: EngineConfig,
    hubs: HubClient,
    /// Hubs reached in process (the built-in hub), by lower-case host name.
    local_hubs: HashMap<String, Arc<dyn HubConnection>>,
    groups: GroupCache,
    http: reqwest::Client,
    throttle: Limiter,
    in_flight: Semaphore,
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<String>>>,
    /// Pending assignments this node holds a claim on and renews (`claims`).
    held: Mutex<HashSet<String>>,
    /// Whether the one-time scan for markers of an old database was done.
    legacy_checked: AtomicBool,
    /// Sign certificates for CSRs, by name (`local`: the server's default); an enrollment
    /// naming none that is here has its CSRs refused as not enabled.
    issuing_cas: HashMap<String, Arc<IssuingCa>>,
    /// The service's default allocation policy as last read, with the settings collection's
    /// change counter it was read at (see [`Engine::default_policy`]).
    default_policy: std::sync::Mutex<Option<(u64, AllocationPolicy)>>,
    /// The linked hubs as last read, with the collection's change counter then (see
    /// [`Engine::linked_hubs`]).
    linked_hubs: std::sync::Mutex<Option<(u64, Arc<[LinkedHub]>)>>,
}

/// The enrollment settings that decide a registration, whichever kind matched.
struct Settings {
    policy: AllocationPolicy,
    iot_hubs: Option<Vec<String>>,
    legacy_hub: Option<String>,
    reprovision: ReprovisionPolicy,
    initial_twin: Option<InitialTwin>,
    iot_edge: bool,
    device_id: String,
    webhook_url: Option<String>,
    /// The enrollment as the webhook sees it (no secrets).
    webhook_view: (&'static str, Value),
}

impl Engine {
    /// `http` is used for hub REST calls and webhooks; it must trust the hubs' certificates.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
        http: reqwest::Client,
        config: EngineConfig,
    ) -> Self {
        let in_flight = Semaphore::new(config.max_in_flight);
        let throttle = Limiter::new(store.clone(), clock.clone());
        Self(Arc::new(Inner {
            hubs: HubClient::new(http.clone(), clock.clone()),
            store,
            clock,
            entropy,
            config,
            local_hubs: HashMap::new(),
            groups: GroupCache::default(),
            http,
            throttle,
            in_flight,
            queues: Mutex::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
            legacy_checked: AtomicBool::new(false),
            issuing_cas: HashMap::new(),
            default_policy: std::sync::Mutex::new(None),
            linked_hubs: std::sync::Mutex::new(None),
        }))
    }

    /// Issues certificates for registrations that send a CSR (and whose enrollment's
    /// `certificateIssuance` allows it) with `ca`. Call before the engine is cloned or shared.
    ///
    /// # Panics
    /// If the engine was already cloned (a start-up wiring error).
    #[must_use]
    pub fn with_issuing_ca(self, ca: Arc<IssuingCa>) -> Self {
        self.with_named_issuing_ca(muster_proto::issued_certificate::LOCAL_ISSUING_CA, ca)
    }

    /// Adds an issuing CA that enrollments select with `certificateIssuance.issuingCa: name`
    /// (`local` is the default one). Call before the engine is cloned or shared.
    ///
    /// # Panics
    /// If the engine was already cloned (a start-up wiring error).
    #[must_use]
    pub fn with_named_issuing_ca(mut self, name: &str, ca: Arc<IssuingCa>) -> Self {
        let inner = Arc::get_mut(&mut self.0).expect("with_issuing_ca before the engine is shared");
        inner.issuing_cas.insert(name.to_string(), ca);
        self
    }

    /// Reaches the hub named `host` through `connection` instead of its REST API. Call before
    /// the engine is cloned or shared. A connection whose `prepare_put` gives store writes
    /// must keep its devices in this engine's store: they commit in the engine's transaction.
    ///
    /// # Panics
    /// If the engine was already cloned (a start-up wiring error).
    #[must_use]
    pub fn with_local_hub(mut self, host: &str, connection: Arc<dyn HubConnection>) -> Self {
        let inner = Arc::get_mut(&mut self.0).expect("with_local_hub before the engine is shared");
        inner
            .local_hubs
            .insert(host.to_ascii_lowercase(), connection);
        self
    }

    /// How to reach a linked hub: in process when it is a local hub, else over REST.
    fn connection(&self, hub: &LinkedHub) -> Arc<dyn HubConnection> {
        match self.0.local_hubs.get(&hub.name.to_ascii_lowercase()) {
            Some(c) => c.clone(),
            None => Arc::new(RestHub::new(
                self.0.hubs.clone(),
                hub.connection_string.clone(),
            )),
        }
    }

    /// Deletes a device from a linked hub, the way assignments write it (in process for the
    /// built-in hub, REST with the stored connection string otherwise): the cascade of a
    /// deprovisioning. A device that is not there is not an error.
    pub async fn remove_hub_device(&self, hub: &str, device_id: &str) -> Result<(), DeviceFailure> {
        let linked = self.linked_hubs().await?;
        let target = linked
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(hub))
            .ok_or_else(|| {
                DeviceFailure::new(
                    ErrorCode::HubNotLinked,
                    format!("IoT hub '{hub}' is not linked"),
                )
            })?;
        self.connection(target)
            .delete_device(device_id)
            .await
            .map_err(|e| DeviceFailure::new(ErrorCode::HubWriteFailed, e.to_string()))
    }

    fn failure_reply(&self, f: DeviceFailure) -> DeviceReply {
        DeviceReply::error(
            f.code,
            f.message,
            random_hex(&*self.0.entropy, 16),
            self.0.clock.now(),
        )
    }

    fn check_scope_and_id(&self, scope: &str, id: &str) -> Result<RegistrationId, DeviceFailure> {
        if !scope.eq_ignore_ascii_case(self.0.config.id_scope.as_str()) {
            return Err(DeviceFailure::new(
                ErrorCode::UnknownIdScope,
                format!("ID scope '{scope}' is not this service's"),
            ));
        }
        RegistrationId::new(id)
            .map_err(|e| DeviceFailure::new(ErrorCode::InvalidRegistrationId, e.to_string()))
    }

    async fn load_record(
        &self,
        key: &str,
    ) -> Result<Option<(RegistrationRecord, String)>, DeviceFailure> {
        match self.0.store.get(Collection::Registrations, key).await? {
            Some(r) => Ok(Some((decode_record(&r)?, r.etag))),
            None => Ok(None),
        }
    }

    /// Saves a record whatever is stored (a new registration's outcome); returns its etag.
    async fn save_record(
        &self,
        key: &str,
        record: &RegistrationRecord,
    ) -> Result<String, DeviceFailure> {
        match self.save_record_if(key, record, &Expected::any()).await? {
            Saved::Written { etag, .. } => Ok(etag),
            Saved::Changed => Err(DeviceFailure::internal(
                "saving a registration record",
                "not written",
            )),
        }
    }

    /// Saves a record and its marker in one transaction when both are as `expected`. A plan
    /// marker is written claimed by this node. Nothing is written when the record changed
    /// ([`Saved::Changed`]).
    async fn save_record_if(
        &self,
        key: &str,
        record: &RegistrationRecord,
        expected: &Expected,
    ) -> Result<Saved, DeviceFailure> {
        // The marker that lets a restart find this record without scanning them all moves in
        // the same transaction as the record.
        let marker = match &record.pending {
            Some(plan) => {
                self.hold(key);
                Write::put(
                    Collection::PendingAssignments,
                    key,
                    expected.marker.clone(),
                    json!({"hub": plan.hub, "since": record.state.last_updated_date_time_utc}),
                )
                .with_lease(self.lease())
            }
            None => Write::delete(Collection::PendingAssignments, key, expected.marker.clone()),
        };
        let outcome = self
            .0
            .store
            .write(vec![
                record_write(key, record, expected.record.clone())?,
                marker,
            ])
            .await?;
        let mut outcome = outcome.into_iter();
        match (outcome.next(), outcome.next()) {
            (Some(WriteOutcome::Written { etag }), marker) => {
                let marker = match marker {
                    Some(WriteOutcome::Written { etag }) => Some(etag),
                    _ => None,
                };
                Ok(Saved::Written { etag, marker })
            }
            (Some(WriteOutcome::EtagMismatch | WriteOutcome::NotFound), _) => Ok(Saved::Changed),
            _ => Err(DeviceFailure::internal(
                "saving a registration record",
                "not written",
            )),
        }
    }

    async fn do_register(&self, req: RegisterRequest) -> Result<DeviceReply, DeviceFailure> {
        let rid = self.check_scope_and_id(&req.id_scope, &req.registration_id)?;
        if let Some(body_id) = &req.body.registration_id {
            if !body_id.eq_ignore_ascii_case(rid.as_str()) {
                return Err(DeviceFailure::new(
                    ErrorCode::IdMismatch,
                    format!(
                        "registrationId '{body_id}' in the body differs from '{rid}' the device connected as"
                    ),
                ));
            }
        }
        // The version is checked before any work; the CSR itself after authentication.
        if req.body.csr.is_some() {
            check_csr_api_version(req.api_version.as_deref())?;
        }
        let _permit = self.0.in_flight.try_acquire().map_err(|_| {
            DeviceFailure::new(
                ErrorCode::Throttled,
                "Muster is at its limit of registrations in progress; retry after the indicated time",
            )
        })?;
        let now = self.0.clock.now();
        let key = rid.key();
        if let (DeviceCredential::None, Some(device_tpm)) = (&req.credential, &req.body.tpm) {
            let blob = crate::tpm::challenge(
                &*self.0.store,
                &*self.0.entropy,
                &rid,
                device_tpm,
                now.unix_seconds(),
            )
            .await?;
            return Ok(DeviceReply::tpm_challenge(blob, crate::tpm::KEY_NAME));
        }
        if let DeviceCredential::X509 { chain } = &req.credential {
            if let Some(leaf) = chain.first() {
                self.refuse_revoked(leaf).await?;
            }
        }
        let previous = self.load_record(&key).await?;
        let attestation = device_auth::attest(
            &*self.0.store,
            &self.0.groups,
            self.0.config.id_scope.as_str(),
            &rid,
            &req.credential,
            previous
                .as_ref()
                .and_then(|(p, _)| p.enrollment_group_id.as_deref()),
            now.unix_seconds(),
        )
        .await?;
        let operation_id = format!(
            "5.{}.{}",
            random_hex(&*self.0.entropy, 8),
            random_hex(&*self.0.entropy, 16)
        );
        let mut record = RegistrationRecord {
            state: DeviceRegistrationState {
                created_date_time_utc: previous
                    .as_ref()
                    .and_then(|(p, _)| p.state.created_date_time_utc)
                    .or(Some(now)),
                last_updated_date_time_utc: Some(now),
                ..DeviceRegistrationState::unassigned(rid.clone())
            },
            operation_id: Some(operation_id.clone()),
            enrollment_group_id: None,
            pending: None,
            issued_certificate_chain: None,
        };
        let mut attested = match attestation {
            Attestation::Disabled(matched) => {
                record.enrollment_group_id = matched.group_id();
                record.state.status = RegistrationStatus::Disabled;
                if let Some((p, _)) = &previous {
                    record.state.assigned_hub = p.state.assigned_hub.clone();
                    record.state.device_id = p.state.device_id.clone();
                }
                let etag = self.save_record(&key, &record).await?;
                record.state.etag = Some(etag);
                return Ok(DeviceReply::registered(&operation(&record), None));
            }
            Attestation::Accepted(a) => a,
        };
        record.enrollment_group_id = attested.matched.group_id();
        record.state.x509 = attested.x509.as_deref().cloned();
        if let Some(csr) = req.body.csr.as_deref() {
            let (issued, ca_name) = self.issue(csr, &rid, &attested.matched, now)?;
            self.record_issued(&issued, &rid, &attested.matched, &ca_name, now)
                .await?;
            // The hub identity becomes the issued certificate (for symmetric-key and X.509
            // devices alike); a pending plan keeps its thumbprint.
            attested.hub_auth = crate::x509::hub_auth(&issued.info.sha256_thumbprint);
            info!(registration = %rid, serial = %issued.info.serial_number,
                thumbprint = %issued.info.sha256_thumbprint, "issued a device certificate");
            record.state.issued_certificate = Some(issued.info);
            record.issued_certificate_chain = Some(issued.chain);
        }
        // A record that carries no plan has no marker to remove (see `assign_in_one_write`).
        let had_plan = previous.as_ref().is_some_and(|(p, _)| p.pending.is_some());
        let previous_state = previous.map(|(p, _)| p.state);
        // One read of the linked hubs serves both the plan and its execution.
        let linked = self.linked_hubs().await?;
        match self
            .plan(
                &attested,
                &rid,
                previous_state.as_ref(),
                req.body.payload,
                &linked,
            )
            .await
        {
            Err(f) if f.is_registration_outcome() => {
                record.state.status = RegistrationStatus::Failed;
                record.state.error_code = Some(f.code.code());
                record.state.error_message = Some(f.message);
                let etag = self.save_record(&key, &record).await?;
                record.state.etag = Some(etag);
                Ok(DeviceReply::registered(&operation(&record), None))
            }
            Err(f) => Err(f),
            Ok(plan) => {
                let rate = linked
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(&plan.hub))
                    .and_then(|h| h.max_registrations_per_second);
                let run_now = self.0.throttle.try_take(&plan.hub, rate).await;
                if run_now {
                    if let Some(done) = self
                        .assign_in_one_write(
                            &key,
                            &record,
                            &plan,
                            &attested.hub_auth,
                            &linked,
                            had_plan,
                        )
                        .await?
                    {
                        let op = self.with_tpm(operation(&done), &attested.matched).await?;
                        return Ok(DeviceReply::registered(&op, None));
                    }
                }
                // Intent before effect: the plan is durable (the record `assigning` with it,
                // and its marker, in one transaction) before any hub is written, so a crash
                // in between is finished on start-up by `resume_pending` instead of leaving a
                // hub device without a record. Throttled plans wait in the same state.
                let hub = plan.hub.clone();
                record.state.status = RegistrationStatus::Assigning;
                record.pending = Some(plan.clone());
                let Saved::Written { etag, marker } =
                    self.save_record_if(&key, &record, &Expected::any()).await?
                else {
                    return Err(DeviceFailure::internal(
                        "saving a registration plan",
                        "not written",
                    ));
                };
                let expected = Expected::saved(&etag, marker.as_deref());
                record.state.etag = Some(etag);
                if run_now {
                    let done = self
                        .complete(&key, record, plan, expected, &attested.hub_auth, &linked)
                        .await;
                    if matches!(&done, Err(f) if f.is_transient()) {
                        // The device is told to retry, but may not: the kept intent is also
                        // retried here, so the registration finishes once the hub or the
                        // store works again, without waiting for a restart.
                        self.retry_later(hub, key, 0);
                    }
                    let record = done?;
                    let op = self.with_tpm(operation(&record), &attested.matched).await?;
                    Ok(DeviceReply::registered(&op, None))
                } else {
                    // Accept now, finish in order.
                    self.enqueue(hub.clone(), key);
                    let wait = self.0.throttle.wait_hint(&hub, rate).as_secs() as u32;
                    Ok(DeviceReply::registered(
                        &operation(&record),
                        Some(wait.max(self.0.config.retry_after_secs)),
                    ))
                }
            }
        }
    }

    /// An assignment to a hub that keeps its devices in this engine's store (the built-in
    /// hub) in one transaction: the hub device with its twin and the finished record commit
    /// together, so nothing needs an intent saved first or reconciling after a crash.
    ///
    /// `None` when the intent path must do it: the plan moves the device between hubs or
    /// migrates its twin (more than one hub write), the hub is reached over a network, the
    /// hub refused the put (the intent path records the failure), or the device kept
    /// changing under the put.
    async fn assign_in_one_write(
        &self,
        key: &str,
        record: &RegistrationRecord,
        plan: &PendingAssignment,
        hub_auth: &HubAuthentication,
        linked: &[LinkedHub],
        had_plan: bool,
    ) -> Result<Option<RegistrationRecord>, DeviceFailure> {
        if plan.remove_from.is_some() || matches!(plan.twin, TwinPlan::Migrate { .. }) {
            return Ok(None);
        }
        let Some(target) = linked
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(&plan.hub))
        else {
            return Ok(None);
        };
        let hub = self.connection(target);
        let spec = HubDeviceSpec {
            device_id: plan.device_id.clone(),
            authentication: hub_auth.clone(),
            iot_edge: plan.iot_edge,
        };
        let (tags, desired) = twin_parts(plan.twin.initial_twin());
        let twin = plan.initial_twin_write(&tags, &desired);
        // A device changed by another writer between the read and the commit rolls the batch
        // back; a few fresh reads settle it, then the intent path takes over.
        for _ in 0..ONE_WRITE_ATTEMPTS {
            let started = tokio::time::Instant::now();
            let put = match hub.prepare_put(&spec, twin).await {
                Ok(Some(put)) => put,
                Ok(None) | Err(_) => return Ok(None),
            };
            let outcome = twin_outcome(twin, put.existed);
            let mut done = record.clone();
            done.pending = None;
            let substatus = plan.substatus(put.existed && !plan.creates_device, outcome);
            mark_assigned(&mut done, plan, substatus);
            // First: when it is refused, nothing of the batch was applied yet, so the store
            // needs no savepoint to undo it.
            let mut writes = vec![put.write, record_write(key, &done, Expect::Any)?];
            if had_plan {
                // The plan an earlier request of this device left pending is superseded. When
                // the record read had none, no marker is looked up: one saved by another node
                // since would be found stale (its record has no plan) and removed where it is
                // taken up (`finish_pending`).
                writes.push(Write::delete(
                    Collection::PendingAssignments,
                    key,
                    Expect::Any,
                ));
            }
            let written = self.0.store.write(writes).await;
            // Nothing was written. The intent path saves the plan if the store takes it and
            // retries it once the hub's writes succeed again, without the device's help.
            let Ok(outcomes) = written else {
                return Ok(None);
            };
            match outcomes.into_iter().nth(1) {
                Some(WriteOutcome::Written { etag }) => {
                    metrics::hub_write(&plan.hub, true, started.elapsed());
                    (put.committed)();
                    done.state.etag = Some(etag);
                    return Ok(Some(done));
                }
                Some(WriteOutcome::RolledBack) => continue,
                other => {
                    return Err(DeviceFailure::internal(
                        "saving a registration with its hub device",
                        format!("unexpected outcome {other:?}"),
                    ))
                }
            }
        }
        Ok(None)
    }

    /// Runs the hub writes of `plan` and saves the outcome, provided the record and marker
    /// are still as `expected` (read before the hub writes). When another node changed them
    /// meanwhile (it finished the same plan, or the device registered again), its record
    /// stands and is returned.
    async fn complete(
        &self,
        key: &str,
        mut record: RegistrationRecord,
        plan: PendingAssignment,
        expected: Expected,
        hub_auth: &HubAuthentication,
        linked: &[LinkedHub],
    ) -> Result<RegistrationRecord, DeviceFailure> {
        let Some((plan, expected)) = self
            .record_device_creation(key, &record, plan, expected, linked)
            .await?
        else {
            return self.current_record(key).await;
        };
        record.pending = None;
        record.state.last_updated_date_time_utc = Some(self.0.clock.now());
        let started = tokio::time::Instant::now();
        let executed = self.execute(&plan, hub_auth, linked).await;
        metrics::hub_write(&plan.hub, executed.is_ok(), started.elapsed());
        match executed {
            // The hub or the store may work again soon: the intent stays as it is, the
            // device is told to retry, and a restart would finish it.
            Err(f) if f.is_transient() => return Err(f),
            Ok(substatus) => mark_assigned(&mut record, &plan, substatus),
            Err(f) => {
                if let Some(suppressed) = ASSIGNMENT_FAILED_LOG.admit() {
                    warn!(hub = %plan.hub, error = %f.message, suppressed, "assignment failed");
                }
                record.state.status = RegistrationStatus::Failed;
                record.state.error_code = Some(f.code.code());
                record.state.error_message = Some(f.message);
            }
        }
        let saved = self.save_record_if(key, &record, &expected).await?;
        self.unhold(key);
        match saved {
            Saved::Written { etag, .. } => {
                record.state.etag = Some(etag);
                Ok(record)
            }
            Saved::Changed => {
                info!(registration = %key, "the registration was changed by another node meanwhile; its record stands");
                self.current_record(key).await
            }
        }
    }

    /// The stored record of `key` with its etag, after another node changed it.
    async fn current_record(&self, key: &str) -> Result<RegistrationRecord, DeviceFailure> {
        match self.load_record(key).await? {
            Some((mut record, etag)) => {
                record.state.etag = Some(etag);
                Ok(record)
            }
            None => Err(DeviceFailure::new(
                ErrorCode::RegistrationNotFound,
                "the registration was deleted while it was being assigned",
            )),
        }
    }

    /// Intent before effect for hubs that write a device and its twin in two calls (REST):
    /// when the twin depends on whether the put creates the device, the hub is asked first,
    /// and a device it lacks is recorded in the plan (`creates_device`) before the put. A
    /// retry or restart after the device put but before the twin write then still writes
    /// the initial twin, instead of taking the device for one the hub already had.
    ///
    /// The re-saved plan is conditional like the final save: `None` when the record changed.
    async fn record_device_creation(
        &self,
        key: &str,
        record: &RegistrationRecord,
        mut plan: PendingAssignment,
        expected: Expected,
        linked: &[LinkedHub],
    ) -> Result<Option<(PendingAssignment, Expected)>, DeviceFailure> {
        if plan.creates_device || !plan.twin_depends_on_creation() {
            return Ok(Some((plan, expected)));
        }
        let Some(target) = linked
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(&plan.hub))
        else {
            return Ok(Some((plan, expected))); // `execute` reports it
        };
        let hub = self.connection(target);
        if hub.writes_device_and_twin_together()
            || hub
                .get_twin(&plan.device_id)
                .await
                .map_err(hub_failure)?
                .is_some()
        {
            return Ok(Some((plan, expected)));
        }
        plan.creates_device = true;
        let mut intent = record.clone();
        intent.pending = Some(plan.clone());
        match self.save_record_if(key, &intent, &expected).await? {
            Saved::Written { etag, marker } => {
                Ok(Some((plan, Expected::saved(&etag, marker.as_deref()))))
            }
            Saved::Changed => {
                self.unhold(key);
                Ok(None)
            }
        }
    }

    /// Checks a registration's CSR against its enrollment's `certificateIssuance` and issues
    /// its certificate with the CA the policy names; the certificate and that CA's name.
    fn issue(
        &self,
        csr: &str,
        rid: &RegistrationId,
        matched: &Matched,
        now: muster_proto::Timestamp,
    ) -> Result<(issuance::Issued, String), DeviceFailure> {
        let (kind, settings) = match matched {
            Matched::Individual(e) => (
                format!("individual enrollment '{}'", e.value.registration_id),
                e.value.certificate_issuance.as_ref(),
            ),
            Matched::Group(g) => (
                format!("enrollment group '{}'", g.value.enrollment_group_id),
                g.value.certificate_issuance.as_ref(),
            ),
        };
        let Some(policy) = issuance::policy(settings) else {
            return Err(DeviceFailure::new(
                ErrorCode::CsrNotEnabled,
                format!("the device sent a csr, but {kind} does not issue certificates (certificateIssuance is not enabled)"),
            ));
        };
        let ca_name = policy.issuing_ca();
        let Some(ca) = self.0.issuing_cas.get(ca_name) else {
            return Err(DeviceFailure::new(
                ErrorCode::CsrNotEnabled,
                format!("the device sent a csr, but {kind} names issuing CA '{ca_name}', which this server does not have"),
            ));
        };
        let checked =
            muster_attestation::check_csr(csr, rid.as_str()).map_err(|e| DeviceFailure::csr(&e))?;
        if !policy.allows(checked.key_type) {
            return Err(DeviceFailure::new(
                ErrorCode::CsrKeyRejected,
                format!(
                    "the csr's key is refused: {kind} does not allow {} keys",
                    checked.key_type
                ),
            ));
        }
        ca.issue(&checked, policy.validity_days(), now, &*self.0.entropy)
            .map(|issued| (issued, ca_name.to_string()))
            .map_err(|e| DeviceFailure::internal("issuing a device certificate", e))
    }

    /// The linked hubs. Every registration needs them, and reading them is a query and an
    /// unsealing per hub, so they are kept while the store says the collection has not
    /// changed (re-read every time on a store that cannot tell).
    async fn linked_hubs(&self) -> Result<Arc<[LinkedHub]>, DeviceFailure> {
        let changes = self.0.store.changes(Collection::LinkedHubs);
        if let (Some(now), Ok(guard)) = (changes, self.0.linked_hubs.lock()) {
            if let Some((at, hubs)) = &*guard {
                if *at == now {
                    return Ok(hubs.clone());
                }
            }
        }
        // Small pages: the store reads them inline.
        let hubs = records::list_all(&*self.0.store, Collection::LinkedHubs, 32)
            .await?
            .into_iter()
            .map(|r| {
                serde_json::from_value(r.body)
                    .map_err(|e| DeviceFailure::internal("reading a linked hub", e))
            })
            .collect::<Result<Arc<[LinkedHub]>, _>>()?;
        if let (Some(at), Ok(mut guard)) = (changes, self.0.linked_hubs.lock()) {
            *guard = Some((at, hubs.clone()));
        }
        Ok(hubs)
    }

    /// The policy for enrollments that set none: the service settings' `allocationPolicy`
    /// (written by the service API's `/serviceSettings`), else the configured default. Kept
    /// while the store says the settings collection has not changed; re-read otherwise (or
    /// every time, on a store that cannot tell).
    async fn default_policy(&self) -> AllocationPolicy {
        let fallback = self.0.config.default_policy;
        let changes = self.0.store.changes(Collection::Settings);
        if let (Some(now), Ok(guard)) = (changes, self.0.default_policy.lock()) {
            if let Some((at, policy)) = *guard {
                if at == now {
                    return policy;
                }
            }
        }
        let policy = match self
            .0
            .store
            .get(Collection::Settings, SERVICE_SETTINGS_KEY)
            .await
        {
            Ok(Some(r)) => serde_json::from_value::<ServiceSettings>(r.body)
                .ok()
                .and_then(|s| s.allocation_policy)
                .unwrap_or(fallback),
            Ok(None) => fallback,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the service settings; using the configured default allocation policy");
                return fallback;
            }
        };
        if let (Some(at), Ok(mut guard)) = (changes, self.0.default_policy.lock()) {
            *guard = Some((at, policy));
        }
        policy
    }

    fn settings(
        &self,
        matched: &Matched,
        rid: &RegistrationId,
        default_policy: AllocationPolicy,
    ) -> Settings {
        match matched {
            Matched::Individual(stored) => {
                let e = &stored.value;
                let mut view = e.clone();
                view.attestation.symmetric_key = None;
                view.registration_state = None;
                Settings {
                    policy: effective_policy(
                        e.allocation_policy,
                        e.iot_hub_host_name.as_deref(),
                        default_policy,
                    ),
                    iot_hubs: e.iot_hubs.clone(),
                    legacy_hub: e.iot_hub_host_name.clone(),
                    reprovision: e.reprovision_policy.unwrap_or_default(),
                    initial_twin: e.initial_twin.clone(),
                    iot_edge: e.capabilities.is_some_and(|c| c.iot_edge),
                    device_id: e.device_id.clone().unwrap_or_else(|| rid.to_string()),
                    webhook_url: e
                        .custom_allocation_definition
                        .as_ref()
                        .map(|c| c.webhook_url.clone()),
                    webhook_view: ("individualEnrollment", webhook_view(&view)),
                }
            }
            Matched::Group(stored) => {
                let g = &stored.value;
                let mut view: EnrollmentGroup = g.clone();
                view.attestation.symmetric_key = None;
                Settings {
                    policy: effective_policy(
                        g.allocation_policy,
                        g.iot_hub_host_name.as_deref(),
                        default_policy,
                    ),
                    iot_hubs: g.iot_hubs.clone(),
                    legacy_hub: g.iot_hub_host_name.clone(),
                    reprovision: g.reprovision_policy.unwrap_or_default(),
                    initial_twin: g.initial_twin.clone(),
                    iot_edge: g.capabilities.is_some_and(|c| c.iot_edge),
                    device_id: rid.to_string(),
                    webhook_url: g
                        .custom_allocation_definition
                        .as_ref()
                        .map(|c| c.webhook_url.clone()),
                    webhook_view: ("enrollmentGroup", webhook_view(&view)),
                }
            }
        }
    }

    /// Decides the hub and what happens to the twin (service-api.md §8.2, §8.4).
    async fn plan(
        &self,
        attested: &Attested,
        rid: &RegistrationId,
        previous: Option<&DeviceRegistrationState>,
        payload: Option<Value>,
        linked: &[LinkedHub],
    ) -> Result<PendingAssignment, DeviceFailure> {
        let default_policy = self.default_policy().await;
        let s = self.settings(&attested.matched, rid, default_policy);
        let current = previous
            .filter(|p| p.status == RegistrationStatus::Assigned)
            .and_then(|p| p.assigned_hub.clone().map(|h| (h, p.substatus)));
        let stay = current.is_some() && !s.reprovision.update_hub_assignment;
        let candidates = match (&current, stay) {
            (Some((hub, _)), true) => {
                allocation::candidates(Some(std::slice::from_ref(hub)), None, linked)?
            }
            _ => allocation::candidates(s.iot_hubs.as_deref(), s.legacy_hub.as_deref(), linked)?,
        };
        let key = rid.key();
        let mut webhook_twin = None;
        let mut out_payload = None;
        let target = match s.policy {
            AllocationPolicy::Custom => {
                let url = s.webhook_url.clone().ok_or_else(|| {
                    DeviceFailure::new(
                        ErrorCode::CustomAllocationFailed,
                        "the enrollment's custom allocation has no webhook URL",
                    )
                })?;
                let device = custom::DeviceRuntimeContext {
                    registration_id: rid.to_string(),
                    current_hub: current.as_ref().map(|(h, _)| h.clone()),
                    current_device_id: previous.and_then(|p| p.device_id.clone()),
                    attestation: if attested.x509.is_some() {
                        ("x509", json!({}))
                    } else {
                        ("symmetricKey", json!({}))
                    },
                    payload: payload.clone(),
                };
                let names: Vec<String> = candidates.iter().map(|h| h.name.clone()).collect();
                let body = custom::request_body(
                    s.webhook_view.0,
                    s.webhook_view.1.clone(),
                    &device,
                    &names,
                );
                let answer = custom::call(&self.0.http, &url, &body, self.0.config.webhook).await?;
                webhook_twin = answer.initial_twin;
                out_payload = answer.payload;
                candidates
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(&answer.iot_hub_host_name))
                    .cloned()
                    .ok_or_else(|| {
                        DeviceFailure::new(
                            ErrorCode::HubNotLinked,
                            format!(
                                "the custom allocation webhook chose '{}', which is not among the hubs this device may use",
                                answer.iot_hub_host_name
                            ),
                        )
                    })?
            }
            AllocationPolicy::Static => allocation::static_hub::choose(&candidates)?.clone(),
            AllocationPolicy::Hashed => allocation::hashed::choose(&key, &candidates)
                .cloned()
                .ok_or_else(no_hub)?,
            AllocationPolicy::GeoLatency => {
                allocation::geo_latency::choose(&key, self.0.config.region.as_deref(), &candidates)
                    .cloned()
                    .ok_or_else(no_hub)?
            }
        };
        let initial_twin = match webhook_twin {
            Some(t) => Some(serde_json::from_value::<InitialTwin>(t).map_err(|e| {
                DeviceFailure::new(
                    ErrorCode::CustomAllocationFailed,
                    format!("the custom allocation webhook's initialTwin is invalid: {e}"),
                )
            })?),
            None => s.initial_twin.clone(),
        };
        let mut plan = PendingAssignment {
            enrollment: attested.matched.reference(),
            hub: target.name.clone(),
            device_id: s.device_id.clone(),
            iot_edge: s.iot_edge,
            twin: TwinPlan::Initial {
                twin: initial_twin.clone(),
            },
            remove_from: None,
            previous_device_id: None,
            initial: true,
            substatus: None,
            payload: out_payload,
            thumbprint: match &attested.hub_auth {
                HubAuthentication::SelfSigned {
                    primary_thumbprint, ..
                } => Some(primary_thumbprint.clone()),
                HubAuthentication::Sas { .. } | HubAuthentication::None => None,
            },
            creates_device: false,
        };
        if let Some((cur, cur_sub)) = current {
            plan.initial = false;
            let same = cur.eq_ignore_ascii_case(&target.name);
            // Hub device ids are case-sensitive, registration ids are not: a device id spelt
            // differently from the previous one is another identity, and the old one goes.
            plan.previous_device_id = previous
                .and_then(|p| p.device_id.clone())
                .filter(|old| *old != plan.device_id);
            let migrate = s.reprovision.migrate_device_data || stay;
            if same && plan.previous_device_id.is_none() {
                plan.twin = if migrate {
                    TwinPlan::Keep { twin: initial_twin }
                } else {
                    TwinPlan::Initial { twin: initial_twin }
                };
                plan.substatus = cur_sub.or(Some(RegistrationSubstatus::InitialAssignment));
            } else if migrate {
                plan.twin = TwinPlan::Migrate {
                    from_hub: cur.clone(),
                    twin: initial_twin,
                };
                plan.substatus = Some(RegistrationSubstatus::DeviceDataMigrated);
                plan.remove_from = Some(cur);
            } else {
                plan.substatus = Some(RegistrationSubstatus::DeviceDataReset);
                plan.remove_from = Some(cur);
            }
        }
        Ok(plan)
    }

    /// The hub writes. Returns the substatus the record gets.
    async fn execute(
        &self,
        plan: &PendingAssignment,
        hub_auth: &HubAuthentication,
        linked: &[LinkedHub],
    ) -> Result<Option<RegistrationSubstatus>, DeviceFailure> {
        let find = |name: &str| linked.iter().find(|h| h.name.eq_ignore_ascii_case(name));
        let target = find(&plan.hub).ok_or_else(|| {
            DeviceFailure::new(
                ErrorCode::HubNotLinked,
                format!("IoT hub '{}' is no longer linked", plan.hub),
            )
        })?;
        let spec = HubDeviceSpec {
            device_id: plan.device_id.clone(),
            authentication: hub_auth.clone(),
            iot_edge: plan.iot_edge,
        };
        let hub = self.connection(target);
        let old_hub = plan.remove_from.as_deref().and_then(find);
        // The twin to migrate is read before anything is removed.
        let migrated = match &plan.twin {
            TwinPlan::Migrate { from_hub, .. } => match find(from_hub) {
                Some(h) => self
                    .connection(h)
                    .get_twin(plan.old_device_id())
                    .await
                    .map_err(hub_failure)?,
                None => None,
            },
            _ => None,
        };
        // A renamed identity on the same hub goes first: the built-in hub, like DPS, folds
        // case, so the new spelling would otherwise overwrite the old device in place.
        let renamed_in_place = plan.previous_device_id.is_some()
            && old_hub.is_some_and(|h| h.name.eq_ignore_ascii_case(&target.name));
        if renamed_in_place {
            hub.delete_device(plan.old_device_id())
                .await
                .map_err(hub_failure)?;
        }
        let (initial_tags, initial_desired) = twin_parts(plan.twin.initial_twin());
        let (existed, outcome) = match (&plan.twin, migrated) {
            (TwinPlan::Migrate { .. }, Some(old)) => {
                let tags = old.get("tags").cloned().unwrap_or_else(|| json!({}));
                let desired = strip_metadata(old.pointer("/properties/desired"));
                let write = TwinWrite::Replace {
                    tags: &tags,
                    desired: &desired,
                };
                let existed = hub.put_device(&spec, write).await.map_err(hub_failure)?;
                (existed, TwinOutcome::Migrated)
            }
            (_, _) => {
                // Nothing to migrate, a reset, or the twin kept: the initial twin as the
                // plan's rule says (record.rs).
                let write = plan.initial_twin_write(&initial_tags, &initial_desired);
                let existed = hub.put_device(&spec, write).await.map_err(hub_failure)?;
                (existed, twin_outcome(write, existed))
            }
        };
        if let Some(old) = old_hub.filter(|_| !renamed_in_place) {
            self.connection(old)
                .delete_device(plan.old_device_id())
                .await
                .map_err(hub_failure)?;
        }
        // A device this plan created is one the hub did not have, even when a retry finds it.
        Ok(plan.substatus(existed && !plan.creates_device, outcome))
    }

    fn enqueue(&self, hub: String, key: String) {
        let Ok(mut queues) = self.0.queues.lock() else {
            return;
        };
        let hub_key = hub.to_ascii_lowercase();
        if let Some(tx) = queues.get(&hub_key) {
            if tx.send(key.clone()).is_ok() {
                metrics::throttle_queue_changed(&hub_key, 1.0);
                return;
            }
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        if tx.send(key).is_ok() {
            metrics::throttle_queue_changed(&hub_key, 1.0);
        }
        queues.insert(hub_key.clone(), tx);
        let engine = self.clone();
        tokio::spawn(async move {
            while let Some(key) = rx.recv().await {
                engine.run_queued(hub.clone(), key, 0).await;
                metrics::throttle_queue_changed(&hub_key, -1.0);
            }
        });
    }

    /// Finishes one queued intent within the hub's rate; after a transient failure (a hub or
    /// the store answering 503) it is tried again later (`retry_later`).
    async fn run_queued(&self, hub: String, key: String, attempt: u32) {
        if !self.holds(&key) {
            // Another node took it over (this node's lease lapsed) or it is finished.
            return;
        }
        let rate = self.linked_hubs().await.ok().and_then(|l| {
            l.iter()
                .find(|h| h.name.eq_ignore_ascii_case(&hub))
                .and_then(|h| h.max_registrations_per_second)
        });
        self.0.throttle.take(&hub, rate).await;
        match self.finish_pending(&key).await {
            Ok(()) => {}
            Err(f) if f.is_transient() => self.retry_later(hub, key, attempt + 1),
            Err(f) => {
                if let Some(suppressed) = ASSIGNMENT_FAILED_LOG.admit() {
                    warn!(registration = %key, error = %f.message, suppressed,
                        "could not finish a pending assignment");
                }
            }
        }
    }

    /// Queues a kept intent again after a transient failure (a hub or the store answering
    /// 503), after `retry_after_secs` doubled per attempt up to a minute; further failures
    /// schedule the next attempt. A restart re-queues it from its marker all the same.
    fn retry_later(&self, hub: String, key: String, attempt: u32) {
        let delay = u64::from(self.0.config.retry_after_secs.max(1))
            .saturating_mul(1 << attempt.min(6))
            .min(60);
        let engine = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(delay)).await;
            engine.run_queued(hub, key, attempt).await;
        });
    }

    /// Finishes a throttled or interrupted assignment from its stored plan.
    ///
    /// The marker is read before the record: every save of a record writes its marker too,
    /// so a record changed after these reads fails the record's expectation, and one changed
    /// in between fails the marker's, never deleting a newer plan's marker.
    async fn finish_pending(&self, key: &str) -> Result<(), DeviceFailure> {
        let Some(marker) = self
            .0
            .store
            .get(Collection::PendingAssignments, key)
            .await?
        else {
            self.unhold(key);
            return Ok(());
        };
        let loaded = self.load_record(key).await?;
        let Some((record, plan, etag)) =
            loaded.and_then(|(r, etag)| r.pending.clone().map(|p| (r, p, etag)))
        else {
            // Deleted or finished meanwhile: the marker is stale.
            self.0
                .store
                .write(vec![Write::delete(
                    Collection::PendingAssignments,
                    key,
                    Expect::Etag(marker.etag),
                )])
                .await?;
            self.unhold(key);
            return Ok(());
        };
        let expected = Expected::saved(&etag, Some(&marker.etag));
        let rid = record.state.registration_id.clone();
        // The record's last update is the register request that saved this plan.
        let requested = record.state.last_updated_date_time_utc;
        let auth = self.hub_auth_for(&plan, &rid).await?;
        let linked = self.linked_hubs().await?;
        let done = self
            .complete(key, record, plan, expected, &auth, &linked)
            .await?;
        if let (RegistrationStatus::Assigned, Some(requested), Some(finished)) = (
            done.state.status,
            requested,
            done.state.last_updated_date_time_utc,
        ) {
            let waited = (finished.0 - requested.0).to_std().unwrap_or_default();
            metrics::assigned(true, waited);
        }
        Ok(())
    }

    /// The hub credentials of a pending assignment: X.509 devices from the thumbprint kept in
    /// the plan, symmetric-key devices recomputed from the enrollment.
    async fn hub_auth_for(
        &self,
        plan: &PendingAssignment,
        rid: &RegistrationId,
    ) -> Result<HubAuthentication, DeviceFailure> {
        if let Some(t) = &plan.thumbprint {
            return Ok(crate::x509::hub_auth(t));
        }
        let enrollment = &plan.enrollment;
        let gone = || {
            DeviceFailure::new(
                ErrorCode::DeviceNotAttested,
                "the enrollment was deleted before the assignment finished",
            )
        };
        let keys = match enrollment {
            EnrollmentRef::Individual(id) => {
                let e = records::get::<IndividualEnrollment>(
                    &*self.0.store,
                    Collection::Enrollments,
                    &id.to_ascii_lowercase(),
                )
                .await?
                .ok_or_else(gone)?;
                if e.value.attestation.kind == AttestationType::Tpm {
                    return crate::tpm::hub_auth_for(&*self.0.store, rid)
                        .await?
                        .ok_or_else(gone);
                }
                let sk = e.value.attestation.symmetric_key.ok_or_else(gone)?;
                (
                    sk.primary_key.unwrap_or_default(),
                    sk.secondary_key.unwrap_or_default(),
                )
            }
            EnrollmentRef::Group(id) => {
                let g = records::get::<EnrollmentGroup>(
                    &*self.0.store,
                    Collection::EnrollmentGroups,
                    &id.to_ascii_lowercase(),
                )
                .await?
                .ok_or_else(gone)?;
                let sk = g.value.attestation.symmetric_key.ok_or_else(gone)?;
                let derive = |k: Option<String>| {
                    k.and_then(|k| symmetric_key::derive_device_key(&k, rid.as_str()).ok())
                        .unwrap_or_default()
                };
                (derive(sk.primary_key), derive(sk.secondary_key))
            }
        };
        Ok(HubAuthentication::Sas {
            primary_key: keys.0,
            secondary_key: keys.1,
        })
    }

    /// Finishes every intent a crash interrupted (after a restart): the first
    /// [`Engine::sweep`], which takes this node's own claims back at once. Returns how many
    /// assignments were queued.
    pub async fn resume_pending(&self) -> Result<usize, DeviceFailure> {
        self.sweep().await
    }

    /// The accepted, unfinished assignments, oldest first, from their markers. A database
    /// written before the markers existed is scanned once and given them.
    pub async fn pending_assignments(&self) -> Result<Vec<PendingMarker>, DeviceFailure> {
        let store = &*self.0.store;
        if store
            .get(Collection::Settings, PENDING_MARKERS_SETTING)
            .await?
            .is_none()
        {
            self.mark_legacy_pending().await?;
        }
        let mut pending = records::list_all(store, Collection::PendingAssignments, 1000)
            .await?
            .into_iter()
            .map(|r| {
                let marker: MarkerBody = serde_json::from_value(r.body)
                    .map_err(|e| DeviceFailure::internal("reading a pending assignment", e))?;
                Ok(PendingMarker {
                    key: r.key,
                    hub: marker.hub,
                    since: marker.since,
                })
            })
            .collect::<Result<Vec<_>, DeviceFailure>>()?;
        pending.sort_by_key(|p| p.since);
        Ok(pending)
    }

    /// One full scan of the registration records for pending plans saved before markers
    /// existed; writes their markers, then the setting that says it was done.
    pub(crate) async fn mark_legacy_pending(&self) -> Result<(), DeviceFailure> {
        let store = &*self.0.store;
        let mut after = None;
        loop {
            let page = store
                .list(
                    Collection::Registrations,
                    ListQuery {
                        partition: None,
                        after: after.clone(),
                        limit: 1000,
                    },
                )
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            let mut markers = Vec::new();
            for r in &page {
                let rec = decode_record(r)?;
                if let Some(p) = rec.pending {
                    markers.push(Write::put(
                        Collection::PendingAssignments,
                        r.key.clone(),
                        Expect::Any,
                        json!({"hub": p.hub, "since": rec.state.last_updated_date_time_utc}),
                    ));
                }
            }
            if !markers.is_empty() {
                store.write(markers).await?;
            }
        }
        store
            .write(vec![Write::put(
                Collection::Settings,
                PENDING_MARKERS_SETTING,
                Expect::Any,
                json!({"since": self.0.clock.now()}),
            )])
            .await?;
        Ok(())
    }

    async fn do_status(&self, req: StatusRequest) -> Result<DeviceReply, DeviceFailure> {
        let rid = self.check_scope_and_id(&req.id_scope, &req.registration_id)?;
        if req.csr_sent {
            return Err(DeviceFailure::new(
                ErrorCode::CsrOnStatusLookup,
                "an operation status lookup must not carry a csr; send it with the register request",
            ));
        }
        let now = self.0.clock.now();
        // Polls are authenticated like registrations (before saying whether the operation
        // exists); a disabled device may still read its answer.
        let loaded = self.load_record(&rid.key()).await?;
        let attestation = device_auth::attest(
            &*self.0.store,
            &self.0.groups,
            self.0.config.id_scope.as_str(),
            &rid,
            &req.credential,
            loaded
                .as_ref()
                .and_then(|(r, _)| r.enrollment_group_id.as_deref()),
            now.unix_seconds(),
        )
        .await?;
        let not_found = || {
            DeviceFailure::new(
                ErrorCode::OperationNotFound,
                format!(
                    "registration '{rid}' has no operation '{}'",
                    req.operation_id
                ),
            )
        };
        let (mut record, etag) = loaded.ok_or_else(not_found)?;
        if record.operation_id.as_deref() != Some(req.operation_id.as_str()) {
            return Err(not_found());
        }
        record.state.etag = Some(etag);
        let retry = (record.state.status == RegistrationStatus::Assigning)
            .then_some(self.0.config.retry_after_secs);
        let op = match &attestation {
            Attestation::Accepted(a) => self.with_tpm(operation(&record), &a.matched).await?,
            Attestation::Disabled(_) => operation(&record),
        };
        Ok(DeviceReply::polled(&op, retry))
    }

    /// A TPM device's assigned answer carries `tpm.authenticationKey` (the hub key wrapped
    /// for its TPM) instead of `symmetricKey` (device-protocol.md §7.1 step 5).
    async fn with_tpm(
        &self,
        mut op: RegistrationOperationStatus,
        matched: &Matched,
    ) -> Result<RegistrationOperationStatus, DeviceFailure> {
        let Some(enrollment) = crate::tpm::is_tpm(matched) else {
            return Ok(op);
        };
        if op.status != RegistrationStatus::Assigned {
            return Ok(op);
        }
        let rid = op.registration_state.registration_id.clone();
        let rid = RegistrationId::new(&rid)
            .map_err(|e| DeviceFailure::internal("reading a registration id", e))?;
        let blob =
            crate::tpm::result_blob(&*self.0.store, &*self.0.entropy, enrollment, &rid).await?;
        op.registration_state.symmetric_key = None;
        op.registration_state.tpm =
            blob.map(|authentication_key| TpmRegistrationResult { authentication_key });
        Ok(op)
    }
}

/// A hub's refusal as the device sees it: 503 stays retryable.
fn hub_failure(e: crate::hub_client::HubError) -> DeviceFailure {
    let code = if e.status() == Some(503) {
        ErrorCode::HubUnavailable
    } else {
        ErrorCode::HubWriteFailed
    };
    DeviceFailure::new(code, e.to_string())
}

/// A `csr` needs a device api-version that knows it (device-protocol.md §9.2).
fn check_csr_api_version(version: Option<&str>) -> Result<(), DeviceFailure> {
    let version = version.unwrap_or("");
    if muster_proto::api_version::device_accepts_csr(version) {
        return Ok(());
    }
    Err(DeviceFailure::new(
        ErrorCode::CsrApiVersionUnsupported,
        format!(
            "a csr needs api-version {}; the request says '{version}'",
            muster_proto::api_version::DEVICE_CSR_API_VERSIONS.join(" or ")
        ),
    ))
}

fn no_hub() -> DeviceFailure {
    DeviceFailure::new(
        ErrorCode::NoHubAvailable,
        "no linked IoT hub is eligible for this device",
    )
}

/// A legacy `iotHubHostName` with no policy behaves as static.
fn effective_policy(
    policy: Option<AllocationPolicy>,
    legacy_hub: Option<&str>,
    default: AllocationPolicy,
) -> AllocationPolicy {
    match (policy, legacy_hub) {
        (Some(p), _) => p,
        (None, Some(h)) if !h.trim().is_empty() => AllocationPolicy::Static,
        _ => default,
    }
}

fn webhook_view<T: serde::Serialize>(v: &T) -> Value {
    let mut value = serde_json::to_value(v).unwrap_or(Value::Null);
    // Certificate text never leaves Muster.
    if let Some(x) = value.pointer_mut("/attestation/x509") {
        for set in ["clientCertificates", "signingCertificates"] {
            for slot in ["primary", "secondary"] {
                if let Some(Value::Object(c)) = x.get_mut(set).and_then(|s| s.get_mut(slot)) {
                    c.remove("certificate");
                }
            }
        }
    }
    value
}

fn twin_parts(twin: Option<&InitialTwin>) -> (Value, Value) {
    let tags = twin
        .and_then(|t| t.tags.clone())
        .map(Value::Object)
        .unwrap_or_else(|| json!({}));
    let desired = twin
        .and_then(|t| t.properties.as_ref())
        .and_then(|p| p.desired.clone())
        .map(|d| strip_metadata(Some(&Value::Object(d))))
        .unwrap_or_else(|| json!({}));
    (tags, desired)
}

/// Drops `$version`, `$metadata` and other service-owned `$` keys.
fn strip_metadata(v: Option<&Value>) -> Value {
    match v {
        Some(Value::Object(m)) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Map<String, Value>>(),
        ),
        _ => json!({}),
    }
}

/// The setting that says every pending assignment has its marker.
const PENDING_MARKERS_SETTING: &str = "pendingAssignmentMarkers";

/// An accepted assignment not yet finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingMarker {
    /// The registration record's key.
    pub key: String,
    pub hub: String,
    pub since: Option<muster_proto::Timestamp>,
}

#[derive(serde::Deserialize)]
struct MarkerBody {
    hub: String,
    #[serde(default)]
    since: Option<muster_proto::Timestamp>,
}

/// What a conditional save of a record and its marker expects to find.
#[derive(Debug, Clone)]
struct Expected {
    record: Expect,
    marker: Expect,
}

impl Expected {
    /// Whatever is stored.
    fn any() -> Self {
        Self {
            record: Expect::Any,
            marker: Expect::Any,
        }
    }

    /// The record and marker as a save or a read left them (`marker: None`, no marker).
    fn saved(record: &str, marker: Option<&str>) -> Self {
        Self {
            record: Expect::Etag(record.to_owned()),
            marker: match marker {
                Some(m) => Expect::Etag(m.to_owned()),
                None => Expect::Absent,
            },
        }
    }
}

/// The result of a conditional save.
enum Saved {
    /// The record's new etag, and its marker's when a plan's marker was written.
    Written {
        etag: String,
        marker: Option<String>,
    },
    /// The record is not as expected: nothing was written.
    Changed,
}

/// Where the twin of a device put with `write` came from, given whether the device existed.
fn twin_outcome(write: TwinWrite<'_>, existed: bool) -> TwinOutcome {
    if write.parts(existed).is_some() {
        TwinOutcome::Initial
    } else {
        TwinOutcome::Kept
    }
}

/// `record` as the finished assignment of `plan` says: assigned to its hub and device, with
/// the plan's payload, and no error.
fn mark_assigned(
    record: &mut RegistrationRecord,
    plan: &PendingAssignment,
    substatus: Option<RegistrationSubstatus>,
) {
    let s = &mut record.state;
    s.status = RegistrationStatus::Assigned;
    s.substatus = substatus;
    s.assigned_hub = Some(plan.hub.clone());
    s.device_id = Some(plan.device_id.clone());
    s.payload = plan.payload.clone();
    s.error_code = None;
    s.error_message = None;
}

/// The store write that puts `record` under `key` (its etag is the store's, not kept in the
/// body), in its enrollment group's partition.
fn record_write(
    key: &str,
    record: &RegistrationRecord,
    expect: Expect,
) -> Result<Write, DeviceFailure> {
    let partition = record
        .enrollment_group_id
        .as_ref()
        .map(|g| g.to_ascii_lowercase());
    let write = if record.state.etag.is_none() {
        Write::put_serialized(Collection::Registrations, key, expect, record)
    } else {
        let mut body = record.clone();
        body.state.etag = None;
        Write::put_serialized(Collection::Registrations, key, expect, &body)
    };
    write
        .map(|w| w.with_partition(partition))
        .map_err(|e| DeviceFailure::internal("encoding a registration record", e))
}

fn decode_record(r: &Record) -> Result<RegistrationRecord, DeviceFailure> {
    serde_json::from_value(r.body.clone())
        .map_err(|e| DeviceFailure::internal("reading a registration record", e))
}

/// The device-facing view of a record.
fn operation(record: &RegistrationRecord) -> RegistrationOperationStatus {
    let s = &record.state;
    let mut result = DeviceRegistrationResult::new(s.registration_id.to_string(), s.status);
    result.created_date_time_utc = s.created_date_time_utc;
    result.assigned_hub = s.assigned_hub.clone();
    result.device_id = s.device_id.clone();
    result.substatus = s.substatus;
    result.error_code = s.error_code;
    result.error_message = s.error_message.clone();
    result.last_updated_date_time_utc = s.last_updated_date_time_utc;
    result.etag = s.etag.clone();
    result.payload = s.payload.clone();
    if s.status == RegistrationStatus::Assigned {
        result.issued_certificate_chain = record.issued_certificate_chain.clone();
        match &s.x509 {
            Some(x) => result.x509 = Some(x.clone()),
            None => {
                result.symmetric_key = Some(SymmetricKeyRegistrationResult {
                    enrollment_group_id: record.enrollment_group_id.clone(),
                })
            }
        }
    }
    RegistrationOperationStatus {
        operation_id: record.operation_id.clone().unwrap_or_default(),
        status: s.status,
        registration_state: result,
    }
}

#[async_trait::async_trait]
impl DeviceRegistrar for Engine {
    async fn register(&self, request: RegisterRequest) -> DeviceReply {
        let started = tokio::time::Instant::now();
        let transport = request.transport;
        let attestation = metrics::attestation_kind(&request.credential);
        let reply = match self.do_register(request).await {
            Ok(r) => r,
            Err(f) => self.failure_reply(f),
        };
        metrics::registration_answered(transport, attestation, &reply, started.elapsed());
        reply
    }

    async fn operation_status(&self, request: StatusRequest) -> DeviceReply {
        match self.do_status(request).await {
            Ok(r) => r,
            Err(f) => self.failure_reply(f),
        }
    }
}
