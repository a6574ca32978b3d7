//! drover's Redis broker.
//!
//! Layout, for prefix `P` and queue `q` (every key of a queue shares the hash tag `{q}`, so the
//! scripts run unchanged on Redis Cluster, reached with `redis+cluster://h1:p1,h2:p2`; nothing
//! drover sends spans two queues' slots, and `P:queues` is only ever used alone):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{q}:pending` | LIST | ids ready to run; LPUSH in, taken from the right. **KEDA reads its LLEN.** |
//! | `P:{q}:data` | HASH | id → the job's envelope (JSON), written once at enqueue |
//! | `P:{q}:state` | HASH | id → `status\|worker\|started ms\|finished ms` (a running job's entry is its lease's fencing token) |
//! | `P:{q}:attempts` | HASH | id → attempts that have ended (absent: none) |
//! | `P:{q}:error` | HASH | id → the last attempt's error |
//! | `P:{q}:crashes` | HASH | id → deliveries whose lease ran out (the worker died holding it); at `quarantine_after` the job is dead |
//! | `P:{q}:scheduled` | ZSET | delayed jobs and retries, scored by run-at ms |
//! | `P:{q}:leased` | ZSET | jobs handed to a worker, scored by lease deadline. **KEDA also reads its ZCARD** (running jobs keep a worker up). |
//! | `P:{q}:dead` | ZSET | the dead set, scored by time of death |
//! | `P:{q}:finished` | ZSET | canceled jobs, scored by when; removed after an hour |
//! | `P:{q}:workers` | ZSET | consumers, scored by heartbeat deadline |
//! | `P:{q}:claim:<worker>` | LIST | ids a blocked worker popped and is about to lease |
//! | `P:{q}:stats` | HASH | `done`, `failed` counters |
//! | `P:{q}:idem:<key>` | STRING | id of the job that first used an idempotency key |
//! | `P:queues` | SET | queues that have had jobs |
//!
//! Every state change is one Lua script over one queue's keys, so a job is always in exactly
//! one of pending / scheduled / leased / dead, or gone (succeeded; canceled after an hour). Job fields live in per-queue hashes
//! rather than a hash per job so that a script touches a whole batch with one variadic command
//! per structure (`HMGET`/`HSET`/`ZADD`/`ZREM` over 100 ids) instead of several commands per job:
//! that is what makes a fetch or a settlement cost about the same for 1 job as for 100. The
//! client builds every per-job string the scripts store or compare (Lua would intern a new
//! string for each concatenation), so the scripts only move values between structures.
//! An idle worker waits in `BLMOVE` on a connection of its own.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use redis::{
    AsyncConnectionConfig, Client, Script,
    aio::{ConnectionManager, MultiplexedConnection},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

use super::{
    BrokerError, CancelOutcome, ConsumerConfig, DeadOutcome, Driver, Enqueued, Producer, QueueStats,
};
use crate::{
    job::{Job, JobId, JobRecord, JobState, Outcome, Settlement, now_ms},
    queue::QueueName,
};

/// How long a canceled job's record stays in Redis for `GET /v1/jobs/{id}`; after that the
/// history database answers, as it does for a succeeded job at once (keeping those would cost
/// the hot path a write and a delete per job).
const FINISHED_TTL_MS: i64 = 3_600_000;
/// How long an idempotency key maps to its first job.
const IDEMPOTENCY_WINDOW_S: u64 = 86_400;
/// Jobs per script call when pushing a batch, so one call never blocks Redis for long (and
/// Lua's `unpack` stays far below its limit of about 8,000 values).
const PUSH_CHUNK: usize = 1_000;
/// redis-rs answers "timed out" after 500 ms by default, which under load kills healthy
/// connections; a broker call that takes 5 s is an outage anyway.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Dead jobs per script call when retrying or discarding a whole dead set.
const DEAD_SLICE: usize = 500;

impl From<redis::RedisError> for BrokerError {
    fn from(e: redis::RedisError) -> Self {
        // A Redis at `maxmemory` with `noeviction` refuses writes (OOM) until memory is freed:
        // an outage to retry, not a fault. A cluster mid-failover answers CLUSTERDOWN / TRYAGAIN.
        let refused = matches!(
            e.code(),
            Some("OOM" | "CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "LOADING")
        );
        if refused
            || e.is_io_error()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.is_connection_refusal()
        {
            BrokerError::Unavailable(format!("redis: {e}"))
        } else {
            BrokerError::Other(format!("redis: {e}"))
        }
    }
}

impl From<redis::ParsingError> for BrokerError {
    fn from(e: redis::ParsingError) -> Self {
        BrokerError::Corrupt(format!("redis reply: {e}"))
    }
}

/// Key names of one queue.
#[derive(Clone, Debug)]
struct Keys {
    pending: String,
    scheduled: String,
    leased: String,
    dead: String,
    finished: String,
    workers: String,
    stats: String,
    data: String,
    state: String,
    attempts: String,
    error: String,
    crashes: String,
    claim_prefix: String,
    idem_prefix: String,
}

impl Keys {
    fn new(prefix: &str, q: &QueueName) -> Self {
        let base = format!("{prefix}:{{{q}}}");
        Self {
            pending: format!("{base}:pending"),
            scheduled: format!("{base}:scheduled"),
            leased: format!("{base}:leased"),
            dead: format!("{base}:dead"),
            finished: format!("{base}:finished"),
            workers: format!("{base}:workers"),
            stats: format!("{base}:stats"),
            data: format!("{base}:data"),
            state: format!("{base}:state"),
            attempts: format!("{base}:attempts"),
            error: format!("{base}:error"),
            crashes: format!("{base}:crashes"),
            claim_prefix: format!("{base}:claim:"),
            idem_prefix: format!("{base}:idem:"),
        }
    }
}

/// A job's entry in `P:{q}:state`: `status|worker|started ms|finished ms`, empty fields where
/// unknown.
struct StateEntry<'a> {
    status: JobState,
    worker: Option<&'a str>,
    started_at_ms: Option<i64>,
    finished_at_ms: Option<i64>,
}

