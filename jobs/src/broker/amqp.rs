//! drover's RabbitMQ broker.
//!
//! Layout, for prefix `P` and queue `q` (all queues durable, on the default exchange; classic, or
//! quorum with [`QueueType::Quorum`]):
//!
//! | queue | holds |
//! |---|---|
//! | `P.q` | jobs ready to run; classic: `x-max-priority` 10. **KEDA's `rabbitmq` scaler reads its ready count (`queueName: P.q`).** |
//! | `P.q.delay.<k>`, k = 0..=24 | delayed jobs and retries. Each queue has one `x-message-ttl` of 100 ms · 2^k and dead-letters expired messages back into `P.q`. |
//! | `P.q.dead` | the dead set: jobs out of attempts or failed beyond retrying, error in header `x-drover-error` |
//!
//! A message's body is the [`Job`] envelope as JSON, with `attempt` = attempts already made; it
//! is persistent, its `message_id` is the job id. Every publish waits for RabbitMQ's confirm, so
//! a push never reports a job RabbitMQ does not have.
//!
//! **Delays without a plugin.** A job due in `d` ms goes to the delay queue of the largest `k`
//! with 100 ms · 2^k ≤ `d`. Since every message in a delay queue has the same TTL, the head
//! always expires first: no head-of-line blocking, no per-message TTL. When an expired message
//! reaches a consumer still early, the consumer sends it down the next level the same way (each
//! hop at least halves what is left) and keeps the last < 100 ms in memory, so a job is never
//! delivered more than 5 ms early and typically within a few milliseconds of its time.
//!
//! **Job state.** RabbitMQ cannot look a message up, so `get`, `cancel` and the running / done /
//! failed counts read the history database the API and workers write in batches. A cancel
//! marks the job there at once and announces it on the fanout exchange `P.canceled`
//! (confirmed), to which every consuming process listens with a queue of its own; consumers
//! drop canceled jobs as they arrive. A process that missed a notice (disconnected) learns of
//! the cancel when it next reads the canceled ids from the database (every
//! [`CANCELED_REFRESH`]). Guarantee: a job canceled before RabbitMQ delivers it to a consumer
//! never runs; one already delivered — in a worker's prefetch buffer — may still run, as on
//! the other brokers a job already leased does.
//!
//! **Dead set.** The dead queue is the dead set: `dead` reads it (messages taken
//! unacknowledged on a channel of their own, which go back in order when it closes), newest
//! first among its oldest [`DEAD_SCAN_MAX`]; retrying publishes a revived copy to `P.q`
//! (confirmed) before acknowledging the dead message; discarding all purges the queue.
//!
//! **Leases and crashes.** RabbitMQ keeps an unacknowledged message with its consumer until the
//! consumer's channel closes (worker crash, connection loss), then requeues it flagged
//! `redelivered`: that is the visibility timeout, so `renew` has nothing to do. A redelivered
//! message is never run as it is: the consumer publishes a copy (confirmed) whose envelope
//! counts the crash (`crashes`, and the lost attempt), acknowledges the original, and runs the
//! copy when it comes round — or sends it to the dead set once `quarantine_after` workers died
//! holding it. Releases at shutdown publish such a copy too (with the attempt given back), so a
//! requeue means a crash. RabbitMQ's `consumer_timeout` (30 min by default) closes the channel
//! of a consumer that holds a message longer: raise it above the longest job's timeout, or the
//! job counts as crashing its worker.
//!
//! **Idempotency keys** live in the history database's `idempotency_key` table, whose primary
//! key (queue, key) makes a claim atomic across API replicas; a key maps to its first job for
//! [`IDEMPOTENCY_WINDOW`] (24 h, as on Redis and SQLite) and is given back if the publish fails.
//! A push with a key therefore needs the database (503 while it is down); pushes without one
//! touch only RabbitMQ.
//!
//! **Priorities.** drover's priority `p` maps to RabbitMQ's `clamp(p, −5, 5) + 5` on a queue
//! with `x-max-priority` 10 (0 → 5; jobs more than 5 apart from 0 share the top or bottom
//! level). RabbitMQ orders only the messages still in the queue: up to twice the prefetch per
//! worker are already delivered in arrival order. A classic queue declared by an older drover
//! without `x-max-priority` keeps working, without priorities, until it is deleted.
//!
//! **Quorum queues** (`DROVER_AMQP_QUEUE_TYPE=quorum`, for a RabbitMQ cluster) replicate every
//! queue with Raft. They give up priorities (RabbitMQ before 4.0 has none on quorum queues);
//! delay queues keep their per-queue `x-message-ttl` (quorum queues have it since 3.10) and
//! dead-letter at-least-once (`x-dead-letter-strategy`, with `x-overflow: reject-publish`).
//! A queue's type is fixed when it is first declared: switching an existing deployment means
//! draining and deleting its queues.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use chrono::Utc;
use futures::{
    FutureExt, StreamExt,
    future::{BoxFuture, join_all},
};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, ExchangeKind,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
    },
    protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError},
    types::{AMQPValue, FieldTable, ShortString},
    uri::AMQPUri,
};
use sea_orm::DatabaseConnection;
use tokio::time::Instant;

use super::{
    BrokerError, CancelOutcome, ConsumerConfig, DeadOutcome, Driver, Enqueued, Producer, QueueStats,
};
use crate::{
    job::{Job, JobId, JobRecord, JobState, Outcome, Settlement, now_ms},
    queue::QueueName,
};

/// Delay queues per drover queue: 100 ms · 2^24 ≈ 19 days is the longest single hop.
const DELAY_LEVELS: usize = 25;
/// TTL of delay queue 0; below it a consumer waits in memory instead.
const DELAY_BASE_MS: i64 = 100;
/// A job due within this many milliseconds counts as due.
const DUE_SLACK_MS: i64 = 5;
/// Longest wait for a TCP + AMQP handshake; RabbitMQ down should be a quick 503, not a hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for any other answer from RabbitMQ (a confirm, a declare, opening a channel).
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat asked for when the URL names none (RabbitMQ proposes 60 s): a dead peer is noticed
/// within about two of them, and the next call dials again.
const HEARTBEAT_S: u16 = 10;
/// How often consumers refresh the canceled set from the history database: the fallback for
/// cancel notices a process missed (it was disconnected when they were sent).
const CANCELED_REFRESH: Duration = Duration::from_secs(1);
/// How far back the canceled set reaches when a process starts, and how long an id stays in it:
/// a delayed job canceled longer ago than this before it falls due is not recognized.
const CANCELED_MEMORY: chrono::TimeDelta = chrono::TimeDelta::hours(24);
/// Each refresh re-reads this much before the previous one, covering clock skew between the API
/// and the workers and history batches committed late.
const CANCELED_OVERLAP: chrono::TimeDelta = chrono::TimeDelta::seconds(30);
/// Idle publishing channels kept per process.
const POOLED_CHANNELS: usize = 16;
/// Messages per publishing channel in one go; bigger batches spread over several channels.
const PUBLISH_CHUNK: usize = 1_000;
/// drover priorities −5..=5 map onto RabbitMQ levels 0..=10 (`x-max-priority` 10).
const PRIORITY_SPAN: i32 = 5;
/// How long an idempotency key maps to its first job (as on Redis and SQLite).
const IDEMPOTENCY_WINDOW: chrono::TimeDelta = chrono::TimeDelta::hours(24);
/// How often a process deletes expired idempotency keys (at a push with a key).
const IDEMPOTENCY_CLEANUP_EVERY_MS: i64 = 600_000;
/// Dead messages read at most to list a dead set (newest first among these) or find one job.
const DEAD_SCAN_MAX: usize = 10_000;
/// Dead messages moved per round when retrying a whole dead set.
const DEAD_SLICE: usize = 500;
/// Header of dead messages carrying the last error.
const ERROR_HEADER: &str = "x-drover-error";
const MAX_ERROR_BYTES: usize = 8 * 1024;
/// Room left for `.delay.24` and the queue name within AMQP's 255-byte names.
const MAX_PREFIX_BYTES: usize = 128;
/// Low bits of a receipt holding the delivery tag; the high bits hold the consumer channel's
/// generation, so a tag from a channel that has since closed is never acknowledged on its
/// successor (where the same number names another message).
const TAG_BITS: u32 = 48;
/// The error of a job whose worker died on its last attempt (as on Redis and SQLite).
const LEASE_EXPIRED: &str = "lease expired: the worker running it stopped responding";

impl From<lapin::Error> for BrokerError {
    fn from(e: lapin::Error) -> Self {
        use lapin::ErrorKind as K;
        let unavailable = match e.kind() {
            // Refusals that retrying will not fix: credentials, permissions, a queue declared
            // elsewhere with other arguments, a vhost that does not exist.
            K::ProtocolError(amqp) => !matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED | AMQPSoftError::PRECONDITIONFAILED)
                    | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH)
            ),
            K::InvalidProtocolVersion(_)
            | K::ParsingError(_)
            | K::SerialisationError(_)
            | K::AuthProviderError(_)
            | K::FutureCompleted
            | K::NoDefaultRuntime => false,
            // IO errors, missed heartbeats, closed connections and channels.
            _ => true,
        };
        if unavailable {
            BrokerError::Unavailable(format!("rabbitmq: {e}"))
        } else {
            BrokerError::Other(format!("rabbitmq: {e}"))
        }
    }
}

