//! W3C Trace Context: the span of each request, in the caller's trace, and the `traceparent` a
//! job carries from the request that enqueued it, so that the worker's spans join that trace.

use std::time::Instant;

use poem::{Endpoint, IntoResponse, Middleware, Request, Response};

tokio::task_local! {
    /// The traceparent of the request being served (set by [`RequestTracing`]).
    static CURRENT: std::sync::Arc<str>;
}

/// The `traceparent` to store with the jobs of the request being served: the one its span
/// was given by [`RequestTracing`] (from the same header), so the request's log lines and its
/// jobs' share a trace id. Outside that middleware, [`traceparent_for`] of the header.
pub(crate) fn request_traceparent(header: Option<&str>) -> String {
    CURRENT
        .try_with(|tp| tp.to_string())
        .unwrap_or_else(|_| traceparent_for(header))
}

/// The `traceparent` to store with the jobs of a request: the caller's, normalised to version
/// `00`, if it sent a valid one; otherwise a new trace (sampled) rooted here.
fn traceparent_for(header: Option<&str>) -> String {
    header.and_then(parse).unwrap_or_else(generate)
}

/// Runs every request in a `request` span carrying the trace id of its `traceparent` (the
/// caller's, or a new trace), and logs each answer at debug level (`api::trace=debug`):
/// method, path, status and time taken.
pub(crate) struct RequestTracing;

impl<E: Endpoint> Middleware<E> for RequestTracing {
    type Output = RequestTracingEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        RequestTracingEndpoint { inner }
    }
}

pub(crate) struct RequestTracingEndpoint<E> {
    inner: E,
}

impl<E: Endpoint> Endpoint for RequestTracingEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        use tracing::Instrument;
        let started = Instant::now();
        let header = req.headers().get("traceparent").and_then(|v| v.to_str().ok());
        let traceparent: std::sync::Arc<str> = traceparent_for(header).into();
        let span = tracing::info_span!(
            "request",
            method = %req.method(),
            path = req.uri().path(),
            trace_id = jobs::trace::trace_id(&traceparent),
        );
        jobs::trace::set_parent(&span, &traceparent);
        let answer = async {
            let resp = match self.inner.call(req).await {
                Ok(resp) => resp.into_response(),
                Err(err) => err.into_response(),
            };
            tracing::debug!(
                status = resp.status().as_u16(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "request answered"
            );
            resp
        };
        Ok(CURRENT.scope(traceparent, answer.instrument(span)).await)
    }
}

/// Parses a `traceparent` header. Versions above `00` are accepted by their first four fields,
/// as the specification asks.
fn parse(header: &str) -> Option<String> {
    let header = header.trim();
    let mut parts = header.split('-');
    let (version, trace_id, parent_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let is_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let all_zero = |s: &str| s.bytes().all(|b| b == b'0');
    if !is_hex(version, 2) || version == "ff" || !is_hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if !is_hex(trace_id, 32) || all_zero(trace_id) || !is_hex(parent_id, 16) || all_zero(parent_id) {
        return None;
    }
    Some(format!("00-{trace_id}-{parent_id}-{flags}"))
}

fn generate() -> String {
    let trace_id: u128 = rand::random::<u128>().max(1);
    let span_id: u64 = rand::random::<u64>().max(1);
    format!("00-{trace_id:032x}-{span_id:016x}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_kept() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent_for(Some(tp)), tp);
        assert_eq!(
            traceparent_for(Some(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra"
            )),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        );
    }

    #[test]
    fn an_invalid_traceparent_is_replaced_by_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let tp = traceparent_for(Some(bad));
            assert_ne!(tp, bad);
            assert!(parse(&tp).is_some(), "generated {tp:?} must itself be valid");
        }
    }

    #[test]
    fn generated_traces_differ() {
        assert_ne!(generate(), generate());
    }
}
