//! The Kubernetes manifests (`k8s/`) against the code they deploy.
//!
//! Every overlay is rendered with `kubectl kustomize` (the tool must be on PATH: these tests fail,
//! never skip, without it) and read back as YAML. Then:
//! - the static contract: every worker family is scaled by one ScaledObject on its own queues,
//!   drains within its grace period, and runs under the restricted security context;
//! - every KEDA trigger names a key or queue the code really fills: a job enqueued through the
//!   API makes exactly that Redis key's length (counted the way KEDA's redis scaler counts it) or
//!   that RabbitMQ queue's ready count go up by one;
//! - a replay of KEDA's scaling rule, with the values the manifests set, against queue depths read
//!   from a live drover whose workers follow the replica count the rule produces.
//!
//! The manifests name keys under the production prefix `drover`, so these tests use that exact
//! prefix, in a Redis database and a RabbitMQ vhost that nothing else uses (never database 0,
//! nor 15, which a benchmark owns).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    process::Command,
    time::{Duration, Instant},
};

use drover::config::WorkerArgs;
use jobs::{Catalog, CatalogConfig};
use serde::Deserialize as _;
use serde_json::json;
use serde_yaml::Value;

use crate::support::{Broker, Options, Replica, TestApp, spawn_app};

const OVERLAYS: [&str; 3] = ["dev", "prod", "rabbitmq"];
/// Redis database of the key test, and of the replay (they run in parallel).
const REDIS_KEYS_URL: &str = "redis://127.0.0.1:6379/11";
const REDIS_REPLAY_URL: &str = "redis://127.0.0.1:6379/12";
/// RabbitMQ vhost of the queue test (created on first use with `rabbitmqctl`).
const AMQP_VHOST: &str = "drover-k8s-tests";
/// A queue no manifest names: the test app's own workers consume it, so every queue the
/// manifests name stays untouched until a test starts workers on it.
const IDLE_QUEUE: &str = "k8s-idle";
/// Kinds every build has, which an enqueue may route to any queue.
const ROUTABLE_ANYWHERE: [&str; 2] = ["noop", "sleep"];

// ---------------------------------------------------------------------------------------------
// Rendering and reading the manifests

/// One overlay, rendered.
struct Manifests {
    overlay: &'static str,
    objects: Vec<Value>,
}

fn render(overlay: &'static str) -> Manifests {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let dir = format!("{}/k8s/overlays/{overlay}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(&kubectl)
        .args(["kustomize", &dir])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "`{kubectl} kustomize` could not run ({e}): these tests need kubectl (with its \
                 built-in kustomize) on PATH. ./scripts/check-deploy.sh installs one into \
                 ~/.cache/drover-tools/bin, or set KUBECTL=/path/to/kubectl"
            )
        });
    assert!(
        out.status.success(),
        "`kubectl kustomize {dir}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 manifests");
    let objects = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect();
    Manifests { overlay, objects }
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

impl Manifests {
    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects.iter().filter(move |o| text(&o["kind"]) == kind)
    }

    fn name(o: &Value) -> &str {
        text(&o["metadata"]["name"])
    }

    /// A ConfigMap by name; generated ones carry a hash suffix.
    fn config_map(&self, name: &str) -> &Value {
        self.of_kind("ConfigMap")
            .find(|c| Self::name(c) == name || Self::name(c).starts_with(&format!("{name}-")))
            .unwrap_or_else(|| panic!("{}: no ConfigMap {name}", self.overlay))
    }

    fn env(&self) -> BTreeMap<String, String> {
        self.config_map("drover-env")["data"]
            .as_mapping()
            .expect("drover-env data")
            .iter()
            .map(|(k, v)| (text(k).to_owned(), text(v).to_owned()))
            .collect()
    }

    fn prefix(&self) -> String {
        self.env()["DROVER_BROKER_PREFIX"].clone()
    }

    /// drover's catalog as configured by the overlay's drover.toml.
    fn catalog(&self) -> (CatalogConfig, Catalog) {
        let cfg = self.file().catalog;
        let catalog = Catalog::new(&cfg);
        (cfg, catalog)
    }

    /// The overlay's drover.toml, read the way drover reads it.
    fn file(&self) -> drover::config::FileConfig {
        let toml_text = text(&self.config_map("drover-files")["data"]["drover.toml"]);
        drover::config::parse_file(toml_text)
            .unwrap_or_else(|e| panic!("{}: drover.toml does not parse: {e:#}", self.overlay))
    }

    fn workers(&self) -> Vec<WorkerDeployment> {
        self.of_kind("Deployment")
            .filter(|d| text(&d["metadata"]["labels"]["app.kubernetes.io/component"]) == "worker")
            .map(|d| WorkerDeployment::read(self.overlay, d))
            .collect()
    }

    fn scaled_objects(&self) -> Vec<ScaledObject> {
        self.of_kind("ScaledObject").map(ScaledObject::read).collect()
    }

    /// Every pod template: Deployments' and Jobs'.
    fn pod_specs(&self) -> Vec<(String, &Value)> {
        self.objects
            .iter()
            .filter(|o| matches!(text(&o["kind"]), "Deployment" | "Job"))
            .map(|o| {
                (
                    format!("{}/{}", text(&o["kind"]), Self::name(o)),
                    &o["spec"]["template"]["spec"],
                )
            })
            .collect()
    }
}

/// A worker Deployment, as the pods will run it.
#[derive(Debug)]
struct WorkerDeployment {
    name: String,
    queues: Vec<String>,
    concurrency: usize,
    prefetch: usize,
    shutdown_grace_s: u64,
    termination_grace_s: u64,
    health_port: u64,
    container: Value,
}

