//! API keys and who may call what.
//!
//! - **Keys** look like `drv_<id>_<secret>`: 12 hex characters of id (the row's primary key,
//!   so a lookup is by id) and 64 hex characters (256 random bits) of secret. Only the SHA-256
//!   of the whole key is stored; a presented key is hashed and compared in constant time
//!   ([`subtle`]). A key is shown once, when [`create_key`] makes it.
//! - **Roles** are ordered: `viewer` < `operator` < `admin`; each route needs one ([`RULES`]).
//! - **The hot path** (enqueue at tens of thousands of requests a second) never waits for the
//!   database: verified keys are cached in memory ([`KeyCache`]) for
//!   [`ApiConfig::key_cache_ttl`](crate::ApiConfig::key_cache_ttl) (default 5 s), which is also
//!   how long a revocation or an expiry edit takes to reach a running API. `last_used_at` is
//!   written by a spawned task at most once a minute per key.
//! - [`Guard`] is the middleware that puts it together: route → rule, key → principal, rate
//!   limits ([`crate::ratelimit`]), and the audit record of every mutating call.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use poem::{
    Endpoint, IntoResponse, Middleware, Request, Response,
    http::{HeaderValue, Method, header},
};
use poem_openapi::{OpenApi, OperationId};
use rand::RngCore;
use schema::{audit::AuditEntry, entity::api_key};
use sea_orm::DatabaseConnection;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    AppState, Secret,
    error::{ApiError, AuthFailure},
    metrics::UNMATCHED_ROUTE,
    ratelimit::{Bucket, RateLimiter, RateLimits},
};

/// What a key may do. Each role can do everything the roles before it can.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads: jobs, queues, schedules, backups, analytics, scores.
    Viewer,
    /// Also enqueue, cancel, retry, discard, schedules, events.
    Operator,
    /// Also backups (taking one, restoring) and keys.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with or without a key (probes).
    Open,
    /// `/metrics`: open, or a viewer key when [`MetricsAuth::Key`] is configured.
    Metrics,
    /// A valid key of at least this role.
    Role(Role),
}

/// Whether `/metrics` needs a key (`DROVER_METRICS_AUTH`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MetricsAuth {
    /// Anyone may scrape (the default: Prometheus inside the cluster, nothing secret in it).
    #[default]
    Open,
    /// A viewer key (or better) is needed, like any read.
    Key,
}

/// Who may call each operation of the API, by OpenAPI `operation_id`.
///
/// **A new route needs one line here.** `api/tests/api/auth.rs` walks the OpenAPI document and
/// fails for an operation without a rule (and for a rule without an operation); at run time
/// such an operation needs an admin key.
pub const RULES: &[(&str, Access)] = &[
    ("healthz", Access::Open),
    ("readyz", Access::Open),
    ("metrics", Access::Metrics),
    ("listQueues", Access::Role(Role::Viewer)),
    ("getQueue", Access::Role(Role::Viewer)),
    ("getJob", Access::Role(Role::Viewer)),
    ("enqueueJob", Access::Role(Role::Operator)),
    ("enqueueBatch", Access::Role(Role::Operator)),
    // Cancels a pending job, or discards a dead one.
    ("cancelJob", Access::Role(Role::Operator)),
    ("retryJob", Access::Role(Role::Operator)),
    ("listDeadJobs", Access::Role(Role::Viewer)),
    ("listQueueJobs", Access::Role(Role::Viewer)),
    ("queueActivity", Access::Role(Role::Viewer)),
    ("searchJobs", Access::Role(Role::Viewer)),
    ("listWorkers", Access::Role(Role::Viewer)),
    ("retryDeadJobs", Access::Role(Role::Operator)),
    ("discardDeadJobs", Access::Role(Role::Operator)),
    ("listSchedules", Access::Role(Role::Viewer)),
    ("getSchedule", Access::Role(Role::Viewer)),
    ("putSchedule", Access::Role(Role::Operator)),
    ("deleteSchedule", Access::Role(Role::Operator)),
    ("setScheduleEnabled", Access::Role(Role::Operator)),
    ("listBackups", Access::Role(Role::Viewer)),
    ("getBackup", Access::Role(Role::Viewer)),
    ("enqueueBackup", Access::Role(Role::Admin)),
    ("ingestEvents", Access::Role(Role::Operator)),
    ("listRollups", Access::Role(Role::Viewer)),
    ("listAnomalies", Access::Role(Role::Viewer)),
    ("listForecasts", Access::Role(Role::Viewer)),
    ("slaReport", Access::Role(Role::Viewer)),
    ("analyticsSummary", Access::Role(Role::Viewer)),
    // A model's weights decide every score: changing one is an operator's call.
    ("putScoreModel", Access::Role(Role::Operator)),
    ("getScoreModel", Access::Role(Role::Viewer)),
    ("recomputeScores", Access::Role(Role::Operator)),
    ("getScoreRun", Access::Role(Role::Viewer)),
    ("topScores", Access::Role(Role::Viewer)),
    ("getSubjectScore", Access::Role(Role::Viewer)),
];

