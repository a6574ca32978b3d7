//! `drover bench`: the queue benchmark workload of `../shared/bench/WORKLOAD.md`, run against a
//! real broker, printed as one `RESULT` line that sits beside BullMQ's.
//!
//! The harness (this process) enqueues and measures; the workers run in a child process — this
//! same binary, `drover bench-worker` — with the production defaults (retry policy, history
//! writer, metrics), so `rss_mib` is the worker side's own peak. The child reports on stdout in
//! lines starting with `BENCH`: the first pickup, the moment the broker has recorded the N-th
//! outcome, and the latency samples. Everything the benchmark creates lives under a prefix of its
//! own and is deleted at the end.

use std::{
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use jobs::{BrokerOptions, Catalog, CatalogConfig, Job, JobId, Producer, QueueName};
use serde_json::value::RawValue;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    process::{Child, ChildStdout, Command},
};

use crate::{
    app::{Migrations, Stack},
    config::{Connections, Secret},
};

/// The workload's knobs; defaults are the workload's.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Broker to measure: redis://…, amqp://… or sqlite://….
    #[arg(env = "BENCH_BROKER_URL", default_value = "redis://127.0.0.1:6379/0")]
    pub broker_url: Secret,
    /// History database the workers write to (default: the broker's file for sqlite://,
    /// otherwise a temporary SQLite file). Pass postgres://… to measure the production setup.
    #[arg(long, env = "BENCH_DATABASE_URL")]
    pub database_url: Option<Secret>,
    /// Jobs in the drain phase.
    #[arg(long, env = "BENCH_N", default_value_t = 20_000)]
    pub n: usize,
    /// Worker concurrency in all.
    #[arg(long, env = "BENCH_CONC", default_value_t = 50)]
    pub conc: usize,
    /// Jobs in the latency phase.
    #[arg(long, env = "BENCH_LAT_N", default_value_t = 2_000)]
    pub lat_n: usize,
    /// Jobs per second the latency phase's producer sends.
    #[arg(long, env = "BENCH_LAT_RATE", default_value_t = 500.0)]
    pub lat_rate: f64,
    /// Jobs per bulk enqueue call in the drain phase (the API's batch endpoint takes up to 1,000).
    #[arg(long, env = "BENCH_CHUNK", default_value_t = 1_000)]
    pub chunk: usize,
    /// Gives up after this many seconds.
    #[arg(long, env = "BENCH_TIMEOUT", default_value_t = 300)]
    pub timeout_s: u64,
}

/// Settings of the worker child, passed through its environment.
#[derive(Args, Clone, Debug)]
pub struct BenchWorkerArgs {
    #[command(flatten)]
    pub conn: Connections,
    #[arg(long, env = "BENCH_CONC")]
    pub conc: usize,
    #[arg(long, env = "BENCH_N")]
    pub n: usize,
    #[arg(long, env = "BENCH_LAT_N")]
    pub lat_n: usize,
}

const QUEUE: &str = "noop";

/// Runs the whole workload and prints the `RESULT` line.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let url = args.broker_url.expose().to_owned();
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or_default();
    let broker_kind = match scheme {
        "redis" | "rediss" => "redis",
        "amqp" | "amqps" => "amqp",
        "sqlite" => "sqlite",
        _ => bail!("unsupported broker URL: expected redis://, amqp:// or sqlite://"),
    };
    let prefix = format!("drover_bench_{}", std::process::id());
    let temp_db = std::env::temp_dir().join(format!("{prefix}.db"));
    let database_url = match &args.database_url {
        Some(u) => u.expose().to_owned(),
        None if broker_kind == "sqlite" => url.clone(),
        None => format!("sqlite://{}", temp_db.display()),
    };
    let history = database_url.split_once("://").map_or("?", |(s, _)| s).to_owned();
    let db = schema::connect(&database_url)
        .await
        .context("connecting to the history database")?;
    schema::migrate(&db)
        .await
        .context("migrating the history database")?;
    let broker = jobs::broker::connect(
        &url,
        BrokerOptions {
            prefix: prefix.clone(),
            db: db.clone(),
            amqp_queue_type: Default::default(),
        },
    )
    .await
    .with_context(|| format!("connecting to the {broker_kind} broker"))?;
    let conn = Connections {
        broker_url: args.broker_url.clone(),
        database_url: database_url.parse().expect("infallible"),
        broker_prefix: prefix,
        amqp_queue_type: Default::default(),
        config: None,
    };
    let result = tokio::time::timeout(
        Duration::from_secs(args.timeout_s),
        workload(&args, broker.clone(), &conn),
    )
    .await
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "the benchmark timed out after {} s",
            args.timeout_s
        ))
    });
    if let Err(e) = broker.destroy().await {
        eprintln!("bench: cleaning up the broker's keys/queues failed: {e}");
    }
    db.close().await.ok();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", temp_db.display()));
    }
    let m = result?;
    println!(
        "RESULT name=drover-{broker_kind} jobs={} enqueue_s={:.3} drain_s={:.3} jobs_per_s={:.0} \
         p50_ms={:.2} p99_ms={:.2} max_ms={:.2} drain_wall_s={:.3} enqueue_per_s={:.0} bulk=yes \
         conc={} lat_n={} lat_rate={:.0} rss_mib={:.0} load1={} history={history} chunk={} \
         worker_cpu_us={:.1} broker_cpu_us={}",
        args.n,
        m.enqueue_s,
        m.drain_s,
        args.n as f64 / m.drain_s,
        percentile(&m.latencies_ms, 50.0),
        percentile(&m.latencies_ms, 99.0),
        m.latencies_ms.last().copied().unwrap_or(f64::NAN),
        m.drain_wall_s,
        args.n as f64 / m.enqueue_s,
        args.conc,
        m.latencies_ms.len(),
        m.lat_rate,
        m.rss_kib as f64 / 1024.0,
        m.load1,
        args.chunk,
        m.worker_cpu_us,
        m.broker_cpu_us.map_or("-".into(), |c| format!("{c:.1}")),
    );
    Ok(())
}

