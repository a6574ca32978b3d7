//! Rate limits: GCRA (the token bucket as one timestamp per bucket: its "theoretical arrival
//! time"), per API key, per client IP, and — stricter — per client IP for failed
//! authentications.
//!
//! When the broker is Redis the buckets live there, so every API replica draws from the same
//! ones: one Lua script checks and charges all of a request's buckets atomically, with Redis's
//! clock (`TIME`), so replicas' clocks do not matter. Otherwise they live in this process.
//! A Redis error lets the request through (logged): rate limits protect capacity, they are
//! not what keeps a caller out, and the broker being down fails the request anyway.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use redis::aio::ConnectionManager;

/// A sustained rate and the burst allowed above it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Requests per second, sustained.
    pub per_second: f64,
    /// Requests allowed at once from a full bucket (at least 1).
    pub burst: u32,
}

impl Rate {
    /// Microseconds between two requests at the sustained rate.
    fn interval_us(self) -> f64 {
        1e6 / self.per_second.max(1e-6)
    }
}

/// The limits [`crate::auth::Guard`] applies; `None` turns one off.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimits {
    /// Requests per API key. Default off: one client may push the whole enqueue benchmark
    /// (20 000 requests/s) through one key.
    pub per_key: Option<Rate>,
    /// Requests per client IP (authenticated ones). Default off, for the same reason.
    pub per_ip: Option<Rate>,
    /// Failed authentications per client IP. Default 1/s with a burst of 20: a client that
    /// keeps presenting wrong keys is answered 429 (and costs no database read) instead of
    /// getting to guess on.
    pub auth_failures: Option<Rate>,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            per_key: None,
            per_ip: None,
            auth_failures: Some(Rate {
                per_second: 1.0,
                burst: 20,
            }),
        }
    }
}

/// One bucket a request draws from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Bucket {
    name: String,
    rate: Rate,
}

impl Bucket {
    pub(crate) fn key(key_id: &str, rate: Rate) -> Self {
        Self {
            name: format!("key:{key_id}"),
            rate,
        }
    }

    /// A client address's requests; requests without one (a test client) share `ip:unknown`.
    pub(crate) fn ip(ip: Option<IpAddr>, rate: Rate) -> Self {
        Self::of_client("ip", ip, rate)
    }

    /// A client address's failed authentications (apart from its requests).
    pub(crate) fn auth_failures(ip: Option<IpAddr>, rate: Rate) -> Self {
        Self::of_client("authfail", ip, rate)
    }

    fn of_client(what: &str, ip: Option<IpAddr>, rate: Rate) -> Self {
        let name = match ip {
            Some(ip) => format!("{what}:{ip}"),
            None => format!("{what}:unknown"),
        };
        Self { name, rate }
    }

    fn redis_key(&self, prefix: &str) -> String {
        // One hash tag for every bucket: a script touching a key bucket and an IP bucket stays
        // in one Redis Cluster slot.
        format!("{prefix}:{{ratelimit}}:{}", self.name)
    }
}

/// Where the buckets live; see the module docs.
pub enum RateLimiter {
    Local(Mutex<LocalBuckets>),
    Redis {
        conn: ConnectionManager,
        prefix: String,
        script: redis::Script,
    },
}

#[derive(Default)]
pub struct LocalBuckets {
    /// Theoretical arrival time of each bucket, in µs since `epoch`.
    tat: HashMap<String, f64>,
    epoch: Option<Instant>,
}

/// Local buckets beyond which the idle ones (their TAT in the past) are forgotten.
const MAX_LOCAL_BUCKETS: usize = 100_000;

/// KEYS: the buckets. ARGV: `dry` (1 = only check), then per bucket its interval (µs) and
/// burst. Returns 0 if every bucket admits the request (and, unless dry, charges them all),
/// else the µs to wait until the first refusing bucket would admit it.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local dry = ARGV[1] == '1'
local new = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local over = (tat - now) - interval * (burst - 1)
  if over > 0 then return math.ceil(over) end
  new[i] = tat + interval
end
if not dry then
  for i, key in ipairs(KEYS) do
    redis.call('SET', key, string.format('%.0f', new[i]), 'PX', math.ceil((new[i] - now) / 1000) + 1)
  end
end
return 0
";

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::Local(Mutex::default())
    }
}

