//! drover's Redis broker.
//!
//! Layout, for prefix `P` and queue `q` (every key of a queue shares the hash tag `{q}`, so the
//! scripts run unchanged on Redis Cluster):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{q}:pending` | LIST | ids ready to run; LPUSH in, taken from the right. **KEDA reads its LLEN.** |
//! | `P:{q}:job:<id>` | HASH | `d` envelope, `s` status, `a` attempts, `m` max attempts, `c` created, `e` last error, `w` worker, `st`/`ft` started/finished ms |
//! | `P:{q}:scheduled` | ZSET | delayed jobs and retries, scored by run-at ms |
//! | `P:{q}:leased` | ZSET | jobs handed to a worker, scored by lease deadline |
//! | `P:{q}:dead` | ZSET | the dead set, scored by time of death |
//! | `P:{q}:workers` | ZSET | consumers, scored by heartbeat deadline |
//! | `P:{q}:claim:<worker>` | LIST | ids a blocked worker popped and is about to lease |
//! | `P:{q}:stats` | HASH | `done`, `failed` counters |
//! | `P:{q}:idem:<key>` | STRING | id of the job that first used an idempotency key |
//! | `P:queues` | SET | queues that have had jobs |
//!
//! Every state change is one Lua script over one queue's keys, so a job is always in exactly
//! one of pending / scheduled / leased / dead (or finished). Fetch and settle work on batches;
//! an idle worker waits in `BLMOVE` on a connection of its own.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use redis::{AsyncConnectionConfig, Client, Script, aio::ConnectionManager, aio::MultiplexedConnection};

use super::{BrokerError, CancelOutcome, ConsumerConfig, Driver, Enqueued, Producer, QueueStats};
use crate::{
    job::{Job, JobId, JobRecord, JobState, Outcome, Settlement, now_ms},
    queue::QueueName,
};

/// How long a succeeded job's record stays in Redis for `GET /v1/jobs/{id}`; after that the
/// history database answers.
const DONE_TTL_S: u64 = 3_600;
/// How long an idempotency key maps to its first job.
const IDEMPOTENCY_WINDOW_S: u64 = 86_400;
/// Jobs per script call when pushing a batch, so one call never blocks Redis for long.
const PUSH_CHUNK: usize = 2_000;

impl From<redis::RedisError> for BrokerError {
    fn from(e: redis::RedisError) -> Self {
        if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal() {
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
    workers: String,
    stats: String,
    job_prefix: String,
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
            workers: format!("{base}:workers"),
            stats: format!("{base}:stats"),
            job_prefix: format!("{base}:job:"),
            claim_prefix: format!("{base}:claim:"),
            idem_prefix: format!("{base}:idem:"),
        }
    }

    fn job(&self, id: &str) -> String {
        format!("{}{id}", self.job_prefix)
    }
}

struct Scripts {
    push: Script,
    fetch: Script,
    settle: Script,
    release: Script,
    renew: Script,
    cancel: Script,
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
        }
    }
}

/// The producer side, shared by the whole process: one multiplexed connection that reconnects
/// by itself.
#[derive(Clone)]
pub struct RedisBroker {
    client: Client,
    conn: ConnectionManager,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
    known_queues: Arc<Mutex<HashSet<QueueName>>>,
    keys: Arc<Mutex<HashMap<QueueName, Arc<Keys>>>>,
}