struct Measured {
    enqueue_s: f64,
    drain_s: f64,
    drain_wall_s: f64,
    /// Sorted.
    latencies_ms: Vec<f64>,
    lat_rate: f64,
    rss_kib: u64,
    load1: String,
    /// CPU time per drained job: the worker process's (start-up included), the broker's.
    worker_cpu_us: f64,
    broker_cpu_us: Option<f64>,
}

async fn workload(
    args: &BenchArgs,
    broker: Arc<dyn Producer>,
    conn: &Connections,
) -> anyhow::Result<Measured> {
    let catalog = Catalog::new(&CatalogConfig::default());
    let spec = catalog.validate("noop", &RawValue::from_string("{}".into())?)?;
    let max_attempts = spec.retry.max_attempts;
    let queue = QueueName::parse(QUEUE)?;
    let job = |at_us: i64| Job {
        id: JobId::new(),
        queue: queue.clone(),
        kind: "noop".into(),
        payload: RawValue::from_string(format!(r#"{{"enqueued_at_us":{at_us}}}"#)).expect("valid JSON"),
        max_attempts,
        priority: 0,
        enqueued_at_ms: at_us / 1_000,
        run_at_ms: None,
        trace_id: None,
        idempotency_key: None,
        attempt: 0,
        crashes: 0,
        attempts_before: 0,
        receipt: 0,
    };
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default();

    // A: drain. Enqueue everything first, with no worker running.
    let t0 = Instant::now();
    let mut left = args.n;
    while left > 0 {
        let n = left.min(args.chunk.max(1));
        let at = now_us();
        let batch: Vec<Job> = (0..n).map(|_| job(at)).collect();
        broker.push_batch(batch).await.context("bulk enqueue")?;
        left -= n;
    }
    let enqueue_s = t0.elapsed().as_secs_f64();
    let stats = broker.stats(&queue).await?;
    if stats.pending != args.n as u64 {
        bail!(
            "expected {} pending jobs after the enqueue, the broker has {}",
            args.n,
            stats.pending
        );
    }
    eprintln!("bench: enqueued {} in {enqueue_s:.3}s", args.n);

    let broker_cpu_before = broker_cpu_us(conn).await;
    let spawned_us = now_us();
    let mut child = spawn_worker(args, conn)?;
    let pid = child.id().unwrap_or_default();
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let first_us: i64 = expect_line(&mut lines, &mut child, "first").await?.parse()?;
    let drained_us: i64 = expect_line(&mut lines, &mut child, "drained").await?.parse()?;
    let worker_cpu_us = process_cpu_ns(pid).unwrap_or_default() as f64 / 1e3 / args.n as f64;
    let broker_cpu_us = match (broker_cpu_before, broker_cpu_us(conn).await) {
        (Some(a), Some(b)) => Some((b - a) / args.n as f64),
        _ => None,
    };
    let drain_s = (drained_us - first_us) as f64 / 1e6;
    let drain_wall_s = (drained_us - spawned_us) as f64 / 1e6;
    eprintln!("bench: drained in {drain_s:.3}s (wall incl. worker start {drain_wall_s:.3}s)");

    // B: latency, on the now idle workers, one job at a time on an absolute schedule.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let period = Duration::from_secs_f64(1.0 / args.lat_rate.max(1.0));
    let p0 = tokio::time::Instant::now();
    for i in 0..args.lat_n {
        tokio::time::sleep_until(p0 + period * i as u32).await;
        broker
            .push(job(now_us()))
            .await
            .context("enqueue (latency phase)")?;
    }
    let lat_rate = args.lat_n as f64 / p0.elapsed().as_secs_f64();
    let samples = expect_line(&mut lines, &mut child, "latency").await?;
    let mut latencies_ms = samples
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<i64>().map(|us| us as f64 / 1e3))
        .collect::<Result<Vec<_>, _>>()?;
    latencies_ms.sort_by(f64::total_cmp);

    let rss_kib = peak_rss_kib(child.id().unwrap_or_default()).unwrap_or_default();
    // Closing its stdin is the child's shutdown signal.
    drop(child.stdin.take());
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(status) => {
            let status = status?;
            if !status.success() {
                eprintln!("bench: the worker exited with {status}");
            }
        }
        Err(_) => {
            eprintln!("bench: the worker did not stop within 30 s; killing it");
            child.kill().await.ok();
        }
    }
    Ok(Measured {
        enqueue_s,
        drain_s,
        drain_wall_s,
        latencies_ms,
        lat_rate,
        rss_kib,
        load1,
        worker_cpu_us,
        broker_cpu_us,
    })
}