impl WorkerDeployment {
    fn read(overlay: &str, d: &Value) -> Self {
        let name = Manifests::name(d).to_owned();
        let pod = &d["spec"]["template"]["spec"];
        let container = pod["containers"][0].clone();
        let env: BTreeMap<&str, &str> = container["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter(|e| e["value"].is_string())
            .map(|e| (text(&e["name"]), text(&e["value"])))
            .collect();
        let get = |k: &str| -> &str {
            env.get(k)
                .copied()
                .unwrap_or_else(|| panic!("{overlay}: {name} sets no {k}"))
        };
        let health_port = container["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|p| text(&p["name"]) == "health")
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{overlay}: {name} has no `health` port"));
        Self {
            queues: get("DROVER_QUEUES")
                .split(',')
                .map(|q| q.trim().to_owned())
                .collect(),
            concurrency: get("DROVER_CONCURRENCY").parse().expect("DROVER_CONCURRENCY"),
            prefetch: get("DROVER_PREFETCH").parse().expect("DROVER_PREFETCH"),
            shutdown_grace_s: get("DROVER_SHUTDOWN_GRACE_S").parse().expect("grace"),
            termination_grace_s: pod["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or_else(|| panic!("{overlay}: {name} sets no terminationGracePeriodSeconds")),
            health_port,
            container,
            name,
        }
    }

    /// The worker settings of one of its pods.
    fn args(&self) -> WorkerArgs {
        WorkerArgs {
            queues: self.queues.clone(),
            concurrency: self.concurrency,
            prefetch: self.prefetch,
            lease_s: 30,
            quarantine_after: jobs::broker::QUARANTINE_AFTER,
            shutdown_grace_s: self.shutdown_grace_s,
            chaos_drills: false,
            limits_url: None,
        }
    }
}

/// Where a trigger reads its metric.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// KEDA's `redis` scaler: the length of a key (LLEN of a list, ZCARD of a sorted set).
    RedisKey(String),
    /// KEDA's `rabbitmq` scaler over AMQP: the queue's ready messages.
    AmqpQueue(String),
}

#[derive(Clone, Debug)]
struct Trigger {
    name: String,
    source: Source,
    /// Target value per replica (`listLength` / `value`).
    target: f64,
    /// Active above this (`activationListLength` / `activationValue`).
    activation: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PolicyKind {
    Pods,
    Percent,
}

#[derive(Clone, Copy, Debug)]
struct Policy {
    kind: PolicyKind,
    value: u32,
    period_s: u64,
}

/// The HPA behavior KEDA's HPA gets (Kubernetes' defaults where the manifest is silent).
#[derive(Clone, Debug)]
struct Behavior {
    up_window_s: u64,
    up_policies: Vec<Policy>,
    up_select_min: bool,
    down_window_s: u64,
    down_policies: Vec<Policy>,
    down_select_min: bool,
}

#[derive(Clone, Debug)]
struct ScaledObject {
    name: String,
    target: String,
    polling_s: u64,
    cooldown_s: u64,
    min: u32,
    max: u32,
    has_fallback: bool,
    behavior: Behavior,
    triggers: Vec<Trigger>,
    raw_triggers: Vec<Value>,
}

fn policies(v: &Value, default: Vec<Policy>) -> Vec<Policy> {
    match v.as_sequence() {
        None => default,
        Some(seq) => seq
            .iter()
            .map(|p| Policy {
                kind: match text(&p["type"]) {
                    "Pods" => PolicyKind::Pods,
                    "Percent" => PolicyKind::Percent,
                    other => panic!("unknown HPA policy type {other:?}"),
                },
                value: p["value"].as_u64().expect("policy value") as u32,
                period_s: p["periodSeconds"].as_u64().expect("policy periodSeconds"),
            })
            .collect(),
    }
}

impl ScaledObject {
    fn read(o: &Value) -> Self {
        let spec = &o["spec"];
        let b = &spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"];
        let behavior = Behavior {
            up_window_s: b["scaleUp"]["stabilizationWindowSeconds"].as_u64().unwrap_or(0),
            up_policies: policies(
                &b["scaleUp"]["policies"],
                vec![
                    Policy {
                        kind: PolicyKind::Percent,
                        value: 100,
                        period_s: 15,
                    },
                    Policy {
                        kind: PolicyKind::Pods,
                        value: 4,
                        period_s: 15,
                    },
                ],
            ),
            up_select_min: text(&b["scaleUp"]["selectPolicy"]) == "Min",
            down_window_s: b["scaleDown"]["stabilizationWindowSeconds"]
                .as_u64()
                .unwrap_or(300),
            down_policies: policies(
                &b["scaleDown"]["policies"],
                vec![Policy {
                    kind: PolicyKind::Percent,
                    value: 100,
                    period_s: 15,
                }],
            ),
            down_select_min: text(&b["scaleDown"]["selectPolicy"]) == "Min",
        };
        let raw_triggers: Vec<Value> = spec["triggers"].as_sequence().cloned().unwrap_or_default();
        let triggers = raw_triggers
            .iter()
            .map(|t| {
                let m = &t["metadata"];
                let (source, target, activation) = match text(&t["type"]) {
                    "redis" => (
                        Source::RedisKey(text(&m["listName"]).to_owned()),
                        number(&m["listLength"]).unwrap_or(5.0),
                        number(&m["activationListLength"]).unwrap_or(0.0),
                    ),
                    "rabbitmq" => (
                        Source::AmqpQueue(text(&m["queueName"]).to_owned()),
                        number(&m["value"]).expect("rabbitmq value"),
                        number(&m["activationValue"]).unwrap_or(0.0),
                    ),
                    other => panic!("trigger type {other:?} is not one drover's manifests use"),
                };
                Trigger {
                    name: text(&t["name"]).to_owned(),
                    source,
                    target,
                    activation,
                }
            })
            .collect();
        Self {
            name: Manifests::name(o).to_owned(),
            target: text(&spec["scaleTargetRef"]["name"]).to_owned(),
            polling_s: spec["pollingInterval"].as_u64().unwrap_or(30),
            cooldown_s: spec["cooldownPeriod"].as_u64().unwrap_or(300),
            min: spec["minReplicaCount"].as_u64().unwrap_or(0) as u32,
            max: spec["maxReplicaCount"].as_u64().unwrap_or(100) as u32,
            has_fallback: !spec["fallback"].is_null(),
            behavior,
            triggers,
            raw_triggers,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The static contract

#[test]
fn every_overlay_scales_each_worker_family_on_its_own_queues_and_drains_within_its_grace() {
    let mut report = String::new();
    // The subcommand the scheduler Deployment runs exists in this build.
    let help = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["scheduler", "--help"])
        .output()
        .expect("drover runs");
    assert!(help.status.success(), "`drover scheduler --help` failed");
    for overlay in OVERLAYS {
        let m = render(overlay);
        let prefix = m.prefix();
        let (cfg, catalog) = m.catalog();
        let workers = m.workers();
        let scaled = m.scaled_objects();
        writeln!(report, "\n{overlay} (prefix {prefix:?})").unwrap();

        // Every built-in queue is consumed by exactly one worker family.
        for q in jobs::queue::BUILTIN_QUEUES {
            let consumers: Vec<&str> = workers
                .iter()
                .filter(|w| w.queues.iter().any(|wq| wq == q))
                .map(|w| w.name.as_str())
                .collect();
            assert_eq!(
                consumers.len(),
                1,
                "{overlay}: queue {q} consumed by {consumers:?}"
            );
        }

        let broker_types: BTreeSet<&str> = scaled
            .iter()
            .flat_map(|s| s.raw_triggers.iter().map(|t| text(&t["type"])))
            .collect();
        assert_eq!(
            broker_types.len(),
            1,
            "{overlay}: one broker per overlay, saw {broker_types:?}"
        );
        let redis = broker_types.contains("redis");
        assert_eq!(
            redis,
            overlay != "rabbitmq",
            "{overlay}: scaler type {broker_types:?}"
        );
        if let Some(secret) = m
            .of_kind("Secret")
            .find(|s| Manifests::name(s) == "drover-secrets")
        {
            // The overlay ships credentials (dev): its broker is the one KEDA reads.
            let url = text(&secret["stringData"]["broker-url"]);
            assert_eq!(url.starts_with("redis://"), redis, "{overlay}: broker-url {url}");
            for t in scaled.iter().flat_map(|s| &s.raw_triggers) {
                if let Some(db) = t["metadata"]["databaseIndex"].as_str() {
                    assert!(
                        url.ends_with(&format!("/{db}")),
                        "{overlay}: databaseIndex {db} vs {url}"
                    );
                }
            }
        }

        for w in &workers {
            let so: Vec<&ScaledObject> = scaled.iter().filter(|s| s.target == w.name).collect();
            assert_eq!(
                so.len(),
                1,
                "{overlay}: {} has {} ScaledObjects",
                w.name,
                so.len()
            );
            let so = so[0];
            assert_eq!(so.min, 0, "{overlay}: {} must scale to zero", so.name);
            assert!(
                so.max >= 1 && so.has_fallback,
                "{overlay}: {} max/fallback",
                so.name
            );
            assert!(
                so.behavior.down_window_s >= 2 * so.polling_s
                    && so
                        .behavior
                        .down_policies
                        .iter()
                        .all(|p| p.kind == PolicyKind::Pods && p.value == 1 && p.period_s >= 60),
                "{overlay}: {} must scale down slowly (one pod a minute at most): {:?}",
                so.name,
                so.behavior
            );
            // Each trigger names a key or queue of this family, built the way the brokers build it.
            for t in &so.triggers {
                let ok = w.queues.iter().any(|q| match &t.source {
                    Source::RedisKey(k) => {
                        *k == format!("{prefix}:{{{q}}}:pending") || *k == format!("{prefix}:{{{q}}}:leased")
                    }
                    Source::AmqpQueue(name) => *name == format!("{prefix}.{q}"),
                });
                assert!(
                    ok,
                    "{overlay}: {} trigger {:?} names none of {:?}",
                    so.name, t.source, w.queues
                );
                if let Source::RedisKey(k) = &t.source
                    && k.ends_with(":leased")
                {
                    assert_eq!(
                        t.target,
                        (w.concurrency + w.prefetch) as f64,
                        "{overlay}: {} in-flight target = concurrency + prefetch",
                        so.name
                    );
                }
            }
            for t in &so.raw_triggers {
                if text(&t["type"]) == "rabbitmq" {
                    assert_eq!(
                        text(&t["metadata"]["mode"]),
                        "QueueLength",
                        "{overlay}: {}",
                        so.name
                    );
                    assert_eq!(text(&t["metadata"]["protocol"]), "amqp", "{overlay}: {}", so.name);
                }
            }
            // Every queue of the family wakes it: a trigger on its pending list / ready queue.
            for q in &w.queues {
                let want = if redis {
                    Source::RedisKey(format!("{prefix}:{{{q}}}:pending"))
                } else {
                    Source::AmqpQueue(format!("{prefix}.{q}"))
                };
                assert!(
                    so.triggers.iter().any(|t| t.source == want),
                    "{overlay}: {} has no trigger on {want:?}",
                    so.name
                );
            }

            // Drains within its grace: the longest attempt it may be running ends before
            // DROVER_SHUTDOWN_GRACE_S, and Kubernetes waits longer than that.
            let longest_ms = catalog
                .kinds()
                .filter(|k| w.queues.iter().any(|q| q == k.queue) || ROUTABLE_ANYWHERE.contains(&k.name))
                .map(|k| k.timeout.as_millis() as u64)
                .chain(w.queues.iter().filter_map(|q| cfg.timeout_ms.get(q).copied()))
                .max()
                .unwrap_or(0);
            assert!(
                w.shutdown_grace_s * 1000 >= longest_ms,
                "{overlay}: {} DROVER_SHUTDOWN_GRACE_S={} < its longest job timeout {longest_ms} ms",
                w.name,
                w.shutdown_grace_s
            );
            assert!(
                w.termination_grace_s > w.shutdown_grace_s,
                "{overlay}: {} terminationGracePeriodSeconds must exceed DROVER_SHUTDOWN_GRACE_S",
                w.name
            );
            // Probes on the worker's own listener.
            let c = &w.container;
            assert_eq!(
                text(&c["livenessProbe"]["httpGet"]["path"]),
                "/healthz",
                "{overlay}: {}",
                w.name
            );
            assert_eq!(
                text(&c["readinessProbe"]["httpGet"]["path"]),
                "/readyz",
                "{overlay}: {}",
                w.name
            );
            assert!(
                m.env()["DROVER_WORKER_LISTEN"].ends_with(&format!(":{}", w.health_port)),
                "{overlay}: DROVER_WORKER_LISTEN does not listen on the probes' port"
            );
            writeln!(
                report,
                "  {:<26} queues {:<14} conc {:>2} prefetch {:>3} timeout<= {:>5} s grace {:>4} s \
                 termination {:>4} s  replicas {}..{}  triggers {}",
                w.name,
                w.queues.join(","),
                w.concurrency,
                w.prefetch,
                longest_ms / 1000,
                w.shutdown_grace_s,
                w.termination_grace_s,
                so.min,
                so.max,
                so.triggers
                    .iter()
                    .map(|t| format!(
                        "{}/{}",
                        match &t.source {
                            Source::RedisKey(k) | Source::AmqpQueue(k) => k,
                        },
                        t.target
                    ))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
            .unwrap();
        }
        assert_eq!(
            scaled.len(),
            workers.len(),
            "{overlay}: a ScaledObject without a worker"
        );

        // The API: probes, HPA, PDB, Service.
        let api = m
            .of_kind("Deployment")
            .find(|d| Manifests::name(d) == "drover-api")
            .expect("api Deployment");
        let c = &api["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(text(&c["livenessProbe"]["httpGet"]["path"]), "/healthz");
        assert_eq!(text(&c["readinessProbe"]["httpGet"]["path"]), "/readyz");
        for kind in ["HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"] {
            assert!(
                m.of_kind(kind).any(|o| Manifests::name(o) == "drover-api"),
                "{overlay}: no {kind} drover-api"
            );
        }
        assert!(
            m.of_kind("NetworkPolicy")
                .any(|p| Manifests::name(p) == "default-deny"),
            "{overlay}: no default-deny NetworkPolicy"
        );

        // The scheduler: `drover scheduler` with probes on its own listener, more than one
        // replica (each tick fires once whatever their number), and default schedules the
        // catalog accepts.
        let scheduler = m
            .of_kind("Deployment")
            .find(|d| Manifests::name(d) == "drover-scheduler")
            .expect("scheduler Deployment");
        let c = &scheduler["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = c["args"].as_sequence().expect("args").iter().map(text).collect();
        assert_eq!(args, ["scheduler"], "{overlay}: scheduler args");
        assert_eq!(
            text(&c["livenessProbe"]["httpGet"]["path"]),
            "/healthz",
            "{overlay}"
        );
        assert_eq!(
            text(&c["readinessProbe"]["httpGet"]["path"]),
            "/readyz",
            "{overlay}"
        );
        let port = c["ports"]
            .as_sequence()
            .and_then(|ports| ports.iter().find(|p| text(&p["name"]) == "health"))
            .and_then(|p| p["containerPort"].as_u64())
            .expect("scheduler health port");
        assert!(
            m.env()["DROVER_SCHEDULER_LISTEN"].ends_with(&format!(":{port}")),
            "{overlay}: DROVER_SCHEDULER_LISTEN does not listen on the probes' port"
        );
        assert!(
            scheduler["spec"]["replicas"].as_u64().unwrap_or(1) >= 2,
            "{overlay}: one scheduler replica is a single point of failure"
        );
        for s in &m.file().schedules {
            s.validate(&catalog).unwrap_or_else(|e| panic!("{overlay}: {e}"));
        }

        // Restricted pods, without service account tokens.
        for (what, pod) in m.pod_specs() {
            assert_eq!(
                pod["automountServiceAccountToken"].as_bool(),
                Some(false),
                "{overlay}: {what}"
            );
            let sc = &pod["securityContext"];
            assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{overlay}: {what}");
            assert_eq!(
                text(&sc["seccompProfile"]["type"]),
                "RuntimeDefault",
                "{overlay}: {what}"
            );
            for c in pod["containers"].as_sequence().expect("containers") {
                let sc = &c["securityContext"];
                assert_eq!(
                    sc["allowPrivilegeEscalation"].as_bool(),
                    Some(false),
                    "{overlay}: {what}"
                );
                assert_eq!(
                    sc["readOnlyRootFilesystem"].as_bool(),
                    Some(true),
                    "{overlay}: {what}"
                );
                assert_eq!(
                    sc["capabilities"]["drop"][0].as_str(),
                    Some("ALL"),
                    "{overlay}: {what}"
                );
            }
        }
    }
    println!("{report}");
}

// ---------------------------------------------------------------------------------------------
// Every trigger names what the code fills

/// The length of a key as KEDA's redis scaler counts it: by the key's type (LLEN of a list,
/// ZCARD of a sorted set, SCARD of a set, HLEN of a hash; a missing key counts as an empty list).
/// Returns the type too, read in the same atomic script.
const KEDA_LENGTH: &str = r"
local kind = redis.call('TYPE', KEYS[1]).ok
local len
if kind == 'zset' then len = redis.call('ZCARD', KEYS[1])
elseif kind == 'set' then len = redis.call('SCARD', KEYS[1])
elseif kind == 'hash' then len = redis.call('HLEN', KEYS[1])
else len = redis.call('LLEN', KEYS[1]) end
return {kind, len}
";

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis at 127.0.0.1:6379")
}

async fn keda_length(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> (String, u64) {
    redis::Script::new(KEDA_LENGTH)
        .key(key)
        .invoke_async(conn)
        .await
        .unwrap()
}

/// Redis triggers of the Redis overlays: (overlay, ScaledObject, trigger, key, queue).
fn redis_triggers(overlays: &[Manifests]) -> Vec<(String, String, String, String, String)> {
    let mut out = Vec::new();
    for m in overlays {
        let workers = m.workers();
        for so in m.scaled_objects() {
            let w = workers.iter().find(|w| w.name == so.target).expect("target");
            for t in &so.triggers {
                let Source::RedisKey(key) = &t.source else {
                    panic!("{}: {} is not a redis trigger", m.overlay, t.name)
                };
                let q = w
                    .queues
                    .iter()
                    .find(|q| key.contains(&format!("{{{q}}}")))
                    .expect("the static test checks that every key names a queue of its family");
                out.push((
                    m.overlay.into(),
                    so.name.clone(),
                    t.name.clone(),
                    key.clone(),
                    q.clone(),
                ));
            }
        }
    }
    out
}

async fn enqueue_sleep(app: &TestApp, queue: &str, ms: u64) {
    let (status, body) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "sleep", "payload": {"ms": ms}, "queue": queue}),
        )
        .await;
    assert_eq!(status, 202, "enqueue to {queue}: {status} {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_redis_scaled_object_reads_a_key_the_api_and_workers_fill() {
    let overlays: Vec<Manifests> = ["dev", "prod"].into_iter().map(render).collect();
    let prefix = overlays[0].prefix();
    assert!(
        overlays.iter().all(|m| m.prefix() == prefix),
        "one prefix for every Redis overlay"
    );
    let triggers = redis_triggers(&overlays);
    let app = spawn_app(
        Broker::Redis,
        Options {
            queues: vec![IDLE_QUEUE],
            broker_url: Some(REDIS_KEYS_URL.into()),
            prefix: Some(prefix.clone()),
            ..Options::default()
        },
    )
    .await;
    let mut conn = redis_conn(REDIS_KEYS_URL).await;
    let keys: BTreeSet<(String, String)> = triggers.iter().map(|t| (t.3.clone(), t.4.clone())).collect();
    let mut seen: BTreeMap<String, (String, u64, u64)> = BTreeMap::new();

    // The pending lists: one job through the API, and the list KEDA reads is one longer.
    for (key, queue) in keys.iter().filter(|(k, _)| k.ends_with(":pending")) {
        let (_, before) = keda_length(&mut conn, key).await;
        enqueue_sleep(&app, queue, 1_500).await;
        let (kind, after) = keda_length(&mut conn, key).await;
        assert_eq!(
            kind, "list",
            "{key} is what the redis scaler should count with LLEN"
        );
        assert_eq!(after, before + 1, "a job enqueued to {queue} must land in {key}");
        seen.insert(key.clone(), (kind, before, after));
    }
    // The leased sets: a worker (one replica of every family at once) takes each job, and the
    // in-flight key KEDA reads counts it while it runs.
    let all_queues: Vec<String> = keys
        .iter()
        .map(|(_, q)| q.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let leased: Vec<&(String, String)> = keys.iter().filter(|(k, _)| k.ends_with(":leased")).collect();
    let mut before = BTreeMap::new();
    for (key, _) in &leased {
        before.insert(key.clone(), keda_length(&mut conn, key).await.1);
    }
    let replica = app.spawn_replica(WorkerArgs {
        queues: all_queues,
        concurrency: 1,
        prefetch: 1,
        lease_s: 30,
        quarantine_after: jobs::broker::QUARANTINE_AFTER,
        shutdown_grace_s: 10,
        chaos_drills: false,
        limits_url: None,
    });
    let start = Instant::now();
    loop {
        let mut held = Vec::new();
        for (key, _) in &leased {
            held.push((key.clone(), keda_length(&mut conn, key).await));
        }
        if held.iter().all(|(k, (_, n))| *n == before[k] + 1) {
            for (k, (kind, n)) in held {
                assert_eq!(
                    kind, "zset",
                    "{k} is what the redis scaler should count with ZCARD"
                );
                seen.insert(k.clone(), (kind, before[&k], n));
            }
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the running jobs never showed in the leased keys: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replica.stop().await;
    for (key, _) in &leased {
        assert_eq!(
            keda_length(&mut conn, key).await.1,
            before[key],
            "{key} after the jobs finished"
        );
    }

    println!(
        "\n{:<8} {:<26} {:<22} {:<30} {:<5} {:>6} {:>6}",
        "overlay", "ScaledObject", "trigger", "key", "type", "before", "with"
    );
    for (overlay, so, trigger, key, _) in &triggers {
        let (kind, b, a) = &seen[key];
        println!("{overlay:<8} {so:<26} {trigger:<22} {key:<30} {kind:<5} {b:>6} {a:>6}");
    }
    app.shutdown().await;
}

/// Makes sure the tests' vhost exists (the local RabbitMQ's own CLI; root on these machines).
fn ensure_vhost() {
    let run = |args: &[&str]| {
        let out = Command::new("rabbitmqctl")
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("rabbitmqctl could not run ({e}): it creates this test's vhost {AMQP_VHOST}")
            });
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    if !run(&["-q", "list_vhosts"])
        .lines()
        .any(|l| l.trim() == AMQP_VHOST)
    {
        run(&["-q", "add_vhost", AMQP_VHOST]);
    }
    run(&[
        "-q",
        "set_permissions",
        "-p",
        AMQP_VHOST,
        "guest",
        ".*",
        ".*",
        ".*",
    ]);
}

/// A queue's ready messages, as KEDA's rabbitmq scaler reads them over AMQP (passive declare);
/// 0 for a queue that does not exist yet.
async fn amqp_ready(conn: &lapin::Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    let res = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    match res {
        Ok(q) => {
            let _ = ch.close(0, "done".into()).await;
            q.message_count()
        }
        Err(_) => 0, // NOT_FOUND closes the channel
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rabbitmq_scaled_object_reads_a_queue_the_api_fills() {
    let m = render("rabbitmq");
    let prefix = m.prefix();
    let workers = m.workers();
    ensure_vhost();
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{AMQP_VHOST}");
    let app = spawn_app(
        Broker::Amqp,
        Options {
            queues: vec![IDLE_QUEUE],
            broker_url: Some(url.clone()),
            prefix: Some(prefix.clone()),
            ..Options::default()
        },
    )
    .await;
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ at 127.0.0.1:5672");
    println!(
        "\n{:<8} {:<26} {:<22} {:<24} {:>6} {:>6}",
        "overlay", "ScaledObject", "trigger", "queue", "before", "after"
    );
    for so in m.scaled_objects() {
        let w = workers.iter().find(|w| w.name == so.target).expect("target");
        for t in &so.triggers {
            let Source::AmqpQueue(name) = &t.source else {
                panic!("{}: {} is not a rabbitmq trigger", so.name, t.name)
            };
            let q = w
                .queues
                .iter()
                .find(|q| *name == format!("{prefix}.{q}"))
                .expect("names a queue of its family");
            let before = amqp_ready(&conn, name).await;
            enqueue_sleep(&app, q, 1).await;
            // Confirmed before the 202; the count follows at once.
            let after = amqp_ready(&conn, name).await;
            assert_eq!(
                after,
                before + 1,
                "a job enqueued to {q} must wait in the AMQP queue {name}"
            );
            println!(
                "{:<8} {:<26} {:<22} {:<24} {:>6} {:>6}",
                "rabbitmq", so.name, t.name, name, before, after
            );
        }
    }
    let _ = conn.close(0, "done".into()).await;
    app.shutdown().await;
    // The idle queue the app's own workers declared.
    if let Ok(conn) = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await
        && let Ok(ch) = conn.create_channel().await
    {
        let base = format!("{prefix}.{IDLE_QUEUE}");
        let names = [base.clone(), format!("{base}.dead")]
            .into_iter()
            .chain((0..=24).map(|k| format!("{base}.delay.{k}")));
        for name in names {
            let _ = ch.queue_delete(name.as_str().into(), Default::default()).await;
        }
        let _ = conn.close(0, "done".into()).await;
    }
}

// ---------------------------------------------------------------------------------------------
// KEDA's scaling rule, replayed

/// KEDA + the HPA it creates, for one ScaledObject, one evaluation per tick. A tick stands for
/// one `pollingInterval` (KEDA's activity check) and one HPA sync; both are 15 s in the
/// manifests, and the HPA's own sync period is 15 s too.
struct Autoscaler {
    so: ScaledObject,
    replicas: u32,
    last_active: Option<u64>,
    /// (tick, recommendation) for the stabilization windows.
    recommendations: Vec<(u64, u32)>,
    /// (tick, replicas after the tick) for the rate limits of the policies.
    history: Vec<(u64, u32)>,
}

/// What one tick decided.
struct Decision {
    active: bool,
    /// max over triggers of ceil(metric / target), the HPA's unclamped wish.
    raw: u32,
    replicas: u32,
    why: &'static str,
}

impl Autoscaler {
    fn new(so: ScaledObject) -> Self {
        Self {
            so,
            replicas: 0,
            last_active: None,
            recommendations: Vec::new(),
            history: Vec::new(),
        }
    }

    fn ticks(&self, seconds: u64) -> u64 {
        seconds.div_ceil(self.so.polling_s)
    }

    /// Replicas `period_s` ago (the start of a policy's period).
    fn replicas_ago(&self, tick: u64, period_s: u64) -> u32 {
        let since = tick.saturating_sub(self.ticks(period_s));
        self.history
            .iter()
            .rev()
            .find(|(t, _)| *t <= since)
            .map_or(0, |(_, r)| *r)
    }

    fn step(&mut self, tick: u64, metrics: &[f64]) -> Decision {
        let so = &self.so;
        let active = so.triggers.iter().zip(metrics).any(|(t, m)| *m > t.activation);
        if active {
            self.last_active = Some(tick);
        }
        // HPA, AverageValue targets: desired = ceil(metric / target); within ±10 % of the current
        // load it keeps the current count.
        let current = self.replicas;
        let raw = so
            .triggers
            .iter()
            .zip(metrics)
            .map(|(t, m)| {
                let desired = (m / t.target).ceil() as u32;
                if current > 0 && ((m / (t.target * current as f64)) - 1.0).abs() <= 0.1 {
                    current
                } else {
                    desired
                }
            })
            .max()
            .unwrap_or(0);
        let (replicas, why) = if current == 0 {
            if active {
                (so.min.max(1), "activation exceeded: KEDA scales from zero")
            } else {
                (0, "idle")
            }
        } else if !active
            && self
                .last_active
                .is_none_or(|t| tick - t >= self.ticks(so.cooldown_s))
        {
            (
                so.min,
                "inactive for cooldownPeriod: KEDA scales to minReplicaCount",
            )
        } else {
            let hpa_min = so.min.max(1);
            let rec = raw.clamp(hpa_min, so.max);
            self.recommendations.push((tick, rec));
            let b = &so.behavior;
            let window = |w_s: u64| {
                let from = tick.saturating_sub(self.ticks(w_s));
                self.recommendations
                    .iter()
                    .filter(move |(t, _)| *t > from || *t == tick)
            };
            // Stabilization: up to the lowest recommendation of the up-window, down to the
            // highest of the down-window.
            let up_floor = window(b.up_window_s).map(|(_, r)| *r).min().unwrap_or(rec);
            let down_ceiling = window(b.down_window_s).map(|(_, r)| *r).max().unwrap_or(rec);
            if rec > current {
                let target = up_floor.max(current);
                let limits = b.up_policies.iter().map(|p| {
                    // Replicas at the start of the period, less any added since.
                    let start = self.replicas_ago(tick, p.period_s).min(current);
                    match p.kind {
                        PolicyKind::Pods => start + p.value,
                        PolicyKind::Percent => start + (start * p.value).div_ceil(100),
                    }
                });
                let limit = if b.up_select_min {
                    limits.min()
                } else {
                    limits.max()
                }
                .unwrap_or(u32::MAX);
                let next = target.min(limit).min(so.max);
                (
                    next,
                    if next < target {
                        "scale up, rate-limited by the policy"
                    } else {
                        "scale up"
                    },
                )
            } else if down_ceiling < current {
                let limits = b.down_policies.iter().map(|p| {
                    // Replicas at the start of the period, plus any removed since.
                    let start = self.replicas_ago(tick, p.period_s).max(current);
                    match p.kind {
                        PolicyKind::Pods => start.saturating_sub(p.value),
                        PolicyKind::Percent => start.saturating_sub(start * p.value / 100),
                    }
                });
                // selectPolicy Max (the default) allows the biggest change: the lowest floor.
                let floor = if b.down_select_min {
                    limits.max()
                } else {
                    limits.min()
                }
                .unwrap_or(0);
                let next = down_ceiling.max(floor).max(hpa_min);
                (
                    next,
                    if next < current {
                        "scale down (policy: one pod a period)"
                    } else {
                        "hold"
                    },
                )
            } else if rec < current {
                (current, "hold: stabilization window")
            } else {
                (current, "hold")
            }
        };
        self.replicas = replicas;
        self.history.push((tick, replicas));
        Decision {
            active,
            raw,
            replicas,
            why,
        }
    }
}

/// One row of the replay.
struct Row {
    tick: u64,
    real_ms: u128,
    enqueued: usize,
    metrics: Vec<f64>,
    decision: Decision,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_rule_replayed_on_live_depths_scales_from_zero_to_max_and_back_after_cooldown() {
    // The analytics family of the prod overlay: CPU-bound jobs, a few per replica.
    let m = render("prod");
    let prefix = m.prefix();
    let so = m
        .scaled_objects()
        .into_iter()
        .find(|s| s.name == "drover-worker-analytics")
        .expect("ScaledObject drover-worker-analytics");
    let worker = m
        .workers()
        .into_iter()
        .find(|w| w.name == so.target)
        .expect("its Deployment");
    let queue = worker.queues[0].clone();
    let keys: Vec<String> = so
        .triggers
        .iter()
        .map(|t| match &t.source {
            Source::RedisKey(k) => k.clone(),
            other => panic!("prod triggers are redis: {other:?}"),
        })
        .collect();

    let app = spawn_app(
        Broker::Redis,
        Options {
            queues: vec![IDLE_QUEUE],
            broker_url: Some(REDIS_REPLAY_URL.into()),
            prefix: Some(prefix),
            ..Options::default()
        },
    )
    .await;
    let mut conn = redis_conn(REDIS_REPLAY_URL).await;

    // Load: a burst far above what max replicas take per tick, then a trickle that keeps the
    // family active at one replica's worth, then nothing. Jobs are 100 ms `sleep`s.
    const TICK: Duration = Duration::from_millis(150);
    const JOB_MS: u64 = 100;
    let load = |tick: u64| -> usize {
        match tick {
            2 => 400,
            12..=30 => 4,
            _ => 0,
        }
    };
    let mut scaler = Autoscaler::new(so.clone());
    let cooldown_ticks = scaler.ticks(so.cooldown_s);
    let mut replicas: Vec<Replica> = Vec::new();
    let mut stopping = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut total = 0;
    let started = Instant::now();
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for tick in 0..100u64 {
        interval.tick().await;
        let n = load(tick);
        if n > 0 {
            let jobs: Vec<_> = (0..n)
                .map(|_| json!({"kind": "sleep", "payload": {"ms": JOB_MS}, "queue": queue}))
                .collect();
            let (status, body) = app.post("/v1/jobs/batch", &json!({"jobs": jobs})).await;
            assert_eq!(status, 202, "{body}");
            total += n;
        }
        let mut metrics = Vec::new();
        for key in &keys {
            metrics.push(keda_length(&mut conn, key).await.1 as f64);
        }
        let decision = scaler.step(tick, &metrics);
        // The pods follow: new replicas start, surplus ones get their SIGTERM and drain.
        while replicas.len() < decision.replicas as usize {
            replicas.push(app.spawn_replica(worker.args()));
        }
        while replicas.len() > decision.replicas as usize {
            let r = replicas.pop().expect("one");
            stopping.push(tokio::spawn(r.stop()));
        }
        let done =
            tick > 30 && decision.replicas == 0 && rows.last().is_some_and(|r| r.decision.replicas == 0);
        rows.push(Row {
            tick,
            real_ms: started.elapsed().as_millis(),
            enqueued: n,
            metrics,
            decision,
        });
        if done {
            break;
        }
    }
    for r in replicas.drain(..) {
        stopping.push(tokio::spawn(r.stop()));
    }
    for s in stopping {
        s.await.expect("replica stopped");
    }

    // The table: what the manifests would make Kubernetes run, tick by tick.
    let vt = |tick: u64| tick * so.polling_s;
    let mut table = format!(
        "\nKEDA replay: ScaledObject {} (prod) on queue {queue}; 1 tick = pollingInterval {} s \
         (replayed every {} ms); cooldownPeriod {} s = {} ticks; min {} max {}; triggers: {}\n",
        so.name,
        so.polling_s,
        TICK.as_millis(),
        so.cooldown_s,
        cooldown_ticks,
        so.min,
        so.max,
        so.triggers
            .iter()
            .zip(&keys)
            .map(|(t, k)| format!("{k} target {} activation {}", t.target, t.activation))
            .collect::<Vec<_>>()
            .join("; ")
    );
    writeln!(
        table,
        "{:>4} {:>6} {:>7} {:>8} {:>8} {:>8} {:>6} {:>4} {:>8}  why",
        "tick", "t(s)", "real ms", "enqueue", "pending", "leased", "active", "raw", "replicas"
    )
    .unwrap();
    for r in &rows {
        writeln!(
            table,
            "{:>4} {:>6} {:>7} {:>8} {:>8} {:>8} {:>6} {:>4} {:>8}  {}",
            r.tick,
            vt(r.tick),
            r.real_ms,
            r.enqueued,
            r.metrics[0],
            r.metrics.get(1).copied().unwrap_or(0.0),
            if r.decision.active { "yes" } else { "no" },
            r.decision.raw,
            r.decision.replicas,
            r.decision.why
        )
        .unwrap();
    }
    println!("{table}");

    // What must hold.
    let first_active = rows
        .iter()
        .position(|r| r.decision.active)
        .expect("the burst activates");
    assert!(
        rows[..first_active].iter().all(|r| r.decision.replicas == 0),
        "nothing runs before the first job"
    );
    assert!(
        rows[first_active].decision.replicas >= 1,
        "scales from zero on the tick the activation threshold is exceeded"
    );
    let peak = rows.iter().map(|r| r.decision.replicas).max().unwrap();
    assert_eq!(peak, so.max, "the burst must drive the family to maxReplicaCount");
    for r in &rows {
        assert!(r.decision.replicas <= so.max);
        if r.decision.active {
            assert!(
                r.decision.replicas >= 1,
                "tick {}: active with no replica",
                r.tick
            );
        }
    }
    // Slow scale-down: while above zero, at most one pod leaves per policy period.
    let period = scaler.ticks(so.behavior.down_policies[0].period_s) as usize;
    for w in rows.windows(period + 1) {
        let (a, b) = (w[0].decision.replicas, w[period].decision.replicas);
        if b > 0 && a > b {
            assert!(
                a - b <= 1,
                "ticks {}..{}: {a} → {b} is faster than one pod a period",
                w[0].tick,
                w[period].tick
            );
        }
    }
    assert!(
        rows.iter().any(|r| r.decision.why.starts_with("scale down")),
        "the trickle should show the gradual scale-down"
    );
    // Back to zero exactly cooldownPeriod after the last activity, not before.
    let last_active = rows.iter().rposition(|r| r.decision.active).expect("active once");
    let zero = rows[last_active..]
        .iter()
        .position(|r| r.decision.replicas == 0)
        .map(|i| last_active + i)
        .expect("the family returns to zero replicas");
    assert_eq!(
        rows[zero].tick - rows[last_active].tick,
        cooldown_ticks,
        "scales to zero cooldownPeriod after the last active tick"
    );
    assert!(rows[last_active..zero].iter().all(|r| r.decision.replicas >= 1));

    // And the workers really did the work: every job ran, nothing is left waiting or held.
    let start = Instant::now();
    loop {
        let q = app.queue(&queue).await;
        if q["done"].as_u64() == Some(total as u64) {
            assert_eq!(
                (q["depth"].as_u64(), q["running"].as_u64()),
                (Some(0), Some(0)),
                "{q}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not every job ran: {q} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.shutdown().await;
}
