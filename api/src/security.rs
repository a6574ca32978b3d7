//! What the HTTP layer adds for safety beyond authentication: security headers (every response
//! `nosniff`; HTML pages a strict Content-Security-Policy, no framing, no referrer), CORS only
//! for configured origins, a deadline per request, and the OpenAPI document and Swagger UI
//! with the bearer-key scheme declared on every operation that needs a key.

use std::{sync::Arc, time::Duration};

use poem::{
    Endpoint, IntoResponse, Request, Response, Route,
    endpoint::make_sync,
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Cors,
    web::Html,
};
use serde_json::{Value, json};

use crate::{
    ApiError,
    auth::{self, Access, MetricsAuth},
};

/// Content-Security-Policy of HTML pages. The Swagger UI ships its scripts and styles inline,
/// from the binary: nothing is loaded from another origin. (The dashboard sets a stricter one.)
const HTML_CSP: &str = "default-src 'none'; script-src 'self' 'unsafe-inline'; \
                        style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; \
                        font-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// Middleware (with `around`): the security headers on every response.
pub(crate) async fn headers<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    let mut resp = match ep.call(req).await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    };
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let html = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/html"));
    if html {
        // A page that brings its own, stricter policy (the dashboard) keeps it.
        if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(HTML_CSP),
            );
        }
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        h.insert(
            header::HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        );
    }
    Ok(resp)
}

/// Middleware (with `around`): a request that takes longer than `limit` to answer (a client
/// trickling its body in, for one) is answered 408 and its connection freed.
pub(crate) async fn deadline<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    limit: Duration,
) -> poem::Result<Response> {
    match tokio::time::timeout(limit, ep.call(req)).await {
        Ok(result) => result.map(IntoResponse::into_response),
        Err(_) => Err(ApiError::Http {
            status: StatusCode::REQUEST_TIMEOUT,
            kind: crate::error::ProblemType::BadRequest,
            detail: format!("the request was not complete within {} s", limit.as_secs()),
        }
        .into()),
    }
}

/// CORS for the configured origins; `None` (no origin configured) leaves CORS off.
pub(crate) fn cors(origins: &[String]) -> Option<Cors> {
    if origins.is_empty() {
        return None;
    }
    Some(
        Cors::new()
            .allow_origins(origins.iter().map(String::as_str))
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers(["authorization", "content-type", "traceparent"])
            .expose_headers(["location", "retry-after"])
            .max_age(600),
    )
}

/// The OpenAPI document with the `bearer` security scheme, required by every operation whose
/// rule needs a key.
pub(crate) fn spec_with_auth(spec: &str, metrics: MetricsAuth) -> String {
    let Ok(mut doc) = serde_json::from_str::<Value>(spec) else {
        return spec.to_owned();
    };
    doc["components"]["securitySchemes"]["bearer"] = json!({
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`drv_…`) from `drover keys create`.",
    });
    if let Some(paths) = doc["paths"].as_object_mut() {
        for ops in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in ops.values_mut().filter_map(Value::as_object_mut) {
                let access = op
                    .get("operationId")
                    .and_then(Value::as_str)
                    .and_then(auth::rule)
                    .unwrap_or(Access::Role(auth::Role::Admin));
                let open =
                    access == Access::Open || (access == Access::Metrics && metrics == MetricsAuth::Open);
                if !open {
                    op.insert("security".to_owned(), json!([{ "bearer": [] }]));
                }
            }
        }
    }
    doc.to_string()
}

/// `/openapi.json`: the document [`spec_with_auth`] made.
pub(crate) fn spec_endpoint(spec: String) -> impl Endpoint<Output = Response> {
    make_sync(move |_| {
        Response::builder()
            .content_type("application/json; charset=utf-8")
            .body(spec.clone())
    })
}

/// `/docs`: poem-openapi's Swagger UI page, showing `spec` (so its "Authorize" button knows the
/// bearer scheme).
pub(crate) fn docs_endpoint(ui_html: String, original_spec: &str, spec: &str) -> impl Endpoint + use<> {
    let html = ui_html.replacen(original_spec, spec, 1);
    Route::new().at("/", make_sync(move |_| Html(html.clone())))
}