/// The rule of an operation, if it has one.
pub fn rule(operation_id: &str) -> Option<Access> {
    RULES.iter().find(|(op, _)| *op == operation_id).map(|(_, a)| *a)
}

/// What an unmatched request needs: paths outside the API's operations that hold no data (the
/// OpenAPI document, the Swagger UI, the dashboard's page and assets) are open; anything else (a path the route table does not know, in case the router accepts a
/// spelling this matcher does not) needs an admin key, so a gap here never opens a route.
fn unmatched_access(path: &str) -> Access {
    let under =
        |root: &str| path == root || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'));
    if path == "/openapi.json" || under("/docs") || under("/dashboard") {
        Access::Open
    } else {
        Access::Role(Role::Admin)
    }
}

/// One operation of the route table: method, path template split in segments, its id.
struct Operation {
    method: Method,
    /// `None` for a `{param}` segment.
    segments: Vec<Option<String>>,
    template: Arc<str>,
    id: &'static str,
    access: Access,
}

/// Maps a request (method, path) to its operation, from the OpenAPI metadata: the same table
/// the router and the metrics labels are built from.
pub(crate) struct RouteTable {
    operations: Vec<Operation>,
}

impl RouteTable {
    pub(crate) fn from_api<T: OpenApi>() -> Self {
        let mut operations = Vec::new();
        for path in T::meta().into_iter().flat_map(|api| api.paths) {
            let template: Arc<str> = path.path.as_str().into();
            let segments: Vec<Option<String>> = path
                .path
                .trim_start_matches('/')
                .split('/')
                .map(|s| (!s.starts_with('{')).then(|| s.to_owned()))
                .collect();
            for op in path.operations {
                let Some(id) = op.operation_id else { continue };
                operations.push(Operation {
                    method: op.method,
                    segments: segments.clone(),
                    template: template.clone(),
                    id,
                    access: rule(id).unwrap_or(Access::Role(Role::Admin)),
                });
            }
        }
        // Most literal segments first: `/v1/jobs/batch` before `/v1/jobs/{id}`.
        operations.sort_by_key(|o| std::cmp::Reverse(o.segments.iter().filter(|s| s.is_some()).count()));
        Self { operations }
    }

    fn find(&self, method: &Method, path: &str) -> Option<&Operation> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        self.operations.iter().find(|o| {
            o.method == *method
                && o.segments.len() == parts.len()
                && o.segments
                    .iter()
                    .zip(&parts)
                    .all(|(s, p)| s.as_deref().is_none_or(|lit| lit == *p) && !p.is_empty())
        })
    }
}

/// The caller of a request that passed [`Guard`], in the request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub role: Role,
}

const PREFIX: &str = "drv_";
const ID_HEX: usize = 12;
const SECRET_HEX: usize = 64;

/// A key just made: its row and the only copy of the key itself.
pub struct NewKey {
    pub key: Secret,
    pub row: api_key::Model,
}