impl<'a> StateEntry<'a> {
    /// The entry of a job leased to `worker` at `leased_ms`; a settlement must find exactly this.
    fn running(worker: &str, leased_ms: u64) -> String {
        format!("running|{worker}|{leased_ms}|")
    }

    fn ended(status: JobState, worker: &str, leased_ms: u64, finished_ms: i64) -> String {
        format!("{status}|{worker}|{leased_ms}|{finished_ms}")
    }

    fn parse(s: &'a str) -> Option<Self> {
        // The worker name never holds `|` (see `RedisBroker::driver`).
        let mut f = s.splitn(4, '|');
        let status = f.next()?.parse().ok()?;
        let worker = f.next().filter(|w| !w.is_empty());
        let int = |v: Option<&str>| v.and_then(|v| v.parse::<i64>().ok());
        Some(Self {
            status,
            worker,
            started_at_ms: int(f.next()),
            finished_at_ms: int(f.next()),
        })
    }
}

struct Scripts {
    push: Script,
    fetch: Script,
    settle: Script,
    release: Script,
    renew: Script,
    cancel: Script,
    revive: Script,
    discard: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            push: Script::new(PUSH_LUA),
            fetch: Script::new(FETCH_LUA),
            settle: Script::new(SETTLE_LUA),
            release: Script::new(RELEASE_LUA),
            renew: Script::new(RENEW_LUA),
            cancel: Script::new(CANCEL_LUA),
            revive: Script::new(REVIVE_LUA),
            discard: Script::new(DISCARD_LUA),
        }
    }
}

/// How this process reaches Redis: one server, or a Redis Cluster.
#[derive(Clone)]
enum Endpoint {
    Single(Client),
    Cluster(Arc<ClusterClient>),
}

impl Endpoint {
    /// `redis+cluster://[user:password@]host:port,host:port[,…]` names any of a cluster's
    /// nodes (the others are discovered); `rediss+cluster://` the same over TLS.
    fn parse(url: &str) -> Result<Self, BrokerError> {
        let bad = |e: &dyn std::fmt::Display| BrokerError::Other(format!("redis URL: {e}"));
        let cluster = url
            .strip_prefix("redis+cluster://")
            .map(|rest| ("redis", rest))
            .or_else(|| url.strip_prefix("rediss+cluster://").map(|rest| ("rediss", rest)));
        let Some((scheme, rest)) = cluster else {
            return Ok(Self::Single(Client::open(url).map_err(|e| bad(&e))?));
        };
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((auth, hosts)) => (format!("{auth}@"), hosts),
            None => (String::new(), rest),
        };
        let hosts = hosts.trim_end_matches('/');
        let nodes: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{auth}{h}"))
            .collect();
        if nodes.is_empty() {
            return Err(bad(&"redis+cluster:// needs at least one host:port"));
        }
        let client = ClusterClient::builder(nodes)
            .response_timeout(RESPONSE_TIMEOUT)
            .connection_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| bad(&e))?;
        Ok(Self::Cluster(Arc::new(client)))
    }
}

/// A connection to either kind of [`Endpoint`]; both multiplex and are cheap to clone.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Blocking(MultiplexedConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Blocking(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Blocking(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Blocking(c) => c.get_db(),
        }
    }
}

/// The producer side, shared by the whole process: one multiplexed connection that reconnects
/// by itself (on a cluster, one per node, opened at first use and again after a failure).
#[derive(Clone)]
pub struct RedisBroker {
    endpoint: Endpoint,
    /// A single server's connection manager, made at once (it connects lazily by itself).
    single: Option<ConnectionManager>,
    /// The cluster connection, once one has been made.
    cluster: Arc<tokio::sync::Mutex<Option<ClusterConnection>>>,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
    known_queues: Arc<Mutex<HashSet<QueueName>>>,
    keys: Arc<Mutex<HashMap<QueueName, Arc<Keys>>>>,
}

