//! What operators watch: `/metrics` of the API and of a worker, parsed as Prometheus parses it,
//! and the JSON log lines of a request and its job, joined by one trace id.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_parse::{Scrape, Value};
use serde_json::{Value as Json, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Child,
};

use crate::{
    process::{create_key, drover, free_port},
    support::{
        REDIS_URL, authorized_client, create_pg_database, delete_redis_prefix, drop_pg_database, unique,
    },
};

/// `drover api` and `drover worker` (with its probe listener) on Redis and their own Postgres
/// database, their log lines (stdout) collected.
struct Deployment {
    api: String,
    worker: String,
    http: reqwest::Client,
    logs: Arc<Mutex<Vec<String>>>,
    processes: Vec<Child>,
    prefix: String,
    pg_name: String,
}

impl Deployment {
    async fn start(extra_env: &[(&str, &str)]) -> Self {
        let prefix = unique("t");
        let (pg_name, db_url) = create_pg_database().await;
        let env = [
            ("DROVER_BROKER_URL", REDIS_URL),
            ("DROVER_DATABASE_URL", db_url.as_str()),
            ("DROVER_BROKER_PREFIX", prefix.as_str()),
        ];
        assert!(
            drover()
                .arg("migrate")
                .envs(env)
                .status()
                .await
                .unwrap()
                .success()
        );
        let key = create_key(&env, &["--role", "operator", "--name", "observer"]).await;
        let (api_port, worker_port) = (free_port(), free_port());
        let logs = Arc::new(Mutex::new(Vec::new()));
        let mut processes = Vec::new();
        for args in [
            vec![
                "api".to_owned(),
                "--listen".into(),
                format!("127.0.0.1:{api_port}"),
            ],
            vec![
                "worker".to_owned(),
                "--queues".into(),
                "noop,default".into(),
                "--health-listen".into(),
                format!("127.0.0.1:{worker_port}"),
            ],
        ] {
            let mut child = drover()
                .args(&args)
                .envs(env)
                .envs(extra_env.iter().copied())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().expect("stdout piped")).lines();
            let logs = logs.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    logs.lock().unwrap().push(line);
                }
            });
            processes.push(child);
        }
        let deployment = Deployment {
            api: format!("http://127.0.0.1:{api_port}"),
            worker: format!("http://127.0.0.1:{worker_port}"),
            http: authorized_client(&key),
            logs,
            processes,
            prefix,
            pg_name,
        };
        for base in [&deployment.api, &deployment.worker] {
            let start = Instant::now();
            while !deployment
                .http
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "{base} never got ready"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        deployment
    }

    async fn scrape(&self, base: &str) -> Scrape {
        let text = self
            .http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format")
    }

    async fn enqueue(&self, body: Json, traceparent: Option<&str>) -> String {
        let mut req = self.http.post(format!("{}/v1/jobs", self.api)).json(&body);
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 202);
        resp.json::<Json>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn wait_job(&self, id: &str, status: &str) {
        let start = Instant::now();
        loop {
            let job: Json = self
                .http
                .get(format!("{}/v1/jobs/{id}", self.api))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if job["status"] == status {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "job {id} never {status}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        for p in &mut self.processes {
            let _ = p.kill().await;
        }
        delete_redis_prefix(REDIS_URL, &self.prefix).await;
        drop_pg_database(&self.pg_name).await;
    }
}

/// The value of the sample `metric{labels}` (0 when absent: a counter not yet incremented),
/// or for a histogram, its number of observations.
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
    match sample.map(|s| &s.value) {
        None => 0.0,
        Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
        Some(Value::Histogram(buckets)) => {
            buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .expect("a +Inf bucket")
                .count
        }
        Some(other) => panic!("{metric} is a {other:?}"),
    }
}