/// Makes a random key (`drv_<id>_<secret>`) and the row that stores its hash.
pub fn generate_key(name: &str, role: Role, expires_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> NewKey {
    let mut rng = rand::rng();
    let mut id = [0u8; ID_HEX / 2];
    let mut secret = [0u8; SECRET_HEX / 2];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let id = hex(&id);
    let key = format!("{PREFIX}{id}_{}", hex(&secret));
    let row = api_key::Model {
        id,
        name: name.to_owned(),
        role: role.as_str().to_owned(),
        secret_sha256: hex(&digest(&key)),
        created_at: now,
        last_used_at: None,
        expires_at,
        revoked_at: None,
    };
    NewKey {
        key: Secret::new(key),
        row,
    }
}

/// Makes a key and stores it; the returned key is the only copy there will ever be.
pub async fn create_key(
    db: &DatabaseConnection,
    name: &str,
    role: Role,
    expires_at: Option<DateTime<Utc>>,
) -> Result<NewKey, schema::DbError> {
    let new = generate_key(name, role, expires_at, Utc::now());
    schema::keys::insert(db, new.row.clone()).await?;
    Ok(new)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The id of a well-formed key (`drv_` + 12 hex + `_` + 64 hex), else `None`.
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex_ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex_ok(id, ID_HEX) && hex_ok(secret, SECRET_HEX)).then_some(id)
}

/// A stored key as the cache holds it: no secret, only its digest.
struct StoredKey {
    role: Role,
    digest: [u8; 32],
    expires_at: Option<DateTime<Utc>>,
    revoked: bool,
}

struct CacheEntry {
    fetched: Instant,
    /// `None`: no key has this id (cached too, so unknown ids do not reach the database on
    /// every request; the auth-failure rate limit bounds how many of those a client can try).
    key: Option<StoredKey>,
    /// Someone is re-reading this entry: others keep using it meanwhile.
    refreshing: AtomicBool,
    /// Epoch ms of the last `last_used_at` write requested for this key.
    touched_ms: AtomicI64,
}

/// Verified keys in memory; see the module docs.
pub(crate) struct KeyCache {
    db: DatabaseConnection,
    ttl: Duration,
    entries: RwLock<HashMap<String, Arc<CacheEntry>>>,
}

/// A stale entry may still be used this long when the database cannot be read, so a database
/// outage does not stop enqueues (revocations then wait for the database to come back).
const STALE_GRACE: Duration = Duration::from_secs(300);
/// `last_used_at` is written at most this often per key.
const TOUCH_EVERY_MS: i64 = 60_000;
/// Entries beyond which unknown ids are forgotten (a client trying random ids).
const MAX_ENTRIES: usize = 100_000;
/// How long a key lookup may take before the request fails with 503.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a presented key was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed,
    /// No key has this id, or the secret does not match.
    Invalid,
    Revoked,
    Expired,
}

impl KeyCache {
    pub(crate) fn new(db: DatabaseConnection, ttl: Duration) -> Self {
        Self {
            db,
            ttl,
            entries: RwLock::default(),
        }
    }

    /// Whether `id` is cached fresh enough to verify without the database.
    fn is_fresh(&self, id: &str) -> bool {
        let entries = self.entries.read().expect("key cache poisoned");
        entries.get(id).is_some_and(|e| e.fetched.elapsed() < self.ttl)
    }

