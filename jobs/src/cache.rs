//! Read models in Redis: what the API serves from Redis instead of the database — score
//! leaderboards (a sorted set per model) and JSON summaries — with jittered TTLs and a lock
//! against stampedes.
//!
//! A read is a *hit* when Redis has the read model (also after waiting for another request's
//! rebuild), a *miss* when this request had to compute it. On a miss exactly one caller per key
//! rebuilds: it takes `…:lock` with `SET NX PX`, looks again (someone may have finished a
//! rebuild between its read and its lock), computes, writes the value with a TTL of
//! `ttl · (1 ± jitter)` so that keys warmed together do not expire together, and releases the
//! lock. The others poll until the value appears; one whose wait runs out (a rebuild slower
//! than `wait`) computes for itself without writing.
//!
//! Keys (all of one read model share a hash tag, so it lives in one Redis Cluster slot):
//! `{prefix}:{lb.MODEL}:board` (ZSET subject → score), `{prefix}:{lb.MODEL}:meta` (JSON: run,
//! as_of, subjects; present whenever the board is, also for an empty board), `…:lock`;
//! `{prefix}:{rm.CACHE.ID}:value` and `…:lock` for JSON read models.

use std::{future::Future, time::Duration};

use rand::Rng;
use redis::{AsyncCommands, Client, aio::ConnectionManager};
use serde::{Serialize, de::DeserializeOwned};

/// Where a read was served from (the `result` label of `drover_cache_requests_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
}

impl CacheResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache (Redis): {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cache: a stored read model does not decode: {0}")]
    Decode(#[from] serde_json::Error),
}

/// TTLs and waits. Defaults: 300 s ± 10 %, a 30 s lock, 10 s of waiting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheSettings {
    pub ttl: Duration,
    /// Fraction of the TTL each write adds or removes at random.
    pub jitter: f64,
    /// How long a rebuild may hold the lock before another caller may take over.
    pub lock_ttl: Duration,
    /// How long a caller waits for another's rebuild before computing for itself.
    pub wait: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(300),
            jitter: 0.1,
            lock_ttl: Duration::from_secs(30),
            wait: Duration::from_secs(10),
        }
    }
}

/// The leaderboard of one model as cached.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct BoardMeta {
    pub run_id: Option<uuid::Uuid>,
    pub as_of: Option<chrono::DateTime<chrono::Utc>>,
    pub subjects: u64,
}

/// A model's whole ranking, to cache.
#[derive(Clone, Debug, PartialEq)]
pub struct Board {
    pub meta: BoardMeta,
    /// (subject, score), any order.
    pub entries: Vec<(String, f64)>,
}

/// The top of a leaderboard as served.
#[derive(Clone, Debug, PartialEq)]
pub struct Top {
    pub meta: BoardMeta,
    /// (subject, score), best first.
    pub entries: Vec<(String, f64)>,
}

/// A handle on the read-model cache; cheap to clone.
#[derive(Clone)]
pub struct ReadCache {
    conn: ConnectionManager,
    prefix: String,
    settings: CacheSettings,
}

/// Releases the lock only if it still holds our token (a rebuild that overran its lock must
/// not release the next holder's).
const UNLOCK: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// Replaces the board and its meta atomically, with one TTL: readers never see a half-written
/// board, nor a board without its meta.
const PUT_BOARD: &str = r"
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('RENAME', KEYS[3], KEYS[1]) end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1";

/// ZADD batch size while loading a board.
const LOAD_BATCH: usize = 5_000;