/// CPU time of every thread of a live process so far, in ns (scheduler statistics, which are
/// exact where `/proc/PID/stat` counts 10 ms ticks).
fn process_cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// The Redis server's CPU time so far (`INFO cpu`), in µs; `None` for other brokers.
async fn broker_cpu_us(conn: &Connections) -> Option<f64> {
    let url = conn.broker_url.expose();
    if !url.starts_with("redis") {
        return None;
    }
    let client = redis::Client::open(url).ok()?;
    let mut c = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut c).await.ok()?;
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
            .trim()
            .parse()
            .ok()
    };
    Some((field("used_cpu_user")? + field("used_cpu_sys")?) * 1e6)
}

fn spawn_worker(args: &BenchArgs, conn: &Connections) -> anyhow::Result<Child> {
    Command::new(std::env::current_exe().context("locating the drover binary")?)
        .arg("bench-worker")
        .env("DROVER_BROKER_URL", conn.broker_url.expose())
        .env("DROVER_DATABASE_URL", conn.database_url.expose())
        .env("DROVER_BROKER_PREFIX", &conn.broker_prefix)
        .env("BENCH_CONC", args.conc.to_string())
        .env("BENCH_N", args.n.to_string())
        .env("BENCH_LAT_N", args.lat_n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the worker process")
}

/// The value of the child's next `BENCH <what> <value>` line; other lines are its logs.
async fn expect_line(
    lines: &mut tokio::io::Lines<BufReader<ChildStdout>>,
    child: &mut Child,
    what: &str,
) -> anyhow::Result<String> {
    while let Some(line) = lines.next_line().await? {
        let Some(rest) = line.strip_prefix("BENCH ") else {
            eprintln!("worker: {line}");
            continue;
        };
        let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
        if key == what {
            return Ok(value.to_owned());
        }
        bail!("expected `BENCH {what}` from the worker, got {line:?}");
    }
    let status = child.wait().await?;
    bail!("the worker process ended ({status}) before reporting `{what}`")
}

/// Peak resident set (VmHWM) of a live process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The worker side: production workers on queue `noop`, reporting to the harness.
pub async fn worker(args: BenchWorkerArgs) -> anyhow::Result<()> {
    let catalog = Catalog::new(&CatalogConfig::default());
    let stack = Stack::connect(&args.conn, catalog, Migrations::Require).await?;
    // What `drover worker` records metrics into (see `app::run_workers`).
    api::install_metrics();
    let (probe, mut pickups) = tokio::sync::mpsc::unbounded_channel();
    let settings = workers::WorkerSettings {
        queues: vec![QueueName::parse(QUEUE)?],
        concurrency: args.conc.max(1),
        ..Default::default()
    };
    let settled = settings.settled.clone();
    let (stop, wait) = crate::app::broadcast_shutdown();
    tokio::spawn(async move {
        // The harness closes our stdin to stop us (or dies, which closes it too).
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        let _ = stop.send(true);
    });
    let running = tokio::spawn(workers::run(
        stack.broker.clone(),
        stack.catalog.clone(),
        Arc::new(workers::Registry::standard()),
        Arc::new(workers::Deps {
            pickup_probe: Some(probe),
            ..Default::default()
        }),
        Some(stack.history.clone()),
        settings,
        wait(),
    ));

    let first = pickups.recv().await.context("no job was picked up")?;
    println!("BENCH first {}", first.picked_up_at_us);
    settled.reached(args.n as u64).await;
    println!("BENCH drained {}", now_us());
    // Every drain job reported its pickup before its outcome was settled.
    for _ in 1..args.n {
        pickups
            .try_recv()
            .context("a drain job's pickup report is missing")?;
    }
    let mut samples = String::with_capacity(args.lat_n * 6);
    for _ in 0..args.lat_n {
        let p = pickups.recv().await.context("the workers stopped")?;
        samples.push_str(&p.latency_us().to_string());
        samples.push(',');
    }
    println!("BENCH latency {samples}");
    running.await??;
    stack.close(Duration::from_secs(10)).await;
    Ok(())
}

fn now_us() -> i64 {
    workers::families::builtin::now_us()
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