fn history_error(e: schema::DbError) -> BrokerError {
    BrokerError::Unavailable(format!("history database: {e}"))
}

/// The same error again, for each of several messages that failed together.
fn same_error(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::Unavailable(m) => BrokerError::Unavailable(m.clone()),
        BrokerError::UnsupportedUrl(m) => BrokerError::UnsupportedUrl(m.clone()),
        BrokerError::Corrupt(m) => BrokerError::Corrupt(m.clone()),
        BrokerError::Other(m) => BrokerError::Other(m.clone()),
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Runs one exchange with RabbitMQ, giving up after [`RPC_TIMEOUT`].
async fn timed<T>(what: &str, fut: impl Future<Output = lapin::Result<T>>) -> Result<T, BrokerError> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(res) => res.map_err(Into::into),
        Err(_) => Err(BrokerError::Unavailable(format!(
            "rabbitmq: {what} got no answer within {RPC_TIMEOUT:?}"
        ))),
    }
}

/// The delay queue for a job due in `remaining_ms`: the longest TTL that does not overshoot.
fn delay_level(remaining_ms: i64) -> Option<usize> {
    if remaining_ms < DELAY_BASE_MS {
        return None;
    }
    // 100 · 2^k ≤ remaining  ⇔  2^k ≤ ⌊remaining / 100⌋, as 2^k is an integer.
    let ratio = (remaining_ms / DELAY_BASE_MS) as u64;
    Some((ratio.ilog2() as usize).min(DELAY_LEVELS - 1))
}

fn delay_ttl_ms(level: usize) -> i64 {
    DELAY_BASE_MS << level
}

fn receipt(generation: u64, delivery_tag: u64) -> u64 {
    (generation << TAG_BITS) | (delivery_tag & ((1 << TAG_BITS) - 1))
}

fn delivery_tag(receipt: u64) -> u64 {
    receipt & ((1 << TAG_BITS) - 1)
}

/// The kind of RabbitMQ queue drover declares (`DROVER_AMQP_QUEUE_TYPE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueType {
    /// Classic queues with priorities (`x-max-priority` 10): one node, or mirrored by policy.
    #[default]
    Classic,
    /// Quorum queues, replicated across a RabbitMQ cluster (Raft). They give up priorities
    /// (RabbitMQ before 4.0 ignores them on quorum queues); delay queues dead-letter
    /// at-least-once.
    Quorum,
}

impl std::str::FromStr for QueueType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "classic" => Ok(Self::Classic),
            "quorum" => Ok(Self::Quorum),
            _ => Err(format!("AMQP queue type {s:?}: expected classic or quorum")),
        }
    }
}

impl QueueType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// Queue names of one drover queue.
#[derive(Debug)]
struct Names {
    main: String,
    dead: String,
    delays: Vec<String>,
}

impl Names {
    fn new(prefix: &str, q: &QueueName) -> Self {
        let main = format!("{prefix}.{q}");
        Self {
            dead: format!("{main}.dead"),
            delays: (0..DELAY_LEVELS).map(|k| format!("{main}.delay.{k}")).collect(),
            main,
        }
    }

    /// Where a job due in `remaining_ms` waits.
    fn for_remaining(&self, remaining_ms: i64) -> &str {
        delay_level(remaining_ms).map_or(&self.main, |k| &self.delays[k])
    }

    /// Main, dead, then the delay queues in order.
    fn all(&self) -> impl Iterator<Item = &str> {
        [self.main.as_str(), self.dead.as_str()]
            .into_iter()
            .chain(self.delays.iter().map(String::as_str))
    }
}

/// Declares a drover queue's main, dead and delay queues (idempotent while the arguments match).
/// `priorities` is false only for a classic main queue declared before drover used them.
async fn declare_queues(
    channel: &Channel,
    names: &Names,
    queue_type: QueueType,
    priorities: bool,
) -> lapin::Result<()> {
    let durable = QueueDeclareOptions::durable();
    // Explicit, so a vhost whose default queue type is quorum gets the same semantics.
    let typed = || {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(queue_type.as_str().into()),
        );
        args
    };
    let mut main = typed();
    if queue_type == QueueType::Classic && priorities {
        main.insert(
            "x-max-priority".into(),
            AMQPValue::ShortShortUInt(2 * PRIORITY_SPAN as u8),
        );
    }
    channel
        .queue_declare(names.main.as_str().into(), durable, main)
        .await?;
    channel
        .queue_declare(names.dead.as_str().into(), durable, typed())
        .await?;
    for (k, name) in names.delays.iter().enumerate() {
        let mut args = typed();
        if queue_type == QueueType::Quorum {
            // Quorum queues dead-letter at most once unless told otherwise; an expired delayed
            // job must not be lost on its way to the main queue.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay_ttl_ms(k)));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(names.main.as_str().into()),
        );
        channel.queue_declare(name.as_str().into(), durable, args).await?;
    }
    Ok(())
}

/// RabbitMQ's priority for drover's: 0 (the default) is the middle level, and each step up or
/// down is one level, up to [`PRIORITY_SPAN`] either way; beyond that jobs share the top or
/// bottom level.
fn amqp_priority(priority: i32) -> u8 {
    (priority.clamp(-PRIORITY_SPAN, PRIORITY_SPAN) + PRIORITY_SPAN) as u8
}

/// Properties of every message drover publishes.
fn properties(job: Option<&Job>, error: Option<&str>) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_timestamp(now_ms().max(0) as u64 / 1_000);
    if let Some(job) = job {
        props = props
            .with_message_id(job.id.to_string().into())
            .with_priority(amqp_priority(job.priority));
    }
    if let Some(error) = error {
        let mut end = error.len().min(MAX_ERROR_BYTES);
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        let mut headers = FieldTable::default();
        headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(error[..end].into()));
        props = props.with_headers(headers);
    }
    props
}

fn envelope(job: &Job) -> Result<Vec<u8>, BrokerError> {
    serde_json::to_vec(job).map_err(|e| BrokerError::Other(format!("job {}: {e}", job.id)))
}

/// One message to publish on the default exchange.
struct Outgoing {
    queue: QueueName,
    routing_key: String,
    body: Vec<u8>,
    props: BasicProperties,
}

enum PublishFailure {
    /// RabbitMQ had no queue by that name: it was deleted, or RabbitMQ lost its definitions.
    Unroutable,
    /// The connection or channel failed under the publish.
    Lost(BrokerError),
    Broker(BrokerError),
}