impl RedisBroker {
    /// `redis://…` for one server, `redis+cluster://h1:p1,h2:p2` for a Redis Cluster.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, BrokerError> {
        let endpoint = Endpoint::parse(url)?;
        let single = match &endpoint {
            Endpoint::Single(client) => {
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(2));
                // Lazy, so that drover starts (and answers 503 / not ready) while Redis is down.
                Some(ConnectionManager::new_lazy_with_config(client.clone(), cfg)?)
            }
            Endpoint::Cluster(_) => None,
        };
        Ok(Self {
            endpoint,
            single,
            cluster: Arc::default(),
            prefix: prefix.into(),
            scripts: Arc::new(Scripts::new()),
            known_queues: Arc::default(),
            keys: Arc::default(),
        })
    }

    /// The shared connection. A cluster connection is made at first use, so that drover starts
    /// while the cluster is down; one that failed is made again at the next call.
    async fn conn(&self) -> Result<Conn, BrokerError> {
        if let Some(single) = &self.single {
            return Ok(Conn::Single(single.clone()));
        }
        let Endpoint::Cluster(client) = &self.endpoint else {
            unreachable!("a single server always has its connection manager")
        };
        let mut guard = self.cluster.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(Conn::Cluster(c.clone()));
        }
        let c = client.get_async_connection().await?;
        *guard = Some(c.clone());
        Ok(Conn::Cluster(c))
    }

    /// A connection of its own for blocking waits, whose response timeout is `timeout`.
    async fn blocking_conn(&self, timeout: Duration) -> Result<Conn, BrokerError> {
        Ok(match &self.endpoint {
            Endpoint::Single(client) => {
                let cfg = AsyncConnectionConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT));
                Conn::Blocking(client.get_multiplexed_async_connection_with_config(&cfg).await?)
            }
            Endpoint::Cluster(client) => {
                let cfg = redis::cluster::ClusterConfig::new()
                    .set_response_timeout(timeout)
                    .set_connection_timeout(CONNECT_TIMEOUT);
                Conn::Cluster(client.get_async_connection_with_config(cfg).await?)
            }
        })
    }

    fn keys(&self, q: &QueueName) -> Arc<Keys> {
        let mut map = self.keys.lock().expect("keys poisoned");
        map.entry(q.clone())
            .or_insert_with(|| Arc::new(Keys::new(&self.prefix, q)))
            .clone()
    }

    fn queues_key(&self) -> String {
        format!("{}:queues", self.prefix)
    }

    async fn remember_queue(&self, q: &QueueName) -> Result<(), BrokerError> {
        if self.known_queues.lock().expect("poisoned").contains(q) {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let _: () = redis::cmd("SADD")
            .arg(self.queues_key())
            .arg(q.as_str())
            .query_async(&mut conn)
            .await?;
        self.known_queues.lock().expect("poisoned").insert(q.clone());
        Ok(())
    }

    async fn push_chunk(&self, q: &QueueName, jobs: &[Job]) -> Result<Vec<Enqueued>, BrokerError> {
        let keys = self.keys(q);
        let mut inv = self.scripts.push.prepare_invoke();
        inv.key(&keys.pending)
            .key(&keys.scheduled)
            .key(&keys.data)
            .key(&keys.state);
        inv.arg(&keys.idem_prefix).arg(IDEMPOTENCY_WINDOW_S).arg(now_ms());
        let mut data = Vec::with_capacity(256);
        for job in jobs {
            data.clear();
            serde_json::to_writer(&mut data, job).map_err(|e| BrokerError::Other(e.to_string()))?;
            inv.arg(job.id.to_string())
                .arg(&data[..])
                .arg(job.run_at_ms.unwrap_or(0))
                .arg(job.idempotency_key.as_deref().unwrap_or(""));
        }
        let mut conn = self.conn().await?;
        let out: Vec<String> = inv.invoke_async(&mut conn).await?;
        out.chunks_exact(2)
            .map(|pair| {
                let id = JobId::parse(&pair[0])
                    .ok_or_else(|| BrokerError::Corrupt(format!("job id {:?}", pair[0])))?;
                Ok(Enqueued {
                    id,
                    duplicate: pair[1] == "1",
                })
            })
            .collect()
    }

    /// Finds which queue holds a job (`P:queues` lists every queue that ever had one) and
    /// reads its record there.
    async fn locate(&self, id: JobId) -> Result<Option<(QueueName, JobRecord)>, BrokerError> {
        let mut conn = self.conn().await?;
        let queues = self.queues().await?;
        let field = id.to_string();
        // One command per queue, sent together: on a cluster each queue lives in its own slot,
        // and a pipeline may not span slots.
        let found: Vec<Option<String>> = futures::future::try_join_all(queues.iter().map(|q| {
            let mut conn = conn.clone();
            let key = self.keys(q).state.clone();
            let field = field.clone();
            async move {
                redis::cmd("HGET")
                    .arg(key)
                    .arg(field)
                    .query_async(&mut conn)
                    .await
            }
        }))
        .await?;
        let Some((q, state)) = queues
            .into_iter()
            .zip(found)
            .find_map(|(q, state)| Some((q, state?)))
        else {
            return Ok(None);
        };
        let keys = self.keys(&q);
        let (data, error, attempts): (Option<String>, Option<String>, Option<u32>) = redis::pipe()
            .hget(&keys.data, &field)
            .hget(&keys.error, &field)
            .hget(&keys.attempts, &field)
            .query_async(&mut conn)
            .await?;
        record(id, &q, &state, data.as_deref(), error, attempts).map(|r| Some((q, r)))
    }

    /// Puts dead jobs of `q` back in line with a fresh attempt budget; returns how many were
    /// still dead.
    async fn revive(&self, q: &QueueName, ids: &[String]) -> Result<u64, BrokerError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let keys = self.keys(q);
        let mut conn = self.conn().await?;
        type Column = Vec<Option<String>>;
        let (states, data, attempts): (Column, Column, Vec<Option<u32>>) = redis::pipe()
            .cmd("HMGET")
            .arg(&keys.state)
            .arg(ids)
            .cmd("HMGET")
            .arg(&keys.data)
            .arg(ids)
            .cmd("HMGET")
            .arg(&keys.attempts)
            .arg(ids)
            .query_async(&mut conn)
            .await?;
        let mut inv = self.scripts.revive.prepare_invoke();
        inv.key(&keys.dead)
            .key(&keys.state)
            .key(&keys.data)
            .key(&keys.crashes)
            .key(&keys.pending);
        for ((id, state), (data, made)) in ids.iter().zip(states).zip(data.into_iter().zip(attempts)) {
            let (Some(state), Some(data)) = (state, data) else {
                continue;
            };
            let job: Job =
                serde_json::from_str(&data).map_err(|e| BrokerError::Corrupt(format!("job {id}: {e}")))?;
            let revived = serde_json::to_string(&job.revived(made.unwrap_or(0)))
                .map_err(|e| BrokerError::Other(e.to_string()))?;
            inv.arg(id).arg(state).arg(revived);
        }
        Ok(inv.invoke_async(&mut conn).await?)
    }

    async fn discard(&self, q: &QueueName, ids: &[String]) -> Result<u64, BrokerError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let keys = self.keys(q);
        let mut conn = self.conn().await?;
        Ok(self
            .scripts
            .discard
            .key(&keys.dead)
            .key(&keys.state)
            .key(&keys.data)
            .key(&keys.attempts)
            .key(&keys.error)
            .key(&keys.crashes)
            .arg(ids)
            .invoke_async(&mut conn)
            .await?)
    }

    /// Applies `op` to the whole dead set of `q`, a slice at a time; returns how many it took.
    async fn whole_dead_set<'a, F, Fut>(&'a self, q: &'a QueueName, op: F) -> Result<u64, BrokerError>
    where
        F: Fn(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<u64, BrokerError>> + 'a,
    {
        let keys = self.keys(q);
        let mut total = 0;
        loop {
            let mut conn = self.conn().await?;
            let ids: Vec<String> = redis::cmd("ZRANGE")
                .arg(&keys.dead)
                .arg(0)
                .arg(DEAD_SLICE - 1)
                .query_async(&mut conn)
                .await?;
            if ids.is_empty() {
                return Ok(total);
            }
            let n = op(ids).await?;
            if n == 0 {
                // Nothing there could be taken (entries without a job): stop rather than spin.
                return Ok(total);
            }
            total += n;
        }
    }

    /// A dead-set operation on one job: `op` returns how many it took (0 or 1).
    async fn on_dead_job<'a, F, Fut>(&'a self, id: JobId, op: F) -> Result<DeadOutcome, BrokerError>
    where
        F: FnOnce(QueueName, Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<u64, BrokerError>> + 'a,
    {
        let Some((q, rec)) = self.locate(id).await? else {
            return Ok(DeadOutcome::NotFound);
        };
        if rec.status != JobState::Dead {
            return Ok(DeadOutcome::NotDead(rec.status));
        }
        if op(q, vec![id.to_string()]).await? == 1 {
            return Ok(DeadOutcome::Done);
        }
        // Changed in between (another API replica retried or discarded it).
        Ok(match self.locate(id).await? {
            Some((_, rec)) => DeadOutcome::NotDead(rec.status),
            None => DeadOutcome::NotFound,
        })
    }
}