/// Twenty jobs that succeed and two that fail for good (two attempts each) move the API's
/// enqueued counters and the worker's completed counters and duration histogram by exactly
/// that much; the worker also reports its slots, its heartbeat and its broker round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_exactly_the_jobs_run() {
    let d = Deployment::start(&[
        ("DROVER_RETRY_MAX_ATTEMPTS", "2"),
        ("DROVER_RETRY_INITIAL_MS", "10"),
        ("DROVER_RETRY_JITTER", "0"),
    ])
    .await;
    let (api_before, worker_before) = (d.scrape(&d.api).await, d.scrape(&d.worker).await);

    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push((
            d.enqueue(json!({"kind": "noop", "payload": {}}), None).await,
            "succeeded",
        ));
    }
    for _ in 0..2 {
        let failing = json!({"kind": "sleep", "payload": {"ms": 1, "fail_first": 5}});
        ids.push((d.enqueue(failing, None).await, "dead"));
    }
    for (id, status) in &ids {
        d.wait_job(id, status).await;
    }
    let (api_after, worker_after) = (d.scrape(&d.api).await, d.scrape(&d.worker).await);

    let moved = |before: &Scrape, after: &Scrape, metric: &str, labels: &[(&str, &str)]| {
        value(after, metric, labels) - value(before, metric, labels)
    };
    let noop = [("queue", "noop"), ("kind", "noop")];
    let sleep = [("queue", "default"), ("kind", "sleep")];
    let enqueued = "drover_jobs_enqueued_total";
    assert_eq!(moved(&api_before, &api_after, enqueued, &noop), 20.0);
    assert_eq!(moved(&api_before, &api_after, enqueued, &sleep), 2.0);

    let completed = "drover_jobs_completed_total";
    let outcome = |labels: &[(&'static str, &'static str)], outcome: &'static str| {
        let mut l = labels.to_vec();
        l.push(("outcome", outcome));
        moved(&worker_before, &worker_after, completed, &l)
    };
    assert_eq!(outcome(&noop, "succeeded"), 20.0);
    assert_eq!(outcome(&noop, "retried") + outcome(&noop, "dead"), 0.0);
    assert_eq!(
        (
            outcome(&sleep, "succeeded"),
            outcome(&sleep, "retried"),
            outcome(&sleep, "dead")
        ),
        (0.0, 2.0, 2.0)
    );
    let duration = "drover_job_duration_seconds";
    assert_eq!(moved(&worker_before, &worker_after, duration, &noop), 20.0);
    assert_eq!(moved(&worker_before, &worker_after, duration, &sleep), 4.0);

    // The worker's own health: its slots, none busy now, a heartbeat within the last minute,
    // and the broker calls that ran the jobs.
    let noop_queue = [("queue", "noop")];
    assert!(value(&worker_after, "drover_worker_slots", &noop_queue) >= 1.0);
    assert_eq!(value(&worker_after, "drover_worker_busy_slots", &noop_queue), 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let beat = value(
        &worker_after,
        "drover_worker_heartbeat_timestamp_seconds",
        &noop_queue,
    );
    assert!(
        (now - 60.0..=now + 1.0).contains(&beat),
        "heartbeat {beat}, now {now}"
    );
    let rtt = "drover_broker_request_duration_seconds";
    assert!(moved(&worker_before, &worker_after, rtt, &[("operation", "fetch")]) >= 1.0);
    assert!(moved(&worker_before, &worker_after, rtt, &[("operation", "settle")]) >= 1.0);
    assert!(moved(&api_before, &api_after, rtt, &[("operation", "enqueue")]) >= 1.0);
    // Both processes write job history; what they recorded is written by now or soon, and
    // the lag is exported either way.
    for scrape in [&api_after, &worker_after] {
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric == "drover_history_lag_events" && s.labels.get("writer") == Some("history")),
            "no history lag gauge"
        );
    }
    d.stop().await;
}

/// The fields of the spans a JSON log line was logged in (`drover` logs with
/// `with_span_list`), innermost last.
fn spans(line: &Json) -> Vec<&serde_json::Map<String, Json>> {
    line["spans"]
        .as_array()
        .map(|spans| spans.iter().filter_map(Json::as_object).collect())
        .unwrap_or_default()
}