    async fn entry(&self, id: &str) -> Result<Arc<CacheEntry>, ApiError> {
        let cached = self.entries.read().expect("key cache poisoned").get(id).cloned();
        if let Some(e) = &cached {
            let age = e.fetched.elapsed();
            // Fresh; or stale with another request already re-reading it.
            if age < self.ttl || e.refreshing.swap(true, Ordering::AcqRel) {
                return Ok(e.clone());
            }
        }
        let read = tokio::time::timeout(LOOKUP_TIMEOUT, schema::keys::get(&self.db, id)).await;
        let row = match read {
            Ok(Ok(row)) => row,
            failed => {
                if let Some(e) = cached {
                    e.refreshing.store(false, Ordering::Release);
                    if e.fetched.elapsed() < STALE_GRACE {
                        tracing::warn!(key_id = id, "API key lookup failed; using the cached key");
                        return Ok(e);
                    }
                }
                return Err(match failed {
                    Ok(Err(e)) => e.into(),
                    _ => ApiError::DatabaseUnavailable(anyhow::anyhow!("looking up an API key timed out")),
                });
            }
        };
        let key = row.and_then(|r| {
            let stored = StoredKey {
                role: Role::parse(&r.role)?,
                digest: unhex(&r.secret_sha256)?,
                expires_at: r.expires_at,
                revoked: r.revoked_at.is_some(),
            };
            Some(stored)
        });
        let touched = cached
            .as_ref()
            .map_or(0, |e| e.touched_ms.load(Ordering::Relaxed));
        let entry = Arc::new(CacheEntry {
            fetched: Instant::now(),
            key,
            refreshing: AtomicBool::new(false),
            touched_ms: AtomicI64::new(touched),
        });
        let mut entries = self.entries.write().expect("key cache poisoned");
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| e.key.is_some());
        }
        entries.insert(id.to_owned(), entry.clone());
        Ok(entry)
    }

    /// Verifies a presented key. `Ok(Err(_))` is a refusal; `Err(_)` a database failure.
    pub(crate) async fn verify(&self, key: &str) -> Result<Result<Principal, Refusal>, ApiError> {
        let Some(id) = key_id(key) else {
            return Ok(Err(Refusal::Malformed));
        };
        let entry = self.entry(id).await?;
        let Some(stored) = &entry.key else {
            return Ok(Err(Refusal::Invalid));
        };
        if !bool::from(digest(key).ct_eq(&stored.digest)) {
            return Ok(Err(Refusal::Invalid));
        }
        if stored.revoked {
            return Ok(Err(Refusal::Revoked));
        }
        let now = Utc::now();
        if stored.expires_at.is_some_and(|at| at <= now) {
            return Ok(Err(Refusal::Expired));
        }
        self.touch(id, &entry, now);
        Ok(Ok(Principal {
            key_id: id.to_owned(),
            role: stored.role,
        }))
    }

    /// Writes `last_used_at` from a spawned task, at most once a minute per key.
    fn touch(&self, id: &str, entry: &CacheEntry, now: DateTime<Utc>) {
        let now_ms = now.timestamp_millis();
        let last = entry.touched_ms.load(Ordering::Relaxed);
        if now_ms - last < TOUCH_EVERY_MS
            || entry
                .touched_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let (db, id) = (self.db.clone(), id.to_owned());
        tokio::spawn(async move {
            if let Err(error) = schema::keys::touch(&db, &id, now).await {
                tracing::debug!(key_id = %id, %error, "recording an API key's last use failed");
            }
        });
    }
}

/// The middleware in front of every route: finds the route's rule, verifies the key, applies
/// the rate limits, and audits mutating calls.
pub(crate) struct Guard {
    inner: Arc<GuardState>,
}

struct GuardState {
    routes: RouteTable,
    keys: KeyCache,
    limiter: Arc<RateLimiter>,
    limits: RateLimits,
    metrics_auth: MetricsAuth,
    audit: Option<schema::audit::AuditWriter>,
}

impl Guard {
    pub(crate) fn new<T: OpenApi>(state: &AppState) -> Self {
        let config = &state.config;
        Self {
            inner: Arc::new(GuardState {
                routes: RouteTable::from_api::<T>(),
                keys: KeyCache::new(state.db.clone(), config.key_cache_ttl),
                limiter: state.rate_limiter.clone(),
                limits: config.rate_limits.clone(),
                metrics_auth: config.metrics_auth,
                audit: state.audit.clone(),
            }),
        }
    }
}

impl<E: Endpoint<Output = Response>> Middleware<E> for Guard {
    type Output = GuardEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        GuardEndpoint {
            inner,
            state: self.inner.clone(),
        }
    }
}

pub(crate) struct GuardEndpoint<E> {
    inner: E,
    state: Arc<GuardState>,
}