fn record(
    id: JobId,
    queue: &QueueName,
    state: &str,
    data: Option<&str>,
    last_error: Option<String>,
    attempts: Option<u32>,
) -> Result<JobRecord, BrokerError> {
    let job: Job = serde_json::from_str(data.unwrap_or("null"))
        .map_err(|e| BrokerError::Corrupt(format!("job {id}: {e}")))?;
    let st =
        StateEntry::parse(state).ok_or_else(|| BrokerError::Corrupt(format!("job {id}: state {state:?}")))?;
    Ok(JobRecord {
        id,
        queue: queue.to_string(),
        kind: job.kind.to_string(),
        status: st.status,
        // Counting the one under way.
        attempts: attempts.unwrap_or(0) + u32::from(st.status == JobState::Running),
        max_attempts: job.max_attempts,
        priority: job.priority,
        payload: serde_json::from_str(job.payload.get()).ok(),
        created_at_ms: job.enqueued_at_ms,
        run_at_ms: job.run_at_ms,
        started_at_ms: st.started_at_ms,
        finished_at_ms: st.finished_at_ms,
        last_error,
        worker_id: st.worker.map(str::to_owned),
        trace_id: job.trace_id,
    })
}

#[async_trait]
impl Producer for RedisBroker {
    async fn push(&self, job: Job) -> Result<Enqueued, BrokerError> {
        self.remember_queue(&job.queue).await?;
        let q = job.queue.clone();
        let mut out = self.push_chunk(&q, std::slice::from_ref(&job)).await?;
        out.pop()
            .ok_or_else(|| BrokerError::Corrupt("push returned nothing".into()))
    }