/// With `DROVER_LOG_FORMAT=json`, the API's line for a request sent with a `traceparent` and
/// the worker's lines for the job it enqueued carry the request's trace id, and the job's
/// lines name the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_trace_id_is_in_its_log_line_and_its_jobs_log_lines() {
    let d = Deployment::start(&[
        ("DROVER_LOG_FORMAT", "json"),
        ("DROVER_LOG", "warn,api::trace=debug,workers::runtime=debug"),
    ])
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let id = d
        .enqueue(json!({"kind": "noop", "payload": {}}), Some(&traceparent))
        .await;
    d.wait_job(&id, "succeeded").await;

    let (mut request_line, mut job_lines) = (None, Vec::new());
    let start = Instant::now();
    while request_line.is_none() || job_lines.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no request or job line:\n{}",
            d.logs.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let logs = d.logs.lock().unwrap();
        let lines: Vec<Json> = logs
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        request_line = lines
            .iter()
            .find(|l| {
                l["fields"]["message"] == "request answered"
                    && spans(l)
                        .iter()
                        .any(|s| s["name"] == "request" && s["method"] == "POST" && s["path"] == "/v1/jobs")
            })
            .cloned();
        job_lines = lines
            .iter()
            .filter(|l| {
                spans(l)
                    .iter()
                    .any(|s| s["name"] == "job" && s["job.id"] == id.as_str())
            })
            .cloned()
            .collect();
    }
    let request_line = request_line.unwrap();
    let request_span = spans(&request_line)
        .into_iter()
        .find(|s| s["name"] == "request")
        .unwrap();
    assert_eq!(request_span["trace_id"], trace_id, "{request_line}");
    for line in &job_lines {
        let job_span = spans(line).into_iter().find(|s| s["name"] == "job").unwrap();
        assert_eq!(job_span["trace_id"], trace_id, "{line}");
        assert_eq!(
            (&job_span["job.kind"], &job_span["queue"], &job_span["attempt"]),
            (&json!("noop"), &json!("noop"), &json!(1)),
            "{line}"
        );
    }
    d.stop().await;
}

/// The `drover_…` metric names an expression uses, as exported: a histogram's `_bucket`,
/// `_count` and `_sum` series name the histogram. Panics on a name drover does not export.
fn metrics_named(expr: &str, whose: &str) -> Vec<&'static str> {
    use api::metrics::{EXPORTED, MetricKind};
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("drover_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let exported = EXPORTED.iter().find(|(n, kind, _)| {
            *n == name
                || (*kind == MetricKind::Histogram
                    && ["_bucket", "_count", "_sum"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix) == Some(n)))
        });
        match exported {
            Some((n, ..)) => names.push(*n),
            None => panic!("{whose} uses {name}, which drover does not export: {expr}"),
        }
        rest = &tail[end..];
    }
    names
}

/// The Grafana dashboard (deploy/grafana/drover.json) is valid JSON, and every query of every
/// panel names only metrics drover exports; together the panels show queue depth, throughput,
/// failures, job duration, HTTP, worker heartbeats and slots, broker round trips and history lag.
#[test]
fn the_grafana_dashboard_charts_only_metrics_drover_exports() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/drover.json");
    let dashboard: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    let mut charted = std::collections::BTreeSet::new();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            charted.extend(metrics_named(expr, &format!("panel {:?}", panel["title"])));
            queries += 1;
        }
    }
    for variable in dashboard["templating"]["list"].as_array().expect("variables") {
        if let Some(query) = variable["definition"].as_str() {
            charted.extend(metrics_named(query, "a template variable"));
        }
    }
    assert!(queries >= 10, "{queries} queries");
    for wanted in [
        "drover_queue_depth",
        "drover_jobs_enqueued_total",
        "drover_jobs_completed_total",
        "drover_job_duration_seconds",
        "drover_http_requests_total",
        "drover_http_request_duration_seconds",
        "drover_worker_heartbeat_timestamp_seconds",
        "drover_worker_busy_slots",
        "drover_worker_slots",
        "drover_broker_request_duration_seconds",
        "drover_history_lag_seconds",
    ] {
        assert!(charted.contains(wanted), "no panel shows {wanted}");
    }
}