fn is_mutating(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

impl<E: Endpoint<Output = Response>> Endpoint for GuardEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> poem::Result<Response> {
        let s = &self.state;
        let method = req.method().clone();
        let operation = s.routes.find(&method, req.uri().path());
        let access = operation.map_or_else(|| unmatched_access(req.uri().path()), |o| o.access);
        let access = match (access, s.metrics_auth) {
            (Access::Metrics, MetricsAuth::Open) => Access::Open,
            (Access::Metrics, MetricsAuth::Key) => Access::Role(Role::Viewer),
            (other, _) => other,
        };
        let client_ip = req.remote_addr().as_socket_addr().map(|a| a.ip());
        let audit = is_mutating(&method).then(|| Pending {
            method: method.to_string(),
            route: operation.map_or_else(|| UNMATCHED_ROUTE.into(), |o| o.template.clone()),
            path: req.uri().path().to_owned(),
            client_ip,
        });
        let presented = bearer(&req).map(str::to_owned);
        let (outcome, principal) = match access {
            Access::Open => (None, None),
            Access::Metrics => unreachable!("resolved above"),
            Access::Role(needed) => match self.admit(presented.as_deref(), needed, client_ip).await {
                Ok(principal) => (None, Some(principal)),
                Err(denied) => (Some(denied), None),
            },
        };
        let resp = match outcome {
            Some(denied) => {
                let mut resp = denied.render();
                if let Some(op) = operation {
                    // Labels the response with its route in the HTTP metrics.
                    resp.set_data(OperationId(op.id));
                }
                resp
            }
            None => {
                if let Some(p) = &principal {
                    req.extensions_mut().insert(p.clone());
                }
                self.inner.call(req).await?.into_response()
            }
        };
        if let Some(pending) = audit {
            let key_id = principal
                .as_ref()
                .map(|p| p.key_id.clone())
                .or_else(|| presented.as_deref().and_then(key_id).map(str::to_owned));
            s.record(pending, key_id, principal.map(|p| p.role), &resp);
        }
        Ok(resp)
    }
}

/// What the audit record of a mutating call needs from its request.
struct Pending {
    method: String,
    route: Arc<str>,
    path: String,
    client_ip: Option<IpAddr>,
}

impl GuardState {
    fn record(&self, p: Pending, key_id: Option<String>, role: Option<Role>, resp: &Response) {
        let status = resp.status();
        let outcome = match status.as_u16() {
            200..=299 => "ok",
            401 => "unauthorized",
            403 => "forbidden",
            429 => "limited",
            500..=599 => "failed",
            _ => "rejected",
        };
        // A created job is the call's target; otherwise the path it named.
        let target = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map_or(p.path, str::to_owned);
        let entry = AuditEntry {
            at: Utc::now(),
            key_id,
            role: role.map(|r| r.as_str().to_owned()),
            method: p.method,
            route: p.route.to_string(),
            target,
            status: status.as_u16(),
            outcome,
            client_ip: p.client_ip.map(|ip| ip.to_string()),
        };
        match &self.audit {
            Some(writer) => writer.record(entry),
            // No table to write to (a test app, a tool): the log line alone.
            None => tracing::info!(
                target: "drover::audit",
                key_id = entry.key_id.as_deref().unwrap_or("-"),
                method = %entry.method,
                route = %entry.route,
                target_ = %entry.target,
                status = entry.status,
                outcome = entry.outcome,
                "audit"
            ),
        }
    }
}

impl<E> GuardEndpoint<E> {
    /// The principal of a request that may call a route needing `needed`, or the response
    /// that refuses it.
    async fn admit(
        &self,
        presented: Option<&str>,
        needed: Role,
        client_ip: Option<IpAddr>,
    ) -> Result<Principal, ApiError> {
        let s = &self.state;
        let failures = |rate| Bucket::auth_failures(client_ip, rate);
        let refused = match presented {
            None => Refusal::Missing,
            Some(key) => {
                // A key the cache cannot vouch for costs a database read: a client already over
                // its auth-failure limit does not get one.
                if let (Some(rate), Some(id)) = (s.limits.auth_failures, key_id(key))
                    && !s.keys.is_fresh(id)
                    && let Some(wait) = s.limiter.peek(&failures(rate)).await
                {
                    return Err(ApiError::RateLimited { retry_after: wait });
                }
                match s.keys.verify(key).await? {
                    Ok(principal) => {
                        if principal.role < needed {
                            return Err(ApiError::Auth(AuthFailure::Forbidden {
                                role: principal.role,
                                needed,
                            }));
                        }
                        let mut buckets = Vec::with_capacity(2);
                        if let Some(rate) = s.limits.per_key {
                            buckets.push(Bucket::key(&principal.key_id, rate));
                        }
                        if let Some(rate) = s.limits.per_ip {
                            buckets.push(Bucket::ip(client_ip, rate));
                        }
                        if let Err(wait) = s.limiter.acquire(&buckets).await {
                            return Err(ApiError::RateLimited { retry_after: wait });
                        }
                        return Ok(principal);
                    }
                    Err(refusal) => refusal,
                }
            }
        };
        if let Some(rate) = s.limits.auth_failures
            && let Err(wait) = s.limiter.acquire(&[failures(rate)]).await
        {
            return Err(ApiError::RateLimited { retry_after: wait });
        }
        tracing::info!(
            reason = ?refused,
            key_id = presented.and_then(key_id).unwrap_or("-"),
            client_ip = %client_ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
            "API key refused"
        );
        Err(ApiError::Auth(AuthFailure::Unauthenticated(refused)))
    }
}