    async fn push_batch(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>, BrokerError> {
        // One script call per queue and chunk; results are put back in request order.
        let mut by_queue: HashMap<QueueName, Vec<usize>> = HashMap::new();
        for (i, j) in jobs.iter().enumerate() {
            by_queue.entry(j.queue.clone()).or_default().push(i);
        }
        let mut out = vec![None; jobs.len()];
        for (q, idx) in by_queue {
            self.remember_queue(&q).await?;
            for chunk in idx.chunks(PUSH_CHUNK) {
                let part: Vec<Job> = chunk.iter().map(|&i| jobs[i].clone()).collect();
                let res = self.push_chunk(&q, &part).await?;
                for (&i, r) in chunk.iter().zip(res) {
                    out[i] = Some(r);
                }
            }
        }
        out.into_iter()
            .map(|r| r.ok_or_else(|| BrokerError::Corrupt("push lost a job".into())))
            .collect()
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, BrokerError> {
        Ok(self.locate(id).await?.map(|(_, r)| r))
    }

    async fn cancel(&self, id: JobId) -> Result<CancelOutcome, BrokerError> {
        let Some((q, _)) = self.locate(id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        let keys = self.keys(&q);
        let mut conn = self.conn().await?;
        let before: String = self
            .scripts
            .cancel
            .key(&keys.pending)
            .key(&keys.scheduled)
            .key(&keys.state)
            .key(&keys.finished)
            .arg(id.to_string())
            .arg(now_ms())
            .invoke_async(&mut conn)
            .await?;
        Ok(match before.as_str() {
            "" => CancelOutcome::NotFound,
            "pending" | "scheduled" | "retrying" => CancelOutcome::Canceled,
            other => CancelOutcome::NotCancelable(other.parse().unwrap_or(JobState::Running)),
        })
    }

    async fn stats(&self, q: &QueueName) -> Result<QueueStats, BrokerError> {
        let keys = self.keys(q);
        let mut conn = self.conn().await?;
        let (pending, scheduled, running, dead, counters): (u64, u64, u64, u64, (Option<u64>, Option<u64>)) =
            redis::pipe()
                .llen(&keys.pending)
                .zcard(&keys.scheduled)
                .zcard(&keys.leased)
                .zcard(&keys.dead)
                .cmd("HMGET")
                .arg(&keys.stats)
                .arg("done")
                .arg("failed")
                .query_async(&mut conn)
                .await?;
        Ok(QueueStats {
            queue: q.to_string(),
            pending,
            scheduled,
            running,
            dead,
            done: counters.0.unwrap_or(0),
            failed: counters.1.unwrap_or(0),
        })
    }

    async fn queues(&self) -> Result<Vec<QueueName>, BrokerError> {
        let mut conn = self.conn().await?;
        let seen: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.queues_key())
            .query_async(&mut conn)
            .await?;
        Ok(crate::queue::builtin_and(
            seen.iter().filter_map(|q| QueueName::parse(q).ok()),
        ))
    }

    async fn dead(&self, q: &QueueName, offset: u64, limit: u64) -> Result<Vec<JobRecord>, BrokerError> {
        let keys = self.keys(q);
        let mut conn = self.conn().await?;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(&keys.dead)
            .arg(offset)
            .arg(offset + limit.max(1) - 1)
            .arg("REV")
            .query_async(&mut conn)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        type Column = Vec<Option<String>>;
        let (states, data, errors, attempts): (Column, Column, Column, Vec<Option<u32>>) = redis::pipe()
            .cmd("HMGET")
            .arg(&keys.state)
            .arg(&ids)
            .cmd("HMGET")
            .arg(&keys.data)
            .arg(&ids)
            .cmd("HMGET")
            .arg(&keys.error)
            .arg(&ids)
            .cmd("HMGET")
            .arg(&keys.attempts)
            .arg(&ids)
            .query_async(&mut conn)
            .await?;
        ids.iter()
            .zip(states.into_iter().zip(data).zip(errors).zip(attempts))
            .filter_map(|(id, (((state, data), error), attempts))| Some((id, state?, data, error, attempts)))
            .map(|(id, state, data, error, attempts)| {
                let id = JobId::parse(id).ok_or_else(|| BrokerError::Corrupt(format!("job id {id:?}")))?;
                record(id, q, &state, data.as_deref(), error, attempts)
            })
            .collect()
    }

    async fn retry_dead(&self, id: JobId) -> Result<DeadOutcome, BrokerError> {
        self.on_dead_job(id, |q, ids| async move { self.revive(&q, &ids).await })
            .await
    }

    async fn retry_all_dead(&self, q: &QueueName) -> Result<u64, BrokerError> {
        self.whole_dead_set(q, |ids| async move { self.revive(q, &ids).await })
            .await
    }

    async fn discard_dead(&self, id: JobId) -> Result<DeadOutcome, BrokerError> {
        self.on_dead_job(id, |q, ids| async move { self.discard(&q, &ids).await })
            .await
    }

    async fn discard_all_dead(&self, q: &QueueName) -> Result<u64, BrokerError> {
        self.whole_dead_set(q, |ids| async move { self.discard(q, &ids).await })
            .await
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    async fn driver(&self, q: &QueueName, cfg: &ConsumerConfig) -> Result<Arc<dyn Driver>, BrokerError> {
        self.remember_queue(q).await?;
        Ok(Arc::new(RedisDriver {
            broker: self.clone(),
            keys: self.keys(q),
            // `|` separates the fields of a state entry.
            worker: cfg.worker.replace('|', "_").into(),
            lease_ms: cfg.lease.as_millis() as u64,
            quarantine_after: cfg.quarantine_after.max(1),
            block_timeout: cfg.block + Duration::from_secs(5),
            blocking: tokio::sync::Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        }))
    }

    fn depth_source(&self, q: &QueueName) -> String {
        format!("redis LIST {} (LLEN)", self.keys(q).pending)
    }

    async fn destroy(&self) -> Result<(), BrokerError> {
        if matches!(self.endpoint, Endpoint::Cluster(_)) {
            return self.destroy_on_cluster().await;
        }
        // Glob metacharacters in the prefix must match literally.
        let mut pattern = String::with_capacity(self.prefix.len() + 2);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str(":*");
        let mut conn = self.conn().await?;
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1_000)
                .query_async(&mut conn)
                .await?;
            // One key per call: keys of different queues live in different cluster slots.
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.cmd("UNLINK").arg(k).ignore();
            }
            if !keys.is_empty() {
                let _: () = pipe.query_async(&mut conn).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        self.known_queues.lock().expect("poisoned").clear();
        Ok(())
    }
}

impl RedisBroker {
    /// `SCAN` covers one node of a cluster only, so each queue's keys are deleted by name:
    /// its fixed keys and its workers' claim lists. Idempotency keys are left to expire.
    async fn destroy_on_cluster(&self) -> Result<(), BrokerError> {
        let mut conn = self.conn().await?;
        for q in self.queues().await? {
            let k = self.keys(&q);
            let workers: Vec<String> = redis::cmd("ZRANGE")
                .arg(&k.workers)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await?;
            let mut names = vec![
                &k.pending,
                &k.scheduled,
                &k.leased,
                &k.dead,
                &k.finished,
                &k.workers,
                &k.stats,
                &k.data,
                &k.state,
                &k.attempts,
                &k.error,
                &k.crashes,
            ]
            .into_iter()
            .cloned()
            .collect::<Vec<String>>();
            names.extend(workers.iter().map(|w| format!("{}{w}", k.claim_prefix)));
            // One slot per queue: one command.
            let _: () = redis::cmd("UNLINK").arg(names).query_async(&mut conn).await?;
        }
        let _: () = redis::cmd("UNLINK")
            .arg(self.queues_key())
            .query_async(&mut conn)
            .await?;
        self.known_queues.lock().expect("poisoned").clear();
        Ok(())
    }
}

/// One worker's view of one queue.
struct RedisDriver {
    broker: RedisBroker,
    keys: Arc<Keys>,
    worker: Arc<str>,
    lease_ms: u64,
    quarantine_after: u32,
    block_timeout: Duration,
    /// The connection idle waits block on; a blocked command would stall every other command
    /// multiplexed on a shared connection.
    blocking: tokio::sync::Mutex<Option<Conn>>,
    /// Cuts an idle wait short: a retry this worker schedules must not wait out the block.
    wake: tokio::sync::Notify,
}

impl RedisDriver {
    async fn lease(&self, max: usize) -> Result<(Vec<Job>, Option<i64>), BrokerError> {
        let k = &self.keys;
        let now = now_ms();
        let mut conn = self.broker.conn().await?;
        let out: Vec<redis::Value> = self
            .broker
            .scripts
            .fetch
            .key(&k.pending)
            .key(&k.leased)
            .key(&k.scheduled)
            .key(format!("{}{}", k.claim_prefix, self.worker))
            .key(&k.workers)
            .key(&k.dead)
            .key(&k.stats)
            .key(&k.data)
            .key(&k.state)
            .key(&k.error)
            .key(&k.attempts)
            .key(&k.crashes)
            .arg(now)
            .arg(now + self.lease_ms as i64)
            .arg(max)
            .arg(&*self.worker)
            .arg(&k.claim_prefix)
            .arg(StateEntry::running(&self.worker, now as u64))
            .arg(self.quarantine_after)
            .invoke_async(&mut conn)
            .await?;
        let mut it = out.into_iter();
        let next: i64 = it.next().map(redis::from_redis_value).transpose()?.unwrap_or(-1);
        let mut jobs = Vec::with_capacity(it.len() / 3);
        while let (Some(a), Some(c), Some(d)) = (it.next(), it.next(), it.next()) {
            let ended: Option<u32> = redis::from_redis_value(a)?;
            let crashes: Option<u32> = redis::from_redis_value(c)?;
            let redis::Value::BulkString(data) = d else {
                return Err(BrokerError::Corrupt(format!("job envelope: {d:?}")));
            };
            let mut job: Job = serde_json::from_slice(&data)
                .map_err(|e| BrokerError::Corrupt(format!("job envelope: {e}")))?;
            job.attempt = ended.unwrap_or(0) + 1;
            job.crashes = crashes.unwrap_or(0);
            // The lease's time: with the worker, the fencing token its settlement must match.
            job.receipt = now as u64;
            jobs.push(job);
        }
        Ok((jobs, (next >= 0).then_some(next)))
    }

    async fn wait_for_work(&self, wait: Duration) -> Result<(), BrokerError> {
        let mut guard = self.blocking.lock().await;
        if guard.is_none() {
            *guard = Some(self.broker.blocking_conn(self.block_timeout).await?);
        }
        let conn = guard.as_mut().expect("set above");
        let claim = format!("{}{}", self.keys.claim_prefix, self.worker);
        let mut cmd = redis::cmd("BLMOVE");
        cmd.arg(&self.keys.pending)
            .arg(claim)
            .arg("RIGHT")
            .arg("LEFT")
            .arg(wait.as_secs_f64().max(0.01));
        let blmove = cmd.query_async::<Option<String>>(conn);
        // Redis checks blocking timeouts on its `hz` tick (100 ms by default), so a wait for a
        // scheduled job that falls due soon is timed here instead.
        let local = tokio::time::sleep(if wait < Duration::from_secs(1) {
            wait
        } else {
            Duration::MAX / 4
        });
        let res = tokio::select! {
            res = blmove => Some(res),
            _ = self.wake.notified() => None,
            _ = local => None,
        };
        match res {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                *guard = None;
                return Err(e.into());
            }
            // Cut short: the server still blocks this connection, so start afresh next time.
            // An id it moves meanwhile lands in the claim list, which the next lease takes.
            None => *guard = None,
        }
        Ok(())
    }
}

#[async_trait]
impl Driver for RedisDriver {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Job>, BrokerError> {
        let (jobs, next) = self.lease(max).await?;
        if !jobs.is_empty() {
            return Ok(jobs);
        }
        // Nothing ready: block until a push, or until the next scheduled job falls due.
        let until_scheduled = next.map(|at| Duration::from_millis((at - now_ms()).max(1) as u64));
        let wait = until_scheduled.map_or(wait, |d| d.min(wait));
        self.wait_for_work(wait).await?;
        Ok(self.lease(max).await?.0)
    }

