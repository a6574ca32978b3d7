//! `POST /v1/events` and the cached leaderboard: per-event problems, and a stampede of 50
//! requests on an expired leaderboard rebuilding it exactly once.

use std::{sync::Arc, time::Duration};

use jobs::cache::{CacheSettings, ReadCache};
use poem::{EndpointExt, http::StatusCode, test::TestClient};
use schema::scores::RawScore;
use serde_json::json;

use crate::support::{REDIS_URL, assert_problem, read, spawn_app};

#[tokio::test]
async fn a_valid_batch_is_stored_and_a_bad_one_reports_every_bad_event() {
    let app = spawn_app().await;
    let ok = app
        .client
        .post("/v1/events")
        .body_json(&json!({"events": [
            {"name": "page.view", "subject": "u1", "value": 3, "ts": "2026-12-01T10:00:00Z"},
            {"name": "checkout", "subject": "u2", "attrs": {"error": true}},
        ]}))
        .send()
        .await;
    let (status, _, body) = read(ok).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["ingested"], 2);
    assert_eq!(schema::events::count(&app.db).await.unwrap(), 2);

    let bad = app
        .client
        .post("/v1/events")
        .body_json(&json!({"events": [
            {"name": "fine", "subject": "u1"},
            {"name": "bad name!", "subject": "u1", "value": "NaN"},
            {"subject": "u3", "ts": "not a time"},
        ]}))
        .send()
        .await;
    let problem = assert_problem(bad, StatusCode::UNPROCESSABLE_ENTITY, "invalid-events").await;
    let errors: Vec<(u64, String)> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["field"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        [
            (1, "name".into()),
            (1, "value".into()),
            (2, "name".into()),
            (2, "ts".into())
        ]
    );
    // All or nothing: the valid event of the bad batch was not stored.
    assert_eq!(schema::events::count(&app.db).await.unwrap(), 2);

    let empty = app
        .client
        .post("/v1/events")
        .body_json(&json!({"events": []}))
        .send()
        .await;
    assert_problem(empty, StatusCode::UNPROCESSABLE_ENTITY, "invalid-events").await;
}

/// The value of `drover_cache_requests_total{cache="leaderboard",result=…}` in `text`.
fn counter(text: &str, result: &str) -> u64 {
    let needle = format!("drover_cache_requests_total{{cache=\"leaderboard\",result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn an_expired_leaderboard_is_rebuilt_exactly_once_under_fifty_concurrent_requests() {
    let app = spawn_app().await;
    // A TTL without jitter, so the test knows when the board is gone.
    let settings = CacheSettings {
        ttl: Duration::from_millis(1500),
        jitter: 0.0,
        ..Default::default()
    };
    let cache = ReadCache::connect(REDIS_URL, &app.prefix, settings).unwrap();
    let state = app.state.clone().with_cache(cache);
    let client = Arc::new(
        TestClient::new(api::routes(state.clone()).boxed())
            .default_header("authorization", format!("Bearer {}", app.admin_key)),
    );

    let put = client
        .put("/v1/scores/engagement")
        .body_json(&json!({"weights": {"view": 1.0}, "half_life_s": 3600}))
        .send()
        .await;
    assert_eq!(put.0.status(), StatusCode::CREATED);
    // 5 000 scored subjects: a rebuild takes long enough for the requests to overlap it.
    let run = uuid::Uuid::now_v7();
    let rows: Vec<RawScore> = (0..5_000)
        .map(|i| RawScore {
            subject: format!("s{i:05}"),
            raw: i as f64,
            components: json!({}),
        })
        .collect();
    schema::scores::upsert_raw(&app.db, "engagement", run, chrono::Utc::now(), &rows)
        .await
        .unwrap();
    let normalized: Vec<(String, f64)> = rows.iter().map(|r| (r.subject.clone(), r.raw / 49.99)).collect();
    schema::scores::set_normalized(&app.db, "engagement", run, &normalized)
        .await
        .unwrap();

    let top = |client: Arc<TestClient<_>>| async move {
        let (status, _, body) = read(client.get("/v1/scores/engagement/top?n=5").send().await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    };
    let first = top(client.clone()).await;
    assert_eq!(first["cached"], false);
    assert_eq!(first["top"][0]["subject"], "s04999");
    assert_eq!(first["subjects"], 5000);
    let warm = top(client.clone()).await;
    assert_eq!(warm["cached"], true, "served from Redis after the first read");
    assert_eq!(warm["top"], first["top"]);

    // Wait out the TTL.
    let redis = redis::Client::open(REDIS_URL).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let meta = format!("{}:{{lb.engagement}}:meta", app.prefix);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&meta)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !exists {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the board never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let before = state.metrics.render();
    let (hits0, misses0) = (counter(&before, "hit"), counter(&before, "miss"));
    let requests: Vec<_> = (0..50).map(|_| tokio::spawn(top(client.clone()))).collect();
    let mut cached = 0;
    for r in requests {
        let body = r.await.unwrap();
        assert_eq!(body["top"], first["top"]);
        cached += usize::from(body["cached"] == true);
    }
    let after = state.metrics.render();
    assert_eq!(
        counter(&after, "miss") - misses0,
        1,
        "rebuilt more than once:\n{after}"
    );
    assert_eq!(counter(&after, "hit") - hits0, 49);
    assert_eq!(cached, 49);
}