impl ReadCache {
    /// A lazy connection to `url` (nothing is sent until the first read).
    pub fn connect(url: &str, prefix: &str, settings: CacheSettings) -> Result<Self, CacheError> {
        let client = Client::open(url)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        let conn = ConnectionManager::new_lazy_with_config(client, cfg)?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            settings,
        })
    }

    pub fn settings(&self) -> CacheSettings {
        self.settings
    }

    pub async fn ping(&self) -> Result<(), CacheError> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// A TTL of `ttl · (1 ± jitter)`, at least 1 ms.
    pub fn jittered_ttl(&self) -> Duration {
        jittered(self.settings.ttl, self.settings.jitter)
    }

    fn board_key(&self, model: &str, part: &str) -> String {
        format!("{}:{{lb.{model}}}:{part}", self.prefix)
    }

    fn value_key(&self, cache: &str, id: &str, part: &str) -> String {
        format!("{}:{{rm.{cache}.{id}}}:{part}", self.prefix)
    }

    /// The top `n` of `model`'s leaderboard if Redis has it.
    pub async fn top(&self, model: &str, n: usize) -> Result<Option<Top>, CacheError> {
        let mut c = self.conn.clone();
        let (meta, flat): (Option<String>, Vec<(String, f64)>) = redis::pipe()
            .get(self.board_key(model, "meta"))
            .zrevrange_withscores(self.board_key(model, "board"), 0, n as isize - 1)
            .query_async(&mut c)
            .await?;
        let Some(meta) = meta else {
            return Ok(None);
        };
        Ok(Some(Top {
            meta: serde_json::from_str(&meta)?,
            entries: flat,
        }))
    }

    /// The top `n` of `model`'s leaderboard: from Redis, or built with `build` (under the
    /// stampede lock) and cached. `build` returning `None` (no such model) caches nothing.
    pub async fn top_or_build<E, F, Fut>(
        &self,
        model: &str,
        n: usize,
        build: F,
    ) -> Result<Option<(Top, CacheResult)>, E>
    where
        E: From<CacheError>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Board>, E>>,
    {
        if let Some(top) = self.top(model, n).await? {
            return Ok(Some((top, CacheResult::Hit)));
        }
        let lock = self.board_key(model, "lock");
        let outcome = self
            .under_lock(&lock, || async { self.top(model, n).await })
            .await?;
        match outcome {
            Locked::Found(top) => Ok(Some((top, CacheResult::Hit))),
            Locked::Acquired(token) => match build().await {
                Ok(Some(board)) => {
                    let top = top_of(&board, n);
                    let put = self.put_board(model, &board).await;
                    self.unlock(&lock, &token).await;
                    put?;
                    Ok(Some((top, CacheResult::Miss)))
                }
                other => {
                    self.unlock(&lock, &token).await;
                    other.map(|_| None)
                }
            },
            Locked::GaveUp => Ok(build().await?.map(|b| (top_of(&b, n), CacheResult::Miss))),
        }
    }

    /// Rebuilds `model`'s board with `build` unless another rebuild holds the lock (then that
    /// one's result stands); returns whether this call wrote it. What warmers and the scoring
    /// run call.
    pub async fn refresh_board<E, F, Fut>(&self, model: &str, build: F) -> Result<bool, E>
    where
        E: From<CacheError>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Board>, E>>,
    {
        let lock = self.board_key(model, "lock");
        let Some(token) = self.try_lock(&lock).await? else {
            return Ok(false);
        };
        let res = match build().await {
            Ok(Some(board)) => self.put_board(model, &board).await.map(|_| true).map_err(E::from),
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        };
        self.unlock(&lock, &token).await;
        res
    }

    /// Writes `board` as `model`'s leaderboard (replacing the old one atomically).
    pub async fn put_board(&self, model: &str, board: &Board) -> Result<(), CacheError> {
        let mut c = self.conn.clone();
        let tmp = self.board_key(model, &format!("tmp.{}", uuid::Uuid::new_v4().simple()));
        for chunk in board.entries.chunks(LOAD_BATCH) {
            let items: Vec<(f64, &str)> = chunk.iter().map(|(s, v)| (*v, s.as_str())).collect();
            let () = c.zadd_multiple(&tmp, &items).await?;
        }
        // The temporary key expires by itself should this process die before the swap.
        let () = c.pexpire(&tmp, 600_000).await?;
        let ttl_ms = self.jittered_ttl().as_millis() as u64;
        let () = redis::Script::new(PUT_BOARD)
            .key(self.board_key(model, "board"))
            .key(self.board_key(model, "meta"))
            .key(&tmp)
            .arg(serde_json::to_string(&board.meta)?)
            .arg(ttl_ms)
            .invoke_async(&mut c)
            .await
            .map(|_: i64| ())?;
        Ok(())
    }

    /// A JSON read model `cache`/`id`: from Redis, or computed with `compute` under the
    /// stampede lock and cached.
    pub async fn json_or_compute<T, E, F, Fut>(
        &self,
        cache: &str,
        id: &str,
        compute: F,
    ) -> Result<(T, CacheResult), E>
    where
        T: Serialize + DeserializeOwned,
        E: From<CacheError>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let key = self.value_key(cache, id, "value");
        if let Some(v) = self.get_json::<T>(&key).await? {
            return Ok((v, CacheResult::Hit));
        }
        let lock = self.value_key(cache, id, "lock");
        match self.under_lock(&lock, || self.get_json::<T>(&key)).await? {
            Locked::Found(v) => Ok((v, CacheResult::Hit)),
            Locked::Acquired(token) => {
                let computed = compute().await;
                if let Ok(v) = &computed {
                    let put = self.put_json(&key, v).await;
                    self.unlock(&lock, &token).await;
                    put?;
                } else {
                    self.unlock(&lock, &token).await;
                }
                computed.map(|v| (v, CacheResult::Miss))
            }
            Locked::GaveUp => compute().await.map(|v| (v, CacheResult::Miss)),
        }
    }

    /// Writes JSON read model `cache`/`id` (what warmers call).
    pub async fn put_json_model<T: Serialize>(
        &self,
        cache: &str,
        id: &str,
        value: &T,
    ) -> Result<(), CacheError> {
        self.put_json(&self.value_key(cache, id, "value"), value).await
    }

    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, CacheError> {
        let mut c = self.conn.clone();
        let raw: Option<String> = c.get(key).await?;
        Ok(raw.map(|s| serde_json::from_str(&s)).transpose()?)
    }

    async fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<(), CacheError> {
        let mut c = self.conn.clone();
        let text = serde_json::to_string(value)?;
        let () = c
            .pset_ex(key, text, self.jittered_ttl().as_millis() as u64)
            .await?;
        Ok(())
    }

    async fn try_lock(&self, lock: &str) -> Result<Option<String>, CacheError> {
        let mut c = self.conn.clone();
        let token = uuid::Uuid::new_v4().simple().to_string();
        let got: Option<String> = redis::cmd("SET")
            .arg(lock)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(self.settings.lock_ttl.as_millis() as u64)
            .query_async(&mut c)
            .await?;
        Ok(got.map(|_| token))
    }

    async fn unlock(&self, lock: &str, token: &str) {
        let mut c = self.conn.clone();
        let res: Result<i64, _> = redis::Script::new(UNLOCK)
            .key(lock)
            .arg(token)
            .invoke_async(&mut c)
            .await;
        if let Err(error) = res {
            // The lock then expires by itself after lock_ttl.
            tracing::warn!(%error, lock, "releasing a cache lock failed");
        }
    }

    /// Takes `lock`, or waits for whoever holds it to make `look` find the value.
    async fn under_lock<T, F, Fut>(&self, lock: &str, look: F) -> Result<Locked<T>, CacheError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<T>, CacheError>>,
    {
        let deadline = tokio::time::Instant::now() + self.settings.wait;
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(token) = self.try_lock(lock).await? {
                // Someone may have rebuilt it between our first look and our lock.
                if let Some(v) = look().await? {
                    self.unlock(lock, &token).await;
                    return Ok(Locked::Found(v));
                }
                return Ok(Locked::Acquired(token));
            }
            if let Some(v) = look().await? {
                return Ok(Locked::Found(v));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Locked::GaveUp);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

enum Locked<T> {
    /// The value appeared (another caller rebuilt it).
    Found(T),
    /// We hold the lock (its token) and must rebuild.
    Acquired(String),
    /// The wait ran out.
    GaveUp,
}

/// The best `n` of `board`, best first (ties by subject, as Redis orders them: ZREVRANGE
/// sorts equal scores by descending member).
pub fn top_of(board: &Board, n: usize) -> Top {
    let mut entries = board.entries.clone();
    entries.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    entries.truncate(n);
    Top {
        meta: board.meta.clone(),
        entries,
    }
}

fn jittered(ttl: Duration, jitter: f64) -> Duration {
    let j = jitter.clamp(0.0, 0.9);
    let f = if j > 0.0 {
        rand::rng().random_range(1.0 - j..=1.0 + j)
    } else {
        1.0
    };
    ttl.mul_f64(f).max(Duration::from_millis(1))
}

/// Builds `model`'s whole board from the database (`None`: no such model). What a miss, a
/// warmer and a finished scoring run all load into Redis.
pub async fn build_board(
    db: &sea_orm::DatabaseConnection,
    model: &str,
) -> Result<Option<Board>, schema::DbError> {
    if schema::scores::get_model(db, model).await?.is_none() {
        return Ok(None);
    }
    let entries = schema::scores::ranking(db, model).await?;
    let last = schema::scores::runs(db, model, 10)
        .await?
        .into_iter()
        .find(|r| r.status == "succeeded");
    Ok(Some(Board {
        meta: BoardMeta {
            run_id: last.as_ref().map(|r| r.id),
            as_of: last.as_ref().map(|r| r.as_of),
            subjects: entries.len() as u64,
        },
        entries,
    }))
}

/// The analytics summary read model of `source`/`bucket` at `now`: each name's newest
/// complete bucket, with the anomalies of the last 24 buckets.
pub async fn build_summary(
    db: &sea_orm::DatabaseConnection,
    source: crate::families::analytics::Source,
    bucket: crate::families::analytics::Bucket,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<schema::analytics::NameSummary>, schema::DbError> {
    let current = bucket.floor(now);
    schema::analytics::summary(
        db,
        source.as_str(),
        bucket.as_str(),
        current - bucket.size() * 24,
        current,
    )
    .await
}

/// The key of the analytics summary read model of `source`/`bucket`.
pub fn summary_id(
    source: crate::families::analytics::Source,
    bucket: crate::families::analytics::Bucket,
) -> String {
    format!("{}.{}", source.as_str(), bucket.as_str())
}

/// The cache name (metric label and key part) of the analytics summaries.
pub const SUMMARY_CACHE: &str = "analytics-summary";
/// The cache name of the score leaderboards.
pub const LEADERBOARD_CACHE: &str = "leaderboard";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_spread_within_the_jitter() {
        let ttl = Duration::from_secs(100);
        let seen: Vec<Duration> = (0..200).map(|_| jittered(ttl, 0.1)).collect();
        assert!(
            seen.iter()
                .all(|d| *d >= Duration::from_secs(90) && *d <= Duration::from_secs(110))
        );
        let distinct: std::collections::BTreeSet<_> = seen.iter().collect();
        assert!(distinct.len() > 100, "TTLs do not spread: {distinct:?}");
        assert_eq!(jittered(ttl, 0.0), ttl);
    }

    #[test]
    fn the_top_of_a_board_is_best_first_with_redis_tie_order() {
        let board = Board {
            meta: BoardMeta {
                run_id: None,
                as_of: None,
                subjects: 4,
            },
            entries: vec![
                ("a".into(), 1.0),
                ("c".into(), 5.0),
                ("b".into(), 5.0),
                ("d".into(), 0.5),
            ],
        };
        let top = top_of(&board, 3);
        assert_eq!(
            top.entries,
            [("c".into(), 5.0), ("b".into(), 5.0), ("a".into(), 1.0)]
        );
    }
}