    async fn settle(&self, batch: &[Settlement]) -> Result<(), BrokerError> {
        let k = &self.keys;
        let mut inv = self.broker.scripts.settle.prepare_invoke();
        inv.key(&k.leased)
            .key(&k.scheduled)
            .key(&k.dead)
            .key(&k.stats)
            .key(&k.pending)
            .key(&k.state)
            .key(&k.error)
            .key(&k.finished)
            .key(&k.data)
            .key(&k.attempts)
            .key(&k.crashes);
        inv.arg(now_ms() - FINISHED_TTL_MS);
        for s in batch {
            let (code, at, err) = match &s.outcome {
                Outcome::Succeeded => ("s", 0, ""),
                Outcome::Retry { at_ms, error, .. } => (
                    if s.outcome.is_panicked_retry() { "p" } else { "r" },
                    *at_ms,
                    error.as_str(),
                ),
                Outcome::Dead { error, .. } => ("d", 0, error.as_str()),
            };
            let leased = s.job.receipt;
            inv.arg(s.job.id.to_string())
                .arg(StateEntry::running(&self.worker, leased))
                .arg(match s.outcome {
                    // Forgotten by the broker: see the settle script.
                    Outcome::Succeeded => String::new(),
                    _ => StateEntry::ended(s.outcome.state(), &self.worker, leased, s.finished_at_ms),
                })
                .arg(s.job.attempt)
                .arg(code)
                .arg(at)
                .arg(err)
                .arg(s.finished_at_ms);
        }
        let mut conn = self.broker.conn().await?;
        let _: () = inv.invoke_async(&mut conn).await?;
        // A retry may fall due before this worker's idle wait ends; the wait may also not have
        // started yet, in which case the stored permit cuts the next one short.
        if batch.iter().any(|s| matches!(s.outcome, Outcome::Retry { .. })) {
            self.wake.notify_one();
        }
        Ok(())
    }