/// One connection, dialed on first use and again whenever it has closed or failed.
struct Link {
    uri: AMQPUri,
    name: String,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl Link {
    fn new(uri: AMQPUri, name: String) -> Self {
        Self {
            uri,
            name,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    async fn connection(&self) -> Result<Arc<Connection>, BrokerError> {
        // One dial at a time; callers arriving meanwhile get its result.
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref()
            && c.status().connected()
        {
            return Ok(c.clone());
        }
        *conn = None;
        let props = ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let dialed = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(self.uri.clone(), props))
            .await
            .map_err(|_| {
                BrokerError::Unavailable(format!(
                    "rabbitmq: no connection to {}:{} within {CONNECT_TIMEOUT:?}",
                    self.uri.authority.host, self.uri.authority.port
                ))
            })??;
        tracing::info!(connection = %self.name, "connected to RabbitMQ");
        let dialed = Arc::new(dialed);
        *conn = Some(dialed.clone());
        Ok(dialed)
    }
}

/// A publishing channel in confirm mode, and the connection it lives on.
struct Pooled {
    channel: Channel,
    _conn: Arc<Connection>,
}

impl Pooled {
    fn usable(&self) -> bool {
        self.channel.status().connected()
    }
}

/// The producer side, shared by the whole process (clone it freely).
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    prefix: String,
    db: DatabaseConnection,
    /// Publishes: pushes, retries, dead jobs, delay hops. Kept apart from consumers because
    /// RabbitMQ throttles a publishing connection under memory pressure (flow control), which
    /// must not hold back the acks that free that memory.
    publisher: Link,
    /// Every consumer channel of this process.
    consumer: Link,
    pool: Mutex<Vec<Pooled>>,
    /// Queues whose RabbitMQ queues this process has declared.
    declared: Mutex<HashSet<QueueName>>,
    names: Mutex<HashMap<QueueName, Arc<Names>>>,
    /// Ids of canceled jobs, with when this process learned of them (epoch ms).
    canceled: Mutex<HashMap<JobId, i64>>,
    refresher: AtomicBool,
    queue_type: QueueType,
    /// When this process last deleted expired idempotency keys (epoch ms).
    keys_cleaned_ms: std::sync::atomic::AtomicI64,
}

impl AmqpBroker {
    /// Checks the URL and prefix; connects lazily, so drover starts (and reports not ready)
    /// while RabbitMQ is down. `amqps://` needs a TLS feature of lapin, not enabled in this build.
    pub async fn connect(
        url: &str,
        prefix: &str,
        db: DatabaseConnection,
        queue_type: QueueType,
    ) -> Result<Self, BrokerError> {
        let mut uri: AMQPUri = url
            .parse()
            .map_err(|e| BrokerError::Other(format!("amqp URL: {e}")))?;
        uri.query.heartbeat.get_or_insert(HEARTBEAT_S);
        if prefix.is_empty() || prefix.len() > MAX_PREFIX_BYTES {
            return Err(BrokerError::Other(format!(
                "amqp queue prefix {prefix:?} must be 1 to {MAX_PREFIX_BYTES} bytes long"
            )));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                prefix: prefix.to_owned(),
                db,
                publisher: Link::new(uri.clone(), format!("drover {prefix} publisher")),
                consumer: Link::new(uri, format!("drover {prefix} consumers")),
                pool: Mutex::default(),
                declared: Mutex::default(),
                names: Mutex::default(),
                canceled: Mutex::default(),
                refresher: AtomicBool::new(false),
                queue_type,
                keys_cleaned_ms: Default::default(),
            }),
        })
    }

    fn names(&self, q: &QueueName) -> Arc<Names> {
        let mut names = self.inner.names.lock().expect("names poisoned");
        names
            .entry(q.clone())
            .or_insert_with(|| Arc::new(Names::new(&self.inner.prefix, q)))
            .clone()
    }

    async fn take_channel(&self) -> Result<Pooled, BrokerError> {
        loop {
            let pooled = self.inner.pool.lock().expect("pool poisoned").pop();
            match pooled {
                Some(p) if p.usable() => return Ok(p),
                // Closed with its connection, or by a channel error: forget it.
                Some(_) => continue,
                None => break,
            }
        }
        let conn = self.inner.publisher.connection().await?;
        let channel = timed("opening a channel", async {
            let channel = conn.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok(channel)
        })
        .await?;
        Ok(Pooled { channel, _conn: conn })
    }

    fn give_back(&self, pooled: Pooled) {
        let mut pool = self.inner.pool.lock().expect("pool poisoned");
        if pooled.usable() && pool.len() < POOLED_CHANNELS {
            pool.push(pooled);
        }
    }

    async fn ensure_declared(&self, q: &QueueName) -> Result<(), BrokerError> {
        if self.inner.declared.lock().expect("declared poisoned").contains(q) {
            return Ok(());
        }
        let names = self.names(q);
        let queue_type = self.inner.queue_type;
        let pooled = self.take_channel().await?;
        match timed(
            "declaring queues",
            declare_queues(&pooled.channel, &names, queue_type, true),
        )
        .await
        {
            Ok(()) => self.give_back(pooled),
            // A classic main queue declared by an older drover has no `x-max-priority`, and
            // RabbitMQ cannot add it: keep the queue as it is (the refusal closed the channel).
            Err(BrokerError::Other(e)) if queue_type == QueueType::Classic && e.contains("PRECONDITION") => {
                tracing::warn!(
                    queue = %names.main,
                    "RabbitMQ queue exists without x-max-priority: priorities are ignored on it \
                     until it is deleted and declared again"
                );
                let pooled = self.take_channel().await?;
                timed(
                    "declaring queues",
                    declare_queues(&pooled.channel, &names, queue_type, false),
                )
                .await?;
                self.give_back(pooled);
            }
            Err(e) => return Err(e),
        }
        self.inner
            .declared
            .lock()
            .expect("declared poisoned")
            .insert(q.clone());
        Ok(())
    }

    /// Makes the next use of `q` declare its queues again.
    fn forget(&self, q: &QueueName) {
        self.inner.declared.lock().expect("declared poisoned").remove(q);
    }

    /// Publishes every message, waiting for all confirms together; one result per message.
    async fn publish_each(&self, msgs: &[Outgoing]) -> Vec<Result<(), BrokerError>> {
        if msgs.is_empty() {
            return Vec::new();
        }
        let queues: HashSet<&QueueName> = msgs.iter().map(|m| &m.queue).collect();
        for q in queues {
            if let Err(e) = self.ensure_declared(q).await {
                return msgs.iter().map(|_| Err(same_error(&e))).collect();
            }
        }
        let mut results: Vec<Option<Result<(), PublishFailure>>> = msgs.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..msgs.len()).collect();
        for round in 0..2 {
            let batch: Vec<&Outgoing> = pending.iter().map(|&i| &msgs[i]).collect();
            let mut again = Vec::new();
            let mut vanished: HashSet<&QueueName> = HashSet::new();
            for (i, r) in pending.into_iter().zip(self.publish_chunked(&batch).await) {
                match r {
                    // Once more: a queue that vanished is declared again first, and a connection
                    // that died since the channel's last use is dialed again (a message that had
                    // reached RabbitMQ before its confirm was lost is then stored twice, as when
                    // a client retries).
                    Err(PublishFailure::Unroutable) if round == 0 => {
                        vanished.insert(&msgs[i].queue);
                        again.push(i);
                    }
                    Err(PublishFailure::Lost(_)) if round == 0 => again.push(i),
                    r => results[i] = Some(r),
                }
            }
            for q in vanished {
                tracing::warn!(queue = %q, "RabbitMQ queue missing: declaring it again");
                self.forget(q);
                if let Err(e) = self.ensure_declared(q).await {
                    for &i in &again {
                        results[i] = Some(Err(PublishFailure::Broker(same_error(&e))));
                    }
                    again.clear();
                    break;
                }
            }
            if again.is_empty() {
                break;
            }
            pending = again;
        }
        results
            .into_iter()
            .zip(msgs)
            .map(
                |(r, m)| match r.expect("every message has a result after the last round") {
                    Ok(()) => Ok(()),
                    Err(PublishFailure::Unroutable) => Err(BrokerError::Unavailable(format!(
                        "rabbitmq: no queue {} to route to",
                        m.routing_key
                    ))),
                    Err(PublishFailure::Lost(e) | PublishFailure::Broker(e)) => Err(e),
                },
            )
            .collect()
    }

    /// All or nothing: the first failure, if any.
    async fn publish_all(&self, msgs: &[Outgoing]) -> Result<(), BrokerError> {
        self.publish_each(msgs).await.into_iter().collect()
    }

    /// Large batches go out on several channels at once.
    async fn publish_chunked(&self, msgs: &[&Outgoing]) -> Vec<Result<(), PublishFailure>> {
        join_all(
            msgs.chunks(PUBLISH_CHUNK)
                .map(|chunk| self.publish_on_one_channel(chunk)),
        )
        .await
        .into_iter()
        .flatten()
        .collect()
    }

    async fn publish_on_one_channel(&self, msgs: &[&Outgoing]) -> Vec<Result<(), PublishFailure>> {
        let fail_all = |e: BrokerError| {
            msgs.iter()
                .map(|_| Err(PublishFailure::Broker(same_error(&e))))
                .collect()
        };
        let pooled = match self.take_channel().await {
            Ok(p) => p,
            Err(e) => return fail_all(e),
        };
        let channel = &pooled.channel;
        let confirmed = tokio::time::timeout(RPC_TIMEOUT, async {
            // RabbitMQ numbers confirms in the order messages arrive on a channel, and lapin
            // numbers them when a publish is first polled, in the same step that queues its
            // frames. So each publish is polled once, in order, here (this task alone uses the
            // channel); then the frame writes and the confirms are all awaited together rather
            // than one round trip per message.
            let mut sends = Vec::with_capacity(msgs.len());
            for m in msgs {
                let opts = BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                };
                let mut send = Box::pin(channel.basic_publish(
                    "".into(),
                    m.routing_key.as_str().into(),
                    opts,
                    &m.body,
                    m.props.clone(),
                ));
                let first = futures::poll!(send.as_mut());
                sends.push((send, first));
            }
            join_all(sends.into_iter().map(|(send, first)| async move {
                let confirm = match first {
                    std::task::Poll::Ready(sent) => sent,
                    std::task::Poll::Pending => send.await,
                };
                confirm?.await
            }))
            .await
        })
        .await;
        let Ok(confirmed) = confirmed else {
            return fail_all(BrokerError::Unavailable(format!(
                "rabbitmq: {} messages not confirmed within {RPC_TIMEOUT:?}",
                msgs.len()
            )));
        };
        let healthy = confirmed.iter().all(Result::is_ok);
        let out = confirmed
            .into_iter()
            .map(|c| match c {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(_))) => Err(PublishFailure::Unroutable),
                Ok(Confirmation::Nack(_)) => Err(PublishFailure::Broker(BrokerError::Unavailable(
                    "rabbitmq refused to store a message (nack)".into(),
                ))),
                Ok(Confirmation::NotRequested) => Err(PublishFailure::Broker(BrokerError::Other(
                    "rabbitmq: publisher confirms are off on this channel".into(),
                ))),
                Err(e) => Err(PublishFailure::Lost(e.into())),
            })
            .collect();
        if healthy {
            self.give_back(pooled);
        }
        out
    }

    /// The key's table row: `prefix.queue`, so that brokers of different prefixes sharing a
    /// database keep apart.
    fn key_scope(&self, q: &QueueName) -> String {
        format!("{}.{q}", self.inner.prefix)
    }

    /// Claims `job`'s idempotency key in the database; `Some(first)` if another job holds it.
    async fn claim_key(&self, job: &Job, key: &str) -> Result<Option<JobId>, BrokerError> {
        let now = Utc::now();
        let holder = schema::idempotency::claim(
            &self.inner.db,
            &self.key_scope(&job.queue),
            key,
            job.id.0,
            now,
            now + IDEMPOTENCY_WINDOW,
        )
        .await
        .map_err(history_error)?;
        Ok(holder.filter(|h| *h != job.id.0).map(JobId))
    }

    /// Gives back keys claimed for jobs whose push failed (best effort: a key left behind
    /// answers with a job RabbitMQ never stored until it expires, so say so).
    async fn release_keys(&self, claimed: &[(QueueName, String, JobId)]) {
        for (q, key, id) in claimed {
            if let Err(e) = schema::idempotency::release(&self.inner.db, &self.key_scope(q), key, id.0).await
            {
                tracing::error!(queue = %q, job.id = %id, error = %e, "could not give back the idempotency key of a failed push");
            }
        }
    }

    /// Deletes expired idempotency keys, at most every ten minutes per process, in the background.
    fn maybe_clean_keys(&self) {
        let now = now_ms();
        let last = self.inner.keys_cleaned_ms.load(Ordering::Relaxed);
        if now - last < IDEMPOTENCY_CLEANUP_EVERY_MS
            || self
                .inner
                .keys_cleaned_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let db = self.inner.db.clone();
        tokio::spawn(async move {
            if let Err(e) = schema::idempotency::delete_expired(&db, Utc::now()).await {
                tracing::warn!(error = %e, "deleting expired idempotency keys failed");
            }
        });
    }

    fn is_canceled(&self, id: JobId) -> bool {
        self.inner
            .canceled
            .lock()
            .expect("canceled poisoned")
            .contains_key(&id)
    }

    /// Starts the process's canceled-set refresher and the listener for cancel notices, once;
    /// they end with the broker.
    fn start_refresher(&self) {
        if !self.inner.refresher.swap(true, Ordering::SeqCst) {
            tokio::spawn(refresh_canceled(Arc::downgrade(&self.inner)));
            tokio::spawn(listen_for_cancels(Arc::downgrade(&self.inner)));
        }
    }

    /// Tells every consuming process of this prefix that `id` was canceled: a message on the
    /// fanout exchange `P.canceled`, confirmed. Cuts the window in which a canceled job may
    /// still start from a refresh interval to a message's trip.
    async fn announce_cancel(&self, id: JobId) -> Result<(), BrokerError> {
        let pooled = self.take_channel().await?;
        let exchange = cancel_exchange(&self.inner.prefix);
        let confirm = timed("announcing a cancel", async {
            declare_cancel_exchange(&pooled.channel, &exchange).await?;
            pooled
                .channel
                .basic_publish(
                    exchange.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    id.to_string().as_bytes(),
                    BasicProperties::default(),
                )
                .await?
                .await
        })
        .await?;
        self.give_back(pooled);
        match confirm {
            Confirmation::Ack(_) => Ok(()),
            other => Err(BrokerError::Unavailable(format!(
                "rabbitmq did not confirm a cancel notice: {other:?}"
            ))),
        }
    }
}