impl RedisBroker {
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, BrokerError> {
        let client = Client::open(url).map_err(|e| BrokerError::Other(format!("redis URL: {e}")))?;
        // redis-rs answers "timed out" after 500 ms by default, which under load kills healthy
        // connections; a broker call that takes 5 s is an outage anyway.
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        // Lazy, so that drover starts (and answers 503 / not ready) while Redis is down.
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), cfg)?;
        Ok(Self {
            client,
            conn,
            prefix: prefix.into(),
            scripts: Arc::new(Scripts::new()),
            known_queues: Arc::default(),
            keys: Arc::default(),
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
        let mut conn = self.conn.clone();
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
        let now = now_ms();
        let mut inv = self.scripts.push.prepare_invoke();
        inv.key(&keys.pending).key(&keys.scheduled);
        inv.arg(&keys.job_prefix)
            .arg(&keys.idem_prefix)
            .arg(IDEMPOTENCY_WINDOW_S)
            .arg(now);
        for job in jobs {
            let data = serde_json::to_string(job).map_err(|e| BrokerError::Other(e.to_string()))?;
            inv.arg(job.id.to_string())
                .arg(data)
                .arg(job.run_at_ms.unwrap_or(0))
                .arg(job.idempotency_key.as_deref().unwrap_or(""))
                .arg(job.max_attempts)
                .arg(job.enqueued_at_ms);
        }
        let mut conn = self.conn.clone();
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

    /// Finds which queue holds a job; `P:queues` lists every queue that ever had one.
    async fn locate(&self, id: JobId) -> Result<Option<(QueueName, HashMap<String, String>)>, BrokerError> {
        let mut conn = self.conn.clone();
        let queues = self.queues().await?;
        let id = id.to_string();
        let mut pipe = redis::pipe();
        for q in &queues {
            pipe.hgetall(self.keys(q).job(&id));
        }
        let found: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
        Ok(queues.into_iter().zip(found).find(|(_, h)| !h.is_empty()))
    }
}

fn record_from_hash(
    id: JobId,
    queue: &QueueName,
    h: &HashMap<String, String>,
) -> Result<JobRecord, BrokerError> {
    let job: Job = serde_json::from_str(h.get("d").map(String::as_str).unwrap_or("null"))
        .map_err(|e| BrokerError::Corrupt(format!("job {id}: {e}")))?;
    let int = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
    let status = h
        .get("s")
        .and_then(|s| s.parse::<JobState>().ok())
        .ok_or_else(|| BrokerError::Corrupt(format!("job {id}: status {:?}", h.get("s"))))?;
    Ok(JobRecord {
        id,
        queue: queue.to_string(),
        kind: job.kind.to_string(),
        status,
        attempts: int("a").unwrap_or(0).max(0) as u32,
        max_attempts: job.max_attempts,
        priority: job.priority,
        payload: serde_json::from_str(job.payload.get()).ok(),
        created_at_ms: job.enqueued_at_ms,
        run_at_ms: job.run_at_ms,
        started_at_ms: int("st"),
        finished_at_ms: int("ft"),
        last_error: h.get("e").cloned(),
        worker_id: h.get("w").cloned(),
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
        match self.locate(id).await? {
            Some((q, h)) => record_from_hash(id, &q, &h).map(Some),
            None => Ok(None),
        }
    }

    async fn cancel(&self, id: JobId) -> Result<CancelOutcome, BrokerError> {
        let Some((q, _)) = self.locate(id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        let keys = self.keys(&q);
        let mut conn = self.conn.clone();
        let before: String = self
            .scripts
            .cancel
            .key(&keys.pending)
            .key(&keys.scheduled)
            .arg(keys.job(&id.to_string()))
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
        let mut conn = self.conn.clone();
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
        let mut conn = self.conn.clone();
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
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(&keys.dead)
            .arg(offset)
            .arg(offset + limit.max(1) - 1)
            .arg("REV")
            .query_async(&mut conn)
            .await?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(keys.job(id));
        }
        let hashes: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
        ids.iter()
            .zip(hashes)
            .filter(|(_, h)| !h.is_empty())
            .map(|(id, h)| {
                let id = JobId::parse(id).ok_or_else(|| BrokerError::Corrupt(format!("job id {id:?}")))?;
                record_from_hash(id, q, &h)
            })
            .collect()
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    async fn driver(&self, q: &QueueName, cfg: &ConsumerConfig) -> Result<Arc<dyn Driver>, BrokerError> {
        self.remember_queue(q).await?;
        Ok(Arc::new(RedisDriver {
            broker: self.clone(),
            keys: self.keys(q),
            worker: cfg.worker.clone(),
            lease_ms: cfg.lease.as_millis() as u64,
            block_timeout: cfg.block + Duration::from_secs(5),
            blocking: tokio::sync::Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        }))
    }

    fn depth_source(&self, q: &QueueName) -> String {
        format!("redis LIST {} (LLEN)", self.keys(q).pending)
    }

    async fn destroy(&self) -> Result<(), BrokerError> {
        // Glob metacharacters in the prefix must match literally.
        let mut pattern = String::with_capacity(self.prefix.len() + 2);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str(":*");
        let mut conn = self.conn.clone();
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

/// One worker's view of one queue.
struct RedisDriver {
    broker: RedisBroker,
    keys: Arc<Keys>,
    worker: Arc<str>,
    lease_ms: u64,
    block_timeout: Duration,
    /// The connection idle waits block on; a blocked command would stall every other command
    /// multiplexed on a shared connection.
    blocking: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// Cuts an idle wait short: a retry this worker schedules must not wait out the block.
    wake: tokio::sync::Notify,
}

impl RedisDriver {
    async fn lease(&self, max: usize) -> Result<(Vec<Job>, Option<i64>), BrokerError> {
        let k = &self.keys;
        let now = now_ms();
        let mut conn = self.broker.conn.clone();
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
            .arg(now)
            .arg(now + self.lease_ms as i64)
            .arg(max)
            .arg(&*self.worker)
            .arg(&k.job_prefix)
            .arg(&k.claim_prefix)
            .invoke_async(&mut conn)
            .await?;
        let mut it = out.into_iter();
        let next: i64 = it.next().map(redis::from_redis_value).transpose()?.unwrap_or(-1);
        let mut jobs = Vec::with_capacity(it.len() / 2);
        while let (Some(a), Some(d)) = (it.next(), it.next()) {
            let attempt: u32 = redis::from_redis_value(a)?;
            let data: Vec<u8> = redis::from_redis_value(d)?;
            let mut job: Job = serde_json::from_slice(&data)
                .map_err(|e| BrokerError::Corrupt(format!("job envelope: {e}")))?;
            job.attempt = attempt;
            jobs.push(job);
        }
        Ok((jobs, (next >= 0).then_some(next)))
    }

    async fn wait_for_work(&self, wait: Duration) -> Result<(), BrokerError> {
        let mut guard = self.blocking.lock().await;
        if guard.is_none() {
            let cfg = AsyncConnectionConfig::new()
                .set_response_timeout(Some(self.block_timeout))
                .set_connection_timeout(Some(Duration::from_secs(2)));
            *guard = Some(
                self.broker
                    .client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?,
            );
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

    async fn settle(&self, batch: Vec<Settlement>) -> Result<(), BrokerError> {
        let k = &self.keys;
        let mut inv = self.broker.scripts.settle.prepare_invoke();
        inv.key(&k.leased)
            .key(&k.scheduled)
            .key(&k.dead)
            .key(&k.stats)
            .key(&k.pending);
        inv.arg(&k.job_prefix).arg(DONE_TTL_S).arg(&*self.worker);
        for s in &batch {
            let (code, at, err) = match &s.outcome {
                Outcome::Succeeded => ("s", 0, ""),
                Outcome::Retry { at_ms, error, .. } => ("r", *at_ms, error.as_str()),
                Outcome::Dead { error, .. } => ("d", 0, error.as_str()),
            };
            inv.arg(s.job.id.to_string())
                .arg(code)
                .arg(at)
                .arg(err)
                .arg(s.finished_at_ms);
        }
        let mut conn = self.broker.conn.clone();
        let _: () = inv.invoke_async(&mut conn).await?;
        // A retry may fall due before this worker's idle wait ends; the wait may also not have
        // started yet, in which case the stored permit cuts the next one short.
        if batch.iter().any(|s| matches!(s.outcome, Outcome::Retry { .. })) {
            self.wake.notify_one();
        }
        Ok(())
    }

    async fn release(&self, jobs: Vec<Job>) -> Result<(), BrokerError> {
        let k = &self.keys;
        let mut inv = self.broker.scripts.release.prepare_invoke();
        inv.key(&k.leased)
            .key(&k.pending)
            .arg(&k.job_prefix)
            .arg(&*self.worker);
        for j in &jobs {
            inv.arg(j.id.to_string());
        }
        let mut conn = self.broker.conn.clone();
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
        let mut conn = self.broker.conn.clone();
        let _: () = inv.invoke_async(&mut conn).await?;
        Ok(())
    }
}

const PUSH_LUA: &str = r#"
-- KEYS: pending, scheduled
-- ARGV: job prefix, idempotency prefix, idempotency ttl s, now ms,
--       then per job: id, envelope, run-at ms (0 = now), idempotency key ('' = none), max attempts, created ms
local jp, ip, ittl, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local out = {}
for i = 5, #ARGV, 6 do
  local id, data, runat, idem = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local prev = false
  if idem ~= '' then
    prev = redis.call('GET', ip .. idem)
    if not prev then redis.call('SET', ip .. idem, id, 'EX', ittl) end
  end
  if prev then
    out[#out + 1] = prev
    out[#out + 1] = '1'
  else
    local state = 'pending'
    if runat > now then state = 'scheduled' end
    redis.call('HSET', jp .. id, 'd', data, 's', state, 'a', 0, 'm', ARGV[i + 4], 'c', ARGV[i + 5])
    if runat > now then
      redis.call('ZADD', KEYS[2], runat, id)
    else
      redis.call('LPUSH', KEYS[1], id)
    end
    out[#out + 1] = id
    out[#out + 1] = '0'
  end
end
return out
"#;

const FETCH_LUA: &str = r#"
-- KEYS: pending, leased, scheduled, this worker's claim list, workers, dead, stats
-- ARGV: now ms, lease deadline ms, max jobs, worker, job prefix, claim prefix
-- Returns: next scheduled run-at ms (-1 if none), then attempt, envelope per leased job.
-- Times stay strings: Lua formats numbers through printf, which costs more than the commands.
local now, deadline, max, worker, jp, cp = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
redis.call('ZADD', KEYS[5], deadline, worker)

-- Claims of workers that stopped heartbeating go back to the front of the line.
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 10)) do
  while redis.call('LMOVE', cp .. w, KEYS[1], 'RIGHT', 'RIGHT') do end
  redis.call('ZREM', KEYS[5], w)
end

-- Leases that ran out: the worker died or hung. The attempt counts; out of attempts means dead.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', KEYS[2], id)
  local jk = jp .. id
  local h = redis.call('HMGET', jk, 'a', 'm')
  if h[1] and tonumber(h[1]) >= tonumber(h[2]) then
    redis.call('HSET', jk, 's', 'dead', 'e', 'lease expired: the worker running it stopped responding', 'ft', now)
    redis.call('ZADD', KEYS[6], now, id)
    redis.call('HINCRBY', KEYS[7], 'failed', 1)
  elseif h[1] then
    redis.call('HSET', jk, 's', 'pending')
    redis.call('RPUSH', KEYS[1], id)
  end
end

-- Delayed jobs and retries that are due join the line.
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('HSET', jp .. id, 's', 'pending')
  redis.call('LPUSH', KEYS[1], id)
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
local leased = {}
for _, id in ipairs(ids) do
  local jk = jp .. id
  local h = redis.call('HMGET', jk, 's', 'd', 'a')
  -- Anything else was canceled while its id sat in a claim list, or expired.
  if h[1] == 'pending' then
    local a = tostring(tonumber(h[3]) + 1)
    redis.call('HSET', jk, 's', 'running', 'a', a, 'w', worker, 'st', now)
    leased[#leased + 1] = deadline
    leased[#leased + 1] = id
    out[#out + 1] = a
    out[#out + 1] = h[2]
  end
end
if #leased > 0 then redis.call('ZADD', KEYS[2], unpack(leased)) end
return out
"#;

const SETTLE_LUA: &str = r#"
-- KEYS: leased, scheduled, dead, stats, pending
-- ARGV: job prefix, done ttl s, worker, then per job: id, s|r|d, retry-at ms, error, finished ms
local jp, ttl, w = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local done, failed = 0, 0
local unleased = {}
for i = 4, #ARGV, 5 do
  local id, o, at, err, ft = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local jk = jp .. id
  local cur = redis.call('HMGET', jk, 's', 'w')
  local mine = cur[1] == 'running' and cur[2] == w
  -- Its lease ran out and it went back in line, but nobody took it yet: this result stands.
  if not mine and cur[1] == 'pending' and cur[2] == w then
    mine = redis.call('LREM', KEYS[5], 1, id) == 1
  end
  if mine then
    unleased[#unleased + 1] = id
    if o == 's' then
      done = done + 1
      if ttl > 0 then
        redis.call('HSET', jk, 's', 'succeeded', 'ft', ft)
        redis.call('EXPIRE', jk, ttl)
      else
        redis.call('DEL', jk)
      end
    elseif o == 'r' then
      failed = failed + 1
      redis.call('HSET', jk, 's', 'retrying', 'e', err, 'ft', ft)
      redis.call('ZADD', KEYS[2], at, id)
    else
      failed = failed + 1
      redis.call('HSET', jk, 's', 'dead', 'e', err, 'ft', ft)
      redis.call('ZADD', KEYS[3], ft, id)
    end
  end
end
if #unleased > 0 then redis.call('ZREM', KEYS[1], unpack(unleased)) end
if done > 0 then redis.call('HINCRBY', KEYS[4], 'done', done) end
if failed > 0 then redis.call('HINCRBY', KEYS[4], 'failed', failed) end
return 0
"#;

const RELEASE_LUA: &str = r#"
-- KEYS: leased, pending; ARGV: job prefix, worker, ids...
-- Jobs leased but never started go back to the front of the line, their attempt uncounted.
local jp, w = ARGV[1], ARGV[2]
for i = #ARGV, 3, -1 do
  local id = ARGV[i]
  local jk = jp .. id
  local cur = redis.call('HMGET', jk, 's', 'w')
  if cur[1] == 'running' and cur[2] == w then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HSET', jk, 's', 'pending')
    redis.call('HINCRBY', jk, 'a', -1)
    redis.call('RPUSH', KEYS[2], id)
  end
end
return 0
"#;

const RENEW_LUA: &str = r#"
-- KEYS: leased, workers; ARGV: new deadline ms, worker, ids...
local deadline = ARGV[1]
redis.call('ZADD', KEYS[2], deadline, ARGV[2])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
end
return 0
"#;

const CANCEL_LUA: &str = r#"
-- KEYS: pending, scheduled; ARGV: job key, id, now ms. Returns the status before ('' if gone).
local s = redis.call('HGET', ARGV[1], 's')
if not s then return '' end
if s == 'pending' then
  redis.call('LREM', KEYS[1], 1, ARGV[2])
elseif s == 'scheduled' or s == 'retrying' then
  redis.call('ZREM', KEYS[2], ARGV[2])
else
  return s
end
redis.call('HSET', ARGV[1], 's', 'canceled', 'ft', ARGV[3])
return s
"#;