    async fn release(&self, jobs: &[Job]) -> Result<(), BrokerError> {
        let k = &self.keys;
        let mut inv = self.broker.scripts.release.prepare_invoke();
        inv.key(&k.leased).key(&k.pending).key(&k.state);
        for j in jobs {
            inv.arg(j.id.to_string())
                .arg(StateEntry::running(&self.worker, j.receipt));
        }
        let mut conn = self.broker.conn().await?;
        let _: () = inv.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn renew(&self, held: &[JobId]) -> Result<(), BrokerError> {
        let k = &self.keys;
        let mut inv = self.broker.scripts.renew.prepare_invoke();
        inv.key(&k.leased)
            .key(&k.workers)
            .arg(now_ms() + self.lease_ms as i64)
            .arg(&*self.worker);
        for id in held {
            inv.arg(id.to_string());
        }
        let mut conn = self.broker.conn().await?;
        let _: () = inv.invoke_async(&mut conn).await?;
        Ok(())
    }
}

// The scripts keep times as the strings the client sent: Lua turns numbers into strings
// through printf, which costs more than the commands around it.

const PUSH_LUA: &str = r#"
-- KEYS: pending, scheduled, data, state
-- ARGV: idempotency prefix, idempotency ttl s, now ms,
--       then per job: id, envelope, run-at ms (0 = now), idempotency key ('' = none)
-- Returns: per job, its id (the earlier job's for a repeated idempotency key) and '1' if repeated.
local ip, ittl, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out, data, state, pending, scheduled = {}, {}, {}, {}, {}
for i = 4, #ARGV, 4 do
  local id, env, runat, idem = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local prev = false
  if idem ~= '' then
    prev = redis.call('GET', ip .. idem)
    if not prev then redis.call('SET', ip .. idem, id, 'EX', ittl) end
  end
  if prev then
    out[#out + 1] = prev
    out[#out + 1] = '1'
  else
    data[#data + 1] = id
    data[#data + 1] = env
    state[#state + 1] = id
    if tonumber(runat) > now then
      state[#state + 1] = 'scheduled|||'
      scheduled[#scheduled + 1] = runat
      scheduled[#scheduled + 1] = id
    else
      state[#state + 1] = 'pending|||'
      pending[#pending + 1] = id
    end
    out[#out + 1] = id
    out[#out + 1] = '0'
  end
end
if #data > 0 then
  redis.call('HSET', KEYS[3], unpack(data))
  redis.call('HSET', KEYS[4], unpack(state))
end
if #pending > 0 then redis.call('LPUSH', KEYS[1], unpack(pending)) end
if #scheduled > 0 then redis.call('ZADD', KEYS[2], unpack(scheduled)) end
return out
"#;

const FETCH_LUA: &str = r#"
-- KEYS: pending, leased, scheduled, this worker's claim list, workers, dead, stats, data, state,
--       error, attempts, crashes
-- ARGV: now ms, lease deadline ms, max jobs, worker, claim prefix, the leased jobs' state entry,
--       crashes after which a job is quarantined
-- Returns: next scheduled run-at ms (-1 if none), then per leased job the attempts it has had
-- (false for none), its crashes (false for none) and its envelope.
local now, deadline, max, worker, cp, running = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
local quarantine = tonumber(ARGV[7])
redis.call('ZADD', KEYS[5], deadline, worker)

-- Claims of workers that stopped heartbeating go back to the front of the line.
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 10)) do
  while redis.call('LMOVE', cp .. w, KEYS[1], 'RIGHT', 'RIGHT') do end
  redis.call('ZREM', KEYS[5], w)
end

-- Leases that ran out: the worker died or hung. The attempt counts, and so does the crash: out
-- of attempts means dead, and so does a job that has now taken down `quarantine` workers.
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
if #expired > 0 then
  redis.call('ZREM', KEYS[2], unpack(expired))
  local states = redis.call('HMGET', KEYS[9], unpack(expired))
  for i, id in ipairs(expired) do
    local held = string.match(states[i] or '', '^running(|.*)$')
    if held then
      local a = redis.call('HINCRBY', KEYS[11], id, 1)
      local c = redis.call('HINCRBY', KEYS[12], id, 1)
      local ok, job = pcall(cjson.decode, redis.call('HGET', KEYS[8], id) or '')
      local max_attempts = ok and tonumber(job['max_attempts']) or 1
      if a >= max_attempts or c >= quarantine then
        redis.call('HSET', KEYS[9], id, 'dead' .. string.match(held, '^(|[^|]*|[^|]*|)') .. now)
        if c >= quarantine then
          redis.call('HSET', KEYS[10], id, 'quarantined: its worker died ' .. c .. ' times while running it')
        else
          redis.call('HSET', KEYS[10], id, 'lease expired: the worker running it stopped responding')
        end
        redis.call('ZADD', KEYS[6], now, id)
        redis.call('HINCRBY', KEYS[7], 'failed', 1)
      else
        -- The holder is kept: should its result arrive before anyone else takes the job,
        -- the result stands.
        redis.call('HSET', KEYS[9], id, 'pending' .. held)
        redis.call('RPUSH', KEYS[1], id)
      end
    end
  end
end

-- Delayed jobs and retries that are due join the line.
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
if #due > 0 then
  redis.call('ZREM', KEYS[3], unpack(due))
  local set = {}
  for _, id in ipairs(due) do
    set[#set + 1] = id
    set[#set + 1] = 'pending|||'
  end
  redis.call('HSET', KEYS[9], unpack(set))
  redis.call('LPUSH', KEYS[1], unpack(due))
end

local ids = redis.call('LRANGE', KEYS[4], 0, -1)
if #ids > 0 then redis.call('DEL', KEYS[4]) end
if #ids < max then
  local more = redis.call('RPOP', KEYS[1], max - #ids)
  if more then for _, id in ipairs(more) do ids[#ids + 1] = id end end
end

local out = {-1}
local nxt = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if nxt[2] then out[1] = tonumber(nxt[2]) end
if #ids == 0 then return out end

local states = redis.call('HMGET', KEYS[9], unpack(ids))
local envs = redis.call('HMGET', KEYS[8], unpack(ids))
local tries = redis.call('HMGET', KEYS[11], unpack(ids))
-- Crashes are rare: read them only when some job of the queue has any.
local crashed = {}
if redis.call('HLEN', KEYS[12]) > 0 then crashed = redis.call('HMGET', KEYS[12], unpack(ids)) end
local set, leased = {}, {}
for i, id in ipairs(ids) do
  -- Anything but pending was canceled while its id sat in a claim list.
  local s = states[i]
  if s and string.sub(s, 1, 8) == 'pending|' and envs[i] then
    set[#set + 1] = id
    set[#set + 1] = running
    leased[#leased + 1] = deadline
    leased[#leased + 1] = id
    out[#out + 1] = tries[i]
    out[#out + 1] = crashed[i] or false
    out[#out + 1] = envs[i]
  end
end
if #set > 0 then
  redis.call('HSET', KEYS[9], unpack(set))
  redis.call('ZADD', KEYS[2], unpack(leased))
end
return out
"#;

const SETTLE_LUA: &str = r#"
-- KEYS: leased, scheduled, dead, stats, pending, state, error, finished, data, attempts, crashes
-- ARGV: finished-before ms (older finished jobs are forgotten), then per job: id, the state
--       entry of its lease, its state entry after, attempt, s|r|p|d (p: a retry after a panic,
--       which counts as a crash), retry-at ms, error, finished ms
local forget = ARGV[1]
local ids = {}
for i = 2, #ARGV, 8 do ids[#ids + 1] = ARGV[i] end
local states = redis.call('HMGET', KEYS[6], unpack(ids))
local done, failed = 0, 0
local set, tries, errs, unleased, retry, dead, gone = {}, {}, {}, {}, {}, {}, {}
for n, id in ipairs(ids) do
  local i = 2 + (n - 1) * 8
  local lease, after, a, o = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  -- Only the lease this worker was given counts: one that ran out may have been taken by
  -- another worker since.
  local mine = states[n] == lease
  if not mine and states[n] == 'pending' .. string.sub(lease, 8) then
    -- Its lease ran out and it went back in line, but nobody took it yet: this result stands.
    mine = redis.call('LREM', KEYS[5], 1, id) == 1
  end
  if mine then
    unleased[#unleased + 1] = id
    if o == 's' then
      done = done + 1
      gone[#gone + 1] = id
    else
      set[#set + 1] = id
      set[#set + 1] = after
      tries[#tries + 1] = id
      tries[#tries + 1] = a
      failed = failed + 1
      errs[#errs + 1] = id
      errs[#errs + 1] = ARGV[i + 6]
      if o == 'r' or o == 'p' then
        retry[#retry + 1] = ARGV[i + 5]
        retry[#retry + 1] = id
        if o == 'p' then redis.call('HINCRBY', KEYS[11], id, 1) end
      else
        dead[#dead + 1] = ARGV[i + 7]
        dead[#dead + 1] = id
      end
    end
  end
end
if #unleased > 0 then redis.call('ZREM', KEYS[1], unpack(unleased)) end
if #set > 0 then
  redis.call('HSET', KEYS[6], unpack(set))
  redis.call('HSET', KEYS[10], unpack(tries))
  redis.call('HSET', KEYS[7], unpack(errs))
end
if #retry > 0 then redis.call('ZADD', KEYS[2], unpack(retry)) end
if #dead > 0 then redis.call('ZADD', KEYS[3], unpack(dead)) end
-- A succeeded job is done with the broker: the history database answers for it from now on.
if #gone > 0 then
  for _, k in ipairs({KEYS[6], KEYS[9], KEYS[10], KEYS[7], KEYS[11]}) do redis.call('HDEL', k, unpack(gone)) end
end
if done > 0 then redis.call('HINCRBY', KEYS[4], 'done', done) end
if failed > 0 then redis.call('HINCRBY', KEYS[4], 'failed', failed) end

-- Canceled jobs are kept an hour for look-ups, then forgotten, a slice at a time.
local old = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', forget, 'LIMIT', 0, 200)
if #old > 0 then
  redis.call('ZREM', KEYS[8], unpack(old))
  redis.call('HDEL', KEYS[6], unpack(old))
  redis.call('HDEL', KEYS[7], unpack(old))
  redis.call('HDEL', KEYS[9], unpack(old))
  redis.call('HDEL', KEYS[10], unpack(old))
  redis.call('HDEL', KEYS[11], unpack(old))
end
return 0
"#;

const RELEASE_LUA: &str = r#"
-- KEYS: leased, pending, state; ARGV: per job: id, the state entry of its lease
-- Jobs leased but never started go back to the front of the line, their attempt uncounted.
for i = #ARGV - 1, 1, -2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[3], id) == ARGV[i + 1] then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HSET', KEYS[3], id, 'pending|||')
    redis.call('RPUSH', KEYS[2], id)
  end
end
return 0
"#;

const RENEW_LUA: &str = r#"
-- KEYS: leased, workers; ARGV: new deadline ms, worker, ids...
local deadline = ARGV[1]
redis.call('ZADD', KEYS[2], deadline, ARGV[2])
local args = {}
for i = 3, #ARGV do
  args[#args + 1] = deadline
  args[#args + 1] = ARGV[i]
end
if #args > 0 then redis.call('ZADD', KEYS[1], 'XX', unpack(args)) end
return 0
"#;

const CANCEL_LUA: &str = r#"
-- KEYS: pending, scheduled, state, finished; ARGV: id, now ms.
-- Returns the status before ('' if unknown).
local id, now = ARGV[1], ARGV[2]
local cur = redis.call('HGET', KEYS[3], id)
if not cur then return '' end
local s = string.match(cur, '^(%a+)|') or ''
if s == 'pending' then
  -- Not in the list: a blocked worker moved it to its claim list; the fetch skips it there.
  redis.call('LREM', KEYS[1], 1, id)
elseif s == 'scheduled' or s == 'retrying' then
  redis.call('ZREM', KEYS[2], id)
else
  return s
end
redis.call('HSET', KEYS[3], id, 'canceled|||' .. now)
redis.call('ZADD', KEYS[4], now, id)
return s
"#;

const REVIVE_LUA: &str = r#"
-- KEYS: dead, state, data, crashes, pending
-- ARGV: per job: id, its state entry as read (the script acts only if it is unchanged), its
--       revived envelope
-- Dead jobs join the line like new ones, with a fresh attempt budget; their attempt count and
-- last error stay. Returns how many.
local n = 0
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[2], id) == ARGV[i + 1] and redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('HSET', KEYS[3], id, ARGV[i + 2])
    redis.call('HSET', KEYS[2], id, 'pending|||')
    redis.call('HDEL', KEYS[4], id)
    redis.call('LPUSH', KEYS[5], id)
    n = n + 1
  end
end
return n
"#;

const DISCARD_LUA: &str = r#"
-- KEYS: dead, state, data, attempts, error, crashes; ARGV: ids
-- Forgets dead jobs (the history database keeps their record). Returns how many.
local n = 0
for _, id in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    for k = 2, 6 do redis.call('HDEL', KEYS[k], id) end
    n = n + 1
  end
end
return n
"#;