fn cancel_exchange(prefix: &str) -> String {
    format!("{prefix}.canceled")
}

async fn declare_cancel_exchange(channel: &Channel, name: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Fanout,
            // Notices matter only to processes listening now; the exchange goes with the last
            // listener's queue (and with `destroy`).
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Receives cancel notices on a queue of this process's own (exclusive, deleted with its
/// channel) bound to `P.canceled`, and adds their ids to the canceled set; resubscribes after
/// a failure. Notices sent while it is down are covered by the database refresh.
async fn listen_for_cancels(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let exchange = cancel_exchange(&strong.prefix);
        let subscribed = async {
            let conn = strong.consumer.connection().await?;
            timed("subscribing to cancel notices", async {
                let channel = conn.create_channel().await?;
                declare_cancel_exchange(&channel, &exchange).await?;
                let queue = channel
                    .queue_declare(
                        "".into(),
                        QueueDeclareOptions {
                            exclusive: true,
                            auto_delete: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .queue_bind(
                        queue.name().clone(),
                        exchange.as_str().into(),
                        "".into(),
                        Default::default(),
                        FieldTable::default(),
                    )
                    .await?;
                let consumer = channel
                    .basic_consume(
                        queue.name().clone(),
                        "".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                Ok((channel, consumer, conn.clone()))
            })
            .await
        }
        .await;
        drop(strong);
        let (_channel, mut consumer, _conn) = match subscribed {
            Ok(s) => s,
            Err(_) => {
                // RabbitMQ is down: the refresher covers cancels meanwhile.
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            // Wakes up now and then to notice that the broker is gone.
            let next = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await;
            let Some(inner) = inner.upgrade() else { return };
            match next {
                Err(_) => continue,
                Ok(Some(Ok(delivery))) => {
                    let id = std::str::from_utf8(&delivery.data).ok().and_then(JobId::parse);
                    if let Some(id) = id {
                        inner
                            .canceled
                            .lock()
                            .expect("canceled poisoned")
                            .entry(id)
                            .or_insert(now_ms());
                    }
                }
                Ok(_) => break,
            }
        }
    }
}

async fn refresh_canceled(inner: Weak<Inner>) {
    let mut since = Utc::now() - CANCELED_MEMORY;
    let mut tick = tokio::time::interval(CANCELED_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let started = Utc::now();
        match schema::queries::canceled_since(&inner.db, since).await {
            Ok(ids) => {
                let now = now_ms();
                let mut canceled = inner.canceled.lock().expect("canceled poisoned");
                for id in ids {
                    canceled.entry(JobId(id)).or_insert(now);
                }
                let horizon = now - CANCELED_MEMORY.num_milliseconds();
                canceled.retain(|_, learned| *learned >= horizon);
                since = started - CANCELED_OVERLAP;
            }
            Err(e) => {
                if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(error = %e, "reading canceled jobs failed; canceled jobs may run");
                    warned = Some(Instant::now());
                }
            }
        }
    }
}

/// A message read from a dead queue and not yet acknowledged.
struct DeadMessage {
    tag: u64,
    /// `None` for a message whose body is not a job envelope (kept, never retried).
    job: Option<Job>,
    error: Option<String>,
    /// When it was published to the dead queue (epoch ms, second precision).
    at_ms: Option<i64>,
}

impl DeadMessage {
    fn record(&self, q: &QueueName) -> Option<JobRecord> {
        let job = self.job.as_ref()?;
        Some(JobRecord {
            id: job.id,
            queue: q.to_string(),
            kind: job.kind.to_string(),
            status: JobState::Dead,
            attempts: job.attempt,
            max_attempts: job.max_attempts,
            priority: job.priority,
            payload: serde_json::from_str(job.payload.get()).ok(),
            created_at_ms: job.enqueued_at_ms,
            run_at_ms: job.run_at_ms,
            started_at_ms: None,
            finished_at_ms: self.at_ms,
            last_error: self.error.clone(),
            worker_id: None,
            trace_id: job.trace_id.clone(),
        })
    }
}

/// Closes a dead-queue reader: what it took and did not acknowledge goes back, in order.
async fn close_reader(ch: Channel) {
    let _ = tokio::time::timeout(RPC_TIMEOUT, ch.close(200, "done".into())).await;
}

impl AmqpBroker {
    /// The queues where job `id` may sit dead: its queue as the history database knows it,
    /// else every queue this process has used (not declaring others just to look).
    async fn queues_of(&self, id: JobId) -> Result<Vec<QueueName>, BrokerError> {
        let recorded = schema::queries::get_job(&self.inner.db, id.0)
            .await
            .ok()
            .flatten()
            .and_then(|v| QueueName::parse(&v.job.queue).ok());
        Ok(match recorded {
            Some(q) => vec![q],
            None => {
                let declared = self.inner.declared.lock().expect("declared poisoned");
                let mut queues: Vec<QueueName> = declared.iter().cloned().collect();
                queues.sort();
                queues
            }
        })
    }

    /// A channel of its own for reading `q`'s dead queue.
    async fn dead_reader(&self, q: &QueueName) -> Result<Channel, BrokerError> {
        self.ensure_declared(q).await?;
        let conn = self.inner.publisher.connection().await?;
        timed("opening a channel", conn.create_channel()).await
    }

    /// Takes up to `max` messages of `q`'s dead queue, unacknowledged, oldest first.
    async fn read_dead(
        &self,
        ch: &Channel,
        q: &QueueName,
        max: usize,
    ) -> Result<Vec<DeadMessage>, BrokerError> {
        let dead = self.names(q).dead.clone();
        let mut out = Vec::new();
        while out.len() < max {
            let got = timed(
                "reading the dead queue",
                ch.basic_get(
                    dead.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: false },
                ),
            )
            .await?;
            let Some(got) = got else { break };
            let d = got.delivery;
            let error = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get(ERROR_HEADER) {
                    Some(AMQPValue::LongString(v)) => {
                        Some(String::from_utf8_lossy(v.as_bytes()).into_owned())
                    }
                    _ => None,
                });
            out.push(DeadMessage {
                tag: d.delivery_tag,
                job: serde_json::from_slice(&d.data).ok(),
                error,
                at_ms: d.properties.timestamp().map(|t| (t as i64).saturating_mul(1_000)),
            });
        }
        Ok(out)
    }

    /// Publishes revived copies of dead messages to `q` (confirmed), then acknowledges them on
    /// the reader; records the revival in the history database. Returns how many.
    async fn revive_all(
        &self,
        ch: &Channel,
        q: &QueueName,
        msgs: Vec<DeadMessage>,
    ) -> Result<u64, BrokerError> {
        let names = self.names(q);
        let mut tags = Vec::new();
        let mut out = Vec::new();
        for m in &msgs {
            let Some(job) = &m.job else { continue };
            let revived = job.revived(job.attempt);
            tags.push((m.tag, job.id));
            out.push(Outgoing {
                queue: q.clone(),
                routing_key: names.main.clone(),
                body: envelope(&revived)?,
                props: properties(Some(&revived), None),
            });
        }
        let mut revived = Vec::new();
        let mut failure = None;
        for ((tag, id), res) in tags.into_iter().zip(self.publish_each(&out).await) {
            match res {
                Ok(()) => {
                    timed(
                        "acknowledging a dead job",
                        ch.basic_ack(tag, BasicAckOptions::default()),
                    )
                    .await?;
                    revived.push(id.0);
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Err(e) = schema::queries::revive_dead_jobs(&self.inner.db, &revived, Utc::now()).await {
            tracing::warn!(error = %e, "recording retried dead jobs in the history database failed");
        }
        match failure {
            Some(e) if revived.is_empty() => Err(e),
            _ => Ok(revived.len() as u64),
        }
    }
}

fn record_from_row(row: &schema::entity::job::Model) -> Result<JobRecord, BrokerError> {
    let status = row
        .status
        .parse::<JobState>()
        .map_err(|e| BrokerError::Corrupt(format!("job {} in history: {e}", row.id)))?;
    Ok(JobRecord {
        id: JobId(row.id),
        queue: row.queue.clone(),
        kind: row.kind.clone(),
        status,
        attempts: row.attempts.max(0) as u32,
        max_attempts: row.max_attempts.max(0) as u32,
        priority: row.priority,
        payload: row.payload.clone(),
        created_at_ms: row.created_at.timestamp_millis(),
        run_at_ms: row.run_at.map(|t| t.timestamp_millis()),
        started_at_ms: row.started_at.map(|t| t.timestamp_millis()),
        finished_at_ms: row.finished_at.map(|t| t.timestamp_millis()),
        last_error: row.last_error.clone(),
        worker_id: row.worker_id.clone(),
        trace_id: row.trace_id.clone(),
    })
}

#[async_trait]
impl Producer for AmqpBroker {
    async fn push(&self, job: Job) -> Result<Enqueued, BrokerError> {
        let mut out = self.push_batch(vec![job]).await?;
        out.pop()
            .ok_or_else(|| BrokerError::Other("push returned nothing".into()))
    }

    async fn push_batch(&self, mut jobs: Vec<Job>) -> Result<Vec<Enqueued>, BrokerError> {
        let now = now_ms();
        // Keys first, in request order, so that a key repeated within the batch returns the
        // first job of the batch.
        let mut answers: Vec<Enqueued> = jobs
            .iter()
            .map(|j| Enqueued {
                id: j.id,
                duplicate: false,
            })
            .collect();
        let mut claimed = Vec::new();
        for (job, answer) in jobs.iter().zip(&mut answers) {
            let Some(key) = &job.idempotency_key else { continue };
            match self.claim_key(job, key).await {
                Ok(None) => claimed.push((job.queue.clone(), key.clone(), job.id)),
                Ok(Some(first)) => {
                    *answer = Enqueued {
                        id: first,
                        duplicate: true,
                    }
                }
                Err(e) => {
                    self.release_keys(&claimed).await;
                    return Err(e);
                }
            }
        }
        let mut msgs = Vec::with_capacity(jobs.len());
        for (job, answer) in jobs.iter_mut().zip(&answers) {
            if answer.duplicate {
                continue;
            }
            // A new job has made no attempts, whatever the caller's copy says.
            job.attempt = 0;
            let names = self.names(&job.queue);
            msgs.push(Outgoing {
                queue: job.queue.clone(),
                routing_key: names
                    .for_remaining(job.run_at_ms.map_or(0, |at| at - now))
                    .to_owned(),
                body: envelope(job)?,
                props: properties(Some(job), None),
            });
        }
        if let Err(e) = self.publish_all(&msgs).await {
            self.release_keys(&claimed).await;
            return Err(e);
        }
        if !claimed.is_empty() {
            self.maybe_clean_keys();
        }
        Ok(answers)
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, BrokerError> {
        let view = schema::queries::get_job(&self.inner.db, id.0)
            .await
            .map_err(history_error)?;
        view.map(|v| record_from_row(&v.job)).transpose()
    }

    async fn cancel(&self, id: JobId) -> Result<CancelOutcome, BrokerError> {
        use schema::queries::CancelResult;
        let res = schema::queries::cancel_job(&self.inner.db, id.0, Utc::now())
            .await
            .map_err(history_error)?;
        Ok(match res {
            CancelResult::Canceled => {
                // This process's consumers skip it at once; others as soon as the notice
                // reaches them, or at their next refresh should it not.
                self.inner
                    .canceled
                    .lock()
                    .expect("canceled poisoned")
                    .insert(id, now_ms());
                if let Err(e) = self.announce_cancel(id).await {
                    tracing::warn!(job.id = %id, error = %e, "could not announce a cancel; other workers learn of it at their next refresh");
                }
                CancelOutcome::Canceled
            }
            CancelResult::NotFound => CancelOutcome::NotFound,
            CancelResult::NotCancelable(status) => {
                CancelOutcome::NotCancelable(status.parse().unwrap_or(JobState::Running))
            }
        })
    }

    /// `pending`, `scheduled` and `dead` are RabbitMQ's ready counts of the main, delay and dead
    /// queues; `running`, `done` and `failed` come from the history database, where `failed`
    /// counts jobs whose latest attempt failed (retrying or dead), not failed attempts.
    async fn stats(&self, q: &QueueName) -> Result<QueueStats, BrokerError> {
        self.ensure_declared(q).await?;
        let names = self.names(q);
        let pooled = self.take_channel().await?;
        let counted = timed("counting messages", async {
            let mut counts = Vec::with_capacity(2 + DELAY_LEVELS);
            for name in names.all() {
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                let queue = pooled
                    .channel
                    .queue_declare(name.into(), passive, FieldTable::default())
                    .await;
                if let Err(e) = &queue
                    && is_not_found(e)
                {
                    self.forget(q);
                }
                counts.push(u64::from(queue?.message_count()));
            }
            Ok(counts)
        })
        .await?;
        self.give_back(pooled);
        let by_status = schema::queries::count_by_status(&self.inner.db, q.as_str())
            .await
            .map_err(history_error)?;
        let count = |s: JobState| by_status.get(s.as_str()).copied().unwrap_or(0);
        Ok(QueueStats {
            queue: q.to_string(),
            pending: counted[0],
            dead: counted[1],
            scheduled: counted[2..].iter().sum(),
            running: count(JobState::Running),
            done: count(JobState::Succeeded),
            failed: count(JobState::Retrying) + count(JobState::Dead),
        })
    }

    async fn queues(&self) -> Result<Vec<QueueName>, BrokerError> {
        let declared = self.inner.declared.lock().expect("declared poisoned").clone();
        Ok(crate::queue::builtin_and(declared))
    }

    /// Read from the dead queue itself (every message is taken unacknowledged and goes back
    /// when the reading channel closes), newest first among its oldest [`DEAD_SCAN_MAX`].
    async fn dead(&self, q: &QueueName, offset: u64, limit: u64) -> Result<Vec<JobRecord>, BrokerError> {
        let ch = self.dead_reader(q).await?;
        let msgs = self.read_dead(&ch, q, DEAD_SCAN_MAX).await;
        close_reader(ch).await;
        Ok(msgs?
            .iter()
            .rev()
            .filter_map(|m| m.record(q))
            .skip(offset.min(usize::MAX as u64) as usize)
            .take(limit.min(usize::MAX as u64) as usize)
            .collect())
    }

    async fn retry_dead(&self, id: JobId) -> Result<DeadOutcome, BrokerError> {
        for q in self.queues_of(id).await? {
            let ch = self.dead_reader(&q).await?;
            let found = self.read_dead(&ch, &q, DEAD_SCAN_MAX).await;
            let res = match found {
                Ok(msgs) => match msgs
                    .into_iter()
                    .find(|m| m.job.as_ref().is_some_and(|j| j.id == id))
                {
                    Some(m) => self.revive_all(&ch, &q, vec![m]).await.map(|n| n > 0),
                    None => Ok(false),
                },
                Err(e) => Err(e),
            };
            close_reader(ch).await;
            if res? {
                return Ok(DeadOutcome::Done);
            }
        }
        Ok(DeadOutcome::NotFound)
    }

    async fn retry_all_dead(&self, q: &QueueName) -> Result<u64, BrokerError> {
        let mut total = 0;
        loop {
            let ch = self.dead_reader(q).await?;
            let res = match self.read_dead(&ch, q, DEAD_SLICE).await {
                Ok(msgs) if msgs.is_empty() => Ok(0),
                Ok(msgs) => self.revive_all(&ch, q, msgs).await,
                Err(e) => Err(e),
            };
            close_reader(ch).await;
            match res? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    }

    async fn discard_dead(&self, id: JobId) -> Result<DeadOutcome, BrokerError> {
        for q in self.queues_of(id).await? {
            let ch = self.dead_reader(&q).await?;
            let res = match self.read_dead(&ch, &q, DEAD_SCAN_MAX).await {
                Ok(msgs) => match msgs.iter().find(|m| m.job.as_ref().is_some_and(|j| j.id == id)) {
                    Some(m) => timed(
                        "discarding a dead job",
                        ch.basic_ack(m.tag, BasicAckOptions::default()),
                    )
                    .await
                    .map(|()| true),
                    None => Ok(false),
                },
                Err(e) => Err(e),
            };
            close_reader(ch).await;
            if res? {
                return Ok(DeadOutcome::Done);
            }
        }
        Ok(DeadOutcome::NotFound)
    }

    async fn discard_all_dead(&self, q: &QueueName) -> Result<u64, BrokerError> {
        self.ensure_declared(q).await?;
        let pooled = self.take_channel().await?;
        let n = timed(
            "purging a dead queue",
            pooled
                .channel
                .queue_purge(self.names(q).dead.as_str().into(), Default::default()),
        )
        .await?;
        self.give_back(pooled);
        Ok(u64::from(n))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let pooled = self.take_channel().await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        timed(
            "ping",
            pooled.channel.exchange_declare(
                "amq.direct".into(),
                ExchangeKind::Direct,
                passive,
                FieldTable::default(),
            ),
        )
        .await?;
        self.give_back(pooled);
        Ok(())
    }

    async fn driver(&self, q: &QueueName, cfg: &ConsumerConfig) -> Result<Arc<dyn Driver>, BrokerError> {
        self.ensure_declared(q).await?;
        self.start_refresher();
        Ok(Arc::new(AmqpDriver {
            broker: self.clone(),
            queue: q.clone(),
            names: self.names(q),
            consumer_tag: ShortString::try_new(cfg.worker.to_string())
                .map(String::from)
                .unwrap_or_default(),
            // RabbitMQ's prefetch limits unacknowledged messages: those buffered by the backend
            // (at most `prefetch`) *and* those running. With exactly `prefetch`, a full buffer
            // plus running jobs would stall deliveries; twice `prefetch` leaves room for a
            // concurrency up to `prefetch` (the default 100 is above drover's concurrencies), plus
            // jobs held in memory for their last < 100 ms and acks not yet flushed.
            qos: cfg.prefetch.max(1).saturating_mul(2).min(usize::from(u16::MAX)) as u16,
            session: Mutex::new(None),
            intake: tokio::sync::Mutex::default(),
            generations: AtomicU64::new(0),
            quarantine_after: cfg.quarantine_after.max(1),
        }))
    }

    fn depth_source(&self, q: &QueueName) -> String {
        format!("rabbitmq queue {} (messages ready)", self.names(q).main)
    }

    /// Deletes the queues of every queue name this process has used or built in; job state in
    /// the history database is left alone (it belongs to the database, not the broker).
    async fn destroy(&self) -> Result<(), BrokerError> {
        let pooled = self.take_channel().await?;
        timed(
            "deleting the cancel exchange",
            pooled.channel.exchange_delete(
                cancel_exchange(&self.inner.prefix).as_str().into(),
                Default::default(),
            ),
        )
        .await?;
        self.give_back(pooled);
        for q in self.queues().await? {
            let names = self.names(&q);
            let pooled = self.take_channel().await?;
            for name in names.all() {
                // RabbitMQ answers a delete of a missing queue with success.
                timed(
                    "deleting a queue",
                    pooled
                        .channel
                        .queue_delete(name.into(), lapin::options::QueueDeleteOptions::default()),
                )
                .await?;
            }
            self.give_back(pooled);
            self.forget(&q);
        }
        Ok(())
    }
}

/// One worker's consumer on one queue: a channel of its own on the process's consumer connection.
struct AmqpDriver {
    broker: AmqpBroker,
    queue: QueueName,
    names: Arc<Names>,
    consumer_tag: String,
    qos: u16,
    /// The current consumer channel; `None` until the first fetch and after it failed.
    session: Mutex<Option<Arc<Session>>>,
    intake: tokio::sync::Mutex<Intake>,
    generations: AtomicU64,
    quarantine_after: u32,
}

/// One consumer channel and the deliveries it has not yet acknowledged or rejected. Receipts
/// carry the session's generation: those of a closed channel match no session and are void.
struct Session {
    channel: Channel,
    generation: u64,
    ledger: Mutex<Ledger>,
    _conn: Arc<Connection>,
}

/// Where an open delivery (neither acknowledged nor rejected yet) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lease {
    /// Still with the driver: held until due, or being diverted or dropped.
    Intake,
    /// Handed to the worker.
    Worker,
    /// Handed to the worker, and its retry or dead copy is published, so that a settle tried
    /// again acknowledges it without publishing a second copy.
    Republished,
}

/// The open deliveries of one channel, by delivery tag.
///
/// RabbitMQ numbers a channel's deliveries 1, 2, 3, … and `basic.ack` with `multiple` settles
/// every unacknowledged delivery up to a tag at once. The ledger knows which tags are still
/// open, so a batch of acks becomes one `multiple` ack for the tags below the lowest open one
/// (a job still running, a job held until due) and single acks above it. Every ack and reject
/// goes through [`Ledger::plan`] and its frames are queued on the channel before the ledger is
/// unlocked, so a `multiple` ack never reaches RabbitMQ before a single ack it would overtake:
/// RabbitMQ closes the channel on an ack of a tag it no longer holds.
#[derive(Debug, Default)]
struct Ledger {
    open: BTreeMap<u64, Lease>,
}

/// The frames that close out a set of deliveries.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// One ack with `multiple` up to this tag.
    up_to: Option<u64>,
    /// Single acks.
    acks: Vec<u64>,
    /// Single rejects with requeue.
    requeue: Vec<u64>,
}

impl Ledger {
    /// Closes `acks` and `requeue` in the ledger (tags not open are skipped: already settled)
    /// and says which frames to send.
    fn plan(&mut self, acks: &[u64], requeue: &[u64]) -> Plan {
        let mut plan = Plan::default();
        for &tag in requeue {
            if self.open.remove(&tag).is_some() {
                plan.requeue.push(tag);
            }
        }
        let closed: Vec<u64> = acks
            .iter()
            .copied()
            .filter(|tag| self.open.remove(tag).is_some())
            .collect();
        let lowest_open = self.open.keys().next().copied().unwrap_or(u64::MAX);
        for tag in closed {
            if tag < lowest_open {
                // Every other unacknowledged delivery up to `tag` is in this batch too, or
                // acknowledged earlier (and that ack is already queued ahead of this one).
                plan.up_to = plan.up_to.max(Some(tag));
            } else {
                plan.acks.push(tag);
            }
        }
        plan
    }
}

impl Session {
    /// The delivery tag of `receipt` if it belongs to this channel.
    fn tag(&self, receipt: u64) -> Option<u64> {
        (receipt >> TAG_BITS == self.generation).then(|| delivery_tag(receipt))
    }

    /// Acknowledges `acks` and requeues `requeue` (delivery tags; those not open are skipped),
    /// with as few frames as the ledger allows, sent together and awaited together.
    async fn close_out(&self, acks: &[u64], requeue: &[u64]) -> Result<(), BrokerError> {
        if acks.is_empty() && requeue.is_empty() {
            return Ok(());
        }
        let ch = &self.channel;
        let mut sends: Vec<BoxFuture<'_, lapin::Result<()>>> = Vec::new();
        {
            let mut ledger = self.ledger.lock().expect("ledger poisoned");
            let plan = ledger.plan(acks, requeue);
            let nack = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            let frames = plan
                .requeue
                .iter()
                .map(|&tag| ch.basic_nack(tag, nack).boxed())
                .chain(
                    plan.up_to
                        .map(|tag| ch.basic_ack(tag, BasicAckOptions { multiple: true }).boxed()),
                )
                .chain(
                    plan.acks
                        .iter()
                        .map(|&tag| ch.basic_ack(tag, BasicAckOptions::default()).boxed()),
                );
            // Polled once here, under the lock: that queues each frame on the channel, in the
            // ledger's order. Awaited below with the task's own waker.
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            for mut send in frames {
                if let Poll::Ready(res) = send.as_mut().poll(&mut cx) {
                    send = futures::future::ready(res).boxed();
                }
                sends.push(send);
            }
        }
        tokio::time::timeout(RPC_TIMEOUT, join_all(sends))
            .await
            .map_err(|_| BrokerError::Unavailable("rabbitmq: acknowledgements not sent in time".into()))?
            .into_iter()
            .collect::<lapin::Result<Vec<()>>>()?;
        Ok(())
    }
}

#[derive(Default)]
struct Intake {
    consumer: Option<Consumer>,
    /// Deliveries due in less than [`DELAY_BASE_MS`]: kept (unacknowledged) until they are due.
    held: Vec<Job>,
    /// Deliveries taken from the consumer and not yet sorted (kept to reuse the allocation).
    arrived: Vec<Delivery>,
}

/// What to do with a delivery that is not handed to the worker.
struct Diversion {
    tag: u64,
    msg: Outgoing,
}

impl AmqpDriver {
    fn current_session(&self) -> Option<Arc<Session>> {
        self.session.lock().expect("session poisoned").clone()
    }

    /// The consumer channel, opened again if it closed.
    async fn session(&self, intake: &mut Intake) -> Result<Arc<Session>, BrokerError> {
        if intake.consumer.is_some()
            && let Some(s) = self.current_session()
            && s.channel.status().connected()
        {
            return Ok(s);
        }
        if intake.consumer.is_some() {
            tracing::warn!(queue = %self.queue, "RabbitMQ consumer channel lost: opening a new one");
        }
        // Whatever the old channel delivered went back to the queue when it closed.
        self.lose_session(intake);

        self.broker.ensure_declared(&self.queue).await?;
        let conn = self.broker.inner.consumer.connection().await?;
        let opened = tokio::time::timeout(RPC_TIMEOUT, async {
            let channel = conn.create_channel().await?;
            channel.basic_qos(self.qos, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    self.names.main.as_str().into(),
                    self.consumer_tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, consumer))
        })
        .await;
        let (channel, consumer) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => {
                if is_not_found(&e) {
                    self.broker.forget(&self.queue);
                }
                return Err(e.into());
            }
            Err(_) => {
                return Err(BrokerError::Unavailable(format!(
                    "rabbitmq: opening a consumer got no answer within {RPC_TIMEOUT:?}"
                )));
            }
        };
        let session = Arc::new(Session {
            channel,
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
            ledger: Mutex::default(),
            _conn: conn,
        });
        *self.session.lock().expect("session poisoned") = Some(session.clone());
        intake.consumer = Some(consumer);
        Ok(session)
    }

    /// Forgets the consumer channel; the next fetch opens a new one.
    fn lose_session(&self, intake: &mut Intake) {
        intake.consumer = None;
        intake.held.clear();
        intake.arrived.clear();
        *self.session.lock().expect("session poisoned") = None;
    }

    /// Sorts deliveries: due → `out`; due within 100 ms → held; later → the next delay queue;
    /// canceled → dropped; unreadable → the dead queue. Each is entered in the ledger.
    fn sort(&self, session: &Session, intake: &mut Intake, sorted: &mut Sorted) {
        let now = now_ms();
        let canceled = self.broker.inner.canceled.lock().expect("canceled poisoned");
        let mut ledger = session.ledger.lock().expect("ledger poisoned");
        for delivery in intake.arrived.drain(..) {
            let tag = delivery.delivery_tag;
            let mut lease = Lease::Intake;
            match serde_json::from_slice::<Job>(&delivery.data) {
                Err(e) => {
                    tracing::error!(queue = %self.queue, error = %e, "unreadable message moved to the dead queue");
                    let error = format!("corrupt job envelope: {e}");
                    sorted.diversions.push(Diversion {
                        tag,
                        msg: Outgoing {
                            queue: self.queue.clone(),
                            routing_key: self.names.dead.clone(),
                            body: delivery.data,
                            props: properties(None, Some(&error)),
                        },
                    });
                }
                Ok(job) if canceled.contains_key(&job.id) => {
                    tracing::debug!(job.id = %job.id, "skipping canceled job");
                    sorted.drops.push(tag);
                }
                Ok(mut job) if delivery.redelivered => {
                    // Back after its channel closed unacknowledged: the worker holding it died
                    // (or lost its connection). The attempt counts, and so does the crash; the
                    // count travels in the envelope of a confirmed copy, since RabbitMQ's
                    // redelivered flag cannot tell a first crash from a third.
                    job.attempt = job.attempt.saturating_add(1);
                    job.crashes = job.crashes.saturating_add(1);
                    let (routing_key, error) = if job.crashes >= self.quarantine_after {
                        tracing::warn!(job.id = %job.id, crashes = job.crashes, "quarantining a job that keeps killing its workers");
                        (
                            self.names.dead.clone(),
                            Some(crate::job::quarantine_error(job.crashes)),
                        )
                    } else if job.attempt >= job.max_attempts {
                        (self.names.dead.clone(), Some(LEASE_EXPIRED.to_owned()))
                    } else {
                        (self.names.main.clone(), None)
                    };
                    match envelope(&job) {
                        Ok(body) => sorted.diversions.push(Diversion {
                            tag,
                            msg: Outgoing {
                                queue: self.queue.clone(),
                                routing_key,
                                body,
                                props: properties(Some(&job), error.as_deref()),
                            },
                        }),
                        Err(e) => {
                            tracing::error!(job.id = %job.id, error = %e, "cannot re-encode a redelivered job")
                        }
                    }
                }
                Ok(mut job) => {
                    job.attempt = job.attempt.saturating_add(1);
                    job.receipt = receipt(session.generation, tag);
                    let remaining = job.run_at_ms.map_or(0, |at| at - now);
                    if remaining <= DUE_SLACK_MS {
                        sorted.out.push(job);
                        lease = Lease::Worker;
                    } else if remaining < DELAY_BASE_MS {
                        intake.held.push(job);
                    } else {
                        let props = properties(Some(&job), None);
                        sorted.diversions.push(Diversion {
                            tag,
                            msg: Outgoing {
                                queue: self.queue.clone(),
                                routing_key: self.names.for_remaining(remaining).to_owned(),
                                body: delivery.data,
                                props,
                            },
                        });
                    }
                }
            }
            ledger.open.insert(tag, lease);
        }
    }

    /// Moves held jobs that fell due to `out` (canceled ones to `drops`).
    fn release_due(&self, session: &Session, intake: &mut Intake, sorted: &mut Sorted, max: usize) {
        if intake.held.is_empty() {
            return;
        }
        let now = now_ms();
        let mut i = 0;
        while i < intake.held.len() && sorted.out.len() < max {
            if intake.held[i].run_at_ms.unwrap_or(0) - now > DUE_SLACK_MS {
                i += 1;
                continue;
            }
            let job = intake.held.swap_remove(i);
            let Some(tag) = session.tag(job.receipt) else {
                continue;
            };
            if self.broker.is_canceled(job.id) {
                sorted.drops.push(tag);
            } else {
                session
                    .ledger
                    .lock()
                    .expect("ledger poisoned")
                    .open
                    .insert(tag, Lease::Worker);
                sorted.out.push(job);
            }
        }
    }

    /// Publishes diverted messages (confirmed), then acknowledges them and the dropped ones;
    /// a message whose publish failed goes back to the queue.
    async fn divert(&self, session: &Session, sorted: &mut Sorted) -> Result<(), BrokerError> {
        let (tags, msgs): (Vec<u64>, Vec<Outgoing>) =
            sorted.diversions.drain(..).map(|d| (d.tag, d.msg)).unzip();
        let mut acks = std::mem::take(&mut sorted.drops);
        let mut requeue = Vec::new();
        let mut failure = None;
        for (tag, res) in tags.into_iter().zip(self.broker.publish_each(&msgs).await) {
            match res {
                Ok(()) => acks.push(tag),
                Err(e) => {
                    requeue.push(tag);
                    failure.get_or_insert(e);
                }
            }
        }
        session.close_out(&acks, &requeue).await?;
        failure.map_or(Ok(()), Err)
    }
}

/// One fetch's deliveries, sorted.
#[derive(Default)]
struct Sorted {
    out: Vec<Job>,
    diversions: Vec<Diversion>,
    /// Delivery tags of canceled jobs, to acknowledge unrun.
    drops: Vec<u64>,
}

#[async_trait]
impl Driver for AmqpDriver {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Job>, BrokerError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut intake = self.intake.lock().await;
        let intake = &mut *intake;
        let session = self.session(intake).await?;
        let deadline = Instant::now() + wait;
        let mut sorted = Sorted::default();
        loop {
            // Held jobs that fell due join the batch.
            self.release_due(&session, intake, &mut sorted, max);
            // Early arrivals go down the next delay queue at once, or they would be late.
            if (!sorted.diversions.is_empty() || !sorted.drops.is_empty())
                && let Err(e) = self.divert(&session, &mut sorted).await
            {
                if !session.channel.status().connected() {
                    self.lose_session(intake);
                    return Err(e);
                }
                if sorted.out.is_empty() {
                    // Publishing is down: let the caller back off; the messages were requeued.
                    return Err(e);
                }
                break;
            }
            if sorted.out.len() >= max {
                break;
            }
            // Wait for the first job (or the next held one to fall due); after that take only
            // what has already arrived.
            let patience = if sorted.out.is_empty() {
                let until_deadline = deadline.saturating_duration_since(Instant::now());
                let until_held = intake
                    .held
                    .iter()
                    .filter_map(|j| j.run_at_ms)
                    .min()
                    .map(|at| Duration::from_millis((at - DUE_SLACK_MS - now_ms()).max(0) as u64));
                until_held.map_or(until_deadline, |h| h.min(until_deadline))
            } else {
                Duration::ZERO
            };
            let consumer = intake.consumer.as_mut().expect("opened by session()");
            let mut next = if patience.is_zero() {
                consumer.next().now_or_never()
            } else {
                tokio::time::timeout(patience, consumer.next()).await.ok()
            };
            if next.is_none() {
                if !sorted.out.is_empty() || Instant::now() >= deadline {
                    break;
                }
                continue;
            }
            // Everything that has arrived, up to what the batch has room for.
            while let Some(item) = next {
                match item {
                    Some(Ok(delivery)) => intake.arrived.push(delivery),
                    Some(Err(e)) => {
                        // Whatever this channel delivered goes back to the queue as it closes.
                        self.lose_session(intake);
                        return Err(e.into());
                    }
                    None => {
                        self.lose_session(intake);
                        self.broker.forget(&self.queue);
                        return Err(BrokerError::Unavailable(format!(
                            "rabbitmq canceled the consumer of {} (queue deleted?)",
                            self.names.main
                        )));
                    }
                }
                next = if sorted.out.len() + intake.arrived.len() < max {
                    consumer.next().now_or_never()
                } else {
                    None
                };
            }
            self.sort(&session, intake, &mut sorted);
        }
        Ok(sorted.out)
    }

    async fn settle(&self, batch: &[Settlement]) -> Result<(), BrokerError> {
        // Receipts of a channel that has closed are void: RabbitMQ has requeued those messages,
        // so they run again (at least once) and nothing here may touch them.
        let Some(session) = self.current_session().filter(|s| s.channel.status().connected()) else {
            return Ok(());
        };
        let mut acks = Vec::with_capacity(batch.len());
        // Failed attempts whose retry or dead copy is to be published first.
        let mut failed = Vec::new();
        {
            let ledger = session.ledger.lock().expect("ledger poisoned");
            for s in batch {
                let Some(tag) = session.tag(s.job.receipt) else {
                    continue;
                };
                match (ledger.open.get(&tag), &s.outcome) {
                    (Some(Lease::Worker), Outcome::Succeeded) | (Some(Lease::Republished), _) => {
                        acks.push(tag)
                    }
                    (Some(Lease::Worker), _) => failed.push((tag, s)),
                    _ => {}
                }
            }
        }
        let mut failure = None;
        if !failed.is_empty() {
            let now = now_ms();
            let mut msgs = Vec::with_capacity(failed.len());
            for (_, s) in &failed {
                let (routing_key, job, error) = match &s.outcome {
                    Outcome::Retry { at_ms, .. } => {
                        // `attempt` is the attempt that just ended: attempts made so far.
                        let mut job = Job::clone(&s.job);
                        job.run_at_ms = Some(*at_ms);
                        // A panic counts as a crash (see `Outcome::is_panicked_retry`).
                        if s.outcome.is_panicked_retry() {
                            job.crashes = job.crashes.saturating_add(1);
                        }
                        (self.names.for_remaining(at_ms - now).to_owned(), job, None)
                    }
                    Outcome::Dead { error, .. } => {
                        (self.names.dead.clone(), Job::clone(&s.job), Some(error.as_str()))
                    }
                    Outcome::Succeeded => unreachable!("only failed attempts are republished"),
                };
                msgs.push(Outgoing {
                    queue: self.queue.clone(),
                    routing_key,
                    body: envelope(&job)?,
                    props: properties(Some(&job), error),
                });
            }
            let published = self.broker.publish_each(&msgs).await;
            let mut ledger = session.ledger.lock().expect("ledger poisoned");
            for ((tag, _), res) in failed.into_iter().zip(published) {
                match res {
                    Ok(()) => {
                        // Absent if the channel was lost meanwhile: then the ack below fails too.
                        if let Some(lease) = ledger.open.get_mut(&tag) {
                            *lease = Lease::Republished;
                        }
                        acks.push(tag);
                    }
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
        }
        session.close_out(&acks, &[]).await?;
        failure.map_or(Ok(()), Err)
    }

    async fn release(&self, jobs: &[Job]) -> Result<(), BrokerError> {
        let Some(session) = self.current_session().filter(|s| s.channel.status().connected()) else {
            return Ok(());
        };
        let mut tags = Vec::with_capacity(jobs.len());
        let mut msgs = Vec::with_capacity(jobs.len());
        {
            let ledger = session.ledger.lock().expect("ledger poisoned");
            for job in jobs {
                let Some(tag) = session.tag(job.receipt) else {
                    continue;
                };
                if ledger.open.get(&tag) != Some(&Lease::Worker) {
                    continue;
                }
                // A copy with the attempt given back, rather than a requeue: a requeued
                // message comes back flagged redelivered, which counts as a crash.
                let mut copy = job.clone();
                copy.attempt = copy.attempt.saturating_sub(1);
                tags.push(tag);
                msgs.push(Outgoing {
                    queue: self.queue.clone(),
                    routing_key: self.names.main.clone(),
                    body: envelope(&copy)?,
                    props: properties(Some(&copy), None),
                });
            }
        }
        let (mut acks, mut requeue) = (Vec::new(), Vec::new());
        for (tag, res) in tags.into_iter().zip(self.broker.publish_each(&msgs).await) {
            // Publishing is down: requeued as delivered instead (counted as a crash).
            if res.is_ok() {
                acks.push(tag)
            } else {
                requeue.push(tag)
            }
        }
        session.close_out(&acks, &requeue).await
    }

    async fn renew(&self, _held: &[JobId]) -> Result<(), BrokerError> {
        // RabbitMQ holds unacknowledged messages for this consumer until its channel closes.
        Ok(())
    }

    async fn abandon(&self) {
        let mut intake = self.intake.lock().await;
        if let Some(session) = self.current_session() {
            let _ = session.channel.close(200, "abandoned".into()).await;
        }
        self.lose_session(&mut intake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_picks_the_longest_queue_that_does_not_overshoot() {
        assert_eq!(delay_level(-5), None);
        assert_eq!(delay_level(99), None);
        assert_eq!(delay_level(100), Some(0));
        assert_eq!(delay_level(199), Some(0));
        assert_eq!(delay_level(200), Some(1));
        assert_eq!(delay_level(399), Some(1));
        assert_eq!(delay_level(1_000), Some(3));
        assert_eq!(delay_level(delay_ttl_ms(24)), Some(24));
        assert_eq!(delay_level(i64::MAX), Some(24));
        for remaining in [100, 150, 777, 12_345, 86_400_000] {
            let k = delay_level(remaining).unwrap();
            assert!(
                delay_ttl_ms(k) <= remaining && remaining < 2 * delay_ttl_ms(k),
                "{remaining}"
            );
        }
    }

    #[test]
    fn a_receipt_keeps_its_tag_and_tells_channels_apart() {
        let a = receipt(1, 42);
        let b = receipt(2, 42);
        assert_ne!(a, b);
        assert_eq!((delivery_tag(a), delivery_tag(b)), (42, 42));
    }

    #[test]
    fn queue_names_follow_the_documented_layout() {
        let n = Names::new("drover", &QueueName::parse("backups").unwrap());
        assert_eq!(n.main, "drover.backups");
        assert_eq!(n.dead, "drover.backups.dead");
        assert_eq!(n.delays[24], "drover.backups.delay.24");
        assert_eq!(n.for_remaining(50), "drover.backups");
        assert_eq!(n.for_remaining(450), "drover.backups.delay.2");
        assert_eq!(n.all().count(), 27);
    }

    fn ledger(open: impl IntoIterator<Item = u64>) -> Ledger {
        Ledger {
            open: open.into_iter().map(|tag| (tag, Lease::Worker)).collect(),
        }
    }

    #[test]
    fn acks_below_every_open_delivery_go_out_as_one_multiple_ack() {
        let mut l = ledger(1..=10);
        let plan = l.plan(&[3, 1, 2, 5], &[]);
        assert_eq!(
            plan,
            Plan {
                up_to: Some(3),
                acks: vec![5],
                requeue: vec![]
            }
        );
        // 4 still runs; once it is done, one ack up to 6 covers 4 and 6 (5 went out already).
        assert_eq!(l.plan(&[6], &[]).acks, vec![6]);
        let plan = l.plan(&[4], &[]);
        assert_eq!((plan.up_to, plan.acks), (Some(4), vec![]));
        let plan = l.plan(&[10, 8, 7], &[]);
        assert_eq!((plan.up_to, plan.acks), (Some(8), vec![10]), "9 is open");
        assert_eq!(l.open.keys().copied().collect::<Vec<_>>(), [9]);
    }

    #[test]
    fn a_delivery_closed_once_is_never_acknowledged_again() {
        let mut l = ledger(1..=4);
        l.plan(&[2], &[]);
        assert_eq!(l.plan(&[2], &[]), Plan::default());
        let plan = l.plan(&[1, 2], &[]);
        assert_eq!((plan.up_to, plan.acks), (Some(1), vec![]));
        assert_eq!(l.plan(&[7], &[]), Plan::default(), "never delivered");
    }

    #[test]
    fn a_requeued_delivery_goes_back_alone_and_unblocks_the_ones_after_it() {
        let mut l = ledger(1..=5);
        let plan = l.plan(&[2, 3], &[1]);
        assert_eq!(
            plan,
            Plan {
                up_to: Some(3),
                acks: vec![],
                requeue: vec![1]
            }
        );
        // Held or intake deliveries block a multiple ack like running jobs do.
        l.open.insert(6, Lease::Intake);
        let plan = l.plan(&[4, 5], &[]);
        assert_eq!((plan.up_to, plan.acks), (Some(5), vec![]));
        l.open.insert(7, Lease::Worker);
        assert_eq!(l.plan(&[7], &[]).acks, vec![7]);
    }

    #[test]
    fn a_long_error_is_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let props = properties(None, Some(&long));
        let headers = props.headers().as_ref().unwrap();
        let Some(AMQPValue::LongString(v)) = headers.inner().get(ERROR_HEADER) else {
            panic!()
        };
        assert!(v.len() <= MAX_ERROR_BYTES);
        assert!(std::str::from_utf8(v.as_bytes()).is_ok());
    }
}