impl RateLimiter {
    /// Buckets in Redis under `{prefix}:{ratelimit}:…`, shared by every API replica that uses
    /// the same Redis and prefix.
    pub async fn redis(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(RateLimiter::Redis {
            conn,
            prefix: prefix.to_owned(),
            script: redis::Script::new(SCRIPT),
        })
    }

    /// Charges one request to every bucket if all admit it; otherwise charges none and says
    /// how long to wait.
    pub(crate) async fn acquire(&self, buckets: &[Bucket]) -> Result<(), Duration> {
        if buckets.is_empty() {
            return Ok(());
        }
        match self.run(buckets, false).await {
            None => Ok(()),
            Some(wait) => Err(wait),
        }
    }

    /// How long until the bucket would admit a request, if it would not now; charges nothing.
    pub(crate) async fn peek(&self, bucket: &Bucket) -> Option<Duration> {
        self.run(std::slice::from_ref(bucket), true).await
    }

    async fn run(&self, buckets: &[Bucket], dry: bool) -> Option<Duration> {
        match self {
            RateLimiter::Local(local) => local.lock().expect("rate limiter poisoned").run(buckets, dry),
            RateLimiter::Redis { conn, prefix, script } => {
                let mut invocation = script.prepare_invoke();
                invocation.arg(if dry { 1 } else { 0 });
                for b in buckets {
                    invocation
                        .key(b.redis_key(prefix))
                        .arg(b.rate.interval_us())
                        .arg(b.rate.burst.max(1));
                }
                let mut conn = conn.clone();
                match invocation.invoke_async::<u64>(&mut conn).await {
                    Ok(0) => None,
                    Ok(wait_us) => Some(Duration::from_micros(wait_us)),
                    Err(error) => {
                        tracing::warn!(%error, "rate limit check failed; letting the request through");
                        None
                    }
                }
            }
        }
    }
}

impl LocalBuckets {
    fn run(&mut self, buckets: &[Bucket], dry: bool) -> Option<Duration> {
        let epoch = *self.epoch.get_or_insert_with(Instant::now);
        let now = epoch.elapsed().as_secs_f64() * 1e6;
        let mut new = Vec::with_capacity(buckets.len());
        for b in buckets {
            let interval = b.rate.interval_us();
            let tat = self.tat.get(&b.name).copied().unwrap_or(0.0).max(now);
            // Measured from `now` so a fresh bucket (tat == now) compares 0 with 0 exactly:
            // `tat + interval - interval * burst` rounds, and refused a full bucket by 1 µs.
            let over = (tat - now) - interval * f64::from(b.rate.burst.max(1) - 1);
            if over > 0.0 {
                return Some(Duration::from_micros(over.ceil() as u64));
            }
            new.push(tat + interval);
        }
        if !dry {
            if self.tat.len() >= MAX_LOCAL_BUCKETS {
                self.tat.retain(|_, tat| *tat > now);
            }
            for (b, tat) in buckets.iter().zip(new) {
                self.tat.insert(b.name.clone(), tat);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_bucket_admits_its_burst_then_its_rate() {
        let mut local = LocalBuckets::default();
        let b = Bucket::key(
            "k",
            Rate {
                per_second: 10.0,
                burst: 3,
            },
        );
        for _ in 0..3 {
            assert_eq!(local.run(std::slice::from_ref(&b), false), None);
        }
        let wait = local
            .run(std::slice::from_ref(&b), false)
            .expect("the burst is spent");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // A dry run and a refused request charge nothing.
        assert!(local.run(std::slice::from_ref(&b), true).is_some());
        std::thread::sleep(wait + Duration::from_millis(2));
        assert_eq!(local.run(std::slice::from_ref(&b), false), None);
        assert!(local.run(std::slice::from_ref(&b), false).is_some());
    }

    #[test]
    fn a_request_refused_by_one_bucket_charges_none() {
        let mut local = LocalBuckets::default();
        let roomy = Bucket::key(
            "a",
            Rate {
                per_second: 1.0,
                burst: 5,
            },
        );
        let tight = Bucket::ip(
            None,
            Rate {
                per_second: 1.0,
                burst: 1,
            },
        );
        assert_eq!(local.run(&[roomy.clone(), tight.clone()], false), None);
        assert!(local.run(&[roomy.clone(), tight], false).is_some());
        // `roomy` was charged once, not twice: four more fit.
        for _ in 0..4 {
            assert_eq!(local.run(std::slice::from_ref(&roomy), false), None);
        }
        assert!(local.run(std::slice::from_ref(&roomy), false).is_some());
    }
}