/// The token of an `Authorization: Bearer …` header (scheme case-insensitive).
fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// `WWW-Authenticate` of a 401 (RFC 6750).
pub(crate) fn www_authenticate() -> HeaderValue {
    HeaderValue::from_static("Bearer realm=\"drover\"")
}

/// What a 401 says about a refusal (nothing an attacker could use: an unknown id and a wrong
/// secret read the same).
pub(crate) fn refusal_detail(r: Refusal) -> &'static str {
    match r {
        Refusal::Missing => "this route needs an API key: send `Authorization: Bearer <key>`",
        Refusal::Malformed => "the Authorization header does not hold a drover API key (drv_…)",
        Refusal::Invalid => "the API key is not valid",
        Refusal::Revoked => "the API key has been revoked",
        Refusal::Expired => "the API key has expired",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_well_formed_and_stored_only_as_its_hash() {
        let now = Utc::now();
        let new = generate_key("ci", Role::Operator, None, now);
        let key = new.key.expose();
        assert_eq!(key_id(key), Some(new.row.id.as_str()));
        assert_eq!(key.len(), PREFIX.len() + ID_HEX + 1 + SECRET_HEX);
        assert!(!new.row.secret_sha256.contains(&key[PREFIX.len() + ID_HEX + 1..]));
        assert_eq!(unhex(&new.row.secret_sha256), Some(digest(key)));
        let other = generate_key("ci", Role::Operator, None, now);
        assert_ne!(other.key.expose(), key);
    }

    #[test]
    fn only_the_exact_key_shape_has_an_id() {
        let good = format!("drv_{}_{}", "a".repeat(12), "0".repeat(64));
        assert!(key_id(&good).is_some());
        for bad in [
            "".to_owned(),
            "drv_".to_owned(),
            format!("drv_{}_{}", "a".repeat(11), "0".repeat(64)),
            format!("drv_{}_{}", "a".repeat(12), "0".repeat(63)),
            format!("drv_{}_{}", "g".repeat(12), "0".repeat(64)),
            format!("xyz_{}_{}", "a".repeat(12), "0".repeat(64)),
            format!("drv_{}_{}_", "a".repeat(12), "0".repeat(64)),
        ] {
            assert!(key_id(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn roles_are_ordered_and_round_trip() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn the_route_table_prefers_literal_segments_and_closes_unknown_paths() {
        let table = RouteTable::from_api::<crate::routes::Api>();
        let op = |m: Method, p: &str| table.find(&m, p).map(|o| o.id);
        assert_eq!(op(Method::POST, "/v1/jobs/batch"), Some("enqueueBatch"));
        assert_eq!(op(Method::GET, "/v1/jobs/batch"), Some("getJob"));
        assert_eq!(op(Method::DELETE, "/v1/jobs/abc"), Some("cancelJob"));
        assert_eq!(op(Method::DELETE, "/v1/jobs/"), None);
        assert_eq!(op(Method::DELETE, "/v1/jobs/abc/"), None);
        assert_eq!(unmatched_access("/v1/jobs/abc/"), Access::Role(Role::Admin));
        assert_eq!(unmatched_access("/docs/"), Access::Open);
        assert_eq!(unmatched_access("/dashboard"), Access::Open);
        assert_eq!(unmatched_access("/dashboard/app.js"), Access::Open);
        assert_eq!(unmatched_access("/dashboards"), Access::Role(Role::Admin));
    }
}