/// The alert rules (deploy/prometheus/drover-rules.yaml; promtool checks and unit-tests them in
/// scripts/check-deploy.sh) name only metrics drover exports, and cover a growing queue, a
/// growing dead set, a missing worker heartbeat and a slow p95 job time.
#[test]
fn the_alert_rules_watch_only_metrics_drover_exports() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/drover-rules.yaml");
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid YAML");
    let mut alerts = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let alert = rule["alert"].as_str().expect("alert rules only");
            let expr = rule["expr"].as_str().expect("an expr");
            assert!(
                !metrics_named(expr, alert).is_empty(),
                "{alert} names no drover metric"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{alert} has no summary"
            );
            alerts.push(alert.to_owned());
        }
    }
    for wanted in [
        "DroverQueueGrowing",
        "DroverDeadSetGrowing",
        "DroverWorkerHeartbeatStale",
        "DroverJobDurationP95High",
    ] {
        assert!(alerts.iter().any(|a| a == wanted), "no {wanted} in {alerts:?}");
    }
}

/// docs/observability.md documents every metric drover exports, with its labels.
#[test]
fn every_exported_metric_is_documented_with_its_labels() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/observability.md")).unwrap();
    for (name, _, labels) in api::metrics::EXPORTED {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}`")))
            .unwrap_or_else(|| panic!("docs/observability.md has no row for {name}"));
        for label in *labels {
            assert!(
                row.contains(&format!("`{label}`")),
                "the row of {name} does not name {label}: {row}"
            );
        }
    }
}

/// Built with `--features otlp` and given `DROVER_OTLP_ENDPOINT`, `drover dev` exports the
/// request's span and its job's span to the collector, both in the caller's trace and both
/// children of the caller's span (the OTLP protobuf body holds trace and span ids as raw
/// bytes, so finding them needs no decoder).
#[cfg(feature = "otlp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_otlp_a_request_and_its_job_are_exported_as_children_of_the_callers_span() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/v1/traces", collector.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::<u8>::new()));
    let received = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = collector.accept().await {
            let received = received.clone();
            tokio::spawn(async move {
                // Whole requests, one per connection or kept alive: everything read is kept.
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    received.lock().unwrap().extend_from_slice(&buf[..n]);
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/dev.db", dir.path().display());
    let port = free_port();
    let mut dev = drover()
        .arg("dev")
        .env("DROVER_LISTEN", format!("127.0.0.1:{port}"))
        .env("DROVER_BROKER_URL", &db)
        .env("DROVER_DATABASE_URL", &db)
        .env("DROVER_LOG", "info")
        .env("DROVER_OTLP_ENDPOINT", &endpoint)
        .env("DROVER_BACKUP_STORE", dir.path().join("backups"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (base, key) = crate::process::dev_banner(&mut dev).await;
    let http = authorized_client(&key);
    let resp = http
        .post(format!("{base}/v1/jobs"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .json(&json!({"kind": "noop", "payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let id = resp.json::<Json>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let start = Instant::now();
    loop {
        let job: Json = http
            .get(format!("{base}/v1/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["status"] == "succeeded" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGTERM flushes the batch of spans on the way out.
    crate::process::sigterm(&dev);
    let status = tokio::time::timeout(Duration::from_secs(30), dev.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());

    let count = |needle: &[u8]| {
        let bodies = bodies.lock().unwrap();
        bodies.windows(needle.len()).filter(|w| *w == needle).count()
    };
    let trace_id = 0x4bf92f3577b34da6a3ce929d0e0e4736u128.to_be_bytes();
    let callers_span = 0x00f067aa0ba902b7u64.to_be_bytes();
    assert!(
        count(b"request") >= 1 && count(b"job") >= 1,
        "no request or job span exported"
    );
    // The request's span and the job's span: both in the trace, both children of the caller.
    assert!(
        count(&trace_id) >= 2,
        "trace id exported {} times",
        count(&trace_id)
    );
    assert!(
        count(&callers_span) >= 2,
        "caller's span id exported {} times",
        count(&callers_span)
    );
}
